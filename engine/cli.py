"""The `wecast` command line.

    wecast validate [PATHS]        check campaign files (and config.yaml)
    wecast preview CAMPAIGN        dry run: who gets what, who is left out and why, next fire times
    wecast run CAMPAIGN            send now (the current schedule slot), with progress and a summary
    wecast run --resume [RUN]      continue interrupted runs
    wecast contacts sync|list      pull customers from WeCom / list them
    wecast runs | log              run history / delivery log
    wecast pause|resume|cancel RUN control a run (also one being sent by `wecast serve`)
    wecast reconcile [RUN] | remind RUN   群发 tasks: collect staff confirmations / remind staff to confirm
    wecast login | logout          log the WeCom account in (QR + code) or out
    wecast serve                   the HTTP API (port 9898) with the scheduler
    wecast sandbox outbox          what the sandbox's simulated customers received

Errors go to stderr as one message (never a traceback; `-v` adds it) and the exit status is non-zero.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic_core import to_json
from rich import box
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.segment import Segment
from rich.table import Table

from engine import __version__, cli_journeys, click_words
from engine.dberrors import explain
from engine.errors import CampaignError, WecastError
from engine.i18n import N_, Language, choose, ntr, set_language, tr
from engine.messages import FilePart, ImagePart, LinkPart, Media, Message, MiniProgramPart, Part, TextPart, describe
from engine.settings import Settings, load_settings, redact_url
from storage.errors import Failure, StorageError
from storage.models import MAX_ID, OPEN_STATUSES, TERMINAL_STATUSES, DeliveryStatus, RunStatus

if TYPE_CHECKING:  # the commands import what they need when they run: `wecast --help` stays quick
    from engine.contacts import SyncResult
    from engine.dispatch import RunSummary
    from engine.gateways.base import LoginStatus
    from engine.plan import PlanResult, Preview
    from engine.service import Wecast
from engine.spec import Campaign
from engine.status_words import status_name
from engine.textwrap_cjk import Wrapped

T = TypeVar("T")


# C0 and C1 control characters but tab and line feed, and DEL: what a terminal acts on instead of showing.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _shown(found: re.Match[str]) -> str:
    return f"\\x{ord(found.group()):02x}"


class _Console(Console):
    """rich's console, except that a reader who stops reading (`wecast preview … | head`) ends the command quietly
    with status 0 (rich exits 1), and that control characters in what is printed are shown, not obeyed: names,
    remarks and messages come from customers, and an escape sequence in a nickname would clear the operator's
    screen, forge lines or plant a link (`\\x1b[2J` is printed as those characters)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _quiet_stdout()
        raise SystemExit(0)

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        # rich's own codes are control segments and the styles it renders around text: only the text is shown safe.
        return super()._render_buffer(
            Segment(_CONTROL.sub(_shown, text), style, control) if control is None else Segment(text, style, control)
            for text, style, control in buffer
        )


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("wecast")

EXIT_ERROR = 1
EXIT_INVALID = 2
EXIT_INTERNAL = 70
EXIT_UNREACHABLE = 75  # sysexits' EX_TEMPFAIL: the database server cannot be reached; try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
WIDE = 120  # from this many columns on, tables add the columns an 80-column terminal leaves out
LANG_CHOICES = ("zh", "zh_CN", "en")


class Bounded(click.types.IntParamType):
    """A whole number from `low` to `high`, shown as INTEGER in the help (click's IntRange adds its range to every
    option's help line); one outside is click's usage error, in the chosen language (engine.click_words)."""

    def __init__(self, low: int, high: int | None = None) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number: int = super().convert(value, param, ctx)
        if number < self.low or (self.high is not None and number > self.high):
            bounds = f"{self.low}<=x<={self.high}" if self.high is not None else f"x>={self.low}"
            self.fail(tr("{value} is not in the range {range}.", value=number, range=bounds), param, ctx)
        return number


class RunKey(click.types.StringParamType):
    """A run key a person names (`--run-key`), checked as the API's Idempotency-Key (`engine.plan.run_key_problem`):
    a usage error naming the option (a long one reached the database, which refused it: an internal error)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from engine.plan import run_key_problem

        key: str = super().convert(value, param, ctx)
        if (problem := run_key_problem(key)) is not None:
            self.fail(problem, param, ctx)
        return key


RUN_KEY = RunKey()
RUN_ID = Bounded(1, MAX_ID)  # a run id the database can hold (PostgreSQL refused a larger one: an internal error)
COUNT = Bounded(0)  # --limit / --show: how many (0: all)
PORT = Bounded(0, 65535)  # --port: 0 asks the system for a free one (a larger number was an internal error)
# click's own words, translated where wecast formats help (see TrCommand).
N_("Show this message and exit.")
N_("Show the version and exit.")


class Ctx:
    def __init__(self, config: str | None, verbose: int) -> None:
        self.config_path = config
        self.verbose = verbose
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        """The configuration. Without a config file (wecast run from another folder) this says where it looked
        and how to point it, instead of silently using defaults and creating data/ here."""
        if self._settings is None:
            settings = load_settings(self.config_path)
            if not Path(settings.source).is_file():
                raise WecastError(no_config_message(Path(settings.source)))
            self._settings = settings
        return self._settings

    def settings_or_defaults(self) -> Settings:
        """The configuration, or the built-in defaults when there is no config file (`wecast config` shows them)."""
        return self._settings or load_settings(self.config_path)


def no_config_message(looked: Path) -> str:
    return tr(
        "no config.yaml here (looked for {path}). Run wecast in the folder that has your config.yaml, "
        "point to it with `-c FILE` or the WECAST_CONFIG environment variable, or create one here with `wecast init`",
        path=looked.resolve(),
    )


pass_ctx = click.make_pass_decorator(Ctx)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


def language_for(args: Sequence[str], environ: os._Environ[str] | dict[str, str]) -> Language:
    """The language of this invocation, known before click parses anything (so `--help` speaks it too): `--lang`,
    then the config file's `language:` (the one `-c` / WECAST_CONFIG / ./config.yaml names), then the locale."""
    cli = _option_value(args, ("--lang",))
    config_language = None
    if cli is None:
        path = _option_value(args, ("-c", "--config")) or environ.get("WECAST_CONFIG") or "config.yaml"
        try:
            config_language = load_settings(path).language if Path(path).is_file() else None
        except WecastError:
            config_language = None  # reported in full when the command loads the config
    return choose(cli=cli, config=config_language, environ=environ)


