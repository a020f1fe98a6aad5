"""Deliveries: one message to one contact in one run — planned, claimed, sent, recorded.

The states and their moves are drawn in `storage.models`. Every write here is one statement (or one
executemany) inside the caller's transaction or a transaction of its own; the claim is atomic
(`UPDATE … WHERE status = 'pending'`), so two dispatchers never get the same delivery.

A multi-part message (a delivery with a `message`) is sent part by part: before each part's gateway call its
`delivery_parts` row says `sending` (`mark_parts_sending`, then `part_sent`, which records a part and marks the
next in one transaction), so after a crash `recover_run` knows, part by part, what was delivered, what may have
been, and what was never handed over.

A delivery `in_doubt` (an attempt may have reached the customer: a crash caught it being sent, or some of its parts
arrived) is counted by the frequency cap until it ends, and is never recorded as not delivered: where a pending one
would be skipped (a cancel, the cap, an opt-out) it is recorded `unknown` instead (see `storage.models`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import StrEnum
from itertools import repeat
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Integer, bindparam, case, cast, func, literal, or_, select, update
from sqlalchemy.engine import Connection

from storage._sql import (
    DB,
    BackgroundCopy,
    CopyConflict,
    aware,
    chunks,
    db_bool,
    db_time,
    dbapi_cursor,
    decode_json,
    insert_fast,
    insert_ignore,
    reading,
    serialize,
    upsert,
    writing,
)
from storage.models import (
    CAP_COUNTED_STATUSES,
    DELIVERIES,
    DELIVERY_PARTS,
    KEY_LENGTH,
    QUEUED_STATUSES,
    RUNS,
    DeliveryStatus,
    PartStatus,
    RunStatus,
    fit_key,
)

_D = DELIVERIES.c
_P = DELIVERY_PARTS.c


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One delivery with every column (see `storage.models.Delivery`)."""

    id: int
    run_id: int
    campaign_id: str
    contact_id: str
    contact_name: str
    text: str
    message: str | None
    dedupe_key: str | None
    status: DeliveryStatus
    reason: str
    attempts: int
    last_error: str
    capped: bool
    in_doubt: bool
    gateway_message_id: str
    gateway_task_id: str
    claim_token: str
    next_attempt_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    sent_at: datetime | None


_DELIVERY_FIELDS = tuple(f.name for f in fields(DeliveryRow))


def _delivery(values: Any) -> DeliveryRow:
    row = {name: values[name] for name in _DELIVERY_FIELDS}
    row["status"] = DeliveryStatus(row["status"])
    return DeliveryRow(**row)


class Claimed(NamedTuple):
    """A delivery a dispatcher claimed: what it needs to send it."""

    id: int
    contact_id: str
    text: str
    message: str | None  # the whole message as JSON when it is more than `text`
    dedupe_key: str | None
    attempts: int
    capped: bool
    in_doubt: bool = False  # an earlier attempt may have reached the customer


class Planned(NamedTuple):
    """A delivery to write at planning (pending), or a contact held back (skipped, with the reason)."""

    contact_id: str
    contact_name: str
    text: str
    dedupe_key: str | None
    reason: str = ""
    message: str | None = None  # the whole message as JSON, when it is more than `text`


class PartMark(NamedTuple):
    """A part about to be handed to the gateway."""

    delivery_id: int
    part_index: int
    kind: str
    content_hash: str


class PartState(NamedTuple):
    """How far one part of a delivery got (a `delivery_parts` row)."""

    part_index: int
    kind: str
    content_hash: str
    status: PartStatus
    gateway_message_id: str
    error: str
    sent_at: datetime | None


@dataclass(frozen=True, slots=True)
class PartResult:
    """What to record for one part whose gateway call failed (written with the delivery's `Result`)."""

    delivery_id: int
    part_index: int
    status: PartStatus
    error: str


@dataclass(frozen=True, slots=True)
class Result:
    """What to record for one delivery after a send, a retry decision or a policy check. Fields left None are
    not changed; the claim token is always cleared (the delivery is no longer held by a dispatcher)."""

    id: int
    status: DeliveryStatus
    reason: str | None = None
    last_error: str | None = None
    attempts: int | None = None
    next_attempt_at: datetime | None = None
    gateway_message_id: str | None = None
    gateway_task_id: str | None = None
    sent_at: datetime | None = None
    in_doubt: bool | None = None


_RESULT_FIELDS = tuple(f.name for f in fields(Result) if f.name != "id")


@dataclass(frozen=True, slots=True)
class Held:
    """A dedupe key already held: by which run, in which state, sent when."""

    run_id: int
    status: DeliveryStatus
    sent_at: datetime | None


class Submitted(NamedTuple):
    """A delivery in a 群发 task that staff have not confirmed yet."""

    id: int
    contact_id: str
    task_id: str


# -- planning -----------------------------------------------------------------------------------------

_PLAN_COLUMNS = (
    "run_id",
    "campaign_id",
    "contact_id",
    "contact_name",
    "text",
    "dedupe_key",
    "status",
    "capped",
    "created_at",
    "updated_at",
)


