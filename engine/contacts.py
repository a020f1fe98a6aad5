"""Contact sync: the gateway's customer list -> the local database (contacts, tags, links).

Sync pages through `Gateway.list_contacts`, upserts each page in its own transaction (so a sync of
100,000 contacts never holds one huge transaction), and at the end marks contacts the gateway no longer
lists as removed (their delivery history stays). Database writes run off the event loop.

Every sync (and every refresh of one contact) records how the contact list changed — new contacts, removed ones,
tags added and removed — as customer events in the journeys' inbox (`engine.journeys.events.diff`), so a journey
triggered by one of them enters even when the gateway's own event was missed. The first sync of an empty database
is the baseline: it records nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Engine

from engine.blocking import off_loop
from engine.clock import Clock, SystemClock
from engine.gateways.base import ContactRecord, Gateway, TagRecord
from engine.journeys.events import SYNC, diff
from storage import contacts as contacts_db
from storage import journeys as journeys_db
from storage.contacts import ContactRow, TagRow

SyncProgress = Callable[[int, int | None], None]  # (contacts seen so far, total if the gateway knows it)


@dataclass
class SyncResult:
    seen: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    tags: int = 0
    events: int = 0  # customer events the changes recorded (new contacts, removals, tag changes)


# The fields a contact record and a stored contact share (by name), `follow_user_ids` among them (the staff
# members a 群发 task to the customer goes out from, on the official API).
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
    before = await off_loop(journeys_db.contact_states, db)
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
    if before:  # the first sync of a database is the baseline: its contacts are not "new"
        result.events = await off_loop(_record_changes, db, before, None, now, SYNC)
    return result


def _record_changes(
    db: Engine, before: dict[str, journeys_db.ContactState], ids: list[str] | None, now: datetime, source: str
) -> int:
    """Record the changes between `before` and the contacts now stored (all, or `ids`) as customer events."""
    after = journeys_db.contact_states(db, ids)
    changed = [cid for cid, state in after.items() if before.get(cid) != state]
    if not changed:
        return 0
    views = journeys_db.contact_views(db, changed)
    names = {v: k for k, v in journeys_db.tags_by_name(db).items() if k != v}
    events = diff(
        {c: before[c] for c in changed if c in before},
        {c: after[c] for c in changed},
        now=now,
        tag_names=names,
        added_at={c: views[c].get("added_at") for c in changed if c in views},
        source=source,
    )
    return len(journeys_db.record_events(db, events, now))


async def refresh_contact(gateway: Gateway, db: Engine, contact_id: str, *, clock: Clock | None = None) -> bool:
    """Re-read one contact (after the gateway said it changed: a DIRTY event). Returns whether it still exists;
    a contact the gateway no longer has is marked removed."""
    clock = clock or SystemClock()
    record = await gateway.get_contact(contact_id)
    now = clock.now()
    before = await off_loop(journeys_db.contact_states, db, [contact_id])
    if record is None:
        await off_loop(contacts_db.mark_gone, db, [contact_id], now)
    else:
        await off_loop(contacts_db.upsert_contacts, db, [record_to_row(record)], now)
    await off_loop(_record_changes, db, before, [contact_id], now, "refresh")
    return record is not None
