"""Contact sync: the gateway's customer list -> the local database (contacts, tags, links).

Sync pages through `Gateway.list_contacts`, upserts each page in its own transaction (so a sync of
100,000 contacts never holds one huge transaction), and at the end marks contacts the gateway no longer
lists as removed (their delivery history stays). Database writes run off the event loop.

**A half-done sync is never a contact list.** Each sync is a generation (`contact_syncs`), marked finished in the
transaction that ends it; until then the list is incomplete (`list_state`), and planning refuses it
(`require_whole_list`, so a sync killed midway never sends a run to the fraction it wrote). `Wecast.ensure_contacts`
finishes it first (syncs again). One sync at a time across processes: a process that finds another one's sync
running (its owner alive, `engine.owners`) waits for it, then syncs; the writes are safe even when two overlap.

Every sync (and every refresh of one contact) records how the contact list changed — new contacts, removed ones,
tags added and removed — as customer events in the journeys' inbox (`engine.journeys.events.diff`), so a journey
triggered by one of them enters even when the gateway's own event was missed. Each page's changes are recorded in
that page's transaction, and the removals in the one that finishes the sync: a sync killed and run again records
each change once. Until a first sync has finished the list is the baseline: it records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.engine import Connection, Engine

from engine.blocking import off_loop
from engine.clock import Clock, SystemClock
from engine.errors import WecastError
from engine.gateways.base import ContactRecord, Gateway, TagRecord, UnreadStaff
from engine.i18n import N_, process_language, tr, use_language
from engine.journeys.events import SYNC, diff
from engine.owners import HEARTBEAT_EVERY, owner_alive, process_owner
from storage import contacts as contacts_db
from storage import journeys as journeys_db
from storage.contacts import ContactRow, SyncRow, TagRow
from storage.db import transaction

log = logging.getLogger("wecast.contacts")
WAIT_STEP = 0.5  # seconds between two looks at another process's sync in progress

SyncProgress = Callable[[int, int | None], None]  # (contacts seen so far, total if the gateway knows it)


@dataclass
class SyncResult:
    seen: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    tags: int = 0
    events: int = 0  # customer events the changes recorded (new contacts, removals, tag changes)
    kept: int = 0  # contacts not listed but kept as they were: a staff member the gateway could not read follows them
    unread_staff: list[UnreadStaff] = field(default_factory=list)  # those staff members, with why (a stable code)


# The fields a contact record and a stored contact share (by name), `follow_user_ids` among them (the staff
# members a 群发 task to the customer goes out from, on the official API).
_STORED = {f.name for f in dataclasses.fields(ContactRow)}
_SHARED = [f.name for f in dataclasses.fields(ContactRecord) if f.name in _STORED]


def record_to_row(c: ContactRecord) -> ContactRow:
    """A gateway's contact as the database stores it (the same field names), its text without NUL characters."""
    return ContactRow(**{name: _text(getattr(c, name)) for name in _SHARED})


def tag_to_row(t: TagRecord) -> TagRow:
    return TagRow(_text(t.id), _text(t.name), _text(t.group_name), t.type)


def _text(value: Any) -> Any:
    """A gateway's text as stored: without NUL, which PostgreSQL's text columns refuse ("cannot contain NUL") — a
    customer who put one in a name or a remark would otherwise stop every sync of the account. (JSON columns keep
    theirs: JSON writes it as the escape \\u0000.)"""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, tuple) and any(isinstance(v, str) and "\x00" in v for v in value):
        return tuple(_text(v) for v in value)
    return value


class ListState(StrEnum):
    """How whole the synced contact list is."""

    EMPTY = "empty"  # never synced
    INCOMPLETE = "incomplete"  # its latest sync has not finished (killed midway, or still running somewhere)
    WHOLE = "whole"


def list_state(db: Engine | Connection) -> ListState:
    """How whole the contact list is (see `ListState`)."""
    latest = contacts_db.latest_sync(db)
    return list_state_of(latest, lambda: contacts_db.count_contacts(db))


def list_state_of(latest: contacts_db.SyncRow | None, synced: Callable[[], int]) -> ListState:
    """The list's state from its latest sync (None: never synced) and, asked only then, how many contacts it has
    (contacts written without a sync, as tests and imports do, make a whole list)."""
    if latest is not None:
        return ListState.WHOLE if latest.finished else ListState.INCOMPLETE
    return ListState.WHOLE if synced() else ListState.EMPTY


