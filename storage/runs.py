"""Runs: one firing of a campaign (or one API send), its settings snapshot, its owner and its state."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from storage import deliveries
from storage._sql import DB, dbapi_cursor, insert_ignore, reading, serialize, writing
from storage.models import KEY_HEAD, OPEN_STATUSES, RUNS, SCHEDULE_STATE, DeliveryStatus, RunStatus, fit_key

_R = RUNS.c
_S = SCHEDULE_STATE.c


@dataclass(frozen=True, slots=True)
class RunRow:
    """One run with every column (see `storage.models.CampaignRun`). `settings` is the JSON the engine wrote
    at planning; the engine validates it when it reads it (`engine.runsettings`)."""

    id: int
    campaign_id: str
    run_key: str
    trigger: str
    status: RunStatus
    timezone: str
    campaign_file: str
    campaign_hash: str
    settings: dict[str, Any]
    scheduled_for: datetime | None
    created_at: datetime | None
    finished_at: datetime | None
    owner: str
    heartbeat_at: datetime | None
    error: str
    planned: int
    skipped_at_plan: int


_RUN_FIELDS = tuple(f.name for f in fields(RunRow))


def _run(values: Any) -> RunRow:
    row = {name: values[name] for name in _RUN_FIELDS}
    row["status"] = RunStatus(row["status"])
    return RunRow(**row)


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to create (`record_plan`)."""

    campaign_id: str
    run_key: str
    trigger: str
    timezone: str
    settings: dict[str, Any]
    created_at: datetime
    campaign_file: str = ""
    campaign_hash: str = ""
    scheduled_for: datetime | None = None
    planned: int = 0
    skipped_at_plan: int = 0


@dataclass(frozen=True, slots=True)
class Recorded:
    """What `record_plan` did: the run's id, whether this call created it, and its delivery counts."""

    run_id: int
    created: bool
    counts: dict[DeliveryStatus, int]


def create_run(conn: Connection, run: NewRun) -> tuple[int, bool]:
    """Insert a run in the caller's transaction, unless the run (campaign, run_key) exists — planned earlier, or
    concurrently by another process (this then waits for that transaction). Returns (its id, whether this call
    created it)."""
    inserted = insert_ignore(
        conn,
        RUNS,
        [
            {
                "campaign_id": run.campaign_id,
                "run_key": run.run_key,
                "trigger": run.trigger,
                "status": RunStatus.RUNNING,
                "timezone": run.timezone,
                "campaign_file": run.campaign_file,
                "campaign_hash": run.campaign_hash,
                "settings": run.settings,
                "scheduled_for": run.scheduled_for,
                "created_at": run.created_at,
                "owner": "",
                "error": "",
                "planned": run.planned,
                "skipped_at_plan": run.skipped_at_plan,
            }
        ],
    )
    run_id = conn.execute(
        select(_R.id).where(_R.campaign_id == run.campaign_id, _R.run_key == run.run_key)
    ).scalar_one()
    return int(run_id), bool(inserted)


def set_plan_counts(conn: Connection, run_id: int, *, planned: int, skipped: int) -> None:
    """Record how many deliveries planning wrote (a streamed plan knows only at its end)."""
    conn.execute(update(RUNS).where(_R.id == run_id).values(planned=planned, skipped_at_plan=skipped))


