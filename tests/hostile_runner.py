"""The child-process side of tests/test_hostile.py: run one hostile case and say how it went.

Each case runs in a child process whose address space is capped (`prepare`), timed, and its rise in peak
resident memory measured, so a case that blows up fails as a MemoryError in the child instead of exhausting
the machine, and the parent can assert both the outcome and the bounds. Cases are files in tests/cases/hostile/ or, when
a file cannot hold them (20 MB, a FIFO, /dev/zero), builders in `GENERATED`.

Expected outcomes, in each file's first line:
  campaigns/*.yaml, config/*.yaml   `# expect: line N: FIELD: SUBSTRING`  (N or FIELD `-` when there is none)
  templates/*.j2                    `{# expect: line N: SUBSTRING #}`     (N: the line in this file)
  contacts/*.yaml                   `# expect: ...` in words; the file's `text:` is the exact rendered text
"""

from __future__ import annotations

import os
import re
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

HOSTILE = Path(__file__).parent / "cases" / "hostile"
ADDRESS_SPACE_HEADROOM = 1024 * 1024 * 1024  # the child may grow its address space by 1 GiB, no more
_YAML_EXPECT = re.compile(r"^# expect: line (\d+|-): (\S+): (.+)$")
_TEMPLATE_EXPECT = re.compile(r"^\{# expect: line (\d+): (.+) #\}$")


@dataclass(frozen=True)
class Expected:
    line: int | None
    field: str | None
    substring: str


@dataclass(frozen=True)
class Outcome:
    """What a case did: `problem` is None when it went as expected, else what went wrong."""

    problem: str | None
    seconds: float  # CPU seconds
    peak_mb: float


def prepare() -> None:
    """Import what the cases use (so no case is timed with the imports), then cap this (child) process's
    address space at its current size plus the headroom."""
    import engine.render
    import engine.settings
    import engine.spec  # noqa: F401

    with open("/proc/self/status", encoding="ascii") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def expected_yaml(first_line: str) -> Expected:
    match = _YAML_EXPECT.match(first_line)
    assert match, f"first line must be `# expect: line N: FIELD: SUBSTRING`, got {first_line!r}"
    line, field, substring = match.groups()
    return Expected(None if line == "-" else int(line), None if field == "-" else field, substring.strip())


def _first_line(path: Path) -> str:
    with open(path, "rb") as handle:
        return handle.readline().decode("utf-8").rstrip("\n")


def _check_error(error: Exception, file: str, want: Expected) -> str | None:
    from engine.errors import LocatedError

    if not isinstance(error, LocatedError):
        return f"expected a located error, got {type(error).__name__}: {error}"
    first = str(error).splitlines()[0]
    where = file + (f":{want.line}" if want.line is not None else "") + (f": {want.field}" if want.field else "")
    if not first.startswith(where + ": ") or want.substring not in first:
        return f"expected {where}: ...{want.substring}..., got {first!r}"
    return None


def _campaign(path: Path, want: Expected | None) -> str | None:
    from engine.errors import CampaignError
    from engine.settings import Settings
    from engine.spec import load_campaign

    try:
        load_campaign(path, Settings(version=1, campaigns_dir=path.parent))
    except CampaignError as exc:
        return _check_error(exc, str(path), want) if want else f"unexpected error: {exc}"
    return None if want is None else f"loaded without the expected error ({want.substring})"


def _config(path: Path, want: Expected | None) -> str | None:
    from engine.errors import ConfigError
    from engine.settings import load_settings

    try:
        load_settings(path)
    except ConfigError as exc:
        return _check_error(exc, str(path), want) if want else f"unexpected error: {exc}"
    return None if want is None else f"loaded without the expected error ({want.substring})"


def _template(path: Path, want: Expected) -> str | None:
    from datetime import UTC, datetime

    from engine.errors import Location, TemplateError
    from engine.render import compile_template, render_all

    origin = Location(str(path), 1, "message.template")
    try:
        template = compile_template(path.read_text(encoding="utf-8"), origin)
        person = {"id": "c1", "name": "王芳", "gender": 2, "city": "上海", "tags_named": ("VIP",)}
        render_all(template, [person], campaign={"id": "h", "name": "h"}, now=datetime(2026, 1, 1, tzinfo=UTC))
    except TemplateError as exc:
        return _check_error(exc, str(path), Expected(want.line, "message.template", want.substring))
    return f"rendered without the expected error ({want.substring})"


