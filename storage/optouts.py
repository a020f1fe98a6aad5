"""The suppression list: contacts who opted out (wrote TD, or a person put them there). Planning and dispatch skip
them ("opted out"), for every campaign and journey; replies to a customer's own message are the one exception
(`engine.runsettings.RunSettings.opt_out_exempt`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update

from storage._sql import DB, aware, chunks, insert_ignore, reading, writing
from storage.models import OPT_OUTS

_O = OPT_OUTS.c


@dataclass(frozen=True, slots=True)
class OptOutRow:
    contact_id: str
    opted_out_at: datetime | None
    source: str
    keyword: str
    confirmed_at: datetime | None
    note: str


def opt_out(db: DB, contact_id: str, now: datetime, *, source: str, keyword: str = "", note: str = "") -> bool:
    """Put a contact on the suppression list. Returns False when they were on it already."""
    with writing(db) as conn:
        return bool(
            insert_ignore(
                conn,
                OPT_OUTS,
                [
                    {
                        "contact_id": contact_id,
                        "opted_out_at": now,
                        "source": source,
                        "keyword": keyword,
                        "confirmed_at": None,
                        "note": note,
                    }
                ],
            )
        )


def claim_confirmation(db: DB, contact_id: str, now: datetime) -> bool:
    """Claim the one confirmation an opt-out gets: True for the first caller only."""
    with writing(db) as conn:
        changed = conn.execute(
            update(OPT_OUTS).where(_O.contact_id == contact_id, _O.confirmed_at.is_(None)).values(confirmed_at=now)
        ).rowcount
    return bool(changed)


def opt_in(db: DB, contact_id: str) -> bool:
    """Take a contact off the suppression list. Returns False when they were not on it."""
    with writing(db) as conn:
        return bool(conn.execute(delete(OPT_OUTS).where(_O.contact_id == contact_id)).rowcount)


def any_opted_out(db: DB) -> bool:
    """Whether the suppression list has anyone (a plan skips asking about each contact when it is empty)."""
    with reading(db) as conn:
        return conn.execute(select(_O.contact_id).limit(1)).first() is not None


def opted_out(db: DB, contact_ids: Sequence[str] | None = None) -> set[str]:
    """Who of these contacts (or of everyone) is on the suppression list."""
    with reading(db) as conn:
        if contact_ids is None:
            return {r[0] for r in conn.execute(select(_O.contact_id))}
        out: set[str] = set()
        for part in chunks(sorted(set(contact_ids))):
            out.update(r[0] for r in conn.execute(select(_O.contact_id).where(_O.contact_id.in_(part))))
        return out


def opted_out_since(db: DB, contact_ids: Sequence[str]) -> dict[str, datetime]:
    """Who of these contacts is on the suppression list, and since when (UTC)."""
    out: dict[str, datetime] = {}
    with reading(db) as conn:
        for part in chunks(sorted(set(contact_ids))):
            query = select(_O.contact_id, _O.opted_out_at).where(_O.contact_id.in_(part))
            for r in conn.execute(query):
                when = aware(r.opted_out_at)
                if when is not None:  # opt_out always sets it
                    out[r.contact_id] = when
    return out


def list_opt_outs(db: DB, limit: int = 1000) -> list[OptOutRow]:
    with reading(db) as conn:
        rows = conn.execute(select(OPT_OUTS).order_by(_O.opted_out_at.desc()).limit(limit))
        return [
            OptOutRow(r.contact_id, aware(r.opted_out_at), r.source, r.keyword, aware(r.confirmed_at), r.note)
            for r in rows
        ]


def get_opt_out(db: DB, contact_id: str) -> OptOutRow | None:
    """One contact's entry on the suppression list (None: not on it)."""
    with reading(db) as conn:
        r = conn.execute(select(OPT_OUTS).where(_O.contact_id == contact_id)).first()
    if r is None:
        return None
    return OptOutRow(r.contact_id, aware(r.opted_out_at), r.source, r.keyword, aware(r.confirmed_at), r.note)
