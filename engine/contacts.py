"""Contact sync: the gateway's customer list -> the local database (contacts, tags, links).

Sync pages through `Gateway.list_contacts`, upserts each page in its own transaction (so a sync of
100,000 contacts never holds one huge transaction), and at the end marks contacts the gateway no longer
lists as removed (their delivery history stays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from engine.clock import Clock, SystemClock
from engine.gateways.base import ContactRecord, Gateway
from storage import queries


@dataclass
class SyncResult:
    seen: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    tags: int = 0


def record_to_row(c: ContactRecord) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "alias": c.alias,
        "avatar": c.avatar,
        "gender": c.gender,
        "city": c.city,
        "province": c.province,
        "address": c.address,
        "corporation": c.corporation,
        "title": c.title,
        "phones": list(c.phones),
        "weixin": c.weixin,
        "description": c.description,
        "signature": c.signature,
        "friend": c.friend,
        "coworker": c.coworker,
        "star": c.star,
        "type": c.type,
        "real_name": c.real_name,
        "aka": c.aka,
        "additional_info": dict(c.additional_info),
        "corp_id": c.corp_id,
        "added_at": c.added_at,
    }


async def sync_contacts(
    gateway: Gateway,
    db: Engine,
    *,
    clock: Clock | None = None,
    page_size: int = 500,
    progress: Callable[[int, int | None], None] | None = None,
) -> SyncResult:
    """Pull every contact and tag from the gateway into the database."""
    clock = clock or SystemClock()
    now = clock.now()
    result = SyncResult()
    tags = await gateway.list_tags()
    with db.begin() as conn:
        queries.upsert_tags(
            conn, [{"id": t.id, "name": t.name, "group_name": t.group_name, "type": t.type} for t in tags]
        )
    result.tags = len(tags)
    seen: set[str] = set()
    cursor: str | None = None
    while True:
        page = await gateway.list_contacts(cursor, page_size)
        fresh = [c for c in page.contacts if c.id not in seen]
        seen.update(c.id for c in fresh)
        with db.begin() as conn:
            added, updated = queries.upsert_contacts(
                conn, [record_to_row(c) for c in fresh], {c.id: c.tag_ids for c in fresh}, now
            )
        result.added += added
        result.updated += updated
        if progress:
            progress(len(seen), page.total)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    with db.begin() as conn:
        result.removed = queries.mark_removed(conn, seen, now)
    result.seen = len(seen)
    return result


async def refresh_contact(gateway: Gateway, db: Engine, contact_id: str, *, clock: Clock | None = None) -> bool:
    """Re-read one contact (a DIRTY event). Returns whether it still exists."""
    clock = clock or SystemClock()
    record = await gateway.get_contact(contact_id)
    if record is None:
        return False
    with db.begin() as conn:
        queries.upsert_contacts(conn, [record_to_row(record)], {record.id: record.tag_ids}, clock.now())
    return True