def record_plan(
    db: DB,
    run: NewRun,
    recipients: Iterable[deliveries.Planned],
    skipped: Iterable[deliveries.Planned] = (),
    *,
    capped: bool,
    adhoc: bool = False,
    with_messages: bool = False,
) -> Recorded:
    """Create a run with its pending deliveries and its skipped ones, all in one transaction; or, when the
    run (campaign, run_key) already exists — planned earlier, or concurrently by another process — change
    nothing and return it. `adhoc`: a direct send's few deliveries (not the bulk path). `with_messages`: the
    recipients carry whole messages (JSON), not only their text."""
    recipients = list(recipients)
    with writing(db) as conn:
        prefix = key_prefix(run.campaign_id, run.run_key)
        if adhoc and recipients and all((r.dedupe_key or "").startswith(prefix[:KEY_HEAD]) for r in recipients):
            # A direct send under a key pooled single sends may have used (`record_direct_sends`): theirs stands.
            serialize(conn, _DIRECT_LOCK)
            used = _earlier_sends(conn, run.campaign_id, [run.run_key])
            if used:
                return Recorded(
                    used[run.run_key].run_id, False, deliveries.status_counts(conn, used[run.run_key].run_id)
                )
        run_id, inserted = create_run(conn, run)
        if not inserted:  # theirs stands
            return Recorded(run_id, False, deliveries.status_counts(conn, run_id))
        if adhoc:
            deliveries.insert_adhoc(conn, run_id, run.campaign_id, list(recipients), run.created_at)
        else:
            deliveries.insert_planned(
                conn,
                run_id,
                run.campaign_id,
                recipients,
                status=DeliveryStatus.PENDING,
                capped=capped,
                now=run.created_at,
                with_message=with_messages,
            )
            deliveries.insert_planned(
                conn, run_id, run.campaign_id, skipped, status=DeliveryStatus.SKIPPED, capped=capped, now=run.created_at
            )
        return Recorded(run_id, True, deliveries.status_counts(conn, run_id))


def get_run(db: DB, run_id: int) -> RunRow | None:
    with reading(db) as conn:
        row = conn.execute(select(RUNS).where(_R.id == run_id)).first()
    return _run(row._mapping) if row else None


def find_run(db: DB, campaign_id: str, run_key: str) -> RunRow | None:
    """The run of a campaign's slot (or of an API send's idempotency key), if it was planned."""
    with reading(db) as conn:
        row = conn.execute(select(RUNS).where(_R.campaign_id == campaign_id, _R.run_key == run_key)).first()
    return _run(row._mapping) if row else None


def run_status(db: DB, run_id: int) -> RunStatus | None:
    """Just the state of a run (the dispatcher asks before every chunk)."""
    with reading(db) as conn:
        value = conn.execute(select(_R.status).where(_R.id == run_id)).scalar()
    return RunStatus(value) if value is not None else None


def list_runs(
    db: DB, *, campaign_id: str | None = None, status: RunStatus | None = None, limit: int = 50
) -> list[RunRow]:
    """Runs, newest first."""
    stmt = select(RUNS)
    if campaign_id:
        stmt = stmt.where(_R.campaign_id == campaign_id)
    if status:
        stmt = stmt.where(_R.status == status)
    with reading(db) as conn:
        return [_run(r._mapping) for r in conn.execute(stmt.order_by(_R.id.desc()).limit(limit))]


def unfinished_runs(db: DB) -> list[RunRow]:
    """Runs still `running` (being sent, waiting, or interrupted), oldest first."""
    with reading(db) as conn:
        return [
            _run(r._mapping) for r in conn.execute(select(RUNS).where(_R.status == RunStatus.RUNNING).order_by(_R.id))
        ]


def counts_by_status(db: DB) -> dict[RunStatus, int]:
    with reading(db) as conn:
        return {RunStatus(s): int(n) for s, n in conn.execute(select(_R.status, func.count()).group_by(_R.status))}


# -- ownership and state ------------------------------------------------------------------------------


def take_over(
    db: DB, run_id: int, *, expected_owner: str, owner: str, now: datetime, resend_in_flight: bool
) -> dict[str, int] | None:
    """Make `owner` the run's dispatcher — only if its owner is still `expected_owner` (nobody took it over in
    between) — and recover what the previous owner left in flight (`deliveries.recover_run`), in one
    transaction. Returns what was recovered, or None when another process took the run first."""
    with writing(db) as conn:
        changed = conn.execute(
            update(RUNS).where(_R.id == run_id, _R.owner == expected_owner).values(owner=owner, heartbeat_at=now)
        ).rowcount
        if not changed:
            return None
        return deliveries.recover_run(conn, run_id, resend_in_flight=resend_in_flight, now=now)