def _contacts(path: Path) -> str | None:
    from datetime import UTC, datetime

    from engine import yamlsrc
    from engine.errors import Location
    from engine.render import compile_template, render_all

    case, _ = yamlsrc.load(path.read_text(encoding="utf-8"), str(path))
    template = compile_template(case["template"], Location(str(path), 1, "template"))
    person = {"id": "c1", "tags_named": (), **case["contact"]}
    result = render_all(template, [person], campaign={"id": "h", "name": "h"}, now=datetime(2026, 1, 1, tzinfo=UTC))
    text = result.texts.get("c1")
    return None if text == case["text"] else f"rendered {text!r}, expected {case['text']!r} ({result.missing})"


def first_error_line(kind: str, name: str) -> str | None:
    """The first line of the error the case file tests/cases/hostile/<kind>/<name> ends in (None: no error), in the
    current language: for checking the words, where `run_file` checks the outcome."""
    from datetime import UTC, datetime

    from engine.errors import CampaignError, ConfigError, Location, TemplateError
    from engine.render import compile_template, render_all
    from engine.settings import Settings, load_settings
    from engine.spec import load_campaign

    path = HOSTILE / kind / name
    try:
        if kind == "campaigns":
            load_campaign(path, Settings(version=1, campaigns_dir=path.parent))
        elif kind == "config":
            load_settings(path)
        else:
            template = compile_template(path.read_text(encoding="utf-8"), Location(str(path), 1, "message.template"))
            person = {"id": "c1", "name": "王芳", "gender": 2, "city": "上海", "tags_named": ("VIP",)}
            render_all(template, [person], campaign={"id": "h", "name": "h"}, now=datetime(2026, 1, 1, tzinfo=UTC))
    except (CampaignError, ConfigError, TemplateError) as exc:
        return str(exc).splitlines()[0]
    return None


def run_file(kind: str, name: str, yaml_loader: str = "libyaml") -> Outcome:
    """Run the case file tests/cases/hostile/<kind>/<name>; `yaml_loader="python"`: with PyYAML's pure-Python
    loader, the fallback for a PyYAML built without libyaml."""
    with _loader(yaml_loader):
        return _run_file(kind, HOSTILE / kind / name)


@contextmanager
def _loader(name: str) -> Iterator[None]:
    if name != "python":
        yield
        return
    from engine import yamlsrc

    default = yamlsrc.LOADER
    yamlsrc.LOADER = yamlsrc._PythonLoader
    try:
        yield
    finally:
        yamlsrc.LOADER = default


def _run_file(kind: str, path: Path) -> Outcome:
    name = path.name
    if kind == "campaigns":
        return _measure(lambda: _campaign(path, expected_yaml(_first_line(path))))
    if kind == "config":
        return _measure(lambda: _config(path, expected_yaml(_first_line(path))))
    if kind == "templates":
        match = _TEMPLATE_EXPECT.match(_first_line(path))
        assert match, f"{name}: first line must be `{{# expect: line N: SUBSTRING #}}`"
        return _measure(lambda: _template(path, Expected(int(match.group(1)), None, match.group(2))))
    if kind == "contacts":
        return _measure(lambda: _contacts(path))
    raise ValueError(f"unknown case kind {kind!r}")


