"""Campaign files as table-driven cases (`tests/cases/campaigns/`).

Each file in `invalid/` starts with `# expect: line N: FIELD: SUBSTRING` (FIELD `-` when the problem has
no field, e.g. broken YAML). The error must start with `<file>:<N>: <FIELD>:` and contain SUBSTRING in
its first line, so every class of bad input is checked for naming file, line and field.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import time, timedelta
from pathlib import Path

import pytest

from engine.errors import CampaignError, TemplateError
from engine.settings import Settings
from engine.spec import load_campaign, load_campaigns

CASES = Path(__file__).parent / "cases" / "campaigns"
VALID = sorted((CASES / "valid").glob("*.yaml"))
INVALID = sorted((CASES / "invalid").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: line (\d+): (\S+): (.+)$")


@dataclass(frozen=True)
class Expected:
    line: int
    field: str | None
    substring: str


def expected(path: Path) -> Expected:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = EXPECT.match(first)
    assert match, f"{path.name}: first line must be `# expect: line N: FIELD: SUBSTRING`, got {first!r}"
    field = None if match.group(2) == "-" else match.group(2)
    return Expected(int(match.group(1)), field, match.group(3).strip())


@pytest.fixture
def settings() -> Settings:
    return Settings(version=1)


def test_case_folders_are_populated() -> None:
    """The table has cases in both folders, so the parametrized tests below cannot pass vacuously."""
    assert len(VALID) >= 5
    assert len(INVALID) >= 40


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_campaign_loads(path: Path, settings: Settings) -> None:
    """A valid case file loads into a Campaign whose id is its `id:` or its file name."""
    campaign = load_campaign(path, settings)
    assert campaign.id
    assert campaign.file == path
    assert campaign.compiled.source.strip()


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_campaign_names_file_line_and_field(path: Path, settings: Settings) -> None:
    """An invalid case raises CampaignError starting `file:line: field:` with the expected reason."""
    want = expected(path)
    with pytest.raises(CampaignError) as info:
        load_campaign(path, settings)
    message = str(info.value)
    first_line = message.splitlines()[0]
    prefix = f"{path}:{want.line}: " + (f"{want.field}: " if want.field else "")
    assert first_line.startswith(prefix), f"expected prefix {prefix!r}, got {first_line!r}"
    assert want.substring in first_line
    assert info.value.location.file == str(path)
    assert info.value.location.line == want.line
    assert info.value.location.field == want.field


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_campaign_problems_all_located(path: Path, settings: Settings) -> None:
    """Every problem reported for an invalid file (not just the first) names the file and a line."""
    with pytest.raises(CampaignError) as info:
        load_campaign(path, settings)
    for problem in info.value.problems:
        assert problem.location.file == str(path)
        assert problem.location.line is not None
        assert problem.location.line >= 1


def test_minimal_campaign_takes_defaults_from_settings(settings: Settings) -> None:
    """A campaign that names no timezone, throttle, quiet hours or cap gets config.yaml's."""
    campaign = load_campaign(CASES / "valid" / "minimal.yaml", settings)
    assert campaign.id == "minimal"
    assert campaign.timezone == settings.timezone == "Asia/Shanghai"
    assert campaign.throttle == settings.sending.throttle
    assert campaign.quiet_hours == settings.sending.quiet_hours
    assert campaign.frequency_cap == settings.sending.frequency_cap
    assert campaign.max_errors == settings.sending.max_errors
    assert campaign.dedupe == "run"
    assert campaign.dedupe_window is None
    assert campaign.schedule is None


def test_every_option_is_kept(settings: Settings) -> None:
    """Every option written in a campaign file ends up in the Campaign, overriding the defaults."""
    c = load_campaign(CASES / "valid" / "every_option.yaml", settings)
    assert c.id == "every-option_1.0"
    assert c.enabled is False
    assert c.timezone == "America/New_York"
    assert c.dedupe_window == timedelta(days=7)
    assert c.frequency_cap is not None
    assert (c.frequency_cap.max, c.frequency_cap.per) == (2, "week")
    assert c.quiet_hours is not None
    assert (c.quiet_hours.start, c.quiet_hours.end) == (time(22, 30), time(8, 0))
    assert c.throttle.per_second == 2.5
    assert c.throttle.per_minute == 100
    assert c.max_errors == 0
    assert c.message.on_missing_field == "skip"
    assert c.audience.limit == 100
    assert c.audience.include_coworkers is True
    assert c.rules is not None