def insert_planned(
    conn: Connection,
    run_id: int,
    campaign_id: str,
    rows: Iterable[Planned],
    *,
    status: DeliveryStatus,
    capped: bool,
    now: datetime,
    with_message: bool = False,
) -> int:
    """Write a run's planned deliveries (`status` pending) or held-back contacts (skipped, with their reason)
    in the caller's transaction: the fast path, 100,000 rows in about a second on SQLite. A dedupe key already
    held, or a contact already in the run, is passed over. `with_message`: the rows carry a whole message (JSON)
    besides their text. Returns how many were written."""
    ts = db_time(conn, now)
    value = status.value
    flag = db_bool(conn, capped)
    if status is DeliveryStatus.SKIPPED:
        return insert_fast(
            conn,
            DELIVERIES,
            (
                (
                    run_id,
                    campaign_id,
                    r.contact_id,
                    r.contact_name,
                    r.text,
                    r.dedupe_key,
                    value,
                    flag,
                    ts,
                    ts,
                    r.reason,
                )
                for r in rows
            ),
            (*_PLAN_COLUMNS, "reason"),
        )
    if with_message:
        return insert_fast(
            conn,
            DELIVERIES,
            (
                (
                    run_id,
                    campaign_id,
                    r.contact_id,
                    r.contact_name,
                    r.text,
                    r.dedupe_key,
                    value,
                    flag,
                    ts,
                    ts,
                    r.message,
                )
                for r in rows
            ),
            (*_PLAN_COLUMNS, "message"),
        )
    # Pending rows leave `reason` (and the other empty columns) to the server defaults: fewer bound values.
    return insert_fast(
        conn,
        DELIVERIES,
        ((run_id, campaign_id, r.contact_id, r.contact_name, r.text, r.dedupe_key, value, flag, ts, ts) for r in rows),
        _PLAN_COLUMNS,
    )


# A chunk of pending deliveries, column by column (see `PlanWriter.pending`): contact ids, names, texts, messages.
_Columns = tuple[Sequence[str], Sequence[str], Sequence[str], Sequence[str | None] | None]

# The binary COPY's types of `_PLAN_COLUMNS` + reason (+ message), as PostgreSQL names them.
_PLAN_TYPES = ("int4", "text", "text", "text", "text", "text", "text", "bool", "timestamp", "timestamp", "text")


# A planned delivery collided with a unique constraint while `PlanWriter` copied it straight into the table (another
# planner took a dedupe key after this plan looked): the transaction is lost. Plan again with `careful=True`, which
# passes over such rows (and whose dedupe check then sees the other plan's keys).
PlanConflict = CopyConflict


class PlanWriter:
    """Writes one run's planned deliveries as planning streams them, a chunk at a time, in the caller's transaction.
    Each pending delivery's dedupe key is `key_prefix` + its contact id (`fit_key`: fitted to its column). Counts
    what it wrote.

    `pending` and `skipped` take a chunk's rows; `start` begins writing them, `wait` returns once they are written
    (the counts include them from then on). On PostgreSQL (unless `careful`) a chunk is one binary COPY straight into
    the table that runs in the background between `start` and `wait` — the caller renders the next chunk meanwhile
    and must leave the connection alone until `wait` — and a row that collides with a unique constraint raises
    `PlanConflict` (COPY cannot pass over it). Otherwise (SQLite; `careful`) each chunk is written by `insert_fast`
    at `start`, passing over a dedupe key already held or a contact already in the run. Call `close` at the end,
    also on an error."""

    def __init__(
        self,
        conn: Connection,
        run_id: int,
        campaign_id: str,
        *,
        key_prefix: str,
        capped: bool,
        now: datetime,
        with_messages: bool,
        careful: bool = False,
    ) -> None:
        self.conn = conn
        self.run_id = run_id
        self.campaign_id = campaign_id
        self.key_prefix = key_prefix
        self.capped = capped
        self.bound_capped = db_bool(conn, capped)  # as `insert_fast` binds it
        self.now = now
        self.ts = db_time(conn, now)
        self.with_messages = with_messages
        self.pending_count = 0
        self.skipped_count = 0
        self.copy: BackgroundCopy | None = None
        if conn.dialect.name == "postgresql" and not careful:
            columns: tuple[str, ...] = (*_PLAN_COLUMNS, "reason")
            types: tuple[str, ...] = _PLAN_TYPES
            if with_messages:
                columns, types = (*columns, "message"), (*types, "text")
            self.copy = BackgroundCopy(conn, DELIVERIES, columns, types)
        self.rows: list[tuple[Any, ...]] = []  # the chunk `start` writes next
        self.pending_columns: list[_Columns] = []  # the same, for `insert_fast`: pending and skipped apart
        self.skipped_rows: list[Planned] = []
        self.counts = (0, 0)  # pending and skipped rows in `rows`
        self.started = (0, 0)  # the same, in the chunk being copied

    def pending(
        self,
        ids: Sequence[str],
        names: Sequence[str],
        texts: Sequence[str],
        messages: Sequence[str | None] | None = None,
    ) -> None:
        """Recipients, as pending deliveries, column by column (the same length each, in the same order): contact
        ids, names, texts, and for a message that is more than its text each one's JSON (None: a plain text plan
        leaves `message` to its NULL default). The sequences are read until they are written (`start`): leave them
        as they are until then."""
        if not len(ids) == len(names) == len(texts) == (len(ids) if messages is None else len(messages)):
            raise ValueError("pending deliveries: columns of different lengths")
        if self.copy is not None:  # one column set for the chunk's pending and skipped rows: one COPY
            self.rows += self._pending_rows((ids, names, texts, messages), self.capped, "")
            self.counts = (self.counts[0] + len(ids), self.counts[1])
        else:
            self.pending_columns.append((ids, names, texts, messages))

    def _pending_rows(self, columns: _Columns, capped: bool | int, *reason: str) -> Iterator[tuple[Any, ...]]:
        """Rows in `_PLAN_COLUMNS` order (+ `reason`) (+ message), made by `zip` out of the columns and constants:
        no Python code runs per row, and a row that is written and let go before the next (an executemany's) is
        the very tuple the next one reuses."""
        ids, names, texts, messages = columns
        status, ts = DeliveryStatus.PENDING.value, self.ts
        keys: Iterable[str] = map(self.key_prefix.__add__, ids)
        if ids and len(self.key_prefix) + max(map(len, ids)) > KEY_LENGTH:  # a long contact id: rare, and costs more
            keys = map(fit_key, keys)
        rows = [repeat(self.run_id), repeat(self.campaign_id), ids, names, texts, keys]
        rows += [repeat(status), repeat(capped), repeat(ts), repeat(ts), *(repeat(r) for r in reason)]
        if self.with_messages:
            rows.append(repeat(None) if messages is None else messages)
        return zip(*rows)  # noqa: B905 - the repeats are endless; the columns' lengths are checked in `pending`

    def skipped(self, rows: Iterable[Planned]) -> None:
        """Contacts held back: skipped deliveries, with their reason."""
        if self.copy is None:
            self.skipped_rows += rows
            return
        run_id, campaign_id, capped, ts = self.run_id, self.campaign_id, self.capped, self.ts
        status = DeliveryStatus.SKIPPED.value
        extra = (None,) if self.with_messages else ()
        before = len(self.rows)
        self.rows += [
            (
                run_id,
                campaign_id,
                r.contact_id,
                r.contact_name,
                r.text,
                r.dedupe_key,
                status,
                capped,
                ts,
                ts,
                r.reason,
                *extra,
            )
            for r in rows
        ]
        self.counts = (self.counts[0], self.counts[1] + len(self.rows) - before)

    def start(self) -> None:
        """Begin writing the rows given since the last `start` (waits for the chunk before them first)."""
        if self.copy is not None:
            self._copied(self.copy.start(self.rows))
            self.rows, self.counts, self.started = [], (0, 0), self.counts
            return
        if self.pending_columns:
            columns = (*_PLAN_COLUMNS, "message") if self.with_messages else _PLAN_COLUMNS
            for pending in self.pending_columns:
                rows = self._pending_rows(pending, self.bound_capped)
                self.pending_count += insert_fast(self.conn, DELIVERIES, rows, columns)
        if self.skipped_rows:
            self.skipped_count += insert_planned(
                self.conn,
                self.run_id,
                self.campaign_id,
                self.skipped_rows,
                status=DeliveryStatus.SKIPPED,
                capped=self.capped,
                now=self.now,
            )
        self.pending_columns, self.skipped_rows = [], []

    def wait(self) -> None:
        """Until what `start` began is written: the connection is the caller's again."""
        if self.copy is not None:
            self._copied(self.copy.wait())

    def _copied(self, rows: int) -> None:
        if rows:
            pending, skipped = self.started
            self.pending_count += pending
            self.skipped_count += skipped
            self.started = (0, 0)

    def close(self) -> None:
        """Stop the background copy (waiting for a chunk in flight, whatever it raises: the caller leaves on an
        error of its own, or waited already)."""
        if self.copy is not None:
            self.copy.close()


