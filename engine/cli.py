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
import io
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic_core import to_json
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine import __version__
from engine.errors import CampaignError, WecastError
from engine.messages import Message, TextPart, describe
from engine.settings import Settings, load_settings, redact_url
from storage.models import OPEN_STATUSES, TERMINAL_STATUSES, DeliveryStatus, RunStatus

if TYPE_CHECKING:  # the commands import what they need when they run: `wecast --help` stays quick
    from engine.contacts import SyncResult
    from engine.dispatch import RunSummary
    from engine.gateways.base import LoginStatus
    from engine.plan import Preview
    from engine.service import Wecast
    from engine.spec import Campaign

T = TypeVar("T")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("wecast")

EXIT_ERROR = 1
EXIT_INVALID = 2
EXIT_INTERNAL = 70


class Ctx:
    def __init__(self, config: str | None, verbose: int) -> None:
        self.config_path = config
        self.verbose = verbose
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings


pass_ctx = click.make_pass_decorator(Ctx)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


class WecastGroup(click.Group):
    """Turns wecast errors into one line on stderr and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CampaignError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            ctx.exit(EXIT_INVALID)
        except WecastError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            ctx.exit(EXIT_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            err.print("interrupted: unsent deliveries stay pending; `wecast run --resume` continues them")
            ctx.exit(130)
        except Exception as exc:
            obj = ctx.find_object(Ctx)
            if obj is not None and obj.verbose:
                raise
            err.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))} (run with -v to see where)")
            ctx.exit(EXIT_INTERNAL)


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


@click.group(cls=WecastGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    envvar="WECAST_CONFIG",
    help="config file (default: ./config.yaml, or $WECAST_CONFIG)",
)
@click.option("-v", "--verbose", count=True, help="more logging (-vv for debug); tracebacks on errors")
@click.version_option(__version__, prog_name="wecast")
@click.pass_context
def main(click_ctx: click.Context, config: str | None, verbose: int) -> None:
    """wecast – scheduled, rule-driven WeCom (企业微信) customer messaging.

    Campaigns are YAML files in campaigns/. Start with `wecast preview CAMPAIGN` (a dry run that
    sends nothing), then `wecast run CAMPAIGN`. `wecast serve` runs the HTTP API and the scheduler.
    """
    _setup_logging(verbose)
    click_ctx.obj = Ctx(config, verbose)


# -- validate ----------------------------------------------------------------------------------------


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
def validate(ctx: Ctx, paths: tuple[Path, ...], as_json: bool) -> None:
    """Check campaign files (default: every file in campaigns_dir) and config.yaml.

    Every problem is reported with file, line and field. With synced contacts, templates are also
    checked against the data: a field some recipients lack is an error unless the template gives a
    default. Exit status 2 when anything is invalid.
    """
    from engine.plan import build_preview
    from engine.spec import campaign_files, load_campaigns
    from storage.db import make_db_engine

    settings = ctx.settings
    files = campaign_files(list(paths) or [settings.campaigns_dir])
    if not files:
        raise WecastError(f"no campaign files found in {', '.join(str(p) for p in paths) or settings.campaigns_dir}")
    result = load_campaigns(files, settings)
    problems: list[str] = [str(p) for e in result.errors for p in e.problems]
    data_checked = False
    db = make_db_engine(settings.database_url)
    try:
        from engine.clock import SystemClock
        from storage.contacts import load_contact_views

        now = SystemClock().now()
        views = load_contact_views(db)
        if views:
            data_checked = True
            for campaign in result.campaigns:
                preview = build_preview(db, campaign, now=now, contacts=views)
                problems.extend(str(p) for p in preview.problems())
    finally:
        db.dispose()
    if as_json:
        _print_json(
            {
                "ok": not problems,
                "files": [str(f) for f in files],
                "campaigns": [c.id for c in result.campaigns],
                "problems": problems,
                "checked_against_contacts": data_checked,
            }
        )
    else:
        for campaign in result.campaigns:
            mark = "[green]ok[/green]" if not any(str(campaign.file) in p for p in problems) else "[red]!![/red]"
            out.print(f"{mark} {campaign.file}  ({campaign.id}: {escape(campaign.name)})")
        for problem in problems:
            err.print(f"[red]error:[/red] {escape(problem)}")
        if not data_checked:
            out.print("[dim]templates not checked against contacts yet (run `wecast contacts sync`)[/dim]")
    if problems:
        sys.exit(EXIT_INVALID)


# -- preview -----------------------------------------------------------------------------------------


@main.command()
@click.argument("campaign")
@click.option("--run-key", help="preview a specific run (default: the current schedule slot)")
@click.option("--json", "as_json", is_flag=True, help="everything as JSON on stdout")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write every contact with its decision and message to this CSV file ('-' for stdout)",
)
@click.option("--show", default=20, show_default=True, help="how many recipients and exclusions to list (0: all)")
@pass_ctx
def preview(ctx: Ctx, campaign: str, run_key: str | None, as_json: bool, csv_path: Path | None, show: int) -> None:
    """Dry run: who would get which message, who is left out and why. Sends nothing.

    CAMPAIGN is a file path or a campaign id from campaigns_dir.
    """
    from engine.spec import find_campaign

    spec = find_campaign(campaign, ctx.settings)

    async def go(app: Wecast) -> Preview:
        from engine.blocking import off_loop

        await app.ensure_contacts()
        return await off_loop(app.preview, spec, run_key=run_key)

    result = _run(_with_app(ctx, go))
    if csv_path is not None:
        _write_csv(result, csv_path)
    if as_json:
        from engine.views import PreviewView

        _print_json(PreviewView.from_preview(result))
    elif str(csv_path) != "-":
        _print_preview(result, show)
    if result.problems():
        for p in result.problems():
            err.print(f"[red]error:[/red] {escape(str(p))}")
        sys.exit(EXIT_INVALID)


def _message_lines(message: Message) -> str:
    """A message for the terminal: its parts in order, the text as it is and each attachment on a line of its own."""
    return "\n".join(("" if isinstance(part, TextPart) else "+ ") + describe(part) for part in message.parts)


def _write_csv(p: Preview, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["contact_id", "name", "decision", "reason", "message", "attachments"])
    for r in p.recipients:
        attachments = "\n".join(describe(a) for a in r.full_message().attachments)
        writer.writerow([r.contact_id, r.name, "send", "", r.text, attachments])
    for e in p.excluded:
        writer.writerow([e.contact_id, e.name, "excluded", f"{e.category}: {e.reason}", "", ""])
    if str(path) == "-":
        sys.stdout.write(buffer.getvalue())
    else:
        path.write_text("\ufeff" + buffer.getvalue(), encoding="utf-8")  # BOM: Excel opens Chinese correctly
        err.print(f"wrote {len(p.recipients) + len(p.excluded)} rows to {path}")


def _print_preview(p: Preview, show: int) -> None:
    c = p.campaign
    out.print(f"[bold]{escape(c.name)}[/bold] ({c.id})  run [cyan]{p.run_key}[/cyan]  zone {c.timezone}")
    if p.existing_run is not None:
        out.print(
            f"[yellow]this run was already planned (run {p.existing_run.id}, "
            f"{p.existing_run.status}): running it again sends nothing new[/yellow]"
        )
    cats = p.excluded_by_category()
    out.print(
        f"contacts {p.total_contacts}  →  [green]recipients {len(p.recipients)}[/green]  "
        f"excluded {len(p.excluded)} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(cats.items()))
        + ")"
        + f"  distinct messages {p.distinct_messages}"
    )
    if p.unknown_tags:
        out.print(f"[yellow]warning: no contact has the tag(s) {', '.join(p.unknown_tags)}[/yellow]")
    if p.unknown_ids:
        out.print(
            f"[yellow]warning: {len(p.unknown_ids)} listed id(s) are not known contacts: "
            f"{', '.join(p.unknown_ids[:5])}[/yellow]"
        )
    limit = show or None
    table = Table("contact", "name", "message", title="Recipients", title_justify="left", show_lines=True)
    for r in p.recipients[:limit]:
        table.add_row(r.contact_id, escape(r.name), escape(_message_lines(r.full_message())))
    if p.recipients:
        out.print(table)
        if limit and len(p.recipients) > limit:
            out.print(f"[dim]… and {len(p.recipients) - limit} more (--show 0 lists all, --csv FILE writes all)[/dim]")
    ordered = sorted(p.excluded, key=lambda e: e.category == "audience")
    table = Table("contact", "name", "why not", title="Excluded", title_justify="left")
    for e in ordered[:limit]:
        table.add_row(e.contact_id, escape(e.name), escape(f"{e.category}: {e.reason}"))
    if p.excluded:
        out.print(table)
        if limit and len(ordered) > limit:
            out.print(f"[dim]… and {len(ordered) - limit} more[/dim]")
    if p.next_fires:
        out.print("next fire times: " + ", ".join(t.strftime("%Y-%m-%d %H:%M %a") for t in p.next_fires))
    elif c.schedule is None:
        out.print("no schedule: runs only when started (`wecast run`, or the API)")
    elif not c.enabled:
        out.print("[yellow]disabled: the scheduler will not fire it[/yellow]")


# -- run ---------------------------------------------------------------------------------------------


@main.command()
@click.argument("campaign", required=False)
@click.option("--resume", "resume_run", is_flag=True, help="continue interrupted runs instead of starting one")
@click.option("--run", "run_id", type=int, help="with --resume: only this run")
@click.option("--run-key", help="name the run explicitly (default: the current schedule slot)")
@click.option("--no-wait", is_flag=True, help="don't wait for login or quiet hours; leave those sends pending")
@click.option(
    "--test-to",
    "test_to",
    metavar="ID[,ID]",
    help="a test send: the campaign's exact message to these contacts only, outside dedupe and caps",
)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@pass_ctx
def run(
    ctx: Ctx,
    campaign: str | None,
    resume_run: bool,
    run_id: int | None,
    run_key: str | None,
    no_wait: bool,
    test_to: str | None,
    as_json: bool,
) -> None:
    """Send a campaign now, or resume interrupted runs (--resume).

    The run is the campaign's current schedule slot, so running it twice — or the scheduler firing the
    same slot — sends nothing twice. Ctrl-C stops cleanly; `wecast run --resume` continues.

    With --test-to, the campaign's message goes only to the named contacts (staff phones, say), rendered for
    each of them, in a run of its own marked `test`: outside the campaign's dedupe and the frequency cap, at any
    hour, and never touching the real run.
    """
    from engine.spec import find_campaign

    if resume_run == bool(campaign):
        raise click.UsageError("give a CAMPAIGN to run, or --resume to continue interrupted runs")
    if test_to is not None and (resume_run or run_key):
        raise click.UsageError("--test-to sends a campaign to named contacts; it takes no --resume or --run-key")
    login_wait = 0.0 if no_wait else ctx.settings.sending.login_wait.total_seconds()
    quiet_max = 0.0 if no_wait else None
    spec = find_campaign(campaign, ctx.settings) if campaign else None

    async def go(app: Wecast) -> list[RunSummary]:
        with _progress() as progress:
            task = progress.add_task("sending", total=None)

            def on_progress(counts: dict[DeliveryStatus, int]) -> None:
                total = sum(v for k, v in counts.items() if k != DeliveryStatus.SKIPPED)
                done = sum(v for k, v in counts.items() if k in TERMINAL_STATUSES and k != DeliveryStatus.SKIPPED)
                progress.update(
                    task,
                    total=total,
                    completed=done,
                    description=(
                        f"sent {counts.get(DeliveryStatus.SENT, 0)}  failed {counts.get(DeliveryStatus.FAILED, 0)}"
                    ),
                )

            if spec is not None and test_to is not None:
                await app.ensure_contacts()
                ids = [i.strip() for i in test_to.split(",") if i.strip()]
                if not ids:
                    raise click.BadParameter("name at least one contact id", param_hint="--test-to")
                return [await app.test_send(spec, ids, progress=on_progress, login_wait=login_wait)]
            if spec is not None:
                await app.ensure_contacts()
                _warn_quiet_hours(spec, app.clock.now(), no_wait)
                outcome = await app.run_campaign(
                    spec,
                    run_key=run_key,
                    progress=on_progress,
                    login_wait=login_wait,
                    quiet_wait_max=quiet_max,
                    confirm_wait=0,
                )
                if not outcome.plan.created:
                    progress.stop()
                    err.print(
                        f"[yellow]run {outcome.plan.run_id} ({outcome.plan.run_key}) was already planned: "
                        "only its unsent deliveries (if any) are sent[/yellow]"
                    )
                return [outcome.summary] if outcome.summary else []
            return list(
                await app.resume(
                    run_id, progress=on_progress, login_wait=login_wait, quiet_wait_max=quiet_max, confirm_wait=0
                )
            )

    summaries = _run(_with_app(ctx, go))
    if as_json:
        from engine.views import SummaryView

        _print_json([SummaryView.from_summary(s) for s in summaries])
    else:
        if not summaries:
            out.print("no interrupted runs to resume")
        for s in summaries:
            counts = "  ".join(f"{k} {v}" for k, v in sorted(s.counts.items()))
            out.print(f"run {s.run_id}: [bold]{s.status}[/bold]  {counts}")
            if s.recovered and any(s.recovered.values()):
                out.print(f"  recovered after an interruption: {s.recovered}")
            if s.message and s.message not in ("done",):
                out.print(f"  {escape(s.message)}")
    if any(s.status == RunStatus.PAUSED or s.counts.get(DeliveryStatus.FAILED) for s in summaries):
        sys.exit(EXIT_ERROR)


def _warn_quiet_hours(spec: Campaign, now: datetime, no_wait: bool) -> None:
    """Say so before a run sits silently waiting for its quiet hours to end."""
    q = spec.quiet_hours
    if q is None or not q.seconds_until_open(now, spec.tz):
        return
    then = "they stay pending (--no-wait)" if no_wait else f"waiting until {q.end:%H:%M}; Ctrl-C leaves them pending"
    err.print(
        f"[yellow]quiet hours {q} ({spec.timezone}): no sends now; {then}. "
        "`wecast serve` or `wecast run --resume` sends them when the window opens.[/yellow]"
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


@main.command()
@click.argument("contact")
@click.option("--text", help="the text")
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a JPG or PNG to send after the text (repeatable)",
)
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a file to send (repeatable; ≤ 20 MB)",
)
@click.option("--no-wait", is_flag=True, help="don't wait for a login; leave the send pending")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
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
    """Send one message to one contact now (a test send): text, then images, then files.

    Images and files are copied into wecast's media store (by their content: sending the same poster twice
    stores it once), checked by content (JPG/PNG, ≤ 10 MB; files ≤ 20 MB) and sent as the parts the gateway
    can carry. The send is logged like any other (`wecast log --contact CONTACT`).
    """
    from engine.media import MediaError
    from engine.message_spec import Attachment, FileAttachment, ImageAttachment
    from engine.messages import PartKind

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
        counts = "  ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
        out.print(f"run {summary.run_id}: [bold]{summary.status}[/bold]  {counts}")
        if summary.message and summary.message != "done":
            out.print(f"  {escape(summary.message)}")
    if summary.counts.get(DeliveryStatus.FAILED) or summary.counts.get(DeliveryStatus.UNKNOWN):
        sys.exit(EXIT_ERROR)


def _chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


# -- contacts ----------------------------------------------------------------------------------------


@main.group()
def contacts() -> None:
    """Customers: sync from WeCom, list and filter."""


@contacts.command("sync")
@pass_ctx
def contacts_sync(ctx: Ctx) -> None:
    """Pull every customer and tag from the gateway into the database."""

    async def go(app: Wecast) -> SyncResult:
        status = await app.gateway.login_status()
        if not status.logged_in:
            raise WecastError("the WeCom account is not logged in; run `wecast login` first")
        with _progress() as progress:
            task = progress.add_task("syncing contacts", total=None)
            return await app.sync(progress=lambda n, total: progress.update(task, completed=n, total=total))

    r = _run(_with_app(ctx, go))
    out.print(f"contacts: {r.seen} listed, {r.added} new, {r.updated} changed, {r.removed} removed; {r.tags} tags")


@contacts.command("list")
@click.option("--tag", "tags", multiple=True, help="only contacts with this tag (repeatable: all of them)")
@click.option(
    "--where",
    "wheres",
    multiple=True,
    metavar="FIELD=VALUE",
    help="field filter, e.g. city=上海 or gender=female (repeatable)",
)
@click.option("--limit", default=50, show_default=True, help="0: all")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def contacts_list(ctx: Ctx, tags: tuple[str, ...], wheres: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List synced contacts, filtered by tag and field."""
    from engine.audience import RuleError, parse_rules, select
    from engine.clock import SystemClock
    from engine.views import ContactView
    from storage.contacts import ContactFilter, load_contact_views, page_contacts
    from storage.db import make_db_engine

    rules = []
    for w in wheres:
        field, sep, value = w.partition("=")
        if not sep:
            raise click.BadParameter(f"{w!r}: write FIELD=VALUE", param_hint="--where")
        rules.append({field.strip(): value.strip()})
    try:
        rule = parse_rules(rules) if rules else None
    except RuleError as exc:
        raise click.BadParameter(exc.reason, param_hint="--where") from None
    db = make_db_engine(ctx.settings.database_url)
    try:
        views = load_contact_views(db)
        # Friends only (others cannot receive messages), coworkers included: everyone a campaign could reach.
        chosen = select(views, tags_all=tags, rules=rule, now=SystemClock().now(), include_coworkers=True).recipients
        shown = chosen[:limit] if limit else chosen
        if as_json:
            ids = [c["id"] for c in shown]
            rows = page_contacts(db, ContactFilter(ids=ids), limit=max(1, len(ids))).rows if ids else []
            _print_json([ContactView.from_row(r) for r in rows])
            return
    finally:
        db.dispose()
    table = Table("id", "name", "remark", "gender", "city", "tags", "added")
    for c in shown:
        table.add_row(
            c["id"],
            escape(c["name"]),
            escape(c["alias"]),
            {1: "男", 2: "女"}.get(c["gender"], ""),
            c["city"],
            escape(", ".join(c["tags_named"])),
            c["added_at"].date().isoformat() if c.get("added_at") else "",
        )
    out.print(table)
    out.print(
        f"{len(chosen)} of {len(views)} contacts match"
        + (f" (showing {len(shown)})" if len(shown) < len(chosen) else "")
    )
    if not views:
        out.print("[dim]no contacts yet: run `wecast contacts sync`[/dim]")


