"""Database engine and schema management.

`make_db_engine(url)` builds a SQLAlchemy engine (SQLite gets WAL, a busy timeout and foreign keys) and
brings the schema to `SCHEMA_VERSION`: a new database is created, an older one is migrated step by step,
a newer one is refused rather than damaged. Two processes opening one new database at once create it once: the
version check, the creation and each migration happen under one lock (`storage._sql.serialize`).

On SQLite wecast begins transactions itself (pysqlite would open one only at the first INSERT, UPDATE or DELETE,
leaving the reads before it outside): a writing transaction begins `BEGIN IMMEDIATE`, holding the write lock from
its first statement, so a check and the write that depends on it (the frequency cap and the `sending` mark, a claim)
are one step across processes; a reading one begins deferred, one snapshot that takes no lock.
"""

from __future__ import annotations

import functools
import os
import select as io_select
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlmodel import SQLModel, create_engine

from storage._sql import READ_ONLY, reading, serialize, where, writing
from storage.errors import Failure, SchemaError, StorageError
from storage.models import (
    CONTACT_SYNCS,
    CONTACTS,
    DELIVERIES,
    DELIVERY_PARTS,
    JOURNEY_TABLES,
    META,
    RUNS,
    SCHEMA_VERSION,
)

__all__ = [
    "SchemaError",
    "ensure_schema",
    "file_gone",
    "make_db_engine",
    "schema_version",
    "snapshot",
    "transaction",
]


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


def _ledger_truth(conn: Connection) -> None:
    """4 -> 5: `deliveries.in_doubt` (an attempt may have reached the customer) and `contact_syncs` (a sync is
    marked complete). A database synced before syncs were recorded has its list counted as complete."""
    if "in_doubt" not in {c["name"] for c in inspect(conn).get_columns(DELIVERIES.name)}:
        conn.execute(text("ALTER TABLE deliveries ADD COLUMN in_doubt BOOLEAN NOT NULL DEFAULT false"))
    CONTACT_SYNCS.create(conn, checkfirst=True)
    has_contacts = conn.execute(select(CONTACTS.c.id).limit(1)).first() is not None
    if has_contacts and conn.execute(select(func.count()).select_from(CONTACT_SYNCS)).scalar() == 0:
        synced = conn.execute(select(func.max(CONTACTS.c.updated_at))).scalar()
        conn.execute(CONTACT_SYNCS.insert().values(id=1, owner="", started_at=synced, finished_at=synced, seen=0))