def held_by_keys(db: DB, keys: Sequence[str]) -> dict[str, Held]:
    """Which of these dedupe keys are held already: by which run, in which state, sent when."""
    out: dict[str, Held] = {}
    with reading(db) as conn:
        for part in chunks(keys):
            stmt = select(_D.dedupe_key, _D.run_id, _D.status, _D.sent_at).where(_D.dedupe_key.in_(part))
            for row in conn.execute(stmt):
                out[row.dedupe_key] = Held(row.run_id, DeliveryStatus(row.status), row.sent_at)
    return out


def held_keys(db: DB, campaign_id: str) -> dict[str, Held]:
    """Every dedupe key this campaign holds."""
    stmt = select(_D.dedupe_key, _D.run_id, _D.status, _D.sent_at).where(*_campaign_range(db, campaign_id))
    with reading(db) as conn:
        return {row.dedupe_key: Held(row.run_id, DeliveryStatus(row.status), row.sent_at) for row in conn.execute(stmt)}


def _may_have_reached() -> ColumnElement[bool]:
    """Deliveries that reached, may have reached, or are about to reach the customer."""
    return or_(_D.status.in_(CAP_COUNTED_STATUSES), _D.in_doubt.is_(True))


def last_sends(
    db: DB, campaign_id: str, since: datetime, contact_ids: Sequence[str] | None = None
) -> dict[str, datetime]:
    """contact id -> latest time this campaign sent (or may have sent) to them, since `since` (all contacts, or only
    `contact_ids`: a plan asks a chunk at a time)."""
    out: dict[str, datetime] = {}
    with reading(db) as conn:
        base = (
            select(_D.contact_id, func.max(_D.sent_at).label("at"))
            .where(_D.campaign_id == campaign_id, _may_have_reached(), _D.sent_at >= since)
            .group_by(_D.contact_id)
        )
        parts: Iterable[Sequence[str] | None]
        if contact_ids is None:
            base = base.where(*_campaign_range(db, campaign_id))
            parts = [None]
        else:
            parts = chunks(contact_ids)
        for part in parts:
            stmt = base if part is None else base.where(_D.contact_id.in_(part))
            for row in conn.execute(stmt):
                at = aware(row.at)  # an aggregate: SQLite hands back text, not the column's type
                if at is not None:
                    out[row.contact_id] = at
    return out


def any_capped_between(db: DB, start: datetime, end: datetime, *, exclude_run: int | None = None) -> bool:
    """Whether any capped message was handed to the gateway in [start, end) (when none was, a plan need not count
    its recipients' messages)."""
    stmt = select(_D.id).where(_D.sent_at >= start, _D.sent_at < end, _D.capped.is_(True), _may_have_reached())
    if exclude_run is not None:
        stmt = stmt.where(_D.run_id != exclude_run)
    with reading(db) as conn:
        return conn.execute(stmt.limit(1)).first() is not None


