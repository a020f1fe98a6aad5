"""Failing cleanly (issue 7 item 8): a full disk, a database locked past the busy timeout, a schema from a newer
wecast or an unreadable database is one clear, translated error and exit 1 — never a traceback or "internal error";
nothing half-done; deliveries never handed to the gateway stay unsent (pending, or claimed until the next take-over
requeues them) — never `unknown` or `failed` — and the run resumes to the end, each recipient once, counted at the
sandbox outbox.

The disk is made full with SQLite's `max_page_count` (the same SQLITE_FULL a full disk gives; see
`chaos_harness`): in wecast's database for the CLI runs, in the sandbox's state file for the gateway's side.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from chaos_harness import Finished, finish, ledger, outbox_count, outbox_parts, start, wait_until, wecast
from helpers import PLAIN, campaign, outbox_by_contact, run, started, write_settings

from engine.errors import DatabaseError
from engine.gateways.sandbox import SandboxGateway
from storage.db import ensure_schema, make_db_engine
from storage.errors import Failure, StorageError

CONTACTS = 1500
CAMPAIGN = """id: all
name: 全体通知
audience: {}
message: {template: '{{ display_name }}您好，双十二大促开始啦，全场满300减50，详情请到店咨询。'}
frequency_cap: false
quiet_hours: false
throttle: {per_second: 600}
"""


def _folder(tmp: Path, *, extra: str = "", contacts: int = CONTACTS) -> Path:
    """A config.yaml and one campaign in `tmp`, over a SQLite file; the contacts synced."""
    (tmp / "campaigns").mkdir()
    (tmp / "campaigns" / "all.yaml").write_text(CAMPAIGN, encoding="utf-8")
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: sqlite:///{tmp}/wecast.sqlite\n"
        f"campaigns_dir: {tmp}/campaigns\n"
        "sending: {concurrency: 8}\n"
        f"{extra}"
        f"sandbox: {{contacts: {contacts}, seed: 3, state_file: {tmp}/sandbox.sqlite}}\n",
        encoding="utf-8",
    )
    synced = wecast(cfg, "contacts", "sync")
    assert synced.code == 0, synced.err
    return cfg


def _one_clean_error(done: Finished, *words: str) -> str:
    """The process ended with exit 1 and one `error:` line saying `words` — no traceback, no internal error."""
    assert done.code == 1, (done.code, done.err[-2000:])
    assert "Traceback" not in done.err and "internal error" not in done.err, done.err[-2000:]
    errors = [line for line in done.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.err[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def _resume_each_once(tmp: Path, cfg: Path) -> None:
    """`wecast run --resume` ends the run: every planned recipient sent, each exactly once at the outbox."""
    done = wecast(cfg, "run", "--resume")
    assert done.code == 0, done.err[-2000:]
    rows = ledger(f"sqlite:///{tmp}/wecast.sqlite")
    recipients = {d.contact_id for d in rows if d.status != "skipped"}
    assert {d.status for d in rows} == {"sent", "skipped"}
    received = Counter(c for c, _, _ in outbox_parts(tmp / "sandbox.sqlite"))
    assert set(received) == recipients and set(received.values()) == {1}


def _unsent_never_unknown(tmp: Path) -> None:
    """After the failure: nothing `unknown` or `failed`; what the ledger says sent is in the outbox; what is not in
    the outbox is still to send (pending or claimed); only rows caught `sending` may or may not have arrived."""
    rows = ledger(f"sqlite:///{tmp}/wecast.sqlite")
    received = {c for c, _, _ in outbox_parts(tmp / "sandbox.sqlite")}
    assert not [d for d in rows if d.status in ("unknown", "failed")]
    sent = {d.contact_id for d in rows if d.status == "sent"}
    sending = {d.contact_id for d in rows if d.status == "sending"}
    assert sent <= received <= sent | sending
    left = [d for d in rows if d.contact_id not in received | sent | sending]
    assert all(d.status in ("pending", "claimed", "skipped") for d in left)
    assert any(d.status in ("pending", "claimed") for d in rows)


@pytest.mark.slow
def test_disk_full_mid_run_is_one_clear_error_and_the_run_resumes(tmp_path: Path) -> None:
    """The disk fills while a run sends: exit 1 with one line saying the disk is full and to resume; nothing
    unsent is `unknown`; once there is room, `wecast run --resume` sends everyone else, each once."""
    cfg = _folder(tmp_path)
    flag = tmp_path / "disk-full"
    proc = start(cfg, "run", "all", full_flag=flag)
    assert wait_until(proc, lambda: outbox_count(tmp_path / "sandbox.sqlite") >= 300), finish(proc).err
    flag.touch()
    done = finish(proc)
    _one_clean_error(done, "the disk is full", "wecast run --resume")
    _unsent_never_unknown(tmp_path)
    assert outbox_count(tmp_path / "sandbox.sqlite") < CONTACTS
    flag.unlink()
    _resume_each_once(tmp_path, cfg)


def test_disk_full_while_planning_leaves_nothing_half_done(tmp_path: Path) -> None:
    """A plan that finds the disk full is one clear error (in Chinese too) and writes nothing: no run, no delivery,
    nothing sent; with room again the same command runs the campaign."""
    cfg = _folder(tmp_path, contacts=200)
    flag = tmp_path / "disk-full"
    flag.touch()
    done = wecast(cfg, "run", "all", full_flag=flag)
    _one_clean_error(done, "the disk is full")
    zh = wecast(cfg, "--lang", "zh", "preview", "all", full_flag=flag)  # a preview writes nothing: it still works
    assert zh.code == 0, zh.err
    assert ledger(f"sqlite:///{tmp_path}/wecast.sqlite") == []
    assert outbox_count(tmp_path / "sandbox.sqlite") == 0
    flag.unlink()
    again = wecast(cfg, "run", "all")
    assert again.code == 0, again.err
    assert outbox_count(tmp_path / "sandbox.sqlite") == len(
        [d for d in ledger(f"sqlite:///{tmp_path}/wecast.sqlite") if d.status == "sent"]
    )


@pytest.mark.slow
def test_database_locked_past_the_busy_timeout_is_a_clear_error_and_the_run_resumes(tmp_path: Path) -> None:
    """Another process holds the database (`BEGIN EXCLUSIVE`) longer than `database_busy_timeout`: the run stops
    with one line saying so, nothing unsent is `unknown`, and `wecast run --resume` then sends everyone once."""
    cfg = _folder(tmp_path, extra="database_busy_timeout: 1s\n")
    proc = start(cfg, "run", "all")
    assert wait_until(proc, lambda: outbox_count(tmp_path / "sandbox.sqlite") >= 300), finish(proc).err
    holder = sqlite3.connect(tmp_path / "wecast.sqlite", isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        done = finish(proc)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _one_clean_error(done, "locked longer than the busy timeout", "wecast run --resume")
    _unsent_never_unknown(tmp_path)
    _resume_each_once(tmp_path, cfg)


def _newer(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE wecast_meta SET value = '99' WHERE key = 'schema_version'")


def _garbage(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE wecast_meta SET value = 'v5-beta' WHERE key = 'schema_version'")


def _not_a_database(db: Path) -> None:
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        extra.unlink(missing_ok=True)
    db.write_bytes(b"PK\x03\x04 this is a zip file, not a database" * 100)


DAMAGE = {
    "newer": (_newer, ("newer wecast", "schema version 99", "upgrade wecast")),
    "garbage": (_garbage, ("v5-beta", "unreadable", "restore it from a backup")),
    "not_a_database": (_not_a_database, ("cannot be opened or read", "file is not a database")),
}


@pytest.mark.parametrize("command", [("run", "all"), ("preview", "all"), ("serve", "--port", "0")])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_database_wecast_cannot_use_is_a_clear_error(tmp_path: Path, damage: str, command: tuple[str, ...]) -> None:
    """A schema newer than this wecast, an unreadable version or a file that is no database: exit 1 and one line
    naming the database and what to do, for `run`, `preview` and `serve` alike — never "internal error"."""
    cfg = _folder(tmp_path, contacts=30)
    spoil, words = DAMAGE[damage]
    spoil(tmp_path / "wecast.sqlite")
    done = wecast(cfg, *command, timeout=60)
    line = _one_clean_error(done, str(tmp_path / "wecast.sqlite"), *words)
    assert "Error:" not in line  # no exception class names: words for people
    assert outbox_count(tmp_path / "sandbox.sqlite") == 0


def test_the_database_errors_speak_chinese(tmp_path: Path) -> None:
    """The same failure in Chinese: the translated line (catalog complete for these messages)."""
    cfg = _folder(tmp_path, contacts=30)
    _newer(tmp_path / "wecast.sqlite")
    done = wecast(cfg, "--lang", "zh", "preview", "all")
    assert done.code == 1
    assert "更新版本" in done.err and "Traceback" not in done.err, done.err


def test_the_api_answers_503_with_the_reason_when_the_database_fails() -> None:
    """The HTTP API's error boundary answers a database failure 503 with the words for people (the client's
    language) and the machine-readable kind — not a 500 "internal error"."""
    import httpx
    from fastapi import FastAPI

    from engine.web.errors import install_error_handlers

    api = FastAPI()
    install_error_handlers(api)

    @api.get("/busy")
    def busy() -> None:
        raise StorageError(Failure.BUSY, "locked", detail="database is locked", where="/srv/wecast.sqlite")

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as client:
            return await client.get("/busy")

    answer = run(ask())
    assert answer.status_code == 503
    assert answer.json()["reason"] == "busy"
    assert answer.json()["error"].startswith("/srv/wecast.sqlite: another process held the database locked")


def test_a_full_sandbox_state_file_is_not_masked_and_nothing_unsent_is_unknown(tmp_path: Path) -> None:
    """The sandbox's own state file fills mid-run (its outbox cannot take another part): the run stops with a
    `DatabaseError` saying so — not an "unexpected error" per delivery — the part that could not be delivered is
    pending again (not `unknown`), the outbox holds exactly what the ledger says was sent, and once there is room
    the run resumes and everyone gets one message."""
    settings = write_settings(tmp_path, f"sqlite:///{tmp_path}/wecast.sqlite", contacts=400)

    async def scenario() -> None:
        app = await started(settings)
        try:
            spec = campaign(settings, PLAIN)
            gateway = app.gateway
            assert isinstance(gateway, SandboxGateway)
            conn = gateway.store._conn
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={pages + 3}")
            with pytest.raises(DatabaseError) as raised:
                await app.run_campaign(spec, run_key="full")
            assert raised.value.kind == "full" and "state file" in str(raised.value)
            rows = ledger(settings.database_url)
            counts = Counter(d.status for d in rows)
            assert not counts.get("unknown") and not counts.get("failed"), counts
            received = outbox_by_contact(gateway)
            assert set(received.values()) == {1}
            assert {d.contact_id for d in rows if d.status == "sent"} == set(received)
            assert counts.get("pending", 0) > 0
            conn.execute("PRAGMA max_page_count=1073741823")
            await app.resume()
            final = ledger(settings.database_url)
            assert {d.status for d in final} <= {"sent", "skipped"}
            received = outbox_by_contact(gateway)
            assert set(received.values()) == {1}
            assert set(received) == {d.contact_id for d in final if d.status == "sent"}
        finally:
            await app.close()

    run(scenario())


def test_busy_timeout_is_a_setting(tmp_path: Path) -> None:
    """`database_busy_timeout` reaches SQLite: a write blocked by another transaction fails BUSY after it."""
    cfg = write_settings(tmp_path, f"sqlite:///{tmp_path}/wecast.sqlite", extra="database_busy_timeout: 1s\n")
    assert cfg.database_busy_timeout.total_seconds() == 1
    engine = make_db_engine(cfg.database_url, busy_timeout=cfg.database_busy_timeout.total_seconds())
    holder = sqlite3.connect(tmp_path / "wecast.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageError) as raised:
            ensure_schema(engine)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert raised.value.kind is Failure.BUSY


def test_a_database_failure_in_the_service_is_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """In `wecast serve` a run stopped by a full disk is one log line saying so (no traceback); the service stays."""
    from engine.workers import Workers

    async def fails() -> None:
        raise StorageError(Failure.FULL, "full", detail="database or disk is full", where="/srv/wecast.sqlite")

    with caplog.at_level("ERROR", logger="wecast.workers"):
        assert run(Workers()._guard(7, fails)) is None
    [record] = caplog.records
    assert record.exc_info is None
    assert record.getMessage().startswith("run 7: stopped, unsent deliveries stay to send: /srv/wecast.sqlite: the")
    # A Chinese server logs it in Chinese (it was English whatever the language).
    from engine import i18n

    caplog.clear()
    i18n.set_language(i18n.Language.ZH)
    with caplog.at_level("ERROR", logger="wecast.workers"):
        assert run(Workers()._guard(7, fails)) is None
    [record] = caplog.records
    said = record.getMessage()
    assert said.startswith("批次 7：已停止，未发出的消息保持待发送：/srv/wecast.sqlite"), said


def test_a_read_only_database_fails_the_background_sync_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`wecast serve` on a database it may read but not write (SQLite's own read-only refusal): the background
    contact sync logged 'Task exception was never retrieved' with a traceback every few seconds; now its failure is
    the database's one translated line, kept as the last sync error, and the task ends without an exception."""
    from sqlalchemy import event

    from engine.workers import Workers

    async def go() -> None:
        app = await started(write_settings(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", contacts=20))
        event.listen(app.db, "connect", lambda conn, _record: conn.execute("PRAGMA query_only = ON"))
        app.db.dispose()  # every connection from now on is read-only
        workers = Workers()
        with caplog.at_level("WARNING", logger="wecast.workers"):
            assert await workers.sync_in_background(app) is None
        assert "attempt to write a readonly database" in workers.last_sync_error
        assert "may be read and written" in workers.last_sync_error  # what to do, from engine.dberrors
        (line,) = [r.getMessage() for r in caplog.records if r.name == "wecast.workers"]
        assert line.startswith("contact sync failed: ") and "\n" not in line
        await app.close()

    run(go())
