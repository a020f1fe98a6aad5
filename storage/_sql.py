"""Helpers shared by the storage modules (not for use outside `storage/`): transactions over an engine or a
caller's connection, the one place the drivers' errors become `storage.errors` (`mapped`), locks that make a
check and the write that depends on it one step across processes (`serialize`), conflict-ignoring inserts, and
the fast DB-API paths that big plans need."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.exc import DBAPIError, StatementError

from storage.errors import Failure, StorageError

# Every storage function takes either the engine (it then runs in a transaction of its own) or a connection
# (it then runs in the caller's transaction: tests that hold two transactions open at once, and storage's own
# composite operations).
DB = Engine | Connection

# SQLite allows 999 bound values per statement in old builds: IN lists are sent in chunks this long.
IN_CHUNK = 900

T = TypeVar("T")


# The execution option that marks a connection as a reader: on SQLite its transaction begins deferred (a snapshot,
# no lock), every other one with the write lock (`storage.db`'s BEGIN IMMEDIATE).
READ_ONLY = "wecast_read_only"


@contextmanager
def reading(db: DB) -> Iterator[Connection]:
    """A connection to read with: the caller's, or a fresh one (one transaction: what it reads is one snapshot)."""
    if isinstance(db, Connection):
        yield db
    else:
        with mapping(db), db.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            yield conn


@contextmanager
def writing(db: DB) -> Iterator[Connection]:
    """A connection inside a transaction: the caller's, or a new one committed on success. On SQLite a new one holds
    the write lock from its first statement, so what it reads before it writes cannot change under it."""
    if isinstance(db, Connection):
        yield db
    else:
        with mapping(db), db.begin() as conn:
            yield conn


@contextmanager
def mapping(db: DB) -> Iterator[None]:
    """Raise the drivers' errors that are the database's condition (full, locked, unreachable) as `StorageError`."""
    try:
        yield
    except DBAPIError as exc:
        error = mapped(exc, where(db))
        if error is None:
            raise
        raise error from exc


def where(db: DB) -> str:
    """The database, as an error names it (a SQLite file's path; a server URL without its password)."""
    url = db.engine.url
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


# SQLite's primary result codes (the low byte of `sqlite_errorcode`) and PostgreSQL's SQLSTATEs (class or code)
# that are the database's condition, not a bug: the one table of what they mean.
_SQLITE = {
    5: Failure.BUSY,  # SQLITE_BUSY: locked past the busy timeout
    6: Failure.BUSY,  # SQLITE_LOCKED
    8: Failure.UNAVAILABLE,  # SQLITE_READONLY: the file or its folder cannot be written
    10: Failure.UNAVAILABLE,  # SQLITE_IOERR
    11: Failure.UNAVAILABLE,  # SQLITE_CORRUPT
    13: Failure.FULL,  # SQLITE_FULL: the disk, or max_page_count
    14: Failure.UNAVAILABLE,  # SQLITE_CANTOPEN
    26: Failure.UNAVAILABLE,  # SQLITE_NOTADB
}
_POSTGRES = {
    "53100": Failure.FULL,  # disk_full
    "53": Failure.UNAVAILABLE,  # insufficient resources (memory, connections)
    "55P03": Failure.BUSY,  # lock_not_available (lock_timeout)
    "57014": Failure.BUSY,  # query_canceled (statement_timeout)
    "40P01": Failure.BUSY,  # deadlock_detected
    "08": Failure.UNREACHABLE,  # connection exceptions
    "57P04": Failure.UNAVAILABLE,  # database_dropped
    "57P": Failure.UNREACHABLE,  # the server shut down or restarted, an administrator or a timeout ended the session
}
_ADVICE = {
    Failure.FULL: "the disk is full (or the database reached its size limit): nothing of the last step was written; "
    "free some space, then resume (`wecast run --resume`)",
    Failure.BUSY: "another process held the database locked longer than the busy timeout: nothing of the last step "
    "was written; try again when it is done (`wecast run --resume` continues a run)",
    Failure.UNAVAILABLE: "the database cannot be used",
    Failure.UNREACHABLE: "the database server cannot be reached or ended the connection; try again when it answers",
}


