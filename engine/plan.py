"""Planning: who gets what in a run, and the dry-run preview that shows it before anything is sent.

`_steps` is the single place the audience is selected, deduplicated, capped and rendered, a chunk of contacts at
a time (in id order; `CHUNK` contacts per step); the preview adds its steps up, and `plan_run` writes exactly
what they decide: one pending delivery per recipient, and a skipped delivery (with the reason) for each contact
the audience named but a policy held back — dedupe, frequency cap, exclusion lists, missing data — all in one
transaction. Each step is selected and rendered, and inserted while the next one renders (on PostgreSQL the
server ingests one chunk while Python renders the next), so neither a plan nor a preview holds the audience in
memory: a million recipients plan within the memory of two steps. A preview keeps
its counts complete and lists everyone, or a bounded sample (`keep`). Re-planning the same run changes nothing:
the run's (campaign, run_key) and each delivery's dedupe key are unique in the database.

Run keys name the schedule slot a run belongs to (`2026-11-23T02:00:00Z`), so a manual `wecast run` in the
same week as the scheduler's firing is the *same* run and sends nothing twice. A campaign without a
schedule (or before its first slot) gets one manual run key per local day.
"""

from __future__ import annotations

import gc
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import NamedTuple

from sqlalchemy.engine import Connection, Engine

from engine import audience as aud
from engine.audience import OPTED_OUT_REASON, ExclusionCategory, ReasonCode
from engine.contacts import require_whole_list
from engine.errors import NotFoundError, TemplateError
from engine.i18n import tr
from engine.message_spec import (
    Check,
    RenderedMessages,
    describe_problem_counts,
    describe_problems,
    render_messages,
)
from engine.messages import Message
from engine.render import describe_missing, describe_missing_counts
from engine.runsettings import RunSettings
from engine.schedule import build_trigger, latest_fire_time, next_fire_times
from engine.spec import Campaign
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import optouts as optouts_db
from storage import runs as runs_db
from storage.db import snapshot, transaction
from storage.deliveries import Planned
from storage.models import KEY_SEPARATOR, MAX_RUN_KEY, fit_key
from storage.runs import NewRun, RunRow

CHUNK = contacts_db.VIEW_CHUNK  # contacts per step of a plan or preview (see the module docstring)


class Recipient(NamedTuple):
    contact_id: str
    name: str
    text: str  # the text part ('' when the message has none)
    message: Message | None = None  # the whole message, when it is more than its text

    def full_message(self) -> Message:
        return self.message if self.message is not None else Message.of_text(self.text)


class Excluded(NamedTuple):
    contact_id: str
    name: str
    reason: str  # in words (the language in force when the preview was built)
    code: ReasonCode

    @property
    def category(self) -> ExclusionCategory:
        return self.code.category

    @property
    def stored_reason(self) -> str:
        """The reason as a skipped delivery records it: `code: words` (see `storage.models.Delivery.reason`)."""
        return f"{self.code}: {self.reason}"

    @property
    def recorded(self) -> bool:
        """Written as a skipped delivery when planned (audience mismatches are not)."""
        return self.category.recorded


@dataclass(frozen=True)
class TaskPlan:
    """The 群发 tasks a run would submit on a task-based gateway, as the dispatcher will group them (one task per
    staff member and distinct message, split at the gateway's maximum): how many each staff member must confirm
    in WeCom. Staff '' are customers with no staff member (on the official API no task can reach them)."""

    by_staff: dict[str, int]
    recipients: int

    @property
    def total(self) -> int:
        return sum(self.by_staff.values())

    @property
    def one_per_customer(self) -> bool:
        """Personalisation turns the campaign into (nearly) one task per customer: at least half as many tasks as
        customers, and more than one per staff member — each to be confirmed by hand."""
        return self.recipients > 1 and self.total > len(self.by_staff) and 2 * self.total >= self.recipients

    def warnings(self) -> list[str]:
        out = []
        if self.one_per_customer:
            out.append(
                tr(
                    "personalisation makes {tasks} 群发 tasks for {customers} customers (about one task per customer), "
                    "and staff confirm each task by hand in WeCom: send one text to everyone (no per-customer fields) "
                    "to need one task per staff member",
                    tasks=self.total,
                    customers=self.recipients,
                )
            )
        if self.by_staff.get(""):
            out.append(
                tr(
                    "{n} task(s) are for customers no staff member follows (sync contacts first): "
                    "WeCom cannot send them",
                    n=self.by_staff[""],
                )
            )
        return out