def release(db: DB, run_id: int, owner: str) -> None:
    """`owner` stops dispatching the run (only if it still owns it)."""
    with writing(db) as conn:
        conn.execute(update(RUNS).where(_R.id == run_id, _R.owner == owner).values(owner=""))


def heartbeat(db: DB, run_id: int, now: datetime) -> None:
    """The owner is alive (a stale heartbeat lets another process take the run over)."""
    with writing(db) as conn:
        conn.execute(update(RUNS).where(_R.id == run_id).values(heartbeat_at=now))


def set_status(
    db: DB,
    run_id: int,
    to: RunStatus,
    *,
    allowed: Iterable[RunStatus],
    error: str = "",
    finished_at: datetime | None = None,
) -> bool:
    """Move a run to `to` if it is in one of the `allowed` states (atomically). Returns whether it moved."""
    values: dict[str, Any] = {"status": to, "error": error}
    if finished_at is not None:
        values["finished_at"] = finished_at
    with writing(db) as conn:
        changed = conn.execute(
            update(RUNS).where(_R.id == run_id, _R.status.in_(list(allowed))).values(**values)
        ).rowcount
    return bool(changed)


def finish_if_done(db: DB, run_id: int, now: datetime) -> bool:
    """Mark a running run completed when none of its deliveries is open any more. Returns whether it did."""
    with writing(db) as conn:
        counts = deliveries.status_counts(conn, run_id)
        if any(counts.get(s, 0) for s in OPEN_STATUSES):
            return False
        changed = conn.execute(
            update(RUNS)
            .where(_R.id == run_id, _R.status == RunStatus.RUNNING)
            .values(status=RunStatus.COMPLETED, finished_at=now)
        ).rowcount
    return bool(changed)


# -- the scheduler's memory ---------------------------------------------------------------------------


def last_fire(db: DB, campaign_id: str) -> datetime | None:
    """The last schedule slot the scheduler handled for a campaign."""
    with reading(db) as conn:
        value: datetime | None = conn.execute(select(_S.last_fire_at).where(_S.campaign_id == campaign_id)).scalar()
    return value


def set_last_fire(db: DB, campaign_id: str, when: datetime, now: datetime, *, only_if_later: bool = False) -> None:
    """Remember the last slot handled (`only_if_later`: never move it back)."""
    with writing(db) as conn:
        inserted = insert_ignore(
            conn, SCHEDULE_STATE, [{"campaign_id": campaign_id, "last_fire_at": when, "updated_at": now}]
        )
        if not inserted:
            stmt = update(SCHEDULE_STATE).where(_S.campaign_id == campaign_id)
            if only_if_later:
                stmt = stmt.where(_S.last_fire_at < when)
            conn.execute(stmt.values(last_fire_at=when, updated_at=now))


# -- direct sends, pooled ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirectSend:
    """One single send of the HTTP API (`record_direct_sends` pools many into one run): its key (the client's
    Idempotency-Key, or a fresh one), the recipient and the message (its text, and its JSON when it is more)."""

    key: str
    contact_id: str
    contact_name: str
    text: str
    message: str | None

    def dedupe_key(self, campaign_id: str) -> str:
        return fit_key(f"{key_prefix(campaign_id, self.key)}{self.contact_id}")


def key_prefix(campaign_id: str, key: str) -> str:
    """What the dedupe key of every delivery a direct send planned under this key starts with (the format of
    `engine.plan.plan_adhoc` too), before `fit_key` (which keeps its first KEY_HEAD characters)."""
    return f"{campaign_id}|{key}|"


