"""The suppression list as people and scripts see it (`wecast contacts optouts`, /api/v1/contacts/{id}/optout):
who opted out, when and how, and the two edits a person makes — put a contact on it, take them off."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Engine

from engine.errors import NotFoundError
from engine.i18n import tr
from storage import contacts as contacts_db
from storage import optouts as optouts_db

MANUAL = "manual"  # the `source` of an opt-out a person set (a customer's keyword is "keyword")


class OptOutView(BaseModel):
    """One contact's opt-out state. `source`: keyword (they wrote `keyword`) or manual (a person, with `note`)."""

    model_config = ConfigDict(frozen=True)

    contact_id: str
    name: str
    opted_out: bool
    opted_out_at: datetime | None = None
    source: str | None = None
    keyword: str | None = None
    note: str | None = None
    confirmed_at: datetime | None = None


def list_optouts(db: Engine, limit: int = 1000) -> list[OptOutView]:
    """Everyone on the suppression list, newest first."""
    rows = optouts_db.list_opt_outs(db, limit)
    names = contacts_db.contact_names(db, [r.contact_id for r in rows])
    return [
        OptOutView(
            contact_id=r.contact_id,
            name=names.get(r.contact_id, ""),
            opted_out=True,
            opted_out_at=r.opted_out_at,
            source=r.source,
            keyword=r.keyword,
            note=r.note,
            confirmed_at=r.confirmed_at,
        )
        for r in rows
    ]


def optout_state(db: Engine, contact_id: str) -> OptOutView:
    """One contact's state (NotFoundError for an unknown contact)."""
    names = _known(db, contact_id)
    found = optouts_db.get_opt_out(db, contact_id)
    if found is None:
        return OptOutView(contact_id=contact_id, name=names[contact_id], opted_out=False)
    return OptOutView(
        contact_id=contact_id,
        name=names[contact_id],
        opted_out=True,
        opted_out_at=found.opted_out_at,
        source=found.source,
        keyword=found.keyword,
        note=found.note,
        confirmed_at=found.confirmed_at,
    )


def set_optout(db: Engine, contact_id: str, opted_out: bool, *, now: datetime, note: str = "") -> bool:
    """Put a contact on the list (`opted_out`) or take them off. Returns whether that changed anything. No
    confirmation is sent for an opt-out a person sets (the customer did not ask)."""
    _known(db, contact_id)
    if opted_out:
        return optouts_db.opt_out(db, contact_id, now, source=MANUAL, note=note)
    return optouts_db.opt_in(db, contact_id)


def _known(db: Engine, contact_id: str) -> dict[str, str]:
    names = contacts_db.contact_names(db, [contact_id])
    if contact_id not in names:
        raise NotFoundError(tr("no contact {id!r} (see `wecast contacts list`)", id=contact_id))
    return names
