"""Keys made of what people and gateways give (run keys, Idempotency-Keys, contact ids, message ids) fit their
columns on both databases: PostgreSQL refused a dedupe key over 300 characters (an internal error, a 500) while
SQLite kept it, and event keys were cut at 300 characters, so two long keys that differ only after that were one.
A long key is stored as its head and the sha256 of the whole key (`storage.models.fit_key`); what a person names is
bounded where it comes in (`--run-key`, the Idempotency-Key header)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import CAPPED, PLAIN, campaign, run, started, write_settings

from engine.cli import main
from engine.gateways.sandbox import SandboxGateway
from engine.settings import Settings
from storage import deliveries as deliveries_db
from storage import journeys as journeys_db
from storage import runs as runs_db
from storage.contacts import ContactRow, upsert_contacts
from storage.db import make_db_engine
from storage.models import KEY_HEAD, KEY_LENGTH, MAX_RUN_KEY, CustomerEventKind, DeliveryStatus, fit_key
from storage.runs import DirectSend, NewRun

try:
    from web_harness import LiveServer, login
    from web_harness import make_settings as web_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, login
    from tests.web_harness import make_settings as web_settings

MakeSettings = Callable[..., Settings]
NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
# Two contact ids of 300 characters that differ only in their last one: every key made of them is over the column's
# length, and cut to it they would be the same key.
LONG_IDS = ("7" * 299 + "a", "7" * 299 + "b")


def test_fit_key_keeps_short_keys_and_keeps_long_ones_apart() -> None:
    short = "c1|2026-01-05T02:00:00Z|7881002024164452"
    assert fit_key(short) == short
    assert fit_key("x" * KEY_LENGTH) == "x" * KEY_LENGTH
    first, second = (fit_key(f"c1|run|{cid}") for cid in LONG_IDS)
    assert first != second
    assert len(first) == len(second) == KEY_LENGTH
    assert first.startswith("c1|run|") and first[:KEY_HEAD] == f"c1|run|{LONG_IDS[0]}"[:KEY_HEAD]
    assert fit_key(first) == first  # fitted twice: the same key
    assert len(fit_key("客" * 1000)) == KEY_LENGTH  # characters, as PostgreSQL's varchar counts them


def _with_long_contacts(settings: Settings) -> None:
    db = make_db_engine(settings.database_url)
    upsert_contacts(db, [ContactRow(cid, name="长号", friend=True) for cid in LONG_IDS], NOW)
    db.dispose()


def test_a_long_run_key_and_long_contact_ids_plan_once_on_both_databases(make_settings: MakeSettings) -> None:
    """A run named with the longest run key allowed, to contacts whose ids are 300 characters long: planned (on
    PostgreSQL it was an internal error), one delivery each — two ids that share their first 299 characters are two
    deliveries — and planned again under the same key, nothing new."""
    settings = make_settings(contacts=5)
    key = "k" * MAX_RUN_KEY

    async def go() -> None:
        app = await started(settings)
        _with_long_contacts(settings)
        spec = campaign(settings, PLAIN)
        plan = app.plan(spec, run_key=key)
        assert plan.created and plan.planned == 5 + len(LONG_IDS)
        rows = deliveries_db.list_deliveries(app.db, run_id=plan.run_id, limit=100)
        keys = {r.contact_id: r.dedupe_key for r in rows}
        assert all(len(k or "") <= KEY_LENGTH for k in keys.values())
        assert keys[LONG_IDS[0]] != keys[LONG_IDS[1]]
        assert keys[LONG_IDS[0]] == fit_key(f"c1|{key}|{LONG_IDS[0]}")
        again = app.plan(spec, run_key=key)
        assert not again.created and again.run_id == plan.run_id
        assert len(deliveries_db.list_deliveries(app.db, limit=100)) == len(rows)
        summary = await app.dispatcher.run(plan.run_id)
        assert summary.counts[DeliveryStatus.SENT] == 5  # the sandbox knows only its own five: the long ones fail
        await app.close()

    run(go())


def test_dedupe_once_holds_for_long_contact_ids(make_settings: MakeSettings) -> None:
    """`dedupe: once` and the frequency cap find a contact's earlier delivery by its (fitted) key and by the
    campaign's key range: a second run plans nothing new for the long-id contacts either."""
    settings = make_settings(contacts=3)

    async def go() -> None:
        app = await started(settings)
        _with_long_contacts(settings)
        once = campaign(settings, CAPPED + "dedupe: once\n")
        first = app.plan(once, run_key="r1")
        assert first.planned == 3 + len(LONG_IDS)
        second = app.plan(once, run_key="r2")
        assert second.created and second.planned == 0
        held = deliveries_db.held_keys(app.db, once.id)
        assert {fit_key(f"c1|once|{cid}") for cid in LONG_IDS} <= set(held)
        await app.close()

    run(go())


