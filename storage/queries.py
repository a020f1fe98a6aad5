"""Queries the engine needs, written with SQLAlchemy Core where volume matters (100,000-row plans).

Nothing here imports `engine`; values in, rows out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from storage.models import (
    CAP_COUNTED_STATUSES,
    CONTACT_TAGS,
    CONTACTS,
    DELIVERIES,
    RUNS,
    TAGS,
    DeliveryStatus,
    utcnow,
)

C = CONTACTS.c
T = TAGS.c
CT = CONTACT_TAGS.c
D = DELIVERIES.c
R = RUNS.c
CONTACT_COLUMNS = [c.name for c in CONTACTS.columns]


def insert_ignore(
    conn: Connection, table: Any, rows: Sequence[dict[str, Any]], index: Sequence[str] | None = None, chunk: int = 5000
) -> int:
    """INSERT rows, skipping those that violate a unique constraint. Returns how many were inserted."""
    if not rows:
        return 0
    dialect = conn.dialect.name
    inserted = 0
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        stmt: Any
        if dialect == "sqlite":
            stmt = sqlite.insert(table).on_conflict_do_nothing()
        elif dialect == "postgresql":
            stmt = postgresql.insert(table).on_conflict_do_nothing()
        else:  # pragma: no cover - other backends: plain insert, row by row
            for row in part:
                try:
                    with conn.begin_nested():
                        conn.execute(table.insert(), row)
                    inserted += 1
                except Exception:  # a duplicate; anything else re-raises on the next query
                    continue
            continue
        if dialect == "postgresql":
            # An executemany's rowcount is not reliable here (SQLAlchemy batches it as INSERT ... VALUES
            # (...), (...) RETURNING): count the keys the server returns, which are the inserted rows only.
            result = conn.execute(stmt.returning(*table.primary_key.columns), list(part))
            inserted += len(result.all())
        else:
            result = conn.execute(stmt, list(part))
            inserted += max(result.rowcount or 0, 0)
    return inserted


# -- contacts -----------------------------------------------------------------------------------------


def upsert_tags(conn: Connection, tags: Iterable[dict[str, Any]]) -> None:
    rows = list(tags)
    if not rows:
        return
    existing = {r.id for r in conn.execute(select(T.id))}
    new = [r for r in rows if r["id"] not in existing]
    if new:
        conn.execute(TAGS.insert(), new)
    for r in rows:
        if r["id"] in existing:
            conn.execute(
                update(TAGS).where(T.id == r["id"]).values(name=r["name"], group_name=r["group_name"], type=r["type"])
            )


def upsert_contacts(
    conn: Connection, contacts: Sequence[dict[str, Any]], tag_ids: dict[str, Sequence[str]], now: datetime
) -> tuple[int, int]:
    """Insert or update contacts and replace their tag links. Returns (added, updated)."""
    if not contacts:
        return 0, 0
    ids = [c["id"] for c in contacts]
    known = {r.id for r in conn.execute(select(T.id))}
    contacts = [
        {**c, "tag_ids": sorted(t for t in dict.fromkeys(tag_ids.get(c["id"], ())) if t in known)} for c in contacts
    ]
    existing: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), 900):
        for row in conn.execute(select(CONTACTS).where(C.id.in_(ids[i : i + 900]))):
            existing[row.id] = dict(row._mapping)
    fields = [f for f in CONTACT_COLUMNS if f not in ("created_at", "updated_at", "removed_at")]
    new_rows, changed = [], []
    for c in contacts:
        old = existing.get(c["id"])
        if old is None:
            new_rows.append({**c, "created_at": now, "updated_at": now, "removed_at": None})
        elif (
            any(old.get(f) != c.get(f) for f in fields if f != "added_at")
            or old.get("removed_at")
            or (c.get("added_at") and old.get("added_at") != c.get("added_at"))
        ):
            changed.append(c)
    if new_rows:
        conn.execute(CONTACTS.insert(), new_rows)
    for c in changed:
        conn.execute(
            update(CONTACTS)
            .where(C.id == c["id"])
            .values(**{k: v for k, v in c.items() if k != "id"}, updated_at=now, removed_at=None)
        )
    for i in range(0, len(ids), 900):
        conn.execute(delete(CONTACT_TAGS).where(CT.contact_id.in_(ids[i : i + 900])))
    links = [{"contact_id": c["id"], "tag_id": t} for c in contacts for t in c["tag_ids"]]
    if links:
        conn.execute(CONTACT_TAGS.insert(), links)
    return len(new_rows), len(changed)


def mark_removed(conn: Connection, seen_ids: set[str], now: datetime) -> int:
    """Contacts the gateway no longer lists are marked removed (kept: their delivery history matters)."""
    current = {r.id for r in conn.execute(select(C.id).where(C.removed_at.is_(None)))}
    gone = sorted(current - seen_ids)
    for i in range(0, len(gone), 900):
        conn.execute(update(CONTACTS).where(C.id.in_(gone[i : i + 900])).values(removed_at=now, updated_at=now))
    return len(gone)


def load_contact_views(
    conn: Connection, *, include_removed: bool = False, columns: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Contacts as plain dicts, with `tags` (a frozenset of tag names and ids) and `tags_named`.

    `columns` limits what is read (planning 100,000 recipients reads only the fields the audience and the
    template use); `id` is always included. Rows are read through the DB-API cursor, not the ORM, and
    JSON and time columns are decoded here, because this is the hot path of planning.
    """
    wanted = [c for c in CONTACT_COLUMNS if columns is None or c in set(columns) or c == "id"]
    wanted = [c for c in wanted if c != "tag_ids"]
    tag_name = {r[0]: r[1] for r in conn.exec_driver_sql("SELECT id, name FROM tags")}
    sql = f"SELECT {', '.join(wanted)}, tag_ids FROM contacts"
    if not include_removed:
        sql += " WHERE removed_at IS NULL"
    special = [(i, name, _DECODERS[name]) for i, name in enumerate(wanted) if name in _DECODERS]
    n = len(wanted)
    out = []
    # Many contacts share a tag combination: build each combination's sets once.
    combos: dict[Any, tuple[frozenset[str], tuple[str, ...]]] = {None: (frozenset(), ()), "[]": (frozenset(), ())}
    for row in conn.exec_driver_sql(sql).fetchall():
        view = dict(zip(wanted, row, strict=False))
        for i, name, fn in special:
            view[name] = fn(row[i])
        joined = row[n]
        if not isinstance(joined, str | None):  # PostgreSQL returns JSON decoded
            joined = json.dumps(joined)
        combo = combos.get(joined)
        if combo is None:
            tag_ids = sorted(_decode_json(joined))
            named = tuple(tag_name[t] for t in tag_ids if t in tag_name)
            combo = combos[joined] = (frozenset(named).union(tag_ids), named)
        view["tags"], view["tags_named"] = combo
        out.append(view)
    out.sort(key=lambda v: v["id"])  # a stable order, so `limit` always keeps the same contacts
    return out


