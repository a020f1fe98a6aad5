"""The newcomer's stumbles of issue 11 that tests/test_cli_i18n.py does not already cover, each as it was met:
a one-off campaign run early, a past one-off date, `run --no-wait` on a campaign that cannot be planned, config
errors pointing to the campaign reference, `/api/v1/scheduler` inventing a last fire, `wecast serve` on a taken port,
and the database file deleted under a running process."""

from __future__ import annotations

import json
import re
import socket
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from helpers import demo_workdir

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The demo campaigns and a config in a fresh folder, sending as fast as the sandbox takes it, at any hour."""
    return demo_workdir(tmp_path)


def wecast(workdir: Path, *args: str) -> tuple[int, str, str]:
    runner = CliRunner(env={"COLUMNS": "80"})
    result = runner.invoke(main, ["-c", str(workdir / "config.yaml"), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def one_off(workdir: Path, name: str, at: datetime, template: str = "{{ display_name }}，新年快乐") -> Path:
    path = workdir / "campaigns" / f"{name}.yaml"
    path.write_text(
        f"name: 一次性问候\nschedule:\n  at: {at:%Y-%m-%d %H:%M}\naudience: {{tags_any: [VIP]}}\n"
        f"message: {{template: '{template}'}}\nfrequency_cap: false\nquiet_hours: false\n",
        encoding="utf-8",
    )
    return path


def test_a_future_one_off_slot_is_refused_without_now(workdir: Path) -> None:
    """`wecast run` of a one-off campaign ten days ahead sends nothing and says when its slot is and how to send it
    now; `--now` sends that slot's run now (once: the scheduler's fire later finds it planned)."""
    at = (datetime.now(SHANGHAI) + timedelta(days=10, minutes=5)).replace(second=0, microsecond=0)
    one_off(workdir, "later", at)
    code, _, err = wecast(workdir, "run", "later")
    assert code == 1
    assert f"{at:%Y-%m-%d %H:%M} (Asia/Shanghai), 10 days from now" in err
    assert "wecast run later --now" in err
    assert wecast(workdir, "runs", "--json")[1].strip() == "[]"  # nothing planned
    code, _, err = wecast(workdir, "--lang", "zh", "run", "later")
    assert code == 1 and "还有 10 天" in err and "--now" in err
    code, out, err = wecast(workdir, "run", "later", "--now", "--json")
    assert code == 0, err
    [summary] = json.loads(out)
    assert summary["counts"]["sent"] > 0
    [run] = json.loads(wecast(workdir, "runs", "--json")[1])
    assert run["run_key"] == at.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_past_one_off_date_is_a_validation_warning(workdir: Path) -> None:
    """A one-off date already gone is valid but never fired: validate warns at its line and still exits 0."""
    path = one_off(workdir, "gone", datetime(2020, 1, 1, 20, 0))
    code, _out, err = wecast(workdir, "validate", str(path))
    assert code == 0, err
    assert f"warning: {path}:3: schedule.at: 2020-01-01 20:00 (Asia/Shanghai) is in the past" in err
    _, _, err = wecast(workdir, "--lang", "zh", "validate", str(path))
    assert "警告：" in err and "已经过去" in err
    data = json.loads(wecast(workdir, "validate", str(path), "--json")[1])
    assert data["ok"] is True and len(data["warnings"]) == 1
    future = one_off(workdir, "ahead", datetime.now(SHANGHAI) + timedelta(days=3))
    assert json.loads(wecast(workdir, "validate", str(future), "--json")[1])["warnings"] == []


def test_run_no_wait_fails_validation_before_saying_anything_about_sending(workdir: Path) -> None:
    """A campaign that cannot be planned (a field its recipients lack) fails before the quiet-hours notice and the
    progress bar: the error is all that is printed."""
    now = datetime.now(SHANGHAI)
    start, end = (now - timedelta(hours=1)).strftime("%H:%M"), (now + timedelta(hours=1)).strftime("%H:%M")
    (workdir / "campaigns" / "broken.yaml").write_text(
        "name: 缺字段\naudience: {tags_any: [VIP]}\nmessage: {template: '{{ title }}您好'}\nfrequency_cap: false\n"
        f'quiet_hours: {{start: "{start}", end: "{end}"}}\n',
        encoding="utf-8",
    )
    code, out, err = wecast(workdir, "run", "broken", "--no-wait")
    assert code == 2
    assert "title" in err
    assert "quiet hours" not in err and "sending" not in err and "sent 0" not in err
    assert out == ""


def test_config_errors_point_to_the_config_reference(tmp_path: Path) -> None:
    """An unknown key in config.yaml sends the reader to the config reference, not the campaign reference, in the
    chosen language."""
    (tmp_path / "config.yaml").write_text("version: 1\nsendng: {}\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["-c", str(tmp_path / "config.yaml"), "runs"])
    assert result.exit_code == 1
    assert "config.yaml:2: sendng: unknown field" in result.stderr
    assert "config.yaml reference in docs/guide.zh.md" in result.stderr
    assert "campaign reference" not in result.stderr
    result = runner.invoke(main, ["-c", str(tmp_path / "config.yaml"), "--lang", "zh", "runs"])
    assert "未知配置项" in result.stderr and "docs/guide.zh.md" in result.stderr


def test_wecast_config_names_its_file_only_when_there_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wecast config` starts with `# from <file>` when it read one, and says it read none otherwise."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WECAST_CONFIG", raising=False)
    result = CliRunner().invoke(main, ["config"])
    assert result.stdout.startswith("# no config file") and "# from" not in result.stdout
    (tmp_path / "config.yaml").write_text("version: 1\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["config"])
    assert result.stdout.startswith("# from config.yaml")


def test_a_taken_port_fails_before_the_scheduler_and_the_database(tmp_path: Path) -> None:
    """`wecast serve` on a port another process holds says so and exits before opening the database, loading the
    campaigns or syncing contacts."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (tmp_path / "config.yaml").write_text(
            "version: 1\n"
            f"database_url: sqlite:///{tmp_path}/data/wecast.sqlite\n"
            f"campaigns_dir: {tmp_path}/campaigns\n"
            f"sandbox: {{state_file: {tmp_path}/data/sandbox.sqlite}}\n",
            encoding="utf-8",
        )
        (tmp_path / "campaigns").mkdir()
        for lang, words in (("en", f"port {port} on 127.0.0.1 is already in use"), ("zh", f"端口 {port}")):
            result = CliRunner().invoke(
                main, ["-c", str(tmp_path / "config.yaml"), "--lang", lang, "serve", "--port", str(port)]
            )
            assert result.exit_code == 1, result.output
            assert words in result.stderr
            assert "--port" in result.stderr
        assert not (tmp_path / "data" / "wecast.sqlite").exists()