def cap_counts(
    db: DB,
    start: datetime,
    end: datetime,
    contact_ids: Sequence[str] | None = None,
    *,
    exclude_run: int | None = None,
    exclude_ids: Sequence[int] = (),
) -> dict[str, int]:
    """How many capped messages each contact got (or may have got) in [start, end). All contacts when
    `contact_ids` is None (one grouped query, for planning 100,000 recipients). `exclude_ids`: deliveries not to
    count (those being handed over, whose own earlier attempt may be in doubt).

    A delivery's `sent_at` is set when it is handed to the gateway, so sends in flight count too, and so do
    deliveries in doubt waiting to be sent again (the earlier attempt may have arrived)."""
    base = (
        select(_D.contact_id, func.count())
        .where(_D.sent_at >= start, _D.sent_at < end, _D.capped.is_(True), _may_have_reached())
        .group_by(_D.contact_id)
    )
    if exclude_run is not None:
        base = base.where(_D.run_id != exclude_run)
    if exclude_ids:
        base = base.where(_D.id.not_in(list(exclude_ids)))
    out: dict[str, int] = {}
    parts: Iterable[Sequence[str] | None] = [None] if contact_ids is None else chunks(contact_ids)
    with reading(db) as conn:
        for part in parts:
            stmt = base if part is None else base.where(_D.contact_id.in_(part))
            for cid, n in conn.execute(stmt):
                out[cid] = int(n)
    return out


def _campaign_range(db: DB, campaign_id: str) -> tuple[ColumnElement[bool], ...]:
    """Deliveries of one campaign, found through the dedupe-key index (keys start with `<campaign id>|`;
    campaign ids cannot contain `|`, and `}` sorts right after it — in code-point order, which PostgreSQL
    only uses under the "C" collation: linguistic collations such as ICU's en-US put `}` before `|`)."""
    key: Any = _D.dedupe_key
    if db.dialect.name == "postgresql":
        key = key.collate("C")  # the column is created with it (see Delivery), so its index still serves
    return (key >= f"{campaign_id}|", key < f"{campaign_id}}}", _D.campaign_id == campaign_id)


def hold_cap(conn: Connection) -> None:
    """Make the caller's transaction — the frequency cap read (`cap_counts`), then the deliveries it lets through
    marked `sending` — one step with every other process's hand-over: call it first, inside that transaction.
    (SQLite: the transaction already holds the write lock; PostgreSQL: an advisory lock until it ends.)"""
    serialize(conn, "wecast-frequency-cap")


# -- dispatch -----------------------------------------------------------------------------------------


def claim(db: DB, run_id: int, token: str, limit: int, now: datetime) -> list[Claimed]:
    """Atomically claim up to `limit` due pending deliveries of a run for the dispatcher holding `token`."""
    due = (
        select(_D.id)
        .where(
            _D.run_id == run_id,
            _D.status == DeliveryStatus.PENDING,
            or_(_D.next_attempt_at.is_(None), _D.next_attempt_at <= now),
        )
        .order_by(_D.next_attempt_at.is_not(None), _D.id)
        .limit(limit)
        # PostgreSQL: lock the picked rows and pass over rows another claimer holds, so two claimers in
        # flight take different rows instead of one waiting on the other and then finding nothing
        # (SQLite serializes writers and renders no FOR UPDATE).
        .with_for_update(skip_locked=True)
    )
    with writing(db) as conn:
        ids = [r.id for r in conn.execute(due)]
        if not ids:
            return []
        conn.execute(
            update(DELIVERIES)
            .where(_D.id.in_(ids), _D.status == DeliveryStatus.PENDING)
            .values(status=DeliveryStatus.CLAIMED, claim_token=token, updated_at=now)
        )
        rows = conn.execute(
            select(_D.id, _D.contact_id, _D.text, _D.message, _D.dedupe_key, _D.attempts, _D.capped, _D.in_doubt)
            .where(_D.id.in_(ids), _D.claim_token == token, _D.status == DeliveryStatus.CLAIMED)
            .order_by(_D.id)
        )
        return [Claimed(*r[:-1], in_doubt=bool(r[-1])) for r in rows]


def claimed_by(conn: Connection, ids: Sequence[int], token: str) -> set[int]:
    """Which of `ids` are still claimed under `token`, locked until the caller's transaction ends (call it first in
    the transaction that marks them `sending`). A row missing was taken back by a take-over of the run (its owner
    judged gone) and may be claimed by the new owner: the old one must not send it."""
    if not ids:
        return set()
    mine: set[int] = set()
    with writing(conn) as c:
        for part in chunks(ids):
            rows = c.execute(
                select(_D.id)
                .where(_D.id.in_(part), _D.status == DeliveryStatus.CLAIMED, _D.claim_token == token)
                .with_for_update()
            )
            mine.update(int(r.id) for r in rows)
    return mine


def mark_sending(db: DB, rows: Sequence[Claimed], now: datetime, *, task_key: str | None = None) -> None:
    """Record, before the gateway is called, that these deliveries are being sent (one more attempt each;
    `sent_at` is the hand-over time, which the frequency cap counts). `task_key`: the 群发 task's
    idempotency key, saved so a resubmission after a crash uses the same one."""
    if not rows:
        return
    values = {"status": DeliveryStatus.SENDING, "updated_at": now, "sent_at": now}
    if task_key is not None:
        values["gateway_task_id"] = task_key
    with writing(db) as conn:
        _update_many(conn, [(r.id, r.attempts + 1) for r in rows], {"attempts": "integer"}, values)


# The PostgreSQL types of the columns a batched update sets per row (`_update_many`).
_PG_TYPES = {
    "status": "text",
    "reason": "text",
    "last_error": "text",
    "attempts": "integer",
    "next_attempt_at": "timestamp",
    "gateway_message_id": "text",
    "gateway_task_id": "text",
    "sent_at": "timestamp",
    "in_doubt": "boolean",
}