def _option_value(args: Sequence[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--":
            break
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


@contextmanager
def _translated_help(params: Sequence[click.Parameter]) -> Iterator[None]:
    """Options' help in the current language while click formats it (their help is the English msgid)."""
    saved = [(p, p.help) for p in params if isinstance(p, click.Option)]
    for p, text in saved:
        p.help = tr(text) if text else text
    try:
        yield
    finally:
        for p, text in saved:
            p.help = text


def short_help(text: str, limit: int) -> str:
    """The first sentence of a help text (English `. ` or Chinese `。`), shortened to `limit` columns."""
    first = text.split("\n\n", 1)[0].replace("\n", " ")
    for end in (". ", "。"):
        if end in first:
            first = first.split(end, 1)[0]
    first = first.rstrip(".。")
    if cell_len(first) <= limit:
        return first
    cells = 0
    for i, ch in enumerate(first):
        cells += cell_len(ch)  # a Chinese character takes two columns
        if cells > limit - 1:
            return first[:i] + "…"
    return first


_TOKENS = re.compile(r"[\u2e80-\uffef]|[^\s\u2e80-\uffef]+|\s+")
_CLOSING = frozenset("，。、；：？！）》」』”’")  # never at the start of a line


def wrap_cells(text: str, width: int) -> list[str]:
    """Text wrapped to `width` terminal columns: words stay whole, Chinese breaks between any two characters (but
    not before closing punctuation), a Chinese character counts two columns. Paragraphs are kept apart."""
    lines: list[str] = []
    for index, paragraph in enumerate(text.split("\n\n")):
        if index:
            lines.append("")
        line = ""
        for token in _TOKENS.findall(paragraph.replace("\n", " ")):
            if token.isspace():
                line += " " if line else ""
            elif not line or cell_len(line) + cell_len(token) <= width or token in _CLOSING:
                line += token
            else:
                lines.append(line.rstrip())
                line = token
        lines.append(line.rstrip())
    return lines


class CellFormatter(click.HelpFormatter):
    """click's help formatter, measuring in terminal columns (click counts characters: Chinese help would run
    twice as wide as the terminal)."""

    def write_text(self, text: str) -> None:
        indent = " " * self.current_indent
        for line in wrap_cells(text, max(self.width - self.current_indent, 11)):
            self.write(f"{indent}{line}\n" if line else "\n")

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first_col = min(max((cell_len(first) for first, _ in rows), default=0), col_max) + col_spacing
        indent = " " * self.current_indent
        for first, second in rows:
            self.write(f"{indent}{first}")
            if not second:
                self.write("\n")
                continue
            if cell_len(first) <= first_col - col_spacing:
                self.write(" " * (first_col - cell_len(first)))
            else:
                self.write("\n" + " " * (first_col + self.current_indent))
            lines = wrap_cells(second, max(self.width - first_col - self.current_indent, 10))
            self.write(lines[0] + "\n")
            for line in lines[1:]:
                self.write(" " * (first_col + self.current_indent) + line + "\n")


class CellContext(click.Context):
    formatter_class = CellFormatter


class TrCommand(click.Command):
    """A command whose help (the English msgid in `help=`) is shown in the current language."""

    context_class = CellContext

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, " ".join(self.collect_usage_pieces(ctx)), prefix=tr("Usage:") + " ")

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.help:
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text(tr(self.help))

    def get_short_help_str(self, limit: int = 45) -> str:
        return short_help(tr(self.help), limit) if self.help else ""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = self.get_params(ctx)
        with _translated_help(params):
            records = [r for p in params if isinstance(p, click.Option) and (r := p.get_help_record(ctx)) is not None]
        if records:
            with formatter.section(tr("Options")):
                formatter.write_dl(records)


class TrGroup(TrCommand, click.Group):
    """A group of TrCommands (its subcommands and subgroups are translated too)."""

    command_class = TrCommand
    group_class = type  # subgroups are of this class

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        TrCommand.format_options(self, ctx, formatter)
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - max(len(n) for n in self.commands))))
        if rows:
            with formatter.section(tr("Commands")):
                formatter.write_dl(rows)


class WecastGroup(TrGroup):
    """Speaks the user's language and turns wecast errors into one line on stderr and an exit status, never a
    traceback. Output cut short by its reader (`wecast preview … | head`) ends quietly."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        set_language(language_for(args, os.environ))
        click_words.install()  # click's own errors and help labels in that language too
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with _terminate_as_interrupt() as terminated:
            return self._invoke(ctx, terminated)

    def _invoke(self, ctx: click.Context, terminated: list[bool]) -> Any:
        try:
            return super().invoke(ctx)
        except CampaignError as exc:
            err.print(labelled("red", tr("error:"), escape(str(exc))))
            ctx.exit(EXIT_INVALID)
        except WecastError as exc:
            err.print(labelled("red", tr("error:"), escape(str(exc))))
            ctx.exit(EXIT_ERROR)
        except StorageError as exc:  # the database's condition (full, locked, unreadable, newer), not a bug
            err.print(labelled("red", tr("error:"), escape(str(explain(exc)))))
            ctx.exit(EXIT_UNREACHABLE if exc.kind is Failure.UNREACHABLE else EXIT_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            _quiet_stdout()
            ctx.exit(0)
        except KeyboardInterrupt:
            err.print(tr("interrupted: unsent deliveries stay pending; `wecast run --resume` continues them"))
            ctx.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
        except Exception as exc:
            obj = ctx.find_object(Ctx)
            if obj is not None and obj.verbose:
                raise
            if isinstance(exc, OSError) and exc.filename is not None:  # a path the user gave or configured
                err.print(labelled("red", tr("error:"), escape(file_problem(exc))))
                ctx.exit(EXIT_ERROR)
            err.print(
                labelled("red", tr("internal error:"), f"{type(exc).__name__}: {escape(str(exc))} ")
                + tr("(run with -v to see where)")
            )
            ctx.exit(EXIT_INTERNAL)


# What the system says about a path, in the reader's language (anything else: the system's own words).
_FILE_PROBLEMS = {
    errno.ENOENT: N_("{path}: no such file or folder"),
    errno.ENOTDIR: N_("{path}: a part of this path is a file, not a folder"),
    errno.EISDIR: N_("{path}: this is a folder, not a file"),
    errno.EACCES: N_("{path}: permission denied"),
    errno.EPERM: N_("{path}: permission denied"),
    errno.EROFS: N_("{path}: the file system is read-only"),
    errno.ENOSPC: N_("{path}: no space left on the device"),
    errno.EEXIST: N_("{path}: already exists"),
}


def file_problem(exc: OSError) -> str:
    """An OSError about a file (`--csv /no/such/dir/x.csv`, a data folder that cannot be made) as one line naming
    the path — not an "internal error" with Python's class name."""
    path = os.fsdecode(exc.filename)
    words = _FILE_PROBLEMS.get(exc.errno or 0)
    if words is None:
        return f"{path}: {exc.strerror or exc}"
    return tr(words, path=path)