@pytest.mark.parametrize(
    ("host", "zh", "en"),
    [
        ("192.0.2.1", "本机没有这个地址", "this machine has no such address"),  # TEST-NET-1: never this machine's
    ],
)
def test_an_address_serve_cannot_listen_on_is_said_in_the_chosen_language(host: str, zh: str, en: str) -> None:
    """`wecast serve --host` with an address this machine lacks: one line in the reader's language. It ended with
    the system's English words ('Cannot assign requested address') in the middle of the Chinese sentence. (A host
    name that resolves to nothing is said the same way; not tested, as resolving it could leave the machine.)"""
    from engine.errors import WecastError
    from engine.i18n import Language, use_language
    from engine.web.server import listen

    for lang, words in ((Language.ZH, zh), (Language.EN, en)):
        with use_language(lang), pytest.raises(WecastError) as refused:
            listen(host, 0)
        said = str(refused.value)
        assert said.startswith(("无法监听", "cannot listen on")) and words in said, said
        if lang is Language.ZH:
            assert not re.search(r"[A-Za-z]{4,}", said.replace(host, "")), said  # nothing left in English


def test_serve_on_port_0_listens_on_a_free_port_not_the_configured_one(tmp_path: Path) -> None:
    """`wecast serve --port 0` asks the system for a free port: it was read as "no port given" and bound api.port
    (9898), so it failed, and tests that used it failed, whenever that port was taken. The log line names the
    port chosen; a port out of range is a usage error in the chosen language, not an internal error."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        (tmp_path / "config.yaml").write_text(
            f"version: 1\napi: {{port: {taken}}}\nsandbox: {{contacts: 5}}\n", encoding="utf-8"
        )
        env = {**os.environ, "LANG": "C.UTF-8", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        cmd = [sys.executable, "-m", "engine.cli", "--lang", "en", "serve", "--port", "0"]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 30
            line = ""
            while "wecast serve: gateway" not in line:
                line = proc.stdout.readline()
                assert line and time.monotonic() < deadline, "serve did not start"
            found = re.search(r"http://127\.0\.0\.1:(\d+) ", line)
            assert found is not None, line
            port = int(found[1])
            assert port not in (0, taken), line
            while True:  # bound at once, listening once the app has started
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not answer"
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
    for lang, words in (("en", "70000 is not in the range 0<=x<=65535"), ("zh", "70000 不在范围 0<=x<=65535 内")):
        result = CliRunner().invoke(
            main, ["-c", str(tmp_path / "config.yaml"), "--lang", lang, "serve", "--port", "70000"]
        )
        assert result.exit_code == 2, result.output
        assert words in result.stderr and "Traceback" not in result.stderr and "internal" not in result.stderr


@pytest.mark.anyio
async def test_scheduler_shows_no_last_fire_for_a_campaign_that_never_fired(tmp_path: Path) -> None:
    """`last_fire` is null until the schedule fires (the server's start is where counting begins, not a fire), then
    the slot it fired."""
    from engine.clock import FakeClock
    from engine.scheduler import CampaignScheduler
    from engine.service import Wecast
    from engine.settings import Settings

    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "greet.yaml").write_text(
        'name: 问候\nschedule: {cron: "0 10 * * *"}\naudience: {}\nmessage: {template: "{{ name }}您好"}\n'
        "quiet_hours: false\nfrequency_cap: false\n",
        encoding="utf-8",
    )
    settings = Settings.model_validate(
        {
            "version": 1,
            "database_url": f"sqlite:///{tmp_path / 'w.sqlite'}",
            "campaigns_dir": str(tmp_path / "campaigns"),
            "sandbox": {"contacts": 5, "auto_login": True, "state_file": str(tmp_path / "sandbox.sqlite")},
            "sending": {"throttle": {"per_second": 1000}},
            "scheduler": {"contacts_sync": None},
        }
    )
    clock = FakeClock(datetime(2026, 1, 5, 1, 30, tzinfo=ZoneInfo("UTC")))  # 09:30 in Shanghai
    app = Wecast(settings, clock=clock)
    await app.start()
    sched = CampaignScheduler(app)
    try:
        await app.sync()
        await sched.start(loop=False)
        await sched.tick()
        assert sched.last_fire("greet") is not None  # the mark counting starts from is stored ...
        assert sched.describe("greet")["last_fire"] is None  # ... and is not shown as a fire
        clock.set(datetime(2026, 1, 5, 2, 0, 3, tzinfo=ZoneInfo("UTC")))
        assert [f.action for f in await sched.tick()] == ["started"]
        assert sched.describe("greet")["last_fire"] == datetime(2026, 1, 5, 2, 0, tzinfo=ZoneInfo("UTC"))
    finally:
        await sched.stop()
        app.dispatcher.stop()
        await sched.workers.drain(5)
        await app.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_missing_field_hint_names_that_field(workdir: Path) -> None:
    """validate's hint for a field some recipients lack shows a default for that field (not for `city`), in the
    chosen language."""
    path = workdir / "campaigns" / "needs_title.yaml"
    path.write_text(
        "name: 职位问候\naudience: {tags_any: [VIP]}\nmessage: {template: '{{ title }}您好'}\n", encoding="utf-8"
    )
    wecast(workdir, "contacts", "sync")
    code, _, err = wecast(workdir, "validate", str(path))
    assert code == 2
    assert re.search(r"'title' is missing for \d+ of \d+ recipients", err)
    assert '{{ title | default("") }}' in err and "city" not in err
    _, _, err = wecast(workdir, "--lang", "zh", "validate", str(path))
    assert re.search(r"\d+ 位收件人中有 \d+ 位缺少 'title'", err) and '{{ title | default("") }}' in err


def test_a_deleted_database_file_fails_every_transaction(tmp_path: Path) -> None:
    """Once its SQLite file is deleted, an engine refuses every transaction with an error naming the file (the
    unlinked inode would otherwise take every write and lose it), and no new empty file appears in its place."""
    from storage import contacts as contacts_db
    from storage.db import file_gone, make_db_engine
    from storage.errors import StorageError

    path = tmp_path / "w.sqlite"
    db = make_db_engine(f"sqlite:///{path}")
    try:
        assert contacts_db.count_contacts(db) == 0 and file_gone(db) is None
        path.unlink()
        assert file_gone(db) == str(path)
        with pytest.raises(StorageError, match="deleted or replaced while wecast was running") as caught:
            contacts_db.count_contacts(db)
        assert str(path) in str(caught.value)
        assert not path.exists()
    finally:
        db.dispose()


@pytest.mark.anyio
async def test_a_run_whose_database_is_deleted_stops_sending(tmp_path: Path) -> None:
    """The database file deleted in the middle of `wecast run`: the run stops with the error, and the sandbox received
    only what was sent before (no delivery is claimed, sent and "recorded" into the deleted file afterwards)."""
    from engine.gateways.base import SendReceipt
    from engine.gateways.sandbox import SandboxGateway
    from engine.service import Wecast
    from engine.settings import Settings
    from engine.spec import load_campaign
    from storage.errors import StorageError

    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "all.yaml").write_text(
        'name: 全体\naudience: {}\nmessage: {template: "{{ name }}您好"}\nquiet_hours: false\nfrequency_cap: false\n',
        encoding="utf-8",
    )
    path = tmp_path / "w.sqlite"
    settings = Settings.model_validate(
        {
            "version": 1,
            "database_url": f"sqlite:///{path}",
            "campaigns_dir": str(tmp_path / "campaigns"),
            "sandbox": {"contacts": 60, "auto_login": True, "state_file": str(tmp_path / "sandbox.sqlite")},
            "sending": {"throttle": {"per_second": 1000}, "concurrency": 1, "quiet_hours": None},
        }
    )

    class Deleting(SandboxGateway):
        """Deletes wecast's database file after its third send, as a person cleaning up data/ might."""

        sends = 0

        async def send_text(self, contact_id: str, text: str, *, idempotency_key: str) -> SendReceipt:
            receipt = await super().send_text(contact_id, text, idempotency_key=idempotency_key)
            Deleting.sends += 1
            if Deleting.sends == 3:
                path.unlink()
            return receipt

    gateway = Deleting(settings.sandbox)
    async with Wecast(settings, gateway=gateway) as app:
        await app.sync()
        campaign = load_campaign(tmp_path / "campaigns" / "all.yaml", settings)
        with pytest.raises(StorageError, match="deleted or replaced"):
            await app.run_campaign(campaign, login_wait=0, quiet_wait_max=0, confirm_wait=0)
        received = len(gateway.outbox_messages())
    assert 3 <= received <= 4, received  # at most the one send already in flight when the file went
    assert not path.exists()


def test_healthz_fails_when_the_database_file_is_deleted(tmp_path: Path) -> None:
    """A running `wecast serve` whose database file is deleted answers /healthz 503 with the reason (a monitor sees
    it), and a send is refused instead of answered "sent"."""
    try:
        from web_harness import LiveServer, login, make_settings
    except ImportError:  # pragma: no cover - if tests/ becomes a package
        from tests.web_harness import LiveServer, login, make_settings

    with LiveServer(make_settings(tmp_path), scheduler=False) as server:
        client = server.client
        login(client)
        assert client.get("/healthz").json()["status"] == "ok"
        contact = client.post("/get-all-user", json={"pageSize": 1}).json()["datas"][0]
        (tmp_path / "wecast.sqlite").unlink()
        health = client.get("/healthz")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "error" and body["code"] == "database_gone"
        assert str(tmp_path / "wecast.sqlite") in body["error"] and "deleted or replaced" in body["error"]
        zh = client.get("/healthz", headers={"Accept-Language": "zh-CN"}).json()["error"]
        assert "在 wecast 运行时被删除或替换" in zh
        sent = client.post("/send-message", json={"id": contact["id"], "message": "您好"})
        assert sent.status_code == 503 and sent.json()["code"] == "database_unavailable", sent.text
        assert "deleted or replaced" in sent.json()["error"]
        assert not server.app.gateway.outbox_messages()  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_the_schedulers_log_lines_speak_the_chosen_language(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Log lines meant for people (campaigns loaded, a fire) are in the language wecast speaks (`--lang`, config)."""
    import logging

    from engine.clock import FakeClock
    from engine.i18n import Language, use_language
    from engine.scheduler import CampaignScheduler
    from engine.service import Wecast
    from engine.settings import Settings

    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "greet.yaml").write_text(
        'name: 问候\nschedule: {cron: "0 10 * * *"}\naudience: {}\nmessage: {template: "{{ name }}您好"}\n'
        "quiet_hours: false\nfrequency_cap: false\n",
        encoding="utf-8",
    )
    settings = Settings.model_validate(
        {
            "version": 1,
            "database_url": f"sqlite:///{tmp_path / 'w.sqlite'}",
            "campaigns_dir": str(tmp_path / "campaigns"),
            "sandbox": {"contacts": 5, "auto_login": True, "state_file": str(tmp_path / "sandbox.sqlite")},
            "scheduler": {"contacts_sync": None},
        }
    )
    clock = FakeClock(datetime(2026, 1, 5, 1, 30, tzinfo=ZoneInfo("UTC")))
    caplog.set_level(logging.INFO, logger="wecast")
    with use_language(Language.ZH):
        app = Wecast(settings, clock=clock)
        await app.start()
        sched = CampaignScheduler(app)
        try:
            await app.sync()
            await sched.start(loop=False)
            await sched.tick()
            clock.set(datetime(2026, 1, 5, 2, 0, 3, tzinfo=ZoneInfo("UTC")))
            await sched.tick()
        finally:
            await sched.stop()
            app.dispatcher.stop()
            await sched.workers.drain(5)
            await app.close()
    said = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("wecast"))
    assert "已从" in said and "加载活动：1 个有效" in said
    assert "活动 greet：已按 2026-01-05T10:00:00+08:00 触发：批次" in said and "新建" in said
