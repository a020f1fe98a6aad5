"""Contact pages (storage.contacts.page_contacts): every page at any offset is the same as a plain listing by id,
filtered or not; the total and the page anchors are counted once per version of the contact list, so a page deep
in the list skips fewer than ANCHOR_EVERY rows; every change (this process's writes, committed or not yet when the
pages were read, and another process's sync) shows in the next page."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from engine.views import ContactView, contact_json, json_bytes
from storage import contacts as contacts_db
from storage import journeys as journeys_db
from storage.contacts import ContactFilter, ContactRow, TagRow, page_contacts
from storage.db import make_db_engine

NOW = datetime(2026, 12, 1, 9, tzinfo=UTC)
CONTACTS = 95
ANCHOR = 7  # small, so pages start from many anchors and fall between them


def _contacts(n: int) -> list[ContactRow]:
    return [
        ContactRow(
            f"wm{i:04d}",
            name=f"客户{i}",
            city="上海" if i % 3 else "北京",
            friend=i % 5 != 0,
            tag_ids=("t-vip",) if i % 4 == 0 else (),
        )
        for i in range(n)
    ]


@pytest.fixture
def db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setattr(contacts_db, "ANCHOR_EVERY", ANCHOR)
    engine = make_db_engine(db_url)
    contacts_db.upsert_tags(engine, [TagRow("t-vip", "VIP")])
    contacts_db.upsert_contacts(engine, _contacts(CONTACTS), NOW)
    yield engine
    engine.dispose()


def _ids(db: Engine, where: ContactFilter, **kwargs: Any) -> list[str]:
    return [r.id for r in page_contacts(db, where, **kwargs).rows]


def _all(db: Engine, where: ContactFilter) -> list[str]:
    """Every match, by walking the pages by cursor."""
    out: list[str] = []
    cursor = None
    while True:
        page = page_contacts(db, where, limit=10, cursor=cursor)
        out += [r.id for r in page.rows]
        if not page.has_next:
            return out
        cursor = page.next_cursor


FILTERS = [
    ContactFilter(),
    ContactFilter(city="上海"),
    ContactFilter(tags_all=["VIP"]),
    ContactFilter(friend=True, text="客户1"),
]


@pytest.mark.parametrize("where", FILTERS, ids=["all", "city", "tag", "friend-text"])
def test_pages_at_every_offset_match_the_listing(db: Engine, where: ContactFilter) -> None:
    """Page after page by offset (page sizes across the anchors and past the end) equals the listing by cursor,
    with the same total and hasNext."""
    listing = _all(db, where)
    assert listing == sorted(listing) and listing
    for size in (1, 3, ANCHOR, 10, 50):
        for offset in range(0, len(listing) + 2 * size, size):
            page = page_contacts(db, where, limit=size, offset=offset)
            assert [r.id for r in page.rows] == listing[offset : offset + size], (size, offset)
            assert page.total == len(listing)
            assert page.has_next == (offset + size < len(listing))


def test_the_list_is_counted_once_and_no_page_skips_far(db: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first page, neither the total nor a page deep in the list reads the whole list again, and no
    page query skips ANCHOR_EVERY rows or more."""
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        statements.append((statement, parameters))

    class Recording:
        def __init__(self, cursor: Any) -> None:
            self.cursor = cursor

        def execute(self, statement: str, parameters: Any = ()) -> Any:
            statements.append((statement, parameters))
            return self.cursor.execute(statement, parameters)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.cursor, name)

    @contextmanager
    def recording(conn: Any) -> Iterator[Any]:
        with driver_cursor(conn) as cursor:
            yield Recording(cursor)

    driver_cursor = contacts_db.dbapi_cursor
    page_contacts(db, ContactFilter(), limit=5)
    monkeypatch.setattr(contacts_db, "dbapi_cursor", recording)
    event.listen(db, "before_cursor_execute", seen)
    try:
        for offset in (0, 40, 85, 90):
            assert page_contacts(db, ContactFilter(), limit=5, offset=offset).total == CONTACTS
    finally:
        event.remove(db, "before_cursor_execute", seen)
    assert not [s for s, _ in statements if "count(" in s.lower()]
    reads = [s for s, _ in statements if re.search(r"\bFROM contacts\b", s)]
    assert len(reads) == 4 and all("LIMIT" in s for s in reads)  # the pages alone, none reading the whole list
    skipped = [int(m) for s in reads for m in re.findall(r"OFFSET (\d+)", s)]
    assert skipped and all(n < ANCHOR for n in skipped)