@contextmanager
def _terminate_as_interrupt() -> Iterator[list[bool]]:
    """SIGTERM (`docker stop`, systemd, `timeout`, a CI job cancelled) stops a command as Ctrl-C does: the signal is
    handed to whatever handles SIGINT at that moment — inside `asyncio.run`, the runner's, which cancels the command's
    task, so a run stops claiming, its sends in flight finish and are recorded, and its claims are released; a
    second signal stops at once. Left to Python's default, SIGTERM ended the process on the spot, like `kill -9`:
    the sends in flight were never recorded, and on a gateway without idempotency keys each became `unknown` (most
    never sent). The list yielded holds True once SIGTERM came (the exit status says which signal)."""
    terminated: list[bool] = []

    def forward(_signum: int, frame: Any) -> None:
        terminated.append(True)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored or left to the system: stop here the same way
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread (an embedding caller): signals are not ours to handle
        yield terminated
        return
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """The reader of stdout went away: send what is still buffered nowhere, so the exit does not fail on it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test runner's buffer): nothing is left to flush
        pass


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _app(ctx: Ctx) -> Wecast:
    from engine.service import Wecast

    return Wecast(ctx.settings)


async def _with_app(ctx: Ctx, fn: Callable[[Wecast], Awaitable[T]]) -> T:
    app = _app(ctx)
    async with app:
        return await fn(app)


def _print_json(value: object) -> None:
    """JSON on stdout: a view (`engine.views`, the shape the HTTP API answers with), a list of them, a dataclass
    or a plain mapping."""
    out.print_json(to_json(value).decode())


def _table(*columns: str, title: str | None = None) -> Table:
    """A table in the house style: a rule under the headings, no vertical lines (more room for the text)."""
    return Table(*columns, title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def styled(style: str, text: str) -> str:
    """Rich markup around text (kept out of f-strings: Babel cannot extract a message written inside one)."""
    return f"[{style}]{text}[/{style}]"


def labelled(style: str, label: str, text: str) -> str:
    """`error: text`: a translated label, styled, before what it labels; after a Chinese colon (错误：) no space."""
    return styled(style, label) + ("" if label.endswith("：") else " ") + text


def _wide() -> bool:
    return out.width >= WIDE


@click.group(
    cls=WecastGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help=N_(
        "wecast – scheduled, rule-driven WeCom (企业微信) customer messaging.\n\n"
        "Campaigns are YAML files in campaigns/. Start with `wecast preview CAMPAIGN` (a dry run that sends "
        "nothing), then `wecast run CAMPAIGN`. `wecast serve` runs the HTTP API and the scheduler. "
        "`wecast init` sets up a new folder."
    ),
)
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    envvar="WECAST_CONFIG",
    help=N_("config file (default: ./config.yaml, or $WECAST_CONFIG)"),
)
@click.option(
    "--lang",
    type=click.Choice(LANG_CHOICES),
    help=N_("language of the output: zh (中文) or en (default: config.yaml's language, then LANG)"),
)
@click.option("-v", "--verbose", count=True, help=N_("more logging (-vv for debug); tracebacks on errors"))
@click.version_option(__version__, prog_name="wecast", message="%(prog)s %(version)s")  # no words: any language
@click.pass_context
def main(click_ctx: click.Context, config: str | None, lang: str | None, verbose: int) -> None:
    """The `wecast` group: the language was chosen before parsing (`WecastGroup.parse_args`)."""
    _setup_logging(verbose)
    click_ctx.obj = Ctx(config, verbose)


# -- init --------------------------------------------------------------------------------------------


@main.command(
    help=N_(
        "Set up a folder for wecast: a starter config.yaml (the sandbox gateway, so everything works at once), "
        "campaigns/ with an example campaign in Chinese, and data/. Existing files are never overwritten."
    )
)
@click.argument("folder", default=".", type=click.Path(file_okay=False, path_type=Path))
def init(folder: Path) -> None:
    from engine.starter import init_folder

    made = init_folder(folder)
    for path in made.files:
        out.print(tr("created {path}", path=path))
    here = [] if folder.resolve() == Path.cwd().resolve() else [f"cd {folder}"]
    steps = " && ".join([*here, "wecast preview welcome"])
    out.print(tr("Next: {steps}   (a dry run: nothing is sent)", steps=steps))


# -- validate ----------------------------------------------------------------------------------------


@main.command(
    help=N_(
        "Check campaign files (default: every file in campaigns_dir) and config.yaml.\n\n"
        "Every problem is reported with file, line and field. With synced contacts, templates are also checked "
        "against the data: a field some recipients lack is an error unless the template gives a default. "
        "Exit status 2 when anything is invalid."
    )
)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
@pass_ctx
def validate(ctx: Ctx, paths: tuple[Path, ...], as_json: bool) -> None:
    from engine.definitions import load_definitions
    from engine.journeys.spec import Journey
    from engine.plan import build_preview
    from engine.spec import campaign_files
    from storage.db import make_db_engine

    settings = ctx.settings
    files = campaign_files(list(paths) or [settings.campaigns_dir])
    if not files:
        where = ", ".join(str(p) for p in paths) or str(settings.campaigns_dir)
        raise WecastError(tr("no campaign files found in {where}", where=where))
    result = load_definitions(files, settings)  # journeys too: a broken journey is a problem, not "valid"
    problems: list[str] = [str(p) for e in result.errors for p in e.problems]
    warnings = _schedule_warnings(result.campaigns)
    data_checked = False
    db = make_db_engine(settings.database_url, busy_timeout=settings.database_busy_timeout.total_seconds())
    try:
        from engine.clock import SystemClock
        from storage.contacts import count_contacts

        now = SystemClock().now()
        if count_contacts(db):
            data_checked = True
            for campaign in result.campaigns:
                # Everyone the targeting selects, whatever today's sends: a field missing for a contact the
                # frequency cap holds back today is missing tomorrow. Counted, not listed (keep=0).
                preview = build_preview(db, campaign, now=now, policies=False, keep=0)
                problems.extend(str(p) for p in preview.problems())
    finally:
        db.dispose()
    if as_json:
        _print_json(
            {
                "ok": not problems,
                "files": [str(f) for f in files],
                "campaigns": [c.id for c in result.campaigns],
                "journeys": [j.id for j in result.journeys],
                "problems": problems,
                "warnings": warnings,
                "checked_against_contacts": data_checked,
            }
        )
    else:
        loaded_files: list[Campaign | Journey] = [*result.campaigns, *result.journeys]
        for loaded in loaded_files:
            mark = "[green]ok[/green]" if not any(str(loaded.file) in p for p in problems) else "[red]!![/red]"
            out.print(f"{mark} {loaded.file}  ({loaded.id}: {escape(loaded.name)})")
        for problem in problems:
            err.print(labelled("red", tr("error:"), escape(problem)))
        for warning in warnings:
            err.print(labelled("yellow", tr("warning:"), escape(warning)))
        if problems:
            err.print(styled("dim", tr("every field is described in the campaign reference: {doc}", doc=GUIDE)))
        if not data_checked:
            out.print(styled("dim", tr("templates not checked against contacts yet (run `wecast contacts sync`)")))
        if problems:
            err.print(ntr("{n} problem found", "{n} problems found", len(problems)))
        else:
            out.print(ntr("{n} campaign file is valid", "all {n} campaign files are valid", len(files)))
    if problems:
        sys.exit(EXIT_INVALID)


GUIDE = "docs/guide.zh.md"


def _schedule_warnings(campaigns: Sequence[Campaign]) -> list[str]:
    """What is valid but surely not meant: a one-off date already past is never fired by the scheduler."""
    from engine.clock import SystemClock
    from engine.plan import one_off_slot

    now = SystemClock().now()
    out = []
    for campaign in campaigns:
        slot = one_off_slot(campaign)
        if slot is not None and slot <= now:
            out.append(
                f"{campaign.location('schedule', 'at')}: "
                + tr(
                    "{when} ({zone}) is in the past: the scheduler never sends this one-off campaign "
                    "(set a date to come, or `wecast run {campaign}` sends it now)",
                    when=slot.astimezone(campaign.tz).strftime("%Y-%m-%d %H:%M"),
                    zone=campaign.timezone,
                    campaign=campaign.id,
                )
            )
    return out


# -- preview -----------------------------------------------------------------------------------------


@main.command(
    help=N_(
        "Dry run: who would get which message, who is left out and why. Sends nothing.\n\n"
        "CAMPAIGN is a file path or the id of a campaign or journey in campaigns_dir. For a journey: its steps as a "
        "tree, who would enter now, and with --contact ID that contact's timeline from now."
    )
)
@click.argument("campaign")
@click.option("--run-key", type=RUN_KEY, help=N_("preview a specific run (default: the current schedule slot)"))
@click.option("--json", "as_json", is_flag=True, help=N_("everything as JSON on stdout"))
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=N_("write every contact with its decision and message to this CSV file ('-' for stdout)"),
)
@click.option(
    "--show", default=20, show_default=True, type=COUNT, help=N_("how many recipients and exclusions to list (0: all)")
)
@click.option("--full", is_flag=True, help=N_("each message in full below its recipient, instead of a table"))
@click.option("--contact", help=N_("a journey: this contact's dry-run timeline from now"))
@click.option(
    "--assume",
    multiple=True,
    metavar="EVENT",
    help=N_("with --contact: what the customer does (replied, message:TEXT, tag:TAG, untag:TAG, optout; @2d: later)"),
)
@pass_ctx
def preview(
    ctx: Ctx,
    campaign: str,
    run_key: str | None,
    as_json: bool,
    csv_path: Path | None,
    show: int,
    full: bool,
    contact: str | None,
    assume: tuple[str, ...],
) -> None:
    from engine.definitions import find_definition
    from engine.spec import Campaign

    spec = find_definition(campaign, ctx.settings)
    if not isinstance(spec, Campaign):  # a journey (engine.cli_journeys)
        if csv_path is not None or run_key or full:
            raise click.UsageError(tr("--csv, --full and --run-key preview a campaign; {id} is a journey", id=spec.id))
        cli_journeys.preview_journey(KIT, ctx, spec, contact, assume, as_json, show)
        return
    if contact is not None or assume:
        raise click.UsageError(tr("--contact and --assume preview a journey; {id} is a campaign", id=spec.id))

    async def go(app: Wecast) -> Preview:
        from engine.blocking import off_loop

        await app.ensure_contacts()
        # Everything for --json and --csv (they promise every contact); otherwise only what is shown, counted in full.
        keep = None if as_json or csv_path is not None or not show else show
        return await off_loop(app.preview, spec, run_key=run_key, keep=keep)

    result = _run(_with_app(ctx, go))
    if csv_path is not None:
        _write_csv(result, csv_path)
    if as_json:
        from engine.views import PreviewView

        _print_json(PreviewView.from_preview(result))
    elif str(csv_path) != "-":
        _print_preview(result, show, full)
    if result.problems():
        for p in result.problems():
            err.print(labelled("red", tr("error:"), escape(str(p))))
        sys.exit(EXIT_INVALID)


def _message_lines(message: Message) -> str:
    """A message for the terminal: its parts in order, the text as it is and each attachment on a line of its own."""
    return "\n".join(("" if isinstance(part, TextPart) else "+ ") + _part_line(part) for part in message.parts)


def _part_line(part: Part) -> str:
    """One attachment for people, in their language: `image media/poster.png (20 KB)`, a link card's title,
    description and URL, a mini-program's title, appid, page and cover."""
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, ImagePart):
        return tr("image {media}", media=_media_words(part.media))
    if isinstance(part, FilePart):
        return tr("file {media}", media=_media_words(part.media))
    if isinstance(part, LinkPart):
        line = tr("link {title}", title=part.title)
        line += f" – {part.description}" if part.description else ""
        line += f" <{part.url}>"
        return line + (" · " + tr("thumbnail <{url}>", url=part.thumb_url) if part.thumb_url else "")
    assert isinstance(part, MiniProgramPart)
    line = tr("mini-program {title} ({appid}) {page}", title=part.title, appid=part.appid, page=part.page)
    return line + (" · " + tr("cover {media}", media=_media_words(part.thumb)) if part.thumb else "")


