"""Runs: one firing of a campaign (or one API send), its settings snapshot, its owner and its state."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from storage import deliveries
from storage._sql import DB, insert_ignore, reading, writing
from storage.models import OPEN_STATUSES, RUNS, SCHEDULE_STATE, DeliveryStatus, RunStatus

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
    with writing(db) as conn:
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
