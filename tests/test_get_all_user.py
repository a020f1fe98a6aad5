"""/get-all-user and /api/v1/contacts on a real server over SQLite and PostgreSQL: every field of a stored contact
comes back as ContactView writes it (the pages are read by position and written without the models), and the
list's state (whole, never synced, a sync left unfinished) is judged from the page's own read: a whole list is
served as it is, an unfinished one is synced first when logged in and refused (409) when logged out."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.views import ContactView
from storage import contacts as contacts_db
from storage.contacts import ContactRow, TagRow
from storage.db import make_db_engine

try:
    from web_harness import LiveServer, login, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, login, make_settings

NOW = datetime(2026, 12, 1, 9, tzinfo=UTC)
TAGS = [TagRow("t-vip", "VIP", "等级"), TagRow("t-new", "新客", "来源"), TagRow("t-back", "回头客", "来源")]


def _stored() -> list[ContactRow]:
    """Contacts with every field the pages show set (and the edge cases of the JSON columns and times)."""
    return [
        ContactRow(
            "wm001",
            name="张三\u2028",
            alias='备注"引号',
            avatar="https://wework.qpic.cn/a/1",
            gender=1,
            city="上海",
            province="上海",
            address="静安区 1 号",
            corporation="美团",
            title="店长",
            phones=("13800000000", "021-5555"),
            weixin="wxid_1",
            description="老客户\n第二行",
            signature="慢慢来",
            friend=True,
            star=True,
            type=1,
            real_name="张三丰",
            aka="三哥",
            additional_info={"来源": ["门店", {"级别": 3, "比例": 0.5}], "x": None, "big": 2**70},
            corp_id="ww1",
            tag_ids=("t-vip", "t-back", "t-new"),
            follow_user_ids=("u1", "u2"),
            added_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        ),
        ContactRow("wm002", name="李四", coworker=True, tag_ids=("t-vip",), added_at=datetime(2026, 1, 2, tzinfo=UTC)),
        ContactRow("wm003", name="王五", type=2, additional_info={"a": "\x1f"}),
    ]


def _expected(rows: list[ContactRow]) -> list[dict[str, Any]]:
    """What ContactView writes for each stored contact (its tags as the page orders them: by group, then name)."""
    names = {t.id: t for t in TAGS}
    out = []
    for row in rows:
        tags = sorted((names[t] for t in row.tag_ids), key=lambda t: (t.group_name, t.name))
        shown = ContactRow(**{**_fields(row), "tags": tuple((t.id, t.name) for t in tags)})
        out.append(ContactView.from_row(shown).model_dump(mode="json"))
    return out


def _fields(row: ContactRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__slots__}


def _server(tmp_path: Path, db_url: str) -> LiveServer:
    return LiveServer(make_settings(tmp_path, database_url=db_url), scheduler=False)


def test_every_field_of_a_stored_contact_reads_back_as_the_model_writes_it(db_url: str, tmp_path: Path) -> None:
    db = make_db_engine(db_url)
    contacts_db.upsert_tags(db, TAGS)
    contacts_db.upsert_contacts(db, _stored(), NOW)
    db.dispose()
    expected = _expected(_stored())
    with _server(tmp_path, db_url) as live:
        legacy = live.client.post("/get-all-user", json={"pageSize": 2})
        assert legacy.status_code == 200, legacy.text
        body = legacy.json()
        assert body["datas"] == expected[:2]
        assert (body["hasNextPage"], body["total"], body["page"]) == (True, 3, 1)
        rest = live.client.post("/get-all-user", json={"pageSize": 2, "cursor": body["nextCursor"]}).json()
        assert rest["datas"] == expected[2:]
        assert (rest["hasNextPage"], rest["page"]) == (False, None)
        assert live.client.post("/get-all-user", json={"pageSize": 2, "page": 2}).json()["datas"] == expected[2:]
        api = live.client.get("/api/v1/contacts", params={"limit": 10}).json()
        assert api["items"] == expected
        assert live.client.get("/api/v1/contacts", params={"tag": "回头客"}).json()["items"] == expected[:1]
        assert live.client.get("/api/v1/contacts/wm001").json() == expected[0]


def test_a_list_never_synced_but_filled_is_served_without_a_login(db_url: str, tmp_path: Path) -> None:
    """Contacts written without a sync (an import, a restore) make a whole list: served, logged out."""
    db = make_db_engine(db_url)
    contacts_db.upsert_tags(db, TAGS)
    contacts_db.upsert_contacts(db, _stored(), NOW)
    db.dispose()
    with _server(tmp_path, db_url) as live:
        answer = live.client.post("/get-all-user", json={"pageSize": 10})
        assert answer.status_code == 200, answer.text
        assert [c["id"] for c in answer.json()["datas"]] == ["wm001", "wm002", "wm003"]


def test_an_unfinished_sync_is_finished_before_a_page_and_refused_logged_out(db_url: str, tmp_path: Path) -> None:
    db = make_db_engine(db_url)
    contacts_db.upsert_tags(db, TAGS)
    contacts_db.upsert_contacts(db, _stored(), NOW)
    assert contacts_db.begin_sync(db, "a process killed midway", NOW, after=0) is not None
    with _server(tmp_path, db_url) as live:
        refused = live.client.post("/get-all-user", json={"pageSize": 10}, headers={"Accept-Language": "en"})
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "not_logged_in"
        login(live.client)
        answer = live.client.post("/get-all-user", json={"pageSize": 100})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        # The sandbox's 60 customers, synced now; the three written before it are no longer on the list.
        assert body["total"] == 60
        assert not {"wm001", "wm002", "wm003"} & {c["id"] for c in body["datas"]}
        latest = contacts_db.latest_sync(db)
        assert latest is not None and latest.finished
    db.dispose()


def test_an_empty_list_logged_out_is_refused(db_url: str, tmp_path: Path) -> None:
    with _server(tmp_path, db_url) as live:
        refused = live.client.post("/get-all-user", json={"pageSize": 10})
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "not_logged_in"


def test_the_contacts_api_lists_the_list_a_sync_makes_whole(db_url: str, tmp_path: Path) -> None:
    """/api/v1/contacts on a list a sync left unfinished: logged out it lists what is stored (a listing, not a
    send); logged in it lets the sync make the list whole first, as /get-all-user does — never the half-written
    list, whatever order the event loop runs the login's sync in (it answered a login's first read empty on
    uvloop)."""
    db = make_db_engine(db_url)
    contacts_db.upsert_tags(db, TAGS)
    contacts_db.upsert_contacts(db, _stored(), NOW)
    assert contacts_db.begin_sync(db, "a process killed midway", NOW, after=0) is not None
    with _server(tmp_path, db_url) as live:
        stored = live.client.get("/api/v1/contacts", params={"limit": 100})
        assert stored.status_code == 200, stored.text
        assert {c["id"] for c in stored.json()["items"]} == {"wm001", "wm002", "wm003"}
        login(live.client)
        answer = live.client.get("/api/v1/contacts", params={"limit": 100})
        assert answer.status_code == 200, answer.text
        assert answer.json()["total"] == 60  # the sandbox's customers, synced now
        latest = contacts_db.latest_sync(db)
        assert latest is not None and latest.finished
    db.dispose()
