"""`wecast serve` on the wecom gateway (a real uvicorn server, the fake WeCom in a thread of its own): the callback
URL (GET check, POSTed events from the fake, encrypted as WeCom does; refused when tampered or replayed; no API key
needed, the signature instead), the customer events reaching the journeys' inbox with the WelcomeCode, the 群发 task
routes (reconcile, remind, cancel), and the credentials absent from /metrics and every answer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from web_harness import LiveServer, make_settings
from wecom_harness import AES_KEY, CALLBACK_TOKEN, FakeWecomThread

from engine.gateways.wecom.fake_server import FakeWecom
from engine.spec import Campaign, parse_campaign
from storage import journeys as journeys_db
from storage.models import CustomerEventKind, DeliveryStatus

KEY = "serve-test-api-key-0123456789"
CAMPAIGN = """\
id: member_day
name: 会员日
audience: {}
message: {template: "本周六会员日，全场八折"}
quiet_hours: false
frequency_cap: false
dedupe: run
"""


@dataclass
class Serving:
    server: LiveServer
    fake: FakeWecom
    far: FakeWecomThread  # runs code on the fake's loop (staff confirming)

    @property
    def client(self) -> httpx.Client:
        return self.server.client

    def api(self, method: str, path: str) -> httpx.Response:
        return self.client.request(method, path, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    """The fake WeCom (40 customers of 2 staff) and `wecast serve` on gateway wecom with an API key."""
    fake = FakeWecom(customers=40, staff=2, shared_every=0, callback_token=CALLBACK_TOKEN, encoding_aes_key=AES_KEY)
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "member_day.yaml").write_text(CAMPAIGN, encoding="utf-8")
    far = FakeWecomThread(fake)
    with far as url:
        settings = make_settings(
            tmp_path,
            gateway="wecom",
            wecom={
                "corp_id": fake.corp_id,
                "secret": fake.secret,
                "callback_token": CALLBACK_TOKEN,
                "encoding_aes_key": AES_KEY,
                "base_url": url,
                "state_file": str(tmp_path / "wecom.sqlite"),
                "rate_limit_wait": "0.05s",
                "retry_delay": "0.01s",
            },
            api={"key": KEY},
        )
        with LiveServer(settings, require_key=True, loopback_only=False) as server:
            yield Serving(server, fake, far)


def wait_until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll `check` until it returns something true (the server works in its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def post_callback(client: httpx.Client, query: dict[str, str], body: bytes) -> httpx.Response:
    """As WeCom posts: XML, no API key."""
    return client.post("/wecom/callback", params=query, content=body, headers={"Content-Type": "text/xml"})


def test_the_url_check_answers_the_echo_without_a_key(serving: Serving) -> None:
    """WeCom's GET URL check gets the decrypted echostr as plain text (no API key); a wrong signature gets 403."""
    query = serving.fake.url_check("3127464589437")
    answer = serving.client.get("/wecom/callback", params=query)
    assert (answer.status_code, answer.text) == (200, "3127464589437")
    bad = serving.client.get("/wecom/callback", params={**query, "msg_signature": "0" * 40})
    assert bad.status_code == 403
    assert "signature" in bad.text


def test_a_new_customer_callback_reaches_the_journeys_with_its_welcome_code(serving: Serving) -> None:
    """An add_external_contact POSTed by the fake (encrypted, signed, XML, no key) is answered `success` and lands in
    the journeys' inbox as contact_added with the staff member and the WelcomeCode; the same callback replayed is
    refused, and WeCom's retry of the event (a new nonce) is acknowledged without a second inbox event."""
    fields = serving.far.call(lambda: serving.fake.add_customer("zhangwei", "新客小李"))
    query, body = serving.fake.callback(fields)
    first = post_callback(serving.client, query, body)
    assert (first.status_code, first.text) == (200, "success")
    db = serving.server.app.db

    def inbox() -> list[journeys_db.EventRow]:
        return [
            e
            for e in journeys_db.recent_events(db, contact_id=fields["ExternalUserID"])
            if e.kind is CustomerEventKind.CONTACT_ADDED
        ]

    [event] = wait_until(inbox)
    assert event.data["welcome_code"] == fields["WelcomeCode"]
    assert event.data["staff_id"] == "zhangwei"
    replayed = post_callback(serving.client, query, body)
    assert replayed.status_code == 403 and "replayed" in replayed.text
    retry_query, retry_body = serving.fake.callback(fields)
    assert post_callback(serving.client, retry_query, retry_body).text == "success"
    time.sleep(0.3)  # give a (wrong) second event time to be recorded
    assert len(inbox()) == 1