def require_whole_list(db: Engine | Connection) -> None:
    """Refuse to plan on a list that a sync left half-written: a WecastError saying which sync and what to do."""
    latest = contacts_db.latest_sync(db)
    if latest is None or latest.finished:
        return
    started = f"{latest.started_at:%Y-%m-%d %H:%M:%S} UTC" if latest.started_at else "?"
    raise WecastError(
        tr(
            "the contact list is incomplete: contact sync {sync} (started {started}) has not finished — it was "
            "interrupted, or another process is still running it; run `wecast contacts sync` (a run syncs first "
            "when the account is logged in)",
            sync=latest.id,
            started=started,
        )
    )


WRITE_BATCH = 5000  # contacts a sync writes in one transaction (its gateway pages are smaller)


async def sync_contacts(
    gateway: Gateway,
    db: Engine,
    *,
    clock: Clock | None = None,
    page_size: int = 500,
    progress: SyncProgress | None = None,
) -> SyncResult:
    """Pull every contact and tag from the gateway into the database (see the module docstring)."""
    clock = clock or SystemClock()
    sync = await _begin(db, clock, process_owner())
    try:
        return await _sync(gateway, db, sync, clock, page_size, progress)
    except BaseException:
        # Stopped by an error or a cancel (a kill -9 leaves the owner instead, judged by its pid and heartbeat):
        # the next sync need not wait for this one, and the list stays incomplete until one finishes.
        with contextlib.suppress(Exception):
            await asyncio.shield(off_loop(contacts_db.abandon_sync, db, sync.id))
        raise


async def _sync(
    gateway: Gateway, db: Engine, sync: SyncRow, clock: Clock, page_size: int, progress: SyncProgress | None
) -> SyncResult:
    result = SyncResult()
    baseline = not await off_loop(contacts_db.ever_synced, db)
    tags = await gateway.list_tags()
    await off_loop(contacts_db.upsert_tags, db, [tag_to_row(t) for t in tags])
    result.tags = len(tags)
    seen: set[str] = set()
    fetching = asyncio.ensure_future(gateway.list_contacts(None, page_size))
    batch: list[ContactRow] = []
    last_write = clock.monotonic()
    try:
        while True:
            try:
                page = await fetching
            except Exception:
                if batch:  # the pages fetched before the gateway failed are kept, as if written page by page
                    await off_loop(_write_page, db, sync.id, batch, clock.now(), baseline)
                raise
            if page.next_cursor is not None:
                # The next page is asked for while this one is written: the gateway's round trip (or the
                # sandbox's work) and the database's overlap. Writes still go one at a time, in order.
                fetching = asyncio.ensure_future(gateway.list_contacts(page.next_cursor, page_size))
            for member in page.unread_staff:
                if member not in result.unread_staff:
                    result.unread_staff.append(member)
            fresh = [c for c in page.contacts if c.id not in seen]
            seen.update(c.id for c in fresh)
            batch += [record_to_row(c) for c in fresh]
            if progress:
                progress(len(seen), page.total)
            # Pages are written a few thousand contacts at a time (a transaction, and on PostgreSQL a commit's
            # flush to disk, per 500-contact page cost a big first sync more than its rows did), and at least
            # every HEARTBEAT_EVERY seconds: each write is also the sync's heartbeat.
            due = clock.monotonic() - last_write >= HEARTBEAT_EVERY
            if len(batch) < WRITE_BATCH and not due and page.next_cursor is not None:
                continue
            added, updated, events = await off_loop(_write_page, db, sync.id, batch, clock.now(), baseline)
            batch, last_write = [], clock.monotonic()
            result.added += added
            result.updated += updated
            result.events += events
            if page.next_cursor is None:
                break
    finally:
        if not fetching.done():  # the write failed or the sync was cancelled: the page asked for is not wanted
            fetching.cancel()
    unread = {m.staff_id for m in result.unread_staff}
    removed, kept, events = await off_loop(_finish, db, sync.id, seen, unread, clock.now(), baseline)
    result.removed = removed
    result.kept = kept
    result.events += events
    result.seen = len(seen)
    if result.unread_staff:
        with use_language(process_language()):  # a log line: the server's language, not a request's
            log.warning(
                "%s",
                tr(
                    "contact sync: the customers of {count} staff members could not be read: {staff}; "
                    "{kept} contacts they follow were kept as they were, not marked removed",
                    count=len(result.unread_staff),
                    staff=describe_unread(result.unread_staff),
                    kept=kept,
                ),
            )
    return result


