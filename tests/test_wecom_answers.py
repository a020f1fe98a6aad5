"""Answers that are not what the WeCom API returns, injected at the fake WeCom server on loopback (real HTTP), in
the middle of a sync or a reconciliation: errcode 0 without the list (missing, null, of the wrong type), an item
without its id, a cursor that loops, an HTML page from a proxy, an empty or cut-off body. Each is a clear error
naming the API and the field — never read as "no customers", so a sync never marks everyone removed — and a sync
that meets one applies nothing of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import MONDAY_10, campaign

from engine.clock import FakeClock
from engine.errors import TransientError
from engine.gateways.wecom.errors import WecomAnswerError
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from storage import contacts as contacts_db

try:
    from wecom_harness import running, started, wecom_config
except ImportError:  # pragma: no cover
    from tests.wecom_harness import running, started, wecom_config

pytestmark = pytest.mark.anyio
JSON = dict[str, Any]
BATCH = "externalcontact/batch/get_by_user"
FOLLOW = "externalcontact/get_follow_user_list"
TAGS = "externalcontact/get_corp_tag_list"
GET = "externalcontact/get"
TEMPLATE = "externalcontact/add_msg_template"
TASKS = "externalcontact/get_groupmsg_task"
RESULTS = "externalcontact/get_groupmsg_send_result"
LIST_V2 = "externalcontact/get_groupmsg_list_v2"
PLAIN = "message: {template: '本周六会员日，全场八折，欢迎到店！'}\nfrequency_cap: false\nquiet_hours: false\n"
MANY = {"customers": 250, "staff": 3}  # about 290 (customer, staff) pairs: three pages of batch/get_by_user
HTML = b"<html><head><title>502 Bad Gateway</title></head><body>upstream /cgi-bin/x?access_token=LEAKED</body></html>"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def without(name: str) -> Callable[[JSON], JSON]:
    return lambda answer: {k: v for k, v in answer.items() if k != name}


def setting(name: str, value: object) -> Callable[[JSON], JSON]:
    return lambda answer: {**answer, name: value}


def item(name: str, change: Callable[[JSON], object]) -> Callable[[JSON], JSON]:
    """The answer with its list `name`'s item 1 replaced by what `change` makes of it."""

    def mutate(answer: JSON) -> JSON:
        items = list(answer[name])
        items[1] = change(dict(items[1]))
        return {**answer, name: items}

    return mutate


def drop_contact_id(entry: JSON) -> JSON:
    return {**entry, "external_contact": {k: v for k, v in entry["external_contact"].items() if k != "external_userid"}}


# (id, the fault's options, what the error names)
SYNC_FAULTS: list[tuple[str, dict[str, Any], str]] = [
    ("list missing", {"mutate": without("external_contact_list")}, "external_contact_list is missing"),
    ("list null", {"mutate": setting("external_contact_list", None)}, "external_contact_list is missing"),
    ("list a string", {"mutate": setting("external_contact_list", "")}, "external_contact_list is a str"),
    ("list an object", {"mutate": setting("external_contact_list", {})}, "external_contact_list is a dict"),
    ("no errcode", {"mutate": without("errcode")}, "an answer without an errcode"),
    ("HTML page", {"raw": HTML, "content_type": "text/html"}, "not JSON (text/html)"),
    ("empty body", {"raw": b""}, "an empty answer"),
    ("cut-off JSON", {"raw": b'{"errcode":0,"errmsg":"ok","external_contact_list":[{"external_con'}, "not JSON"),
    ("JSON array", {"raw": b"[]"}, "a JSON list, not an object"),
    ("item a string", {"mutate": item("external_contact_list", lambda e: "wm1")}, "external_contact_list[1] is str"),
    ("item null", {"mutate": item("external_contact_list", lambda e: None)}, "external_contact_list[1] is null"),
    (
        "item without its customer id",
        {"mutate": item("external_contact_list", drop_contact_id)},
        "external_contact_list[1].external_contact.external_userid is missing",
    ),
    (
        "item without its staff member",
        {"mutate": item("external_contact_list", lambda e: {**e, "follow_info": None})},
        "external_contact_list[1].follow_info.userid is missing",
    ),
    (
        "tag ids a string",
        {
            "mutate": item(
                "external_contact_list", lambda e: {**e, "follow_info": {**e["follow_info"], "tag_id": "et1"}}
            )
        },
        "external_contact_list[1].follow_info.tag_id is a str, not a list",
    ),
    ("errcode not a number", {"mutate": setting("errcode", "ok")}, "an errcode that is not a number"),
    ("cursor an object", {"mutate": setting("next_cursor", {"page": 3})}, "next_cursor is a dict"),
    ("cursor loops", {"mutate": setting("next_cursor", "100")}, "next_cursor '100' came back again"),
]


