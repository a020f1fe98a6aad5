"""The database's failures, mapped once from the driver's errors (`storage._sql.mapped`) and raised by every storage
function, so callers above storage never see SQLAlchemy's or a driver's exceptions:

    StorageError                 the database could not do what was asked; nothing of that transaction was written
    ├── (kind FULL)              the disk, or the database's own size limit, is full: free space, then resume
    ├── (kind BUSY)              another process held the database locked longer than the busy timeout: resume later
    ├── (kind UNAVAILABLE)       the database cannot be opened or read (I/O error, read-only, not a database)
    ├── (kind UNREACHABLE)       the database server cannot be reached, or ended the connection in use (a restart,
    │                            a failover, an administrator): try again when it answers
    └── SchemaError              the schema is newer than this wecast, unreadable, or a migration failed

`kind` says which; `str(e)` is one line in English for logs, with what to do; the engine words it for people
(`engine.dberrors`). Errors that are bugs (a constraint violated, bad SQL) are not mapped: they stay what they are.
"""

from __future__ import annotations

from enum import StrEnum


class Failure(StrEnum):
    """Why the database failed (see the module docstring)."""

    FULL = "full"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    UNREACHABLE = "unreachable"
    SCHEMA_NEWER = "schema_newer"
    SCHEMA_UNREADABLE = "schema_unreadable"
    MIGRATION = "migration"


class StorageError(RuntimeError):
    """The database could not do what was asked (see the module docstring). `where` names the database (a SQLite
    file's path, a server URL without its password), `detail` is the driver's own words, `found` the schema version
    as stored (SCHEMA_NEWER, SCHEMA_UNREADABLE) and `known` this wecast's — what the engine needs to word the error
    in the user's language."""

    def __init__(
        self, kind: Failure, message: str, *, detail: str = "", where: str = "", found: str = "", known: int = 0
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail
        self.where = where
        self.found = found
        self.known = known


class SchemaError(StorageError):
    """The database was written by a newer wecast, its schema version is unreadable, or a migration failed."""
