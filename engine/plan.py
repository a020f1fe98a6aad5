"""Planning: who gets what in a run, and the dry-run preview that shows it before anything is sent.

`build_preview` is the single place the audience is selected, deduplicated, capped and rendered; the
preview shows its result, and `plan_run` writes exactly that result: one pending delivery per recipient,
and a skipped delivery (with the reason) for each contact the audience named but a policy held back —
dedupe, frequency cap, exclusion lists, missing data — all in one transaction. Re-planning the same run
changes nothing: the run's (campaign, run_key) and each delivery's dedupe key are unique in the database.

Run keys name the schedule slot a run belongs to (`2026-11-23T02:00:00Z`), so a manual `wecast run` in the
same week as the scheduler's firing is the *same* run and sends nothing twice. A campaign without a
schedule (or before its first slot) gets one manual run key per local day.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

from sqlalchemy.engine import Engine

from engine import audience as aud
from engine.audience import OPTED_OUT_REASON, ExclusionCategory, ReasonCode
from engine.contacts import require_whole_list
from engine.errors import NotFoundError, TemplateError
from engine.i18n import tr
from engine.message_spec import Check, describe_problems, render_messages
from engine.messages import Message
from engine.render import describe_missing
from engine.runsettings import RunSettings
from engine.schedule import build_trigger, latest_fire_time, next_fire_times
from engine.spec import Campaign
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import optouts as optouts_db
from storage import runs as runs_db
from storage.contacts import ContactView
from storage.db import snapshot
from storage.deliveries import Planned
from storage.models import DeliveryStatus
from storage.runs import NewRun, RunRow


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


def plan_tasks(recipients: Sequence[Recipient], follows: Mapping[str, Sequence[str]], max_batch: int) -> TaskPlan:
    """The tasks `recipients` make (see TaskPlan), each customer under their leading staff member."""
    groups: Counter[tuple[str, str]] = Counter()
    for r in recipients:
        staff = next(iter(follows.get(r.contact_id, ())), "")
        groups[(staff, r.message.content_hash() if r.message is not None else r.text)] += 1
    by_staff: Counter[str] = Counter()
    size = max(1, max_batch)
    for (staff, _), count in groups.items():
        by_staff[staff] += -(-count // size)
    return TaskPlan(dict(sorted(by_staff.items())), len(recipients))


@dataclass(repr=False)
class Preview:
    campaign: Campaign
    run_key: str
    now: datetime
    total_contacts: int
    recipients: list[Recipient]
    excluded: list[Excluded]
    missing: dict[str, list[str]] = field(default_factory=dict)
    too_long: list[str] = field(default_factory=list)
    failed: dict[tuple[int, Check], list[str]] = field(default_factory=dict)  # fields failing their checks
    unknown_ids: list[str] = field(default_factory=list)
    unknown_tags: list[str] = field(default_factory=list)
    known_tags: list[str] = field(default_factory=list)  # every tag name contacts have (for "did you mean")
    next_fires: list[datetime] = field(default_factory=list)
    existing_run: RunRow | None = None
    tasks: TaskPlan | None = None  # task-based gateways: the 群发 tasks staff must confirm (`plan_tasks`)

    def __repr__(self) -> str:
        return (
            f"Preview({self.campaign.id!r}, run_key={self.run_key!r}, recipients={len(self.recipients)}, "
            f"excluded={len(self.excluded)})"
        )

    @property
    def distinct_messages(self) -> int:
        """How many different messages the recipients get (a task-based gateway sends one task per message)."""
        return len({r.message.content_hash() if r.message is not None else r.text for r in self.recipients})

    def excluded_by_category(self) -> Counter[ExclusionCategory]:
        return Counter(e.category for e in self.excluded)

    def problems(self) -> list[TemplateError]:
        """Errors that stop a run: recipients lacking template fields, messages over the length limit, message
        fields that render empty, too long or not https."""
        out: list[TemplateError] = []
        lacking: set[str] = set().union(*self.missing.values())  # a recipient may lack several fields
        checked: set[str] = set(self.too_long).union(*self.failed.values())
        total = len(self.recipients) + len(lacking | checked)
        if self.missing:
            out.append(TemplateError(describe_missing(self.missing, total), self.campaign.compiled.origin))
        out.extend(describe_problems(self.campaign.compiled, self.too_long, self.failed, total=total))
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


def slot_key(fire: datetime) -> str:
    return fire.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dedupe_key(campaign: Campaign, run_key: str, contact_id: str) -> str:
    if campaign.dedupe == "once":
        return f"{campaign.id}|once|{contact_id}"
    return f"{campaign.id}|{run_key}|{contact_id}"


def run_settings(campaign: Campaign) -> RunSettings:
    """How the campaign's run is sent, frozen at plan time so a resumed run behaves as planned."""
    return RunSettings(
        name=campaign.name,
        timezone=campaign.timezone,
        interval=campaign.throttle.interval,
        max_errors=campaign.max_errors,
        frequency_cap=campaign.frequency_cap,
        quiet_hours=campaign.quiet_hours,
    )


