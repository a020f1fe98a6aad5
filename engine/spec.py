"""Campaign YAML -> validated `Campaign` objects, with `file:line: field: why` in every error.

A campaign file (see README "Campaign reference"):

    id: weekly_vip                  # optional; defaults to the file name
    name: 每周VIP专享
    timezone: Asia/Shanghai         # optional; defaults to config.yaml's
    schedule: {cron: "0 10 * * MON"}        # or {at: 2026-12-31 20:00} or {every: 2h}; optional start/end
    audience:
      tags_any: [VIP]
      rules: [{city: [上海, 杭州]}, {added_within: 30d}]
    message:
      template: "{{ name }}您好，本周VIP专享……"
    dedupe: run                     # run | once | 7d
    frequency_cap: true             # true: config default; false: exempt; or {max: 2, per: week}
    quiet_hours: {start: "21:00", end: "09:00"}
    throttle: {per_second: 5}
    max_errors: 20

`load_campaign(path, settings)` checks everything that can be checked without contacts: YAML syntax,
unknown or missing fields, types, time zones, cron syntax, rule fields and operators, template syntax
and the names it uses, and the message (`engine.message_spec`: its parts, files, URLs and what the
configured gateway can send). All problems in a file are reported together.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from zoneinfo import ZoneInfo

from pydantic import Field, ValidationError, field_validator

from engine import yamlsrc
from engine.audience import Rule, RuleError, parse_rules
from engine.durations import DurationTooLong, parse_duration
from engine.errors import CampaignError, Location
from engine.i18n import tr
from engine.message_spec import CompiledMessage, MessageSpec, compile_message
from engine.runsettings import RunNotify
from engine.schedule import ScheduleError, ScheduleSpec, build_trigger
from engine.settings import FrequencyCap, QuietHours, Settings, Strict, Throttle, check_timezone, check_userids

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Audience(Strict):
    """Who gets the message: (ids, or everyone) ∩ tag filters ∩ rules − exclusions, then `limit`."""

    ids: list[str] = []
    tags_any: list[str] = []
    tags_all: list[str] = []
    tags_none: list[str] = []
    rules: Any = None
    exclude_ids: list[str] = []
    limit: int | None = Field(default=None, ge=1)
    include_coworkers: bool = False


def _parse_dedupe(value: Any) -> str:
    if value in ("run", "once"):
        return str(value)
    try:
        parse_duration(value)
    except DurationTooLong:
        raise
    except ValueError:
        got = f"{value!r:.40}"
        raise ValueError(tr("dedupe must be run, once or a window like 7d (got {value})", value=got)) from None
    return str(value)


ENV_REF = re.compile(r"^\$\{([A-Z_][A-Z0-9_]*)\}$")


class CampaignNotify(Strict):
    """A campaign's own `notify:` (replacing config.yaml's): staff userids and/or a robot whose webhook URL is in
    an environment variable, written `${NAME}` (a campaign file is no place for the robot's key)."""

    staff: list[str] = []
    robot: str | None = None

    _staff = field_validator("staff")(lambda v: check_userids(v))

    @field_validator("robot")
    @classmethod
    def _robot(cls, v: str | None) -> str | None:
        if v is None:
            return None
        found = ENV_REF.match(v.strip())
        if not found:
            raise ValueError(tr("give the robot's webhook URL as ${ENV_NAME}: the URL carries the robot's key"))
        return found.group(1)


class CampaignModel(Strict):
    kind: Literal["campaign"] | None = None  # `kind: journey` (or a `trigger:`) makes the file a journey
    id: str | None = None
    name: str = Field(min_length=1)
    description: str = ""
    enabled: bool = True
    timezone: str | None = None
    schedule: ScheduleSpec | None = None
    audience: Audience
    message: MessageSpec
    dedupe: str = "run"
    frequency_cap: bool | FrequencyCap = True
    quiet_hours: bool | QuietHours | None = None
    throttle: Throttle | None = None
    max_errors: int | None = Field(default=None, ge=0)
    tags: list[str] = []  # labels for people, not audience tags
    notify: bool | CampaignNotify = True  # true: config.yaml's notify; false: nobody; or the campaign's own

    _tz = field_validator("timezone")(lambda v: check_timezone(v) if v is not None else v)
    _dedupe = field_validator("dedupe", mode="before")(lambda v: _parse_dedupe(v))

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not ID_RE.match(v):
            raise ValueError(tr("id may use letters, digits, _ . - (up to 64), starting with a letter or digit"))
        return v

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, v: bool | QuietHours | None) -> bool | QuietHours | None:
        if v is True:
            raise ValueError(
                tr(
                    "quiet_hours: true is ambiguous; leave it out to use config.yaml's, "
                    "give {start, end}, or false for none"
                )
            )
        return v