def _decode_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _decode_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


_DECODERS: dict[str, Any] = {
    "phones": _decode_json,
    "additional_info": _decode_json,
    "added_at": _decode_time,
    "created_at": _decode_time,
    "updated_at": _decode_time,
    "removed_at": _decode_time,
    "friend": bool,
    "coworker": bool,
    "star": bool,
}


def insert_fast(
    conn: Connection, table: Any, rows: Iterable[tuple[Any, ...]], columns: Sequence[str], chunk: int = 20000
) -> int:
    """INSERT … ON CONFLICT DO NOTHING for many rows given as tuples in `columns` order, through the DB-API
    cursor (values must already be plain: str/int/float/None; times via `db_time`). Returns rows inserted."""
    cols = ", ".join(columns)
    marks = ", ".join(["?" if conn.dialect.paramstyle == "qmark" else "%s"] * len(columns))
    sql = f"INSERT INTO {table.name} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING"
    inserted = 0
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            inserted += _exec_many(conn, sql, batch)
            batch = []
    if batch:
        inserted += _exec_many(conn, sql, batch)
    return inserted


def _exec_many(conn: Connection, sql: str, batch: list[tuple[Any, ...]]) -> int:
    before = _changes(conn)
    result = conn.exec_driver_sql(sql, batch)
    if conn.dialect.name == "sqlite":
        return _changes(conn) - before
    return max(result.rowcount or 0, 0)


def _changes(conn: Connection) -> int:
    if conn.dialect.name != "sqlite":
        return 0
    return int(conn.exec_driver_sql("SELECT total_changes()").scalar() or 0)


def db_time(conn: Connection, value: datetime | None) -> str | datetime | None:
    """A time as the DateTime column stores it: naive UTC, as text in SQLAlchemy's format on SQLite."""
    if value is None:
        return None
    naive = value.astimezone(UTC).replace(tzinfo=None)
    return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if conn.dialect.name == "sqlite" else naive


def tag_names(conn: Connection) -> list[str]:
    return [r.name for r in conn.execute(select(T.name).order_by(T.group_name, T.name))]


# -- deliveries -------------------------------------------------------------------------------------


