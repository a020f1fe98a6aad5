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

from engine.views import ContactView
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
    reads = [(s, p) for s, p in statements if re.search(r"\bFROM contacts\b", s)]
    assert len(reads) == 4 and all("LIMIT" in s for s, _ in reads)  # the pages alone, none reading the whole list
    skipped = [p["page_skip"] if isinstance(p, dict) else p[-1] for _, p in reads]  # (the last parameter)
    assert any(skipped) and all(0 <= n < ANCHOR for n in skipped), skipped


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


HOSTILE = '引号"反斜杠\\ 换行\n制表\t响铃\x07 \x1f\x7f \u2028\u2029 😀 </script> {{ 7*7 }}'


def test_the_pages_the_database_writes_are_the_models_json(db_url: str) -> None:
    """page_contacts_json (the API's hot path: each contact's JSON written by SQLite or PostgreSQL) lists what
    ContactView's JSON says of the same page, field for field, with hostile text (quotes, backslashes, control
    characters, line separators, emoji, template syntax), nested extra info, tags of several groups (in the pages'
    order), and added times with and without a fraction or unknown; filtered, at an offset and by cursor."""
    db = make_db_engine(db_url)
    contacts_db.upsert_tags(
        db, [TagRow("t-b", "B组标签", "g2"), TagRow("t-a2", "Z标签", "g1"), TagRow("t-a1", HOSTILE, "g1")]
    )
    rows = [
        ContactRow(
            f"wm{i:03d}",
            name=HOSTILE if i % 2 else f"客户{i}",
            alias=f"备注{i}\\",
            avatar="https://wework.qpic.cn/a?x=1&y=2",
            gender=i % 3,
            city="上海",
            phones=("13800000000", HOSTILE) if i % 3 == 0 else (),
            friend=i % 2 == 0,
            coworker=i % 5 == 0,
            star=i % 7 == 0,
            type=i % 3,
            description=HOSTILE,
            additional_info={"来源": ["门店", {"级别": i, "备注": HOSTILE}], "空": None, "真": True, "小数": 1.5}
            if i % 4
            else {},
            corp_id="ww1",
            tag_ids=(("t-b", "t-a2", "t-a1") if i % 2 else ("t-a2",)) if i % 3 else (),
            added_at=(None, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC))[
                i % 3
            ],
        )
        for i in range(30)
    ]
    contacts_db.upsert_contacts(db, rows, NOW)
    asks: list[tuple[ContactFilter, dict[str, Any]]] = [
        (ContactFilter(), {"limit": 50}),
        (ContactFilter(), {"limit": 7, "offset": 9}),
        (ContactFilter(), {"limit": 7, "cursor": "wm011"}),
        (ContactFilter(tags_all=["Z标签"], friend=False), {"limit": 4}),
        (ContactFilter(text="反斜杠"), {"limit": 100, "offset": 3}),
        (ContactFilter(), {"limit": 5, "offset": 300}),
        (ContactFilter(), {"limit": 10, "offset": 20}),  # the last page, exactly full
        (ContactFilter(), {"limit": 10, "offset": 19}),
        (ContactFilter(), {"limit": 10, "cursor": "wm019"}),  # the last page by cursor, exactly full
        (ContactFilter(), {"limit": 10, "cursor": "wm029"}),
        (ContactFilter(friend=True), {"limit": 5, "cursor": "wm018"}),
    ]
    for where, kwargs in asks:
        page = page_contacts(db, where, **kwargs)
        fast = contacts_db.page_contacts_json(db, where, **kwargs)
        expected = [json.loads(ContactView.from_row(r).model_dump_json()) for r in page.rows]
        assert json.loads(fast.items) == expected, (where, kwargs)
        assert (fast.total, fast.has_next, fast.next_cursor) == (page.total, page.has_next, page.next_cursor)
    walked, cursor = [], None
    while True:  # by cursor, the whole list
        fast = contacts_db.page_contacts_json(db, ContactFilter(star=False), limit=4, cursor=cursor)
        walked += [c["id"] for c in json.loads(fast.items)]
        if not fast.has_next:
            break
        cursor = fast.next_cursor
    assert walked == [r.id for r in rows if not r.star]
    one = json.loads(contacts_db.page_contacts_json(db, ContactFilter(ids=["wm001"]), limit=1).items)[0]
    assert one["tags"] == ["Z标签", HOSTILE, "B组标签"] and one["tagIds"] == ["t-a2", "t-a1", "t-b"]
    assert one["addedAt"] == "2026-01-02T03:04:05Z" and one["name"] == HOSTILE
    two = json.loads(contacts_db.page_contacts_json(db, ContactFilter(ids=["wm002"]), limit=1).items)[0]
    assert two["addedAt"] == "2026-01-02T03:04:05.000006Z" and two["friend"] is True and two["phone"] == []
    db.dispose()
