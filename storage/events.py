"""The gateway event log (login lifecycle, connection changes), for the API and people reading it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from storage._sql import DB, reading, writing
from storage.models import GATEWAY_EVENTS

_E = GATEWAY_EVENTS.c


@dataclass(frozen=True, slots=True)
class EventRow:
    at: datetime | None
    gateway: str
    kind: str
    message: str
    data: dict[str, Any]


def insert_event(db: DB, event: EventRow) -> None:
    with writing(db) as conn:
        conn.execute(
            GATEWAY_EVENTS.insert(),
            [
                {
                    "at": event.at,
                    "gateway": event.gateway,
                    "kind": event.kind,
                    "message": event.message,
                    "data": event.data,
                }
            ],
        )


def recent_events(db: DB, *, kind: str | None = None, limit: int = 50) -> list[EventRow]:
    """The latest events, newest first (of one kind, or all)."""
    stmt = select(_E.at, _E.gateway, _E.kind, _E.message, _E.data).order_by(_E.id.desc()).limit(limit)
    if kind:
        stmt = stmt.where(_E.kind == kind)
    with reading(db) as conn:
        return [EventRow(*row) for row in conn.execute(stmt)]
