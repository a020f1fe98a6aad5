"""Sandbox specifics the shared contract does not cover: its outbox file across versions, and 群发 tasks (batch
mode) that carry whole messages."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from engine.errors import PermanentError
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
