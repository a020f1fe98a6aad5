"""Helpers shared by the storage modules (not for use outside `storage/`): transactions over an engine or a
caller's connection, conflict-ignoring inserts, and the fast DB-API paths that big plans need."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

# Every storage function takes either the engine (it then runs in a transaction of its own) or a connection
# (it then runs in the caller's transaction: tests that hold two transactions open at once, and storage's own
# composite operations).
DB = Engine | Connection

# SQLite allows 999 bound values per statement in old builds: IN lists are sent in chunks this long.
IN_CHUNK = 900

T = TypeVar("T")


@contextmanager
def reading(db: DB) -> Iterator[Connection]:
    """A connection to read with: the caller's, or a fresh one."""
    if isinstance(db, Connection):
        yield db
    else:
        with db.connect() as conn:
            yield conn


@contextmanager
def writing(db: DB) -> Iterator[Connection]:
    """A connection inside a transaction: the caller's, or a new one committed on success."""
    if isinstance(db, Connection):
        yield db
    else:
        with db.begin() as conn:
            yield conn


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], chunk: int = 5000) -> int:
    """INSERT rows, skipping those that violate a unique constraint. Returns how many were inserted."""
    if not rows:
        return 0
    dialect = conn.dialect.name
    inserted = 0
    for i in range(0, len(rows), chunk):
        part = list(rows[i : i + chunk])
        if dialect == "postgresql":
            # An executemany's rowcount is not reliable here (SQLAlchemy batches it as INSERT ... VALUES
            # (...), (...) RETURNING): count the keys the server returns, which are the inserted rows only.
            stmt = postgresql.insert(table).on_conflict_do_nothing().returning(*table.primary_key.columns)
            inserted += len(conn.execute(stmt, part).all())
        elif dialect == "sqlite":
            result = conn.execute(sqlite.insert(table).on_conflict_do_nothing(), part)
            inserted += max(result.rowcount or 0, 0)
        else:  # other backends: plain inserts, row by row, each in a savepoint
            for row in part:
                try:
                    with conn.begin_nested():
                        conn.execute(table.insert(), row)
                    inserted += 1
                except Exception:  # a duplicate; anything else re-raises on the next query
                    continue
    return inserted


def insert_fast(
    conn: Connection, table: Table, rows: Iterable[tuple[Any, ...]], columns: Sequence[str], chunk: int = 20000
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


def aware(value: Any) -> datetime | None:
    """A time read outside the column type (aggregates, raw cursors): aware UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def decode_json(value: Any) -> Any:
    """A JSON column read through the raw cursor: text on SQLite, decoded already on PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def upsert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """INSERT rows, or — for a row whose `keys` exist — UPDATE its other given columns (SQLite and PostgreSQL)."""
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"upsert on {dialect}")
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    changed = {name: stmt.excluded[name] for name in rows[0] if name not in keys}
    conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=changed), list(rows))