@dataclass
class Campaign:
    """A validated campaign, resolved against the settings (defaults filled in)."""

    id: str
    name: str
    file: Path
    enabled: bool
    timezone: str
    schedule: ScheduleSpec | None
    audience: Audience
    rules: Rule | None
    message: MessageSpec
    compiled: CompiledMessage  # the message, checked: rendered per recipient by engine.message_spec
    dedupe: str  # run | once | a window like 7d
    frequency_cap: FrequencyCap | None
    quiet_hours: QuietHours | None
    throttle: Throttle
    max_errors: int
    description: str = ""
    content_hash: str = ""
    notify: RunNotify | None = None  # who hears of a run when it finishes
    lines: yamlsrc.Lines = field(default_factory=lambda: yamlsrc.Lines(""))

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def dedupe_window(self) -> timedelta | None:
        return None if self.dedupe in ("run", "once") else parse_duration(self.dedupe)

    def location(self, *path: str | int) -> Location:
        return self.lines.at(path)


def is_journey_data(data: dict[Any, Any]) -> bool:
    """Whether a parsed file is a journey (`kind: journey`, or a `trigger:` or `steps:`) rather than a campaign.
    Every campaign file written before journeys existed has none of these, so it stays a campaign."""
    return data.get("kind") == "journey" or (data.get("kind") is None and ("trigger" in data or "steps" in data))


class JourneyFileError(CampaignError):
    """`parse_campaign` was given a journey. Carries what was parsed, so `engine.journeys.spec` need not re-read
    the file; `load_campaigns` collects these files in `LoadResult.journey_files`."""

    def __init__(self, message: str, location: Location, data: dict[Any, Any], lines: yamlsrc.Lines, text: str) -> None:
        super().__init__(message, location)
        self.data = data
        self.lines = lines
        self.text = text


def _err(
    lines: yamlsrc.Lines, path: tuple[str | int, ...], reason: str, cls: type[CampaignError] = CampaignError
) -> CampaignError:
    return cls(reason, lines.at(path))


def _raise_all(problems: list[CampaignError]) -> None:
    if not problems:
        return
    first = problems[0]
    if len(problems) == 1:
        raise first
    more = "".join(f"\n  {p}" for p in problems[1:])
    raise type(first)(first.reason + more, first.location, problems=problems)


def load_campaign(path: str | Path, settings: Settings) -> Campaign:
    """Read and validate one campaign file. Raises CampaignError (all problems, first one first)."""
    file = Path(path)
    if _links_out_of_its_folder(file):
        raise CampaignError(
            tr("this file is a link to a file outside its folder; put the file itself in the folder"),
            Location(str(file)),
        )
    try:
        text = yamlsrc.read_text(file)
    except FileNotFoundError:
        raise CampaignError(tr("file not found"), Location(str(file))) from None
    except yamlsrc.YamlError as exc:
        raise CampaignError(str(exc), Location(str(file), exc.line)) from None
    return parse_campaign(text, file, settings)


def _links_out_of_its_folder(file: Path) -> bool:
    """Whether `file` is a symlink that leads out of the folder it is in. Whoever may put a file in campaigns/
    could otherwise have wecast read any file the service can (`campaigns/x.yaml -> /etc/…`, or a campaign kept
    elsewhere and not reviewed): the files a campaign names are confined to the folder (engine.paths), and so is
    the campaign file itself. A link within the folder, and a campaigns folder that is itself a link, are fine.
    Where it leads is not said (as engine.paths says nothing about what exists outside)."""
    try:
        return file.is_symlink() and not file.resolve().is_relative_to(file.parent.resolve())
    except (OSError, RuntimeError):  # a link loop: reading it says what is wrong
        return False


