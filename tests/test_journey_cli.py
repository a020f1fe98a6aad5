"""The journey commands in both languages: `wecast preview JOURNEY` (tree, who would enter, a contact's timeline),
`wecast journeys` / `journeys show` / `journeys --contact`, `wecast contacts optouts | optout | optin` (and the
contacts list showing who opted out), `wecast sandbox event …`; and a simulated customer made by one process
reaching the journeys of a `wecast serve` running in another."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_i18n import wecast, workdir

from engine.gateways.sandbox import SandboxStore

__all__ = ["workdir"]  # the fixture, shared with test_cli_i18n


def first_customer(workdir: Path) -> str:
    """A friend of the account without 勿扰, whom every example journey lets in."""
    _, out, _ = wecast(workdir, "contacts", "list", "--limit", "0", "--json")
    return next(c["id"] for c in json.loads(out) if not c["coworker"] and "勿扰" not in c["tags"])


# (command, what it says in Chinese, what it says in English); CID stands for a customer's id.
COMMANDS = [
    (["preview", "welcome_new"], "步骤", "Steps"),
    (["preview", "welcome_new"], "受众和进入规则", "the audience and entry policy decide"),
    (["preview", "winback"], "下次触发时", "Who would enter at the next fire"),
    (["preview", "welcome_new", "--contact", "CID"], "结果：完成旅程", "ends: completes the journey"),
    (["preview", "welcome_new", "--contact", "CID", "--assume", "tag:已购@2d"], "结果：退出旅程", "ends: exits"),
    (["preview", "keyword_reply", "--contact", "CID", "--assume", "message:地址"], "门店地址", "门店地址"),
    (["preview", "welcome_new", "--assume", "replied"], "需与 --contact 一起使用", "goes with --contact"),
    (["preview", "welcome_new", "--contact", "CID", "--assume", "buy"], "可假设", "assume replied"),
    (["preview", "welcome_new", "--csv", "-"], "用于预览活动", "preview a campaign"),
    (["journeys"], "进入规则", "entry"),
    (["journeys", "show", "welcome_new"], "当前在旅程中", "in the journey now"),
    (["journeys", "show", "nope"], "没有旅程", "no journey"),
    (["journeys", "--contact", "CID"], "不在任何旅程中", "is not in any journey"),
    (["contacts", "optout", "CID"], "已退订", "opted out"),
    (["contacts", "optouts"], "位客户已退订", "contact opted out"),
    (["contacts", "list", "--limit", "0"], "（已退订）", "(opted out)"),
    (["contacts", "optin", "CID"], "已重新订阅", "opted back in"),
    (["contacts", "optin", "nobody"], "没有客户", "no contact"),
    (["sandbox", "event", "add-contact", "--name", "张三"], "添加了我们", "added us"),
    (["sandbox", "event", "message", "CID", "价格"], "发来", "wrote"),
    (["sandbox", "event", "tag", "CID", "VIP"], "被打上标签", "was tagged"),
    (["sandbox", "event", "tag", "CID", "VIP", "--remove"], "被移除标签", "lost tag"),
    (["sandbox", "event", "--help"], "模拟客户", "Simulate a customer"),
    (["journeys", "--help"], "旅程及其中的客户", "Journeys with the contacts"),
]


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_every_journey_command_speaks_the_chosen_language(workdir: Path, lang: str) -> None:
    """Each journey command's output is in the language --lang names (Chinese output without the English)."""
    wecast(workdir, "contacts", "sync")
    cid = first_customer(workdir)
    for args, zh, en in COMMANDS:
        args = [cid if a == "CID" else a for a in args]
        _code, out, err = wecast(workdir, "--lang", lang, *args)
        said = out + err
        wanted, other = (zh, en) if lang == "zh" else (en, zh)
        assert wanted in said, (args, said)
        if lang == "zh" and zh != en:
            assert other not in said.replace("--", ""), (args, said)


