"""Simulated customers on the sandbox, so journeys can be tried on a fresh machine: a new customer adds the
account, a customer writes, staff tag a customer, a customer leaves (`wecast sandbox event …`,
POST /api/v1/sandbox/events).

The sandbox saves each change in its state file (every process's sandbox sees it) and emits what a real gateway
emits, but only to listeners in the process that made the change. A `wecast sandbox event` process has no journey
engine running, and the `wecast serve` that has one never hears its emits; so `simulate` itself puts what happened
where every process looks — the customer-event inbox in the database — exactly as the serving process would
record it: the contact re-read from the gateway (its row and the change as events, as a sync's diff), and the
stream's event (a message with its text). Recorded twice (here and by a listening engine in the same process),
an event is still one: the inbox keys messages by id and adds, removes and tags by generation. The serving
process's journey runner polls the inbox, so it acts on it within a second.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.engine import Engine

from engine.blocking import off_loop
from engine.clock import Clock
from engine.contacts import refresh_contact
from engine.errors import NotFoundError, PermanentError, WecastError
from engine.gateways.base import EventKind, Gateway, GatewayEvent
from engine.gateways.sandbox import SandboxGateway
from engine.i18n import tr
from engine.journeys import events as ev
from storage import journeys as journeys_db

Action = Literal["add_contact", "message", "tag", "untag", "remove"]


class SandboxEventBody(BaseModel):
    """What a simulated customer does (POST /api/v1/sandbox/events)."""

    model_config = ConfigDict(extra="forbid")

    action: Action = Field(description="add_contact | message | tag | untag | remove")
    contact_id: str | None = Field(default=None, max_length=200, description="the customer (all but add_contact)")
    name: str | None = Field(default=None, max_length=100, description="add_contact: the new customer's name")
    text: str | None = Field(default=None, max_length=4000, description="message: what the customer writes")
    tag: str | None = Field(default=None, max_length=100, description="tag / untag: a tag name or id")

    @model_validator(mode="after")
    def _needs_its_fields(self) -> SandboxEventBody:
        wanted = {"message": ("contact_id", "text"), "tag": ("contact_id", "tag"), "untag": ("contact_id", "tag")}
        for name in wanted.get(self.action, () if self.action == "add_contact" else ("contact_id",)):
            value = getattr(self, name)
            if value is None or not str(value).strip():
                raise ValueError(tr("{name} is required for action {action}", name=name, action=self.action))
        return self


class SimulatedEvent(BaseModel):
    """What happened: the action, the customer, and the inbox events it recorded (their kinds, new ones only)."""

    model_config = ConfigDict(frozen=True)

    action: Action
    contact_id: str
    name: str
    tag: str | None = None
    text: str | None = None
    recorded: list[str]


def sandbox_of(gateway: Gateway) -> SandboxGateway:
    if not isinstance(gateway, SandboxGateway):
        raise WecastError(
            tr("simulated customers exist only on the sandbox gateway (this one is {name})", name=gateway.name)
        )
    return gateway


async def simulate(db: Engine, gateway: Gateway, clock: Clock, body: SandboxEventBody) -> SimulatedEvent:
    """Do what `body` says on the sandbox and record it in the inbox (see the module docstring)."""
    sandbox = sandbox_of(gateway)
    # The inbox's newest event before the change: what is newer for this contact was recorded for it (here, or
    # by an engine in this process that heard the same emit first).
    latest = await off_loop(journeys_db.recent_events, db, limit=1)
    since = latest[0].id if latest else 0
    seen: list[GatewayEvent] = []
    unsubscribe = sandbox.subscribe(seen.append)
    tag_name: str | None = None
    try:
        if body.action == "add_contact":
            name = (body.name or "").strip() or f"新客户{secrets.randbelow(10000):04d}"
            contact_id = sandbox.sandbox_add_contact(name).id
        else:
            contact_id = _needs(body.contact_id, "contact_id")
            if await sandbox.get_contact(contact_id) is None:
                raise NotFoundError(tr("no contact {id!r} in the sandbox", id=contact_id))
            if body.action == "message":
                sandbox.sandbox_incoming_message(contact_id, _needs(body.text, "text"))
            elif body.action in ("tag", "untag"):
                record = sandbox.sandbox_tag(contact_id, _needs(body.tag, "tag"), add=body.action == "tag")
                tag_name = record.name
                # A tag the staff just made is one the database does not know yet: name it, so a journey on
                # `tag_added: NAME` recognises the event.
                await off_loop(journeys_db.add_tag, db, record.id, record.name, record.group_name)
            else:
                sandbox.sandbox_remove_contact(contact_id)
    except PermanentError as exc:
        raise WecastError(str(exc)) from None
    finally:
        unsubscribe()
    recorded = await _record(db, gateway, clock, contact_id, seen, since)
    contact = await sandbox.get_contact(contact_id)
    return SimulatedEvent(
        action=body.action,
        contact_id=contact_id,
        name=contact.name if contact is not None else "",
        tag=tag_name,
        text=body.text if body.action == "message" else None,
        recorded=recorded,
    )


async def _record(
    db: Engine, gateway: Gateway, clock: Clock, contact_id: str, seen: Sequence[GatewayEvent], since: int
) -> list[str]:
    if any(e.kind in (EventKind.CONTACT_ADDED, EventKind.CONTACT_CHANGED, EventKind.CONTACT_REMOVED) for e in seen):
        await refresh_contact(gateway, db, contact_id, clock=clock)
    stream = [new for e in seen if (new := ev.from_gateway(e)) is not None]
    if stream:
        await off_loop(journeys_db.record_events, db, stream, clock.now())
    after = await off_loop(journeys_db.recent_events, db, contact_id=contact_id, limit=50)
    return [e.kind.value for e in reversed(after) if e.id > since]


def _needs(value: str | None, name: str) -> str:
    if value is None or not value.strip():
        raise WecastError(tr("{name} is required for this action", name=name))
    return value
