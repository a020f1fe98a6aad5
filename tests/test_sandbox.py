"""Sandbox specifics the shared contract does not cover: its outbox file across versions, and 群发 tasks (batch
mode) that carry whole messages."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from engine.errors import PermanentError
from engine.gateways.base import BatchOutcome
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