class _TaskCount:
    """Counts the 群发 tasks recipients make (see TaskPlan), as many at a time as planning streams: each customer
    under their leading staff member, grouped by message (by its hash: a personalised campaign's million texts are
    not kept), each group split at the gateway's maximum."""

    def __init__(self, max_batch: int) -> None:
        self.size = max(1, max_batch)
        self.groups: Counter[tuple[str, int]] = Counter()
        self.recipients = 0

    def add(self, recipients: Iterable[tuple[str, str]], follows: Mapping[str, Sequence[str]]) -> None:
        """Recipients as (contact id, their message: its text, or a rich message's content hash)."""
        for cid, content in recipients:
            self.groups[(next(iter(follows.get(cid, ())), ""), hash(content))] += 1
            self.recipients += 1

    def plan(self) -> TaskPlan:
        by_staff: Counter[str] = Counter()
        for (staff, _), count in self.groups.items():
            by_staff[staff] += -(-count // self.size)
        return TaskPlan(dict(sorted(by_staff.items())), self.recipients)


def plan_tasks(recipients: Sequence[Recipient], follows: Mapping[str, Sequence[str]], max_batch: int) -> TaskPlan:
    """The tasks `recipients` make (see TaskPlan), each customer under their leading staff member."""
    count = _TaskCount(max_batch)
    count.add(((r.contact_id, _content(r.text, r.message)) for r in recipients), follows)
    return count.plan()


def _content(text: str, message: Message | None) -> str:
    """What makes two messages one 群发 task: the text of a plain one, the content of any other."""
    return text if message is None else message.content_hash()


@dataclass(repr=False)
class Preview:
    """What a run does, or would do: counts of everything, and the recipients and excluded contacts themselves —
    all of them, or (`keep`, see `build_preview`) a bounded sample, so a preview of a million contacts does not hold
    a million messages. The counts are always complete."""

    campaign: Campaign
    run_key: str
    now: datetime
    total_contacts: int
    recipients: list[Recipient]  # every recipient in id order, or the first `keep` (`recipient_count` counts all)
    excluded: list[Excluded]  # every contact left out, or the first `keep` held back and the first `keep` not targeted
    recipient_count: int = 0
    excluded_count: int = 0
    by_category: Counter[ExclusionCategory] = field(default_factory=Counter)
    distinct_messages: int = 0  # how many different messages the recipients get (a task-based gateway's tasks)
    missing: dict[str, list[str]] = field(default_factory=dict)  # field -> ids lacking it (at most `keep` each)
    missing_counts: dict[str, int] = field(default_factory=dict)  # field -> how many lack it
    too_long: list[str] = field(default_factory=list)  # ids whose message is over max_length (at most `keep`)
    too_long_count: int = 0
    failed: dict[tuple[int, Check], list[str]] = field(default_factory=dict)  # fields failing their checks
    failed_counts: dict[tuple[int, Check], int] = field(default_factory=dict)
    unrendered: int = 0  # recipients left without a message by those problems, each counted once
    unknown_ids: list[str] = field(default_factory=list)
    unknown_tags: list[str] = field(default_factory=list)
    known_tags: list[str] = field(default_factory=list)  # every tag name contacts have (for "did you mean")
    next_fires: list[datetime] = field(default_factory=list)
    existing_run: RunRow | None = None
    tasks: TaskPlan | None = None  # task-based gateways: the 群发 tasks staff must confirm (`plan_tasks`)

    def __repr__(self) -> str:
        return (
            f"Preview({self.campaign.id!r}, run_key={self.run_key!r}, recipients={self.recipient_count}, "
            f"excluded={self.excluded_count})"
        )

    @property
    def complete(self) -> bool:
        """Whether `recipients` and `excluded` list everyone (not a sample)."""
        return len(self.recipients) == self.recipient_count and len(self.excluded) == self.excluded_count

    def excluded_by_category(self) -> Counter[ExclusionCategory]:
        return Counter(self.by_category)

    def problems(self) -> list[TemplateError]:
        """Errors that stop a run: recipients lacking template fields, messages over the length limit, message
        fields that render empty, too long or not https."""
        out: list[TemplateError] = []
        total = self.recipient_count + self.unrendered
        if self.missing_counts:
            out.append(
                TemplateError(describe_missing_counts(self.missing_counts, total), self.campaign.compiled.origin)
            )
        out.extend(
            describe_problem_counts(self.campaign.compiled, self.too_long_count, self.failed_counts, total=total)
        )
        return out

    def raise_for_problems(self) -> None:
        problems = self.problems()
        if problems:
            first = problems[0]
            if len(problems) > 1:
                raise TemplateError(first.reason + "; " + problems[1].reason, first.location, problems=problems)
            raise first


def run_key_for(campaign: Campaign, now: datetime, explicit: str | None = None) -> str:
    """The run a manual or API start at `now` belongs to (see the module docstring)."""
    if explicit:
        return explicit
    if campaign.schedule is not None:
        trigger = build_trigger(campaign.schedule, campaign.tz)
        if campaign.schedule.at is not None:
            fires = next_fire_times(trigger, datetime(1970, 1, 2, tzinfo=UTC), 1)
            if fires:
                return slot_key(fires[0])
        last = latest_fire_time(trigger, now)
        if last is not None:
            return slot_key(last)
    return "manual-" + now.astimezone(campaign.tz).date().isoformat()


def one_off_slot(campaign: Campaign) -> datetime | None:
    """The time of a one-off campaign's only slot (`schedule: {at: ...}`, aware), None for every other schedule."""
    if campaign.schedule is None or campaign.schedule.at is None:
        return None
    at = campaign.schedule.at
    return at if at.tzinfo else at.replace(tzinfo=campaign.tz)


def future_slot(campaign: Campaign, now: datetime, explicit: str | None = None) -> datetime | None:
    """The one-off slot a start at `now` would send ahead of its time (None: the run belongs to now or the past).
    A manual run of it must say so (`wecast run --now`): otherwise a greeting set for the 31st goes out today."""
    slot = one_off_slot(campaign)
    return slot if explicit is None and slot is not None and slot > now else None


def slot_key(fire: datetime) -> str:
    return fire.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_key_problem(key: str) -> str | None:
    """What is wrong with a run key a person or client gives (`wecast run --run-key`, the API's Idempotency-Key), in
    the reader's language, or None. Beyond MAX_RUN_KEY characters it would not stay whole in its keys' heads; with
    KEY_SEPARATOR in it, one delivery key could name two runs and contacts (run key `a|b` for contact `c` and run key
    `a` for contact `b|c`), the second contact then skipped as "already sent"."""
    if len(key) > MAX_RUN_KEY:
        return tr("at most {n} characters (this one has {found})", n=MAX_RUN_KEY, found=len(key))
    if KEY_SEPARATOR in key:
        return tr("may not contain '{sep}': it separates the parts of a delivery's key", sep=KEY_SEPARATOR)
    return None


def dedupe_key(campaign: Campaign, run_key: str, contact_id: str) -> str:
    """The ledger key of one contact's delivery in one run (fitted to its column: a long run key or contact id)."""
    return fit_key(_key_prefix(campaign, run_key) + contact_id)


def _key_prefix(campaign: Campaign, run_key: str) -> str:
    """What the dedupe keys of a run start with, before `fit_key`: + the contact id."""
    return f"{campaign.id}|once|" if campaign.dedupe == "once" else f"{campaign.id}|{run_key}|"


def run_settings(campaign: Campaign) -> RunSettings:
    """How the campaign's run is sent, frozen at plan time so a resumed run behaves as planned."""
    return RunSettings(
        name=campaign.name,
        timezone=campaign.timezone,
        interval=campaign.throttle.interval,
        max_errors=campaign.max_errors,
        frequency_cap=campaign.frequency_cap,
        quiet_hours=campaign.quiet_hours,
        notify=campaign.notify,
    )


class _Policies:
    """What a run holds back beyond the audience — opt-outs, dedupe, the dedupe window, the frequency cap — asked
    of the database a chunk at a time (only for the chunk's contacts, so memory stays bounded by the chunk), and
    only when there can be anything to find."""

    def __init__(
        self,
        conn: Connection,
        campaign: Campaign,
        key: str,
        now: datetime,
        *,
        policies: bool,
        existing_run: RunRow | None,
    ) -> None:
        self.conn = conn
        self.campaign = campaign
        self.key = key
        self.local = campaign.tz
        self.check_opt_outs = optouts_db.any_opted_out(conn)
        self.check_held = policies and (campaign.dedupe != "run" or existing_run is not None)
        window = campaign.dedupe_window if policies else None
        self.window_since = now - window if window else None
        self.cap = campaign.frequency_cap if policies else None
        self.cap_window: tuple[datetime, datetime] | None = None
        self.exclude_run = existing_run.id if existing_run else None
        if self.cap is not None:
            start, end = self.cap.window(now, campaign.tz)
            # Nothing capped was handed over in the window (the usual first run of the day): nothing to count.
            if deliveries_db.any_capped_between(conn, start, end, exclude_run=self.exclude_run):
                self.cap_window = (start, end)
        self.active = bool(self.check_opt_outs or self.check_held or self.window_since or self.cap_window)

    def apply(self, chosen: list[aud.ContactView], excluded: list[Excluded]) -> list[aud.ContactView]:
        """The chosen contacts the policies let through; the others are added to `excluded` with the reason."""
        if not self.active or not chosen:
            return chosen
        conn, campaign, key, local = self.conn, self.campaign, self.key, self.local
        ids = [c["id"] for c in chosen]
        suppressed = optouts_db.opted_out(conn, ids) if self.check_opt_outs else set()
        held = (
            deliveries_db.held_by_keys(conn, [dedupe_key(campaign, key, cid) for cid in ids]) if self.check_held else {}
        )
        recent = deliveries_db.last_sends(conn, campaign.id, self.window_since, ids) if self.window_since else {}
        counts: dict[str, int] = {}
        cap = self.cap
        if cap is not None and self.cap_window is not None:
            counts = deliveries_db.cap_counts(conn, *self.cap_window, ids, exclude_run=self.exclude_run)
        if not (suppressed or held or recent or counts):
            return chosen
        eligible: list[aud.ContactView] = []
        for c in chosen:
            cid = c["id"]
            name = str(c.get("name") or "")
            if cid in suppressed:
                excluded.append(Excluded(cid, name, tr(OPTED_OUT_REASON), ReasonCode.OPTED_OUT))
                continue
            held_by = held.get(dedupe_key(campaign, key, cid)) if held else None
            if held_by is not None:
                fields = {"status": held_by.status.value, "run": held_by.run_id, "dedupe": campaign.dedupe}
                why = (
                    tr(
                        "already {status} in run {run} on {at} (dedupe: {dedupe})",
                        at=_local(held_by.sent_at, local),
                        **fields,
                    )
                    if held_by.sent_at
                    else tr("already {status} in run {run} (dedupe: {dedupe})", **fields)
                )
                excluded.append(Excluded(cid, name, why, ReasonCode.DEDUPE))
                continue
            last = recent.get(cid)
            if last is not None:
                excluded.append(
                    Excluded(
                        cid,
                        name,
                        tr(
                            "got this campaign on {at}, within the dedupe window {window}",
                            at=_local(last, local),
                            window=campaign.dedupe,
                        ),
                        ReasonCode.DEDUPE_WINDOW,
                    )
                )
                continue
            if cap is not None and cap.reached(counts.get(cid, 0)):
                excluded.append(Excluded(cid, name, cap.reason(counts[cid]), ReasonCode.FREQUENCY_CAP))
                continue
            eligible.append(c)
        return eligible


@dataclass
class _Step:
    """One chunk of contacts decided: who gets which message, who is left out (with why), and what failed."""

    contacts: int  # contacts read in this chunk
    recipients: list[aud.ContactView]  # in id order
    rendered: RenderedMessages  # the recipients' messages (and who could not get one)
    excluded: list[Excluded]


def _steps(
    conn: Connection,
    campaign: Campaign,
    key: str,
    now: datetime,
    *,
    policies: bool,
    existing_run: RunRow | None,
    selector: aud.Selector,
    rendering: Callable[[], None] | None = None,
) -> Iterator[_Step]:
    """The plan, a chunk of contacts at a time, in id order: select -> hold back (policies) -> render. The one
    place the audience is selected, deduplicated, capped and rendered: preview and planning both consume it.
    `rendering` is called when a chunk's reads are done and before it is rendered (the connection is left alone
    from then until the step is taken: `plan_run` writes the step before meanwhile)."""
    held_back = _Policies(conn, campaign, key, now, policies=policies, existing_run=existing_run)
    compiled = campaign.compiled.for_zone(campaign.timezone)
    meta = {"id": campaign.id, "name": campaign.name}
    local_now = now.astimezone(campaign.tz)
    skip_missing = campaign.message.on_missing_field == "skip"
    for views in contacts_db.contact_view_chunks(conn, columns=needed_columns(campaign), chunk=CHUNK):
        chosen, left_out = selector.take(views)
        excluded = [Excluded(e.contact_id, e.name, e.reason, e.code) for e in left_out]
        eligible = held_back.apply(chosen, excluded)
        if rendering is not None:
            rendering()
        rendered = render_messages(compiled, eligible, campaign=meta, now=local_now)
        if rendered.missing and skip_missing:
            lacking: dict[str, list[str]] = {}
            for fname, ids in rendered.missing.items():
                for cid in ids:
                    lacking.setdefault(cid, []).append(fname)
            for c in eligible:
                fields = lacking.get(c["id"])
                if fields is not None:
                    excluded.append(
                        Excluded(
                            c["id"],
                            str(c.get("name") or ""),
                            tr("lacks {fields}, used by the template", fields=", ".join(fields)),
                            ReasonCode.MISSING_FIELD,
                        )
                    )
            rendered.missing = {}
        texts = rendered.texts
        recipients = eligible if len(texts) == len(eligible) else [c for c in eligible if c["id"] in texts]
        yield _Step(len(views), recipients, rendered, excluded)


class _Tally:
    """Adds up a plan's steps into a Preview: every count, and the recipients and exclusions themselves up to
    `keep` of each (None: all)."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self.total = 0
        self.recipients: list[Recipient] = []
        self.recipient_count = 0
        self.excluded: list[Excluded] = []
        self.targeted_out = 0  # audience exclusions kept (they share `keep` among themselves)
        self.held_out = 0  # the other exclusions kept
        self.excluded_count = 0
        self.by_category: Counter[ExclusionCategory] = Counter()
        self.distinct: set[int] = set()
        self.missing: dict[str, list[str]] = {}
        self.missing_counts: Counter[str] = Counter()
        self.too_long: list[str] = []
        self.too_long_count = 0
        self.failed: dict[tuple[int, Check], list[str]] = {}
        self.failed_counts: Counter[tuple[int, Check]] = Counter()
        self.unrendered = 0

    def _room(self, held: int) -> bool:
        return self.keep is None or held < self.keep

    def add(self, step: _Step) -> None:
        self.total += step.contacts
        rendered = step.rendered
        texts, messages = rendered.texts, rendered.messages
        self.recipient_count += len(step.recipients)
        # Distinct messages, by hash: a million personal texts are a million ints here, not a million strings.
        if messages:
            self.distinct.update(hash(m.content_hash()) for m in messages.values())
        else:
            self.distinct.update(map(hash, texts.values()))
        if self._room(len(self.recipients)):
            for c in step.recipients[: None if self.keep is None else self.keep - len(self.recipients)]:
                cid = c["id"]
                self.recipients.append(Recipient(cid, str(c.get("name") or ""), texts[cid], messages.get(cid)))
        self.excluded_count += len(step.excluded)
        # In contact order (a step lists the audience's exclusions before the policies'): the same order whatever
        # the chunk size.
        excluded = sorted(step.excluded, key=_contact) if self._room(min(self.targeted_out, self.held_out)) else ()
        for e in step.excluded:
            self.by_category[e.code.category] += 1
        for e in excluded:
            targeted = e.code.category is ExclusionCategory.AUDIENCE
            if self._room(self.targeted_out if targeted else self.held_out):
                self.excluded.append(e)
                if targeted:
                    self.targeted_out += 1
                else:
                    self.held_out += 1
        problems: set[str] = set(rendered.too_long)
        for name, ids in rendered.missing.items():
            self.missing_counts[name] += len(ids)
            kept = self.missing.setdefault(name, [])
            kept += ids[: None if self.keep is None else max(0, self.keep - len(kept))]
            problems.update(ids)
        self.too_long_count += len(rendered.too_long)
        self.too_long += rendered.too_long[: None if self.keep is None else max(0, self.keep - len(self.too_long))]
        for check, ids in rendered.failed.items():
            self.failed_counts[check] += len(ids)
            kept = self.failed.setdefault(check, [])
            kept += ids[: None if self.keep is None else max(0, self.keep - len(kept))]
            problems.update(ids)
        self.unrendered += len(problems)

    @property
    def has_problems(self) -> bool:
        return bool(self.missing_counts or self.too_long_count or self.failed_counts)

    def preview(
        self,
        campaign: Campaign,
        key: str,
        now: datetime,
        selector: aud.Selector,
        known_tags: Sequence[str],
        existing_run: RunRow | None,
    ) -> Preview:
        next_fires: list[datetime] = []
        if campaign.schedule is not None and campaign.enabled:
            next_fires = next_fire_times(build_trigger(campaign.schedule, campaign.tz), now, 5)
        return Preview(
            campaign=campaign,
            run_key=key,
            now=now,
            total_contacts=self.total,
            recipients=self.recipients,
            excluded=self.excluded,
            recipient_count=self.recipient_count,
            excluded_count=self.excluded_count,
            by_category=self.by_category,
            distinct_messages=len(self.distinct),
            missing=self.missing,
            missing_counts=dict(self.missing_counts),
            too_long=self.too_long,
            too_long_count=self.too_long_count,
            failed=self.failed,
            failed_counts=dict(self.failed_counts),
            unrendered=self.unrendered,
            unknown_ids=selector.unknown_ids,
            unknown_tags=selector.unknown_tags,
            known_tags=sorted(known_tags),
            next_fires=next_fires,
            existing_run=existing_run,
        )


def _contact(e: Excluded) -> str:
    return e.contact_id


def _selector(campaign: Campaign, now: datetime, known_tags: Sequence[str]) -> aud.Selector:
    a = campaign.audience
    return aud.Selector(
        ids=a.ids,
        tags_any=a.tags_any,
        tags_all=a.tags_all,
        tags_none=a.tags_none,
        rules=campaign.rules,
        exclude_ids=a.exclude_ids,
        limit=a.limit,
        include_coworkers=a.include_coworkers,
        now=now,
        known_tags=known_tags,
    )


def build_preview(
    db: Engine,
    campaign: Campaign,
    *,
    now: datetime,
    run_key: str | None = None,
    policies: bool = True,
    keep: int | None = None,
    task_batch: int | None = None,
) -> Preview:
    """Everything a run would do, computed without writing anything (read in one snapshot of the database), a
    chunk of contacts at a time; a contact list that a sync left half-written is refused
    (`engine.contacts.require_whole_list`). `keep`: how many recipients, and how many exclusions of each kind (held
    back, not targeted), to list (None: all; the counts are complete either way). `task_batch`: on a task-based
    gateway (at most this many recipients a task), also count the 群发 tasks each staff member would have to
    confirm (`Preview.tasks`). `policies=False` leaves out what depends on earlier sends (dedupe, the frequency
    cap): validation checks the template against everyone the targeting selects, whatever was sent today."""
    key = run_key_for(campaign, now, run_key)
    with _old_objects_left_alone(), snapshot(db) as conn:
        if policies:
            require_whole_list(conn)  # never who a half-done sync happened to write
        known_tags = contacts_db.tag_names(conn)
        existing_run = runs_db.find_run(conn, campaign.id, key)
        selector = _selector(campaign, now, known_tags)
        tally = _Tally(keep)
        tasks = _TaskCount(task_batch) if task_batch is not None else None
        for step in _steps(
            conn,
            campaign,
            key,
            now,
            policies=policies,
            existing_run=existing_run,
            selector=selector,
        ):
            tally.add(step)
            if tasks is not None:
                ids = [c["id"] for c in step.recipients]
                texts, messages = step.rendered.texts, step.rendered.messages
                tasks.add(
                    ((cid, _content(texts[cid], messages.get(cid))) for cid in ids),
                    contacts_db.follow_users(conn, ids),
                )
    preview = tally.preview(campaign, key, now, selector, known_tags, existing_run)
    preview.tasks = tasks.plan() if tasks is not None else None
    return preview


def _local(at: datetime, zone: tzinfo) -> str:
    return f"{at.astimezone(zone):%Y-%m-%d %H:%M}"


ALWAYS_READ = frozenset({"id", "name", "friend", "coworker"})
DERIVED_FROM = {"display_name": {"alias", "name"}, "honorific": {"gender"}, "phone": {"phones"}}


def needed_columns(campaign: Campaign) -> set[str] | None:
    """The contact columns a campaign's audience and template read (None: all of them)."""
    names = campaign.compiled.names
    if "contact" in names:
        return None
    cols = set(ALWAYS_READ)
    if campaign.rules is not None:
        cols |= campaign.rules.fields
    for name in names:
        cols |= DERIVED_FROM.get(name, {name})
    return cols


_frozen_lock = threading.Lock()
_frozen_plans = 0  # plans and previews under way in this process (see `_old_objects_left_alone`)


@contextmanager
def _old_objects_left_alone() -> Iterator[None]:
    """Plan or preview with the objects alive before it started out of the cyclic garbage collector's way
    (`gc.freeze`, undone when the last plan in the process ends). Streaming a big audience keeps a few containers
    alive per contact of a step (rows, views, row tuples), and every few thousand of them the collector runs; its
    full passes traversed the whole long-lived heap each time (the modules, SQLAlchemy's and pydantic's
    structures): 0.15-0.25 s of a 100,000-recipient plan on SQLite, against 0.02 s for the objects the plan itself
    made. What the plan makes is collected as before; garbage older than the plan waits for its end."""
    global _frozen_plans
    with _frozen_lock:
        if _frozen_plans == 0:
            gc.freeze()
        _frozen_plans += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_plans -= 1
            if _frozen_plans == 0:
                gc.unfreeze()


@dataclass
class PlanResult:
    run_id: int
    run_key: str
    created: bool
    planned: int = 0
    skipped: int = 0
    preview: Preview | None = None  # what this call planned (None when the run existed already)


def _pending(step: _Step) -> tuple[list[str], list[str], list[str], list[str | None] | None]:
    """A step's recipients as pending deliveries, column by column (see `storage.deliveries.PlanWriter.pending`):
    contact ids, names, texts, and each one's whole message as JSON unless the messages are plain text."""
    texts, messages = step.rendered.texts, step.rendered.messages
    ids = [c["id"] for c in step.recipients]
    names = [c.get("name") or "" for c in step.recipients]
    body = list(map(texts.__getitem__, ids))
    if not messages:  # plain text (a message is stored as its text alone)
        return ids, names, body, None
    return ids, names, body, [None if (m := messages.get(cid)) is None else m.dumps() for cid in ids]


def plan_run(
    db: Engine,
    campaign: Campaign,
    *,
    now: datetime,
    run_key: str | None = None,
    trigger: str = "manual",
    keep: int | None = 0,
) -> PlanResult:
    """Write the run and its deliveries in one transaction (or return the run that already exists), streaming:
    each chunk of contacts is selected and rendered, and inserted while the next one renders, so memory is bounded
    by the chunk, not the audience. A problem found anywhere (a field a recipient lacks, a message too long) raises
    TemplateError and rolls everything back: nothing is half-planned. `keep`: recipients and exclusions the
    returned preview lists (see `build_preview`; its counts are always complete)."""
    key = run_key_for(campaign, now, run_key)
    with _old_objects_left_alone():
        try:
            return _plan(db, campaign, key, now, trigger, keep, careful=False)
        except deliveries_db.PlanConflict:
            # Another planner took some of these dedupe keys after this plan looked (the fast path copies rows
            # straight in, and cannot pass over one): everything was rolled back; plan again the careful way, which
            # holds those contacts back as already planned.
            return _plan(db, campaign, key, now, trigger, keep, careful=True)


def _plan(
    db: Engine, campaign: Campaign, key: str, now: datetime, trigger: str, keep: int | None, *, careful: bool
) -> PlanResult:
    scheduled_for = None
    if not key.startswith("manual-"):
        try:
            scheduled_for = datetime.strptime(key, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            scheduled_for = None
    settings = run_settings(campaign)
    with transaction(db) as conn:
        # The run first: its row takes the write lock, and a run planned before (or by a concurrent planner, who
        # then holds the lock until it commits) is found here, before any work.
        run_id, created = runs_db.create_run(
            conn,
            NewRun(
                campaign_id=campaign.id,
                run_key=key,
                trigger=trigger,
                timezone=campaign.timezone,
                settings=settings.to_json(),
                created_at=now,
                campaign_file=str(campaign.file),
                campaign_hash=campaign.content_hash,
                scheduled_for=scheduled_for,
            ),
        )
        if not created:
            return PlanResult(run_id, key, created=False)
        require_whole_list(conn)  # never who a half-done sync happened to write (raising rolls the run back)
        known_tags = contacts_db.tag_names(conn)
        selector = _selector(campaign, now, known_tags)
        tally = _Tally(keep)
        writer = deliveries_db.PlanWriter(
            conn,
            run_id,
            campaign.id,
            key_prefix=_key_prefix(campaign, key),
            capped=settings.capped,
            now=now,
            with_messages=not campaign.compiled.plain_text,
            careful=careful,
        )
        try:
            # Chunk k is written while chunk k+1 renders: `_steps` calls `writer.start` once k+1 is read, and the
            # connection is free again (`wait`) before k+2 is read. PostgreSQL ingests in its own process while
            # Python renders, so on two cores the plan takes about the longer of the two, not their sum.
            for step in _steps(
                conn, campaign, key, now, policies=True, existing_run=None, selector=selector, rendering=writer.start
            ):
                writer.wait()
                tally.add(step)
                if tally.has_problems:
                    continue  # the plan will not be written: count the rest for the error, write nothing more
                writer.pending(*_pending(step))
                writer.skipped(
                    Planned(e.contact_id, e.name, "", None, e.stored_reason) for e in step.excluded if e.recorded
                )
            writer.start()
            writer.wait()
        finally:
            writer.close()
        preview = tally.preview(campaign, key, now, selector, known_tags, None)
        preview.raise_for_problems()  # inside the transaction: rolls back the run and every delivery written
        runs_db.set_plan_counts(conn, run_id, planned=writer.pending_count, skipped=writer.skipped_count)
    return PlanResult(
        run_id, key, created=True, planned=writer.pending_count, skipped=writer.skipped_count, preview=preview
    )


API_CAMPAIGN = "api"  # the campaign id of direct sends' runs
# A test send's dedupe keys start with this (not with its campaign's id): outside the campaign's dedupe and history.
TEST_PREFIX = "test|"


def plan_adhoc(
    db: Engine,
    *,
    messages: Sequence[tuple[str, Message]],
    run_key: str,
    now: datetime,
    timezone: str,
    throttle_interval: float = 0.0,
    trigger: str = "api",
    names: Mapping[str, str] | None = None,
    campaign_id: str = API_CAMPAIGN,
) -> PlanResult:
    """A run for a direct send — the HTTP API's /send-message and /send-message-all, `wecast send`, or a campaign's
    test send (`plan_test_send`): a message for each of the given contacts, no audience rules, not counted against
    the marketing frequency cap, sent at any hour. `run_key` is the client's Idempotency-Key (or a fresh id), so a
    retried request plans nothing new."""
    unique = list(dict(messages).items())
    name = names or {}
    settings = RunSettings(name=campaign_id, timezone=timezone, interval=throttle_interval)
    prefix = f"{API_CAMPAIGN}|" if campaign_id == API_CAMPAIGN else f"{TEST_PREFIX}{campaign_id}|"
    recorded = runs_db.record_plan(
        db,
        NewRun(
            campaign_id=campaign_id,
            run_key=run_key,
            trigger=trigger,
            timezone=timezone,
            settings=settings.to_json(),
            created_at=now,
            planned=len(unique),
        ),
        [
            Planned(
                cid,
                name.get(cid, ""),
                message.text,
                fit_key(f"{prefix}{run_key}|{cid}"),
                message=None if message.is_plain_text() else message.dumps(),
            )
            for cid, message in unique
        ],
        capped=False,
        adhoc=True,
    )
    return PlanResult(
        recorded.run_id, run_key, created=recorded.created, planned=len(unique) if recorded.created else 0
    )


def plan_test_send(db: Engine, campaign: Campaign, contact_ids: Sequence[str], *, now: datetime) -> PlanResult:
    """A test send of a campaign (`wecast run CAMPAIGN --test-to ID,ID`): its exact message, rendered for each named
    contact whether or not the audience picks them, in a run of its own marked `test` — outside the campaign's
    dedupe (its keys start with `test|`), not counted by the frequency cap, sent at any hour, and never touching
    the campaign's real runs. Raises NotFoundError for an unknown contact, TemplateError when a contact lacks a
    field or a field fails its checks."""
    wanted = list(dict.fromkeys(contact_ids))
    views = {c["id"]: c for c in contacts_db.load_contact_views(db, columns=needed_columns(campaign), ids=wanted)}
    unknown = [cid for cid in wanted if cid not in views]
    if unknown:
        raise NotFoundError(tr("no contact {id} (see `wecast contacts list`)", id=", ".join(unknown)))
    chosen = [views[cid] for cid in wanted]
    rendered = render_messages(
        campaign.compiled.for_zone(campaign.timezone),
        chosen,
        campaign={"id": campaign.id, "name": campaign.name},
        now=now.astimezone(campaign.tz),
    )
    if rendered.missing:
        raise TemplateError(describe_missing(rendered.missing, len(wanted)), campaign.compiled.origin)
    problems = describe_problems(campaign.compiled, rendered.too_long, rendered.failed, total=len(wanted))
    if problems:
        raise problems[0]
    return plan_adhoc(
        db,
        messages=[(cid, rendered.message(cid)) for cid in wanted],
        run_key=f"test-{now.astimezone(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}",
        now=now,
        timezone=campaign.timezone,
        throttle_interval=campaign.throttle.interval,
        trigger="test",
        names={cid: str(views[cid].get("name") or "") for cid in wanted},
        campaign_id=campaign.id,
    )