def existing_keys(conn: Connection, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Deliveries holding any of these dedupe keys: key -> {run_id, status, sent_at}."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(keys), 900):
        stmt = select(D.dedupe_key, D.run_id, D.status, D.sent_at, D.created_at).where(
            D.dedupe_key.in_(keys[i : i + 900])
        )
        for row in conn.execute(stmt):
            out[row.dedupe_key] = dict(row._mapping)
    return out


def last_sends(conn: Connection, campaign_id: str, since: datetime) -> dict[str, datetime]:
    """contact id -> latest time this campaign sent (or may have sent) to them, since `since`."""
    stmt = (
        select(D.contact_id, func.max(D.sent_at).label("at"))
        .where(
            *_campaign_range(conn, campaign_id),
            D.status.in_([s.value for s in CAP_COUNTED_STATUSES]),
            D.sent_at >= since,
        )
        .group_by(D.contact_id)
    )
    out = {}
    for row in conn.execute(stmt):
        at = row.at
        if isinstance(at, str):
            at = datetime.fromisoformat(at)
        out[row.contact_id] = at if at.tzinfo else at.replace(tzinfo=UTC)  # stored as naive UTC
    return out


def cap_counts(
    conn: Connection,
    start: datetime,
    end: datetime,
    contact_ids: Sequence[str] | None = None,
    exclude_run: int | None = None,
) -> dict[str, int]:
    """How many capped messages each contact got (or may have got) in [start, end). All contacts when
    `contact_ids` is None (one grouped query, for planning 100,000 recipients).

    A delivery's `sent_at` is set when it is handed to the gateway, so sends in flight count too."""
    base = (
        select(D.contact_id, func.count())
        .where(
            D.sent_at >= start,
            D.sent_at < end,
            D.capped.is_(True),
            D.status.in_([s.value for s in CAP_COUNTED_STATUSES]),
        )
        .group_by(D.contact_id)
    )
    if exclude_run is not None:
        base = base.where(D.run_id != exclude_run)
    out: dict[str, int] = {}
    chunks = [None] if contact_ids is None else [contact_ids[i : i + 900] for i in range(0, len(contact_ids), 900)]
    for part in chunks:
        stmt = base if part is None else base.where(D.contact_id.in_(part))
        for cid, n in conn.execute(stmt):
            out[cid] = int(n)
    return out


def campaign_keys(conn: Connection, campaign_id: str) -> dict[str, dict[str, Any]]:
    """Every dedupe key this campaign holds: key -> {run_id, status, sent_at}."""
    stmt = select(D.dedupe_key, D.run_id, D.status, D.sent_at).where(*_campaign_range(conn, campaign_id))
    return {row.dedupe_key: dict(row._mapping) for row in conn.execute(stmt)}


def _campaign_range(conn: Connection, campaign_id: str) -> tuple[Any, ...]:
    """Deliveries of one campaign, found through the dedupe-key index (keys start with `<campaign id>|`;
    campaign ids cannot contain `|`, and `}` sorts right after it — in code-point order, which PostgreSQL
    only uses under the "C" collation: linguistic collations such as ICU's en-US put `}` before `|`)."""
    key: Any = D.dedupe_key
    if conn.dialect.name == "postgresql":
        key = key.collate("C")  # the column is created with it (see Delivery), so its index still serves
    return (key >= f"{campaign_id}|", key < f"{campaign_id}}}", D.campaign_id == campaign_id)


def status_counts(conn: Connection, run_id: int) -> dict[str, int]:
    stmt = select(D.status, func.count()).where(D.run_id == run_id).group_by(D.status)
    return {status: int(n) for status, n in conn.execute(stmt)}


def claim(conn: Connection, run_id: int, token: str, limit: int, now: datetime) -> list[dict[str, Any]]:
    """Atomically claim up to `limit` due pending deliveries of a run for this dispatcher."""
    due = (
        select(D.id)
        .where(
            D.run_id == run_id,
            D.status == DeliveryStatus.PENDING.value,
            or_(D.next_attempt_at.is_(None), D.next_attempt_at <= now),
        )
        .order_by(D.next_attempt_at.is_not(None), D.id)
        .limit(limit)
        # PostgreSQL: lock the picked rows and pass over rows another claimer holds, so two claimers in
        # flight take different rows instead of one waiting on the other and then finding nothing
        # (SQLite serializes writers and renders no FOR UPDATE).
        .with_for_update(skip_locked=True)
    )
    ids = [r.id for r in conn.execute(due)]
    if not ids:
        return []
    conn.execute(
        update(DELIVERIES)
        .where(D.id.in_(ids), D.status == DeliveryStatus.PENDING.value)
        .values(status=DeliveryStatus.CLAIMED.value, claim_token=token, updated_at=now)
    )
    rows = conn.execute(
        select(D.id, D.contact_id, D.text, D.dedupe_key, D.attempts, D.capped)
        .where(D.id.in_(ids), D.claim_token == token, D.status == DeliveryStatus.CLAIMED.value)
        .order_by(D.id)
    )
    return [dict(r._mapping) for r in rows]


def next_due(conn: Connection, run_id: int) -> datetime | None:
    stmt = select(func.min(D.next_attempt_at)).where(D.run_id == run_id, D.status == DeliveryStatus.PENDING.value)
    value = conn.execute(stmt).scalar()
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=utcnow().tzinfo) if value.tzinfo is None else value


