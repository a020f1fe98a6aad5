"""The command line on the wecom gateway (the fake WeCom in a thread): `wecast contacts sync`, `wecast run` leaving
deliveries in 群发 tasks, `wecast remind`, `wecast reconcile` after the staff confirm, and `wecast cancel` stopping the
tasks of a run in WeCom; no output shows a credential."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from wecom_harness import AES_KEY, CALLBACK_TOKEN, FakeWecomThread

from engine.cli import main
from engine.gateways.wecom.fake_server import FakeWecom

CAMPAIGN = """\
id: member_day
name: 会员日
audience: {}
message: {template: "本周六会员日，全场八折"}
quiet_hours: false
frequency_cap: false
dedupe: run
"""


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, FakeWecom, FakeWecomThread]]:
    fake = FakeWecom(customers=30, staff=3, shared_every=0, callback_token=CALLBACK_TOKEN, encoding_aes_key=AES_KEY)
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "member_day.yaml").write_text(CAMPAIGN, encoding="utf-8")
    far = FakeWecomThread(fake)
    with far as url:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(
            "version: 1\ngateway: wecom\n"
            f"database_url: sqlite:///{tmp_path}/wecast.sqlite\ncampaigns_dir: {tmp_path}/campaigns\n"
            f"wecom: {{base_url: '{url}', state_file: {tmp_path}/wecom.sqlite, rate_limit_wait: 0.05s}}\n",
            encoding="utf-8",
        )
        yield cfg, fake, far


def wecast(cfg: Path, fake: FakeWecom, *args: str) -> Result:
    env = {"WECAST_WECOM_CORP_ID": fake.corp_id, "WECAST_WECOM_SECRET": fake.secret}
    result = CliRunner().invoke(main, ["-c", str(cfg), *args], env=env)
    assert fake.secret not in result.output and fake.corp_id not in result.output
    return result


def test_run_remind_reconcile(setup: tuple[Path, FakeWecom, FakeWecomThread]) -> None:
    """`wecast run` submits one task per staff member and says the deliveries wait for staff; `wecast remind`
    reminds all three; after the staff confirm, `wecast reconcile` reports them sent and the run completed."""
    cfg, fake, far = setup
    assert wecast(cfg, fake, "contacts", "sync").exit_code == 0
    ran = wecast(cfg, fake, "run", "member_day")
    assert ran.exit_code == 0, ran.output
    assert "confirm" in ran.output
    assert len(fake.tasks) == 3
    reminded = wecast(cfg, fake, "remind", "1")
    assert reminded.exit_code == 0, reminded.output
    assert "3 task(s)" in reminded.output
    far.call(fake.confirm)
    reconciled = wecast(cfg, fake, "reconcile")
    assert reconciled.exit_code == 0, reconciled.output
    sent = len(fake.received)
    assert f"run 1: 3 task(s): {sent} sent, {30 - sent} failed, 0 still waiting" in reconciled.output
    runs = wecast(cfg, fake, "runs", "--json")
    assert '"status": "completed"' in runs.output
    assert "no run is waiting" in wecast(cfg, fake, "reconcile").output


def test_cancel_stops_the_runs_tasks_in_wecom(setup: tuple[Path, FakeWecom, FakeWecomThread]) -> None:
    """`wecast cancel` on a run waiting for staff cancels its tasks in WeCom: nothing is delivered when the staff
    confirm afterwards, and every delivery ends failed as cancelled."""
    cfg, fake, far = setup
    wecast(cfg, fake, "contacts", "sync")
    assert wecast(cfg, fake, "run", "member_day").exit_code == 0
    cancelled = wecast(cfg, fake, "cancel", "1")
    assert cancelled.exit_code == 0, cancelled.output
    assert "3 群发 task(s) cancelled in WeCom: 30 unsent messages stopped" in cancelled.output
    assert all(t.cancelled for t in fake.tasks.values())
    far.call(fake.confirm)
    assert fake.received == []
    log = wecast(cfg, fake, "log", "--run", "1", "--status", "failed", "--json")
    assert log.output.count("cancelled") >= 30


def test_reconcile_of_an_unknown_run_is_an_error(setup: tuple[Path, FakeWecom, FakeWecomThread]) -> None:
    """`wecast reconcile 99` says there is no such run, exit status 1."""
    cfg, fake, _ = setup
    result = wecast(cfg, fake, "reconcile", "99")
    assert result.exit_code == 1
    assert "no run 99" in result.output


def test_a_proxys_error_page_mid_sync_is_one_clear_line(setup: tuple[Path, FakeWecom, FakeWecomThread]) -> None:
    """A proxy answers the second sync's customer list with its HTML error page (quoting the request URL, token
    and all), every retry too: `wecast contacts sync` exits 1 with one line naming the API and what came back — no
    traceback, nothing of the page — and the customers of the first sync are all still there."""
    cfg, fake, far = setup
    assert wecast(cfg, fake, "contacts", "sync").exit_code == 0
    page = b"<html><body>502 Bad Gateway: /cgi-bin/externalcontact/batch/get_by_user?access_token=LEAKED</body></html>"
    far.call(lambda: fake.fault("externalcontact/batch/get_by_user", raw=page, content_type="text/html", count=20))
    result = wecast(cfg, fake, "contacts", "sync")
    assert result.exit_code == 1, result.output
    assert "externalcontact/batch/get_by_user: an answer that is not JSON (text/html)" in result.output
    assert "Traceback" not in result.output and "LEAKED" not in result.output and "<html>" not in result.output
    listed = wecast(cfg, fake, "contacts", "list", "--json")
    assert listed.output.count('"id": "wm') == 30


@pytest.mark.parametrize(
    ("lang", "words"),
    [
        ("en", ["warning: the customers of these staff members could not be read", "(no interoperability licence)"]),
        ("zh", ["警告：以下员工的客户无法读取", "(没有互通许可)"]),
    ],
)
def test_a_sync_that_could_not_read_some_staff_says_so_in_words(
    setup: tuple[Path, FakeWecom, FakeWecomThread], lang: str, words: list[str]
) -> None:
    """A staff member loses the interoperability licence: `wecast contacts sync` succeeds, keeps that member's
    customers, and warns which member and why in the reader's language (not the code `unlicensed`)."""
    cfg, fake, far = setup
    assert wecast(cfg, fake, "contacts", "sync").exit_code == 0
    lost = fake.staff[1]
    far.call(lambda: setattr(fake, "unlicensed", {lost}))
    result = wecast(cfg, fake, "--lang", lang, "contacts", "sync")
    assert result.exit_code == 0, result.output
    assert lost in result.output and "unlicensed" not in result.output, result.output
    for w in words:
        assert w in result.output, result.output
    listed = wecast(cfg, fake, "contacts", "list", "--json")
    assert listed.output.count('"id": "wm') == 30, "nobody was marked removed"