def run_generated(name: str, yaml_loader: str = "libyaml") -> Outcome:
    """Build the generated case `name` in a temporary folder and run it (`yaml_loader` as for run_file)."""
    kind, builder, want = GENERATED[name]
    with tempfile.TemporaryDirectory() as tmp, _loader(yaml_loader):
        path = builder(Path(tmp))
        run = _campaign if kind == "campaign" else _config
        return _measure(lambda: run(path, want))


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _measure(case: Callable[[], str | None]) -> Outcome:
    """Run the case, timing its CPU work (a loaded machine stretches wall time, not the work) and measuring how
    far it raised the process's peak resident memory (Linux resets the peak when "5" is written to
    /proc/self/clear_refs)."""
    with suppress(OSError):  # if not allowed, the peak is the process's so far: a stricter measure
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    before = _status_kb("VmRSS")
    started = time.process_time()
    try:
        problem = case()
    except MemoryError:
        problem = "MemoryError: the case went past the child's address-space cap"
    except Exception as exc:  # any other escape is a failure of the case, reported to the parent
        problem = f"{type(exc).__name__} escaped: {str(exc)[:300]}"
    seconds = time.process_time() - started
    return Outcome(problem, seconds, max(0, _status_kb("VmHWM") - before) / 1024)


# -- generated cases --------------------------------------------------------------------------------------

CAMPAIGN_HEAD = "name: 生成的活动\naudience: {}\nmessage: {template: 您好}\n"


def _write(tmp: Path, name: str, data: str | bytes) -> Path:
    path = tmp / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.yaml")
    return tmp / "pipe.yaml"


def _folder(tmp: Path) -> Path:
    (tmp / "folder.yaml").mkdir()
    return tmp / "folder.yaml"


def _template_file(tmp: Path, target: Callable[[Path], Path]) -> Path:
    (tmp / "templates").mkdir()
    target(tmp / "templates")
    return _write(tmp, "c.yaml", "name: x\naudience: {}\nmessage: {template_file: templates/t.j2}\n")


def _dev_zero_link(folder: Path) -> Path:
    (folder / "t.j2").symlink_to("/dev/zero")
    return folder / "t.j2"


def _fifo_template(folder: Path) -> Path:
    os.mkfifo(folder / "t.j2")
    return folder / "t.j2"


def _link_in_campaigns(tmp: Path, target: Path | str, name: str = "c.yaml") -> Path:
    """campaigns/<name>, a symlink to `target`."""
    folder = tmp / "campaigns"
    folder.mkdir(exist_ok=True)
    (folder / name).symlink_to(target)
    return folder / name


def _linked_folder(tmp: Path) -> Path:
    """A campaigns folder that is itself a link (a deployment's layout), holding a plain campaign file."""
    (tmp / "real").mkdir()
    _write(tmp / "real", "c.yaml", CAMPAIGN_HEAD)
    (tmp / "campaigns").symlink_to(tmp / "real")
    return tmp / "campaigns" / "c.yaml"


def _link_within_the_folder(tmp: Path) -> Path:
    """campaigns/c.yaml -> real.yaml, beside it."""
    (tmp / "campaigns").mkdir()
    _write(tmp / "campaigns", "real.yaml", CAMPAIGN_HEAD)
    return _link_in_campaigns(tmp, "real.yaml")


def _indented(levels: int) -> str:
    return "x:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(levels)) + " " * (levels + 1) + "v: 1\n"


