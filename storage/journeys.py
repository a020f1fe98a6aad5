"""Journeys' storage: the customer-event inbox, enrolments and their path, journey state, and the runs and
deliveries journey sends are planned into (tables drawn in `storage.models`; opt-outs are `storage.optouts`).

Every function takes the engine (it then runs in a transaction of its own) or a connection (the caller's
transaction). Moves of an enrolment are compare-and-set on its `version`, so two processes stepping the same
journey never both act on one enrolment; inserts that must happen once (an event, an entry, a delivery) rely on
unique keys and ignore conflicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from storage._sql import DB, aware, chunks, decode_json, insert_ignore, reading, writing
from storage.contacts import changed as contacts_changed
from storage.models import (
    CONTACTS,
    CUSTOMER_EVENTS,
    DELIVERIES,
    ENROLMENT_STEPS,
    ENROLMENTS,
    JOURNEY_STATE,
    OPEN_ENROLMENT_STATUSES,
    RUNS,
    SCHEDULE_STATE,
    TAGS,
    TERMINAL_STATUSES,
    CustomerEventKind,
    DeliveryStatus,
    EnrolmentStatus,
    RunStatus,
    fit_key,
)

JOURNEY_TRIGGER = "journey"  # the `trigger` of the runs that journey sends are planned into

_E = CUSTOMER_EVENTS.c
_N = ENROLMENTS.c
_P = ENROLMENT_STEPS.c
_J = JOURNEY_STATE.c
_D = DELIVERIES.c
_R = RUNS.c
_S = SCHEDULE_STATE.c
_C = CONTACTS.c

# Kinds that come in opposite pairs: an add and a remove of the same subject (a contact, or a tag on a contact).
_OPPOSITE = {
    CustomerEventKind.CONTACT_ADDED: CustomerEventKind.CONTACT_REMOVED,
    CustomerEventKind.CONTACT_REMOVED: CustomerEventKind.CONTACT_ADDED,
    CustomerEventKind.TAG_ADDED: CustomerEventKind.TAG_REMOVED,
    CustomerEventKind.TAG_REMOVED: CustomerEventKind.TAG_ADDED,
}


# -- the inbox -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to record. `message_id` identifies a message (the gateway's id; repeated deliveries of it are one
    event); the other kinds are identified by what they say (see `record_events`)."""

    kind: CustomerEventKind
    contact_id: str
    occurred_at: datetime
    source: str
    data: dict[str, Any] = field(default_factory=dict)
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    key: str
    kind: CustomerEventKind
    contact_id: str
    source: str
    data: dict[str, Any]
    occurred_at: datetime
    recorded_at: datetime
    processed_at: datetime | None

    @property
    def text(self) -> str:
        return str(self.data.get("text") or "")

    @property
    def tag_id(self) -> str:
        return str(self.data.get("tag_id") or "")


def _event(row: Any) -> EventRow:
    return EventRow(
        id=row.id,
        key=row.key,
        kind=CustomerEventKind(row.kind),
        contact_id=row.contact_id,
        source=row.source,
        data=decode_json(row.data) or {},
        occurred_at=aware(row.occurred_at) or datetime.min,
        recorded_at=aware(row.recorded_at) or datetime.min,
        processed_at=aware(row.processed_at),
    )


def _subject(event: NewEvent) -> str:
    if event.kind in (CustomerEventKind.TAG_ADDED, CustomerEventKind.TAG_REMOVED):
        return f"{event.contact_id}|{event.data.get('tag_id', '')}"
    return event.contact_id


def record_events(db: DB, events: Sequence[NewEvent], now: datetime) -> list[int]:
    """Record events in the inbox, once each; returns the ids of those not recorded before.

    A message is keyed by its message id. An add or a remove is keyed by its generation: the n-th time a contact
    (or a tag on a contact) was added is `contact_added|<contact>|<n-1 removals before it>`, so the same add seen
    by the gateway stream and by the next contact sync gets the same key and is recorded once, while a contact who
    deletes us and adds us again is a new event."""
    if not events:
        return []
    new_ids: list[int] = []
    with writing(db) as conn:
        for event in events:
            if event.kind is CustomerEventKind.MESSAGE:
                key = f"message|{event.contact_id}|{event.message_id}"
            else:
                opposite = _OPPOSITE[event.kind]
                generation = _count_kind(conn, event.contact_id, opposite, event)
                key = f"{event.kind.value}|{_subject(event)}|{generation}"
            # RETURNING names the row only when it was inserted (a rowcount is not reliable for this on PostgreSQL).
            new_id = conn.execute(
                _insert_ignore_stmt(conn)
                .values(
                    key=fit_key(key),
                    kind=event.kind.value,
                    contact_id=event.contact_id,
                    source=event.source,
                    data=event.data,
                    occurred_at=event.occurred_at,
                    recorded_at=now,
                    processed_at=None,
                )
                .returning(_E.id)
            ).scalar()
            if new_id is not None:
                new_ids.append(int(new_id))
    return new_ids