def parse_campaign(text: str, file: Path, settings: Settings) -> Campaign:
    name = str(file)
    try:
        data, lines = yamlsrc.load(text, name)
    except yamlsrc.YamlError as exc:
        raise CampaignError(str(exc), Location(name, exc.line)) from None
    if not isinstance(data, dict):
        raise CampaignError(
            tr("a campaign file must be a mapping (name:, audience:, message:, ...)"), Location(name, 1)
        )
    if is_journey_data(data):
        raise JourneyFileError(tr("this file is a journey, not a campaign"), lines.at(("trigger",)), data, lines, text)
    if data.get("kind") not in (None, "campaign"):
        raise CampaignError(
            tr("kind must be campaign or journey, not {kind}", kind=repr(data["kind"])), lines.at(("kind",))
        )
    try:
        model = CampaignModel.model_validate(data)
    except ValidationError as exc:
        _raise_all([CampaignError(reason, loc) for loc, reason in yamlsrc.located(exc, lines)])
        raise AssertionError("unreachable") from None

    problems: list[CampaignError] = []
    campaign_id = model.id or file.stem
    if not ID_RE.match(campaign_id):
        problems.append(
            _err(lines, ("id",), f"the file name {file.stem!r} is not a valid campaign id; add an explicit id: field")
        )
    tz_name = model.timezone or settings.timezone

    if model.schedule is not None:
        try:
            build_trigger(model.schedule, ZoneInfo(tz_name))
        except ScheduleError as exc:
            problems.append(_err(lines, ("schedule", exc.field), str(exc)))

    rules: Rule | None = None
    if model.audience.rules is not None:
        try:
            rules = parse_rules(model.audience.rules)
        except RuleError as exc:
            problems.append(_err(lines, ("audience", "rules", *exc.path), exc.reason))

    compiled, message_problems = compile_message(model.message, ("message",), text, file, lines, settings)
    problems.extend(message_problems)
    _raise_all(problems)
    assert compiled is not None

    notify = _notify(model.notify, settings, lines)
    sending = settings.sending
    cap: FrequencyCap | None
    if model.frequency_cap is True:
        cap = sending.frequency_cap
    elif model.frequency_cap is False:
        cap = None
    else:
        cap = model.frequency_cap
    quiet: QuietHours | None
    if model.quiet_hours is None:
        quiet = sending.quiet_hours
    elif model.quiet_hours is False:
        quiet = None
    else:
        assert isinstance(model.quiet_hours, QuietHours)
        quiet = model.quiet_hours
    return Campaign(
        id=campaign_id,
        name=model.name,
        file=file,
        enabled=model.enabled,
        timezone=tz_name,
        schedule=model.schedule,
        audience=model.audience,
        rules=rules,
        message=model.message,
        compiled=compiled,
        dedupe=model.dedupe,
        frequency_cap=cap,
        quiet_hours=quiet,
        throttle=model.throttle or sending.throttle,
        max_errors=model.max_errors if model.max_errors is not None else sending.max_errors,
        description=model.description,
        content_hash=hashlib.sha256((text + compiled.source).encode()).hexdigest()[:16],
        lines=lines,
        notify=notify,
    )


def _notify(given: bool | CampaignNotify, settings: Settings, lines: yamlsrc.Lines) -> RunNotify | None:
    """The campaign's `notify:` resolved against config.yaml's (None: nobody is told)."""
    if given is False:
        return None
    if given is True:
        key = settings.gateway == "wecom" and settings.wecom.webhook_key is not None  # WecomGateway.notify_robot
        robot = settings.notify.robot is not None or key
        found = RunNotify(staff=settings.notify.staff, config_robot=robot)
        return found if found.anyone else None
    problems = []
    if given.staff and settings.gateway != "wecom":
        problems.append(
            _err(lines, ("notify", "staff"), "staff are notified through WeCom's message/send: gateway wecom only")
        )
    if given.robot is not None and given.robot not in os.environ:
        problems.append(_err(lines, ("notify", "robot"), f"environment variable {given.robot} is not set"))
    _raise_all(problems)
    return RunNotify(staff=given.staff, robot_env=given.robot)