def set_status(conn: Connection, ids: Sequence[int], status: DeliveryStatus, now: datetime, **values: Any) -> int:
    total = 0
    for i in range(0, len(ids), 900):
        result = conn.execute(
            update(DELIVERIES).where(D.id.in_(ids[i : i + 900])).values(status=status.value, updated_at=now, **values)
        )
        total += result.rowcount or 0
    return total


def apply_updates(conn: Connection, updates: Sequence[dict[str, Any]]) -> None:
    """Write per-delivery results (each dict has `id` plus the columns to set) in one executemany."""
    if not updates:
        return
    by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for u in updates:
        by_keys[tuple(sorted(u))].append(u)
    from sqlalchemy import bindparam

    for keys, group in by_keys.items():
        cols = [k for k in keys if k != "id"]
        stmt = update(DELIVERIES).where(D.id == bindparam("_id")).values({k: bindparam(f"_{k}") for k in cols})
        conn.execute(stmt, [{f"_{k}": v for k, v in u.items()} for u in group])


def recover_run(conn: Connection, run_id: int, *, resend_in_flight: bool, now: datetime) -> dict[str, int]:
    """After a crash: claimed-but-unsent rows go back to pending; rows that were being sent are resent
    (only when the gateway dedupes by idempotency key) or recorded as unknown."""
    back = conn.execute(
        update(DELIVERIES)
        .where(D.run_id == run_id, D.status == DeliveryStatus.CLAIMED.value)
        .values(status=DeliveryStatus.PENDING.value, claim_token="", updated_at=now)
    ).rowcount
    if resend_in_flight:
        inflight = conn.execute(
            update(DELIVERIES)
            .where(D.run_id == run_id, D.status == DeliveryStatus.SENDING.value)
            .values(status=DeliveryStatus.PENDING.value, claim_token="", updated_at=now)
        ).rowcount
        return {"requeued": back or 0, "resent": inflight or 0, "unknown": 0}
    unknown = conn.execute(
        update(DELIVERIES)
        .where(D.run_id == run_id, D.status == DeliveryStatus.SENDING.value)
        .values(
            status=DeliveryStatus.UNKNOWN.value,
            claim_token="",
            updated_at=now,
            reason="interrupted while sending: the gateway may or may not have delivered it; not retried automatically",
        )
    ).rowcount
    return {"requeued": back or 0, "resent": 0, "unknown": unknown or 0}


def deliveries(
    conn: Connection,
    *,
    campaign_id: str | None = None,
    run_id: int | None = None,
    status: str | None = None,
    contact_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    stmt = select(DELIVERIES)
    conds = []
    if campaign_id:
        conds.append(D.campaign_id == campaign_id)
    if run_id is not None:
        conds.append(D.run_id == run_id)
    if status:
        conds.append(D.status == status)
    if contact_id:
        conds.append(D.contact_id == contact_id)
    if conds:
        stmt = stmt.where(and_(*conds))
    stmt = stmt.order_by(D.id.desc()).limit(limit).offset(offset)
    return [dict(r._mapping) for r in conn.execute(stmt)]


def runs(
    conn: Connection, *, campaign_id: str | None = None, status: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    stmt = select(RUNS)
    if campaign_id:
        stmt = stmt.where(R.campaign_id == campaign_id)
    if status:
        stmt = stmt.where(R.status == status)
    return [dict(r._mapping) for r in conn.execute(stmt.order_by(R.id.desc()).limit(limit))]


def unfinished_runs(conn: Connection) -> list[dict[str, Any]]:
    stmt = select(RUNS).where(R.status == "running").order_by(R.id)
    return [dict(r._mapping) for r in conn.execute(stmt)]


def get_run(engine_or_conn: Engine | Connection, run_id: int) -> dict[str, Any] | None:
    def go(conn: Connection) -> dict[str, Any] | None:
        row = conn.execute(select(RUNS).where(R.id == run_id)).first()
        return dict(row._mapping) if row else None

    if isinstance(engine_or_conn, Engine):
        with engine_or_conn.connect() as conn:
            return go(conn)
    return go(engine_or_conn)
