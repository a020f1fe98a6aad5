"""Validation reasons of campaign and journey files read in the chosen language (the file:line: field: prefix
stays): schedules, durations, waits and tags, not only the ones pydantic words itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import main

CASES = [
    (
        "schedule: {at: 2026-12-31 20:00, every: 1d}\naudience: {}\nmessage: {template: 您好}\n",
        "schedule: cron、at、every 只能写一个",
        "schedule: give only one of cron, at, every",
    ),
    (
        "schedule: {cron: '0 10 * *'}\naudience: {}\nmessage: {template: 您好}\n",
        "cron 需要 5 个字段",
        "cron needs 5 fields",
    ),
    (  # APScheduler's refusal was passed on in English: "Error validating expression '25': the last value ..."
        "schedule: {cron: '0 25 * * *'}\naudience: {}\nmessage: {template: 您好}\n",
        "无效：小时字段 '25' 无效（可用：数字 0-23",
        "the hour field '25' is not valid (numbers 0-23",
    ),
    (
        "schedule: {every: 10s}\naudience: {}\nmessage: {template: 您好}\n",
        "every 至少为 1m",
        "every must be at least 1m",
    ),
    (
        "dedupe: sometimes\naudience: {}\nmessage: {template: 您好}\n",
        "dedupe 只能是 run、once",
        "dedupe must be run, once",
    ),
    (
        "kind: journey\ntrigger: contact_added\nsteps:\n  - wait: {for: reply}\n",
        "等待事件需要一个超时时间",
        "wait for an event needs a timeout",
    ),
    (
        "kind: journey\ntrigger: contact_added\nsteps:\n  - tag: {add: [老客], remove: [老客]}\n",
        "标签 老客 同时被添加又被移除",
        "tag 老客 is both added and removed",
    ),
]


@pytest.mark.parametrize(("body", "zh", "en"), CASES, ids=[c[2][:24] for c in CASES])
def test_a_file_s_problem_reads_in_the_chosen_language(tmp_path: Path, body: str, zh: str, en: str) -> None:
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "bad.yaml").write_text("name: 坏文件\n" + body, encoding="utf-8")
    (tmp_path / "config.yaml").write_text(
        f"version: 1\ndatabase_url: sqlite:///{tmp_path}/w.sqlite\ncampaigns_dir: {tmp_path}/campaigns\n"
        f"sandbox: {{state_file: {tmp_path}/s.sqlite}}\n",
        encoding="utf-8",
    )
    for lang, words, other in (("zh", zh, en), ("en", en, zh)):
        done = CliRunner().invoke(main, ["-c", str(tmp_path / "config.yaml"), "--lang", lang, "validate"])
        assert done.exit_code == 2, done.output
        assert "bad.yaml:" in done.stderr and words in done.stderr and other not in done.stderr, done.stderr