def _insert_ignore_stmt(conn: Connection) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    if conn.dialect.name == "postgresql":
        return postgresql.insert(CUSTOMER_EVENTS).on_conflict_do_nothing()
    return sqlite.insert(CUSTOMER_EVENTS).on_conflict_do_nothing()


def _count_kind(conn: Connection, contact_id: str, kind: CustomerEventKind, like: NewEvent) -> int:
    rows = conn.execute(select(_E.data).where(_E.contact_id == contact_id, _E.kind == kind.value)).all()
    if kind in (CustomerEventKind.TAG_ADDED, CustomerEventKind.TAG_REMOVED):
        tag = like.data.get("tag_id", "")
        return sum(1 for (data,) in rows if (decode_json(data) or {}).get("tag_id", "") == tag)
    return len(rows)


def unprocessed_events(db: DB, limit: int = 500) -> list[EventRow]:
    """The oldest events not acted on yet (served by a partial index)."""
    with reading(db) as conn:
        rows = conn.execute(select(CUSTOMER_EVENTS).where(_E.processed_at.is_(None)).order_by(_E.id).limit(limit))
        return [_event(r) for r in rows]


def has_unprocessed(db: DB) -> bool:
    with reading(db) as conn:
        return conn.execute(select(_E.id).where(_E.processed_at.is_(None)).limit(1)).first() is not None


def mark_processed(db: DB, ids: Sequence[int], now: datetime) -> None:
    with writing(db) as conn:
        for part in chunks(list(ids)):
            conn.execute(update(CUSTOMER_EVENTS).where(_E.id.in_(part)).values(processed_at=now))


def contact_events(
    db: DB, contact_ids: Sequence[str], since: datetime, kinds: Iterable[CustomerEventKind] | None = None
) -> dict[str, list[EventRow]]:
    """Each contact's events since `since` (oldest first)."""
    out: dict[str, list[EventRow]] = defaultdict(list)
    wanted = [k.value for k in kinds] if kinds is not None else None
    with reading(db) as conn:
        for part in chunks(sorted(set(contact_ids))):
            stmt = select(CUSTOMER_EVENTS).where(_E.contact_id.in_(part), _E.occurred_at >= since)
            if wanted is not None:
                stmt = stmt.where(_E.kind.in_(wanted))
            for row in conn.execute(stmt.order_by(_E.occurred_at, _E.id)):
                event = _event(row)
                out[event.contact_id].append(event)
    return dict(out)


def events_by_id(db: DB, ids: Sequence[int]) -> dict[int, EventRow]:
    out: dict[int, EventRow] = {}
    with reading(db) as conn:
        for part in chunks(sorted(set(ids))):
            for row in conn.execute(select(CUSTOMER_EVENTS).where(_E.id.in_(part))):
                out[int(row.id)] = _event(row)
    return out


def recent_events(db: DB, *, contact_id: str | None = None, limit: int = 50) -> list[EventRow]:
    with reading(db) as conn:
        stmt = select(CUSTOMER_EVENTS)
        if contact_id:
            stmt = stmt.where(_E.contact_id == contact_id)
        return [_event(r) for r in conn.execute(stmt.order_by(_E.id.desc()).limit(limit))]


# -- contacts as the journey engine reads them -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactState:
    """What a contact sync compares: is the contact listed, and its tag ids."""

    present: bool
    tag_ids: frozenset[str]


def contact_states(db: DB, ids: Sequence[str] | None = None) -> dict[str, ContactState]:
    """Every contact's (or these contacts') presence and tags: a sync diffs two of these."""
    stmt = select(_C.id, _C.tag_ids, _C.removed_at)
    out: dict[str, ContactState] = {}
    with reading(db) as conn:
        parts = [None] if ids is None else list(chunks(sorted(set(ids))))
        for part in parts:
            query = stmt if part is None else stmt.where(_C.id.in_(part))
            for cid, tags, removed in conn.execute(query):
                out[cid] = ContactState(removed is None, frozenset(decode_json(tags) or ()))
    return out


