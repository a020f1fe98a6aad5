"""/send-message calls made at once are pooled (engine.web.sends): planned together into shared runs and sent by
one dispatcher each, every call still answered with its own result; Idempotency-Key keeps its meaning across the
pool (a retry answers the first result and sends nothing, the key for another send is refused, also against
/send-message-all); two sends to one contact at once both go out; an unknown id or a logged-out account refuses
that call alone. On a real server over loopback, on both backends; and storage.runs.record_direct_sends itself."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.gateways.sandbox import SandboxGateway
from storage import runs as runs_db
from storage.contacts import ContactRow, upsert_contacts
from storage.db import make_db_engine
from storage.optouts import opt_out
from storage.runs import DirectSend, NewRun

try:
    from web_harness import LiveServer, login, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, login, make_settings

NOW = datetime(2026, 12, 1, 2, tzinfo=UTC)


@pytest.fixture
def live(tmp_path: Path, db_url: str) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path, database_url=db_url, sending={"concurrency": 8})
    with LiveServer(settings, scheduler=False) as server:
        login(server.client)
        yield server


def _friends(live: LiveServer, n: int) -> list[str]:
    datas = live.client.post("/get-all-user", json={"pageSize": 100}).json()["datas"]  # syncs first
    return [c["id"] for c in datas if c["friend"] and not c["coworker"]][:n]


def _outbox(live: LiveServer) -> Counter[str]:
    assert isinstance(live.app.gateway, SandboxGateway)
    return Counter(m.contact_id for m in live.app.gateway.outbox_messages())


def _all_at_once(live: LiveServer, calls: list[tuple[dict[str, Any], dict[str, str]]]) -> list[httpx.Response]:
    """Every call at once, each on its own connection."""

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            return list(
                await asyncio.gather(*(client.post("/send-message", json=body, headers=h) for body, h in calls))
            )

    return asyncio.run(go())


def test_concurrent_sends_share_runs_and_each_gets_its_own_result(live: LiveServer) -> None:
    """30 calls at once to 30 contacts: each answered 200 with its own contact, key and counts; each contact got the
    message once; the calls were planned into fewer runs than calls, none holding more than `concurrency`."""
    ids = _friends(live, 30)
    before = _outbox(live)
    answers = _all_at_once(
        live, [({"id": cid, "message": "您的订单已发货"}, {"Idempotency-Key": f"k-{cid}"}) for cid in ids]
    )
    bodies = [a.json() for a in answers]
    assert [a.status_code for a in answers] == [200] * len(ids), bodies
    for cid, body in zip(ids, bodies, strict=True):
        assert body["runKey"] == f"k-{cid}" and body["sent"] == 1 and body["pending"] == 0
        assert body["counts"] == {"sent": 1} and body["status"] == "completed"
        assert [r["id"] for r in body["results"]] == [cid] and body["results"][0]["messageId"]
    after = _outbox(live)
    assert all(after[cid] - before[cid] == 1 for cid in ids)
    runs = Counter(b["runId"] for b in bodies)
    assert len(runs) < len(ids) and max(runs.values()) <= 8
    replay = live.client.post(
        "/send-message", json={"id": ids[0], "message": "您的订单已发货"}, headers={"Idempotency-Key": f"k-{ids[0]}"}
    )
    assert replay.status_code == 200 and replay.json()["replayed"] is True
    assert replay.json()["runId"] == bodies[0]["runId"] and _outbox(live)[ids[0]] == after[ids[0]]


def test_one_key_in_the_pool_sends_once_and_is_refused_for_another_send(live: LiveServer) -> None:
    """Three calls with one key among others at once send once and agree on the run; the key for another contact,
    another text or a /send-message-all is refused, and a /send-message-all key refuses a single send."""
    ids = _friends(live, 12)
    body = {"id": ids[0], "message": "只发一次"}
    calls = [(body, {"Idempotency-Key": "once"})] * 3
    calls += [({"id": cid, "message": "旁边的"}, {"Idempotency-Key": f"side-{cid}"}) for cid in ids[1:]]
    before = _outbox(live)
    answers = _all_at_once(live, calls)
    assert {a.status_code for a in answers} == {200}
    same = [a.json() for a in answers[:3]]
    assert len({b["runId"] for b in same}) == 1 and sorted(b["replayed"] for b in same) == [False, True, True]
    assert _outbox(live)[ids[0]] == before[ids[0]] + 1
    for other in ({"id": ids[1], "message": "只发一次"}, {"id": ids[0], "message": "另一条"}):
        refused = live.client.post("/send-message", json=other, headers={"Idempotency-Key": "once"})
        assert refused.status_code == 409 and "Idempotency-Key" in refused.json()["error"], refused.text
    many = live.client.post(
        "/send-message-all", json={"ids": ids[:2], "message": "只发一次"}, headers={"Idempotency-Key": "once"}
    )
    assert many.status_code == 409 and "Idempotency-Key" in many.json()["error"]
    whole = live.client.post(
        "/send-message-all", json={"ids": ids[2:4], "message": "群发"}, headers={"Idempotency-Key": "all"}
    )
    assert whole.status_code == 200 and whole.json()["sent"] == 2
    single = live.client.post(
        "/send-message", json={"id": ids[2], "message": "群发"}, headers={"Idempotency-Key": "all"}
    )
    assert single.status_code == 409 and "Idempotency-Key" in single.json()["error"]
    assert _outbox(live)[ids[0]] == before[ids[0]] + 1 and _outbox(live)[ids[1]] == before[ids[1]] + 1


def test_two_sends_to_one_contact_at_once_both_go_out(live: LiveServer) -> None:
    """Two messages for one contact at once (different keys) are both sent, in different runs (a run has one
    delivery per contact); an unknown id in the same moment is refused alone."""
    [cid] = _friends(live, 1)
    before = _outbox(live)[cid]
    answers = _all_at_once(
        live,
        [
            ({"id": cid, "message": "第一条"}, {"Idempotency-Key": "a"}),
            ({"id": cid, "message": "第二条"}, {"Idempotency-Key": "b"}),
            ({"id": "no-such-contact", "message": "第三条"}, {}),
        ],
    )
    assert [a.status_code for a in answers] == [200, 200, 404]
    assert answers[0].json()["runId"] != answers[1].json()["runId"]
    assert "no-such-contact" in answers[2].json()["error"]
    assert _outbox(live)[cid] == before + 2


def test_logged_out_a_retry_still_answers_and_a_new_send_is_refused(live: LiveServer) -> None:
    """After a logout the retry of a send that went out answers its result (sends nothing); a new key is 409."""
    [cid] = _friends(live, 1)
    first = live.client.post("/send-message", json={"id": cid, "message": "登出前"}, headers={"Idempotency-Key": "pre"})
    assert first.status_code == 200
    live.client.post("/goEnd")
    total = sum(_outbox(live).values())
    retry = live.client.post("/send-message", json={"id": cid, "message": "登出前"}, headers={"Idempotency-Key": "pre"})
    assert retry.status_code == 200 and retry.json()["replayed"] is True and retry.json()["sent"] == 1
    new = live.client.post("/send-message", json={"id": cid, "message": "登出后"}, headers={"Idempotency-Key": "post"})
    assert new.status_code == 409 and "not logged in" in new.json()["error"]
    assert sum(_outbox(live).values()) == total


def _run(key: str = "pool-1") -> NewRun:
    return NewRun(
        campaign_id="api",
        run_key=key,
        trigger="api",
        timezone="Asia/Shanghai",
        settings={"version": 1, "timezone": "Asia/Shanghai"},
        created_at=NOW,
    )


def test_record_direct_sends_reports_keys_used_before(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key used before (by a pooled send or a run of its own) is reported with what it asked for and planned
    nothing; a key whose delivery another run wrote between the lookup and the insert is reported the same, and a
    run left with no delivery is not kept."""
    db = make_db_engine(db_url)
    upsert_contacts(db, [ContactRow("c1", name="甲"), ContactRow("c2", name="乙"), ContactRow("c3", name="丙")], NOW)
    first = runs_db.record_direct_sends(db, _run("p1"), [DirectSend("k1", "c1", "甲", "你好", None)])
    assert first.run_id is not None and first.earlier == {}
    again = runs_db.record_direct_sends(
        db, _run("p2"), [DirectSend("k1", "c2", "乙", "你好", None), DirectSend("k2", "c3", "丙", "早", None)]
    )
    assert again.run_id not in (None, first.run_id)
    assert again.earlier["k1"].run_id == first.run_id and again.earlier["k1"].deliveries == (("c1", "你好", None),)
    assert runs_db.earlier_sends(db, "api", ["k2", "k3", "k"]) == {
        "k2": runs_db.EarlierSend(again.run_id, (("c3", "早", None),))
    }

    real = runs_db._earlier_sends
    calls: list[int] = []

    def blind_first(conn: Any, campaign: str, keys: Any, other_than: int | None = None) -> Any:
        calls.append(1)
        return {} if len(calls) == 1 else real(conn, campaign, keys, other_than)  # as if it committed just after

    monkeypatch.setattr(runs_db, "_earlier_sends", blind_first)
    raced = runs_db.record_direct_sends(db, _run("p3"), [DirectSend("k1", "c1", "甲", "你好", None)])
    assert raced.run_id is None and raced.earlier["k1"].run_id == first.run_id
    assert runs_db.find_run(db, "api", "p3") is None
    db.dispose()


