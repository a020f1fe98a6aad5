"""Sandbox specifics the shared contract does not cover: its outbox file across versions, and 群发 tasks (batch
mode) that carry whole messages."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.errors import DatabaseError, LoginError, PermanentError
from engine.gateways.base import BatchOutcome, EventKind, GatewayEvent
from engine.gateways.sandbox import SandboxGateway, SandboxStore
from engine.messages import ImagePart, Media, Message, PartKind, TextPart, part_key
from engine.settings import SandboxSettings

try:
    from gateway_contract import media_file, png
except ImportError:  # pragma: no cover
    from tests.gateway_contract import media_file, png

pytestmark = pytest.mark.anyio

# The outbox and tasks tables as the first release wrote them (text only).
OLD_SCHEMA = """
CREATE TABLE account (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    contact_id TEXT NOT NULL,
    text TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    sent_at TEXT NOT NULL
);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    contact_ids TEXT NOT NULL,
    created_at TEXT NOT NULL,
    confirmed_at TEXT
);
INSERT INTO outbox VALUES (1, 'sbx-old', '7881001', '老消息', 'run1|7881001', '2026-01-05T02:00:00+00:00');
INSERT INTO tasks VALUES ('msgtask-old', 'k-old', '老任务', '["7881001"]', '2026-01-05T02:00:00+00:00', NULL);
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_an_old_outbox_file_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    """A sandbox file written before rich messages gains the part columns; its rows read as text parts, its
    tasks as text-only messages, and new parts are recorded beside them."""
    path = tmp_path / "sandbox.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    store = SandboxStore(path)
    SandboxStore(path).close()  # a second process opening the same file migrates nothing twice
    try:
        [old] = store.messages()
        assert (old.message_id, old.text, old.kind, old.content_hash, old.size) == ("sbx-old", "老消息", "text", "", 0)
        task = store.task("msgtask-old")
        assert task is not None
        assert [(p.kind, p.text) for p in task["parts"]] == [(PartKind.TEXT, "老任务")]
    finally:
        store.close()


@pytest.fixture
async def batch_sandbox(tmp_path: Path) -> AsyncIterator[SandboxGateway]:
    settings = SandboxSettings(
        contacts=30, mode="batch", confirm_delay=timedelta(0), state_file=tmp_path / "sandbox.sqlite"
    )
    gateway = SandboxGateway(settings)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


async def test_a_task_delivers_every_part_once(batch_sandbox: SandboxGateway, tmp_path: Path) -> None:
    """A 群发 task with a text and a poster delivers both parts to each customer when staff confirm, each part
    under its own key, once however often the results are read."""
    gateway = batch_sandbox
    poster = media_file(tmp_path, "poster.png", png(), "image/png")
    message = Message((TextPart("新品到店"), ImagePart(poster)))
    friends = [c.id for c in (await gateway.list_contacts(None, 100)).contacts if c.friend][:3]
    receipt = await gateway.submit_batch(friends, message, idempotency_key="task-1")
    assert receipt.accepted == tuple(friends)
    for _ in range(2):
        results = await gateway.batch_results(receipt.task_id)
        assert {r.outcome for r in results} == {BatchOutcome.SENT}
    rows = gateway.outbox_messages()
    assert sorted((m.contact_id, m.kind, m.idempotency_key) for m in rows) == sorted(
        (cid, kind, part_key(f"task-1|{cid}", i, 2)) for cid in friends for i, kind in enumerate(("text", "image"))
    )
    assert {m.content_hash for m in rows if m.kind == "image"} == {poster.sha256}
    assert gateway.files.reads == 1


async def test_a_task_with_a_missing_image_is_refused(batch_sandbox: SandboxGateway, tmp_path: Path) -> None:
    """Media that cannot be read fails the task at submission, as WeCom's upload would; nothing is queued."""
    gateway = batch_sandbox
    friends = [c.id for c in (await gateway.list_contacts(None, 100)).contacts if c.friend][:2]
    missing = Media(name="gone.png", path=tmp_path / "gone.png")
    with pytest.raises(PermanentError, match="missing"):
        await gateway.submit_batch(friends, Message((ImagePart(missing),)), idempotency_key="task-2")
    assert gateway.store.open_tasks() == []


