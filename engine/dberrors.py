"""wecast's database failures in the user's words: `explain` turns a `storage.errors.StorageError` (the drivers'
errors, mapped once in storage) into a `DatabaseError` with what to do, translated. The CLI prints it as one line
(exit 1) and the HTTP API answers it 503, so a full disk, a database locked past the busy timeout, an unreadable
file or a schema from a newer wecast never surface as an "internal error" or a traceback."""

from __future__ import annotations

from engine.errors import DatabaseError
from engine.i18n import tr
from storage.errors import Failure, StorageError


def explain(exc: StorageError) -> DatabaseError:
    """The translated, one-line error for a storage failure, naming the database and saying what to do."""
    db = exc.where or "database"
    detail = exc.detail or str(exc)
    if exc.kind is Failure.FULL:
        text = tr(
            "{db}: the disk is full (or the database reached its size limit): nothing of the last step was written; "
            "free some space, then continue with `wecast run --resume` ({detail})",
            db=db,
            detail=detail,
        )
    elif exc.kind is Failure.BUSY:
        text = tr(
            "{db}: another process held the database locked longer than the busy timeout: nothing of the last step "
            "was written; try again when it is done (`wecast run --resume` continues an interrupted run) ({detail})",
            db=db,
            detail=detail,
        )
    elif exc.kind is Failure.SCHEMA_NEWER:
        text = tr(
            "{db}: this database was written by a newer wecast (schema version {found}; this wecast knows {known}): "
            "upgrade wecast; an older release must not use this database",
            db=db,
            found=exc.found,
            known=exc.known,
        )
    elif exc.kind is Failure.SCHEMA_UNREADABLE:
        text = tr(
            "{db}: the schema version stored in this database ('{found}') is unreadable: it is not a database wecast "
            "wrote, or it was damaged; point database_url at wecast's database, or restore it from a backup",
            db=db,
            found=exc.found,
        )
    elif exc.kind is Failure.MIGRATION:
        text = tr(
            "{db}: the database could not be brought to schema version {known} (found {found}); nothing was changed: "
            "restore it from a backup, or report this with the output of `wecast -v`",
            db=db,
            found=exc.found,
            known=exc.known,
        )
    elif exc.kind is Failure.UNREACHABLE:
        text = tr(
            "{db}: the database server cannot be reached or ended the connection ({detail}): the step in progress "
            "was not finished; check that the server is running and that database_url (host, port, database, user, "
            "password) is right; a running `wecast serve` tries again by itself, `wecast run --resume` continues a run",
            db=db,
            detail=detail,
        )
    else:
        text = tr(
            "{db}: the database cannot be opened or read ({detail}): check database_url and that the file is "
            "wecast's database and may be read and written, or restore it from a backup",
            db=db,
            detail=detail,
        )
    return DatabaseError(text, kind=exc.kind.value)
