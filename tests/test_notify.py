"""Run summaries (engine.notify): when a campaign's run completes, its counts go — once, in the configured
language — to config.yaml's or the campaign's `notify:` staff (message/send, on the fake WeCom server) and group
robot (a webhook on loopback, on any gateway); a failing robot is logged without its key and never fails the
run; test sends and `notify: false` tell nobody; misplaced settings are refused naming file, line and field."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import MONDAY_10, PLAIN, campaign, run, started

from engine.clock import FakeClock
from engine.errors import CampaignError, ConfigError
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway
from engine.service import Wecast
from engine.settings import Settings, load_settings
from storage.deliveries import status_counts
from storage.models import DeliveryStatus

MakeSettings = Callable[..., Settings]
ROBOT_KEY = "robot-key-0d9f8e7c6b5a"


class Robot:
    """A group robot's webhook on loopback: records each POSTed text, answers as WeCom does (or as told)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.keys: list[str] = []
        self.answer: tuple[int, dict[str, Any]] = (200, {"errcode": 0, "errmsg": "ok"})
        robot = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                robot.texts.append(body["text"]["content"])
                robot.keys.append(self.path.partition("key=")[2])
                status, data = robot.answer
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, key: str = ROBOT_KEY) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/cgi-bin/webhook/send?key={key}"


@pytest.fixture
def robot() -> Iterator[Robot]:
    r = Robot()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def notify_config(robot: Robot, staff: str = "") -> str:
    return f"language: zh_CN\nnotify: {{robot: '{robot.url()}'{staff}}}\n"


def test_a_finished_run_tells_the_robot_once_in_chinese(
    make_settings: MakeSettings, robot: Robot, caplog: pytest.LogCaptureFixture
) -> None:
    """A completed campaign run posts one summary with its counts to config.yaml's robot, in Chinese; the robot's
    key never reaches the log; a later reconcile of the same run tells nobody again."""
    caplog.set_level(logging.DEBUG)
    settings = make_settings(contacts=30, extra=notify_config(robot))

    async def go() -> None:
        app = await started(settings, FakeClock(MONDAY_10))
        try:
            outcome = await app.run_campaign(campaign(settings, PLAIN))
            summary = outcome.summary
            assert summary is not None and summary.status == "completed"
            sent = summary.counts.get(DeliveryStatus.SENT, 0)
            assert sent > 0
            assert robot.texts == [
                f"wecast：「测试活动」第 #{summary.run_id} 批发送已结束：已发送 {sent}，失败 "
                f"{summary.counts.get(DeliveryStatus.FAILED, 0)}，跳过 {summary.counts.get(DeliveryStatus.SKIPPED, 0)}"
                f"，结果未知 {summary.counts.get(DeliveryStatus.UNKNOWN, 0)}"
            ]
            assert robot.keys == [ROBOT_KEY]
            await app.reconcile(summary.run_id)
            assert len(robot.texts) == 1
        finally:
            await app.close()

    run(go())
    assert ROBOT_KEY not in caplog.text
    assert "summary sent to the group robot http://127.0.0.1" in caplog.text


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ((200, {"errcode": 93000, "errmsg": "invalid webhook url"}), "errcode 93000 invalid webhook url"),
        ((500, {"errcode": -1, "errmsg": "system busy"}), "HTTP 500"),
        (None, "did not answer (ConnectError)"),
    ],
)
def test_a_failing_robot_is_logged_and_the_run_still_completes(
    make_settings: MakeSettings,
    robot: Robot,
    caplog: pytest.LogCaptureFixture,
    answer: tuple[int, dict[str, Any]] | None,
    words: str,
) -> None:
    """A robot that refuses (errcode), errs (HTTP 500) or is not there at all: one warning naming the robot
    without its key, and the run completed all the same."""
    caplog.set_level(logging.DEBUG)
    if answer is None:
        url = robot.url()
        robot.server.shutdown()
        robot.server.server_close()
        extra = f"notify: {{robot: '{url}'}}\n"
    else:
        robot.answer = answer
        extra = notify_config(robot)
    settings = make_settings(contacts=10, extra=extra)

    async def go() -> None:
        app = await started(settings, FakeClock(MONDAY_10))
        try:
            outcome = await app.run_campaign(campaign(settings, PLAIN))
            assert outcome.summary is not None and outcome.summary.status == "completed"
        finally:
            await app.close()

    run(go())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "wecast.notify"]
    assert len(warnings) == 1 and words in warnings[0], warnings
    assert ROBOT_KEY not in caplog.text