@pytest.fixture
async def two_sandboxes(tmp_path: Path) -> AsyncIterator[tuple[SandboxGateway, SandboxGateway]]:
    """Two sandbox gateways on one state file, as `wecast serve` and a CLI command in another process are."""
    settings = SandboxSettings(contacts=40, auto_login=True, state_file=tmp_path / "sandbox.sqlite")
    first, second = SandboxGateway(settings), SandboxGateway(settings)
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_simulated_changes_persist_across_processes(
    two_sandboxes: tuple[SandboxGateway, SandboxGateway],
) -> None:
    """A customer added, tagged (a new tag by name) or removed through one gateway is what the other's next sync
    sees; the events are emitted where the simulation ran."""
    cli, serve = two_sandboxes
    seen: list[GatewayEvent] = []
    cli.subscribe(seen.append)
    new = cli.sandbox_add_contact("陈晓雯", city="杭州", tag_ids=["tag-vip"])
    bought = cli.sandbox_tag(new.id, "已购")
    book = {c.id: c for c in (await serve.list_contacts(None, 1000)).contacts}
    assert (book[new.id].name, book[new.id].city, set(book[new.id].tag_ids)) == (
        "陈晓雯",
        "杭州",
        {"tag-vip", bought.id},
    )
    assert bought.id in {t.id for t in await serve.list_tags()}
    old = next(iter(book))
    cli.sandbox_remove_contact(old)
    assert old not in {c.id for c in (await serve.list_contacts(None, 1000)).contacts}
    with pytest.raises(PermanentError, match="unknown contact"):
        await serve.send_text(old, "您好", idempotency_key="k")
    assert [e.kind for e in seen] == [EventKind.CONTACT_ADDED, EventKind.CONTACT_CHANGED, EventKind.CONTACT_REMOVED]


async def test_a_lost_event_is_found_by_the_next_sync(two_sandboxes: tuple[SandboxGateway, SandboxGateway]) -> None:
    """A new customer added without its event (as if the stream had dropped it) still appears in the next sync."""
    gateway, _ = two_sandboxes
    seen: list[GatewayEvent] = []
    gateway.subscribe(seen.append)
    quiet = gateway.sandbox_add_contact("林小雨", emit=False)
    assert seen == []
    assert quiet.id in {c.id for c in (await gateway.list_contacts(None, 1000)).contacts}


async def test_a_sync_pages_through_one_book(two_sandboxes: tuple[SandboxGateway, SandboxGateway]) -> None:
    """A contact removed while a sync pages through the book shifts no page: every contact is listed once."""
    gateway, other = two_sandboxes
    first = await gateway.list_contacts(None, 10)
    other.sandbox_remove_contact(first.contacts[0].id)
    ids = [c.id for c in first.contacts]
    cursor = first.next_cursor
    while cursor is not None:
        page = await gateway.list_contacts(cursor, 10)
        ids.extend(c.id for c in page.contacts)
        cursor = page.next_cursor
    assert len(ids) == len(set(ids)) == 40


async def test_simulation_refuses_what_cannot_be(two_sandboxes: tuple[SandboxGateway, SandboxGateway]) -> None:
    """Unknown contacts, unknown tag ids and untagging an unknown tag are clear errors."""
    gateway, _ = two_sandboxes
    with pytest.raises(PermanentError, match="unknown contact"):
        gateway.sandbox_incoming_message("7881999999999999", "hi")
    with pytest.raises(PermanentError, match="unknown tag"):
        gateway.sandbox_add_contact("王芳", tag_ids=["no-such-tag"])
    contact = (await gateway.list_contacts(None, 1)).contacts[0]
    with pytest.raises(PermanentError, match="no tag"):
        gateway.sandbox_tag(contact.id, "没有这个标签", add=False)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[SandboxGateway]:
    gateway = SandboxGateway(SandboxSettings(contacts=40, auto_login=True, state_file=tmp_path / "sandbox.sqlite"))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


async def _friends(gateway: SandboxGateway, n: int) -> list[str]:
    return [c.id for c in (await gateway.list_contacts(None, 100)).contacts if c.friend and not c.coworker][:n]