def mapped(exc: DBAPIError, where: str) -> StorageError | None:
    """The `StorageError` a driver's error stands for, or None when it is not the database's condition (a bug)."""
    orig = exc.orig
    kind: Failure | None = None
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        kind = _SQLITE.get(code & 0xFF) if isinstance(code, int) else None
    else:
        state = str(getattr(orig, "sqlstate", "") or "")
        kind = next((k for prefix, k in _POSTGRES.items() if state and state.startswith(prefix)), None)
        if kind is None and not state and exc.connection_invalidated:  # the connection broke while in use
            kind = Failure.UNREACHABLE
        # Could not connect at all: refused, or no answer within connect_timeout (psycopg's ConnectionTimeout, a
        # subclass of OperationalError without a SQLSTATE).
        if kind is None and not state and any(c.__name__ == "OperationalError" for c in type(orig).__mro__):
            kind = Failure.UNREACHABLE
    if kind is None:
        return None
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return StorageError(kind, f"{where}: {_ADVICE[kind]} ({detail})", detail=detail, where=where)


def serialize(conn: Connection, name: str) -> None:
    """Make the rest of the caller's transaction one step, across processes, with every other transaction that
    serializes on `name` (a check and the write that depends on it: the frequency cap and the `sending` mark, the
    schema's version and its migration). PostgreSQL: a transaction-level advisory lock, released at commit or
    rollback. SQLite: nothing more to do, a write transaction holds the database's one write lock from its start."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        conn.execute(select(func.pg_advisory_xact_lock(key)))


@contextmanager
def dbapi_cursor(conn: Connection) -> Iterator[DBAPICursor]:
    """The driver's own cursor on `conn`'s connection, inside its transaction: for the bulk paths, where
    SQLAlchemy's per-row result objects would cost more than reading the rows. The driver's errors come out as
    SQLAlchemy's (what `mapping` turns into `StorageError`), as from any other statement."""
    if not conn.in_transaction():
        # The driver's cursor does not begin SQLAlchemy's transaction by itself: begin it, so a read made only of
        # these statements is one snapshot too, and the begin hooks run (`storage.db`: SQLite's BEGIN, the check
        # that the database file is still there).
        conn.begin()
    cursor = conn.connection.cursor()
    base = conn.dialect.loaded_dbapi.Error
    try:
        yield cursor
    except base as exc:
        raise _as_sqlalchemy(conn, exc) from exc
    finally:
        cursor.close()


def _as_sqlalchemy(conn: Connection, exc: Exception) -> StatementError:
    """A driver's error as SQLAlchemy raises it (what `mapping` turns into `StorageError`)."""
    return DBAPIError.instance(None, None, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect)


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
    """INSERT … ON CONFLICT DO NOTHING for many rows given as tuples in `columns` order, through the driver's own
    bulk path (values must already be plain: str/int/float/bool/None; times via `db_time`): SQLite's executemany,
    which takes the rows one at a time from `rows` (an iterator is never held as a list); on PostgreSQL `COPY`
    into a temporary table, `chunk` rows at a time, then one INSERT … SELECT … ON CONFLICT DO NOTHING (COPY itself
    cannot pass over a conflict). Returns rows inserted."""
    if conn.dialect.name == "postgresql":
        return _copy_ignore(conn, table, rows, columns, chunk)
    cols = ", ".join(columns)
    marks = ", ".join(["?" if conn.dialect.paramstyle == "qmark" else "%s"] * len(columns))
    sql = f"INSERT INTO {table.name} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING"
    with dbapi_cursor(conn) as cursor:
        cursor.executemany(sql, rows)  # type: ignore[arg-type]  # sqlite3 takes any iterable
        return max(cursor.rowcount, 0)  # summed over the rows; rows passed over count 0


def _copy_ignore(
    conn: Connection, table: Table, rows: Iterable[tuple[Any, ...]], columns: Sequence[str], chunk: int
) -> int:
    cols = ", ".join(columns)
    # One staging table per table and column set, dropped at the end of the transaction.
    staging = f"wecast_copy_{table.name}_{hashlib.blake2b(cols.encode(), digest_size=4).hexdigest()}"
    inserted = 0
    with dbapi_cursor(conn) as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DROP AS SELECT {cols} FROM {table.name} WITH NO DATA"
        )
        batch: list[tuple[Any, ...]] = []

        def flush() -> int:
            with cursor.copy(f"COPY {staging} ({cols}) FROM STDIN") as copy:
                for row in batch:
                    copy.write_row(row)
            cursor.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {staging} ON CONFLICT DO NOTHING")
            count = max(cursor.rowcount, 0)
            cursor.execute(f"TRUNCATE {staging}")
            return count

        for row in rows:
            batch.append(row)
            if len(batch) >= chunk:
                inserted += flush()
                batch = []
        if batch:
            inserted += flush()
    return inserted