@dataclass
class LoadResult:
    campaigns: list[Campaign]
    errors: list[CampaignError]
    # Files that are journeys (engine.journeys.spec loads them; engine.definitions loads both kinds).
    journey_files: list[Path] = field(default_factory=list)


def campaign_files(paths: list[Path]) -> list[Path]:
    """Expand folders to their *.yaml / *.yml files (sorted); keep files as given."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted([*p.glob("*.yaml"), *p.glob("*.yml")]))
        else:
            out.append(p)
    return out


def load_campaigns(paths: list[Path], settings: Settings) -> LoadResult:
    """Load many campaign files; collects errors instead of stopping, and rejects duplicate ids."""
    result = LoadResult([], [])
    seen: dict[str, Path] = {}
    for file in campaign_files(paths):
        try:
            campaign = load_campaign(file, settings)
        except JourneyFileError:
            result.journey_files.append(file)
            continue
        except CampaignError as exc:
            result.errors.append(exc)
            continue
        if campaign.id in seen:
            result.errors.append(
                CampaignError(
                    tr("id {id} is already used by {file}", id=repr(campaign.id), file=seen[campaign.id]),
                    campaign.location("id"),
                )
            )
            continue
        seen[campaign.id] = file
        result.campaigns.append(campaign)
    return result


class Named(Protocol):
    """What `find` needs of a loaded definition (a Campaign or a Journey)."""

    @property
    def id(self) -> str: ...
    @property
    def file(self) -> Path: ...
    def location(self, *path: str | int) -> Location: ...


D = TypeVar("D", bound=Named)


def find(
    ref: str,
    settings: Settings,
    load_one: Callable[[Path], D],
    load_all: Callable[[list[Path]], tuple[Sequence[D], Sequence[CampaignError]]],
    not_found: Callable[[str, Path], str],
) -> D:
    """The definition `ref` names — a file path, or an id (else a file name) among the files in campaigns_dir — as
    `load_all` loads the folder, which is what `wecast serve` schedules and the API runs: an id two files give is
    the first file's (the other is an error, whether named by its path or its file name), so a command never runs
    one campaign's content under another's id, its runs and dedupe. Raises CampaignError, NotFoundError."""
    from engine.errors import NotFoundError

    directory = settings.campaigns_dir
    candidates = campaign_files([directory]) if directory.is_dir() else []
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        found = load_one(path)
        if _in_folder(path, directory):
            loaded, _ = load_all(candidates)
            owner = next((d for d in loaded if d.id == found.id), None)
            if owner is not None and not _same_file(owner.file, path):
                raise CampaignError(
                    tr("id {id} is already used by {file}", id=repr(found.id), file=owner.file), found.location("id")
                )
        return found
    loaded, errors = load_all(candidates)
    named = next((d for d in loaded if d.id == ref), None) or next((d for d in loaded if d.file.stem == ref), None)
    if named is not None:
        return named
    for error in errors:  # the file of that name is broken (or lost its id to another): say why
        if error.location.file and Path(error.location.file).stem == ref:
            raise error
    raise NotFoundError(not_found(ref, directory))


def _in_folder(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return a == b


def find_campaign(ref: str, settings: Settings) -> Campaign:
    """A campaign by file path, or by id among the files in campaigns_dir (see `find`)."""

    def load_all(files: list[Path]) -> tuple[list[Campaign], list[CampaignError]]:
        result = load_campaigns(files, settings)
        return result.campaigns, result.errors

    return find(
        ref,
        settings,
        lambda path: load_campaign(path, settings),
        load_all,
        lambda ref, folder: tr(
            "no campaign {ref}: not a file, and no campaign with that id in {folder}", ref=repr(ref), folder=folder
        ),
    )