def test_false_turns_off_cap_and_quiet_hours(settings: Settings) -> None:
    """`frequency_cap: false` and `quiet_hours: false` mean none, not the config default."""
    c = load_campaign(CASES / "valid" / "at_once.yaml", settings)
    assert c.frequency_cap is None
    assert c.quiet_hours is None


def test_unquoted_times_are_read_as_times(settings: Settings) -> None:
    """`start: 21:00` unquoted (a YAML 1.1 sexagesimal number) still means 21:00."""
    c = load_campaign(CASES / "valid" / "quiet_hours_numbers.yaml", settings)
    assert c.quiet_hours is not None
    assert (c.quiet_hours.start, c.quiet_hours.end) == (time(21, 0), time(9, 0))


def test_template_file_is_read_relative_to_the_campaign(settings: Settings) -> None:
    """`template_file:` is resolved against the campaign file's folder."""
    c = load_campaign(CASES / "valid" / "template_file.yaml", settings)
    assert c.compiled.source == (CASES / "valid" / "templates" / "ok.j2").read_text(encoding="utf-8")


@pytest.mark.parametrize(("indicator", "offset"), [("|", 1), ("|-", 1), ("|+", 1), ("| # 注释", 1), ("", 0)])
def test_template_error_line_is_the_exact_file_line(
    tmp_path: Path, settings: Settings, indicator: str, offset: int
) -> None:
    """A template error's line is the file line of the bad template line, for block and inline scalars."""
    bad = "{{ nmae }}"
    if indicator:
        body = f"  template: {indicator}\n    第一行\n    第二行\n    {bad}\n"
        want = 5 + 2 + offset  # key on line 5, third template line
    else:
        body = f'  template: "{bad}"\n'
        want = 5
    path = tmp_path / "c.yaml"
    path.write_text(f"# 注释\nname: x\naudience: {{}}\nmessage:\n{body}", encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        load_campaign(path, settings)
    assert str(info.value).startswith(f"{path}:{want}: message.template: unknown field 'nmae'")


def test_all_problems_in_a_file_are_reported_together(tmp_path: Path, settings: Settings) -> None:
    """Problems in schedule, rules and template of one file are all reported, each with its own line."""
    path = tmp_path / "many.yaml"
    path.write_text(
        "name: 多个错误\n"
        "schedule: {cron: '0 10 * *'}\n"
        "audience:\n"
        "  rules: [{cty: 上海}]\n"
        "message:\n"
        "  template: '{{ nmae }}'\n",
        encoding="utf-8",
    )
    with pytest.raises(CampaignError) as info:
        load_campaign(path, settings)
    located = [(p.location.line, p.location.field) for p in info.value.problems]
    assert located == [(2, "schedule.cron"), (4, "audience.rules[0].cty"), (6, "message.template")]
    assert str(info.value).count(str(path)) == 3


def test_missing_file_is_a_located_error(tmp_path: Path, settings: Settings) -> None:
    """Loading a file that does not exist is a CampaignError naming the file."""
    with pytest.raises(CampaignError, match="file not found") as info:
        load_campaign(tmp_path / "nope.yaml", settings)
    assert str(info.value).startswith(str(tmp_path / "nope.yaml"))


def test_file_name_that_is_not_an_id_needs_an_explicit_id(tmp_path: Path, settings: Settings) -> None:
    """A file whose name is not a valid id (and has no `id:`) is rejected with advice to add one."""
    path = tmp_path / "周末 活动.yaml"
    path.write_text("name: x\naudience: {}\nmessage: {template: hi}\n", encoding="utf-8")
    with pytest.raises(CampaignError, match="add an explicit id"):
        load_campaign(path, settings)
    path.write_text("id: weekend\nname: x\naudience: {}\nmessage: {template: hi}\n", encoding="utf-8")
    assert load_campaign(path, settings).id == "weekend"


def test_load_campaigns_collects_errors_without_stopping(tmp_path: Path, settings: Settings) -> None:
    """load_campaigns loads every good file and reports every bad one, whatever the order."""
    names = ["a_bad_yaml.yaml", "b_ok.yaml", "c_bad_rule.yaml", "d_ok.yaml"]
    shutil.copy(CASES / "invalid" / "yaml_tab.yaml", tmp_path / names[0])
    shutil.copy(CASES / "valid" / "minimal.yaml", tmp_path / names[1])
    shutil.copy(CASES / "invalid" / "rule_unknown_operator.yaml", tmp_path / names[2])
    shutil.copy(CASES / "valid" / "at_once.yaml", tmp_path / names[3])
    result = load_campaigns([tmp_path], settings)
    assert [c.id for c in result.campaigns] == ["b_ok", "d_ok"]
    assert [e.location.file for e in result.errors] == [str(tmp_path / names[0]), str(tmp_path / names[2])]
    assert [e.location.line for e in result.errors] == [5, 6]


def test_load_campaigns_rejects_duplicate_ids_naming_both_files(tmp_path: Path, settings: Settings) -> None:
    """Two files with one id: the first loads; the second is an error at its id line naming both files."""
    first, second = tmp_path / "one.yaml", tmp_path / "two.yaml"
    for path in (first, second):
        path.write_text("# 注释\nid: same\nname: x\naudience: {}\nmessage: {template: hi}\n", encoding="utf-8")
    result = load_campaigns([first, second], settings)
    assert [c.file for c in result.campaigns] == [first]
    assert len(result.errors) == 1
    message = str(result.errors[0])
    assert message.startswith(f"{second}:2: id:")
    assert str(first) in message
    assert "same" in message


def test_a_command_runs_the_campaign_an_id_belongs_to(tmp_path: Path) -> None:
    """`wecast run/preview ID` picks what the server schedules: a.yaml says `id: b` and b.yaml is named b, so b is
    a.yaml's (b.yaml is the duplicate, refused by its path and by its name alike) — never b.yaml's content under
    the id, runs and dedupe of a.yaml's campaign. A file named otherwise is still found by its name, and a broken
    one says why."""
    from engine.definitions import find_definition
    from engine.errors import NotFoundError
    from engine.spec import find_campaign

    folder = tmp_path / "campaigns"
    folder.mkdir()
    body = "name: {name}\naudience: {{}}\nmessage: {{template: {name}}}\n"
    (folder / "a.yaml").write_text("id: b\n" + body.format(name="来自A"), encoding="utf-8")
    (folder / "b.yaml").write_text(body.format(name="来自B"), encoding="utf-8")
    (folder / "x.yaml").write_text("id: promo\n" + body.format(name="促销"), encoding="utf-8")
    (folder / "broken.yaml").write_text("name: 坏\naudience: {}\n", encoding="utf-8")
    settings = Settings(version=1, campaigns_dir=folder)
    for find in (find_campaign, find_definition):
        assert find("b", settings).file == folder / "a.yaml"
        for ref in (str(folder / "b.yaml"), str(tmp_path / "campaigns" / "." / "b.yaml")):
            with pytest.raises(CampaignError, match=r"id 'b' is already used by .*a\.yaml") as refused:
                find(ref, settings)
            assert refused.value.location.file == ref and refused.value.location.field == "id"
        assert find(str(folder / "a.yaml"), settings).id == "b"
        assert find("x", settings).id == find("promo", settings).id == "promo"
        with pytest.raises(CampaignError, match="message"):
            find("broken", settings)
        with pytest.raises(NotFoundError):
            find("nothing", settings)


def test_load_campaigns_expands_folders_to_yaml_files(tmp_path: Path, settings: Settings) -> None:
    """A folder argument means its *.yaml and *.yml files; other files are ignored."""
    (tmp_path / "a.yaml").write_text("name: a\naudience: {}\nmessage: {template: hi}\n", encoding="utf-8")
    (tmp_path / "b.yml").write_text("name: b\naudience: {}\nmessage: {template: hi}\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not: a campaign: at all", encoding="utf-8")
    result = load_campaigns([tmp_path], settings)
    assert sorted(c.id for c in result.campaigns) == ["a", "b"]
    assert result.errors == []


def test_shipped_example_campaigns_are_valid(settings: Settings) -> None:
    """Every campaign in campaigns/ loads without errors and with distinct ids."""
    root = Path(__file__).resolve().parent.parent / "campaigns"
    result = load_campaigns([root], settings)
    assert result.errors == []
    assert len(result.campaigns) >= 4


def test_anchors_aliases_and_merge_keys_still_work(settings: Settings) -> None:
    """An alias repeats its anchor's value and a merge key's mapping is overridden by the keys beside it."""
    c = load_campaign(CASES / "valid" / "anchors_and_merge.yaml", settings)
    assert c.audience.tags_any == c.audience.exclude_ids == ["VIP", "金卡"]
    assert (c.throttle.per_second, c.throttle.per_minute) == (2, 60)
    assert c.location("throttle").line == 11