def _update_many(
    conn: Connection, rows: Sequence[tuple[Any, ...]], per_row: dict[str, str], same: dict[str, Any]
) -> None:
    """UPDATE many deliveries by id: `rows` are (id, value, ...) for the `per_row` columns (name -> PostgreSQL
    type), `same` the values every row gets. The hot path of dispatch (two of these per chunk of deliveries), so
    it skips SQLAlchemy's per-row parameter processing: PostgreSQL gets one statement for all the rows (an
    executemany sends one UPDATE a row: at thousands of deliveries a second that is most of the server's work),
    SQLite the driver's own executemany of plain values."""

    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return db_time(conn, value)
        return value.value if isinstance(value, StrEnum) else value

    names = list(per_row)
    with dbapi_cursor(conn) as cursor:
        if conn.dialect.name == "postgresql":
            arrays = [[row[0] for row in rows], *([plain(row[i + 1]) for row in rows] for i in range(len(names)))]
            unnest = ", ".join(["%s::bigint[]", *(f"%s::{per_row[n]}[]" for n in names)])
            sets = [f"{n} = v.{n}" for n in names] + [f"{n} = %s" for n in same]
            cursor.execute(
                f"UPDATE deliveries AS d SET {', '.join(sets)} FROM unnest({unnest}) AS v(id, {', '.join(names)}) "
                "WHERE d.id = v.id",
                (*(plain(v) for v in same.values()), *arrays),  # in the order they appear
            )
            return
        shared = tuple(plain(v) for v in same.values())
        cursor.executemany(
            f"UPDATE deliveries SET {', '.join(f'{n} = ?' for n in (*names, *same))} WHERE id = ?",
            [(*(plain(v) for v in row[1:]), *shared, row[0]) for row in rows],
        )


def write_results(db: DB, results: Sequence[Result], now: datetime, parts: Sequence[PartResult] = ()) -> None:
    """Record many deliveries' results at once (group commit: one executemany per set of changed columns), with
    the failed parts of multi-part deliveries among them, in the same transaction."""
    if not results and not parts:
        return
    by_columns: dict[tuple[str, ...], list[tuple[Any, ...]]] = defaultdict(list)
    for r in results:
        values = {name: value for name in _RESULT_FIELDS if (value := getattr(r, name)) is not None}
        by_columns[tuple(values)].append((r.id, *values.values()))
    with writing(db) as conn:
        for columns, group in by_columns.items():
            _update_many(conn, group, {k: _PG_TYPES[k] for k in columns}, {"claim_token": "", "updated_at": now})
        if parts:
            conn.execute(
                update(DELIVERY_PARTS)
                .where(_P.delivery_id == bindparam("_id"), _P.part_index == bindparam("_index"))
                .values(status=bindparam("_status"), error=bindparam("_error"), updated_at=now),
                [{"_id": p.delivery_id, "_index": p.part_index, "_status": p.status, "_error": p.error} for p in parts],
            )


# -- the parts of multi-part messages ------------------------------------------------------------------


def part_states(db: DB, delivery_ids: Sequence[int]) -> dict[int, dict[int, PartState]]:
    """delivery id -> part index -> how far that part got, for the parts handed to the gateway so far."""
    out: dict[int, dict[int, PartState]] = {}
    with reading(db) as conn:
        for part in chunks(delivery_ids):
            rows = conn.execute(
                select(
                    _P.delivery_id,
                    _P.part_index,
                    _P.kind,
                    _P.content_hash,
                    _P.status,
                    _P.gateway_message_id,
                    _P.error,
                    _P.sent_at,
                ).where(_P.delivery_id.in_(part))
            )
            for r in rows:
                out.setdefault(r.delivery_id, {})[r.part_index] = PartState(
                    r.part_index, r.kind, r.content_hash, PartStatus(r.status), r.gateway_message_id, r.error, r.sent_at
                )
    return out


def mark_parts_sending(db: DB, marks: Sequence[PartMark], now: datetime) -> None:
    """Record, before the gateway is called, that these parts are being handed over (a part tried before — it
    failed, or a crash left it `sending` — is marked again)."""
    if not marks:
        return
    rows = [
        {
            "delivery_id": m.delivery_id,
            "part_index": m.part_index,
            "kind": m.kind,
            "content_hash": m.content_hash,
            "status": PartStatus.SENDING,
            "gateway_message_id": "",
            "error": "",
            "sent_at": now,
            "updated_at": now,
        }
        for m in marks
    ]
    with writing(db) as conn:
        upsert(conn, DELIVERY_PARTS, rows, ("delivery_id", "part_index"))


class PartSent(NamedTuple):
    """The gateway accepted part `part_index` of a delivery (its message id), and `then` — the delivery's next part,
    if any — is about to be handed over."""

    delivery_id: int
    part_index: int
    message_id: str
    then: PartMark | None


def part_sent(db: DB, delivery_id: int, index: int, message_id: str, now: datetime, then: PartMark | None) -> None:
    """The gateway accepted part `index`: record it, and mark the part `then` (the next one, if any) as being
    handed over — in one transaction, so there is never a moment when neither is on record."""
    parts_sent(db, [PartSent(delivery_id, index, message_id, then)], now)


def parts_sent(db: DB, sent: Sequence[PartSent], now: datetime) -> None:
    """`part_sent` for the parts of many deliveries, in one transaction (the dispatcher's group commit: the
    multi-part sends in flight together record their parts together)."""
    if not sent:
        return
    with writing(db) as conn:
        conn.execute(
            update(DELIVERY_PARTS)
            .where(_P.delivery_id == bindparam("_id"), _P.part_index == bindparam("_index"))
            .values(status=PartStatus.SENT, gateway_message_id=bindparam("_message_id"), error="", updated_at=now),
            [{"_id": p.delivery_id, "_index": p.part_index, "_message_id": p.message_id} for p in sent],
        )
        mark_parts_sending(conn, [p.then for p in sent if p.then is not None], now)