def test_campaigns_override_or_turn_off_the_summary(
    make_settings: MakeSettings, robot: Robot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`notify: false` tells nobody; a campaign's own robot (`${ENV}`) is told instead of config.yaml's; a test
    send tells nobody."""
    settings = make_settings(contacts=10, extra=notify_config(robot))
    monkeypatch.setenv("VIP_ROBOT", robot.url("vip-robot-key"))

    async def go() -> None:
        app = await started(settings, FakeClock(MONDAY_10))
        try:
            quiet = await app.run_campaign(campaign(settings, PLAIN + "notify: false\n", name="quiet"))
            assert quiet.summary is not None and quiet.summary.status == "completed"
            assert robot.texts == []
            own = campaign(settings, PLAIN + "notify: {robot: '${VIP_ROBOT}'}\n", name="own")
            done = await app.run_campaign(own)
            assert done.summary is not None and done.summary.status == "completed"
            assert robot.keys == ["vip-robot-key"]
            contact_id = (await app.gateway.list_contacts(None, 1)).contacts[0].id
            test_run = await app.test_send(campaign(settings, PLAIN, name="tested"), [contact_id])
            assert test_run.status == "completed"
            assert robot.keys == ["vip-robot-key"]
        finally:
            await app.close()

    run(go())


def test_misplaced_notify_settings_are_refused_with_their_place(tmp_path: Path, db_url: str) -> None:
    """Staff on a gateway that cannot message them, a robot URL written into a campaign file, an unset
    environment variable and a robot that is not a webhook URL are refused, naming file, line and field."""
    from helpers import write_settings

    with pytest.raises(ConfigError) as staff:
        write_settings(tmp_path, db_url, extra="notify:\n  staff: [zhangsan]\n")
    assert "config.yaml:" in str(staff.value) and "notify.staff" in str(staff.value)
    assert "gateway wecom" in str(staff.value)
    with pytest.raises(ConfigError, match=r"notify\.robot.*webhook URL"):
        write_settings(tmp_path, db_url, extra="notify: {robot: 'http://robot.example.com/send?key=k'}\n")

    settings = write_settings(tmp_path, db_url)
    with pytest.raises(CampaignError) as literal:
        campaign(settings, PLAIN + "notify:\n  robot: 'https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k'\n")
    assert (
        "c1.yaml:" in str(literal.value)
        and "notify.robot" in str(literal.value)
        and "${ENV_NAME}" in str(literal.value)
    )
    with pytest.raises(CampaignError, match=r"notify\.robot: environment variable NO_SUCH_ROBOT_ENV is not set"):
        campaign(settings, PLAIN + "notify: {robot: '${NO_SUCH_ROBOT_ENV}'}\n")
    with pytest.raises(CampaignError, match=r"notify\.staff: staff are notified through WeCom's message/send"):
        campaign(settings, PLAIN + "notify: {staff: [zhangsan]}\n")


def test_staff_hear_of_a_wecom_run_once_it_reconciles(tmp_path: Path, robot: Robot) -> None:
    """On gateway wecom, config.yaml's staff get the summary through message/send (received by the fake WeCom
    server, in English here) and the robot gets the same text, once the run's 群发 tasks are confirmed and
    reconciled — not while they wait."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(customers=40, staff=2, clock=clock)
        server = FakeWecomServer(fake)
        url = await server.start()
        cfg = tmp_path / "config.yaml"
        cfg.write_text(
            "version: 1\ngateway: wecom\nlanguage: en\n"
            f"database_url: 'sqlite:///{tmp_path}/wecast.sqlite'\ncampaigns_dir: {tmp_path}/campaigns\n"
            f"wecom:\n  corp_id: {fake.corp_id}\n  secret: {fake.secret}\n  base_url: {url}\n"
            f"  agent_id: {fake.agent_id}\n  state_file: {tmp_path}/wecom.sqlite\n  retry_delay: 0.01s\n"
            f"notify:\n  staff: [{fake.staff[0]}]\n  robot: '{robot.url()}'\n",
            encoding="utf-8",
        )
        settings = load_settings(cfg)
        app = Wecast(settings, gateway=WecomGateway(settings.wecom, clock), clock=clock)
        await app.start()
        try:
            await app.sync()
            body = "audience: {}\nmessage: {template: '本周六会员日'}\nfrequency_cap: false\nquiet_hours: false\n"
            outcome = await app.run_campaign(campaign(settings, body), confirm_wait=0)
            assert outcome.summary is not None and outcome.summary.status == "running"
            assert fake.staff_messages == [] and robot.texts == []
            fake.confirm()
            await app.reconcile(outcome.summary.run_id)
            await app.reconcile(outcome.summary.run_id)
            [(userid, text)] = fake.staff_messages
            assert userid == fake.staff[0]
            n = {s.value: c for s, c in status_counts(app.db, outcome.summary.run_id).items()}
            assert n.get("sent", 0) > 0
            assert text == (
                f"wecast: run #{outcome.summary.run_id} of 测试活动 finished: {n.get('sent', 0)} sent, "
                f"{n.get('failed', 0)} failed, {n.get('skipped', 0)} skipped, {n.get('unknown', 0)} unknown"
            )
            assert robot.texts == [text]
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())


def test_the_robots_url_never_shows(tmp_path: Path) -> None:
    """The robot's webhook URL (it carries the key) is a secret: `wecast config` masks it when it comes from
    WECAST_NOTIFY_ROBOT, and a URL that is not a webhook is refused without echoing it."""
    from click.testing import CliRunner

    from engine.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text("version: 1\n", encoding="utf-8")
    url = f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={ROBOT_KEY}"
    result = CliRunner().invoke(main, ["-c", str(cfg), "config"], env={"WECAST_NOTIFY_ROBOT": url})
    assert result.exit_code == 0, result.output
    assert '"notify"' in result.output and ROBOT_KEY not in result.output
    assert load_settings(cfg).notify.robot is None  # only from the environment
    cfg.write_text(f"version: 1\nnotify: {{robot: 'ftp://robot.example.com/?key={ROBOT_KEY}'}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert f"{cfg}:2: notify.robot" in str(info.value) and ROBOT_KEY not in str(info.value)