class CopyConflict(Exception):
    """A row of a `BackgroundCopy` violated a unique constraint: COPY cannot pass over a row, so the whole
    transaction is lost (the caller rolls it back and writes again the careful way, `insert_fast`)."""


class BackgroundCopy:
    """PostgreSQL only: batches of rows COPYed (binary) straight into a table, in the caller's transaction, each in
    a thread while the caller goes on with work that leaves the connection alone — a plan renders chunk k+1 while
    the server ingests chunk k (on two cores the two overlap, see `engine.plan.plan_run`). `start` hands a batch
    over (after the one before is written), `wait` returns when it is written; until then the caller must not use
    the connection (psycopg's own lock would make it wait, but SQLAlchemy's state is not meant for two threads).

    Straight into the table: no staging table, no INSERT … SELECT (which doubled the server's work), and binary
    (no text formatting of each value in Python, no parsing of it in the server). A row that conflicts with a
    unique constraint fails the batch, and with it the transaction: `wait` raises `CopyConflict`."""

    def __init__(self, conn: Connection, table: Table, columns: Sequence[str], types: Sequence[str]) -> None:
        if conn.dialect.name != "postgresql":
            raise ValueError("BackgroundCopy is for PostgreSQL")
        self.conn = conn
        self.sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        self.types = list(types)
        self.raw: Any = conn.connection.dbapi_connection
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wecast-copy")
        self.running: Future[int] | None = None

    def _copy(self, rows: Sequence[tuple[Any, ...]]) -> int:
        with self.raw.cursor() as cursor, cursor.copy(self.sql) as copy:
            copy.set_types(self.types)
            for row in rows:
                copy.write_row(row)
        return len(rows)

    def start(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Begin writing `rows` (in the background); returns how many the batch before it wrote."""
        done = self.wait()
        if rows:
            self.running = self.worker.submit(self._copy, rows)
        return done

    def wait(self) -> int:
        """Until the batch started last is written: how many rows it wrote (0 when none was running)."""
        running, self.running = self.running, None
        if running is None:
            return 0
        try:
            return running.result()
        except self.conn.dialect.loaded_dbapi.Error as exc:
            if getattr(exc, "sqlstate", None) == "23505":  # unique_violation
                raise CopyConflict(str(exc).strip().splitlines()[0]) from exc
            raise _as_sqlalchemy(self.conn, exc) from exc

    def close(self) -> None:
        """Wait for the batch in flight, if any, whatever it raises (the caller is on its way out with an error of
        its own, or already waited), then stop the thread."""
        try:
            with suppress(Exception):  # the caller's own error (or its rollback) is what matters now
                self.wait()
        finally:
            self.worker.shutdown(wait=True)


def db_time(conn: Connection, value: datetime | None) -> str | datetime | None:
    """A time as the DateTime column stores it: naive UTC, as text in SQLAlchemy's format on SQLite."""
    if value is None:
        return None
    naive = value.astimezone(UTC).replace(tzinfo=None)
    return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if conn.dialect.name == "sqlite" else naive


def db_bool(conn: Connection, value: bool) -> bool | int:
    """A boolean as a bulk insert binds it: 1 or 0 on SQLite (what the column stores either way). The sqlite3 module
    binds an exact int as it is, but looks for an adapter for every bool (a tuple built, a registry and two
    attribute lookups, per value): a tenth of a second over 100,000 planned rows."""
    return int(value) if conn.dialect.name == "sqlite" else value


def aware(value: Any) -> datetime | None:
    """A time read outside the column type (aggregates, raw cursors): aware UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value)
    try:  # stored naive (UTC): parsed with its offset, several times cheaper than `replace(tzinfo=UTC)` after it
        parsed = datetime.fromisoformat(text + "+00:00")
    except ValueError:  # a text with an offset of its own
        parsed = None
    if parsed is not None and parsed.tzinfo is UTC:
        return parsed
    return datetime.fromisoformat(text).replace(tzinfo=UTC)  # (a date alone reads "+00:00" as a time)


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
