"""Journey files as table-driven cases (`tests/cases/journeys/`), as campaign files are (test_campaign_cases.py).

Each file in `invalid/` starts with `# expect: line N: FIELD: SUBSTRING` (FIELD `-` when the problem has no
field). Loading it must report an error starting `<file>:<N>: <FIELD>:` whose first line contains SUBSTRING, and
the journey must not load: every class of bad journey input names file, line and field.
"""

from __future__ import annotations

import re
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from engine.definitions import find_definition, load_definition, load_definitions
from engine.errors import CampaignError
from engine.journeys.spec import EntryKind, IfStep, Journey, SendStep, TriggerKind, WaitStep
from engine.settings import Settings
from engine.spec import Campaign, load_campaign, load_campaigns

CASES = Path(__file__).parent / "cases" / "journeys"
VALID = sorted((CASES / "valid").glob("*.yaml"))
INVALID = sorted((CASES / "invalid").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: line (\d+): (\S+): (.+)$")
CAMPAIGNS = Path(__file__).parent.parent / "campaigns"


def settings_for(folder: Path) -> Settings:
    return Settings(version=1, campaigns_dir=folder)


def test_case_folders_are_populated() -> None:
    """The table has cases in both folders, so the parametrized tests below cannot pass vacuously."""
    assert len(VALID) >= 6
    assert len(INVALID) >= 60


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_journey_loads(path: Path) -> None:
    """A valid case loads as a Journey whose id is its `id:` or its file name, with at least one step."""
    journey = load_definition(path, settings_for(path.parent))
    assert isinstance(journey, Journey)
    assert journey.id == path.stem
    assert journey.steps


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_journey_names_file_line_and_field(path: Path) -> None:
    """An invalid case is reported (not loaded) with an error starting `file:line: field:` and the expected reason."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = EXPECT.match(first)
    assert match, f"{path.name}: first line must be `# expect: line N: FIELD: SUBSTRING`"
    line, field, substring = int(match.group(1)), match.group(2), match.group(3).strip()
    defs = load_definitions([path], settings_for(path.parent))
    assert not defs.journeys and not defs.campaigns
    assert defs.errors, f"{path.name} loaded without an error"
    error = defs.errors[0]
    head = str(error).splitlines()[0]
    prefix = f"{path}:{line}: " + ("" if field == "-" else f"{field}: ")
    assert head.startswith(prefix), f"expected prefix {prefix!r}, got {head!r}"
    assert substring in head
    assert isinstance(error, CampaignError)
    assert error.location.file == str(path)


def test_every_problem_in_a_journey_file_is_reported_together(tmp_path: Path) -> None:
    """Three independent mistakes in one journey file come back in one error, each with its own line and field."""
    path = tmp_path / "many.yaml"
    path.write_text(
        "name: 多处错误\ntrigger: contact_added\nentry: twice\n"
        "steps:\n  - wait: soon\n  - send: {template: '{{ x }}'}\n",
        encoding="utf-8",
    )
    with pytest.raises(CampaignError) as info:
        load_definition(path, settings_for(tmp_path))
    where = [(p.location.line, p.location.field) for p in info.value.problems]
    assert where == [(3, "entry"), (5, "steps[0].wait.duration"), (6, "steps[1].send.template")]


def test_the_full_journey_case_resolves_steps_and_their_order() -> None:
    """Step ids default to their position; a branch continues where its parent does; defaults come from the file."""
    journey = load_definition(CASES / "valid" / "welcome_full.yaml", settings_for(CASES / "valid"))
    assert isinstance(journey, Journey)
    assert journey.trigger.kind is TriggerKind.CONTACT_ADDED
    assert journey.entry.kind is EntryKind.ONCE
    assert journey.catch_up == "all" and journey.grace == timedelta(hours=2)
    welcome = journey.index["welcome"]
    assert isinstance(welcome, SendStep) and welcome.transactional
    assert welcome.frequency_cap is None and welcome.quiet_hours is None  # transactional: neither applies
    tip = journey.index["tip"]
    assert isinstance(tip, SendStep) and tip.frequency_cap is not None and tip.quiet_hours is not None
    branch = journey.index["8"]
    assert isinstance(branch, IfStep)
    assert journey.next_of["8.then.1"] == "9" and journey.next_of["8.else.2"] == "9"
    wait = journey.index["9"]
    assert isinstance(wait, WaitStep) and wait.event is not None and wait.on_timeout
    assert journey.next_of["12"] is None


def test_a_journey_spells_a_campaign_with_a_schedule_trigger(tmp_path: Path) -> None:
    """`trigger: {schedule: ...}` with `message:` is a one-send journey; the same content with `schedule:` at the
    top is a campaign, as before: both spellings load, with the same audience and template."""
    body = "audience: {tags_any: [VIP]}\nmessage: {template: '本周VIP专享'}\nfrequency_cap: false\n"
    (tmp_path / "as_campaign.yaml").write_text("name: 每周\nschedule: {cron: '0 10 * * 1'}\n" + body, encoding="utf-8")
    (tmp_path / "as_journey.yaml").write_text(
        "name: 每周\ntrigger: {schedule: {cron: '0 10 * * 1'}}\n" + body, encoding="utf-8"
    )
    defs = load_definitions([tmp_path], settings_for(tmp_path))
    assert not defs.errors
    (campaign,) = defs.campaigns
    (journey,) = defs.journeys
    assert campaign.schedule == journey.trigger.schedule
    assert campaign.audience == journey.audience
    (send,) = journey.sends()
    assert send.compiled.source == campaign.compiled.source
    assert send.frequency_cap is None and campaign.frequency_cap is None


def test_campaign_loaders_leave_journeys_to_the_definitions_loader(tmp_path: Path) -> None:
    """load_campaigns (the campaign scheduler's loader) sets journey files aside instead of reporting them as bad
    campaigns; load_campaign on a journey says it is one; ids are unique across both kinds."""
    shutil.copy(CASES / "valid" / "tag_removed.yaml", tmp_path / "vip_expired.yaml")
    (tmp_path / "vip_expired2.yaml").write_text(
        "id: vip_expired\nname: 重名\naudience: {}\nmessage: {template: hi}\n", encoding="utf-8"
    )
    result = load_campaigns([tmp_path], settings_for(tmp_path))
    assert result.journey_files == [tmp_path / "vip_expired.yaml"]
    assert not result.errors
    with pytest.raises(CampaignError, match="is a journey"):
        load_campaign(tmp_path / "vip_expired.yaml", settings_for(tmp_path))
    defs = load_definitions([tmp_path], settings_for(tmp_path))
    assert [c.id for c in defs.campaigns] == ["vip_expired"]
    assert not defs.journeys
    assert "already used" in str(defs.errors[0])


def test_goto_must_name_a_journey_that_loaded(tmp_path: Path) -> None:
    """A goto naming a loaded journey is kept; one naming a campaign is an error at its line; such a journey is not
    run at all."""
    (tmp_path / "a.yaml").write_text("name: A\ntrigger: contact_added\nsteps:\n  - goto: b\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("name: B\ntrigger: message\nsteps: [exit]\n", encoding="utf-8")
    (tmp_path / "c.yaml").write_text("name: C\ntrigger: contact_added\nsteps:\n  - goto: d\n", encoding="utf-8")
    (tmp_path / "d.yaml").write_text("name: D\naudience: {}\nmessage: {template: hi}\n", encoding="utf-8")
    defs = load_definitions([tmp_path], settings_for(tmp_path))
    assert sorted(j.id for j in defs.journeys) == ["a", "b"]
    (error,) = defs.errors
    assert str(error).startswith(f"{tmp_path / 'c.yaml'}:4: steps[0].goto: 'd' is a campaign")


def test_every_example_in_the_campaigns_folder_loads() -> None:
    """The shipped examples (campaigns and the Chinese journeys) load without a single error."""
    defs = load_definitions([CAMPAIGNS], settings_for(CAMPAIGNS))
    assert not defs.errors, "\n".join(map(str, defs.errors))
    assert {"welcome_new", "keyword_reply", "birthday", "winback"} <= {j.id for j in defs.journeys}
    assert all(isinstance(c, Campaign) for c in defs.campaigns)


def test_find_definition_by_id_or_path() -> None:
    """A journey is found by its id or its path, as campaigns are."""
    by_id = find_definition("keyword_reply", settings_for(CAMPAIGNS))
    by_path = find_definition(str(CAMPAIGNS / "keyword_reply.yaml"), settings_for(CAMPAIGNS))
    assert isinstance(by_id, Journey) and by_id.id == by_path.id == "keyword_reply"