@pytest.mark.parametrize(("fault", "named"), [c[1:] for c in SYNC_FAULTS], ids=[c[0] for c in SYNC_FAULTS])
async def test_a_bad_page_mid_sync_fails_the_snapshot(tmp_path: Path, fault: dict[str, Any], named: str) -> None:
    """Page 2 of batch/get_by_user goes wrong (every retry too): list_contacts raises a TransientError naming the
    API and the field, no customer is handed out, and the snapshot is dropped from the state file."""
    async with running(tmp_path, **MANY) as r:
        r.fake.fault(BATCH, skip=1, count=50, **fault)
        with pytest.raises(WecomAnswerError) as failed:
            await r.gateway.list_contacts(None, 1000)
        assert isinstance(failed.value, TransientError)
        message = str(failed.value)
        assert BATCH in message and named in message, message
        assert "LEAKED" not in message and "access_token" not in message
        assert r.fake.faulted[BATCH] >= 1
        assert r.gateway.store._conn.execute("SELECT COUNT(*) FROM follows").fetchone() == (0,)
        assert r.gateway.store._conn.execute("SELECT COUNT(*) FROM syncs").fetchone() == (0,)


async def test_one_bad_answer_is_retried_and_the_sync_is_whole(tmp_path: Path) -> None:
    """A single HTML page from a proxy in the middle of a sync is a read safe to repeat: retried, and every
    customer is there."""
    async with running(tmp_path, **MANY) as r:
        r.fake.fault(BATCH, skip=1, raw=HTML, content_type="text/html")
        page = await r.gateway.list_contacts(None, 1000)
        assert r.fake.faulted[BATCH] == 1
        assert page.total == len(r.fake.customers) == len(page.contacts)


# (id, the API, the fault, what the error names, the call)
OTHER_LISTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("follow users missing", FOLLOW, {"mutate": without("follow_user")}, "follow_user is missing"),
    ("follow user empty", FOLLOW, {"mutate": setting("follow_user", ["zhangwei", ""])}, "follow_user[1] is empty"),
    ("follow user null", FOLLOW, {"mutate": setting("follow_user", [None])}, "follow_user[0] is missing"),
    ("tag groups missing", TAGS, {"mutate": setting("tag_group", None)}, "tag_group is missing"),
    (
        "a tag without its id",
        TAGS,
        {"mutate": lambda a: {**a, "tag_group": [{**a["tag_group"][0], "tag": [{"name": "x"}]}]}},
        "tag_group[0].tag[0].id is missing",
    ),
]


@pytest.mark.parametrize(("api", "fault", "named"), [c[1:] for c in OTHER_LISTS], ids=[c[0] for c in OTHER_LISTS])
async def test_staff_and_tag_lists_are_checked_too(tmp_path: Path, api: str, fault: dict[str, Any], named: str) -> None:
    """get_follow_user_list (who is synced) and get_corp_tag_list: the list missing, or an item without its id, is
    an error naming it — not a sync of nobody, not tags left out."""
    async with running(tmp_path, customers=20, staff=3) as r:
        r.fake.fault(api, count=50, **fault)
        call = r.gateway.list_tags() if api == TAGS else r.gateway.list_contacts(None, 100)
        with pytest.raises(WecomAnswerError, match=named.replace("[", r"\[").replace("]", r"\]")) as failed:
            await call
        assert api in str(failed.value)


async def test_one_customers_detail_without_follows_is_an_error(tmp_path: Path) -> None:
    """externalcontact/get answering ok without follow_user (or without the customer, or with a follow's tags not a
    list) is an error, not a customer without staff members (who would read as no longer a friend) or tags."""
    async with running(tmp_path, customers=20, staff=2) as r:
        ext = next(iter(r.fake.customers))
        r.fake.fault(GET, count=50, mutate=without("follow_user"))
        with pytest.raises(WecomAnswerError, match="follow_user is missing"):
            await r.gateway.get_contact(ext)
        r.fake.clear_faults()
        r.fake.fault(GET, count=50, mutate=setting("external_contact", {}))
        with pytest.raises(WecomAnswerError, match="external_userid is missing"):
            await r.gateway.get_contact(ext)
        r.fake.clear_faults()
        tags_text = item("follow_user", lambda f: {**f, "tags": "VIP"})
        r.fake.fault(GET, count=50, mutate=lambda a: tags_text({**a, "follow_user": a["follow_user"] * 2}))
        with pytest.raises(WecomAnswerError, match=r"follow_user\[1\]\.tags is a str, not a list"):
            await r.gateway.get_contact(ext)
        r.fake.clear_faults()
        assert (await r.gateway.get_contact(ext)) is not None