def _media_words(media: Media) -> str:
    size = f" ({_human_size(media.size)})" if media.size else ""
    return f"{media.name}{size}" + (f" <{media.url}>" if media.url else "")


def _human_size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    return f"{n / 1024:.0f} KB" if n >= 1024 else ntr("{n} byte", "{n} bytes", n)


# What a spreadsheet reads as the start of a formula (OWASP's list): `=HYPERLINK(…)` in a customer's nickname would
# run in Excel when the preview's CSV is opened there.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as the text it is: one that would start a formula gets a leading `'`."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _write_csv(p: Preview, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    # Column names and the decision stay English: a CSV is for scripts and spreadsheets that filter on them.
    writer.writerow(["contact_id", "name", "decision", "reason_code", "reason", "message", "attachments"])
    for r in p.recipients:
        attachments = "\n".join(describe(a) for a in r.full_message().attachments)
        writer.writerow([_cell(r.contact_id), _cell(r.name), "send", "", "", _cell(r.text), _cell(attachments)])
    for e in p.excluded:
        writer.writerow([_cell(e.contact_id), _cell(e.name), "excluded", e.code, _cell(e.reason), "", ""])
    if str(path) == "-":
        sys.stdout.write(buffer.getvalue())
    else:
        path.write_text("\ufeff" + buffer.getvalue(), encoding="utf-8")  # BOM: Excel opens Chinese correctly
        n = len(p.recipients) + len(p.excluded)
        err.print(ntr("wrote {n} row to {path}", "wrote {n} rows to {path}", n, path=path))


CATEGORY_NAMES = {
    "audience": N_("not targeted"),
    "exclusion": N_("excluded"),
    "dedupe": N_("already sent"),
    "frequency_cap": N_("frequency cap"),
    "missing_field": N_("missing data"),
}


def _category(name: str) -> str:
    return tr(CATEGORY_NAMES[name]) if name in CATEGORY_NAMES else name


def _print_preview(p: Preview, show: int, full: bool) -> None:
    c = p.campaign
    out.print(
        f"[bold]{escape(c.name)}[/bold] ({c.id})  "
        + tr("run {key}  zone {zone}", key=styled("cyan", p.run_key), zone=c.timezone)
    )
    if p.existing_run is not None:
        out.print(
            "[yellow]"
            + tr(
                "this run was already planned (run {run}, {status}): running it again sends nothing new",
                run=p.existing_run.id,
                status=p.existing_run.status,
            )
            + "[/yellow]"
        )
    cats = p.excluded_by_category()  # counts of everyone (the lists below may be the first few only)
    by_cat = tr(", ").join(f"{_category(k)} {v}" for k, v in sorted(cats.items()))
    out.print(
        tr(
            "contacts {total}  →  recipients {recipients}  excluded {excluded}",
            total=p.total_contacts,
            recipients=styled("green", str(p.recipient_count)),
            excluded=p.excluded_count,
        )
        + (f" ({by_cat})" if by_cat else "")
        + "  "
        + tr("distinct messages {n}", n=p.distinct_messages),
        soft_wrap=False,
    )
    if p.tasks is not None:
        nobody = tr("(no staff member)")
        staff = ", ".join(f"{name or nobody} {n}" for name, n in p.tasks.by_staff.items())
        out.print(tr("群发 tasks to confirm in WeCom: {total} ({staff})", total=p.tasks.total, staff=staff or "-"))
        for warning in p.tasks.warnings():
            line = tr("warning: {problem}", problem=warning)
            out.print(f"[yellow]{escape(line)}[/yellow]")
    if p.unknown_tags:
        out.print(f"[yellow]{escape(unknown_tags_warning(p.unknown_tags, p.known_tags))}[/yellow]")
    if p.unknown_ids:
        out.print(
            "[yellow]"
            + ntr(
                "warning: {n} listed id is not a known contact: {ids}",
                "warning: {n} listed ids are not known contacts: {ids}",
                len(p.unknown_ids),
                ids=", ".join(p.unknown_ids[:5]),
            )
            + "[/yellow]"
        )
    limit = show or None
    shown = p.recipients[:limit]
    if not p.recipients:
        out.print(tr("Nobody would get this message."))
    elif full:
        out.print(styled("bold", tr("Recipients")))
        for r in shown:
            out.print(f"\n[cyan]{r.contact_id}[/cyan] {escape(r.name)}")
            out.print(escape(_message_lines(r.full_message())))
    else:
        table = _table(tr("contact"), tr("name"), tr("message"), title=tr("Recipients"))
        table.show_lines = True
        table.columns[0].no_wrap = True  # ids are never cut
        table.columns[2].overflow = "fold"  # text without spaces (Chinese) wraps too, nothing is cut
        for r in shown:
            table.add_row(r.contact_id, escape(r.name), Wrapped(_message_lines(r.full_message())))
        out.print(table)
    if limit and p.recipient_count > limit:
        more = p.recipient_count - limit
        out.print(styled("dim", tr("… and {n} more (--show 0 lists all, --csv FILE writes all)", n=more)))
    ordered = sorted(p.excluded, key=lambda e: e.category == "audience")
    if p.excluded:
        table = _table(tr("contact"), tr("name"), tr("why not"), title=tr("Excluded"))
        table.columns[0].no_wrap = True
        table.columns[2].overflow = "fold"
        for e in ordered[:limit]:
            table.add_row(e.contact_id, escape(e.name), Wrapped(e.reason))
        out.print(table)
        if limit and p.excluded_count > limit:
            out.print(styled("dim", tr("… and {n} more", n=p.excluded_count - limit)))
    if p.next_fires:
        out.print(tr("next fire times: {times}", times=tr(", ").join(_fire(t) for t in p.next_fires)), soft_wrap=False)
    elif c.schedule is None:
        out.print(tr("no schedule: runs only when started (`wecast run`, or the API)"))
    elif not c.enabled:
        out.print(styled("yellow", tr("disabled: the scheduler will not fire it")))


