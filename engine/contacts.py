"""Contact sync: the gateway's customer list -> the local database (contacts, tags, links).

Sync pages through `Gateway.list_contacts`, upserts each page in its own transaction (so a sync of
100,000 contacts never holds one huge transaction), and at the end marks contacts the gateway no longer
lists as removed (their delivery history stays). Database writes run off the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from engine.blocking import off_loop
from engine.clock import Clock, SystemClock
from engine.gateways.base import ContactRecord, Gateway, TagRecord
from storage import contacts as contacts_db
from storage.contacts import ContactRow, TagRow

SyncProgress = Callable[[int, int | None], None]  # (contacts seen so far, total if the gateway knows it)


@dataclass
class SyncResult:
    seen: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    tags: int = 0


# The fields a contact record and a stored contact share (by name). The staff members who follow a customer
# (`follow_user_ids`, for the official API's 群发 tasks) are not stored yet.
_STORED = {f.name for f in dataclasses.fields(ContactRow)}
_SHARED = [f.name for f in dataclasses.fields(ContactRecord) if f.name in _STORED]


def record_to_row(c: ContactRecord) -> ContactRow:
    """A gateway's contact as the database stores it (the same field names)."""
    return ContactRow(**{name: getattr(c, name) for name in _SHARED})


def tag_to_row(t: TagRecord) -> TagRow:
    return TagRow(t.id, t.name, t.group_name, t.type)


async def sync_contacts(
    gateway: Gateway,
    db: Engine,
    *,
    clock: Clock | None = None,
    page_size: int = 500,
    progress: SyncProgress | None = None,
) -> SyncResult:
    """Pull every contact and tag from the gateway into the database."""
    clock = clock or SystemClock()
    now = clock.now()
    result = SyncResult()
    tags = await gateway.list_tags()
    await off_loop(contacts_db.upsert_tags, db, [tag_to_row(t) for t in tags])
    result.tags = len(tags)
    seen: set[str] = set()
    cursor: str | None = None
    while True:
        page = await gateway.list_contacts(cursor, page_size)
        fresh = [c for c in page.contacts if c.id not in seen]
        seen.update(c.id for c in fresh)
        added, updated = await off_loop(contacts_db.upsert_contacts, db, [record_to_row(c) for c in fresh], now)
        result.added += added
        result.updated += updated
        if progress:
            progress(len(seen), page.total)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    result.removed = await off_loop(contacts_db.mark_removed, db, seen, now)
    result.seen = len(seen)
    return result


async def refresh_contact(gateway: Gateway, db: Engine, contact_id: str, *, clock: Clock | None = None) -> bool:
    """Re-read one contact (after the gateway said it changed: a DIRTY event). Returns whether it still exists;
    a contact the gateway no longer has is marked removed."""
    clock = clock or SystemClock()
    record = await gateway.get_contact(contact_id)
    if record is None:
        await off_loop(contacts_db.mark_gone, db, [contact_id], clock.now())
        return False
    await off_loop(contacts_db.upsert_contacts, db, [record_to_row(record)], clock.now())
    return True
