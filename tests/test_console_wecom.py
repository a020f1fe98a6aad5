"""The console's run page on the wecom gateway, over real HTTP (`wecast serve` in a thread, the fake WeCom in
another): how many 群发 tasks each staff member has awaiting confirmation and confirmed, and the buttons that
remind them and collect their confirmations now — each a change that needs the page's CSRF token."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from web_harness import LiveServer, login, make_settings
from wecom_harness import FakeWecomThread

from engine.gateways.wecom.fake_server import FakeWecom

CAMPAIGN = """\
id: member_day
name: 会员日
audience: {}
message: {template: "本周六会员日，全场八折"}
quiet_hours: false
frequency_cap: false
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LiveServer, FakeWecom, FakeWecomThread]]:
    """The fake WeCom (30 customers of 3 staff) and `wecast serve` on gateway wecom (loopback, no key)."""
    fake = FakeWecom(customers=30, staff=3, shared_every=0)
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
                "base_url": url,
                "state_file": str(tmp_path / "wecom.sqlite"),
                "retry_delay": "0.01s",
            },
        )
        with LiveServer(settings) as server:
            yield server, fake, far


def wait_until(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def rows(html: str) -> dict[str, tuple[int, int, int]]:
    """The tasks card's rows: staff userid -> (awaiting, confirmed, customers waiting)."""
    found = re.findall(
        r'<tr data-staff="([^"]*)">.*?class="waiting">(\d+)</td>.*?class="confirmed">(\d+)</td>.*?>(\d+)</td></tr>',
        html,
    )
    return {staff: (int(w), int(c), int(n)) for staff, w, c, n in found}


def test_the_run_page_shows_each_staff_members_tasks_and_reminds_and_collects(
    served: tuple[LiveServer, FakeWecom, FakeWecomThread],
) -> None:
    """A campaign run from the console becomes one task per staff member: the run page shows each member's task
    awaiting confirmation with their customers; "remind" (refused without the CSRF token) reaches every task at the
    fake; after the staff confirm, "collect now" shows every task confirmed, the run completed and the buttons gone."""
    server, fake, far = served
    client = httpx.Client(base_url=server.url, timeout=30)
    try:
        assert client.post("/api/v1/contacts/sync").status_code == 200
        page = client.get("/console/campaigns/member_day").text
        token = re.search(r'"X-CSRF-Token": "([0-9a-f]+)"', page)
        assert token
        h = {"x-csrf-token": token.group(1), "hx-request": "true"}
        started = client.post("/console/campaigns/member_day/run", json={}, headers=h)
        assert started.status_code == 204, started.text
        run_path = started.headers["hx-redirect"]
        run_id = int(run_path.rsplit("/", 1)[1])
        wait_until(lambda: client.get(f"/api/v1/runs/{run_id}").json()["counts"].get("submitted", 0) == 30)
        assert len(fake.tasks) == 3

        leads = Counter(task.sender for task in fake.tasks.values() for _ in task.recipients)
        shown = client.get(run_path).text
        assert 'id="run-tasks"' in shown and "按员工统计的群发任务" in shown
        assert rows(shown) == {staff: (1, 0, n) for staff, n in leads.items()}
        assert f'hx-post="/console/runs/{run_id}/remind"' in shown
        assert f'hx-post="/console/runs/{run_id}/reconcile"' in shown

        assert client.post(f"/console/runs/{run_id}/remind", json={}).status_code == 403
        assert all(not t.reminders for t in fake.tasks.values())
        reminded = client.post(f"/console/runs/{run_id}/remind", json={}, headers=h)
        assert reminded.status_code == 200 and 'id="run-live"' in reminded.text
        assert "已提醒 3 个任务。" in reminded.text
        assert all(len(t.reminders) == 1 for t in fake.tasks.values())

        far.call(fake.confirm)
        collected = client.post(f"/console/runs/{run_id}/reconcile?lang=en", json={}, headers=h)
        assert collected.status_code == 200
        sent = len(fake.received)
        assert f"Checked 3 tasks: {sent} sent, {30 - sent} failed, 0 still awaiting confirmation." in collected.text
        assert rows(collected.text) == dict.fromkeys(leads, (0, 1, 0))
        assert 'data-status="completed"' in collected.text
        assert "/reconcile" not in collected.text and "/remind" not in collected.text
    finally:
        client.close()


def test_direct_gateways_show_no_tasks(tmp_path: Path) -> None:
    """On a gateway that sends directly (the sandbox), a run's page has no tasks card and no task buttons."""
    settings = make_settings(tmp_path)
    (tmp_path / "campaigns" / "member_day.yaml").write_text(CAMPAIGN, encoding="utf-8")
    with LiveServer(settings) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        try:
            login(client)
            assert client.post("/api/v1/contacts/sync").status_code == 200
            started = client.post("/api/v1/campaigns/member_day/run")
            assert started.status_code == 202, started.text
            shown = client.get(f"/console/runs/{started.json()['run']['id']}").text
            assert 'id="run-live"' in shown
            assert 'id="run-tasks"' not in shown and "/remind" not in shown and "/reconcile" not in shown
        finally:
            client.close()
