"""Every CLI command speaks Chinese and English (`--lang`, config.yaml's `language:`, LANG), its tables fit an
80-column terminal without cutting ids or message text, and the newcomer's stumbles are gone: running from another
folder, `wecast init`, `| head`, validate checking everyone, did-you-mean for tags and fields."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import demo_workdir

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The demo campaigns and a config in a fresh folder, sending as fast as the sandbox takes it, at any hour."""
    return demo_workdir(tmp_path)


def wecast(workdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    runner = CliRunner(env={"COLUMNS": "80", **(env or {})})
    result = runner.invoke(main, ["-c", str(workdir / "config.yaml"), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# (command, what it says in Chinese, what it says in English): one line per command, after a run has happened.
COMMANDS = [
    (["--help"], "用法:", "Usage:"),
    (["preview", "--help"], "预览（不发送）", "Dry run"),
    (["validate"], "个活动文件全部有效", "campaign files are valid"),
    (["preview", "new_customer_care", "--show", "2"], "收件人", "Recipients"),
    (["run", "store_opening", "--now"], "已发送", "sent"),
    (["runs"], "计划时段", "slot"),
    (["log", "--limit", "3"], "消息 / 原因", "message / reason"),
    (["log", "--status", "unknown"], "没有符合条件的发送记录", "No delivery matches"),
    (["contacts", "list", "--limit", "2"], "个客户中有", "contacts match"),
    (["contacts", "sync"], "客户：共", "contacts:"),
    (["sandbox", "outbox", "--limit", "2"], "沙箱发件箱中有", "in the sandbox outbox"),
    # run 1 is completed; the statuses in words (Chinese output read "状态是 completed，不能改为 paused")
    (["pause", "1"], "状态是 已完成，不能改为 已暂停", "is completed; it cannot be set to paused"),
    (["cancel", "1"], "状态是 已完成，不能改为 已取消", "is completed; it cannot be set to cancelled"),
    (["run", "--resume"], "没有需要继续的中断批次", "no interrupted runs to resume"),
    (["run", "weekly_vip"], "已经完成：没有要发送的了", "is already completed"),  # run 1 again (was English)
    (["config"], "来自", "from"),
    (["preview", "nope"], "错误：", "error:"),
    (["logout"], "已退出登录：", "logged out: `wecast login` logs in again"),  # was 已退出（logged_out）
]


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_every_command_speaks_the_chosen_language(workdir: Path, lang: str) -> None:
    """Each command's output is in the language --lang names (and the Chinese output is not English)."""
    wecast(workdir, "contacts", "sync")
    wecast(workdir, "run", "weekly_vip")
    for args, zh, en in COMMANDS:
        _code, out, err = wecast(workdir, "--lang", lang, *args)
        said = out + err
        wanted, other = (zh, en) if lang == "zh" else (en, zh)
        assert wanted in said, (args, said)
        if lang == "zh" and args != ["config"]:
            assert other not in said.replace("--", ""), (args, said)


# A newcomer's typos, which click itself answers: (arguments, what the Chinese answer says, the English one).
CLICK_MISTAKES = [
    (["preview"], "缺少参数 'CAMPAIGN'", "Missing argument 'CAMPAIGN'"),
    (["preview", "weekly_vip", "--shwo", "3"], "没有选项 '--shwo'。 是不是要输入", "No such option '--shwo'."),
    (["prevew", "weekly_vip"], "没有命令 'prevew'。 是不是要输入 'preview'？", "No such command 'prevew'."),
    (["log", "--status", "sentt"], "'--status' 的值无效：'sentt' 不是可选的值", "is not one of"),
    (["runs", "--limit", "abc"], "'--limit' 的值无效：'abc' 不是有效的数字。", "'abc' is not a valid integer."),
    (["cancel", "abc"], "'abc' 不是有效的数字", "is not a valid integer"),
    (["preview", "a", "b"], "多余的参数（b）", "Got unexpected extra argument (b)"),
    (["preview", "weekly_vip", "--show"], "选项 '--show' 需要 1 个值", "Option '--show' requires an argument."),
    (["send", "x", "--image", "/no/such.png"], "'/no/such.png' 不存在", "File '/no/such.png' does not exist."),
    (["preview", "--help"], "[默认：20]", "[default: 20]"),
    (["send", "x"], "请给出要发送的内容：--text、--image 或 --file", "give what to send: --text, --image or --file"),
    (["send", "x", "--text", "  "], "请给出要发送的内容", "give what to send"),  # was the API's `message: …`
]


@pytest.mark.parametrize(("args", "zh", "en"), CLICK_MISTAKES, ids=[" ".join(c[0]) for c in CLICK_MISTAKES])
def test_click_answers_mistakes_in_the_chosen_language(workdir: Path, args: list[str], zh: str, en: str) -> None:
    """click's own usage errors and help labels speak the chosen language: no `Error: No such option` or
    `[default: 20]` in Chinese output, and English output keeps click's words."""
    code, out, err = wecast(workdir, "--lang", "zh", *args)
    said = out + err
    assert zh in said, said
    assert not re.search(r"Error|Try |Invalid|Missing|default:|No such|is not|does not", said), said
    if args[-1] != "--help":
        assert code == 2 and said.startswith(("用法:", "错误：")), said
    code, out, err = wecast(workdir, "--lang", "en", *args)
    assert en in " ".join((out + err).split()), out + err  # help wraps "[default:" and "20]" apart


def test_a_path_that_cannot_be_used_is_an_error_naming_it(workdir: Path, tmp_path: Path) -> None:
    """`--csv` into a folder that does not exist, `init` under a file, a SQLite file under a file: one line naming the
    path and why, in the reader's language, exit 1 — not `internal error: FileNotFoundError` (exit 70)."""
    missing = tmp_path / "no" / "such" / "x.csv"
    code, _, err = wecast(workdir, "--lang", "zh", "preview", "weekly_vip", "--csv", str(missing))
    assert (code, err.strip()) == (1, f"错误：{missing}：文件或文件夹不存在"), err  # no space after 错误： (there was)
    code, _, err = wecast(workdir, "--lang", "en", "preview", "weekly_vip", "--csv", str(missing))
    assert (code, err.strip()) == (1, f"error: {missing}: no such file or folder"), err
    a_file = tmp_path / "a_file"
    a_file.write_text("x", encoding="utf-8")
    code, _, err = wecast(workdir, "--lang", "zh", "init", str(a_file / "here"))
    assert code == 1 and "路径中有一部分是文件" in err and "internal" not in err and "内部错误" not in err, err
    code, _, err = wecast(
        workdir, "--lang", "zh", "runs", env={"WECAST_DATABASE_URL": f"sqlite:///{a_file}/db/wecast.sqlite"}
    )
    assert code == 1 and str(a_file) in err and "内部错误" not in err, err


def test_language_from_config_then_locale(workdir: Path) -> None:
    """Without --lang the config's language decides; without that, LANG (zh_CN.UTF-8 → Chinese)."""
    _, out, _ = wecast(workdir, "runs", env={"LANG": "zh_CN.UTF-8"})
    assert "还没有发送批次" in out
    _, out, _ = wecast(workdir, "runs", env={"LANG": "C.UTF-8"})
    assert "No runs yet" in out
    config = workdir / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8") + "language: zh_CN\n", encoding="utf-8")
    _, out, _ = wecast(workdir, "runs", env={"LANG": "en_US.UTF-8"})
    assert "还没有发送批次" in out
    _, out, _ = wecast(workdir, "--lang", "en", "runs", env={"LANG": "zh_CN.UTF-8"})
    assert "No runs yet" in out


def test_unknown_language_in_config_is_a_located_error(workdir: Path) -> None:
    """`language: fr` is refused with file, line and field."""
    config = workdir / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8") + "language: fr\n", encoding="utf-8")
    code, _, err = wecast(workdir, "runs")
    assert code == 1
    assert "config.yaml:6: language: language must be zh_CN" in err


def test_preview_reasons_in_chinese_with_codes_in_json(workdir: Path) -> None:
    """Preview says why in Chinese (没有标签 VIP, 今天已收到 1 条营销消息（上限 1 条）); JSON carries reason_code."""
    wecast(workdir, "run", "store_opening", "--now")  # uses today's frequency cap for some VIPs
    _code, out, _ = wecast(workdir, "--lang", "zh", "preview", "weekly_vip", "--json")
    data = json.loads(out)
    reasons = {e["reason_code"]: e["reason"] for e in data["excluded"]}
    assert reasons["tags_any"] == "没有标签 VIP"
    assert reasons["frequency_cap"] == "今天已收到 1 条营销消息（上限 1 条）"
    assert reasons["tags_none"] == "有排除标签 勿扰"
    assert {e["category"] for e in data["excluded"]} <= {"audience", "exclusion", "frequency_cap", "dedupe"}
    _, out, _ = wecast(workdir, "preview", "weekly_vip", "--json")
    codes = {e["reason_code"]: e["reason"] for e in json.loads(out)["excluded"]}
    assert codes["frequency_cap"] == "already got 1 marketing message today (max 1)"  # no repeated prefix


def test_skip_reasons_in_the_log_carry_a_code_and_no_repeated_prefix(workdir: Path) -> None:
    """A skipped delivery's reason reads once (no `frequency_cap: frequency cap: …`) and its code is separate."""
    wecast(workdir, "run", "store_opening", "--now")
    wecast(workdir, "run", "weekly_vip")
    _, out, _ = wecast(workdir, "log", "--status", "skipped", "--limit", "500", "--json")
    rows = json.loads(out)
    capped = [r for r in rows if r["reason_code"] == "frequency_cap"]
    assert capped and all(r["reason"].startswith("already got") for r in capped)
    assert all(not r["reason"].startswith(r["reason_code"]) for r in rows)


def test_preview_at_80_columns_keeps_ids_and_whole_messages(workdir: Path) -> None:
    """At 80 columns no line is wider than 80, every contact id shows whole, and no message is cut with …"""
    _, data, _ = wecast(workdir, "preview", "weekly_vip", "--json", "--show", "0")
    preview = json.loads(data)
    for lang in ("zh", "en"):
        _, out, _ = wecast(workdir, "--lang", lang, "preview", "weekly_vip", "--show", "5")
        from rich.cells import cell_len

        assert max(cell_len(line.rstrip()) for line in out.splitlines()) <= 80, out
        for r in preview["recipients"][:5]:
            assert r["id"] in out
        flat = re.sub(r"\s+", "", out)
        for r in preview["recipients"][:5]:
            assert re.sub(r"\s+", "", r["message"]) in flat  # wrapped, not truncated
    _, full, _ = wecast(workdir, "preview", "weekly_vip", "--show", "2", "--full")
    assert preview["recipients"][0]["message"].strip() in full


def test_runs_fit_80_columns_with_local_short_times(workdir: Path) -> None:
    """`wecast runs` fits 80 columns and shows local MM-DD HH:mm, not the UTC run key."""
    wecast(workdir, "run", "weekly_vip")
    wecast(workdir, "run", "store_opening", "--now")
    _, out, _ = wecast(workdir, "runs")
    from rich.cells import cell_len

    assert max(cell_len(line.rstrip()) for line in out.splitlines()) <= 80, out
    assert re.search(r"\b\d\d-\d\d \d\d:\d\d\b", out)
    assert "T02:00:00Z" not in out


def test_chinese_tables_at_80_columns_keep_ids_whole_and_lines_as_chinese_is_set(workdir: Path) -> None:
    """In Chinese at 80 columns: `runs` shows each campaign id whole (folded, never `st…`), the outbox and the log
    never start a line with closing punctuation (`回复TD退订` / `。`), the contacts summary has no stray space."""
    from rich.cells import cell_len

    wecast(workdir, "run", "store_opening", "--now")
    wecast(workdir, "run", "weekly_vip")
    _, out, _ = wecast(workdir, "--lang", "zh", "runs")
    assert max(cell_len(line.rstrip()) for line in out.splitlines()) <= 80, out
    assert "…" not in out
    header, _, *rows = out.splitlines()
    start, end = (cell_len(header[: header.index(h)]) for h in ("活动", "计划时段"))
    column = "".join(row[start:end].strip() for row in rows)  # the campaign column, read down (rows are ASCII)
    assert "store_opening" in column and "weekly_vip" in column, out
    closing = re.compile(r"^\s+[。，、！？）]")
    for args in (["sandbox", "outbox", "--limit", "0"], ["log", "--limit", "100"]):
        _, out, _ = wecast(workdir, "--lang", "zh", *args)
        table = out.splitlines()[:-1] if args[0] == "sandbox" else out.splitlines()  # the last: the outbox's path
        assert max(cell_len(line.rstrip()) for line in table) <= 80, out
        assert not [line for line in table if closing.match(line)], out
    _, out, _ = wecast(workdir, "--lang", "zh", "contacts", "list", "--limit", "2")
    assert out.strip().endswith("个符合（显示 2 个）"), out


def test_empty_results_are_a_sentence(workdir: Path) -> None:
    """No runs, no deliveries, no outbox: a sentence, not an empty table."""
    assert wecast(workdir, "runs")[1].strip() == "No runs yet: `wecast run CAMPAIGN` starts one."
    assert wecast(workdir, "log")[1].strip() == "No deliveries yet: `wecast run CAMPAIGN` sends some."
    assert wecast(workdir, "sandbox", "outbox")[1].startswith("The sandbox outbox is empty")


def test_another_folder_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where there is no config.yaml: one line saying where it looked and how to point it, and no data/
    created there; `wecast config` says there is no file instead of `# from config.yaml`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WECAST_CONFIG", raising=False)
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 1
    assert str(tmp_path / "config.yaml") in result.stderr
    assert "-c FILE" in result.stderr and "WECAST_CONFIG" in result.stderr and "wecast init" in result.stderr
    assert not (tmp_path / "data").exists()
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0
    assert result.stdout.startswith("# no config file (looked for")


def test_init_sets_up_a_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wecast init` writes config.yaml, campaigns/ (a Chinese example) and data/; the example previews at once;
    a second init refuses to overwrite anything."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--lang", "zh", "init"])
    assert result.exit_code == 0, result.output
    assert "wecast preview welcome" in result.stdout
    assert (tmp_path / "data").is_dir()
    assert "新客欢迎" in (tmp_path / "campaigns" / "welcome.yaml").read_text(encoding="utf-8")
    result = CliRunner().invoke(main, ["preview", "welcome", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["recipients"] > 0
    before = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    again = CliRunner().invoke(main, ["init"])
    assert again.exit_code == 1 and "已存在" in again.stderr  # the starter config says language: zh_CN
    assert (tmp_path / "config.yaml").read_text(encoding="utf-8") == before


def test_preview_piped_into_head_exits_quietly(workdir: Path) -> None:
    """`wecast preview … | head -3` ends with status 0 and nothing on stderr (no BrokenPipeError traceback)."""
    command = (
        f"{sys.executable} -m engine.cli -c {workdir / 'config.yaml'} preview weekly_vip --show 0 | head -3; "
        "exit ${PIPESTATUS[0]}"
    )
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 3


def test_validate_checks_everyone_the_targeting_selects(workdir: Path) -> None:
    """A contact the frequency cap holds back today is still checked for the template's fields: validate's verdict
    does not depend on today's sends."""
    (workdir / "campaigns" / "needs_title.yaml").write_text(
        "name: 职位问候\naudience: {tags_any: [VIP]}\nmessage: {template: '{{ title }}您好'}\nquiet_hours: false\n",
        encoding="utf-8",
    )
    wecast(workdir, "contacts", "sync")
    code, _, err = wecast(workdir, "validate", str(workdir / "campaigns" / "needs_title.yaml"))
    assert code == 2 and "title" in err
    wecast(workdir, "run", "weekly_vip")  # every VIP now has today's one marketing message
    code, _, err = wecast(workdir, "validate", str(workdir / "campaigns" / "needs_title.yaml"))
    assert code == 2 and "title" in err


def test_unknown_tag_suggests_close_ones(workdir: Path) -> None:
    """A tag no contact has is named, with the known tags that look like it (did you mean)."""
    wecast(workdir, "contacts", "sync")
    _, out, err = wecast(workdir, "contacts", "list", "--tag", "VIP客户")
    assert "no contact has the tag(s) VIP客户" in err and "did you mean" in err
    (workdir / "campaigns" / "typo.yaml").write_text(
        "name: 错字\naudience: {tags_any: [护肤品]}\nmessage: {template: hi}\nquiet_hours: false\n", encoding="utf-8"
    )
    _, out, _ = wecast(workdir, "--lang", "zh", "preview", str(workdir / "campaigns" / "typo.yaml"))
    assert "没有客户有标签 护肤品" in out and "是不是 护肤" in out


def test_unknown_rule_field_suggests_the_right_one(workdir: Path) -> None:
    """A misspelt rule field is a located error with a did-you-mean."""
    (workdir / "campaigns" / "typo.yaml").write_text(
        "name: 错字\naudience: {rules: [{cty: 上海}]}\nmessage: {template: hi}\n", encoding="utf-8"
    )
    code, _, err = wecast(workdir, "validate", str(workdir / "campaigns" / "typo.yaml"))
    assert code == 2
    assert "typo.yaml:2: audience.rules[0].cty: unknown contact field 'cty' (did you mean city?)" in err


@pytest.mark.parametrize(
    ("lang", "says", "not_says"), [("zh", "免打扰时段", "quiet hours"), ("en", "quiet hours", "免打扰")]
)
def test_a_run_held_by_quiet_hours_ends_in_the_chosen_language(
    workdir: Path, lang: str, says: str, not_says: str
) -> None:
    """`wecast run --no-wait` inside the campaign's quiet hours leaves its sends pending and says why — in the
    language chosen, as the rest of its output (the dispatcher's summary line was English under zh)."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    start, end = (now - timedelta(hours=1)).strftime("%H:%M"), (now + timedelta(hours=2)).strftime("%H:%M")
    path = workdir / "campaigns" / "store_opening.yaml"
    text = path.read_text(encoding="utf-8").replace(
        "quiet_hours: false", f'quiet_hours: {{start: "{start}", end: "{end}"}}'
    )
    path.write_text(text, encoding="utf-8")
    code, out, _ = wecast(workdir, "--lang", lang, "run", "store_opening_hz", "--now", "--no-wait")
    assert code == 0, out
    tail = out.strip().splitlines()[-1]
    assert says in tail and not_says not in tail, out