WEEKDAYS = (N_("Mon"), N_("Tue"), N_("Wed"), N_("Thu"), N_("Fri"), N_("Sat"), N_("Sun"))


def _fire(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M} " + tr(WEEKDAYS[t.weekday()])


def unknown_tags_warning(unknown: Sequence[str], known: Sequence[str]) -> str:
    """No contact has these tags: say so, with the known tags that look like them."""
    from engine.audience import did_you_mean

    hints = "".join(did_you_mean(t, known) for t in unknown)
    return tr("warning: no contact has the tag(s) {tags}", tags=", ".join(unknown)) + hints


# -- run ---------------------------------------------------------------------------------------------


@main.command(
    help=N_(
        "Send a campaign now, or resume interrupted runs (--resume).\n\n"
        "The run is the campaign's current schedule slot, so running it twice — or the scheduler firing the "
        "same slot — sends nothing twice. Ctrl-C stops cleanly; `wecast run --resume` continues.\n\n"
        "With --test-to, the campaign's message goes only to the named contacts (staff phones, say), rendered for "
        "each of them, in a run of its own marked `test`: outside the campaign's dedupe and the frequency cap, at any "
        "hour, and never touching the real run."
    )
)
@click.argument("campaign", required=False)
@click.option("--resume", "resume_run", is_flag=True, help=N_("continue interrupted runs instead of starting one"))
@click.option("--run", "run_id", type=RUN_ID, help=N_("with --resume: only this run"))
@click.option("--run-key", type=RUN_KEY, help=N_("name the run explicitly (default: the current schedule slot)"))
@click.option("--no-wait", is_flag=True, help=N_("don't wait for login or quiet hours; leave those sends pending"))
@click.option(
    "--test-to",
    "test_to",
    metavar="ID[,ID]",
    help=N_("a test send: the campaign's exact message to these contacts only, outside dedupe and caps"),
)
@click.option(
    "--now",
    "send_now",
    is_flag=True,
    help=N_("send a one-off campaign whose date (schedule.at) is still ahead now, instead of at its time"),
)
@click.option("--json", "as_json", is_flag=True, help=N_("print the summary as JSON"))
@pass_ctx
def run(
    ctx: Ctx,
    campaign: str | None,
    resume_run: bool,
    run_id: int | None,
    run_key: str | None,
    no_wait: bool,
    test_to: str | None,
    send_now: bool,
    as_json: bool,
) -> None:
    from engine.spec import find_campaign

    if resume_run == bool(campaign):
        raise click.UsageError(tr("give a CAMPAIGN to run, or --resume to continue interrupted runs"))
    if test_to is not None and (resume_run or run_key):
        raise click.UsageError(tr("--test-to sends a campaign to named contacts; it takes no --resume or --run-key"))
    login_wait = 0.0 if no_wait else ctx.settings.sending.login_wait.total_seconds()
    quiet_max = 0.0 if no_wait else None
    spec = find_campaign(campaign, ctx.settings) if campaign else None

    if spec is not None and test_to is None:
        _refuse_future_slot(spec, send_now, run_key)

    async def go(app: Wecast) -> list[RunSummary]:
        progress = _progress()
        task = progress.add_task(tr("sending"), total=None)

        def on_progress(counts: dict[DeliveryStatus, int]) -> None:
            if not progress.live.is_started:  # a test send's bar: once its contacts are known, not before an error
                progress.start()
            total = sum(v for k, v in counts.items() if k != DeliveryStatus.SKIPPED)
            done = sum(v for k, v in counts.items() if k in TERMINAL_STATUSES and k != DeliveryStatus.SKIPPED)
            progress.update(
                task,
                total=total,
                completed=done,
                description=tr(
                    "sent {sent}  failed {failed}",
                    sent=counts.get(DeliveryStatus.SENT, 0),
                    failed=counts.get(DeliveryStatus.FAILED, 0),
                ),
            )

        def on_planned(plan: PlanResult) -> None:
            # Only a plan that holds is worth a word about sending: a template problem raised before this.
            assert spec is not None
            if not plan.created:
                err.print(
                    "[yellow]"
                    + tr(
                        "run {run} ({key}) was already planned: only its unsent deliveries (if any) are sent",
                        run=plan.run_id,
                        key=plan.run_key,
                    )
                    + "[/yellow]"
                )
            _warn_quiet_hours(spec, app.clock.now(), no_wait)
            progress.start()

        try:
            if spec is not None and test_to is not None:
                await app.ensure_contacts()
                ids = [i.strip() for i in test_to.split(",") if i.strip()]
                if not ids:
                    raise click.BadParameter(tr("name at least one contact id"), param_hint="--test-to")
                return [await app.test_send(spec, ids, progress=on_progress, login_wait=login_wait)]
            if spec is not None:
                await app.ensure_contacts()
                outcome = await app.run_campaign(
                    spec,
                    run_key=run_key,
                    progress=on_progress,
                    login_wait=login_wait,
                    quiet_wait_max=quiet_max,
                    confirm_wait=0,
                    on_planned=on_planned,
                )
                return [outcome.summary] if outcome.summary else []
            progress.start()
            return list(
                await app.resume(
                    run_id, progress=on_progress, login_wait=login_wait, quiet_wait_max=quiet_max, confirm_wait=0
                )
            )
        finally:
            progress.stop()

    summaries = _run(_with_app(ctx, go))
    if as_json:
        from engine.views import SummaryView

        _print_json([SummaryView.from_summary(s) for s in summaries])
    else:
        if not summaries:
            out.print(tr("no interrupted runs to resume"))
        for s in summaries:
            _print_summary(s)
    if any(s.status == RunStatus.PAUSED or s.counts.get(DeliveryStatus.FAILED) for s in summaries):
        sys.exit(EXIT_ERROR)


def _counts(counts: dict[DeliveryStatus, int]) -> str:
    return "  ".join(f"{status_name(k)} {v}" for k, v in sorted(counts.items()))


def _print_summary(s: RunSummary) -> None:
    out.print(
        tr("run {run}: {status}", run=s.run_id, status=styled("bold", status_name(s.status))) + "  " + _counts(s.counts)
    )
    if s.recovered and any(s.recovered.values()):
        out.print("  " + tr("recovered after an interruption: {counts}", counts=s.recovered))
    if s.message and s.message not in ("done",):
        out.print(f"  {escape(s.message)}")


def _refuse_future_slot(spec: Campaign, send_now: bool, run_key: str | None) -> None:
    """A one-off campaign whose date is still ahead is sent then (by `wecast serve`), not today by a `wecast run`
    that happened to be typed early: sending it now takes `--now`."""
    from engine.clock import SystemClock
    from engine.plan import future_slot

    now = SystemClock().now()
    slot = future_slot(spec, now, run_key)
    if slot is None or send_now:
        return
    raise WecastError(
        tr(
            "{campaign} is a one-off campaign for {when} ({zone}), {ahead} from now: `wecast serve` sends it then. "
            "To send it now, run `wecast run {campaign} --now`",
            campaign=spec.id,
            when=slot.astimezone(spec.tz).strftime("%Y-%m-%d %H:%M"),
            zone=spec.timezone,
            ahead=_ahead(slot - now),
        )
    )


