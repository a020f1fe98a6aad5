"""The journey commands of `wecast` (registered by engine.cli, which hands over its consoles and helpers in a
`Kit`, so this module never imports it back):

    wecast preview JOURNEY [--contact ID] [--assume replied|message:T|tag:X|untag:X|optout|removed[@2d]]
                                   the steps as a tree, who would enter now, a contact's dry-run timeline
    wecast journeys [--contact ID] journeys with their counts (or a contact's path through each)
    wecast journeys show ID        one journey's tree with the contacts at each step
    wecast contacts optouts | optout ID | optin ID    the suppression list: show it, put on, take off
    wecast sandbox event add-contact [--name N] | message ID TEXT | tag ID TAG [--remove] | remove ID
                                   simulated customers (the sandbox gateway; a running `wecast serve` sees them)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import NotFoundError, WecastError
from engine.i18n import N_, ntr, tr

if TYPE_CHECKING:
    from engine.journeys.overview import ContactJourneys, JourneySummary
    from engine.journeys.preview import EntryPreview, StepNode, Timeline
    from engine.journeys.spec import Journey
    from engine.service import Wecast
    from engine.settings import Settings

T = TypeVar("T")


class HasSettings(Protocol):
    @property
    def settings(self) -> Settings: ...


@dataclass(frozen=True)
class Kit:
    """What the journey commands borrow from engine.cli: its groups, consoles and helpers."""

    main: click.Group
    contacts: click.Group
    sandbox: click.Group
    out: Console
    err: Console
    table: Callable[..., Table]
    with_app: Callable[[Any, Callable[[Wecast], Awaitable[Any]]], Awaitable[Any]]
    print_json: Callable[[object], None]
    short: Callable[[datetime | None, tzinfo], str]


STATUS_NAMES = {
    "active": N_("active"),
    "sending": N_("sending"),
    "completed": N_("completed"),
    "exited": N_("exited"),
}
STEP_KINDS = {
    "send": N_("Send"),
    "wait": N_("Wait"),
    "if": N_("If"),
    "tag": N_("Tag"),
    "goto": N_("Go to journey"),
    "exit": N_("Exit"),
}
BRANCHES = {"then": N_("then"), "else": N_("else"), "on_timeout": N_("on timeout")}
OUTCOMES = {
    "sent": N_("sent"),
    "skipped": N_("skipped"),
    "failed": N_("failed"),
    "unknown": N_("unknown"),
    "waited": N_("waited"),
    "event": N_("event came"),
    "timeout": N_("timed out"),
    "then": N_("then"),
    "else": N_("else"),
    "tagged": N_("tagged"),
    "goto": N_("went to journey"),
    "exit": N_("exit step"),
    "completed": N_("completed"),
    "exited": N_("exited"),
}


def _status(value: str) -> str:
    return tr(STATUS_NAMES[value]) if value in STATUS_NAMES else value


def _counts(counts: dict[str, int]) -> str:
    return tr(", ").join(f"{_status(k)} {v}" for k, v in sorted(counts.items())) or "-"


def load_journeys(settings: Settings) -> tuple[list[Journey], int]:
    """The journeys of campaigns_dir that load, and how many files have errors."""
    from engine.definitions import load_definitions
    from engine.spec import campaign_files

    directory = settings.campaigns_dir
    files = campaign_files([directory]) if directory.is_dir() else []
    defs = load_definitions(files, settings)
    return defs.journeys, len(defs.errors)


def find_journey(settings: Settings, journey_id: str) -> Journey:
    journeys, _ = load_journeys(settings)
    for j in journeys:
        if j.id == journey_id:
            return j
    raise NotFoundError(
        tr("no journey {id!r} in {folder} (see `wecast journeys`)", id=journey_id, folder=settings.campaigns_dir)
    )


# -- preview -----------------------------------------------------------------------------------------------


def preview_journey(
    kit: Kit, ctx: HasSettings, journey: Journey, contact: str | None, assume: Sequence[str], as_json: bool, show: int
) -> None:
    """`wecast preview JOURNEY`: the tree, who would enter now, and with --contact the dry-run timeline."""
    from engine.journeys import preview as pv

    assumptions = [pv.Assumption.parse(a) for a in assume]
    if assumptions and contact is None:
        raise click.UsageError(tr("--assume goes with --contact (what that contact does during the dry run)"))

    async def go(app: Wecast) -> tuple[EntryPreview, Timeline | None]:
        from engine.blocking import off_loop

        await app.ensure_contacts()
        now = app.clock.now()
        entry = await off_loop(pv.entry_preview, app.db, journey, now, sample=None if as_json or not show else show)
        line = None
        if contact is not None:
            targets = {j.id: j for j in (await off_loop(load_journeys, app.settings))[0]}
            line = await off_loop(
                lambda: pv.timeline(app.db, journey, contact, now, assume=assumptions, journeys=targets)
            )
        return entry, line

    entry, line = asyncio_run(kit.with_app(ctx, go))
    nodes = pv.tree(journey)
    if as_json:
        kit.print_json(
            {
                "journey": journey.id,
                "name": journey.name,
                "timezone": journey.timezone,
                "trigger": journey.trigger.kind.value,
                "trigger_text": pv.describe_trigger(journey),
                "entry": journey.entry.kind.value,
                "entry_text": pv.describe_entry(journey),
                "exit_when": [c.text for c in journey.exit_when],
                "steps": nodes,
                "enter_now": entry,
                "timeline": line,
            }
        )
        return
    out = kit.out
    _header(kit, journey)
    out.print(styled("bold", tr("Steps")))
    print_tree(out, nodes)
    _print_entry(kit, journey, entry, show)
    if line is not None:
        print_timeline(kit, line)


def asyncio_run(coro: Awaitable[T]) -> T:
    import asyncio

    async def wrap() -> T:
        return await coro

    return asyncio.run(wrap())


def styled(style: str, text: str) -> str:
    return f"[{style}]{text}[/{style}]"


def _header(kit: Kit, journey: Journey) -> None:
    from engine.journeys import preview as pv

    out = kit.out
    out.print(f"[bold]{escape(journey.name)}[/bold] ({journey.id})  " + tr("zone {zone}", zone=journey.timezone))
    out.print(tr("starts when: {trigger}", trigger=escape(pv.describe_trigger(journey))))
    out.print(tr("entry: {entry}", entry=pv.describe_entry(journey)))
    if journey.exit_when:
        out.print(tr("leaves when: {conditions}", conditions=escape("; ".join(c.text for c in journey.exit_when))))
    if not journey.enabled:
        out.print(styled("yellow", tr("disabled: the engine does not run it")))


def print_tree(out: Console, nodes: Sequence[StepNode], depth: int = 1) -> None:
    """Steps one per line, branches indented under their step; counts when the nodes have them."""
    pad = "  " * depth
    for n in nodes:
        kind = tr(STEP_KINDS[n.kind])
        if n.transactional:
            kind += tr(" (transactional)")
        counts = ""
        if n.here is not None:
            counts = "  " + styled("dim", tr("{here} here, passed {passed}", here=n.here, passed=n.passed or 0))
        lines = n.text.splitlines() or [""]
        first = lines[0] + (" …" if len(lines) > 1 else "")
        out.print(f"{pad}{kind} [cyan]{n.id}[/cyan]  {escape(first)}{counts}")
        for b in n.branches:
            out.print(f"{pad}  {tr(BRANCHES[b.label])}:")
            if b.steps:
                print_tree(out, b.steps, depth + 2)
            else:
                out.print(f"{pad}    " + styled("dim", tr("(nothing: carries on)")))


def _print_entry(kit: Kit, journey: Journey, e: EntryPreview, show: int) -> None:
    out = kit.out
    tz = journey.tz
    by_cat = tr(", ").join(f"{_category(k)} {v}" for k, v in sorted(e.by_category.items()))
    counts = tr(
        "contacts {total}  →  entering {entering}  left out {excluded}",
        total=e.contacts,
        entering=styled("green", str(e.entering)),
        excluded=e.excluded,
    ) + (f" ({by_cat})" if by_cat else "")
    if e.mode == "schedule" or e.mode == "date":
        when = f"{e.at.astimezone(tz):%Y-%m-%d %H:%M}" if e.at else "-"
        out.print(styled("bold", tr("Who would enter at the next fire ({time})", time=when)))
    elif e.mode == "backfill":
        out.print(styled("bold", tr("Who would enter now (backfill, when the journey is first loaded)")))
    else:
        out.print(
            styled(
                "bold",
                tr(
                    "Who could enter: nobody enters without the trigger; "
                    "when it comes, the audience and entry policy decide"
                ),
            )
        )
    out.print(counts, soft_wrap=False)
    limit = show or None
    if e.entrants and e.mode != "event":
        names = tr(", ").join(f"{x.id} {escape(x.name)}" for x in e.entrants[:limit])
        more = e.entering - len(e.entrants[:limit])
        out.print(tr("entering: {names}", names=names) + (" " + tr("… and {n} more", n=more) if more > 0 else ""))
    if e.left_out:
        table = kit.table(tr("contact"), tr("name"), tr("why not"), title=tr("Left out"))
        table.columns[0].no_wrap = True
        table.columns[2].overflow = "fold"
        for x in e.left_out[:limit]:
            table.add_row(x.id, escape(x.name), escape(x.reason))
        out.print(table)
        if limit and e.excluded > limit:
            out.print(styled("dim", tr("… and {n} more", n=e.excluded - limit)))
    if e.next_fires:
        out.print(
            tr(
                "next fire times: {times}",
                times=tr(", ").join(f"{t.astimezone(tz):%Y-%m-%d %H:%M}" for t in e.next_fires),
            )
        )


def _category(key: str) -> str:
    return tr(CATEGORY[key]) if key in CATEGORY else key


CATEGORY = {
    "audience": N_("not targeted"),
    "exclusion": N_("excluded"),
    "dedupe": N_("already entered"),
    "opted_out": N_("opted out"),
}


def print_timeline(kit: Kit, line: Timeline) -> None:
    from engine.journeys.preview import OUTCOME_NAMES

    out = kit.out
    out.print(
        styled("bold", tr("Dry run for {contact} {name} from now", contact=line.contact, name=escape(line.name)))
        + "  "
        + styled("dim", tr("(times in {zone}; nothing is sent)", zone=line.timezone))
    )
    if line.assumptions:
        out.print(tr("assuming the customer: {what}", what=escape(tr("; ").join(line.assumptions))))
    else:
        out.print(
            styled("dim", tr("assuming the customer does nothing (--assume replied, tag:TAG@2d, … to change that)"))
        )
    table = kit.table(tr("local time"), tr("step"), tr("what happens"))
    table.show_lines = True
    table.columns[0].no_wrap = True
    table.columns[2].overflow = "fold"
    for e in line.entries:
        what = tr(OUTCOME_NAMES[e.outcome])
        if e.detail:
            what += f": {e.detail}"
        if e.message is not None:
            what += "\n" + e.message
            extra = [p for p in (e.parts or []) if p.get("kind") != "text"]
            what += "".join(
                f"\n+ {p.get('kind')} {p.get('title') or p.get('name') or p.get('url') or ''}" for p in extra
            )
        step = e.step if e.journey == line.journey else f"{e.journey} › {e.step}"
        table.add_row(e.local, escape(step), escape(what))
    out.print(table)
    ends = {
        "completed": tr("ends: completes the journey"),
        "exited": tr("ends: exits the journey"),
        "goto": tr("ends: leaves at a goto the dry run does not follow (see above)"),
        "loop": tr("ends: goes back to a journey shown above"),
        "waiting": tr("ends: still waiting when the dry run stops"),
        "not_entered": tr("ends: would not enter"),
    }[line.ends]
    out.print(ends + "  " + ntr("({n} message)", "({n} messages)", line.sends))


# -- the commands ----------------------------------------------------------------------------------------------


def register(kit: Kit) -> None:
    """Add the journey, opt-out and sandbox-event commands to the CLI's groups."""
    out = kit.out

    @kit.main.group(
        "journeys",
        cls=type(kit.contacts),  # a plain subgroup (main's own class would choose the language again, from no args)
        invoke_without_command=True,
        help=N_(
            "Journeys with the contacts in them: trigger, entry policy, contacts active and finished, counts per step. "
            "`wecast journeys show ID` draws one as a tree; --contact ID shows a contact's path through each."
        ),
    )
    @click.option("--contact", help=N_("a contact's path through each journey instead"))
    @click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
    @click.pass_context
    def journeys(click_ctx: click.Context, contact: str | None, as_json: bool) -> None:
        if click_ctx.invoked_subcommand is not None:
            return
        ctx = click_ctx.obj
        from engine.journeys import overview

        found, broken = load_journeys(ctx.settings)
        db = _db(ctx.settings)
        try:
            if contact is not None:
                path = overview.contact_journeys(db, contact, {j.id: j.name for j in found})
                if as_json:
                    kit.print_json(path)
                else:
                    _print_path(kit, ctx.settings.tz, path)
                return
            items = overview.summaries(db, found)
        finally:
            db.dispose()
        if as_json:
            kit.print_json(items)
            return
        _print_list(kit, items, broken)

    @journeys.command(
        "show", help=N_("One journey: its steps as a tree with the contacts at each step, its recent entries.")
    )
    @click.argument("journey_id")
    @click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
    @click.pass_obj
    def journeys_show(ctx: HasSettings, journey_id: str, as_json: bool) -> None:
        from engine.journeys import overview

        journey = find_journey(ctx.settings, journey_id)
        db = _db(ctx.settings)
        try:
            d = overview.detail(db, journey)
        finally:
            db.dispose()
        if as_json:
            kit.print_json(d)
            return
        _header(kit, journey)
        out.print(
            tr("in the journey now {active}; finished: {finished}", active=d.active, finished=_counts(d.finished))
        )
        out.print(styled("bold", tr("Steps")))
        print_tree(out, d.steps)
        if d.recent:
            table = kit.table(tr("contact"), tr("step"), tr("status"), tr("next due"), title=tr("Recent entries"))
            table.columns[0].no_wrap = True
            tz = ctx.settings.tz
            for e in d.recent:
                status = _status(e.status.value) + (f" ({escape(e.reason)})" if e.reason else "")
                table.add_row(e.contact, e.step, status, kit.short(e.due_at, tz))
            out.print(table)
        else:
            out.print(tr("Nobody has entered yet."))

    # -- opt-outs --------------------------------------------------------------------------------------
    @kit.contacts.command("optouts", help=N_("The suppression list: who opted out, when and how."))
    @click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))
    @click.pass_obj
    def contacts_optouts(ctx: HasSettings, as_json: bool) -> None:
        from engine.optout_views import list_optouts

        db = _db(ctx.settings)
        try:
            rows = list_optouts(db)
        finally:
            db.dispose()
        if as_json:
            kit.print_json(rows)
            return
        if not rows:
            out.print(tr("Nobody has opted out."))
            return
        table = kit.table(tr("contact"), tr("name"), tr("since"), tr("how"))
        table.columns[0].no_wrap = True
        tz = ctx.settings.tz
        for r in rows:
            table.add_row(r.contact_id, escape(r.name), kit.short(r.opted_out_at, tz), escape(_how(r)))
        out.print(table)
        out.print(ntr("{n} contact opted out", "{n} contacts opted out", len(rows)))

    @kit.contacts.command(
        "optout",
        help=N_(
            "Put a contact on the suppression list: no campaign or journey reaches them "
            "(replies to their own messages still do)."
        ),
    )
    @click.argument("contact_id")
    @click.option("--note", default="", help=N_("why (kept with the opt-out)"))
    @click.pass_obj
    def contacts_optout(ctx: HasSettings, contact_id: str, note: str) -> None:
        from engine.optout_views import set_optout

        db = _db(ctx.settings)
        try:
            changed = set_optout(db, contact_id, True, now=_now(), note=note)
        finally:
            db.dispose()
        out.print(
            tr("{id} opted out: no campaign or journey reaches them", id=contact_id)
            if changed
            else tr("{id} had already opted out", id=contact_id)
        )

    @kit.contacts.command(
        "optin", help=N_("Take a contact off the suppression list: campaigns and journeys reach them again.")
    )
    @click.argument("contact_id")
    @click.pass_obj
    def contacts_optin(ctx: HasSettings, contact_id: str) -> None:
        from engine.optout_views import set_optout

        db = _db(ctx.settings)
        try:
            changed = set_optout(db, contact_id, False, now=_now())
        finally:
            db.dispose()
        out.print(tr("{id} opted back in", id=contact_id) if changed else tr("{id} had not opted out", id=contact_id))

    # -- simulated customers ---------------------------------------------------------------------------
    @kit.sandbox.group(
        "event",
        help=N_(
            "Simulate a customer (gateway: sandbox): a new customer adds us, writes, is tagged, leaves. "
            "A running `wecast serve` sees it within a second."
        ),
    )
    def sandbox_event() -> None:
        """The `wecast sandbox event` group."""

    def simulate(ctx: HasSettings, as_json: bool, **body: Any) -> None:
        from engine.sandbox_events import SandboxEventBody
        from engine.sandbox_events import simulate as run_it

        request = SandboxEventBody(**body)

        async def go(app: Wecast) -> Any:
            return await run_it(app.db, app.gateway, app.clock, request)

        done = asyncio_run(kit.with_app(ctx, go))
        if as_json:
            kit.print_json(done)
            return
        said = {
            "add_contact": tr("new customer {id} {name} added us", id=done.contact_id, name=escape(done.name)),
            "message": tr(
                "{id} {name} wrote: {text}", id=done.contact_id, name=escape(done.name), text=escape(done.text or "")
            ),
            "tag": tr(
                "{id} {name} was tagged {tag}", id=done.contact_id, name=escape(done.name), tag=escape(done.tag or "")
            ),
            "untag": tr(
                "{id} {name} lost tag {tag}", id=done.contact_id, name=escape(done.name), tag=escape(done.tag or "")
            ),
            "remove": tr("{id} {name} deleted us", id=done.contact_id, name=escape(done.name)),
        }[done.action]
        out.print(said)
        if done.recorded:
            out.print(styled("dim", tr("recorded for the journeys: {events}", events=", ".join(done.recorded))))
        else:
            out.print(styled("dim", tr("nothing new for the journeys (no change)")))

    json_option = click.option("--json", "as_json", is_flag=True, help=N_("machine-readable output"))

    @sandbox_event.command("add-contact", help=N_("A new customer adds the account (CONTACT_ADDED)."))
    @click.option("--name", help=N_("the customer's name (default: a made-up one)"))
    @json_option
    @click.pass_obj
    def event_add(ctx: HasSettings, name: str | None, as_json: bool) -> None:
        simulate(ctx, as_json, action="add_contact", name=name)

    @sandbox_event.command("message", help=N_("The customer writes TEXT to the account (MESSAGE)."))
    @click.argument("contact_id")
    @click.argument("text")
    @json_option
    @click.pass_obj
    def event_message(ctx: HasSettings, contact_id: str, text: str, as_json: bool) -> None:
        simulate(ctx, as_json, action="message", contact_id=contact_id, text=text)

    @sandbox_event.command(
        "tag", help=N_("Staff tag the customer with TAG (a new name makes the tag); --remove takes it off.")
    )
    @click.argument("contact_id")
    @click.argument("tag")
    @click.option("--remove", is_flag=True, help=N_("take the tag off instead"))
    @json_option
    @click.pass_obj
    def event_tag(ctx: HasSettings, contact_id: str, tag: str, remove: bool, as_json: bool) -> None:
        simulate(ctx, as_json, action="untag" if remove else "tag", contact_id=contact_id, tag=tag)

    @sandbox_event.command("remove", help=N_("The customer deletes the account (CONTACT_REMOVED)."))
    @click.argument("contact_id")
    @json_option
    @click.pass_obj
    def event_remove(ctx: HasSettings, contact_id: str, as_json: bool) -> None:
        simulate(ctx, as_json, action="remove", contact_id=contact_id)