def _api_run(key: str) -> NewRun:
    return NewRun(
        campaign_id="api",
        run_key=key,
        trigger="api",
        timezone="Asia/Shanghai",
        settings={"version": 1, "timezone": "Asia/Shanghai"},
        created_at=NOW,
    )


def test_a_long_idempotency_key_to_a_long_contact_id_is_sent_once(db_url: str) -> None:
    """A pooled direct send under the longest Idempotency-Key allowed, to a long contact id: recorded, and the same
    key again is found as used before (with what it asked for) instead of planned twice."""
    db = make_db_engine(db_url)
    upsert_contacts(db, [ContactRow(cid, friend=True) for cid in LONG_IDS], NOW)
    key = "i" * MAX_RUN_KEY
    first = runs_db.record_direct_sends(db, _api_run("p1"), [DirectSend(key, LONG_IDS[0], "", "你好", None)])
    assert first.run_id is not None and first.earlier == {}
    other = runs_db.record_direct_sends(db, _api_run("p2"), [DirectSend(key[:-1] + "j", LONG_IDS[1], "", "早", None)])
    assert other.run_id is not None and other.earlier == {}
    again = runs_db.record_direct_sends(db, _api_run("p3"), [DirectSend(key, LONG_IDS[1], "", "你好", None)])
    assert again.run_id is None
    assert again.earlier[key] == runs_db.EarlierSend(first.run_id, ((LONG_IDS[0], "你好", None),))
    db.dispose()


def test_two_long_message_ids_that_share_300_characters_are_two_events(db_url: str) -> None:
    """Event keys were cut at 300 characters: a second message whose id shares the first 300 was taken for the
    first and lost. Fitted, they are two events, and each seen again is still one."""
    db = make_db_engine(db_url)
    upsert_contacts(db, [ContactRow(LONG_IDS[0], friend=True)], NOW)

    def message(mid: str) -> journeys_db.NewEvent:
        return journeys_db.NewEvent(CustomerEventKind.MESSAGE, LONG_IDS[0], NOW, "stream", {"text": "TD"}, mid)

    ids = journeys_db.record_events(db, [message("m" * 400 + "1"), message("m" * 400 + "2")], NOW)
    assert len(ids) == 2
    assert journeys_db.record_events(db, [message("m" * 400 + "1"), message("m" * 400 + "2")], NOW) == []
    db.dispose()