def list_parts(db: DB, delivery_ids: Sequence[int]) -> dict[int, list[PartState]]:
    """delivery id -> its parts handed to the gateway so far, in order (plain text deliveries have none)."""
    return {d: [states[i] for i in sorted(states)] for d, states in part_states(db, delivery_ids).items()}


WELCOME_TASK = "welcome"  # gateway_task_id of a delivery sent as a WeCom welcome message (send_welcome)
WELCOME_HOLD = timedelta(seconds=60)  # a welcome claimed or being sent this recently belongs to a live engine
IN_DOUBT_REASON = "an earlier attempt was interrupted and may have been delivered"


def _withdrawn(reason: str) -> dict[str, Any]:
    """The values of deliveries taken back unsent for `reason` (a cancel): skipped — or, for one in doubt, unknown
    (an earlier attempt may have arrived: "skipped" would say it did not)."""
    return {
        "status": case((_D.in_doubt.is_(True), literal(DeliveryStatus.UNKNOWN.value)), else_=DeliveryStatus.SKIPPED),
        "reason": case((_D.in_doubt.is_(True), literal(f"{reason}; {IN_DOUBT_REASON}")), else_=reason),
    }


def unclaim(db: DB, ids: Sequence[int], token: str, now: datetime, *, cancelled: bool) -> None:
    """Give deliveries claimed under `token` back unsent: to pending, or — when their run was cancelled — to skipped
    (unknown for those in doubt). Rows no longer claimed under it (a take-over gave them to another owner) are left
    alone."""
    values = _withdrawn("run cancelled") if cancelled else {"status": DeliveryStatus.PENDING}
    with writing(db) as conn:
        for part in chunks(ids):
            conn.execute(
                update(DELIVERIES)
                .where(_D.id.in_(part), _D.status == DeliveryStatus.CLAIMED, _D.claim_token == token)
                .values(**values, claim_token="", updated_at=now)
            )


def release_claims(db: DB, run_id: int, token: str, now: datetime, *, cancelled: bool) -> int:
    """Give back every delivery of a run still claimed under `token` (a dispatcher finishing). Returns how many."""
    values = _withdrawn("run cancelled") if cancelled else {"status": DeliveryStatus.PENDING, "reason": ""}
    with writing(db) as conn:
        result = conn.execute(
            update(DELIVERIES)
            .where(_D.run_id == run_id, _D.status == DeliveryStatus.CLAIMED, _D.claim_token == token)
            .values(**values, claim_token="", updated_at=now)
        )
    return int(result.rowcount or 0)


def skip_pending(db: DB, run_id: int, reason: str, now: datetime) -> int:
    """Skip a run's pending deliveries with `reason` (a cancel; those in doubt become unknown). Claimed ones belong
    to a dispatcher, which skips them itself when it notices. Returns how many."""
    with writing(db) as conn:
        result = conn.execute(
            update(DELIVERIES)
            .where(_D.run_id == run_id, _D.status == DeliveryStatus.PENDING)
            .values(**_withdrawn(reason), updated_at=now)
        )
    return int(result.rowcount or 0)


def recover_run(db: DB, run_id: int, *, resend_in_flight: bool, now: datetime) -> dict[str, int]:
    """After a crash: claimed-but-unsent deliveries go back to pending; those caught being sent are resent, in doubt
    (only when the gateway dedupes by idempotency key), or recorded as unknown. A multi-part delivery is judged by
    its parts (`_recover_parts`): every part sent is a sent delivery; otherwise the part caught `sending` decides."""
    with writing(db) as conn:
        settled = _recover_parts(conn, run_id, resend_in_flight=resend_in_flight, now=now)
        # A journey's welcome message (engine.journeys.runtime) is planned claimed by the journey engine and sent
        # within the same tick: one touched in the last WELCOME_HOLD belongs to a live engine and is left to it (a
        # dispatcher starting meanwhile must not take it back); an older one was abandoned by a crash.
        welcome = _D.gateway_task_id == WELCOME_TASK
        live = _D.updated_at > now - WELCOME_HOLD
        back = conn.execute(
            update(DELIVERIES)
            .where(
                _D.run_id == run_id,
                _D.status == DeliveryStatus.CLAIMED,
                ~((_D.claim_token == WELCOME_TASK) & live),
            )
            .values(status=DeliveryStatus.PENDING, claim_token="", updated_at=now)
        ).rowcount
        sending = (_D.run_id == run_id, _D.status == DeliveryStatus.SENDING)
        # A welcome caught being sent: its code was good once, for 20 s, and the usual path has no key that would
        # recognise it, so it is unknown — never resent another way.
        welcomes = conn.execute(
            update(DELIVERIES)
            .where(*sending, welcome, ~live)
            .values(
                status=DeliveryStatus.UNKNOWN,
                claim_token="",
                updated_at=now,
                reason="interrupted while sending the welcome message: it may or may not have arrived; "
                "not retried automatically",
            )
        ).rowcount
        in_flight = (*sending, ~welcome)
        if resend_in_flight:
            # Resent under the same key (the gateway answers a repeat with the first message), but in doubt until
            # then: if the resend never gets through, it may still have arrived the first time.
            resent = conn.execute(
                update(DELIVERIES)
                .where(*in_flight)
                .values(status=DeliveryStatus.PENDING, claim_token="", updated_at=now, in_doubt=True)
            ).rowcount
            return {
                "requeued": back or 0,
                "resent": (resent or 0) + settled["resent"],
                "unknown": welcomes or 0,
                **_sent(settled),
            }
        unknown = conn.execute(
            update(DELIVERIES)
            .where(*in_flight)
            .values(
                status=DeliveryStatus.UNKNOWN,
                claim_token="",
                updated_at=now,
                reason="interrupted while sending: the gateway may or may not have delivered it; "
                "not retried automatically",
            )
        ).rowcount
    return {
        "requeued": back or 0,
        "resent": settled["resent"],
        "unknown": (unknown or 0) + (welcomes or 0) + settled["unknown"],
        **_sent(settled),
    }