# PostgreSQL checks a foreign key row by row: for each delivery inserted, a query of campaign_runs under a row lock
# — a third of the server's work when a plan copies 100,000 deliveries in. Planning writes a chunk's deliveries
# for one run, so the check is made once a statement instead: the runs the new rows name are locked (FOR KEY SHARE,
# as the foreign key would, so a concurrent delete of one waits for this transaction) and must exist. The other
# side stays as strict: a run cannot be deleted, nor its id changed, while deliveries name it. (Under READ
# COMMITTED, wecast's isolation, which the checks' fresh snapshots rely on; SQLite keeps its own cheap foreign key.)
_RUN_CHECK = (
    """CREATE OR REPLACE FUNCTION wecast_deliveries_runs_exist() RETURNS trigger LANGUAGE plpgsql AS $f$
    DECLARE
        wanted integer;
    BEGIN
        FOR wanted IN SELECT DISTINCT run_id FROM added LOOP
            PERFORM 1 FROM campaign_runs WHERE id = wanted FOR KEY SHARE;
            IF NOT FOUND THEN
                RAISE foreign_key_violation USING MESSAGE = format(
                    'insert or update on table "deliveries" violates its run check: run %s is not in campaign_runs',
                    wanted);
            END IF;
        END LOOP;
        RETURN NULL;
    END $f$""",
    """CREATE OR REPLACE FUNCTION wecast_delivery_run_exists() RETURNS trigger LANGUAGE plpgsql AS $f$
    BEGIN
        PERFORM 1 FROM campaign_runs WHERE id = NEW.run_id FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE foreign_key_violation USING MESSAGE = format(
                'update on table "deliveries" violates its run check: run %s is not in campaign_runs', NEW.run_id);
        END IF;
        RETURN NULL;
    END $f$""",
    """CREATE OR REPLACE FUNCTION wecast_run_unreferenced() RETURNS trigger LANGUAGE plpgsql AS $f$
    BEGIN
        IF EXISTS (SELECT 1 FROM deliveries WHERE run_id = OLD.id) THEN
            RAISE foreign_key_violation USING MESSAGE = format(
                'update or delete on table "campaign_runs" violates the deliveries'' run check: run %s is still '
                'referenced from table "deliveries"', OLD.id);
        END IF;
        RETURN NULL;
    END $f$""",
)
# (name, table, when and what): each trigger of the check.
_RUN_TRIGGERS = (
    (
        "wecast_deliveries_runs_exist",
        "deliveries",
        "AFTER INSERT ON deliveries REFERENCING NEW TABLE AS added FOR EACH STATEMENT "
        "EXECUTE FUNCTION wecast_deliveries_runs_exist()",
    ),
    (
        "wecast_delivery_run_changed",
        "deliveries",
        "AFTER UPDATE OF run_id ON deliveries FOR EACH ROW WHEN (OLD.run_id IS DISTINCT FROM NEW.run_id) "
        "EXECUTE FUNCTION wecast_delivery_run_exists()",
    ),
    (
        "wecast_run_deleted",
        "campaign_runs",
        "AFTER DELETE ON campaign_runs FOR EACH ROW EXECUTE FUNCTION wecast_run_unreferenced()",
    ),
    (
        "wecast_run_id_changed",
        "campaign_runs",
        "AFTER UPDATE OF id ON campaign_runs FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) "
        "EXECUTE FUNCTION wecast_run_unreferenced()",
    ),
)


def _run_check_per_statement(conn: Connection) -> None:
    """5 -> 6 (and every new database): on PostgreSQL, deliveries' run foreign key becomes the statement-level
    check above (`_RUN_CHECK`); SQLite keeps its foreign key."""
    if conn.dialect.name != "postgresql":
        return
    for fk in inspect(conn).get_foreign_keys(DELIVERIES.name):
        if fk["referred_table"] == RUNS.name and fk["name"]:
            conn.exec_driver_sql(f'ALTER TABLE {DELIVERIES.name} DROP CONSTRAINT "{fk["name"]}"')
    for statement in _RUN_CHECK:
        conn.exec_driver_sql(statement)
    for name, table, definition in _RUN_TRIGGERS:  # again after a migration that ran before (the same definitions)
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        conn.exec_driver_sql(f"CREATE TRIGGER {name} {definition}")


# Migrations from version N to N+1, keyed by N. All of them run inside one transaction (`ensure_schema`).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _add_journey_tables,
    2: _add_follow_user_ids,
    3: _rich_messages,
    4: _ledger_truth,
    5: _run_check_per_statement,
}


class UrlProblem(Enum):
    """Why `url_problem` refuses a database URL (the caller words it)."""

    UNPARSABLE = "unparsable"
    BACKEND = "backend"  # not SQLite or PostgreSQL: the SQL here is written for those two
    DRIVER = "driver"  # the URL's DBAPI driver is not installed