def test_a_run_key_over_the_limit_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    write_settings(tmp_path, f"sqlite:///{tmp_path}/wecast.sqlite", contacts=3)
    (tmp_path / "campaigns").mkdir(exist_ok=True)
    (tmp_path / "campaigns" / "c1.yaml").write_text("id: c1\nname: 测试\n" + PLAIN, encoding="utf-8")
    for lang, words in (
        ("en", "at most 200 characters (this one has 201)"),
        ("zh", "最多 200 个字符（这个有 201 个）"),
    ):
        for command in ("run", "preview"):
            result = CliRunner().invoke(
                main,
                ["--config", str(tmp_path / "config.yaml"), "--lang", lang, command, "c1", "--run-key", "k" * 201],
            )
            assert result.exit_code == 2, result.output
            assert "--run-key" in result.output and words in result.output, result.output


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_api_takes_the_longest_idempotency_key_and_refuses_a_longer_one(tmp_path: Path, db_url: str) -> None:
    """On PostgreSQL, where the key column is bounded: /send-message under the longest Idempotency-Key allowed is
    sent once (a retry answers the first result); one character more is a 422 naming the header."""
    settings = web_settings(tmp_path, database_url=db_url)
    with LiveServer(settings, scheduler=False) as live:
        login(live.client)
        datas = live.client.post("/get-all-user", json={"pageSize": 100}).json()["datas"]
        cid = next(c["id"] for c in datas if c["friend"] and not c["coworker"])
        body, key = {"id": cid, "message": "您的订单已发货"}, "i" * MAX_RUN_KEY
        first = live.client.post("/send-message", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 200 and first.json()["sent"] == 1, first.text
        retry = live.client.post("/send-message", json=body, headers={"Idempotency-Key": key})
        assert retry.status_code == 200 and retry.json()["runId"] == first.json()["runId"], retry.text
        assert isinstance(live.app.gateway, SandboxGateway)
        assert [m.contact_id for m in live.app.gateway.outbox_messages()].count(cid) == 1
        bad = live.client.post("/send-message", json=body, headers={"Idempotency-Key": key + "i"})
        assert bad.status_code == 422 and "Idempotency-Key" in bad.text, bad.text


def test_a_run_key_holding_the_key_separator_is_a_usage_error(tmp_path: Path) -> None:
    """A delivery's key is `{campaign}|{run key}|{contact}`: run key `a|b` for contact `c` and run key `a` for contact
    `b|c` were one key, so the second contact would be skipped as already sent. A run key with `|` is refused."""
    write_settings(tmp_path, f"sqlite:///{tmp_path}/wecast.sqlite", contacts=3)
    (tmp_path / "campaigns").mkdir(exist_ok=True)
    (tmp_path / "campaigns" / "c1.yaml").write_text("id: c1\nname: 测试\n" + PLAIN, encoding="utf-8")
    for lang, words in (("en", "may not contain '|'"), ("zh", "不能包含“|”")):
        for command in ("run", "preview"):
            result = CliRunner().invoke(
                main, ["--config", str(tmp_path / "config.yaml"), "--lang", lang, command, "c1", "--run-key", "a|b"]
            )
            assert result.exit_code == 2, result.output
            assert "--run-key" in result.output and words in result.output, result.output
    engine = make_db_engine(f"sqlite:///{tmp_path}/wecast.sqlite")
    try:
        assert runs_db.list_runs(engine) == [], "nothing was planned"
    finally:
        engine.dispose()


def test_an_idempotency_key_holding_the_key_separator_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    settings = web_settings(tmp_path)
    with LiveServer(settings, scheduler=False) as live:
        login(live.client)
        datas = live.client.post("/get-all-user", json={"pageSize": 100}).json()["datas"]
        cid = next(c["id"] for c in datas if c["friend"] and not c["coworker"])
        for path, body in (
            ("/send-message", {"id": cid, "message": "您的订单已发货"}),
            ("/send-message-all", {"ids": [cid], "message": "您的订单已发货"}),
        ):
            bad = live.client.post(path, json=body, headers={"Idempotency-Key": "order|1"})
            assert bad.status_code == 422, bad.text
            assert bad.json()["field"] == "Idempotency-Key" and "'|'" in bad.json()["error"], bad.text
        assert isinstance(live.app.gateway, SandboxGateway)
        assert live.app.gateway.outbox_messages() == []
        ok = live.client.post(
            "/send-message", json={"id": cid, "message": "您的订单已发货"}, headers={"Idempotency-Key": "order-1"}
        )
        assert ok.status_code == 200 and ok.json()["sent"] == 1, ok.text
