"""The journey routes of /api/v1 on a real uvicorn on loopback (engine.web.journeys_api): a simulated customer posted
to /sandbox/events is welcomed by the server's journeys, /journeys counts them, /journeys/{id} draws the tree with
the contact at its step, /journeys/{id}/preview says who would enter and the contact's timeline (in the language
asked for), /contacts/{id}/journeys the path with what was sent, and /contacts/{id}/optout reads and edits the
suppression list; unknown ids are 404s, bad input a 4xx that names the problem; the routes need the key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web_harness import LiveServer, login, make_settings

from engine.gateways.sandbox import SandboxGateway

WELCOME = """kind: journey
name: 新客欢迎
trigger: contact_added
exit_when: [{tag: 已购}]
quiet_hours: false
frequency_cap: false
steps:
  - id: hello
    send: {template: "{{ display_name }}您好，欢迎！"}
    transactional: true
  - id: later
    wait: 3d
  - id: vip
    if: {tag: VIP}
    then: [{id: vip_tip, send: {template: VIP专享}}]
    else: [{id: tip, send: {template: 小贴士}}]
"""
KEY = "k" * 32


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root: Path = tmp_path_factory.mktemp("journey-api")
    settings = make_settings(root, api={"key": KEY})
    (root / "campaigns" / "welcome.yaml").write_text(WELCOME, encoding="utf-8")
    with LiveServer(settings, require_key=True) as server:
        server.client.headers["Authorization"] = f"Bearer {KEY}"
        login(server.client)
        server.client.post("/api/v1/contacts/sync").raise_for_status()
        yield server


@pytest.fixture
def client(live: LiveServer) -> httpx.Client:
    return live.client


def wait_for(what: str, ok: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (ok() if callable(ok) else ok):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_simulated_new_customer_is_welcomed_counted_and_pathed(live: LiveServer, client: httpx.Client) -> None:
    """POST /sandbox/events add_contact → the welcome reaches the outbox; /journeys and /journeys/{id} count the
    contact at `later`; /contacts/{id}/journeys shows the welcome as sent with its text."""
    answer = client.post("/api/v1/sandbox/events", json={"action": "add_contact", "name": "赵六"})
    assert answer.status_code == 200, answer.text
    made = answer.json()
    cid = made["contact_id"]
    assert made["name"] == "赵六" and "contact_added" in made["recorded"]
    gateway = live.app.gateway
    assert isinstance(gateway, SandboxGateway)
    wait_for("the welcome", lambda: [m.text for m in gateway.outbox_messages(cid)] == ["赵六您好，欢迎！"])
    wait_for("the wait", lambda: client.get("/api/v1/journeys/welcome").json()["at_step"].get("later") == 1)
    listed = client.get("/api/v1/journeys").json()
    (welcome,) = [j for j in listed["journeys"] if j["id"] == "welcome"]
    assert welcome["trigger"] == "contact_added" and welcome["entry"] == "once" and welcome["active"] == 1
    detail = client.get("/api/v1/journeys/welcome").json()
    steps = {s["id"]: s for s in detail["steps"]}
    assert steps["later"]["here"] == 1 and steps["hello"]["passed"] == 1 and steps["hello"]["transactional"]
    assert [b["label"] for b in steps["vip"]["branches"]] == ["then", "else"]
    assert detail["recent"][0]["contact"] == cid and detail["exit_when"]
    path = client.get(f"/api/v1/contacts/{cid}/journeys").json()
    (entry,) = path["journeys"]
    sent = [p for p in entry["path"] if p["outcome"] == "sent"]
    assert sent[0]["step"] == "hello" and sent[0]["message"] == "赵六您好，欢迎！" and sent[0]["sent_at"]
    assert path["opted_out"] is False and entry["name"] == "新客欢迎"
    # The same customer adding us again is no second welcome (entry: once), and a message event is recorded.
    said = client.post("/api/v1/sandbox/events", json={"action": "message", "contact_id": cid, "text": "你好"})
    assert said.status_code == 200 and said.json()["recorded"] == ["message"]
    time.sleep(1.5)
    assert len(gateway.outbox_messages(cid)) == 1


def test_preview_of_a_journey_with_a_contacts_timeline_in_both_languages(client: httpx.Client) -> None:
    """/journeys/{id}/preview: the tree, who could enter (event trigger), the contact's timeline — assumed tagged
    VIP, the then branch's message three days later; the reasons in the language asked for; nothing written."""
    cid = client.get("/api/v1/contacts", params={"friend": True, "tag": "VIP", "limit": 1}).json()["items"][0]["id"]
    before = client.get("/api/v1/journeys/welcome").json()["recent"]
    p = client.get(f"/api/v1/journeys/welcome/preview?contact={cid}&lang=en").json()
    assert p["enter_now"]["mode"] == "event" and p["enter_now"]["enters_without_event"] is False
    line = p["timeline"]
    sends = [e for e in line["entries"] if e["outcome"] == "send"]
    assert [e["step"] for e in sends] == ["hello", "vip_tip"] and sends[1]["message"] == "VIP专享"
    assert line["ends"] == "completed"
    zh = client.get(
        "/api/v1/journeys/welcome/preview", params={"contact": cid, "assume": "tag:已购@1d", "lang": "zh"}
    ).json()
    assert zh["timeline"]["ends"] == "exited"
    assert zh["timeline"]["assumptions"] == ["被打上标签 已购，进入后 1d"]
    assert zh["trigger_text"] == "新客户添加我们"
    en = client.get("/api/v1/journeys/welcome/preview", params={"lang": "en"}).json()
    assert en["trigger_text"] == "a new customer adds us" and en["timeline"] is None
    assert client.get("/api/v1/journeys/welcome").json()["recent"] == before