def test_preview_json_has_stable_keys_and_the_exact_messages(workdir: Path) -> None:
    """`preview JOURNEY --contact --json`: the tree, who would enter, and the timeline with each rendered message."""
    wecast(workdir, "contacts", "sync")
    cid = first_customer(workdir)
    code, out, _ = wecast(workdir, "--lang", "zh", "preview", "welcome_new", "--contact", cid, "--json")
    assert code == 0
    data = json.loads(out)
    assert [s["id"] for s in data["steps"]] == ["welcome", "2", "tip", "4", "coupon"]
    assert data["steps"][0]["kind"] == "send" and data["steps"][0]["transactional"] is True
    assert data["enter_now"]["mode"] == "event" and data["enter_now"]["entering"] > 0
    line = data["timeline"]
    sends = [e for e in line["entries"] if e["outcome"] == "send"]
    assert [e["step"] for e in sends] == ["welcome", "tip", "coupon"] and line["ends"] == "completed"
    assert sends[0]["message"].startswith(line["name"]) and sends[0]["parts"][0]["kind"] == "text"
    assert sends[1]["local"].split()[1] == "10:00"  # day 1 at 10:00 local
    assert "{{" not in "".join(e["message"] for e in sends)
    # Sends nothing: the outbox stays empty.
    _, out, _ = wecast(workdir, "sandbox", "outbox", "--json")
    assert json.loads(out) == []


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_preview_follows_a_goto_into_the_next_journey(workdir: Path, lang: str) -> None:
    """`preview JOURNEY --contact` goes on past a goto into the target's steps (shown as `target › step`), and a
    goto back to a journey already shown ends the dry run saying so, in the chosen language."""
    from test_journey_preview import FIRST, SECOND

    (workdir / "campaigns" / "first.yaml").write_text(FIRST, encoding="utf-8")
    (workdir / "campaigns" / "second.yaml").write_text(SECOND, encoding="utf-8")
    wecast(workdir, "contacts", "sync")
    cid = first_customer(workdir)
    code, out, _ = wecast(workdir, "--lang", lang, "preview", "first", "--contact", cid)
    assert code == 0, out
    assert "second › more" in out and "第二段的最后一条" in out
    ends = "结果：回到上面已显示的旅程" if lang == "zh" else "ends: goes back to a journey shown above"
    assert ends in out
    if lang == "zh":
        assert "goes back" not in out and "enters journey" not in out
    _, out, _ = wecast(workdir, "preview", "first", "--contact", cid, "--json")
    line = json.loads(out)["timeline"]
    assert line["journeys"] == ["first", "second"] and line["ends"] == "loop"
    assert [e["journey"] for e in line["entries"] if e["outcome"] == "send"] == ["first", "second", "second"]


def test_journeys_show_counts_and_a_contacts_path_after_a_run(workdir: Path) -> None:
    """After a simulated new customer is welcomed (`wecast serve`'s engine, driven here in-process by `run
    --resume`-free means: the CLI records; a tick enters), `journeys` counts them and `--contact` shows the path."""
    import asyncio

    from engine.journeys.runtime import JourneyRunner
    from engine.service import Wecast
    from engine.settings import load_settings

    wecast(workdir, "contacts", "sync")
    _, out, _ = wecast(workdir, "sandbox", "event", "add-contact", "--name", "王小明", "--json")
    made = json.loads(out)
    assert made["action"] == "add_contact" and "contact_added" in made["recorded"]
    cid = made["contact_id"]

    async def tick() -> None:
        from engine.definitions import load_definitions

        settings = load_settings(workdir / "config.yaml")
        async with Wecast(settings) as app:
            defs = load_definitions([settings.campaigns_dir], settings)
            app.journeys.set_journeys(defs.journeys)
            # Journeys activated now do not take events from before: pretend it was loaded a minute earlier.
            from datetime import timedelta

            for j in defs.journeys:
                app.journeys.activated[j.id] -= timedelta(minutes=5)
            await JourneyRunner(app.journeys, lambda run_id: app.dispatcher.run(run_id, login_wait=0)).until_idle()

    asyncio.run(tick())
    _, out, _ = wecast(workdir, "journeys", "--json")
    welcome = next(j for j in json.loads(out) if j["id"] == "welcome_new")
    assert welcome["active"] == 1 and welcome["at_step"] == {"2": 1} and welcome["passed"]["welcome"] == 1
    _, out, _ = wecast(workdir, "journeys", "--contact", cid, "--json")
    path = json.loads(out)
    (entry,) = [e for e in path["journeys"] if e["journey"] == "welcome_new"]
    sent = [p for p in entry["path"] if p["outcome"] == "sent"]
    assert sent[0]["step"] == "welcome" and sent[0]["message"].startswith("王小明您好")
    _, out, _ = wecast(workdir, "--lang", "zh", "journeys", "show", "welcome_new")
    assert "此处 1" in out and cid in out