def _sent(settled: dict[str, int]) -> dict[str, int]:
    return {"sent": settled["sent"]} if settled["sent"] else {}


def _recover_parts(conn: Connection, run_id: int, *, resend_in_flight: bool, now: datetime) -> dict[str, int]:
    """Settle the run's multi-part deliveries caught `sending`, part by part:

    * every part sent: the delivery is `sent` (the crash came after its last part, before its result was written);
    * a part caught `sending` (it may have arrived): with a deduplicating gateway the delivery goes back to pending
      and the dispatcher resends only the parts not sent — that one under its own key, which the gateway
      recognises; otherwise that part and the delivery are `unknown`, the parts before it recorded as delivered
      and the ones after never sent;
    * nothing in flight (every part before was settled): back to pending, to send the rest.
    """
    counts = {"sent": 0, "resent": 0, "unknown": 0}
    rows = conn.execute(
        select(_D.id, _D.message).where(
            _D.run_id == run_id, _D.status == DeliveryStatus.SENDING, _D.message.is_not(None)
        )
    ).all()
    if not rows:
        return counts
    states = part_states(conn, [r.id for r in rows])
    sent: list[Result] = []
    pending: list[Result] = []
    unknown: list[Result] = []
    unknown_parts: list[PartResult] = []
    for row in rows:
        total = len(decode_json(row.message))
        parts = states.get(row.id, {})
        done = sorted(i for i, p in parts.items() if p.status is PartStatus.SENT)
        doubtful = sorted(i for i, p in parts.items() if p.status is PartStatus.SENDING)
        if len(done) == total:
            first = parts[done[0]]
            last = max((p.sent_at for p in parts.values() if p.sent_at is not None), default=now)
            sent.append(
                Result(
                    row.id, DeliveryStatus.SENT, gateway_message_id=first.gateway_message_id, sent_at=last, reason=""
                )
            )
        elif doubtful and not resend_in_flight:
            reason = (
                f"interrupted while sending part {doubtful[0] + 1} of {total} ({parts[doubtful[0]].kind}): the gateway "
                "may or may not have delivered it; not retried automatically"
                + (f"; delivered: part {', '.join(str(i + 1) for i in done)}" if done else "")
            )
            unknown.append(Result(row.id, DeliveryStatus.UNKNOWN, reason=reason, last_error=reason))
            unknown_parts += [PartResult(row.id, i, PartStatus.UNKNOWN, "interrupted while sending") for i in doubtful]
        else:
            # Some of it may have arrived (a part sent, or caught being sent): in doubt until it ends.
            pending.append(Result(row.id, DeliveryStatus.PENDING, in_doubt=bool(done or doubtful)))
    write_results(conn, [*sent, *pending, *unknown], now, unknown_parts)
    counts.update(sent=len(sent), resent=len(pending), unknown=len(unknown))
    return counts


def next_due(db: DB, run_id: int) -> datetime | None:
    """When the run's next pending delivery (a retry waiting) is due; None when nothing is pending."""
    stmt = select(func.min(_D.next_attempt_at)).where(_D.run_id == run_id, _D.status == DeliveryStatus.PENDING)
    with reading(db) as conn:
        return aware(conn.execute(stmt).scalar())


def batch_keys(db: DB, ids: Sequence[int]) -> dict[int, str]:
    """The 群发 task keys saved on these deliveries (by a submission a crash may have interrupted)."""
    out: dict[int, str] = {}
    with reading(db) as conn:
        for part in chunks(ids):
            rows = conn.execute(
                select(_D.id, _D.gateway_task_id).where(_D.id.in_(part), _D.gateway_task_id.like("batch:%"))
            )
            out.update({r.id: r.gateway_task_id for r in rows})
    return out


def submitted(db: DB, run_id: int) -> list[Submitted]:
    """A run's deliveries waiting in 群发 tasks for staff to confirm."""
    stmt = select(_D.id, _D.contact_id, _D.gateway_task_id).where(
        _D.run_id == run_id, _D.status == DeliveryStatus.SUBMITTED
    )
    with reading(db) as conn:
        return [Submitted(*r) for r in conn.execute(stmt)]


class TaskCount(NamedTuple):
    """One 群发 task of a run, as its deliveries stand: `first_contact` (the smallest contact id: its leading staff
    member sent the task), `waiting` (deliveries still submitted: staff have not confirmed, or nobody looked
    since) of `total`."""

    task_id: str
    first_contact: str
    waiting: int
    total: int


def task_counts(db: DB, run_id: int) -> list[TaskCount]:
    """A run's 群发 tasks with how many of each task's deliveries still wait, by task id."""
    waiting = func.sum(case((_D.status == DeliveryStatus.SUBMITTED, 1), else_=0))
    stmt = (
        select(_D.gateway_task_id, func.min(_D.contact_id), waiting, func.count())
        .where(_D.run_id == run_id, _D.gateway_task_id != "")
        .group_by(_D.gateway_task_id)
        .order_by(_D.gateway_task_id)
    )
    with reading(db) as conn:
        return [TaskCount(str(t), str(c), int(w or 0), int(n)) for t, c, w, n in conn.execute(stmt)]


def runs_with_submitted(db: DB) -> list[int]:
    """The runs that have deliveries waiting in 群发 tasks, oldest first."""
    stmt = select(_D.run_id).where(_D.status == DeliveryStatus.SUBMITTED).group_by(_D.run_id).order_by(_D.run_id)
    with reading(db) as conn:
        return [int(r[0]) for r in conn.execute(stmt)]


# -- reading ------------------------------------------------------------------------------------------