@pytest.mark.parametrize(
    ("lang", "left_out", "all_sent"), [("zh", "1 条未发", "发送成功"), ("en", "1 left out", "sent successfully")]
)
def test_a_send_left_out_is_not_called_a_success(live: LiveServer, lang: str, left_out: str, all_sent: str) -> None:
    """/send-message to a customer who opted out, and /send-message-all to them and another: nothing reaches the
    opted-out customer, and the answer's message says one was left out (each result says why) instead of
    "sent successfully (0 sent)"; "sent successfully" stays for the sends that all went out."""
    quiet, other = _friends(live, 2)
    assert opt_out(live.app.db, quiet, datetime.now(UTC), source="api")
    before = _outbox(live)
    ask = {"lang": lang}
    one = live.client.post("/send-message", params=ask, json={"id": quiet, "message": "会员日"}).json()
    many = live.client.post("/send-message-all", params=ask, json={"ids": [quiet, other], "message": "会员日"}).json()
    fine = live.client.post("/send-message", params=ask, json={"id": other, "message": "到店礼"}).json()
    assert one["sent"] == 0 and one["counts"] == {"skipped": 1} and one["results"][0]["reason"].startswith("opted_out")
    assert left_out in one["message"] and all_sent not in one["message"], one
    assert many["sent"] == 1 and many["counts"] == {"sent": 1, "skipped": 1}
    assert left_out in many["message"] and all_sent not in many["message"], many
    assert all_sent in fine["message"] and fine["sent"] == 1
    after = _outbox(live)
    assert after[quiet] == before[quiet] and after[other] - before[other] == 2