def test_optouts_edit_and_list_with_json(workdir: Path) -> None:
    """optout puts a contact on the list (source manual, the note kept), optin takes them off; an unknown id is an
    error with a non-zero status."""
    wecast(workdir, "contacts", "sync")
    cid = first_customer(workdir)
    assert wecast(workdir, "contacts", "optout", cid, "--note", "电话里要求")[0] == 0
    _, out, _ = wecast(workdir, "contacts", "optouts", "--json")
    (row,) = json.loads(out)
    assert row["contact_id"] == cid and row["source"] == "manual" and row["note"] == "电话里要求"
    _, out, _ = wecast(workdir, "preview", "winback", "--json")
    left = {e["id"]: e["reason_code"] for e in json.loads(out)["enter_now"]["left_out"]}
    assert left.get(cid) == "opted_out"
    assert wecast(workdir, "contacts", "optin", cid)[0] == 0
    _, out, _ = wecast(workdir, "contacts", "optouts", "--json")
    assert json.loads(out) == []
    code, _, err = wecast(workdir, "contacts", "optout", "nobody")
    assert code == 1 and "nobody" in err


def test_contacts_list_json_says_who_opted_out_and_when(workdir: Path) -> None:
    """`contacts list --json` gives each contact `opted_out` and `opted_out_at` (UTC ISO), as the contact's
    /optout route and `contacts optouts --json` give them; opting back in clears both."""
    from datetime import datetime

    wecast(workdir, "contacts", "sync")
    cid = first_customer(workdir)
    assert wecast(workdir, "contacts", "optout", cid)[0] == 0
    _, out, _ = wecast(workdir, "contacts", "optouts", "--json")
    (row,) = json.loads(out)
    _, out, _ = wecast(workdir, "contacts", "list", "--limit", "0", "--json")
    listed = {c["id"]: c for c in json.loads(out)}
    assert listed[cid]["opted_out"] is True and listed[cid]["opted_out_at"] == row["opted_out_at"]
    assert datetime.fromisoformat(listed[cid]["opted_out_at"]).utcoffset() is not None
    others = [c for i, c in listed.items() if i != cid]
    assert others and all(c["opted_out"] is False and c["opted_out_at"] is None for c in others)
    assert {"id", "name", "tags", "addedAt"} <= set(listed[cid])  # the contact's own keys stay as they were
    assert wecast(workdir, "contacts", "optin", cid)[0] == 0
    _, out, _ = wecast(workdir, "contacts", "list", "--limit", "0", "--json")
    again = {c["id"]: c for c in json.loads(out)}
    assert again[cid]["opted_out"] is False and again[cid]["opted_out_at"] is None


def test_sandbox_events_refuse_another_gateway_and_unknown_contacts(workdir: Path) -> None:
    """On the sandbox an unknown contact is a clear error; the commands say they are for the sandbox only."""
    code, _, err = wecast(workdir, "sandbox", "event", "message", "nobody", "hi")
    assert code == 1 and "nobody" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_customer_simulated_by_the_cli_reaches_a_running_serve(workdir: Path) -> None:
    """Two processes: `wecast serve` runs the journeys; `wecast sandbox event add-contact` in this process makes a
    new customer, and the serving process welcomes them (in the sandbox outbox) within seconds, once; a keyword
    message the CLI sends gets its reply."""
    wecast(workdir, "contacts", "sync")  # logs the sandbox in (the login is kept in its state file)
    port = free_port()
    env = {**os.environ, "WECAST_CONFIG": str(workdir / "config.yaml")}
    code = (
        "from engine.settings import load_settings; from engine.web.server import serve; "
        f"raise SystemExit(serve(load_settings(), host='127.0.0.1', port={port}))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    outbox = SandboxStore(workdir / "data" / "sandbox.sqlite")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        time.sleep(2)  # the journeys are loaded at start
        _, out, _ = wecast(workdir, "sandbox", "event", "add-contact", "--name", "李四", "--json")
        cid = json.loads(out)["contact_id"]
        deadline = time.monotonic() + 30
        while not outbox.messages(cid):
            assert time.monotonic() < deadline, "the serving process never welcomed the new customer"
            time.sleep(0.2)
        assert outbox.messages(cid)[0].text.startswith("李四您好")
        wecast(workdir, "sandbox", "event", "message", cid, "请问地址在哪")
        deadline = time.monotonic() + 30
        while len(outbox.messages(cid)) < 2:
            assert time.monotonic() < deadline, "the keyword reply never came"
            time.sleep(0.2)
        time.sleep(1.5)
        texts = [m.text for m in outbox.messages(cid)]
        assert len(texts) == 2 and "门店地址" in texts[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)  # reaps it and closes its pipe (wait() left it open: an unclosed file)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        outbox.close()