@dataclass(frozen=True, slots=True)
class EarlierSend:
    """What a key was used for before (a pooled send, or a whole run planned under it): the run and its
    (contact id, text, message) deliveries under that key."""

    run_id: int
    deliveries: tuple[tuple[str, str, str | None], ...]


@dataclass(frozen=True, slots=True)
class DirectSendsRecorded:
    """What `record_direct_sends` did: the run it created (None when every key had been used before) and, for each
    key used before, what it was used for."""

    run_id: int | None
    earlier: dict[str, EarlierSend]


_DIRECT_LOCK = "wecast-direct-sends"


def record_direct_sends(db: DB, run: NewRun, sends: Sequence[DirectSend]) -> DirectSendsRecorded:
    """In one transaction: find what each send's key was used for before (any delivery whose dedupe key starts
    with the key's prefix: a pooled send, or a run planned under it), and create one run with a pending delivery
    for each of the others (at most one send per contact; not counted against the frequency cap).

    Safe beside another process doing the same (their lookups and inserts take turns) and beside a run planned
    under the same key at that moment (a delivery whose key was taken meanwhile is reported as used before)."""
    if len({s.contact_id for s in sends}) != len(sends) or len({s.key for s in sends}) != len(sends):
        raise ValueError("record_direct_sends: one send per contact and per key")
    with writing(db) as conn:
        serialize(conn, _DIRECT_LOCK)
        earlier = _earlier_sends(conn, run.campaign_id, [s.key for s in sends])
        new = [s for s in sends if s.key not in earlier]
        if not new:
            return DirectSendsRecorded(None, earlier)
        run_id, _ = create_run(conn, dataclasses.replace(run, planned=len(new)))
        planned = [
            deliveries.Planned(s.contact_id, s.contact_name, s.text, s.dedupe_key(run.campaign_id), message=s.message)
            for s in new
        ]
        inserted = deliveries.insert_adhoc(conn, run_id, run.campaign_id, planned, run.created_at)
        if inserted < len(new):  # a run planned under one of these keys committed meanwhile: that one stands
            taken = _earlier_sends(conn, run.campaign_id, [s.key for s in new], other_than=run_id)
            earlier.update(taken)
            if inserted == 0:
                conn.execute(delete(RUNS).where(_R.id == run_id))
                return DirectSendsRecorded(None, earlier)
            conn.execute(update(RUNS).where(_R.id == run_id).values(planned=inserted))
    return DirectSendsRecorded(run_id, earlier)


def earlier_sends(db: DB, campaign_id: str, keys: Sequence[str]) -> dict[str, EarlierSend]:
    """For each of these keys a direct send of `campaign_id` used before: the run and what its deliveries under
    the key ask for."""
    with reading(db) as conn:
        return _earlier_sends(conn, campaign_id, keys)


def _earlier_sends(
    conn: Connection, campaign_id: str, keys: Sequence[str], other_than: int | None = None
) -> dict[str, EarlierSend]:
    """For each key with deliveries (outside run `other_than`): the run and what they ask for. The dedupe keys'
    index serves each lookup as a range (code-point order on both backends)."""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"SELECT run_id, contact_id, text, message, dedupe_key FROM deliveries WHERE dedupe_key >= {mark} "
        f"AND dedupe_key < {mark}"
    )
    out: dict[str, EarlierSend] = {}
    with dbapi_cursor(conn) as cursor:
        for key in keys:
            prefix = key_prefix(campaign_id, key)
            head = prefix[:KEY_HEAD]  # what the key of each of its deliveries starts with, fitted (`fit_key`) or not
            cursor.execute(sql, (head, head[:-1] + chr(ord(head[-1]) + 1)))
            rows = [r for r in cursor.fetchall() if r[4] == fit_key(prefix + r[1]) and r[0] != other_than]
            if rows:
                out[key] = EarlierSend(int(rows[0][0]), tuple((r[1], r[2], r[3]) for r in rows))
    return out