def test_optout_get_put_delete(client: httpx.Client) -> None:
    """PUT opts out (manual, the note kept) and the preview then keeps them out with reason_code opted_out;
    DELETE opts back in; GET says which; /optouts lists them."""
    cid = client.get("/api/v1/contacts", params={"friend": True, "limit": 1}).json()["items"][0]["id"]
    assert client.get(f"/api/v1/contacts/{cid}/optout").json()["opted_out"] is False
    put = client.put(f"/api/v1/contacts/{cid}/optout", json={"note": "电话要求"})
    assert put.status_code == 200 and put.json()["opted_out"] is True and put.json()["source"] == "manual"
    assert put.json()["note"] == "电话要求"
    listed = client.get("/api/v1/optouts").json()
    assert cid in [o["contact_id"] for o in listed["optouts"]]
    left = client.get("/api/v1/journeys/welcome/preview", params={"sample": 500}).json()["enter_now"]["left_out"]
    assert {e["id"]: e["reason_code"] for e in left}[cid] == "opted_out"
    line = client.get("/api/v1/journeys/welcome/preview", params={"contact": cid, "lang": "en"}).json()["timeline"]
    assert line["ends"] == "not_entered" and line["entries"][-1]["detail"] == "opted out"
    gone = client.delete(f"/api/v1/contacts/{cid}/optout")
    assert gone.status_code == 200 and gone.json()["opted_out"] is False
    assert client.get(f"/api/v1/contacts/{cid}/optout").json()["opted_out"] is False


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("get", "/api/v1/journeys/nope", None, 404),
        ("get", "/api/v1/journeys/nope/preview", None, 404),
        ("get", "/api/v1/journeys/welcome/preview?contact=nobody", None, 404),
        ("get", "/api/v1/journeys/welcome/preview?contact=nobody&assume=buy", None, 422),
        ("get", "/api/v1/contacts/nobody/journeys", None, 404),
        ("get", "/api/v1/contacts/nobody/optout", None, 404),
        ("put", "/api/v1/contacts/nobody/optout", {}, 404),
        ("post", "/api/v1/sandbox/events", {"action": "message", "contact_id": "nobody", "text": "x"}, 404),
        ("post", "/api/v1/sandbox/events", {"action": "message"}, 422),
        ("post", "/api/v1/sandbox/events", {"action": "dance"}, 422),
        ("post", "/api/v1/sandbox/events", {"action": "add_contact", "extra": 1}, 422),
    ],
)
def test_bad_requests_are_clear_errors(client: httpx.Client, method: str, path: str, body: object, status: int) -> None:
    """Unknown journeys and contacts are 404s, a wrong assumption, a missing field or a bad body a 422, each with
    a message."""
    answer = client.request(method, path, json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]


def test_the_routes_need_the_key(live: LiveServer) -> None:
    """Without the API key every journey route is refused; with it, the same routes answer."""
    bare = httpx.Client(base_url=live.url, timeout=30)
    try:
        for path in ("/api/v1/journeys", "/api/v1/journeys/welcome/preview", "/api/v1/optouts"):
            assert bare.get(path).status_code == 401
            assert live.client.get(path).status_code == 200
        assert bare.post("/api/v1/sandbox/events", json={"action": "add_contact"}).status_code == 401
    finally:
        bare.close()