Builder = Callable[[Path], Path]
GENERATED: dict[str, tuple[str, Builder, Expected | None]] = {
    "campaign_20_mb": (
        "campaign",
        lambda t: _write(t, "big.yaml", CAMPAIGN_HEAD + "# " + "x" * 20_000_000 + "\n"),
        Expected(None, None, "larger than 128 KiB"),
    ),
    "campaign_one_byte_over_the_cap": (
        "campaign",
        lambda t: _write(t, "over.yaml", CAMPAIGN_HEAD + "#" * (128 * 1024 - len(CAMPAIGN_HEAD.encode()) + 1)),
        Expected(None, None, "larger than 128 KiB"),
    ),
    "campaign_at_the_cap_is_accepted": (
        "campaign",
        lambda t: _write(t, "full.yaml", CAMPAIGN_HEAD + "#" * (128 * 1024 - len(CAMPAIGN_HEAD.encode()) - 1) + "\n"),
        None,
    ),
    "campaign_of_60k_values_is_accepted": (
        "campaign",
        lambda t: _write(t, "many.yaml", CAMPAIGN_HEAD.replace("{}", "{ids: [" + "a," * 60_000 + "a]}")),
        None,
    ),
    "campaign_120_kb_name_is_accepted": (
        "campaign",
        lambda t: _write(t, "long.yaml", "name: " + "名" * 40_000 + "\naudience: {}\nmessage: {template: 您好}\n"),
        None,
    ),
    "campaign_is_a_fifo": ("campaign", _fifo, Expected(None, None, "not a regular file")),
    "campaign_is_a_folder": ("campaign", _folder, Expected(None, None, "a folder, not a YAML file")),
    "campaign_is_dev_zero": ("campaign", lambda t: Path("/dev/zero"), Expected(None, None, "not a regular file")),
    "campaign_flow_nesting_100k": (
        "campaign",
        lambda t: _write(t, "deep.yaml", CAMPAIGN_HEAD + "x: " + "[" * 100_000 + "\n"),
        Expected(4, None, "nesting deeper than 50 levels"),
    ),
    "campaign_block_nesting_60k": (
        "campaign",
        lambda t: _write(t, "deep.yaml", CAMPAIGN_HEAD + "x:\n" + "- " * 60_000 + "v\n"),
        Expected(5, None, "nesting deeper than 50 levels"),
    ),
    "campaign_indentation_nesting_400": (
        "campaign",
        lambda t: _write(t, "deep.yaml", CAMPAIGN_HEAD + _indented(400)),
        Expected(54, None, "nesting deeper than 50 levels"),
    ),
    "campaign_alias_of_a_big_list_40k_times": (
        "campaign",
        lambda t: _write(
            t, "refs.yaml", CAMPAIGN_HEAD + "a: &a [" + "x," * 1000 + "x]\nb: [" + "*a," * 40_000 + "*a]\n"
        ),
        Expected(5, None, "expands to more than 80,000 values"),
    ),
    "template_file_of_20_mb": (
        "campaign",
        lambda t: _template_file(t, lambda f: _write(f, "t.j2", "x" * 20_000_000)),
        Expected(3, "message.template_file", "larger than 128 KiB"),
    ),
    "template_file_symlink_to_dev_zero": (
        "campaign",
        lambda t: _template_file(t, _dev_zero_link),
        Expected(3, "message.template_file", "outside the campaigns directory"),
    ),
    "template_file_is_a_fifo": (
        "campaign",
        lambda t: _template_file(t, _fifo_template),
        Expected(3, "message.template_file", "not a regular file"),
    ),
    "template_of_32k_characters_compiles_in_time": (
        "campaign",
        lambda t: _template_file(t, lambda f: _write(f, "t.j2", "{{ name|e }}" * 2700)),
        None,
    ),
    "campaign_is_a_link_out_of_its_folder": (
        "campaign",
        lambda t: _link_in_campaigns(t, _write(t, "elsewhere.yaml", CAMPAIGN_HEAD)),
        Expected(None, None, "a link to a file outside its folder"),
    ),
    "campaign_is_a_link_to_etc_passwd": (
        "campaign",
        lambda t: _link_in_campaigns(t, "/etc/passwd"),
        Expected(None, None, "a link to a file outside its folder"),
    ),
    "campaign_is_a_relative_link_out_of_its_folder": (
        "campaign",
        lambda t: _link_in_campaigns(t, Path("..") / _write(t, "up.yaml", CAMPAIGN_HEAD).name),
        Expected(None, None, "a link to a file outside its folder"),
    ),
    "campaign_link_within_its_folder_is_accepted": (
        "campaign",
        _link_within_the_folder,
        None,
    ),
    "campaign_in_a_linked_campaigns_folder_is_accepted": ("campaign", _linked_folder, None),
    "config_is_dev_zero": ("config", lambda t: Path("/dev/zero"), Expected(None, None, "not a regular file")),
    "config_is_a_fifo": ("config", _fifo, Expected(None, None, "not a regular file")),
    "config_is_a_folder": ("config", _folder, Expected(None, None, "a folder, not a YAML file")),
    "config_20_mb": (
        "config",
        lambda t: _write(t, "config.yaml", "version: 1\n# " + "x" * 20_000_000 + "\n"),
        Expected(None, None, "larger than 128 KiB"),
    ),
}