def _now() -> datetime:
    from engine.clock import SystemClock

    return SystemClock().now()


def _db(settings: Settings) -> Any:
    from storage.db import make_db_engine

    return make_db_engine(settings.database_url)


def _how(row: Any) -> str:
    if row.source == "keyword":
        return tr("wrote {keyword!r}", keyword=row.keyword)
    if row.note:
        return tr("set by a person: {note}", note=row.note)
    return tr("set by a person")


def _print_list(kit: Kit, items: Sequence[JourneySummary], broken: int) -> None:
    out = kit.out
    if not items:
        out.print(tr("No journeys in the campaigns folder."))
    else:
        table = kit.table(tr("journey"), tr("starts when"), tr("entry"), tr("active"), tr("finished"))
        table.columns[0].no_wrap = True
        table.columns[1].overflow = "fold"
        for j in items:
            name = f"{escape(j.name)}\n[cyan]{j.id}[/cyan]" + ("" if j.enabled else "\n" + tr("(disabled)"))
            table.add_row(name, escape(j.trigger_text), j.entry_text, str(j.active), _counts(j.finished))
        out.print(table)
        for j in items:
            if j.at_step:
                steps = tr(", ").join(f"{s} {n}" for s, n in sorted(j.at_step.items()))
                out.print(tr("{id}: at each step now: {steps}", id=j.id, steps=steps))
    if broken:
        out.print(
            styled(
                "yellow",
                ntr(
                    "{n} file in the campaigns folder has errors (wecast validate)",
                    "{n} files in the campaigns folder have errors (wecast validate)",
                    broken,
                ),
            )
        )


def _print_path(kit: Kit, tz: tzinfo, path: ContactJourneys) -> None:
    out = kit.out
    if path.opted_out:
        out.print(styled("yellow", tr("{id} opted out: no campaign or journey reaches them", id=path.contact)))
    if not path.journeys:
        out.print(tr("{id} is not in any journey.", id=path.contact))
        return
    for e in path.journeys:
        status = _status(e.status.value) + (f" ({escape(e.reason)})" if e.reason else "")
        out.print(
            f"[bold]{escape(e.name)}[/bold] ({e.journey}) "
            + tr("entry {n}, entered {at}: {status}", n=e.entry, at=kit.short(e.entered_at, tz), status=status)
        )
        table = kit.table(tr("when"), tr("step"), tr("what happened"))
        table.columns[0].no_wrap = True
        table.columns[2].overflow = "fold"
        for p in e.path:
            what = tr(OUTCOMES[p.outcome]) if p.outcome in OUTCOMES else p.outcome
            if p.detail:
                what += f": {p.detail}"
            if p.message:
                what += "\n" + p.message
            table.add_row(kit.short(p.at, tz), p.step, escape(what))
        if e.path:
            out.print(table)


__all__ = ["Kit", "WecastError", "find_journey", "preview_journey", "register"]