@pytest.mark.parametrize(
    ("api", "fault", "named"),
    [
        (TASKS, {"mutate": without("task_list")}, "task_list is missing"),
        (TASKS, {"mutate": item("task_list", lambda e: {**e, "userid": None})}, "task_list[1].userid is missing"),
        (RESULTS, {"mutate": setting("send_list", None)}, "send_list is missing"),
        (RESULTS, {"mutate": item("send_list", lambda e: {"status": 1})}, "send_list[1].external_userid is missing"),
        (RESULTS, {"raw": b'{"errcode":0,"send_list":[{"external_userid":"wm'}, "not JSON"),
    ],
    ids=["task list missing", "task without staff", "send list missing", "result without customer", "cut off"],
)
async def test_task_results_are_checked(tmp_path: Path, api: str, fault: dict[str, Any], named: str) -> None:
    """batch_results on a confirmed task whose answers go wrong: an error naming the API and field (the deliveries
    keep waiting for the next look), never results read as "nobody listed yet"."""
    async with running(tmp_path, customers=20, staff=2, shared_every=0) as r:
        sender = r.fake.staff[0]
        ids = r.fake.customers_of(sender)
        receipt = await r.gateway.submit_batch(ids, "周末见", idempotency_key="k1", sender=sender)
        r.fake.confirm()
        if "task_list" in named:  # a task list of two, so that its item 1 exists
            r.fake.fault(TASKS, count=50, mutate=lambda a: fault["mutate"]({**a, "task_list": a["task_list"] * 2}))
        else:
            r.fake.fault(api, count=50, **fault)
        with pytest.raises(WecomAnswerError, match=named.replace("[", r"\[").replace("]", r"\]")):
            await r.gateway.batch_results(receipt.task_id)


async def test_a_task_lookup_on_a_bad_list_never_resubmits(tmp_path: Path) -> None:
    """add_msg_template's answer is lost after it took effect, and the lookup for that task gets ok without
    group_msg_list: submit_batch raises (the task may exist) instead of reading "no such task" and submitting it a
    second time. Once WeCom answers properly, the same key finds the task: one task, never two."""
    async with running(tmp_path, customers=20, staff=2, shared_every=0) as r:
        sender = r.fake.staff[0]
        ids = r.fake.customers_of(sender)
        r.fake.fail_after_processing(TEMPLATE)
        r.fake.fault(LIST_V2, count=50, mutate=without("group_msg_list"))
        with pytest.raises(WecomAnswerError, match="group_msg_list is missing"):
            await r.gateway.submit_batch(ids, "周末见", idempotency_key="k1", sender=sender)
        assert len(r.fake.tasks) == 1
        with pytest.raises(WecomAnswerError):  # asked again under its key: still unsure, still not resubmitted
            await r.gateway.submit_batch(ids, "周末见", idempotency_key="k1", sender=sender)
        assert len(r.fake.tasks) == 1
        r.fake.clear_faults()
        receipt = await r.gateway.submit_batch(ids, "周末见", idempotency_key="k1", sender=sender)
        assert list(r.fake.tasks) == [receipt.task_id]


def test_a_sync_that_meets_a_bad_page_marks_nobody_removed(tmp_path: Path, db_url: str) -> None:
    """After a whole sync, the next one gets errcode 0 without external_contact_list on its second page: the sync
    fails with the error naming the API and the field, no contact is marked removed, nothing of it is written;
    the sync after it (WeCom answering properly again) is whole and finds nobody gone."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(clock=clock, **MANY)
        server = FakeWecomServer(fake)
        url = await server.start()
        app = await started(wecom_config(tmp_path, db_url, fake, url), clock)
        try:
            first = await app.sync()
            assert first.seen == 250
            fake.fault(BATCH, skip=1, count=50, mutate=without("external_contact_list"))
            with pytest.raises(WecomAnswerError) as failed:
                await app.sync()
            assert "batch/get_by_user answered ok, but its external_contact_list is missing" in str(failed.value)
            assert len(contacts_db.unlisted(app.db, set())) == 250  # every contact still there, none removed
            fake.clear_faults()
            again = await app.sync()
            assert (again.seen, again.removed, again.added) == (250, 0, 0)
            plan = await asyncio.to_thread(app.plan, campaign(app.settings, "audience: {}\n" + PLAIN))
            assert plan.run_id
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())