def test_a_tampered_callback_is_refused(serving: Serving) -> None:
    """A callback whose ciphertext was changed after signing is refused (403) and records nothing."""
    fields = serving.far.call(lambda: serving.fake.add_customer("lina"))
    query, body = serving.fake.callback(fields)
    tampered = body.replace(b"<Encrypt><![CDATA[", b"<Encrypt><![CDATA[A", 1)
    answer = post_callback(serving.client, query, tampered)
    assert answer.status_code == 403
    time.sleep(0.2)
    assert journeys_db.recent_events(serving.server.app.db, contact_id=fields["ExternalUserID"]) == []


def test_task_routes_reconcile_remind_and_cancel(serving: Serving) -> None:
    """A campaign run through the API becomes one task per staff member; remind reaches both tasks; after the staff
    confirm, reconcile completes the run with every customer sent once (counted at the fake); a second run cancelled
    before confirmation fails its deliveries as cancelled and delivers nothing."""
    assert serving.api("POST", "/api/v1/contacts/sync").status_code == 200
    started = serving.api("POST", "/api/v1/campaigns/member_day/run")
    assert started.status_code == 202, started.text
    run_id = started.json()["run"]["id"]

    def submitted() -> int:
        return int(serving.api("GET", f"/api/v1/runs/{run_id}").json()["counts"].get(DeliveryStatus.SUBMITTED, 0))

    assert wait_until(lambda: submitted() == 40)
    assert len(serving.fake.tasks) == 2
    reminded = serving.api("POST", f"/api/v1/runs/{run_id}/remind").json()
    assert (reminded["tasks"], reminded["reminded"], reminded["problems"]) == (2, 2, [])
    serving.far.call(serving.fake.confirm)
    done = serving.api("POST", f"/api/v1/runs/{run_id}/reconcile").json()
    received = [m.contact_id for m in serving.fake.received]
    assert done["sent"] == len(received) == len(set(received))
    assert done["sent"] + done["failed"] == 40 and done["waiting"] == 0
    assert done["run"]["status"] == "completed"

    second = serving.server.app.plan(campaign_of(serving), run_key="second")  # another run of the campaign
    resumed = serving.api("POST", f"/api/v1/runs/{second.run_id}/resume")
    assert resumed.status_code == 200, (resumed.text, second)
    assert wait_until(lambda: len(serving.fake.tasks) == 4)
    assert wait_until(
        lambda: serving.api("GET", f"/api/v1/runs/{second.run_id}").json()["counts"].get("submitted", 0) == 40
    )
    cancelled = serving.api("POST", f"/api/v1/runs/{second.run_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["counts"].get("failed", 0) == 40
    assert all(t.cancelled for t in list(serving.fake.tasks.values())[2:])
    serving.far.call(serving.fake.confirm)
    assert len(serving.fake.received) == len(received)


def campaign_of(serving: Serving) -> Campaign:
    settings = serving.server.app.settings
    return parse_campaign(CAMPAIGN, settings.campaigns_dir / "member_day.yaml", settings)


def test_the_credentials_appear_in_no_answer(serving: Serving) -> None:
    """/metrics, /healthz, the login state and the config the API shows contain none of the four credentials."""
    secrets = [serving.fake.corp_id, serving.fake.secret, CALLBACK_TOKEN, AES_KEY]
    answers = [
        serving.api("GET", "/metrics").text,
        serving.client.get("/healthz").text,
        serving.api("GET", "/api/v1/login").text,
        serving.api("GET", "/api/v1/events").text,
    ]
    assert "wecast_logged_in 1.0" in answers[0]
    for secret in secrets:
        assert all(secret not in a for a in answers), secret
