"""The wecom gateway's own state, in its own SQLite file (`wecom.state_file`), never in wecast's database.

* **tasks** — the 群发 task ledger: for each idempotency key the dispatcher gave, who sends, what was asked, when the
  first attempt started, and the msgid once WeCom answered. It is what makes `submit_batch` idempotent although
  `add_msg_template` is not: a key with a msgid is answered from here; a key whose attempt got no answer is first
  looked for among WeCom's recent tasks (`gateway.WecomGateway._find_task`).
* **media** — media ids by content hash and kind, with the upload time (WeCom keeps them 3 days).
* **follows** — the snapshot of one contact sync: every (customer, staff member) pair WeCom listed, so each
  customer is handed out once, with all of their staff members, whatever page their follows came on.

Several wecast processes may share the file (`wecast run` beside `wecast serve`); SQLite's locking serialises them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.gateways.statefile import open_state_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    content TEXT NOT NULL,
    recipients TEXT NOT NULL,
    started_at REAL NOT NULL,
    msgid TEXT UNIQUE,
    fail_list TEXT NOT NULL DEFAULT '[]',
    cancelled_at REAL
);
CREATE TABLE IF NOT EXISTS media (
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    media_id TEXT NOT NULL,
    uploaded_at REAL NOT NULL,
    PRIMARY KEY (sha256, kind)
);
CREATE TABLE IF NOT EXISTS follows (
    sync TEXT NOT NULL,
    external_userid TEXT NOT NULL,
    userid TEXT NOT NULL,
    contact TEXT NOT NULL,
    follow TEXT NOT NULL,
    PRIMARY KEY (sync, external_userid, userid)
);
CREATE TABLE IF NOT EXISTS syncs (sync TEXT PRIMARY KEY, started_at REAL NOT NULL, total INTEGER);
"""


@dataclass(frozen=True)
class TaskRow:
    key: str
    sender: str
    content: str
    recipients: tuple[str, ...]
    started_at: float
    msgid: str | None
    fail_list: tuple[str, ...]
    cancelled_at: float | None


class WecomStore:
    """Thread-safe access to the state file (the gateway calls it from worker threads)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = open_state_file(path)  # WAL, even when another process creates the file at the same moment
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- the task ledger ---------------------------------------------------------------------------
    def task(self, key: str) -> TaskRow | None:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM tasks WHERE key = ?", (key,)).fetchone()
        return _task(row) if row else None

    def task_by_msgid(self, msgid: str) -> TaskRow | None:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM tasks WHERE msgid = ?", (msgid,)).fetchone()
        return _task(row) if row else None

    def start_task(self, key: str, sender: str, content: str, recipients: Sequence[str], now: float) -> TaskRow:
        """Record an attempt before `add_msg_template` is called (kept as it is if the key has one already)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO tasks (key, sender, content, recipients, started_at) VALUES (?, ?, ?, ?, ?)",
                (key, sender, content, json.dumps(sorted(recipients)), now),
            )
            row = conn.execute("SELECT * FROM tasks WHERE key = ?", (key,)).fetchone()
        return _task(row)

    def finish_task(self, key: str, msgid: str, fail_list: Sequence[str]) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE tasks SET msgid = ?, fail_list = ? WHERE key = ?", (msgid, json.dumps(list(fail_list)), key)
            )

    def forget_attempt(self, key: str) -> None:
        """WeCom refused the attempt outright (an errcode): nothing was created, so no lookup is needed later."""
        with self._tx() as conn:
            conn.execute("DELETE FROM tasks WHERE key = ? AND msgid IS NULL", (key,))

    def known_msgids(self) -> set[str]:
        with self._tx() as conn:
            return {r[0] for r in conn.execute("SELECT msgid FROM tasks WHERE msgid IS NOT NULL")}

    def cancel_task(self, msgid: str, now: float) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE tasks SET cancelled_at = ? WHERE msgid = ? AND cancelled_at IS NULL", (now, msgid))

    # -- media -----------------------------------------------------------------------------------
    def media_id(self, sha256: str, kind: str, fresh_after: float) -> str | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT media_id FROM media WHERE sha256 = ? AND kind = ? AND uploaded_at > ?",
                (sha256, kind, fresh_after),
            ).fetchone()
        return str(row[0]) if row else None

    def put_media(self, sha256: str, kind: str, media_id: str, now: float) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO media (sha256, kind, media_id, uploaded_at) VALUES (?, ?, ?, ?)",
                (sha256, kind, media_id, now),
            )

    # -- contact sync snapshots --------------------------------------------------------------------
    def start_sync(self, sync: str, now: float, stale_before: float) -> None:
        """Open a snapshot (and drop those abandoned before `stale_before`)."""
        with self._tx() as conn:
            old = [r[0] for r in conn.execute("SELECT sync FROM syncs WHERE started_at < ?", (stale_before,))]
            for each in old:
                conn.execute("DELETE FROM follows WHERE sync = ?", (each,))
                conn.execute("DELETE FROM syncs WHERE sync = ?", (each,))
            conn.execute("INSERT INTO syncs (sync, started_at) VALUES (?, ?)", (sync, now))

    def add_follows(self, sync: str, rows: Sequence[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> None:
        """(external_userid, userid, contact, follow) for each pair of one page."""
        with self._tx() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO follows (sync, external_userid, userid, contact, follow) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (sync, ext, user, json.dumps(contact, ensure_ascii=False), json.dumps(follow, ensure_ascii=False))
                    for ext, user, contact, follow in rows
                ],
            )

    def seal_sync(self, sync: str) -> int:
        """Every page of WeCom is in: count the customers. Returns the count."""
        with self._tx() as conn:
            total = int(
                conn.execute("SELECT COUNT(DISTINCT external_userid) FROM follows WHERE sync = ?", (sync,)).fetchone()[
                    0
                ]
            )
            conn.execute("UPDATE syncs SET total = ? WHERE sync = ?", (total, sync))
        return total

    def sync_total(self, sync: str) -> int | None:
        """The customer count of a sealed snapshot; None if there is no such (sealed) snapshot."""
        with self._tx() as conn:
            row = conn.execute("SELECT total FROM syncs WHERE sync = ?", (sync,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def customers(
        self, sync: str, after: str, limit: int
    ) -> list[tuple[str, list[tuple[dict[str, Any], dict[str, Any]]]]]:
        """The next `limit` customers of a snapshot after `after` (by id), each with its (contact, follow) pairs."""
        with self._tx() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT external_userid FROM follows WHERE sync = ? AND external_userid > ? "
                    "ORDER BY external_userid LIMIT ?",
                    (sync, after, limit),
                )
            ]
            if not ids:
                return []
            rows = conn.execute(
                "SELECT external_userid, contact, follow FROM follows WHERE sync = ? AND external_userid >= ? "
                "AND external_userid <= ? ORDER BY external_userid, userid",
                (sync, ids[0], ids[-1]),
            ).fetchall()
        grouped: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {i: [] for i in ids}
        for ext, contact, follow in rows:
            grouped[ext].append((json.loads(contact), json.loads(follow)))
        return list(grouped.items())

    def end_sync(self, sync: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM follows WHERE sync = ?", (sync,))
            conn.execute("DELETE FROM syncs WHERE sync = ?", (sync,))


def _task(row: tuple[Any, ...]) -> TaskRow:
    key, sender, content, recipients, started_at, msgid, fail_list, cancelled_at = row
    return TaskRow(
        key,
        sender,
        content,
        tuple(json.loads(recipients)),
        started_at,
        msgid,
        tuple(json.loads(fail_list)),
        cancelled_at,
    )
