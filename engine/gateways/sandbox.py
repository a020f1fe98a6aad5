"""The sandbox gateway: a simulated WeCom account inside the process. The demo, and the test double.

It behaves like the real thing where it matters:

* **Login**: `start_login` shows a QR (same URL shape as WorkPro's); the simulated phone scans it after
  `scan_delay` (or at once with `sandbox_scan()`), then shows a 6-digit code in the log and through
  `sandbox_phone_code()`, a fresh one for each QR (a code read off an earlier QR is refused). Wrong codes are
  rejected with the tries left; after 3 a new QR is shown.
  With `second_verification`, WeCom's "new device" QR follows the first login once.
* **Customers**: about 200 realistic Chinese demo customers with tags (any number, deterministic per seed).
  Changes are kept in the state file, so every process sees them at its next sync: tags put on or taken off
  (`add_contact_tags` / `remove_contact_tags`, tags made with `create_tag`), and the simulated customers that
  the CLI and API drive — `sandbox_add_contact`, `sandbox_incoming_message`, `sandbox_tag`,
  `sandbox_remove_contact` — which emit what a real gateway emits (CONTACT_ADDED, MESSAGE, CONTACT_CHANGED,
  CONTACT_REMOVED) in the process that calls them.
* **Sending**: every part of every message a customer receives (text, image, file, link card, mini-program
  card) lands in the *outbox*, a SQLite file, one row per part with its kind, content hash and size, so tests
  and the CLI can count deliveries across processes (`wecast sandbox outbox`). A part is delivered exactly when
  its outbox row is committed. With `honor_idempotency_key` (the default) a resend with the same (part) key
  returns the first message id instead of delivering twice, as idempotent APIs do. Images and files are read
  once per content (`media_cache`) and refused as WeCom would: missing, over its size, changed since checked,
  an image that is not a JPG or PNG, a URL that is not https.
* **Faults**: latency, transient errors, rate limiting and timeouts whose outcome is unknown to the caller,
  at configurable rates, from a seeded random source; and per part kind, `sandbox_refuse(kind, reason)`.

The login state is kept in the same file, so `wecast login` in one process serves `wecast run` in the next.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from engine.clock import Clock
from engine.errors import (
    DatabaseError,
    LoginError,
    NotLoggedInError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
)
from engine.gateways.base import (
    BatchOutcome,
    BatchReceipt,
    BatchResult,
    Capabilities,
    ContactPage,
    ContactRecord,
    EventKind,
    Gateway,
    GatewayEvent,
    LoginState,
    LoginStatus,
    SendReceipt,
    TagRecord,
)
from engine.gateways.demo_data import demo_contacts, demo_tags
from engine.gateways.media_cache import MediaCache
from engine.gateways.statefile import open_state_file
from engine.i18n import N_, ntr, process_language, tr, use_language
from engine.messages import (
    FILE_MAX_BYTES,
    IMAGE_MAX_BYTES,
    LINK_TITLE_MAX,
    FilePart,
    ImagePart,
    LinkPart,
    Message,
    Part,
    PartKind,
    TextPart,
    part_key,
)
from engine.settings import Faults, SandboxSettings, Settings

log = logging.getLogger("wecast.sandbox")

ACCOUNT_ID = "1688850000000001"
ACCOUNT_NAME = "门店小助手(沙箱)"
MAX_CODE_TRIES = 3
NEW_DEVICE_TEXT = "你正在一台新设备上使用企业微信，需通过手机企业微信扫码进行安全验证"
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: what WeCom takes as an image

_SCHEMA = """
CREATE TABLE IF NOT EXISTS account (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    contact_id TEXT NOT NULL,
    text TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    sent_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_outbox_key ON outbox (idempotency_key);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    contact_ids TEXT NOT NULL,
    created_at TEXT NOT NULL,
    confirmed_at TEXT
);
CREATE INDEX IF NOT EXISTS ix_outbox_contact ON outbox (contact_id);
-- How the contact book differs from the demo one: changed or new contacts as JSON, removed ones as NULL,
-- listed after the demo book in the order of their first change (seq).
CREATE TABLE IF NOT EXISTS contact_changes (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    data TEXT
);
CREATE TABLE IF NOT EXISTS created_tags (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    group_name TEXT NOT NULL,
    type INTEGER NOT NULL
);
"""
# Columns added after the first release, with the defaults older rows read as: each outbox row is one part of a
# message (older files held text only), each task may carry a whole message (older ones only its text).
_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, contact_id, text, idempotency_key, sent_at, kind, content_hash, size, part)"
)

_ADDED_COLUMNS = {
    "outbox": (
        ("kind", "TEXT NOT NULL DEFAULT 'text'"),
        ("content_hash", "TEXT NOT NULL DEFAULT ''"),
        ("size", "INTEGER NOT NULL DEFAULT 0"),
        ("part", "TEXT NOT NULL DEFAULT ''"),
    ),
    "tasks": (("parts", "TEXT NOT NULL DEFAULT ''"),),
}


@dataclass(frozen=True)
class OutboxMessage:
    """One part a simulated customer received. `text` is the text part's text, a card's title, or an image's or
    file's name; `content_hash` is the sha256 of what was received (an image's or file's bytes as read, a text's
    UTF-8, a card's fields as JSON); `part` the part's JSON (`engine.messages`) for anything but text."""

    message_id: str
    contact_id: str
    text: str
    idempotency_key: str
    sent_at: str
    kind: str = PartKind.TEXT.value
    content_hash: str = ""
    size: int = 0
    part: str = ""


@dataclass(frozen=True)
class Received:
    """What the outbox records of one part (before it has a message id)."""

    kind: PartKind
    text: str
    content_hash: str
    size: int
    part: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Received:
        return cls(**{**data, "kind": PartKind(data["kind"])})


# SQLite's primary result codes that are the state file's condition, not a bug: FULL, BUSY, LOCKED, IOERR.
_STATE_FILE_FAILURES = {13: "full", 5: "busy", 6: "busy", 10: "unavailable"}


@contextmanager
def _state_file_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        kind = _STATE_FILE_FAILURES.get(code & 0xFF) if isinstance(code, int) else None
        if kind is None:
            raise
        raise DatabaseError(
            f"sandbox: its state file {path} could not be written ({exc}); nothing was delivered: "
            + ("free some space, then resume" if kind == "full" else "resume when it can be written again"),
            kind=kind,
        ) from exc


class SandboxStore:
    """The sandbox's SQLite file: login state and the outbox. Safe to open from several processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = open_state_file(path)  # WAL, even when another process creates the file at the same moment
        self._lock = threading.Lock()
        # The simulated account's file must survive its process being killed (the chaos tests count its outbox
        # after SIGKILL), which SQLite gives without syncing to disk: the OS has every write. Not syncing spares
        # the checkpoints' fsyncs, which otherwise cost a dispatch more wall time than all of wecast's own work.
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns newer versions use to a file an older one made (under the write lock, so two processes
        opening one old file do not both add them)."""
        with self._tx() as conn:
            for table, columns in _ADDED_COLUMNS.items():
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                for name, declaration in columns:
                    if name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. A write the file cannot take (its disk full, locked past the timeout, an I/O
        error) is a `DatabaseError` saying so: nothing of it was written — a part being delivered was not."""
        with self._lock, _state_file_errors(self.path):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does): a second ROLLBACK would fail and hide why.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _autocommit(self) -> Iterator[sqlite3.Connection]:
        """The connection for one statement that is its own transaction, with `_tx`'s lock and errors."""
        with self._lock, _state_file_errors(self.path):
            yield self._conn

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM account WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str | None) -> None:
        with self._tx() as conn:
            if value is None:
                conn.execute("DELETE FROM account WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO account (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    def deliver(self, contact_id: str, received: Received, key: str, *, dedupe: bool) -> tuple[str, bool]:
        """Record a delivered part; returns (message_id, duplicate)."""
        return self.deliver_many([(contact_id, received, key, dedupe)])[0]

    def deliver_many(self, parts: Sequence[tuple[str, Received, str, bool]]) -> list[tuple[str, bool]]:
        """Record delivered parts (contact id, what arrived, idempotency key, dedupe) in one transaction, all or
        none; returns (message_id, duplicate) for each. With dedupe, a part whose key is recorded already (before,
        or earlier in `parts`) is not recorded again: its first message id is returned.

        Each part is one statement (SQLite takes the write lock before a write statement reads, so the check and
        the insert are one step across processes), and one part alone needs no BEGIN and COMMIT around it."""
        out: list[tuple[str, bool]] = []
        with self._tx() if len(parts) > 1 else self._autocommit() as conn:
            for contact_id, received, key, dedupe in parts:
                message_id = "sbx-" + secrets.token_hex(8)
                values = (
                    message_id,
                    contact_id,
                    received.text,
                    key,
                    datetime.now(UTC).isoformat(),
                    received.kind.value,
                    received.content_hash,
                    received.size,
                    received.part,
                )
                if not dedupe:
                    conn.execute(_INSERT_OUTBOX + " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
                elif not conn.execute(
                    _INSERT_OUTBOX + " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? "
                    "WHERE NOT EXISTS (SELECT 1 FROM outbox WHERE idempotency_key = ?)",
                    (*values, key),
                ).rowcount:
                    row = conn.execute("SELECT message_id FROM outbox WHERE idempotency_key = ? LIMIT 1", (key,))
                    out.append((row.fetchone()[0], True))
                    continue
                out.append((message_id, False))
        return out

    def add_task(
        self, key: str, parts: list[Received], contact_ids: list[str], now: datetime
    ) -> tuple[str, list[str], bool]:
        """Record a mass-message task; returns (task_id, contact ids, already existed)."""
        text = next((p.text for p in parts if p.kind is PartKind.TEXT), "")
        with self._tx() as conn:
            row = conn.execute("SELECT task_id, contact_ids FROM tasks WHERE idempotency_key = ?", (key,)).fetchone()
            if row:
                return row[0], json.loads(row[1]), True
            task_id = "msgtask-" + secrets.token_hex(8)
            conn.execute(
                "INSERT INTO tasks (task_id, idempotency_key, text, contact_ids, created_at, parts)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    key,
                    text,
                    json.dumps(contact_ids),
                    now.isoformat(),
                    json.dumps([p.to_json() for p in parts], ensure_ascii=False),
                ),
            )
            return task_id, contact_ids, False

    def task(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT task_id, idempotency_key, text, contact_ids, created_at, confirmed_at, parts "
                "FROM tasks WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        if row is None:
            return None
        parts = [Received.from_json(p) for p in json.loads(row[6])] if row[6] else [_text_received(row[2])]
        return {
            "task_id": row[0],
            "key": row[1],
            "parts": parts,
            "contact_ids": json.loads(row[3]),
            "created_at": datetime.fromisoformat(row[4]),
            "confirmed_at": datetime.fromisoformat(row[5]) if row[5] else None,
        }

    def open_tasks(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT task_id FROM tasks WHERE confirmed_at IS NULL")]

    def confirm_task(self, task_id: str, now: datetime) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE tasks SET confirmed_at = ? WHERE task_id = ? AND confirmed_at IS NULL",
                (now.isoformat(), task_id),
            )

    def contacts_version(self) -> int:
        """Grows with every change to the contact book, from any process."""
        return int(self.get("contacts_version") or 0)

    def contact_changes(self) -> dict[str, str | None]:
        """Every changed contact (id -> JSON, None when removed), in the order they were first changed."""
        with self._lock:
            rows = self._conn.execute("SELECT id, data FROM contact_changes ORDER BY seq").fetchall()
        return {row[0]: row[1] for row in rows}

    def put_contact(self, contact_id: str, data: str | None) -> None:
        """Record a contact's new state (None: removed) and bump the book's version, in one transaction."""
        with self._tx() as conn:
            self._put_contact(conn, contact_id, data)

    def edit_contact(self, contact_id: str, base: str | None, edit: Callable[[str], str]) -> bool:
        """Change one contact as it is recorded now, in one write transaction — as a server applies each request to
        the contact as it is when the request arrives, so two processes tagging one contact at once both keep their
        change (a read in one step and a write in the next lost one of them). `edit` gets the contact's JSON (the
        recorded one, or `base` — its demo record — if it was never changed) and returns the new JSON. A contact
        removed (or unknown) is left alone. Returns whether it changed."""
        with self._tx() as conn:
            row = conn.execute("SELECT data FROM contact_changes WHERE id = ?", (contact_id,)).fetchone()
            current = row[0] if row else base
            if current is None:
                return False
            new = edit(current)
            if new == current:
                return False
            self._put_contact(conn, contact_id, new)
        return True

    @staticmethod
    def _put_contact(conn: sqlite3.Connection, contact_id: str, data: str | None) -> None:
        conn.execute(
            "INSERT INTO contact_changes (id, seq, data) VALUES "
            "(?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM contact_changes), ?) "
            "ON CONFLICT(id) DO UPDATE SET data = excluded.data",
            (contact_id, data),
        )
        conn.execute(
            "INSERT INTO account (key, value) VALUES ('contacts_version', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    def created_tags(self) -> list[TagRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT id, name, group_name, type FROM created_tags ORDER BY rowid").fetchall()
        return [TagRecord(id=r[0], name=r[1], group_name=r[2], type=int(r[3])) for r in rows]

    def add_tag(self, tag: TagRecord) -> TagRecord:
        """Record a new tag; if another process created one of that name and group first, that one."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT id, name, group_name, type FROM created_tags WHERE name = ? AND group_name = ?",
                (tag.name, tag.group_name),
            ).fetchone()
            if row:
                return TagRecord(id=row[0], name=row[1], group_name=row[2], type=int(row[3]))
            conn.execute(
                "INSERT INTO created_tags (id, name, group_name, type) VALUES (?, ?, ?, ?)",
                (tag.id, tag.name, tag.group_name, tag.type),
            )
            return tag

    def messages(self, contact_id: str | None = None) -> list[OutboxMessage]:
        sql = (
            "SELECT message_id, contact_id, text, idempotency_key, sent_at, kind, content_hash, size, part FROM outbox"
        )
        args: tuple[str, ...] = ()
        if contact_id:
            sql += " WHERE contact_id = ?"
            args = (contact_id,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [OutboxMessage(*row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def clear(self) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM outbox")


_CONTACT_FIELDS = {f.name for f in fields(ContactRecord)}


def _contact_json(contact: ContactRecord) -> str:
    data = asdict(contact)
    data["added_at"] = contact.added_at.isoformat() if contact.added_at else None
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _contact_from_json(text: str) -> ContactRecord:
    data = {k: v for k, v in json.loads(text).items() if k in _CONTACT_FIELDS}
    for key in ("phones", "tag_ids", "follow_user_ids"):
        data[key] = tuple(data.get(key) or ())
    added = data.get("added_at")
    data["added_at"] = datetime.fromisoformat(added) if added else None
    return ContactRecord(**data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text_received(text: str) -> Received:
    data = text.encode()
    return Received(PartKind.TEXT, text, _sha256(data), len(data))


def _card_received(part: Part, title: str, fields: dict[str, Any]) -> Received:
    blob = json.dumps(fields, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    return Received(part.kind, title, _sha256(blob), len(blob), _part_json(part))


def _part_json(part: Part) -> str:
    return json.dumps(Message((part,)).to_json()[0], ensure_ascii=False, separators=(",", ":"))


def _https(url: str, what: str) -> None:
    if not url.startswith("https://"):
        raise PermanentError(f"{what} must be an https URL (WeCom refuses {url[:60]!r})")


def _capabilities(settings: SandboxSettings) -> Capabilities:
    batch = settings.mode == "batch"
    return Capabilities(
        direct_send=not batch,
        batch_send=batch,
        idempotent_sends=settings.honor_idempotency_key,
        max_batch=10_000 if batch else 1,
        supports=frozenset(PartKind(kind) for kind in settings.supports),
        tags=True,
        events=True,
    )


class SandboxGateway(Gateway):
    """An in-process simulated WeCom account. See the module docstring."""

    name: ClassVar[str] = "sandbox"

    def __init__(self, settings: SandboxSettings, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self.settings = settings
        self.capabilities = _capabilities(settings)
        self.faults: Faults = settings.faults
        self._rng = random.Random(settings.seed)
        self._store: SandboxStore | None = None
        self._demo: list[ContactRecord] | None = None
        self._demo_by_id: dict[str, ContactRecord] = {}
        self._contacts: list[ContactRecord] | None = None
        self._contacts_version = -1
        self._sync_book: list[ContactRecord] | None = None  # the book a sync in progress pages through
        self._by_id: dict[str, ContactRecord] = {}
        self._state = LoginState.LOGGED_OUT
        self._qr_key: str | None = None
        self._code: str | None = None
        self._last_code: str | None = None  # the code the phone showed last (for any QR), never shown twice running
        self._tries_left = MAX_CODE_TRIES
        self._second_pending = False
        self._second_done = False
        self._phone_task: asyncio.Task[None] | None = None
        # Images and files are read once per content, like a real gateway's upload (what they hash to, how big).
        self.files: MediaCache[tuple[str, int, bytes]] = MediaCache(
            lambda media, content: (content.sha256, len(content.data), content.data[:8]), lambda _: 64
        )
        self._refusals: dict[PartKind, list[str]] = {}
        self._arriving: list[tuple[tuple[str, Received, str, bool], asyncio.Future[tuple[str, bool]]]] = []

    @classmethod
    def capabilities_for(cls, settings: Settings) -> Capabilities:
        return _capabilities(settings.sandbox)

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def store(self) -> SandboxStore:
        if self._store is None:
            self._store = SandboxStore(self.settings.state_file)
        return self._store

    async def start(self) -> None:
        if self.store.get("logged_in") == "1":
            self._state = LoginState.LOGGED_IN
            self._second_done = True
        elif self.settings.auto_login:
            await self.sandbox_login()

    async def close(self) -> None:
        if self._phone_task and not self._phone_task.done():
            self._phone_task.cancel()
        if self._store is not None:
            self._store.close()
            self._store = None

    async def sandbox_login(self) -> LoginStatus:
        """Sandbox only: play the whole login flow at once (the demo default): QR, scan, code, logged in."""
        if (await self.start_login(schedule_phone=False)).logged_in:
            return await self.login_status()
        await self.sandbox_scan(quiet=True)
        if self._state is LoginState.WAITING_VERIFY_CODE and self._code:
            await self.submit_verify_code(self._code, self._qr_key)
        if self._state is not LoginState.LOGGED_IN and self._second_pending:
            await self.sandbox_scan()
        return await self.login_status()

    # -- login -----------------------------------------------------------------------------------
    async def login_status(self) -> LoginStatus:
        qr = self._qr_url() if self._state in (LoginState.WAITING_SCAN, LoginState.SCANNED) else None
        return LoginStatus(
            state=self._state,
            qr_url=qr,
            qrcode_key=self._qr_key if self._state is not LoginState.LOGGED_IN else None,
            second_verification=self._second_pending,
            account_id=ACCOUNT_ID if self._state is LoginState.LOGGED_IN else None,
            account_name=ACCOUNT_NAME if self._state is LoginState.LOGGED_IN else None,
            tries_left=self._tries_left if self._state is LoginState.WAITING_VERIFY_CODE else None,
            message=self._message(),
        )

    def _message(self) -> str:
        # In the language in force where the status is asked for (a request's, the CLI's). The code prompt is
        # WeCom's own wording, as the puppet passes it on.
        if self._state is LoginState.WAITING_VERIFY_CODE:
            return "请输入企业微信手机端展示的验证码，以继续登录"
        return tr(
            {
                LoginState.LOGGED_OUT: N_("not logged in: call /goStart for a QR code"),
                LoginState.WAITING_SCAN: N_("scan the security-check QR code with WeCom on the phone")
                if self._second_pending
                else N_("scan the QR code with WeCom on the phone"),
                LoginState.SCANNED: N_("QR code scanned: confirm on the phone"),
                LoginState.LOGGED_IN: N_("logged in"),
            }[self._state]
        )

    def _qr_url(self) -> str:
        base = "https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key="
        extra = "&secondaryEquipment=1" if self._second_pending else ""
        return f"{base}{self._qr_key}&wx=1&sandbox=1{extra}"

    def _new_qr(self) -> None:
        self._qr_key = secrets.token_hex(16).upper()
        self._code = None
        self._tries_left = MAX_CODE_TRIES
        self._state = LoginState.WAITING_SCAN
        self.emit(
            EventKind.QR,
            self._message(),
            qr_url=self._qr_url(),
            qrcode_key=self._qr_key,
            second_verification=self._second_pending,
        )

    async def start_login(self, *, schedule_phone: bool = True) -> LoginStatus:
        if self._state is LoginState.LOGGED_IN:
            return await self.login_status()
        if self._state is LoginState.LOGGED_OUT:
            self._new_qr()
        if schedule_phone and self._state is LoginState.WAITING_SCAN:
            self._schedule_phone()
        return await self.login_status()

    def _schedule_phone(self) -> None:
        if self._phone_task and not self._phone_task.done():
            return
        key = self._qr_key

        async def phone() -> None:
            await self.clock.sleep(self.settings.scan_delay.total_seconds())
            if self._qr_key == key and self._state is LoginState.WAITING_SCAN:
                await self.sandbox_scan()

        self._phone_task = asyncio.get_running_loop().create_task(phone())

    async def sandbox_scan(self, *, quiet: bool = False) -> LoginStatus:
        """Sandbox only: the simulated phone scans the current QR and confirms."""
        if self._state is not LoginState.WAITING_SCAN:
            raise LoginError(tr("no QR is waiting to be scanned; call start_login (POST /goStart) first"))
        self.emit(EventKind.SCANNED, tr("QR code scanned"))
        if self._second_pending:
            # The security check needs only the scan; the session carries on.
            self._second_pending = False
            self._second_done = True
            self._logged_in()
            return await self.login_status()
        self._code = self._fresh_code()
        self._state = LoginState.WAITING_VERIFY_CODE
        with use_language(process_language()):  # a log line: the reader of the log, whoever asked for the scan
            shown = tr(
                "sandbox phone: WeCom shows verification code {code} for QR {key}", code=self._code, key=self._qr_key
            )
        log.log(logging.INFO if quiet else logging.WARNING, "%s", shown)
        self.emit(EventKind.VERIFY_CODE, self._message(), qrcode_key=self._qr_key)
        return await self.login_status()

    def _fresh_code(self) -> str:
        # Not from the seeded source: that would show every process (each `wecast login`) the same first code, so a
        # code read off an earlier QR would log in on a later one. Never the code shown last, for the same reason.
        while True:
            code = f"{secrets.randbelow(10**6):06d}"
            if code != self._last_code:
                self._last_code = code
                return code

    def sandbox_phone_code(self) -> str | None:
        """Sandbox only: the 6-digit code the simulated phone shows (None when no code is showing)."""
        return self._code if self._state is LoginState.WAITING_VERIFY_CODE else None

    async def submit_verify_code(self, code: str, qrcode_key: str | None = None) -> LoginStatus:
        if self._state is LoginState.LOGGED_IN:
            raise LoginError(tr("already logged in; no verification code is needed"))
        if self._state is not LoginState.WAITING_VERIFY_CODE:
            raise LoginError(
                tr("no verification code is expected now: scan the QR first")
                if self._state is not LoginState.LOGGED_OUT
                else tr("no login in progress; call /goStart first")
            )
        if qrcode_key and qrcode_key != self._qr_key:
            raise LoginError(
                tr("qrcodeKey does not match the current QR code (it may have expired); use the key of the latest QR"),
                tries_left=self._tries_left,
            )
        cleaned = "".join(ch for ch in str(code) if ch.isdigit())
        if len(cleaned) != 6:
            raise LoginError(
                tr("the verification code must be the 6 digits shown on the phone"), tries_left=self._tries_left
            )
        if cleaned != self._code:
            self._tries_left -= 1
            if self._tries_left <= 0:
                self.emit(EventKind.VERIFY_CODE_WRONG, "验证码错误次数超过阈值，请重新扫码")
                self._new_qr()
                self._schedule_phone_if_running()
                raise LoginError(
                    tr("too many wrong verification codes: a new QR code is shown, scan it again"), tries_left=0
                )
            self.emit(EventKind.VERIFY_CODE_WRONG, "验证码错误输入错误，请重新输入", tries_left=self._tries_left)
            raise LoginError(
                ntr(
                    "wrong verification code; {n} try left", "wrong verification code; {n} tries left", self._tries_left
                ),
                tries_left=self._tries_left,
            )
        self._logged_in()
        if self.settings.second_verification and not self._second_done:
            # WeCom's "new device" check: the session drops and a security QR follows.
            self._second_pending = True
            self._state = LoginState.LOGGED_OUT
            self.store.put("logged_in", None)
            self.emit(EventKind.LOGOUT, NEW_DEVICE_TEXT, reason=NEW_DEVICE_TEXT)
            self.emit(EventKind.SECOND_VERIFICATION, NEW_DEVICE_TEXT)
            self._new_qr()
            self._schedule_phone_if_running()
        return await self.login_status()

    def _schedule_phone_if_running(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._phone_task is not None:  # the phone is only simulated when a login was started for it
            self._phone_task = None
            self._schedule_phone()

    def _logged_in(self) -> None:
        self._state = LoginState.LOGGED_IN
        self._code = None
        self.store.put("logged_in", "1")
        self.emit(EventKind.LOGIN, f"登录成功：{ACCOUNT_NAME}", account_id=ACCOUNT_ID, account_name=ACCOUNT_NAME)
        self.emit(EventKind.READY, "data ready")

    async def logout(self) -> LoginStatus:
        was = self._state
        self._state = LoginState.LOGGED_OUT
        self._qr_key = None
        self._code = None
        self._second_pending = False
        self.store.put("logged_in", None)
        if was is LoginState.LOGGED_IN:
            self.emit(EventKind.LOGOUT, "logout()", reason="logout()")
        return await self.login_status()

    # -- contacts --------------------------------------------------------------------------------
    def _demo_book(self) -> list[ContactRecord]:
        if self._demo is None:
            # "Added" dates count back from the day this sandbox was first used, so the demo always has
            # recent customers, and stays the same from one run to the next.
            epoch = self.store.get("demo_epoch")
            if epoch is None:
                epoch = self.clock.now().replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
                self.store.put("demo_epoch", epoch)
            self._demo = demo_contacts(self.settings.contacts, self.settings.seed, now=datetime.fromisoformat(epoch))
            self._demo_by_id = {c.id: c for c in self._demo}
        return self._demo

    def _all_contacts(self) -> list[ContactRecord]:
        """The contact book: the demo one with the changes recorded in the store (by this process or another)."""
        version = self.store.contacts_version()
        if self._contacts is None or version != self._contacts_version:
            changes = self.store.contact_changes()
            book = []
            for contact in self._demo_book():
                if contact.id not in changes:
                    book.append(contact)
                elif (data := changes.pop(contact.id)) is not None:
                    book.append(_contact_from_json(data))
            book.extend(_contact_from_json(data) for data in changes.values() if data is not None)
            self._contacts, self._contacts_version = book, version
            self._by_id = {c.id: c for c in book}
        return self._contacts

    async def list_contacts(self, cursor: str | None = None, page_size: int = 500) -> ContactPage:
        """Pages of the book as it was when the sync began (cursor None), so a change meanwhile shifts nothing."""
        self._require_login()
        if cursor is None or self._sync_book is None:
            self._sync_book = self._all_contacts()
        contacts = self._sync_book
        try:
            start = int(cursor) if cursor else 0
        except ValueError:
            raise PermanentError(f"invalid contact page cursor {cursor!r}") from None
        end = start + max(1, page_size)
        return ContactPage(contacts[start:end], str(end) if end < len(contacts) else None, total=len(contacts))

    async def list_tags(self) -> list[TagRecord]:
        self._require_login()
        return self._tags()

    def _tags(self) -> list[TagRecord]:
        return demo_tags() + self.store.created_tags()

    async def get_contact(self, contact_id: str) -> ContactRecord | None:
        self._all_contacts()
        return self._by_id.get(contact_id)

    def _contact(self, contact_id: str) -> ContactRecord:
        self._all_contacts()
        contact = self._by_id.get(contact_id)
        if contact is None:
            raise PermanentError(f"unknown contact {contact_id}")
        return contact

    def _save(self, contact: ContactRecord) -> None:
        self.store.put_contact(contact.id, _contact_json(contact))

    # -- tags ------------------------------------------------------------------------------------
    async def add_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        """Put tags on a contact (idempotent); a change is saved and announced as CONTACT_CHANGED."""
        self._require_login()
        self._retag(contact_id, tag_ids, add=True)

    async def remove_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        """Take tags off a contact (idempotent); a change is saved and announced as CONTACT_CHANGED."""
        self._require_login()
        self._retag(contact_id, tag_ids, add=False)

    def _retag(self, contact_id: str, tag_ids: Sequence[str], *, add: bool) -> None:
        self._contact(contact_id)  # an unknown contact is refused
        known = {t.id for t in self._tags()}
        unknown = [t for t in tag_ids if t not in known]
        if unknown:
            raise PermanentError(f"unknown tag ids: {', '.join(unknown)}")
        wanted = list(dict.fromkeys(tag_ids))

        def edit(data: str) -> str:
            contact = _contact_from_json(data)
            if add:
                tags = (*contact.tag_ids, *(t for t in wanted if t not in contact.tag_ids))
            else:
                tags = tuple(t for t in contact.tag_ids if t not in wanted)
            return data if tags == contact.tag_ids else _contact_json(replace(contact, tag_ids=tags))

        # On the contact as recorded now, not as this process last read it (another may have tagged it since).
        self._demo_book()
        demo = self._demo_by_id.get(contact_id)
        if self.store.edit_contact(contact_id, None if demo is None else _contact_json(demo), edit):
            self.emit(EventKind.CONTACT_CHANGED, contact_id=contact_id)

    async def create_tag(self, name: str, group_name: str = "") -> TagRecord:
        """A new tag (corporate in a group, personal without one), or the existing one of that name and group."""
        self._require_login()
        return self._create_tag(name, group_name)

    def _create_tag(self, name: str, group_name: str = "") -> TagRecord:
        name, group_name = name.strip(), group_name.strip()
        if not name:
            raise PermanentError("a tag needs a name")
        for tag in self._tags():
            if tag.name == name and tag.group_name == group_name:
                return tag
        tag = TagRecord(id=f"tag-{secrets.token_hex(4)}", name=name, group_name=group_name, type=2 if group_name else 1)
        return self.store.add_tag(tag)

    # -- simulated customers ---------------------------------------------------------------------
    def sandbox_add_contact(
        self,
        name: str,
        *,
        gender: int = 0,
        city: str = "",
        province: str = "",
        alias: str = "",
        phones: Sequence[str] = (),
        tag_ids: Sequence[str] = (),
        emit: bool = True,
    ) -> ContactRecord:
        """Sandbox only: a new customer adds the account. The contact is saved (the next sync lists it) and
        CONTACT_ADDED is emitted, as a real gateway does (`emit=False`: the event is lost; only a sync finds it)."""
        if not name.strip():
            raise PermanentError("a new contact needs a name")
        known = {t.id for t in self._tags()}
        unknown = [t for t in tag_ids if t not in known]
        if unknown:
            raise PermanentError(f"unknown tag ids: {', '.join(unknown)}")
        self._all_contacts()
        contact_id = f"7881{secrets.randbelow(10**12):012d}"
        while contact_id in self._by_id:
            contact_id = f"7881{secrets.randbelow(10**12):012d}"
        contact = ContactRecord(
            id=contact_id,
            name=name.strip(),
            alias=alias,
            gender=gender,
            city=city,
            province=province,
            phones=tuple(phones),
            friend=True,
            type=1,
            added_at=self.clock.now(),
            tag_ids=tuple(dict.fromkeys(tag_ids)),
            follow_user_ids=(ACCOUNT_ID,),
        )
        self._save(contact)
        if emit:
            self.emit(
                EventKind.CONTACT_ADDED,
                f"新客户 {contact.name}",
                contact_id=contact_id,
                staff_id=ACCOUNT_ID,
                welcome_code="",
            )
        return contact

    def sandbox_incoming_message(self, contact_id: str, text: str) -> GatewayEvent:
        """Sandbox only: the customer writes to the account; emits MESSAGE with the text."""
        contact = self._contact(contact_id)
        if not contact.friend:
            raise PermanentError(f"{contact_id} is not a friend of this account and cannot write to it")
        message_id = "sbx-in-" + secrets.token_hex(8)
        return self.emit(
            EventKind.MESSAGE, text[:200], contact_id=contact_id, message_id=message_id, text=text, type="text"
        )

    def sandbox_tag(self, contact_id: str, tag: str, add: bool = True) -> TagRecord:
        """Sandbox only: staff tag the customer on the phone (or untag): `tag` is a tag id or name (a new name is
        created). The change is saved and CONTACT_CHANGED emitted, as WeCom's DIRTY does."""
        record = next((t for t in self._tags() if tag in (t.id, t.name)), None)
        if record is None:
            if not add:
                raise PermanentError(f"no tag {tag!r}")
            record = self._create_tag(tag)
        self._retag(contact_id, [record.id], add=add)
        return record

    def sandbox_remove_contact(self, contact_id: str, *, emit: bool = True) -> None:
        """Sandbox only: the customer deletes the account. Gone from the book (the next sync misses it, sends to
        it fail) and CONTACT_REMOVED emitted (`emit=False`: the event is lost)."""
        self._contact(contact_id)
        self.store.put_contact(contact_id, None)
        if emit:
            self.emit(EventKind.CONTACT_REMOVED, contact_id=contact_id, staff_id=ACCOUNT_ID, by="customer")

    # -- sending ---------------------------------------------------------------------------------
    def _require_login(self) -> None:
        if self._state is not LoginState.LOGGED_IN:
            raise NotLoggedInError("the WeCom account is not logged in")

    def _reachable(self, contact_id: str) -> str | None:
        """Why a contact cannot receive messages (None: it can)."""
        contact = self._by_id.get(contact_id)
        if contact is None:
            return f"unknown contact {contact_id}"
        if not contact.friend:
            return f"{contact_id} is not a friend of this account (deleted or never added)"
        return None

    async def send_text(self, contact_id: str, text: str, *, idempotency_key: str) -> SendReceipt:
        return await self.send_part(contact_id, TextPart(text), idempotency_key=idempotency_key)

    async def send_part(self, contact_id: str, part: Part, *, idempotency_key: str) -> SendReceipt:
        """Deliver one part of any kind into the outbox (one row per part, deduplicated by the part's key), after
        the checks WeCom would make and the injected faults."""
        self._require_login()
        self._all_contacts()
        if self.settings.mode == "batch":
            raise PermanentError("this account sends through mass-message tasks (群发) only")
        if part.kind not in self.capabilities.supports:
            raise PermanentError(f"this account cannot send {part.kind.value} parts (sandbox.supports)")
        problem = self._reachable(contact_id)
        if problem:
            raise PermanentError(problem)
        received = await self._receive(part)
        refusals = self._refusals.get(part.kind)
        if refusals:
            raise PermanentError(refusals.pop(0))
        await self._faults_before_send()
        dedupe = self.capabilities.idempotent_sends
        if self._rng.random() < self.faults.timeout_rate:
            if self._rng.random() < 0.5:  # the message went out, the answer was lost
                await self._deliver(contact_id, received, idempotency_key, dedupe)
            raise UnknownOutcomeError("sandbox: injected timeout after the request was sent")
        message_id, duplicate = await self._deliver(contact_id, received, idempotency_key, dedupe)
        return SendReceipt(message_id=message_id, duplicate=duplicate)

    async def _deliver(self, contact_id: str, received: Received, key: str, dedupe: bool) -> tuple[str, bool]:
        """Put a part in the outbox: with the parts that arrive in the same turn of the event loop, in one
        transaction (group commit), so that the simulated account's bookkeeping — a remote server's, for a real
        gateway — does not cost each send a commit of its own on the loop. The send returns once its part is on
        record; a send cancelled meanwhile (its timeout) still arrives, as with a real server."""
        loop = asyncio.get_running_loop()
        arrived: asyncio.Future[tuple[str, bool]] = loop.create_future()
        self._arriving.append(((contact_id, received, key, dedupe), arrived))
        if len(self._arriving) == 1:
            loop.call_soon(self._write_arrivals)
        return await arrived

    def _write_arrivals(self) -> None:
        batch, self._arriving = self._arriving, []
        try:
            receipts = self.store.deliver_many([part for part, _ in batch])
        except Exception as exc:  # nothing of the batch was written (a full disk): every send of it says so
            for _, arrived in batch:
                if not arrived.done():
                    arrived.set_exception(exc)
            return
        for (_, arrived), receipt in zip(batch, receipts, strict=True):
            if not arrived.done():
                arrived.set_result(receipt)

    async def _receive(self, part: Part) -> Received:
        """What the customer would receive for `part`, or PermanentError for what WeCom would refuse."""
        if isinstance(part, TextPart):
            if not part.text.strip():
                raise PermanentError("empty message")
            return _text_received(part.text)
        if isinstance(part, ImagePart | FilePart):
            media, image = part.media, isinstance(part, ImagePart)
            what = f"the {'image' if image else 'file'} {media.name}"
            if media.url is not None:
                _https(media.url, what)
                return Received(part.kind, media.name, media.sha256, media.size, _part_json(part))
            sha, size, head = await self.files.get(media, IMAGE_MAX_BYTES if image else FILE_MAX_BYTES)
            if image and not head.startswith(IMAGE_SIGNATURES):
                raise PermanentError(f"{what} is not a JPG or PNG image")
            return Received(part.kind, media.name, sha, size, _part_json(part))
        if isinstance(part, LinkPart):
            _https(part.url, "a link card's url")
            if not part.title.strip():
                raise PermanentError("a link card needs a title")
            if len(part.title.encode()) > LINK_TITLE_MAX:
                raise PermanentError(f"a link card's title is at most {LINK_TITLE_MAX} bytes")
            fields = {"url": part.url, "title": part.title, "description": part.description, "thumb": part.thumb_url}
            return _card_received(part, part.title, fields)
        if not part.appid or not part.title.strip():
            raise PermanentError("a mini-program card needs an appid and a title")
        thumb = ""
        if part.thumb is not None:
            if part.thumb.url is not None:
                _https(part.thumb.url, "a mini-program cover")
                thumb = part.thumb.sha256 or part.thumb.url
            else:
                thumb = (await self.files.get(part.thumb, IMAGE_MAX_BYTES))[0]
        fields = {"appid": part.appid, "title": part.title, "page": part.page, "thumb": thumb}
        return _card_received(part, part.title, fields)

    async def _faults_before_send(self) -> None:
        """Injected latency, rate limiting and transient errors (all before anything is delivered)."""
        faults = self.faults
        if faults.latency_ms or faults.latency_jitter_ms:
            await self.clock.sleep((faults.latency_ms + self._rng.random() * faults.latency_jitter_ms) / 1000)
        roll = self._rng.random()
        if roll < faults.rate_limit_rate:
            raise RateLimitedError(
                "WorkproErrorCode: 20001, Feature temporarily unavailable (sandbox)", retry_after=1.0
            )
        roll -= faults.rate_limit_rate
        if roll < faults.error_rate:
            raise TransientError("sandbox: injected transient error (UNAVAILABLE)")

    # -- mass-message tasks (mode: batch) --------------------------------------------------------
    async def submit_batch(
        self, contact_ids: list[str], message: Message | str, *, idempotency_key: str, sender: str = ""
    ) -> BatchReceipt:
        """Create a 群发 task: one message for many customers, delivered when staff confirm it."""
        if self.settings.mode != "batch":
            return await super().submit_batch(contact_ids, message, idempotency_key=idempotency_key, sender=sender)
        if isinstance(message, str):
            message = Message.of_text(message)
        self._require_login()
        self._all_contacts()
        if not message.parts:
            raise PermanentError("empty message")
        parts = [await self._receive(part) for part in message.parts]  # bad media fails the task, as upload does
        await self._faults_before_send()
        rejected = {cid: why for cid in contact_ids if (why := self._reachable(cid))}
        accepted = [cid for cid in contact_ids if cid not in rejected]
        task_id, ids, _existing = self.store.add_task(idempotency_key, parts, accepted, self.clock.now())
        return BatchReceipt(task_id=task_id, accepted=tuple(ids), rejected=rejected)

    async def batch_results(self, task_id: str) -> list[BatchResult]:
        if self.settings.mode != "batch":
            return await super().batch_results(task_id)
        task = self.store.task(task_id)
        if task is None:
            raise PermanentError(f"unknown task {task_id}")
        if task["confirmed_at"] is None and self.clock.now() >= task["created_at"] + self.settings.confirm_delay:
            self.store.confirm_task(task_id, self.clock.now())
            task["confirmed_at"] = self.clock.now()
        if task["confirmed_at"] is None:
            return [BatchResult(cid, BatchOutcome.PENDING) for cid in task["contact_ids"]]
        out = []
        parts: list[Received] = task["parts"]
        for cid in task["contact_ids"]:
            ids = [
                self.store.deliver(cid, received, part_key(f"{task['key']}|{cid}", i, len(parts)), dedupe=True)[0]
                for i, received in enumerate(parts)
            ]
            out.append(BatchResult(cid, BatchOutcome.SENT, message_id=ids[0]))
        return out

    def sandbox_confirm_tasks(self) -> int:
        """Sandbox only: staff confirm every waiting task now (delivery happens at the next results query)."""
        waiting = self.store.open_tasks()
        for task_id in waiting:
            self.store.confirm_task(task_id, self.clock.now())
        return len(waiting)

    # -- sandbox-only helpers ------------------------------------------------------------------------
    def outbox_messages(self, contact_id: str | None = None) -> list[OutboxMessage]:
        """Every part delivered (to `contact_id`, or to anyone), oldest first."""
        return self.store.messages(contact_id)

    def sandbox_refuse(self, kind: PartKind, reason: str, count: int = 1) -> None:
        """Sandbox only: the next `count` parts of `kind` are refused for good with `reason` (nothing delivered),
        as WeCom refuses an image it does not like."""
        self._refusals.setdefault(kind, []).extend([reason] * count)