async def test_sends_in_one_turn_are_one_commit_each_on_record_once(sandbox: SandboxGateway) -> None:
    """Sends that reach the outbox in the same turn of the event loop are written together (group commit), and
    each still gets its own message id; the same idempotency key twice in one batch is one message, the second
    call answered with the first's id as a duplicate."""
    gateway = sandbox
    ids = await _friends(gateway, 8)
    batches: list[int] = []
    write = gateway.store.deliver_many

    def counted(parts: Any) -> Any:
        batches.append(len(parts))
        return write(parts)

    gateway.store.deliver_many = counted  # type: ignore[method-assign]
    receipts = await asyncio.gather(
        *(gateway.send_text(cid, f"第{i}条", idempotency_key=f"k-{cid}") for i, cid in enumerate(ids)),
        gateway.send_text(ids[0], "第0条", idempotency_key=f"k-{ids[0]}"),
    )
    assert batches == [len(ids) + 1]  # one transaction for all of them
    first, again = receipts[0], receipts[-1]
    assert (again.message_id, again.duplicate, first.duplicate) == (first.message_id, True, False)
    assert len({r.message_id for r in receipts[:-1]}) == len(ids)
    assert sorted((m.contact_id, m.idempotency_key) for m in gateway.outbox_messages()) == sorted(
        (cid, f"k-{cid}") for cid in ids
    )


async def test_a_batch_the_file_cannot_take_is_refused_whole(sandbox: SandboxGateway) -> None:
    """A full state file refuses the whole batch: every send of it raises the sandbox's DatabaseError saying
    nothing was delivered, and nothing of it is in the outbox."""
    gateway = sandbox
    ids = await _friends(gateway, 5)
    before = len(gateway.outbox_messages())
    with sqlite3.connect(gateway.settings.state_file) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    gateway.store._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here on
    long = "满" * 20_000  # a row that needs new pages
    results = await asyncio.gather(
        *(gateway.send_text(cid, long, idempotency_key=f"full-{cid}") for cid in ids), return_exceptions=True
    )
    assert all(isinstance(r, DatabaseError) and "nothing was delivered" in str(r) for r in results), results
    assert len(gateway.outbox_messages()) == before


async def test_a_send_cancelled_while_its_part_is_recorded_still_arrives(sandbox: SandboxGateway) -> None:
    """A send whose caller gives up (its timeout) after the part went out is on record all the same: the customer
    got it, as with a real server whose answer was lost; the retry under the same key is a duplicate."""
    gateway = sandbox
    [cid] = await _friends(gateway, 1)
    task = asyncio.ensure_future(gateway.send_text(cid, "您好", idempotency_key="cancelled-1"))
    await asyncio.sleep(0)  # the send is waiting for its batch to be written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    again = await gateway.send_text(cid, "您好", idempotency_key="cancelled-1")
    assert again.duplicate
    assert [m.idempotency_key for m in gateway.outbox_messages()].count("cancelled-1") == 1


async def test_each_qr_gets_a_fresh_code_and_an_old_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two logins in two processes (same seed) were shown the same 6-digit code, so a code read off the first QR
    logged in on the second; now each QR's code is fresh, never the one shown last, and an earlier QR's code or
    key is refused."""
    settings = SandboxSettings(contacts=10, auto_login=False, state_file=tmp_path / "sandbox.sqlite")

    async def scanned(gateway: SandboxGateway) -> tuple[str, str]:
        await gateway.start_login(schedule_phone=False)
        await gateway.sandbox_scan(quiet=True)
        code, key = gateway.sandbox_phone_code(), (await gateway.login_status()).qrcode_key
        assert code is not None and key is not None
        return code, key

    first, second = SandboxGateway(settings), SandboxGateway(settings)  # `wecast login` run twice
    try:
        old_code, old_key = await scanned(first)
        assert (await scanned(second))[0] != old_code
    finally:
        await first.close()
        await second.close()

    draws = iter([123456, 123456, 123456, 654321])  # the source repeating itself is not shown twice running
    monkeypatch.setattr("engine.gateways.sandbox.secrets.randbelow", lambda _n: next(draws))
    gateway = SandboxGateway(settings)
    try:
        old_code, old_key = await scanned(gateway)
        for _ in range(3):
            with pytest.raises(LoginError):
                await gateway.submit_verify_code("000000")
        code, key = await scanned(gateway)  # three wrong codes: a new QR
        assert (old_code, code) == ("123456", "654321") and key != old_key
        with pytest.raises(LoginError, match="qrcodeKey does not match"):
            await gateway.submit_verify_code(code, old_key)
        with pytest.raises(LoginError, match="wrong verification code; 2 tries left"):
            await gateway.submit_verify_code(old_code, key)
        assert (await gateway.submit_verify_code(code, key)).logged_in
    finally:
        await gateway.close()