def contact_views(db: DB, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The contacts with these ids (removed ones too, with `removed_at`), as audience rules and templates read
    them: every column, `tags` (names and ids) and `tags_named`."""
    out: dict[str, dict[str, Any]] = {}
    with reading(db) as conn:
        tag_name = {r[0]: r[1] for r in conn.execute(select(TAGS.c.id, TAGS.c.name))}
        for part in chunks(sorted(set(ids))):
            for row in conn.execute(select(CONTACTS).where(_C.id.in_(part))):
                view = dict(row._mapping)
                tag_ids = sorted(decode_json(view.pop("tag_ids")) or ())
                named = tuple(tag_name[t] for t in tag_ids if t in tag_name)
                view["tags"] = frozenset(named).union(tag_ids)
                view["tags_named"] = named
                view["tag_ids"] = tag_ids
                out[view["id"]] = view
    return out


def contact_ids(db: DB, *, include_removed: bool = False) -> list[str]:
    with reading(db) as conn:
        stmt = select(_C.id)
        if not include_removed:
            stmt = stmt.where(_C.removed_at.is_(None))
        return [r[0] for r in conn.execute(stmt.order_by(_C.id))]


def tags_by_name(db: DB) -> dict[str, str]:
    """Tag name -> id (and id -> id, so either may be used)."""
    with reading(db) as conn:
        rows = conn.execute(select(TAGS.c.id, TAGS.c.name)).all()
    out = {name: tag_id for tag_id, name in rows}
    out.update({tag_id: tag_id for tag_id, _ in rows})
    return out


def set_contact_tags(db: DB, contact_id: str, tag_ids: Sequence[str], now: datetime) -> None:
    """Record a contact's tags after a journey changed them in WeCom (the tag step), so the next sync sees no
    change and the journey's next condition sees the new tags."""
    from storage.models import CONTACT_TAGS

    ids = sorted(dict.fromkeys(tag_ids))
    with writing(db) as conn:
        conn.execute(update(CONTACTS).where(_C.id == contact_id).values(tag_ids=ids, updated_at=now))
        conn.execute(delete(CONTACT_TAGS).where(CONTACT_TAGS.c.contact_id == contact_id))
        known = {r[0] for r in conn.execute(select(TAGS.c.id).where(TAGS.c.id.in_(ids)))}
        if known:
            conn.execute(insert(CONTACT_TAGS), [{"contact_id": contact_id, "tag_id": t} for t in ids if t in known])
        contacts_changed(conn)


def add_tag(db: DB, tag_id: str, name: str, group_name: str = "") -> None:
    """Remember a tag the journey created in WeCom (the next sync would bring it too)."""
    with writing(db) as conn:
        if insert_ignore(conn, TAGS, [{"id": tag_id, "name": name, "group_name": group_name, "type": 2}]):
            contacts_changed(conn)


# -- enrolments ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnrolmentRow:
    """One enrolment with every column (see `storage.models.Enrolment`)."""

    id: int
    journey_id: str
    contact_id: str
    entry: int
    trigger_key: str
    event_id: int | None
    status: EnrolmentStatus
    step: str
    due_at: datetime | None
    step_started_at: datetime | None
    delivery_key: str
    attempts: int
    version: int
    reason: str
    entered_at: datetime | None
    updated_at: datetime | None
    ended_at: datetime | None

    @property
    def open(self) -> bool:
        return self.status in OPEN_ENROLMENT_STATUSES


_ENROLMENT_FIELDS = tuple(f.name for f in fields(EnrolmentRow))


def _enrolment(values: Any) -> EnrolmentRow:
    row = {name: values[name] for name in _ENROLMENT_FIELDS}
    row["status"] = EnrolmentStatus(row["status"])
    for name in ("due_at", "step_started_at", "entered_at", "updated_at", "ended_at"):
        row[name] = aware(row[name])
    return EnrolmentRow(**row)


@dataclass(frozen=True, slots=True)
class NewEnrolment:
    journey_id: str
    contact_id: str
    trigger_key: str
    step: str
    step_started_at: datetime
    now: datetime
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class PastEntry:
    """A contact's earlier enrolment in a journey, as the entry policy reads it."""

    entry: int
    trigger_key: str
    open: bool
    entered_at: datetime | None


def past_entries(db: DB, journey_id: str, contact_ids: Sequence[str]) -> dict[str, list[PastEntry]]:
    out: dict[str, list[PastEntry]] = defaultdict(list)
    with reading(db) as conn:
        for part in chunks(sorted(set(contact_ids))):
            stmt = select(_N.contact_id, _N.entry, _N.trigger_key, _N.status, _N.entered_at).where(
                _N.journey_id == journey_id, _N.contact_id.in_(part)
            )
            for r in conn.execute(stmt.order_by(_N.entry)):
                status = EnrolmentStatus(r.status)
                out[r.contact_id].append(
                    PastEntry(r.entry, r.trigger_key, status in OPEN_ENROLMENT_STATUSES, aware(r.entered_at))
                )
    return dict(out)


def enrol(db: DB, items: Sequence[NewEnrolment]) -> list[int]:
    """Enter contacts into journeys (entry number = the contact's last + 1). A trigger that already entered a
    contact into a journey enters nothing (unique journey, contact, trigger_key). Returns the new ids.

    In bulk: per journey, one read of the contacts' earlier entries a chunk at a time, one multi-row insert and one
    read of the new ids (inside the caller's write transaction: on SQLite it holds the write lock, on PostgreSQL the
    unique constraints still refuse a concurrent duplicate, which is then skipped)."""
    new: list[int] = []
    by_journey: dict[str, list[NewEnrolment]] = defaultdict(list)
    for item in items:
        by_journey[item.journey_id].append(item)
    with writing(db) as conn:
        for journey_id, group in by_journey.items():
            last: dict[str, int] = {}
            taken: set[tuple[str, str]] = set()
            for part in chunks(sorted({i.contact_id for i in group})):
                stmt = select(_N.contact_id, _N.entry, _N.trigger_key).where(
                    _N.journey_id == journey_id, _N.contact_id.in_(part)
                )
                for contact_id, entry, trigger_key in conn.execute(stmt):
                    last[contact_id] = max(last.get(contact_id, 0), int(entry))
                    taken.add((contact_id, trigger_key))
            rows: list[dict[str, Any]] = []
            for item in group:
                key = (item.contact_id, fit_key(item.trigger_key))
                if key in taken:
                    continue
                taken.add(key)
                last[item.contact_id] = last.get(item.contact_id, 0) + 1
                rows.append(
                    {
                        "journey_id": journey_id,
                        "contact_id": item.contact_id,
                        "entry": last[item.contact_id],
                        "trigger_key": key[1],
                        "event_id": item.event_id,
                        "status": EnrolmentStatus.ACTIVE.value,
                        "step": item.step,
                        "due_at": item.now,
                        "step_started_at": item.step_started_at,
                        "delivery_key": "",
                        "attempts": 0,
                        "version": 0,
                        "reason": "",
                        "entered_at": item.now,
                        "updated_at": item.now,
                        "ended_at": None,
                    }
                )
            if not rows or not insert_ignore(conn, ENROLMENTS, rows):
                continue
            wanted = {(r["contact_id"], r["entry"], r["trigger_key"]) for r in rows}
            for part in chunks(sorted({r["contact_id"] for r in rows})):
                stmt = select(_N.id, _N.contact_id, _N.entry, _N.trigger_key).where(
                    _N.journey_id == journey_id, _N.contact_id.in_(part)
                )
                new.extend(int(r.id) for r in conn.execute(stmt) if (r.contact_id, r.entry, r.trigger_key) in wanted)
    return sorted(new)


def due_enrolments(db: DB, now: datetime, journey_ids: Sequence[str], limit: int = 1000) -> list[EnrolmentRow]:
    """Active enrolments of these journeys due by `now`, earliest first (served by the index on status, due)."""
    if not journey_ids:
        return []
    with reading(db) as conn:
        stmt = (
            select(ENROLMENTS)
            .where(
                _N.status == EnrolmentStatus.ACTIVE.value,
                _N.due_at <= now,
                _N.journey_id.in_(sorted(journey_ids)),
            )
            .order_by(_N.due_at, _N.id)
            .limit(limit)
        )
        return [_enrolment(r._mapping) for r in conn.execute(stmt)]


def next_due(db: DB, journey_ids: Sequence[str]) -> datetime | None:
    """When the next active enrolment of these journeys is due."""
    if not journey_ids:
        return None
    with reading(db) as conn:
        value = conn.execute(
            select(func.min(_N.due_at)).where(
                _N.status == EnrolmentStatus.ACTIVE.value, _N.journey_id.in_(sorted(journey_ids))
            )
        ).scalar()
    return aware(value)


def open_enrolments_of(db: DB, contact_ids: Sequence[str]) -> list[EnrolmentRow]:
    """Every open enrolment of these contacts (events wake them)."""
    out: list[EnrolmentRow] = []
    with reading(db) as conn:
        for part in chunks(sorted(set(contact_ids))):
            stmt = select(ENROLMENTS).where(
                _N.contact_id.in_(part), _N.status.in_([s.value for s in OPEN_ENROLMENT_STATUSES])
            )
            out.extend(_enrolment(r._mapping) for r in conn.execute(stmt))
    return out


def get_enrolment(db: DB, enrolment_id: int) -> EnrolmentRow | None:
    with reading(db) as conn:
        row = conn.execute(select(ENROLMENTS).where(_N.id == enrolment_id)).first()
    return _enrolment(row._mapping) if row else None


def enrolments(
    db: DB, *, journey_id: str | None = None, contact_id: str | None = None, limit: int = 100
) -> list[EnrolmentRow]:
    with reading(db) as conn:
        stmt = select(ENROLMENTS)
        if journey_id:
            stmt = stmt.where(_N.journey_id == journey_id)
        if contact_id:
            stmt = stmt.where(_N.contact_id == contact_id)
        return [_enrolment(r._mapping) for r in conn.execute(stmt.order_by(_N.id.desc()).limit(limit))]


@dataclass(frozen=True, slots=True)
class Move:
    """Where an enrolment goes: its new state, and the path entries and deliveries that come with the move.

    Applied compare-and-set on (id, version): when another process moved the enrolment first, nothing of this
    move is written."""

    id: int
    version: int
    status: EnrolmentStatus
    step: str
    due_at: datetime | None
    step_started_at: datetime | None
    now: datetime
    delivery_key: str = ""
    attempts: int = 0
    reason: str = ""
    log: tuple[PathEntry, ...] = ()
    deliveries: tuple[NewDelivery, ...] = ()


@dataclass(frozen=True, slots=True)
class PathEntry:
    step: str
    outcome: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A journey send for the ledger: pending (to send) or skipped (with the reason)."""

    run_id: int
    campaign_id: str
    contact_id: str
    contact_name: str
    text: str
    dedupe_key: str
    status: DeliveryStatus
    capped: bool
    reason: str = ""
    message: str | None = None  # the whole message as JSON, when it is more than `text`
    claim_token: str = ""  # planned claimed (status CLAIMED) by this token: a welcome the engine sends itself


_MOVE = (
    update(ENROLMENTS)
    .where(_N.id == bindparam("m_id"), _N.version == bindparam("m_version"))
    .values(
        status=bindparam("m_status"),
        step=bindparam("m_step"),
        due_at=bindparam("m_due_at"),
        step_started_at=bindparam("m_step_started_at"),
        delivery_key=bindparam("m_delivery_key"),
        attempts=bindparam("m_attempts"),
        reason=bindparam("m_reason"),
        version=bindparam("m_next_version"),
        updated_at=bindparam("m_now"),
        ended_at=bindparam("m_ended_at"),
    )
)


def apply_moves(db: DB, journey_of: dict[int, tuple[str, str]], moves: Sequence[Move]) -> list[int]:
    """Apply moves (see `Move`); `journey_of` maps enrolment id -> (journey id, contact id) for the path log.
    Returns the ids of the moves that won (the others were moved by someone else meanwhile).

    Compare-and-set in bulk: the versions are read (rows locked on PostgreSQL; SQLite's write transaction holds
    the whole database) a chunk at a time, and the winners updated in one executemany of one statement, each
    still `WHERE id = … AND version = …`."""
    won: list[int] = []
    logs: list[dict[str, Any]] = []
    deliveries: list[NewDelivery] = []
    with writing(db) as conn:
        current: dict[int, int] = {}
        for part in chunks(sorted({m.id for m in moves})):
            stmt = select(_N.id, _N.version).where(_N.id.in_(part)).with_for_update()
            current.update((int(i), int(v)) for i, v in conn.execute(stmt))
        params: list[dict[str, Any]] = []
        for move in moves:
            if current.get(move.id) != move.version:
                continue
            current[move.id] = move.version + 1
            ended = move.status not in OPEN_ENROLMENT_STATUSES
            params.append(
                {
                    "m_id": move.id,
                    "m_version": move.version,
                    "m_status": move.status.value,
                    "m_step": move.step,
                    "m_due_at": move.due_at,
                    "m_step_started_at": move.step_started_at,
                    "m_delivery_key": move.delivery_key,
                    "m_attempts": move.attempts,
                    "m_reason": move.reason,
                    "m_next_version": move.version + 1,
                    "m_now": move.now,
                    "m_ended_at": move.now if ended else None,
                }
            )
            won.append(move.id)
            journey_id, contact_id = journey_of[move.id]
            logs.extend(
                {
                    "enrolment_id": move.id,
                    "journey_id": journey_id,
                    "contact_id": contact_id,
                    "step": entry.step,
                    "outcome": entry.outcome,
                    "detail": entry.detail[:500],
                    "at": move.now,
                }
                for entry in move.log
            )
            deliveries.extend(move.deliveries)
        if params:
            conn.execute(_MOVE, params)
        if logs:
            conn.execute(insert(ENROLMENT_STEPS), logs)
        insert_deliveries(conn, deliveries, moves[0].now if moves else None)
    return won


def insert_deliveries(db: DB, items: Sequence[NewDelivery], now: datetime | None) -> int:
    """Plan journey sends into the ledger; a dedupe key already there is left as it is. Returns how many."""
    rows = [
        {
            "run_id": d.run_id,
            "campaign_id": d.campaign_id,
            "contact_id": d.contact_id,
            "contact_name": d.contact_name,
            "text": d.text,
            "message": d.message,
            "dedupe_key": d.dedupe_key,
            "status": d.status.value,
            "reason": d.reason,
            "attempts": 0,
            "last_error": "",
            "capped": d.capped,
            "gateway_message_id": "",
            "gateway_task_id": "",
            "claim_token": d.claim_token,
            "next_attempt_at": None,
            "created_at": now,
            "updated_at": now,
            "sent_at": None,
        }
        for d in items
    ]
    with writing(db) as conn:
        return insert_ignore(conn, DELIVERIES, rows)


def start_welcome(db: DB, dedupe_key: str, token: str, now: datetime) -> int | None:
    """Move the delivery planned claimed by `token` under `dedupe_key` to `sending` (one more attempt; marked as a
    welcome in gateway_task_id, for recovery) before the gateway is called. Returns its id, or None when it is no
    longer claimed by `token` (recovered, or sent)."""
    with writing(db) as conn:
        found = conn.execute(
            select(_D.id).where(
                _D.dedupe_key == dedupe_key, _D.status == DeliveryStatus.CLAIMED.value, _D.claim_token == token
            )
        ).scalar()
        if found is None:
            return None
        conn.execute(
            update(DELIVERIES)
            .where(_D.id == found, _D.status == DeliveryStatus.CLAIMED.value)
            .values(
                status=DeliveryStatus.SENDING.value,
                attempts=_D.attempts + 1,
                sent_at=now,
                updated_at=now,
                gateway_task_id=token,
            )
        )
    return int(found)


@dataclass(frozen=True, slots=True)
class Finished:
    """A SENDING enrolment whose delivery reached a terminal state."""

    enrolment: EnrolmentRow
    status: DeliveryStatus
    reason: str


def finished_sends(db: DB, journey_ids: Sequence[str], limit: int = 5000) -> list[Finished]:
    """SENDING enrolments whose delivery is sent, failed, skipped or unknown (joined on the dedupe key)."""
    if not journey_ids:
        return []
    with reading(db) as conn:
        stmt = (
            select(ENROLMENTS, _D.status.label("delivery_status"), _D.reason.label("delivery_reason"))
            .join(DELIVERIES, _D.dedupe_key == _N.delivery_key)
            .where(
                _N.status == EnrolmentStatus.SENDING.value,
                _N.journey_id.in_(sorted(journey_ids)),
                _D.status.in_([s.value for s in TERMINAL_STATUSES]),
            )
            .limit(limit)
        )
        return [
            Finished(_enrolment(r._mapping), DeliveryStatus(r.delivery_status), r.delivery_reason or "")
            for r in conn.execute(stmt)
        ]


def stranded_sends(db: DB, journey_ids: Sequence[str]) -> list[EnrolmentRow]:
    """SENDING enrolments whose delivery does not exist (it cannot: it is written in the same transaction; kept
    as a guard so an enrolment can never wait forever)."""
    if not journey_ids:
        return []
    with reading(db) as conn:
        stmt = (
            select(ENROLMENTS)
            .outerjoin(DELIVERIES, _D.dedupe_key == _N.delivery_key)
            .where(
                _N.status == EnrolmentStatus.SENDING.value,
                _N.journey_id.in_(sorted(journey_ids)),
                _D.id.is_(None),
            )
        )
        return [_enrolment(r._mapping) for r in conn.execute(stmt)]


def delivery_statuses(db: DB, keys: Sequence[str]) -> dict[str, DeliveryStatus]:
    """Dedupe key -> status, for the keys that exist."""
    out: dict[str, DeliveryStatus] = {}
    with reading(db) as conn:
        for part in chunks(sorted(set(keys))):
            for key, status in conn.execute(select(_D.dedupe_key, _D.status).where(_D.dedupe_key.in_(part))):
                out[key] = DeliveryStatus(status)
    return out


def wake(db: DB, ids: Sequence[int], now: datetime) -> int:
    """Make active enrolments due now (an event may end their wait, or their exit_when may now hold)."""
    total = 0
    with writing(db) as conn:
        for part in chunks(sorted(set(ids))):
            total += (
                conn.execute(
                    update(ENROLMENTS)
                    .where(_N.id.in_(part), _N.status == EnrolmentStatus.ACTIVE.value, _N.due_at > now)
                    .values(due_at=now, updated_at=now)
                ).rowcount
                or 0
            )
    return total


@dataclass(frozen=True, slots=True)
class StepCount:
    journey_id: str
    step: str
    status: EnrolmentStatus
    count: int


def step_counts(db: DB, journey_id: str | None = None) -> list[StepCount]:
    """How many enrolments stand at each step (open ones) or ended with each status."""
    with reading(db) as conn:
        stmt = select(_N.journey_id, _N.step, _N.status, func.count()).group_by(_N.journey_id, _N.step, _N.status)
        if journey_id:
            stmt = stmt.where(_N.journey_id == journey_id)
        return [StepCount(j, s, EnrolmentStatus(st), int(n)) for j, s, st, n in conn.execute(stmt)]


def passed_counts(db: DB, journey_id: str) -> dict[tuple[str, str], int]:
    """(step, outcome) -> how many times enrolments of a journey passed that step with that outcome."""
    with reading(db) as conn:
        stmt = (
            select(_P.step, _P.outcome, func.count()).where(_P.journey_id == journey_id).group_by(_P.step, _P.outcome)
        )
        return {(s, o): int(n) for s, o, n in conn.execute(stmt)}


@dataclass(frozen=True, slots=True)
class PathRow:
    enrolment_id: int
    journey_id: str
    step: str
    outcome: str
    detail: str
    at: datetime | None


def contact_path(db: DB, contact_id: str, journey_id: str | None = None) -> list[PathRow]:
    """Every step a contact took, in every journey (or one), oldest first."""
    with reading(db) as conn:
        stmt = select(ENROLMENT_STEPS).where(_P.contact_id == contact_id)
        if journey_id:
            stmt = stmt.where(_P.journey_id == journey_id)
        return [
            PathRow(r.enrolment_id, r.journey_id, r.step, r.outcome, r.detail, aware(r.at))
            for r in conn.execute(stmt.order_by(_P.id))
        ]


def counts_by_status(db: DB) -> dict[EnrolmentStatus, int]:
    with reading(db) as conn:
        rows = conn.execute(select(_N.status, func.count()).group_by(_N.status)).all()
    return {EnrolmentStatus(s): int(n) for s, n in rows}


# -- the runs journey sends are planned into -------------------------------------------------------------------


def journey_run(
    db: DB, *, journey_id: str, run_key: str, timezone: str, settings: dict[str, Any], file: str, now: datetime
) -> tuple[int, RunStatus]:
    """The run a journey step's deliveries of one entry and day go into: created when missing, reopened when it
    had completed (a new delivery makes it open again). Returns its id and status (paused or cancelled by a
    person stay so)."""
    with writing(db) as conn:
        insert_ignore(
            conn,
            RUNS,
            [
                {
                    "campaign_id": journey_id,
                    "run_key": run_key,
                    "trigger": JOURNEY_TRIGGER,
                    "status": RunStatus.RUNNING.value,
                    "timezone": timezone,
                    "campaign_file": file,
                    "campaign_hash": "",
                    "settings": settings,
                    "scheduled_for": None,
                    "created_at": now,
                    "owner": "",
                    "error": "",
                    "planned": 0,
                    "skipped_at_plan": 0,
                }
            ],
        )
        run_id, status = conn.execute(
            select(_R.id, _R.status).where(_R.campaign_id == journey_id, _R.run_key == run_key)
        ).one()
        if status == RunStatus.COMPLETED.value:
            conn.execute(
                update(RUNS)
                .where(_R.id == run_id, _R.status == RunStatus.COMPLETED.value)
                .values(status=RunStatus.RUNNING.value, finished_at=None)
            )
            status = RunStatus.RUNNING.value
    return int(run_id), RunStatus(status)


@dataclass(frozen=True, slots=True)
class OpenRun:
    """A journey run still running, and who dispatches it ('' when nobody does now)."""

    id: int
    journey_id: str
    owner: str
    heartbeat_at: datetime | None


def open_journey_runs(db: DB) -> list[OpenRun]:
    """The journey runs still running (with deliveries to send or being sent), oldest first."""
    with reading(db) as conn:
        stmt = select(_R.id, _R.campaign_id, _R.owner, _R.heartbeat_at).where(
            _R.trigger == JOURNEY_TRIGGER, _R.status == RunStatus.RUNNING.value
        )
        return [OpenRun(int(i), str(c), str(o or ""), b) for i, c, o, b in conn.execute(stmt.order_by(_R.id))]


# -- journey state and the schedule memory of schedule/date triggers -------------------------------------------


@dataclass(frozen=True, slots=True)
class JourneyStateRow:
    journey_id: str
    activated_at: datetime
    content_hash: str
    backfilled_at: datetime | None


def activate(db: DB, journey_id: str, content_hash: str, now: datetime) -> JourneyStateRow:
    """The journey's state, created (activated now) the first time the engine sees it."""
    with writing(db) as conn:
        insert_ignore(
            conn,
            JOURNEY_STATE,
            [{"journey_id": journey_id, "activated_at": now, "content_hash": content_hash, "backfilled_at": None}],
        )
        conn.execute(
            update(JOURNEY_STATE)
            .where(_J.journey_id == journey_id, _J.content_hash != content_hash)
            .values(content_hash=content_hash)
        )
        row = conn.execute(select(JOURNEY_STATE).where(_J.journey_id == journey_id)).one()
    return JourneyStateRow(row.journey_id, aware(row.activated_at) or now, row.content_hash, aware(row.backfilled_at))


def backfilled(db: DB, journey_id: str) -> bool:
    """Whether a journey's backfill was done."""
    with reading(db) as conn:
        return conn.execute(select(_J.backfilled_at).where(_J.journey_id == journey_id)).scalar() is not None


def mark_backfilled(db: DB, journey_id: str, now: datetime) -> bool:
    """Claim a journey's one backfill: True for the first caller only."""
    with writing(db) as conn:
        changed = conn.execute(
            update(JOURNEY_STATE)
            .where(_J.journey_id == journey_id, _J.backfilled_at.is_(None))
            .values(backfilled_at=now)
        ).rowcount
    return bool(changed)


def last_fire(db: DB, key: str) -> datetime | None:
    with reading(db) as conn:
        return aware(conn.execute(select(_S.last_fire_at).where(_S.campaign_id == key)).scalar())


def set_last_fire(db: DB, key: str, when: datetime, now: datetime) -> None:
    with writing(db) as conn:
        if not insert_ignore(conn, SCHEDULE_STATE, [{"campaign_id": key, "last_fire_at": when, "updated_at": now}]):
            conn.execute(
                update(SCHEDULE_STATE)
                .where(_S.campaign_id == key, or_(_S.last_fire_at.is_(None), _S.last_fire_at < when))
                .values(last_fire_at=when, updated_at=now)
            )