def build_preview(
    db: Engine,
    campaign: Campaign,
    *,
    now: datetime,
    run_key: str | None = None,
    contacts: list[ContactView] | None = None,
    policies: bool = True,
) -> Preview:
    """Everything a run would do, computed without writing anything (read in one snapshot of the database); a
    contact list that a sync left half-written is refused (`engine.contacts.require_whole_list`).
    `policies=False` leaves out what depends on earlier sends (dedupe, the frequency cap): validation checks the
    template against everyone the targeting selects, whatever was sent today."""
    key = run_key_for(campaign, now, run_key)
    cap = campaign.frequency_cap if policies else None
    with snapshot(db) as conn:
        if policies and contacts is None:
            require_whole_list(conn)  # never who a half-done sync happened to write
        views = (
            contacts if contacts is not None else contacts_db.load_contact_views(conn, columns=needed_columns(campaign))
        )
        known_tags = contacts_db.tag_names(conn)
        suppressed = optouts_db.opted_out(conn)
        existing_run = runs_db.find_run(conn, campaign.id, key)
        held = (
            deliveries_db.held_keys(conn, campaign.id)
            if policies and (campaign.dedupe != "run" or existing_run)
            else {}
        )
        window = campaign.dedupe_window if policies else None
        recent = deliveries_db.last_sends(conn, campaign.id, now - window) if window else {}
        counts: dict[str, int] = {}
        if cap is not None:
            start, end = cap.window(now, campaign.tz)
            counts = deliveries_db.cap_counts(conn, start, end, exclude_run=existing_run.id if existing_run else None)
    a = campaign.audience
    selection = aud.select(
        views,
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
    excluded = [Excluded(e.contact_id, e.name, e.reason, e.code) for e in selection.excluded]
    eligible: list[Mapping[str, Any]] = []
    local = campaign.tz
    for c in selection.recipients:
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
    rendered = render_messages(
        campaign.compiled.for_zone(campaign.timezone),
        eligible,
        campaign={"id": campaign.id, "name": campaign.name},
        now=now.astimezone(local),
    )
    missing: dict[str, list[str]] = {}
    recipients: list[Recipient] = []
    skip_missing = campaign.message.on_missing_field == "skip"
    lacking_by_id: dict[str, list[str]] = {}
    for fname, ids in rendered.missing.items():
        for cid in ids:
            lacking_by_id.setdefault(cid, []).append(fname)
    if not skip_missing:
        missing = rendered.missing
    messages = rendered.messages
    for c in eligible:
        cid = c["id"]
        name = str(c.get("name") or "")
        text = rendered.texts.get(cid)
        if text is not None:
            recipients.append(Recipient(cid, name, text, messages.get(cid)))
        elif cid in lacking_by_id and skip_missing:
            excluded.append(
                Excluded(
                    cid,
                    name,
                    tr("lacks {fields}, used by the template", fields=", ".join(lacking_by_id[cid])),
                    ReasonCode.MISSING_FIELD,
                )
            )
    next_fires: list[datetime] = []
    if campaign.schedule is not None and campaign.enabled:
        next_fires = next_fire_times(build_trigger(campaign.schedule, campaign.tz), now, 5)
    return Preview(
        campaign=campaign,
        run_key=key,
        now=now,
        total_contacts=len(views),
        recipients=recipients,
        excluded=excluded,
        missing=missing,
        too_long=rendered.too_long,
        failed=rendered.failed,
        unknown_ids=selection.unknown_ids,
        unknown_tags=selection.unknown_tags,
        known_tags=sorted(known_tags),
        next_fires=next_fires,
        existing_run=existing_run,
    )


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


@dataclass
class PlanResult:
    run_id: int
    run_key: str
    created: bool
    planned: int = 0
    skipped: int = 0
    preview: Preview | None = None


def plan_run(
    db: Engine,
    campaign: Campaign,
    *,
    now: datetime,
    run_key: str | None = None,
    trigger: str = "manual",
    preview: Preview | None = None,
) -> PlanResult:
    """Write the run and its deliveries in one transaction (or return the run that already exists)."""
    preview = preview or build_preview(db, campaign, now=now, run_key=run_key)
    if preview.existing_run is not None:
        return PlanResult(preview.existing_run.id, preview.run_key, created=False, preview=preview)
    preview.raise_for_problems()
    key = preview.run_key
    scheduled_for = None
    if not key.startswith("manual-"):
        try:
            scheduled_for = datetime.strptime(key, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            scheduled_for = None
    settings = run_settings(campaign)
    held_back = [e for e in preview.excluded if e.recorded]
    recorded = runs_db.record_plan(
        db,
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
            planned=len(preview.recipients),
            skipped_at_plan=len(held_back),
        ),
        (
            Planned(
                r.contact_id,
                r.name,
                r.text,
                dedupe_key(campaign, key, r.contact_id),
                message=r.message.dumps() if r.message is not None else None,
            )
            for r in preview.recipients
        ),
        (Planned(e.contact_id, e.name, "", None, e.stored_reason) for e in held_back),
        capped=settings.capped,
        with_messages=not campaign.compiled.plain_text,
    )
    if not recorded.created:  # planned concurrently by another process: theirs stands
        return PlanResult(recorded.run_id, key, created=False, preview=preview)
    return PlanResult(
        recorded.run_id,
        key,
        created=True,
        planned=recorded.counts.get(DeliveryStatus.PENDING, 0),
        skipped=recorded.counts.get(DeliveryStatus.SKIPPED, 0),
        preview=preview,
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
                f"{prefix}{run_key}|{cid}",
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
    views = {c["id"]: c for c in contacts_db.load_contact_views(db, columns=needed_columns(campaign))}
    unknown = [cid for cid in wanted if cid not in views]
    if unknown:
        raise NotFoundError(f"no contact {', '.join(unknown)} (see `wecast contacts list`)")
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