def _ahead(delta: timedelta) -> str:
    """A time to come in words: 10 days, 5 hours, 12 minutes (rounded down, at least one minute)."""
    seconds = max(int(delta.total_seconds()), 60)
    if seconds >= 86400:
        return ntr("{n} day", "{n} days", seconds // 86400)
    if seconds >= 3600:
        return ntr("{n} hour", "{n} hours", seconds // 3600)
    return ntr("{n} minute", "{n} minutes", seconds // 60)


def _warn_quiet_hours(spec: Campaign, now: datetime, no_wait: bool) -> None:
    """Say so before a run sits silently waiting for its quiet hours to end."""
    q = spec.quiet_hours
    if q is None or not q.seconds_until_open(now, spec.tz):
        return
    then = (
        tr("they stay pending (--no-wait)")
        if no_wait
        else tr("waiting until {end}; Ctrl-C leaves them pending", end=q.end.strftime("%H:%M"))
    )
    err.print(
        "[yellow]"
        + tr(
            "quiet hours {hours} ({zone}): no sends now; {then}. "
            "`wecast serve` or `wecast run --resume` sends them when the window opens.",
            hours=q,
            zone=spec.timezone,
            then=then,
        )
        + "[/yellow]"
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


@main.command(
    help=N_(
        "Send one message to one contact now (a test send): text, then images, then files.\n\n"
        "Images and files are copied into wecast's media store (by their content: sending the same poster twice "
        "stores it once), checked by content (JPG/PNG, ≤ 10 MB; files ≤ 20 MB) and sent as the parts the gateway "
        "can carry. The send is logged like any other (`wecast log --contact CONTACT`)."
    )
)
@click.argument("contact")
@click.option("--text", help=N_("the text"))
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=N_("a JPG or PNG to send after the text (repeatable)"),
)
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=N_("a file to send (repeatable; ≤ 20 MB)"),
)
@click.option("--no-wait", is_flag=True, help=N_("don't wait for a login; leave the send pending"))
@click.option("--json", "as_json", is_flag=True, help=N_("print the result as JSON"))
@pass_ctx
def send(
    ctx: Ctx,
    contact: str,
    text: str | None,
    images: tuple[Path, ...],
    files: tuple[Path, ...],
    no_wait: bool,
    as_json: bool,
) -> None:
    from engine.media import MediaError
    from engine.message_spec import Attachment, FileAttachment, ImageAttachment
    from engine.messages import PartKind

    if not (text and text.strip()) and not images and not files:  # (the API's words name its body's fields)
        raise click.UsageError(tr("give what to send: --text, --image or --file (or several)"))
    login_wait = 0.0 if no_wait else ctx.settings.sending.login_wait.total_seconds()

    async def go(app: Wecast) -> RunSummary:
        attachments: list[Attachment] = []
        try:
            for kind, paths in ((PartKind.IMAGE, images), (PartKind.FILE, files)):
                for path in paths:
                    stored = app.media.save(_chunks(path), path.name, kind)
                    attachments.append(
                        ImageAttachment(kind="image", media_id=stored.id)
                        if kind is PartKind.IMAGE
                        else FileAttachment(kind="file", media_id=stored.id)
                    )
        except MediaError as exc:
            raise click.BadParameter(str(exc), param_hint="--image/--file") from None
        await app.ensure_contacts()
        return await app.send_direct(contact, text, attachments, login_wait=login_wait)

    summary = _run(_with_app(ctx, go))
    if as_json:
        from engine.views import SummaryView

        _print_json(SummaryView.from_summary(summary))
    else:
        _print_summary(summary)
    if summary.counts.get(DeliveryStatus.FAILED) or summary.counts.get(DeliveryStatus.UNKNOWN):
        sys.exit(EXIT_ERROR)


def _chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


# -- contacts ----------------------------------------------------------------------------------------


@main.group(cls=TrGroup, help=N_("Customers: sync from WeCom, list and filter."))
def contacts() -> None:
    """The `wecast contacts` group."""


@contacts.command("sync", help=N_("Pull every customer and tag from the gateway into the database."))
@pass_ctx
def contacts_sync(ctx: Ctx) -> None:
    async def go(app: Wecast) -> SyncResult:
        status = await app.gateway.login_status()
        if not status.logged_in:
            raise WecastError(tr("the WeCom account is not logged in; run `wecast login` first"))
        with _progress() as progress:
            task = progress.add_task(tr("syncing contacts"), total=None)
            return await app.sync(progress=lambda n, total: progress.update(task, completed=n, total=total))

    r = _run(_with_app(ctx, go))
    out.print(
        tr(
            "contacts: {seen} listed, {added} new, {updated} changed, {removed} removed; {tags} tags",
            seen=r.seen,
            added=r.added,
            updated=r.updated,
            removed=r.removed,
            tags=r.tags,
        )
    )
    if r.unread_staff:
        from engine.contacts import describe_unread

        err.print(
            labelled(
                "yellow",
                tr("warning:"),
                escape(
                    tr(
                        "the customers of these staff members could not be read, so {kept} contacts were kept as "
                        "they were: {staff}",
                        kept=r.kept,
                        staff=describe_unread(r.unread_staff),
                    )
                ),
            )
        )


@contacts.command("list", help=N_("List synced contacts, filtered by tag and field."))
@click.option("--tag", "tags", multiple=True, help=N_("only contacts with this tag (repeatable: all of them)"))
@click.option(
    "--where",
    "wheres",
    multiple=True,
    metavar="FIELD=VALUE",
    help=N_("field filter, e.g. city=上海 or gender=female (repeatable)"),
)
@click.option("--limit", default=50, show_default=True, type=COUNT, help=N_("0: all"))
@click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
@pass_ctx
def contacts_list(ctx: Ctx, tags: tuple[str, ...], wheres: tuple[str, ...], limit: int, as_json: bool) -> None:
    from engine.audience import RuleError, parse_rules, select
    from engine.clock import SystemClock
    from engine.views import ListedContactView, contact_fields
    from storage.contacts import ContactFilter, load_contact_views, page_contacts, tag_names
    from storage.db import make_db_engine
    from storage.optouts import opted_out_since

    rules = []
    for w in wheres:
        field, sep, value = w.partition("=")
        if not sep:
            raise click.BadParameter(tr("{value!r}: write FIELD=VALUE").format(value=w), param_hint="--where")
        rules.append({field.strip(): value.strip()})
    try:
        rule = parse_rules(rules) if rules else None
    except RuleError as exc:
        raise click.BadParameter(exc.reason, param_hint="--where") from None
    db = make_db_engine(ctx.settings.database_url, busy_timeout=ctx.settings.database_busy_timeout.total_seconds())
    try:
        views = load_contact_views(db)
        known = tag_names(db)
        # Friends only (others cannot receive messages), coworkers included: everyone a campaign could reach.
        chosen = select(views, tags_all=tags, rules=rule, now=SystemClock().now(), include_coworkers=True).recipients
        shown = chosen[:limit] if limit else chosen
        opted = opted_out_since(db, [c["id"] for c in shown])
        if as_json:
            ids = [c["id"] for c in shown]
            rows = page_contacts(db, ContactFilter(ids=ids), limit=max(1, len(ids))).rows if ids else []
            _print_json(
                [
                    ListedContactView(**contact_fields(r), opted_out=r.id in opted, opted_out_at=opted.get(r.id))
                    for r in rows
                ]
            )
            return
    finally:
        db.dispose()
    unknown = [t for t in tags if t not in known]
    if views and unknown:
        err.print(f"[yellow]{escape(unknown_tags_warning(unknown, sorted(known)))}[/yellow]")
    if not views:
        out.print(tr("No contacts yet: run `wecast contacts sync`."))
        return
    if not chosen:
        out.print(tr("No contact matches (of {total}).", total=len(views)))
        return
    columns = [tr("id"), tr("name"), tr("remark"), tr("gender"), tr("city"), tr("tags")]
    if _wide():
        columns.append(tr("added"))
    table = _table(*columns)
    table.columns[0].no_wrap = True
    genders = {1: tr("male"), 2: tr("female")}
    for c in shown:
        row = [
            c["id"],
            escape(c["name"]) + ("\n" + styled("yellow", tr("(opted out)")) if c["id"] in opted else ""),
            escape(c["alias"]),
            genders.get(c["gender"], ""),
            c["city"],
            escape(", ".join(c["tags_named"])),
        ]
        if _wide():
            row.append(c["added_at"].date().isoformat() if c.get("added_at") else "")
        table.add_row(*row)
    out.print(table)
    if len(shown) < len(chosen):
        summary = tr(
            "{n} of {total} contacts match (showing {shown})", n=len(chosen), total=len(views), shown=len(shown)
        )
    else:
        summary = tr("{n} of {total} contacts match", n=len(chosen), total=len(views))
    out.print(summary)


# -- runs / log --------------------------------------------------------------------------------------


@main.command(help=N_("Run history with per-status counts."))
@click.option("--campaign", help=N_("only this campaign id"))
@click.option("--status", type=click.Choice([s.value for s in RunStatus]), help=N_("only runs in this state"))
@click.option("--limit", default=30, show_default=True, type=COUNT, help=N_("at most this many, newest first"))
@click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
@pass_ctx
def runs(ctx: Ctx, campaign: str | None, status: str | None, limit: int, as_json: bool) -> None:
    from engine.views import RunView
    from storage.db import make_db_engine
    from storage.deliveries import status_counts
    from storage.runs import list_runs

    db = make_db_engine(ctx.settings.database_url, busy_timeout=ctx.settings.database_busy_timeout.total_seconds())
    try:
        found = list_runs(db, campaign_id=campaign, status=RunStatus(status) if status else None, limit=limit)
        rows = [RunView.from_row(r, status_counts(db, r.id)) for r in found]
    finally:
        db.dispose()
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print(
            tr("No runs yet: `wecast run CAMPAIGN` starts one.") if not (campaign or status) else tr("No run matches.")
        )
        return
    tz = ctx.settings.tz
    wide = _wide()
    # Short headings and local MM-DD HH:mm: the table fits 80 columns; a wide terminal adds the run key and trigger.
    columns = [tr("run"), tr("campaign"), tr("slot"), tr("status"), tr("sent"), tr("failed"), tr("skipped"), tr("open")]
    if wide:
        columns[3:3] = [tr("run key"), tr("trigger")]
    columns.append(tr("created"))
    table = _table(*columns)
    for column in table.columns:
        column.no_wrap = column.header != tr("campaign")  # ids, times and counts stay on one line
    # Nine columns leave the campaign id two cells of 80 with the usual padding ("st…"): one space between columns
    # instead, and a long id folds onto the next line, whole.
    table.collapse_padding = True
    table.columns[1].overflow = "fold"
    for r in rows:
        c = r.counts
        cells = [
            str(r.id),
            r.campaign_id,
            _short(r.scheduled_for, tz) if r.scheduled_for else "—",
            status_name(r.status),
            str(c.get(DeliveryStatus.SENT, 0)),
            str(c.get(DeliveryStatus.FAILED, 0) + c.get(DeliveryStatus.UNKNOWN, 0)),
            str(c.get(DeliveryStatus.SKIPPED, 0)),
            str(sum(c.get(s, 0) for s in OPEN_STATUSES)),
        ]
        if wide:
            cells[3:3] = [r.run_key, r.trigger]
        cells.append(_short(r.created_at, tz))
        table.add_row(*cells)
    out.print(table)


@main.command(
    help=N_(
        "Pause a run: nothing more is sent (sends in flight finish) until `wecast resume RUN_ID`.\n\n"
        "Works on a run being sent by `wecast serve` or another `wecast run`: they notice before their next send."
    )
)
@click.argument("run_id", type=RUN_ID)
@pass_ctx
def pause(ctx: Ctx, run_id: int) -> None:
    app = _app(ctx)
    try:
        app.pause_run(run_id, tr("paused from the command line"))
    finally:
        app.db.dispose()
    out.print(tr("run {run} paused", run=run_id))


@main.command(help=N_("Cancel a run: its unsent deliveries are skipped and recorded as cancelled."))
@click.argument("run_id", type=RUN_ID)
@pass_ctx
def cancel(ctx: Ctx, run_id: int) -> None:
    app = _app(ctx)
    try:
        skipped = app.cancel_run(run_id, tr("cancelled from the command line"))
        waiting = app.gateway.capabilities.batch_send and app.task_ids(run_id)
    finally:
        app.db.dispose()
    out.print(tr("run {run} cancelled; {n} unsent deliveries skipped", run=run_id, n=skipped))
    if waiting:  # 群发 tasks staff have not all confirmed: stop them in WeCom too
        tasks, left = _run(_with_app(ctx, lambda a: a.cancel_tasks(run_id)))
        out.print(
            "  "
            + tr(
                "{tasks} 群发 task(s) cancelled in WeCom: {stopped} unsent messages stopped, "
                "{sent} had already gone out",
                tasks=tasks,
                stopped=left.failed,
                sent=left.sent,
            )
        )


@main.command(
    help=N_(
        "Collect the results of 群发 tasks (of one run, or of every run waiting for staff): deliveries staff have "
        "confirmed become sent, or failed with WeCom's reason; a run with nothing left open completes."
    )
)
@click.argument("run_id", type=RUN_ID, required=False)
@pass_ctx
def reconcile(ctx: Ctx, run_id: int | None) -> None:
    found = _run(_with_app(ctx, lambda app: app.reconcile(run_id)))
    if not found:
        out.print(tr("no run is waiting for 群发 tasks"))
    for each, r in found.items():
        line = tr(
            "run {run}: {tasks} task(s): {sent} sent, {failed} failed, {waiting} still waiting for staff",
            run=each,
            tasks=r.tasks,
            sent=r.sent,
            failed=r.failed,
            waiting=r.waiting,
        )
        if r.unreadable:
            line += " " + tr("({n} task(s) could not be read this time; see the log)", n=r.unreadable)
        out.print(line)


@main.command(
    help=N_("Remind staff to confirm a run's 群发 tasks in WeCom (WeCom allows 3 reminders per task per 24 hours).")
)
@click.argument("run_id", type=RUN_ID)
@pass_ctx
def remind(ctx: Ctx, run_id: int) -> None:
    reminded, problems = _run(_with_app(ctx, lambda app: app.remind(run_id)))
    out.print(tr("run {run}: reminded the staff of {n} task(s)", run=run_id, n=reminded))
    for problem in problems:
        err.print(f"  {escape(problem)}")
    if problems and not reminded:
        raise SystemExit(EXIT_ERROR)


@main.command(help=N_("Resume a paused (or interrupted) run and send what is left."))
@click.argument("run_id", type=RUN_ID)
@click.option("--no-wait", is_flag=True, help=N_("don't wait for login or quiet hours; leave those sends pending"))
@pass_ctx
def resume(ctx: Ctx, run_id: int, no_wait: bool) -> None:
    login_wait = 0.0 if no_wait else ctx.settings.sending.login_wait.total_seconds()

    async def go(app: Wecast) -> list[RunSummary]:
        app.reopen_run(run_id)
        return await app.resume(run_id, login_wait=login_wait, quiet_wait_max=0.0 if no_wait else None, confirm_wait=0)

    [summary] = _run(_with_app(ctx, go))
    _print_summary(summary)


@main.command("log", help=N_("The delivery log, newest first."))
@click.option("--campaign", help=N_("campaign id"))
@click.option("--run", "run_id", type=RUN_ID, help=N_("run id"))
@click.option(
    "--status", type=click.Choice([s.value for s in DeliveryStatus]), help=N_("only deliveries in this state")
)
@click.option("--contact", help=N_("contact id"))
@click.option("--limit", default=50, show_default=True, type=COUNT, help=N_("at most this many, newest first"))
@click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
@pass_ctx
def log_cmd(
    ctx: Ctx,
    campaign: str | None,
    run_id: int | None,
    status: str | None,
    contact: str | None,
    limit: int,
    as_json: bool,
) -> None:
    from engine.views import DeliveryView, split_reason
    from storage.db import make_db_engine
    from storage.deliveries import list_deliveries, list_parts

    db = make_db_engine(ctx.settings.database_url, busy_timeout=ctx.settings.database_busy_timeout.total_seconds())
    try:
        rows = list_deliveries(
            db,
            campaign_id=campaign,
            run_id=run_id,
            status=DeliveryStatus(status) if status else None,
            contact_id=contact,
            limit=limit,
        )
        parts = list_parts(db, [d.id for d in rows if d.message is not None])
    finally:
        db.dispose()
    if as_json:
        _print_json([DeliveryView.from_row(d, parts.get(d.id, ())) for d in rows])
        return
    if not rows:
        filtered = campaign or run_id or status or contact
        out.print(
            tr("No delivery matches.") if filtered else tr("No deliveries yet: `wecast run CAMPAIGN` sends some.")
        )
        return
    tz = ctx.settings.tz
    wide = _wide()
    columns = [tr("id"), tr("run"), tr("contact"), tr("status"), tr("when"), tr("message / reason")]
    if wide:
        columns[2:2] = [tr("campaign")]
        columns[-1:-1] = [tr("tries")]
    table = _table(*columns)
    table.columns[0].no_wrap = True
    table.columns[2 + wide].no_wrap = True
    table.columns[-1].overflow = "fold"
    for d in rows:
        detail = split_reason(d.reason or d.last_error)[1] if d.status is not DeliveryStatus.SENT else d.text
        cells: list[RenderableType] = [
            str(d.id),
            str(d.run_id),
            d.contact_id,
            status_name(d.status),
            _short(d.sent_at or d.updated_at, tz),
            Wrapped(detail or ""),
        ]
        if wide:
            cells[2:2] = [d.campaign_id]
            cells[-1:-1] = [str(d.attempts)]
        table.add_row(*cells)
    out.print(table)


def _short(value: datetime | None, tz: tzinfo) -> str:
    """A time as the reader's local MM-DD HH:mm (the year only when it is not this one)."""
    if value is None:
        return ""
    local = value.astimezone(tz)
    return f"{local:%m-%d %H:%M}" if local.year == datetime.now(tz).year else f"{local:%Y-%m-%d %H:%M}"


# -- login / logout ----------------------------------------------------------------------------------


@main.command(help=N_("Log the WeCom account in: scan the QR with WeCom on the phone, then type the 6-digit code."))
@click.option("--timeout", default=600, show_default=True, help=N_("seconds to wait for the scan and the code"))
@pass_ctx
def login(ctx: Ctx, timeout: int) -> None:
    settings = ctx.settings.model_copy(
        update={"sandbox": ctx.settings.sandbox.model_copy(update={"auto_login": False})}
    )

    async def go() -> None:
        from engine.errors import LoginError
        from engine.gateways.base import LoginState
        from engine.qr import qr_terminal
        from engine.service import Wecast

        async with Wecast(settings) as app:
            gw = app.gateway
            status = await gw.start_login()
            if status.logged_in:
                name = escape(status.account_name or status.account_id or "")
                out.print(tr("already logged in as {name}", name=name))
                return
            if not gw.capabilities.qr_login:  # credentials from config: refused, or WeCom unreachable
                raise WecastError(status.message)
            shown_key = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                status = await gw.login_status()
                if status.logged_in:
                    name = escape(status.account_name or status.account_id or "")
                    out.print(styled("green", tr("logged in as {name}", name=name)))
                    return
                if status.qr_url and status.qrcode_key != shown_key:
                    shown_key = status.qrcode_key
                    out.print(qr_terminal(status.qr_url), end="")
                    out.print(f"{escape(status.message)}\nqrcodeKey: {status.qrcode_key}")
                if status.state is LoginState.WAITING_VERIFY_CODE:
                    code = await loop.run_in_executor(
                        None, lambda: click.prompt(tr("verification code shown on the phone"), prompt_suffix=tr(": "))
                    )
                    try:
                        status = await gw.submit_verify_code(code, status.qrcode_key)
                    except LoginError as exc:
                        err.print(f"[red]{escape(str(exc))}[/red]")
                    continue
                await gw.wait_for_login(1.0)
            raise WecastError(tr("login timed out; run `wecast login` again"))

    _run(go())


@main.command(help=N_("Log the WeCom account out (to switch accounts; `wecast login` shows a new QR)."))
@pass_ctx
def logout(ctx: Ctx) -> None:
    async def go(app: Wecast) -> LoginStatus:
        return await app.gateway.logout()

    status = _run(_with_app(ctx, go))
    out.print(
        tr("logged out: `wecast login` logs in again with a new QR code") if not status.logged_in else status.message
    )


# -- serve -------------------------------------------------------------------------------------------


@main.command(help=N_("Run the HTTP API (the source document's endpoints + /api/v1) and the campaign scheduler."))
@click.option("--host", help=N_("address to bind (default from config: 127.0.0.1)"))
@click.option("--port", type=PORT, help=N_("port (default from config: 9898)"))
@pass_ctx
def serve(ctx: Ctx, host: str | None, port: int | None) -> None:
    from engine.web.server import serve as run_server

    sys.exit(run_server(ctx.settings, host=host, port=port))


# -- sandbox -----------------------------------------------------------------------------------------


@main.group(cls=TrGroup, help=N_("The simulated account (gateway: sandbox)."))
def sandbox() -> None:
    """The `wecast sandbox` group."""


@sandbox.command("outbox", help=N_("Messages the sandbox's customers received (newest last)."))
@click.option("--contact", help=N_("only messages to this contact id"))
@click.option("--limit", default=30, show_default=True, type=COUNT, help=N_("0: all"))
@click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
@pass_ctx
def sandbox_outbox(ctx: Ctx, contact: str | None, limit: int, as_json: bool) -> None:
    from engine.gateways.sandbox import SandboxStore

    store = SandboxStore(ctx.settings.sandbox.state_file)
    messages = store.messages(contact)
    store.close()
    shown = messages[-limit:] if limit else messages
    if as_json:
        _print_json(shown)
        return
    if not messages:
        out.print(tr("The sandbox outbox is empty ({path}).", path=ctx.settings.sandbox.state_file))
        return
    tz = ctx.settings.tz
    columns = [tr("contact"), tr("sent at"), tr("text")]
    if _wide():
        columns.insert(0, tr("message id"))
    table = _table(*columns)
    table.columns[-3].no_wrap = True
    table.columns[-1].overflow = "fold"
    for m in shown:
        cells: list[RenderableType] = [m.contact_id, _short(datetime.fromisoformat(m.sent_at), tz), Wrapped(m.text)]
        if _wide():
            cells.insert(0, m.message_id)
        table.add_row(*cells)
    out.print(table)
    out.print(
        ntr(
            "{n} message in the sandbox outbox ({path})",
            "{n} messages in the sandbox outbox ({path})",
            len(messages),
            path=ctx.settings.sandbox.state_file,
        )
    )


@main.command("config", help=N_("Show the effective configuration (secrets hidden)."))
@pass_ctx
def show_config(ctx: Ctx) -> None:
    s = ctx.settings_or_defaults()
    data = json.loads(s.model_dump_json())
    data["database_url"] = redact_url(s.database_url)
    if Path(s.source).is_file():
        out.print("# " + tr("from {path}", path=s.source))
    else:
        out.print("# " + tr("no config file (looked for {path}): the built-in defaults", path=Path(s.source).resolve()))
    out.print_json(json.dumps(data, ensure_ascii=False))


# -- journeys, opt-outs, simulated customers (engine.cli_journeys) -------------------------------------------

KIT = cli_journeys.Kit(
    main=main,
    contacts=contacts,
    sandbox=sandbox,
    out=out,
    err=err,
    table=_table,
    with_app=_with_app,
    print_json=_print_json,
    short=_short,
)
cli_journeys.register(KIT)


if __name__ == "__main__":  # pragma: no cover
    main()