# -- runs / log --------------------------------------------------------------------------------------


@main.command()
@click.option("--campaign", help="only this campaign id")
@click.option("--status", type=click.Choice([s.value for s in RunStatus]))
@click.option("--limit", default=30, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def runs(ctx: Ctx, campaign: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """Run history with per-status counts."""
    from engine.views import RunView
    from storage.db import make_db_engine
    from storage.deliveries import status_counts
    from storage.runs import list_runs

    db = make_db_engine(ctx.settings.database_url)
    try:
        found = list_runs(db, campaign_id=campaign, status=RunStatus(status) if status else None, limit=limit)
        rows = [RunView.from_row(r, status_counts(db, r.id)) for r in found]
    finally:
        db.dispose()
    if as_json:
        _print_json(rows)
        return
    tz = ctx.settings.tz
    table = Table("run", "campaign", "run key", "trigger", "status", "sent", "failed", "skipped", "open", "created")
    for r in rows:
        c = r.counts
        table.add_row(
            str(r.id),
            r.campaign_id,
            r.run_key,
            r.trigger,
            r.status,
            str(c.get(DeliveryStatus.SENT, 0)),
            str(c.get(DeliveryStatus.FAILED, 0) + c.get(DeliveryStatus.UNKNOWN, 0)),
            str(c.get(DeliveryStatus.SKIPPED, 0)),
            str(sum(c.get(s, 0) for s in OPEN_STATUSES)),
            _local(r.created_at, tz),
        )
    out.print(table)


@main.command()
@click.argument("run_id", type=int)
@pass_ctx
def pause(ctx: Ctx, run_id: int) -> None:
    """Pause a run: nothing more is sent (sends in flight finish) until `wecast resume RUN_ID`.

    Works on a run being sent by `wecast serve` or another `wecast run`: they notice before their next send.
    """
    app = _app(ctx)
    try:
        app.pause_run(run_id, "paused from the command line")
    finally:
        app.db.dispose()
    out.print(f"run {run_id} paused")


@main.command()
@click.argument("run_id", type=int)
@pass_ctx
def cancel(ctx: Ctx, run_id: int) -> None:
    """Cancel a run: its unsent deliveries are skipped and recorded as cancelled."""
    app = _app(ctx)
    try:
        skipped = app.cancel_run(run_id, "cancelled from the command line")
        waiting = app.gateway.capabilities.batch_send and app.task_ids(run_id)
    finally:
        app.db.dispose()
    out.print(f"run {run_id} cancelled; {skipped} unsent deliveries skipped")
    if waiting:  # 群发 tasks staff have not all confirmed: stop them in WeCom too
        tasks, left = _run(_with_app(ctx, lambda a: a.cancel_tasks(run_id)))
        out.print(
            f"  {tasks} 群发 task(s) cancelled in WeCom: {left.failed} unsent messages stopped, "
            f"{left.sent} had already gone out"
        )


@main.command()
@click.argument("run_id", type=int, required=False)
@pass_ctx
def reconcile(ctx: Ctx, run_id: int | None) -> None:
    """Collect the results of 群发 tasks (of one run, or of every run waiting for staff): deliveries staff have
    confirmed become sent, or failed with WeCom's reason; a run with nothing left open completes."""
    found = _run(_with_app(ctx, lambda app: app.reconcile(run_id)))
    if not found:
        out.print("no run is waiting for 群发 tasks")
    for each, r in found.items():
        line = f"run {each}: {r.tasks} task(s): {r.sent} sent, {r.failed} failed, {r.waiting} still waiting for staff"
        if r.unreadable:
            line += f" ({r.unreadable} task(s) could not be read this time; see the log)"
        out.print(line)


@main.command()
@click.argument("run_id", type=int)
@pass_ctx
def remind(ctx: Ctx, run_id: int) -> None:
    """Remind staff to confirm a run's 群发 tasks in WeCom (WeCom allows 3 reminders per task per 24 hours)."""
    reminded, problems = _run(_with_app(ctx, lambda app: app.remind(run_id)))
    out.print(f"run {run_id}: reminded the staff of {reminded} task(s)")
    for problem in problems:
        err.print(f"  {escape(problem)}")
    if problems and not reminded:
        raise SystemExit(EXIT_ERROR)


@main.command()
@click.argument("run_id", type=int)
@click.option("--no-wait", is_flag=True, help="don't wait for login or quiet hours; leave those sends pending")
@pass_ctx
def resume(ctx: Ctx, run_id: int, no_wait: bool) -> None:
    """Resume a paused (or interrupted) run and send what is left."""
    login_wait = 0.0 if no_wait else ctx.settings.sending.login_wait.total_seconds()

    async def go(app: Wecast) -> list[RunSummary]:
        app.reopen_run(run_id)
        return await app.resume(run_id, login_wait=login_wait, quiet_wait_max=0.0 if no_wait else None, confirm_wait=0)

    [summary] = _run(_with_app(ctx, go))
    counts = "  ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    out.print(f"run {summary.run_id}: [bold]{summary.status}[/bold]  {counts}")
    if summary.message and summary.message != "done":
        out.print(f"  {escape(summary.message)}")


@main.command("log")
@click.option("--campaign", help="campaign id")
@click.option("--run", "run_id", type=int, help="run id")
@click.option(
    "--status",
    type=click.Choice([s.value for s in DeliveryStatus]),
)
@click.option("--contact", help="contact id")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
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
    """The delivery log, newest first."""
    from engine.views import DeliveryView
    from storage.db import make_db_engine
    from storage.deliveries import list_deliveries, list_parts

    db = make_db_engine(ctx.settings.database_url)
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
    tz = ctx.settings.tz
    table = Table("id", "run", "campaign", "contact", "status", "tries", "when", "message / reason")
    for d in rows:
        detail = d.reason or d.last_error if d.status is not DeliveryStatus.SENT else d.text
        table.add_row(
            str(d.id),
            str(d.run_id),
            d.campaign_id,
            f"{d.contact_id} {escape(d.contact_name)}",
            d.status,
            str(d.attempts),
            _local(d.sent_at or d.updated_at, tz),
            escape((detail or "")[:80]),
        )
    out.print(table)


def _local(value: datetime | None, tz: tzinfo) -> str:
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if value else ""


# -- login / logout ----------------------------------------------------------------------------------


@main.command()
@click.option("--timeout", default=600, show_default=True, help="seconds to wait for the scan and the code")
@pass_ctx
def login(ctx: Ctx, timeout: int) -> None:
    """Log the WeCom account in: scan the QR with WeCom on the phone, then type the 6-digit code."""
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
                out.print(f"already logged in as {escape(status.account_name or status.account_id or '')}")
                return
            shown_key = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                status = await gw.login_status()
                if status.logged_in:
                    out.print(f"[green]logged in[/green] as {escape(status.account_name or status.account_id or '')}")
                    return
                if status.qr_url and status.qrcode_key != shown_key:
                    shown_key = status.qrcode_key
                    out.print(qr_terminal(status.qr_url), end="")
                    out.print(f"{escape(status.message)}\nqrcodeKey: {status.qrcode_key}")
                if status.state is LoginState.WAITING_VERIFY_CODE:
                    code = await loop.run_in_executor(
                        None, lambda: click.prompt("verification code shown on the phone")
                    )
                    try:
                        status = await gw.submit_verify_code(code, status.qrcode_key)
                    except LoginError as exc:
                        err.print(f"[red]{escape(str(exc))}[/red]")
                    continue
                await gw.wait_for_login(1.0)
            raise WecastError("login timed out; run `wecast login` again")

    _run(go())


@main.command()
@pass_ctx
def logout(ctx: Ctx) -> None:
    """Log the WeCom account out (to switch accounts; `wecast login` shows a new QR)."""

    async def go(app: Wecast) -> LoginStatus:
        return await app.gateway.logout()

    status = _run(_with_app(ctx, go))
    out.print(f"logged out ({status.state.value})")


# -- serve -------------------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="address to bind (default from config: 127.0.0.1)")
@click.option("--port", type=int, help="port (default from config: 9898)")
@pass_ctx
def serve(ctx: Ctx, host: str | None, port: int | None) -> None:
    """Run the HTTP API (the source document's endpoints + /api/v1) and the campaign scheduler."""
    from engine.web.server import serve as run_server

    sys.exit(run_server(ctx.settings, host=host, port=port))


# -- sandbox -----------------------------------------------------------------------------------------


@main.group()
def sandbox() -> None:
    """The simulated account (gateway: sandbox)."""


@sandbox.command("outbox")
@click.option("--contact", help="only messages to this contact id")
@click.option("--limit", default=30, show_default=True, help="0: all")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def sandbox_outbox(ctx: Ctx, contact: str | None, limit: int, as_json: bool) -> None:
    """Messages the sandbox's customers received (newest last)."""
    from engine.gateways.sandbox import SandboxStore

    store = SandboxStore(ctx.settings.sandbox.state_file)
    messages = store.messages(contact)
    store.close()
    shown = messages[-limit:] if limit else messages
    if as_json:
        _print_json(shown)
        return
    table = Table("message id", "contact", "sent at (UTC)", "text")
    for m in shown:
        table.add_row(m.message_id, m.contact_id, m.sent_at[:19], escape(m.text))
    out.print(table)
    out.print(f"{len(messages)} message(s) in the sandbox outbox ({ctx.settings.sandbox.state_file})")


@main.command("config")
@pass_ctx
def show_config(ctx: Ctx) -> None:
    """Show the effective configuration (secrets hidden)."""
    s = ctx.settings
    data = json.loads(s.model_dump_json())
    data["database_url"] = redact_url(s.database_url)
    out.print(f"# from {s.source}")
    out.print_json(json.dumps(data, ensure_ascii=False))


if __name__ == "__main__":  # pragma: no cover
    main()