def status_counts(db: DB, run_id: int) -> dict[DeliveryStatus, int]:
    """How many of a run's deliveries are in each state (states with none are left out)."""
    stmt = select(_D.status, func.count()).where(_D.run_id == run_id).group_by(_D.status)
    with reading(db) as conn:
        return {DeliveryStatus(status): int(n) for status, n in conn.execute(stmt)}


def counts_by_status(db: DB) -> dict[DeliveryStatus, int]:
    """How many deliveries of all runs are in each state."""
    with reading(db) as conn:
        return {
            DeliveryStatus(status): int(n)
            for status, n in conn.execute(select(_D.status, func.count()).group_by(_D.status))
        }


def queue_depth(db: DB) -> int:
    """Deliveries of running runs not handed to the gateway yet."""
    stmt = (
        select(func.count())
        .select_from(DELIVERIES)
        .join(RUNS, RUNS.c.id == _D.run_id)
        .where(RUNS.c.status == RunStatus.RUNNING, _D.status.in_(QUEUED_STATUSES))
    )
    with reading(db) as conn:
        return int(conn.execute(stmt).scalar() or 0)


def list_deliveries(
    db: DB,
    *,
    campaign_id: str | None = None,
    run_id: int | None = None,
    status: DeliveryStatus | None = None,
    contact_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
    before: int | None = None,
) -> list[DeliveryRow]:
    """Deliveries, newest first, filtered; `before`: only those older than that delivery id (keyset paging: the
    next page costs what the first does, where `offset` reads every row it skips)."""
    stmt = select(DELIVERIES)
    if campaign_id:
        stmt = stmt.where(_D.campaign_id == campaign_id)
    if run_id is not None:
        stmt = stmt.where(_D.run_id == run_id)
    if status:
        stmt = stmt.where(_D.status == status)
    if contact_id:
        stmt = stmt.where(_D.contact_id == contact_id)
    if before is not None:
        stmt = stmt.where(_D.id < before)
    stmt = stmt.order_by(_D.id.desc()).limit(limit).offset(offset)
    with reading(db) as conn:
        return [_delivery(r._mapping) for r in conn.execute(stmt)]


@dataclass(frozen=True, slots=True)
class ReasonCount:
    """How many of a run's deliveries ended in `status` for one `reason`."""

    status: DeliveryStatus
    reason: str
    count: int


def reason_counts(db: DB, run_id: int, statuses: Sequence[DeliveryStatus], limit: int = 20) -> list[ReasonCount]:
    """A run's deliveries in `statuses`, counted by status and reason, most frequent first (at most `limit`)."""
    stmt = (
        select(_D.status, _D.reason, func.count().label("n"))
        .where(_D.run_id == run_id, _D.status.in_(list(statuses)))
        .group_by(_D.status, _D.reason)
        .order_by(func.count().desc(), _D.reason)
        .limit(limit)
    )
    with reading(db) as conn:
        return [ReasonCount(DeliveryStatus(s), reason or "", int(n)) for s, reason, n in conn.execute(stmt)]


@dataclass(frozen=True, slots=True)
class SendTimes:
    """A run's sends over time: `counts[i]` deliveries were handed to the gateway in the `i`-th bucket of
    `width` seconds after `start` (empty when nothing was sent)."""

    start: datetime | None
    width: float
    counts: list[int]


def send_times(db: DB, run_id: int, statuses: Sequence[DeliveryStatus], buckets: int = 30) -> SendTimes:
    """When a run's deliveries in `statuses` were handed to the gateway, in at most `buckets` equal buckets
    (counted by the database: a run of 100,000 never leaves it as rows)."""
    where = (_D.run_id == run_id, _D.status.in_(list(statuses)), _D.sent_at.is_not(None))
    with reading(db) as conn:
        first, last = conn.execute(select(func.min(_D.sent_at), func.max(_D.sent_at)).where(*where)).one()
        start, end = aware(first), aware(last)
        if start is None or end is None:
            return SendTimes(None, 0.0, [])
        span = (end - start).total_seconds()
        width = max(1.0, span / buckets) if span > 0 else 1.0
        bucket: Any
        if db.dialect.name == "postgresql":
            bucket = func.floor(func.extract("epoch", _D.sent_at - start) / width)
        else:  # SQLite keeps times as text; julianday counts days
            offset = (func.julianday(_D.sent_at) - func.julianday(db_time(conn, start))) * 86400.0
            bucket = cast(offset / width, Integer)
        rows = conn.execute(select(bucket.label("b"), func.count()).where(*where).group_by("b")).all()
    counts = [0] * (min(buckets, int(span // width) + 1))
    for b, n in rows:
        counts[min(int(b), len(counts) - 1)] += int(n)
    return SendTimes(start, width, counts)


def recipients_and_messages(db: DB, run_id: int) -> list[tuple[str, str, str | None]]:
    """(contact id, text, whole message or None) of every delivery of a run: what a request that planned it
    asked for."""
    stmt = select(_D.contact_id, _D.text, _D.message).where(_D.run_id == run_id)
    with reading(db) as conn:
        return [(r.contact_id, r.text, r.message) for r in conn.execute(stmt)]


def insert_adhoc(conn: Connection, run_id: int, campaign_id: str, rows: Sequence[Planned], now: datetime) -> int:
    """Write the deliveries of a direct send (not counted against the frequency cap). Returns how many."""
    return insert_ignore(
        conn,
        DELIVERIES,
        [
            {
                "run_id": run_id,
                "campaign_id": campaign_id,
                "contact_id": r.contact_id,
                "contact_name": r.contact_name,
                "text": r.text,
                "message": r.message,
                "dedupe_key": None if r.dedupe_key is None else fit_key(r.dedupe_key),
                "status": DeliveryStatus.PENDING,
                "capped": False,
                "created_at": now,
                "updated_at": now,
            }
            for r in rows
        ],
    )