def url_problem(url: str) -> tuple[UrlProblem, str] | None:
    """What keeps `make_db_engine` from using `url` (with the backend's or driver's name), or None when nothing."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return UrlProblem.UNPARSABLE, ""
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        return UrlProblem.BACKEND, parsed.get_backend_name()
    try:
        parsed.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError):
        return UrlProblem.DRIVER, parsed.get_driver_name()
    return None


# Seconds a new PostgreSQL connection waits for the server before it is "cannot be reached" (libpq's connect_timeout).
CONNECT_TIMEOUT = 10
# The drivers that take libpq's `connect_timeout` (pg8000 and asyncpg name theirs `timeout`: passed this one, every
# connection would fail with an unknown keyword argument).
LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg2"})


def make_db_engine(url: str, *, migrate: bool = True, echo: bool = False, busy_timeout: float = 30.0) -> Engine:
    """Create an engine for `url` (any SQLAlchemy URL) and make sure its schema is current. `busy_timeout`: how long
    (seconds) a SQLite transaction waits for another process's lock before it fails (a `StorageError`, kind BUSY)."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout}
    elif parsed.get_driver_name() in LIBPQ_DRIVERS and "connect_timeout" not in parsed.query:
        # A server that accepts the connection and never answers (hung, or a half-open firewall) would otherwise
        # hold every new connection — `wecast run` included — for ever; `?connect_timeout=N` in the URL overrides.
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        watch = _FileWatch(database) if database and database != ":memory:" else None
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_ms=round(busy_timeout * 1000)))
        event.listen(engine, "begin", functools.partial(_sqlite_begin, watch=watch))
        if watch is not None:
            _WATCHES[engine] = watch
    else:
        event.listen(engine.pool, "checkout", _server_hung_up)
    if migrate:
        try:
            ensure_schema(engine)
        except BaseException:
            engine.dispose()  # no caller will: its pooled connection was left open for the garbage collector
            raise
    return engine


# SQLite's page cache, per connection (KiB). Sized for what is re-read, not for what is written: a plan streams its
# recipients in id order, so its inserts touch only the right-hand edge of each index (a few pages), and the pages
# it fills go to the WAL at commit whatever the cache; what a cache must hold is what dispatch and the API read
# again and again — the open run's dispatch index and the contact pages being listed. Every connection of the pool
# may grow one (serve runs several threads), so each stays small enough that they all fit beside a million-recipient
# plan in 300 MB.
CACHE_KIB = 16 * 1024


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, *, busy_ms: int) -> None:
    # wecast begins its transactions itself (`_sqlite_begin`; the module docstring says why).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the CLI, the API) run beside the dispatcher; NORMAL sync is durable across process
    # crashes (the kill -9 case), which is what the delivery log needs.
    _wal(cursor, busy_ms)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    cursor.close()


