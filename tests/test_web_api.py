"""The HTTP API against a real uvicorn on loopback: the source document's flow end to end on the sandbox,
idempotent sends, refusal while logged out, 422s that name the field, and the /api/v1 REST API."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zxingcpp
from PIL import Image

from engine.contacts import ListState
from engine.gateways.sandbox import SandboxGateway
from engine.web.models import AllUsersPage, ContactsPageView

try:
    from web_harness import BROKEN, CAMPAIGN, MANUAL, LiveServer, login, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import BROKEN, CAMPAIGN, MANUAL, LiveServer, login, make_settings


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root: Path = tmp_path_factory.mktemp("web")
    settings = make_settings(root)
    (root / "campaigns" / "vip_daily.yaml").write_text(CAMPAIGN, encoding="utf-8")
    (root / "campaigns" / "new_customers.yaml").write_text(MANUAL, encoding="utf-8")
    (root / "campaigns" / "broken.yaml").write_text(BROKEN, encoding="utf-8")
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> httpx.Client:
    return live.client


def outbox(live: LiveServer) -> SandboxGateway:
    assert isinstance(live.app.gateway, SandboxGateway)
    return live.app.gateway


def test_source_document_flow_end_to_end(live: LiveServer, client: httpx.Client) -> None:
    """goStart → QR → scan → wrong code then right code → get-all-user pages → send-message →
    send-message-all by tag → goEnd → goStart shows a new QR."""
    client.post("/goEnd")
    start = client.post("/goStart")
    assert start.status_code == 200
    first = start.json()
    assert first["state"] == "waiting_scan" and first["qrcodeKey"] and first["qrcodeUrl"]
    png = client.get("/api/v1/login/qr.png")
    assert png.headers["content-type"] == "image/png"
    assert zxingcpp.read_barcodes(Image.open(io.BytesIO(png.content)))[0].text == first["qrcodeUrl"]

    assert client.post("/api/v1/sandbox/scan").json()["state"] == "waiting_verify_code"
    code = client.get("/api/v1/sandbox/phone").json()["verifyCode"]
    wrong = "000000" if code != "000000" else "111111"
    bad = client.post("/submit-verify-code", json={"verifyCode": wrong, "qrcodeKey": first["qrcodeKey"]})
    assert bad.status_code == 400
    assert bad.json()["triesLeft"] == 2 and "2 tries left" in bad.json()["error"]
    ok = client.post("/submit-verify-code", json={"verifyCode": code, "qrcodeKey": first["qrcodeKey"]})
    assert ok.status_code == 200 and ok.json()["state"] == "logged_in"

    seen: list[str] = []
    page = 1
    while True:
        body = client.post("/get-all-user", json={"pageSize": 25, "page": page}).json()
        seen += [c["id"] for c in body["datas"]]
        if not body["hasNextPage"]:
            break
        page += 1
    assert page == 3 and len(seen) == len(set(seen)) == 60
    assert AllUsersPage.model_validate(body).model_dump(mode="json") == body  # the documented shape, exactly
    contact = client.post("/get-all-user", json={"pageSize": 1}).json()["datas"][0]
    for name in (
        "id",
        "name",
        "alias",
        "avatar",
        "gender",
        "city",
        "province",
        "address",
        "corporation",
        "title",
        "phone",
        "weixin",
        "description",
        "signature",
        "friend",
        "coworker",
        "star",
        "type",
        "realName",
        "aka",
        "additionalInfo",
        "corpId",
        "tags",
    ):
        assert name in contact
    by_cursor: list[str] = []
    cursor = None
    while True:
        body = client.post("/get-all-user", json={"pageSize": 25, **({"cursor": cursor} if cursor else {})}).json()
        by_cursor += [c["id"] for c in body["datas"]]
        cursor = body["nextCursor"]
        if not body["hasNextPage"]:
            break
    assert by_cursor == seen

    friend = next(c for c in client.get("/api/v1/contacts", params={"friend": True, "limit": 1}).json()["items"])
    before = len(outbox(live).outbox_messages(friend["id"]))
    sent = client.post("/send-message", json={"id": friend["id"], "message": "您好，本周护肤8折"})
    assert sent.status_code == 200, sent.text
    assert sent.json()["sent"] == 1
    assert len(outbox(live).outbox_messages(friend["id"])) == before + 1

    vip = client.get("/api/v1/contacts", params={"tag": "VIP", "friend": True, "coworker": False, "limit": 500}).json()
    assert ContactsPageView.model_validate(vip).model_dump(mode="json") == vip
    total_before = len(outbox(live).outbox_messages())
    many = client.post("/send-message-all", json={"tag": "VIP", "message": "VIP专享：满500减50"})
    assert many.status_code == 200, many.text
    assert many.json()["sent"] == vip["total"] > 0
    assert len(outbox(live).outbox_messages()) == total_before + vip["total"]

    end = client.post("/goEnd")
    assert end.status_code == 200 and end.json()["state"] == "logged_out"
    again = client.post("/goStart").json()
    assert again["state"] == "waiting_scan" and again["qrcodeKey"] != first["qrcodeKey"]
    login(client)


def test_idempotency_key_retry_sends_once(live: LiveServer, client: httpx.Client) -> None:
    """Retries (concurrent ones too) with one Idempotency-Key send once; reusing the key for another text is refused."""
    login(client)
    contact = client.get("/api/v1/contacts", params={"friend": True, "limit": 1, "offset": 3}).json()["items"][0]
    before = len(outbox(live).outbox_messages(contact["id"]))
    headers = {"Idempotency-Key": "order-42-reminder"}
    body = {"id": contact["id"], "message": "您的订单已发货"}
    answers: list[httpx.Response] = []

    def post() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            answers.append(c.post("/send-message", json=body, headers=headers))

    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers.append(client.post("/send-message", json=body, headers=headers))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["runId"] for a in answers}) == 1
    assert answers[-1].json()["replayed"] is True
    assert len(outbox(live).outbox_messages(contact["id"])) == before + 1
    other = client.post("/send-message", json={**body, "message": "另一条"}, headers=headers)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]


def test_send_while_logged_out_is_refused_at_once(live: LiveServer, client: httpx.Client) -> None:
    """A send while logged out answers 409 with a clear message and sends nothing."""
    login(client)
    contact = client.get("/api/v1/contacts", params={"friend": True, "limit": 1}).json()["items"][0]
    client.post("/goEnd")
    total = len(outbox(live).outbox_messages())
    for path, body in (
        ("/send-message", {"id": contact["id"], "message": "hi"}),
        ("/send-message-all", {"tag": "VIP", "message": "hi"}),
    ):
        answer = client.post(path, json=body)
        assert answer.status_code == 409
        assert "not logged in" in answer.json()["error"] and "/goStart" in answer.json()["error"]
    assert len(outbox(live).outbox_messages()) == total
    login(client)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/submit-verify-code", {}, "verifyCode"),
        ("/submit-verify-code", {"verifyCode": "12ab56"}, "verifyCode"),
        ("/submit-verify-code", {"verifyCode": "123456", "qrcodeKey": ["x"]}, "qrcodeKey"),
        ("/get-all-user", {"pageSize": "many"}, "pageSize"),
        ("/get-all-user", {"pageSize": 0}, "pageSize"),
        ("/get-all-user", {"pageSize": 10, "page": 2, "cursor": "x"}, "cursor"),
        ("/send-message", {"message": "hi"}, "id"),
        ("/send-message", {"id": "7881"}, "message"),
        ("/send-message", {"id": "7881", "message": "   "}, "message"),
        ("/send-message-all", {"message": "hi"}, "ids"),
        ("/send-message-all", {"message": "hi", "ids": "not-a-list"}, "ids"),
        ("/api/v1/login/verify-code", {"verifyCode": 12}, "verifyCode"),
        ("/api/v1/campaigns/validate", {"content": 5}, "content"),
    ],
)
def test_bad_bodies_get_422_naming_the_field(client: httpx.Client, path: str, body: object, field: str) -> None:
    """A malformed body is a 422 whose message names the field, never a 500."""
    answer = client.post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    assert field in answer.json()["error"]


def test_unparseable_json_is_422(client: httpx.Client) -> None:
    """Broken JSON is a 422 that says so."""
    answer = client.post("/send-message", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert "JSON" in answer.json()["error"] or "json" in answer.json()["error"]


def test_rest_api(live: LiveServer, client: httpx.Client) -> None:
    """Login state, QR formats, contacts filters, tags, campaigns (invalid files listed), preview, run now
    (same run twice), runs, deliveries, events, scheduler and metrics."""
    login(client)
    state = client.get("/api/v1/login").json()
    assert state["state"] == "logged_in" and any(e["kind"] == "login" for e in state["events"])
    assert client.get("/api/v1/login/qr.svg").status_code == 404

    tags = {t["name"]: t for t in client.get("/api/v1/tags").json()["tags"]}
    assert tags["VIP"]["contacts"] > 0
    vip = client.get("/api/v1/contacts", params={"tag": "VIP", "limit": 500}).json()
    assert vip["total"] == tags["VIP"]["contacts"] and all("VIP" in c["tags"] for c in vip["items"])
    city = vip["items"][0]["city"]
    both = client.get("/api/v1/contacts", params={"tag": "VIP", "city": city}).json()
    assert both["items"] and all(c["city"] == city and "VIP" in c["tags"] for c in both["items"])
    first = client.get("/api/v1/contacts", params={"limit": 10}).json()
    second = client.get("/api/v1/contacts", params={"limit": 10, "cursor": first["nextCursor"]}).json()
    assert first["hasNextPage"] and not {c["id"] for c in first["items"]} & {c["id"] for c in second["items"]}
    assert client.get(f"/api/v1/contacts/{first['items'][0]['id']}").json()["id"] == first["items"][0]["id"]
    assert client.get("/api/v1/contacts/nobody").status_code == 404

    listing = client.get("/api/v1/campaigns").json()
    by_id = {c["id"]: c for c in listing["campaigns"]}
    assert set(by_id) == {"vip_daily", "new_customers"}
    assert by_id["vip_daily"]["next_fire"] and by_id["new_customers"]["schedule"] is None
    assert listing["errors"] and listing["errors"][0]["file"].endswith("broken.yaml")
    assert listing["errors"][0]["line"] == 4
    good = client.post("/api/v1/campaigns/validate", json={"content": CAMPAIGN, "filename": "x.yaml"}).json()
    assert good["valid"] and good["id"] == "vip_daily" and good["next_fires"]
    bad = client.post("/api/v1/campaigns/validate", json={"content": BROKEN}).json()
    assert not bad["valid"] and bad["errors"][0]["line"] == 4
    assert client.post("/api/v1/campaigns/validate").json()["valid"] is False

    preview = client.get("/api/v1/campaigns/vip_daily/preview").json()
    assert preview["counts"]["recipients"] > 0 and "VIP专享" in preview["recipients"][0]["message"]
    run_now = client.post("/api/v1/campaigns/vip_daily/run")
    assert run_now.status_code == 202 and run_now.json()["created"] is True
    run_id = run_now.json()["run"]["id"]
    again = client.post("/api/v1/campaigns/vip_daily/run").json()
    assert again["created"] is False and again["run"]["id"] == run_id
    for _ in range(200):
        run = client.get(f"/api/v1/runs/{run_id}").json()
        if run["status"] == "completed":
            break
        threading.Event().wait(0.02)
    assert run["status"] == "completed" and run["counts"]["sent"] == preview["counts"]["recipients"]
    assert any(r["id"] == run_id for r in client.get("/api/v1/runs", params={"campaign": "vip_daily"}).json()["runs"])
    delivered = client.get("/api/v1/deliveries", params={"run_id": run_id, "status": "sent", "limit": 500}).json()
    assert len(delivered["deliveries"]) == preview["counts"]["recipients"]
    assert client.post(f"/api/v1/runs/{run_id}/pause").status_code == 409
    assert client.get("/api/v1/runs/999999").status_code == 404

    assert any(e["kind"] == "qr" for e in client.get("/api/v1/events", params={"kind": "qr"}).json()["events"])
    sched = client.get("/api/v1/scheduler").json()
    assert sched["enabled"] and {c["id"] for c in sched["campaigns"]} == set(by_id) and sched["errors"]
    metrics = client.get("/metrics").text
    assert 'wecast_deliveries{status="sent"}' in metrics and "wecast_queue_depth" in metrics
    assert 'wecast_login_state{state="logged_in"} 1.0' in metrics
    assert "wecast_gateway_latency_seconds_bucket" in metrics
    assert client.get("/openapi.json").json()["paths"]["/send-message"]


def test_pause_resume_cancel_a_run_waiting_for_login(live: LiveServer, client: httpx.Client) -> None:
    """A campaign run started while logged out waits (pending); it can be paused, resumed and cancelled."""
    login(client)
    client.post("/goEnd")
    run = client.post("/api/v1/campaigns/new_customers/run").json()["run"]
    run_id = run["id"]
    assert client.get(f"/api/v1/runs/{run_id}").json()["counts"].get("pending", 0) > 0
    assert client.post(f"/api/v1/runs/{run_id}/pause").json()["status"] == "paused"
    assert client.post(f"/api/v1/runs/{run_id}/resume").json()["status"] == "running"
    cancelled = client.post(f"/api/v1/runs/{run_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and not cancelled["counts"].get("pending")
    assert client.post(f"/api/v1/runs/{run_id}/resume").status_code == 409
    login(client)


@pytest.mark.parametrize(
    ("method", "path"),
    [("plan", "/api/v1/campaigns/new_customers/run"), ("preview", "/api/v1/campaigns/new_customers/preview")],
)
def test_planning_and_preview_run_off_the_event_loop(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch, method: str, path: str
) -> None:
    """While a run is being planned (or a preview computed) for the API — held here until released — the server
    keeps answering: /healthz returns at once, because planning never runs on the event loop."""
    import time

    entered, release = threading.Event(), threading.Event()
    real = getattr(live.app, method)

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(10), "never released"
        return real(*args, **kwargs)

    login(live.client)
    monkeypatch.setattr(live.app, method, held)
    answers: list[httpx.Response] = []

    def request() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            answers.append(c.post(path) if path.endswith("/run") else c.get(path))

    worker = threading.Thread(target=request)
    worker.start()
    try:
        assert entered.wait(10), f"{method} was not called"
        started = time.monotonic()
        health = live.client.get("/healthz", timeout=2)
        assert health.status_code == 200 and time.monotonic() - started < 1.0
    finally:
        release.set()
        worker.join(30)
    assert answers and answers[0].status_code in (200, 202), answers[0].text if answers else "no answer"


def test_a_run_started_while_this_process_syncs_waits_for_the_whole_list(tmp_path: Path) -> None:
    """ "Run now" while a contact sync of this same process is halfway (one starts at every login) plans once the
    sync has finished, from the whole list, instead of refusing it as incomplete (409) as if another process had
    left it half-written (seen as a flaky console test under load)."""
    settings = make_settings(tmp_path)
    (tmp_path / "campaigns" / "vip_daily.yaml").write_text(CAMPAIGN, encoding="utf-8")
    with LiveServer(settings) as server:
        client = server.client
        login(client)
        assert client.get("/api/v1/contacts").status_code == 200  # the login's own sync, finished
        gateway = server.app.gateway
        listing, release, halfway = gateway.list_contacts, threading.Event(), threading.Event()

        async def slow(cursor: str | None = None, page_size: int = 500) -> Any:
            page = await listing(cursor, page_size)
            halfway.set()
            await asyncio.to_thread(release.wait, 30)
            return page

        gateway.list_contacts = slow  # type: ignore[method-assign]
        answers: dict[str, httpx.Response] = {}

        def post(name: str, path: str) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as other:
                answers[name] = other.post(path)

        syncing = threading.Thread(target=post, args=("sync", "/api/v1/contacts/sync"))
        syncing.start()
        assert halfway.wait(10)
        assert server.app.contact_list() is ListState.INCOMPLETE
        running = threading.Thread(target=post, args=("run", "/api/v1/campaigns/vip_daily/run"))
        running.start()
        running.join(0.5)
        assert running.is_alive() and "run" not in answers  # waiting for the sync, not refused
        release.set()
        syncing.join(30)
        running.join(30)
        assert answers["sync"].status_code == 200
        assert answers["run"].status_code == 202, answers["run"].text
        assert answers["run"].json()["run"]["planned"] > 0