# Why a sync could not read a staff member's customers (UnreadStaff.reason, a stable code), in words.
UNREAD_REASONS = {"unlicensed": N_("no interoperability licence")}


def describe_unread(staff: Sequence[UnreadStaff]) -> str:
    """`zhangsan (no interoperability licence), lisi (…)` in the reader's language (an unknown code as it is)."""
    return ", ".join(
        f"{m.staff_id} ({tr(UNREAD_REASONS[m.reason]) if m.reason in UNREAD_REASONS else m.reason})" for m in staff
    )


async def _running_elsewhere(db: Engine, clock: Clock, announced: bool) -> SyncRow | None:
    """The latest sync, if it is unfinished and its owner alive (another process is running it); logs that once."""
    latest = await off_loop(contacts_db.latest_sync, db)
    if latest is None or latest.finished or not owner_alive(latest.owner, latest.heartbeat_at, clock.now()):
        return None
    if not announced:
        log.info("contact sync %s is running in another process (%s): waiting for it", latest.id, latest.owner)
    return latest


async def wait_for_syncs(db: Engine, clock: Clock) -> ListState:
    """Wait while another process's sync is running (its owner alive), then say how whole the list is."""
    announced = False
    while await _running_elsewhere(db, clock, announced):
        announced = True
        await clock.sleep(WAIT_STEP)
    return await off_loop(list_state, db)


async def _begin(db: Engine, clock: Clock, owner: str) -> SyncRow:
    """Start a sync generation — after waiting for another process's sync, while its owner is alive."""
    while True:
        await wait_for_syncs(db, clock)
        latest = await off_loop(contacts_db.latest_sync, db)
        started = await off_loop(contacts_db.begin_sync, db, owner, clock.now(), after=latest.id if latest else 0)
        if started is not None:
            if latest is not None and not latest.finished:
                log.warning("contact sync %s did not finish (interrupted): syncing again as %s", latest.id, started.id)
            return started


def _write_page(
    db: Engine, sync_id: int, rows: Sequence[ContactRow], now: datetime, baseline: bool
) -> tuple[int, int, int]:
    """One page of a sync in one transaction: the contacts, the customer events their changes make, the heartbeat.
    Returns (added, updated, events recorded)."""
    ids = [r.id for r in rows]
    with transaction(db) as conn:
        before = {} if baseline else journeys_db.contact_states(conn, ids)
        added, updated = contacts_db.upsert_contacts(conn, rows, now)
        events = 0 if baseline else _record_changes(conn, before, ids, now, SYNC)
        contacts_db.sync_heartbeat(conn, sync_id, now)
    return added, updated, events


def _finish(
    db: Engine, sync_id: int, seen: set[str], unread: set[str], now: datetime, baseline: bool
) -> tuple[int, int, int]:
    """End a sync in one transaction: the contacts it did not find marked removed (and their removals recorded),
    except those followed only by staff members the gateway could not read (`unread`: kept as they were, no event);
    the sync marked finished. Returns (removed, kept, events recorded)."""
    with transaction(db) as conn:
        gone = contacts_db.unlisted(conn, seen)
        kept = 0
        if unread and gone:
            follows = contacts_db.follow_users(conn, gone)
            unreadable = {c for c, staff in follows.items() if unread.intersection(staff)}
            gone, kept = [c for c in gone if c not in unreadable], len(unreadable)
        before = {} if baseline else journeys_db.contact_states(conn, gone)
        removed = contacts_db.mark_gone(conn, gone, now)
        events = 0 if baseline or not gone else _record_changes(conn, before, gone, now, SYNC)
        contacts_db.finish_sync(conn, sync_id, len(seen), now)
    return removed, kept, events


def _record_changes(
    db: Engine | Connection,
    before: dict[str, journeys_db.ContactState],
    ids: list[str] | None,
    now: datetime,
    source: str,
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
