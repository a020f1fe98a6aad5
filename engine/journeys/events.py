"""Customer events from every source, as the inbox records them.

Two paths bring them, so nothing is missed while the gateway's stream was down:

* **The stream.** The gateway emits `MESSAGE`, `CONTACT_ADDED`, `CONTACT_REMOVED` and `CONTACT_CHANGED` (refresh
  that contact and diff its tags) as they happen; `from_gateway` turns the first three into inbox events.
* **The contact sync.** `diff` compares the contacts before and after a sync: ids now listed that were not (or were
  removed) are `contact_added`, ids no longer listed `contact_removed`, and changed tag sets `tag_added` /
  `tag_removed` per tag. The very first sync of a database is the baseline and yields nothing: the customers an
  account already has are not "new".

An event seen by both paths is recorded once (`storage.journeys.record_events` keys adds and removes by their
generation), and recorded before anything acts on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime

from engine.gateways.base import EventKind, GatewayEvent
from storage.journeys import ContactState, NewEvent
from storage.models import CustomerEventKind

STREAM = "stream"
SYNC = "sync"


def from_gateway(event: GatewayEvent) -> NewEvent | None:
    """The inbox event for a gateway event (None for login lifecycle and other kinds)."""
    contact_id = str(event.data.get("contact_id") or "")
    if not contact_id:
        return None
    if event.kind is EventKind.MESSAGE:
        message_id = str(event.data.get("message_id") or "") or uuid.uuid4().hex
        return NewEvent(
            CustomerEventKind.MESSAGE,
            contact_id,
            event.at,
            STREAM,
            {"text": str(event.data.get("text") or ""), "type": str(event.data.get("type") or "text")},
            message_id=message_id,
        )
    if event.kind is EventKind.CONTACT_ADDED:
        data = {"staff_id": str(event.data.get("staff_id") or "")}
        if event.data.get("welcome_code"):
            data["welcome_code"] = str(event.data["welcome_code"])
        return NewEvent(CustomerEventKind.CONTACT_ADDED, contact_id, event.at, STREAM, data)
    if event.kind is EventKind.CONTACT_REMOVED:
        data = {"staff_id": str(event.data.get("staff_id") or "")}
        return NewEvent(CustomerEventKind.CONTACT_REMOVED, contact_id, event.at, STREAM, data)
    return None


def diff(
    before: Mapping[str, ContactState],
    after: Mapping[str, ContactState],
    *,
    now: datetime,
    tag_names: Mapping[str, str],
    added_at: Mapping[str, datetime | None],
    source: str = SYNC,
) -> list[NewEvent]:
    """Events that explain how the contact list changed from `before` to `after` (see the module docstring).
    `added_at` gives when the gateway says a contact added us (the event's time when known)."""
    out: list[NewEvent] = []
    for contact_id, now_state in after.items():
        old = before.get(contact_id)
        old_tags: frozenset[str] = frozenset()
        if now_state.present and (old is None or not old.present):
            when = min(added_at.get(contact_id) or now, now)
            out.append(NewEvent(CustomerEventKind.CONTACT_ADDED, contact_id, when, source, {}))
            # A new contact's first tags (a channel QR code tags on add) are added tags too.
        elif old is None:
            continue
        elif old.present and not now_state.present:
            out.append(NewEvent(CustomerEventKind.CONTACT_REMOVED, contact_id, now, source, {}))
            continue
        else:
            old_tags = old.tag_ids
        for tag_id in sorted(now_state.tag_ids - old_tags):
            data = {"tag_id": tag_id, "tag": tag_names.get(tag_id, tag_id)}
            out.append(NewEvent(CustomerEventKind.TAG_ADDED, contact_id, now, source, data))
        for tag_id in sorted(old_tags - now_state.tag_ids):
            data = {"tag_id": tag_id, "tag": tag_names.get(tag_id, tag_id)}
            out.append(NewEvent(CustomerEventKind.TAG_REMOVED, contact_id, now, source, data))
    return out
