"""Database engine and schema management.

`make_db_engine(url)` builds a SQLAlchemy engine (SQLite gets WAL, a busy timeout and foreign keys) and
brings the schema to `SCHEMA_VERSION`: a new database is created, an older one is migrated step by step,
a newer one is refused rather than damaged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlmodel import Session, SQLModel, create_engine

from storage._sql import reading, writing
from storage.models import DELIVERIES, DELIVERY_PARTS, JOURNEY_TABLES, META, SCHEMA_VERSION, Meta


def _add_journey_tables(conn: Connection) -> None:
    """1 -> 2: journeys (the customer-event inbox, enrolments and their path, opt-outs, journey state)."""
    for table in JOURNEY_TABLES:
        table.create(conn, checkfirst=True)


def _add_follow_user_ids(conn: Connection) -> None:
    """2 -> 3: `contacts.follow_user_ids`, the staff members who follow a customer (the wecom gateway's 群发 tasks
    are per staff member); empty for existing contacts until the next sync fills it."""
    conn.execute(text("ALTER TABLE contacts ADD COLUMN follow_user_ids JSON NOT NULL DEFAULT '[]'"))


def _rich_messages(conn: Connection) -> None:
    """3 -> 4: a delivery's whole message (`deliveries.message`, JSON; NULL for plain text, as every delivery
    before) and the parts it sent (`delivery_parts`)."""
    if "message" not in {c["name"] for c in inspect(conn).get_columns(DELIVERIES.name)}:
        conn.execute(text("ALTER TABLE deliveries ADD COLUMN message TEXT"))
    DELIVERY_PARTS.create(conn, checkfirst=True)


# Migrations from version N to N+1, keyed by N. Each runs inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _add_journey_tables,
    2: _add_follow_user_ids,
    3: _rich_messages,
}


class SchemaError(RuntimeError):
    """The database was written by a newer wecast, or a migration failed."""


def make_db_engine(url: str, *, migrate: bool = True, echo: bool = False) -> Engine:
    """Create an engine for `url` (any SQLAlchemy URL) and make sure its schema is current."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if migrate:
        ensure_schema(engine)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the CLI, the API) run beside the dispatcher; NORMAL sync is durable across process
    # crashes (the kill -9 case), which is what the delivery log needs.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # Big plans touch several indexes at once; a 64 MB page cache keeps them in memory.
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.close()


def schema_version(engine: Engine) -> int | None:
    """The stored schema version, or None for an empty database."""
    if not inspect(engine).has_table(Meta.__tablename__):
        return None
    with Session(engine) as session:
        row = session.exec(select(Meta.value).where(Meta.key == "schema_version")).first()  # type: ignore[call-overload]
        return int(row[0]) if row else None


def ensure_schema(engine: Engine) -> None:
    """Create or migrate the schema to SCHEMA_VERSION."""
    current = schema_version(engine)
    if current is None:
        SQLModel.metadata.create_all(engine)
        with Session(engine) as session:
            session.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            session.commit()
        return
    if current > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {current} is newer than this wecast understands ({SCHEMA_VERSION}); "
            "upgrade wecast instead of using an older release on this database"
        )
    while current < SCHEMA_VERSION:
        step = MIGRATIONS.get(current)
        if step is None:
            raise SchemaError(f"no migration from schema version {current}")
        with engine.begin() as conn:
            step(conn)
            conn.execute(META.update().where(META.c.key == "schema_version").values(value=str(current + 1)))
        current += 1
    # New tables added without a data migration are created idempotently.
    SQLModel.metadata.create_all(engine)


@contextmanager
def snapshot(db: Engine) -> Iterator[Connection]:
    """One connection to read several things consistently (one transaction: one snapshot under WAL); pass it to
    the storage functions in place of the engine."""
    with reading(db) as conn:
        yield conn


@contextmanager
def transaction(db: Engine) -> Iterator[Connection]:
    """One transaction for several storage functions that must happen together (pass the connection to them in
    place of the engine); committed when the block ends, rolled back on an error."""
    with writing(db) as conn:
        yield conn