def _server_hung_up(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled server connection the server has closed while it sat idle in the pool, so the pool opens a
    new one instead of handing it out (SQLAlchemy reconnects on `DisconnectionError`). A restarted server, an
    administrator's `pg_terminate_backend`, an idle-session timeout or a failover all end the connections of a
    running wecast between two of its transactions; without this check the next step of whatever used the
    connection next (a dispatch's claim, an HTTP request, a sync) failed on the dead connection though the server
    was back. Idle, the connection has no query outstanding, so anything the server sent since (the FATAL that
    ends the session, then the closed socket) makes its socket readable: one non-blocking `select`, no round trip
    — where `pool_pre_ping` would add one to every transaction. (A notification would also make it readable;
    wecast LISTENs for none, and a needless reconnect is harmless anyway.)"""
    try:
        fd = dbapi_connection.fileno()
    except AttributeError:  # a driver that does not expose its socket: nothing to look at
        return
    except Exception as exc:  # the driver already knows the connection is closed
        raise DisconnectionError(f"the connection is closed ({exc})") from exc
    # poll, not select: select refuses a descriptor past FD_SETSIZE (1024), which a busy server process reaches.
    watch = io_select.poll()
    try:
        watch.register(fd, io_select.POLLIN)
        readable = watch.poll(0)
    except (OSError, ValueError) as exc:
        raise DisconnectionError(f"the connection's socket is unusable ({exc})") from exc
    if readable:
        raise DisconnectionError("the server closed this connection while it was idle in the pool")


def _wal(cursor: Any, busy_ms: int) -> None:
    """Switch a connection to WAL, waiting out other processes as any statement would. Turning a new file's journal
    to WAL needs its exclusive lock, and SQLite answers "database is locked" at once, without calling the busy
    handler, when waiting could deadlock (this connection holds the shared lock another is waiting to upgrade past):
    several processes opening one new database at the same moment hit that. So the switch is retried, for as long as
    the busy timeout would have waited."""
    deadline = time.monotonic() + busy_ms / 1000
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class _FileWatch:
    """The SQLite file an engine opened, by identity (device and inode): a file deleted or replaced under a running
    wecast is noticed at the next transaction, instead of every write going on into the unlinked inode (which
    SQLite allows: the data would vanish when the process ends, and each "sent" be recorded nowhere)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)  # the file opened, whatever the working directory becomes
        self.identity: tuple[int, int] | None = None

    def _now(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def gone(self) -> bool:
        """Whether the file is no longer the one opened (the first look, at the first transaction, remembers it:
        SQLite created the file when it connected)."""
        if self.identity is None:
            self.identity = self._now()
            return False
        return self._now() != self.identity


GONE = "the file was deleted or replaced while wecast was running"
_WATCHES: weakref.WeakKeyDictionary[Engine, _FileWatch] = weakref.WeakKeyDictionary()


def file_gone(engine: Engine) -> str | None:
    """The path of the engine's SQLite file when it was deleted or replaced since it was opened (None while it is
    there, and for other databases). One stat: a health check may ask on every request."""
    watch = _WATCHES.get(engine)
    return watch.path if watch is not None and watch.identity is not None and watch.gone() else None


def _sqlite_begin(conn: Connection, *, watch: _FileWatch | None) -> None:
    if watch is not None and watch.gone():
        # Nothing more is written to the unlinked file: every transaction from now on fails, so no delivery is
        # claimed (and sent) that could not be recorded.
        raise StorageError(
            Failure.UNAVAILABLE,
            f"{watch.path}: {GONE}: nothing more is written to it; restart wecast (restore the file from a backup "
            "first if it was not meant)",
            detail=GONE,
        )
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


def schema_version(db: Engine | Connection) -> int | None:
    """The stored schema version, or None for an empty database. An unreadable one is a SchemaError."""
    with reading(db) as conn:
        if not inspect(conn).has_table(META.name):
            return None
        value = conn.execute(select(META.c.value).where(META.c.key == "schema_version")).scalar()
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise SchemaError(
            Failure.SCHEMA_UNREADABLE,
            f"{where(db)}: the schema version {value!r} stored in {META.name} is unreadable: this is not a database "
            "wecast wrote, or it was damaged; point database_url at wecast's database (or restore it from a backup)",
            where=where(db),
            found=str(value),
            known=SCHEMA_VERSION,
        ) from None


def ensure_schema(engine: Engine) -> None:
    """Create or migrate the schema to SCHEMA_VERSION, in one transaction under the schema's lock: a second process
    starting at the same moment waits, then finds the schema current."""
    with writing(engine) as conn:
        serialize(conn, "wecast-schema")
        _ensure_schema(conn)


def _ensure_schema(conn: Connection) -> None:
    current = schema_version(conn)
    if current is None:
        SQLModel.metadata.create_all(conn)
        _run_check_per_statement(conn)
        conn.execute(META.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
        return
    if current > SCHEMA_VERSION:
        raise SchemaError(
            Failure.SCHEMA_NEWER,
            f"{where(conn)}: database schema version {current} is newer than this wecast understands "
            f"({SCHEMA_VERSION}); upgrade wecast instead of using an older release on this database",
            where=where(conn),
            found=str(current),
            known=SCHEMA_VERSION,
        )
    while current < SCHEMA_VERSION:
        step = MIGRATIONS.get(current)
        if step is None:
            raise SchemaError(
                Failure.MIGRATION,
                f"{where(conn)}: no migration from schema version {current}",
                where=where(conn),
                found=str(current),
                known=SCHEMA_VERSION,
            )
        step(conn)  # in the one transaction: a step that fails leaves the database as it was
        conn.execute(META.update().where(META.c.key == "schema_version").values(value=str(current + 1)))
        current += 1
    # New tables added without a data migration are created idempotently.
    SQLModel.metadata.create_all(conn)


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