def test_writes_show_in_the_next_page(db: Engine) -> None:
    """A new contact, a removed one, a tag set by a journey and a new tag name each change the totals and pages
    at once."""
    assert page_contacts(db, ContactFilter(), limit=1, offset=94).rows[0].id == "wm0094"
    contacts_db.upsert_contacts(db, [ContactRow("wm9999", name="新客户")], NOW)
    page = page_contacts(db, ContactFilter(), limit=1, offset=95)
    assert page.total == CONTACTS + 1 and [r.id for r in page.rows] == ["wm9999"]

    contacts_db.mark_gone(db, ["wm0000", "wm9999"], NOW)
    page = page_contacts(db, ContactFilter(), limit=2, offset=0)
    assert page.total == CONTACTS - 1 and [r.id for r in page.rows] == ["wm0001", "wm0002"]

    vip = page_contacts(db, ContactFilter(tags_all=["VIP"]), limit=100).total
    journeys_db.set_contact_tags(db, "wm0001", ["t-vip"], NOW)
    assert page_contacts(db, ContactFilter(tags_all=["VIP"]), limit=100).total == vip + 1

    assert page_contacts(db, ContactFilter(tags_all=["回头客"]), limit=100).total == 0
    journeys_db.add_tag(db, "回头客", "回头客")
    journeys_db.set_contact_tags(db, "wm0002", ["回头客"], NOW)
    assert _ids(db, ContactFilter(tags_all=["回头客"]), limit=100) == ["wm0002"]


def test_a_page_read_while_a_write_was_open_is_not_kept(db: Engine) -> None:
    """Pages read while another connection's transaction had written (not committed) a contact count the list
    without it; once that transaction commits the next page counts it."""
    with db.begin() as conn:
        contacts_db.upsert_contacts(conn, [ContactRow("wm9999", name="新客户")], NOW)
        assert page_contacts(db, ContactFilter(), limit=1).total == CONTACTS
        assert page_contacts(db, ContactFilter(), limit=1).total == CONTACTS
    page = page_contacts(db, ContactFilter(), limit=1, offset=CONTACTS)
    assert page.total == CONTACTS + 1 and [r.id for r in page.rows] == ["wm9999"]


def test_another_process_sync_shows_in_the_next_page(db: Engine, db_url: str) -> None:
    """A sync finished by another process (whose writes this process cannot see) makes the next page count again."""
    contacts_db.begin_sync(db, "here:1", NOW, after=0)
    contacts_db.finish_sync(db, 1, CONTACTS, NOW)
    assert page_contacts(db, ContactFilter(), limit=1).total == CONTACTS
    other = make_db_engine(db_url)
    writes = dict(contacts_db._writes)  # what this process knows before the other one writes
    try:
        contacts_db.begin_sync(other, "there:2", NOW, after=1)
        contacts_db.upsert_contacts(other, [ContactRow("wm9999", name="新客户")], NOW)
        contacts_db.finish_sync(other, 2, CONTACTS + 1, NOW)
    finally:
        other.dispose()
    contacts_db._writes.clear()
    contacts_db._writes.update(writes)  # as if those writes had been made in another process
    page = page_contacts(db, ContactFilter(), limit=1, offset=CONTACTS)
    assert page.total == CONTACTS + 1 and [r.id for r in page.rows] == ["wm9999"]


@pytest.mark.parametrize(
    "added", [None, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)]
)
def test_the_fast_json_is_the_models_json(added: datetime | None) -> None:
    """contact_json (the pages' hot path) writes what ContactView.from_row's JSON says, field for field."""
    row = ContactRow(
        "wm1",
        name="张三\u2028",
        alias='备注"',
        gender=1,
        phones=("13800000000",),
        friend=True,
        star=True,
        type=2,
        additional_info={"来源": ["门店", {"级别": 3}], "x": None},
        added_at=added,
        tags=(("t1", "VIP"), ("t2", "回头客")),
    )
    assert json.loads(json_bytes(contact_json(row))) == json.loads(ContactView.from_row(row).model_dump_json())
