"""The 中文 guide (docs/guide.zh.md) stays true: its field tables name every field of the campaign, journey and
config.yaml models and nothing that is not one; its example files validate; each "common error" is the exact
message wecast prints for the example beside it; the quick start runs as pasted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide.zh.md"
TEXT = GUIDE.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The guide's text under the `## title` heading, up to the next one."""
    match = re.search(rf"(?ms)^## {re.escape(title)}\n(.*?)(?=^## )", TEXT + "\n## ")
    assert match, f"docs/guide.zh.md has a section ## {title}"
    return match.group(1)


def table_fields(text: str) -> set[str]:
    """The names in the first column of a section's reference table."""
    return set(re.findall(r"(?m)^\| `([^`]+)` \|", text))


def _models(tp: object) -> Iterator[type[BaseModel]]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        yield from _models(typing.get_args(tp)[0])
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp
    elif origin is not None or isinstance(tp, types.UnionType):
        for arg in typing.get_args(tp):
            yield from _models(arg)


def paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every field of `model` as it is written in YAML, nested models as dotted paths (list items without [])."""
    for name, info in model.model_fields.items():
        path = prefix + (info.alias or name)
        yield path
        for inner in _models(info.annotation):
            if inner is not model:
                yield from paths(inner, path + ".")


def campaign_fields() -> set[str]:
    from engine.spec import CampaignModel

    return set(paths(CampaignModel))


def journey_fields() -> set[str]:
    """The journey's own fields (beside the campaign's), its triggers, and its steps' keys and fields."""
    from engine.journeys import spec as js
    from engine.spec import CampaignModel

    own = set(js.JourneyModel.model_fields) - set(CampaignModel.model_fields) | {"kind", "trigger", "entry"}
    trigger = {f"trigger.{p}" for p in paths(js.TriggerModel)}
    steps = set(js.STEP_KINDS) | {extra for extras in js.STEP_EXTRAS.values() for extra in extras} | {"id"}
    wait = {f"wait.{p}" for p in paths(js.WaitModel)}
    tag = {f"tag.{p}" for p in paths(js.TagModel)}
    return own | trigger | steps | wait | tag | {"entry.again_after"}


def config_fields() -> set[str]:
    from engine.settings import Settings

    return set(paths(Settings))


@pytest.mark.parametrize(
    ("title", "fields"),
    [("活动字段参考", campaign_fields), ("旅程字段参考", journey_fields), ("config.yaml 参考", config_fields)],
)
def test_the_field_tables_name_every_field_and_only_fields(title: str, fields: typing.Callable[[], set[str]]) -> None:
    """A field added to a model without a line in the guide fails here, and so does a line for a field gone."""
    documented = table_fields(section(title))
    wanted = fields()
    assert not wanted - documented, f"missing from docs/guide.zh.md ## {title}: {sorted(wanted - documented)}"
    assert not documented - wanted, f"not fields (any more), in ## {title}: {sorted(documented - wanted)}"


def blocks(marker: str) -> list[tuple[str, str, str]]:
    """(file named on the block's first line, the block, the ```text block right after it or '') for each ```yaml
    block whose first line is `# <marker>：<file>`."""
    out = []
    pattern = rf"```yaml\n# {marker}：(\S+)\n(.*?)```(?:\s*```text\n(.*?)```)?"
    for match in re.finditer(pattern, TEXT, re.S):
        out.append((match.group(1), match.group(2), (match.group(3) or "").strip()))
    return out


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder set up as `wecast init` does, with contacts synced, as the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WECAST_CONFIG", raising=False)
    assert CliRunner().invoke(main, ["init"]).exit_code == 0
    assert CliRunner().invoke(main, ["contacts", "sync"]).exit_code == 0
    return tmp_path


def test_the_guides_example_files_validate(folder: Path) -> None:
    """Every example campaign, journey and config.yaml in the guide is valid as written (contacts synced, so the
    templates are checked against the demo customers too)."""
    examples = blocks("文件")
    assert len(examples) >= 6
    for name, body, _ in examples:
        (folder / name).write_text(body, encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", "--json"])
    assert result.exit_code == 0, result.output
    report = result.stdout
    for name, _, _ in examples:
        if name.startswith("campaigns/"):
            assert Path(name).stem in report, name


def test_each_common_error_is_the_message_wecast_prints(folder: Path) -> None:
    """For each 错误示例 in the guide, `wecast --lang zh validate` prints the error shown under it, word for word."""
    cases = blocks("错误示例")
    assert len(cases) >= 8
    for name, body, expected in cases:
        assert expected, f"{name}: the expected error follows in a ```text block"
        (folder / name).write_text(body, encoding="utf-8")
        if name == "config.yaml":
            result = CliRunner().invoke(main, ["--lang", "zh", "-c", name, "validate"])
            (folder / name).unlink()
        else:
            result = CliRunner().invoke(main, ["--lang", "zh", "validate", name])
            (folder / name).unlink()
        assert result.exit_code in (1, 2), (name, result.output)
        assert expected in result.stderr, (name, result.stderr)


def test_the_quick_start_runs_as_pasted(tmp_path: Path) -> None:
    """The quick start's block, pasted into bash in an empty folder with wecast on PATH, succeeds; it sets up a
    folder that previews and runs the example."""
    [block] = re.findall(r"```sh\n# 可直接粘贴运行\n(.*?)```", TEXT, re.S)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("WECAST_CONFIG", None)
    done = subprocess.run(
        ["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "campaigns" / "welcome.yaml").is_file()
    assert "新客欢迎" in done.stdout  # the runs table names the example campaign's run


def test_the_cli_and_readme_point_to_the_guide() -> None:
    """The guide the CLI's errors name exists, and the README's Chinese section links to it."""
    from engine.cli import GUIDE as named

    assert (ROOT / named).is_file()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    chinese = readme[readme.index("## 快速开始（中文）") :]
    assert "docs/guide.zh.md" in chinese.split("\n## ")[0]


def _normalised(text: str) -> str:
    """Lines without trailing blanks, and what depends on today (the run's slot, the next fire dates) as tokens."""
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<slot>", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d 周.", "<fire>", text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def test_the_readme_preview_transcript_is_what_wecast_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's 80-column Chinese preview is regenerated from the repository's campaigns and config.yaml and
    compared line by line; only the slot and the next fire dates, which move with the calendar, are normalised."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```text\n\$ COLUMNS=80 wecast --lang zh preview weekly_vip --show 3\n(.*?)```", readme, re.S)
    shutil.copytree(ROOT / "campaigns", tmp_path / "campaigns")
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WECAST_CONFIG", raising=False)
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["--lang", "zh", "preview", "weekly_vip", "--show", "3"])
    assert result.exit_code == 0, result.output
    assert _normalised(result.stdout) == _normalised(block)
    assert max(len(line) for line in block.splitlines()) > 60  # a real table, wrapped at 80 columns
