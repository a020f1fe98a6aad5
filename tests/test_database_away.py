"""A PostgreSQL server that ends wecast's connections under it (a restart, an administrator's
`pg_terminate_backend`, an idle-session timeout, a failover): wecast goes on with new connections — the next
step after the kill works, whatever it is — and never sends a delivery twice.

The connections are ended with `pg_terminate_backend` from an administrator's connection (the server itself is
never stopped: other test sessions use it), chosen by the `application_name` each test gives its engine.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ADMIN_URL
from helpers import PLAIN, campaign, outbox_by_contact, run, started, write_settings
from sqlalchemy import text
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy
from web_harness import LiveServer, login
from web_harness import make_settings as web_settings

from engine import dispatch, i18n
from engine.dberrors import explain
from engine.service import Wecast
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage.db import make_db_engine, transaction
from storage.errors import Failure, StorageError
from storage.models import DeliveryStatus

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def _named(db_url: str) -> tuple[str, str]:
    """`db_url` with an application name of its own (what `_terminate` picks its connections by), and that name."""
    name = f"wecast-away-{uuid.uuid4().hex[:10]}"
    return make_url(db_url).update_query_dict({"application_name": name}).render_as_string(hide_password=False), name


def _server(db_url: str) -> tuple[str, int]:
    url = make_url(db_url)
    return url.host or "127.0.0.1", url.port or 5432


def _through(db_url: str, proxy: TcpProxy) -> str:
    """`db_url` reached through `proxy`."""
    return make_url(db_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def _terminate(db_url: str, name: str) -> int:
    """End every server connection named `name` and wait until the server has let them go; how many there were."""
    admin = make_url(ADMIN_URL).set(drivername="postgresql", database=make_url(db_url).database, query={})
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchone()
        deadline = time.monotonic() + 10
        left = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        while (conn.execute(left, (name,)).fetchone() or (0,))[0]:
            assert time.monotonic() < deadline, "the server did not end the connections"
            time.sleep(0.02)
    return int(ended[0]) if ended else 0


def test_the_first_step_after_the_server_ended_the_pooled_connections_works(db_url: str) -> None:
    """Connections the server ended while they sat in the pool are replaced at checkout: the next read and the next
    write succeed (before: each failed once per dead connection with "the database cannot be opened or read")."""
    url, name = _named(db_url)
    db = make_db_engine(url)
    with db.connect() as a, db.connect() as b:  # two pooled connections, both idle afterwards
        a.execute(text("SELECT 1"))
        b.execute(text("SELECT 1"))
    assert _terminate(url, name) == 2
    assert contacts_db.count_contacts(db) == 0
    assert _terminate(url, name) >= 1
    with db.begin() as conn:
        conn.execute(text("SELECT 1"))
    db.dispose()


def test_the_check_at_checkout_works_for_a_connection_past_descriptor_1024(db_url: str) -> None:
    """A busy server process holds more than 1,024 descriptors (connections, files, sockets): a pooled connection
    with a higher number is still checked out and used (select() refuses descriptors past FD_SETSIZE, which made
    every checkout a 'disconnection', retried, then failed), and one the server ended there is still replaced."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    url, name = _named(db_url)
    db = make_db_engine(url)
    try:
        with db.connect() as conn:
            assert conn.connection.dbapi_connection.fileno() > 1024  # type: ignore[union-attr]
            conn.execute(text("SELECT 1"))
        assert contacts_db.count_contacts(db) == 0  # checked out again from the pool
        assert _terminate(url, name) >= 1
        assert contacts_db.count_contacts(db) == 0  # replaced
    finally:
        db.dispose()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_run_after_the_server_restarted_sends_everyone_once(tmp_path: Path, db_url: str) -> None:
    """The server drops every connection of a running wecast between planning and sending (a restart in the night
    between a plan and its dispatch): the run sends each recipient exactly once, nothing left open."""
    url, name = _named(db_url)
    settings = write_settings(tmp_path, url, contacts=40)

    async def go() -> None:
        app = await started(settings)
        plan = app.plan(campaign(settings, PLAIN))
        assert _terminate(url, name) >= 1
        summary = await app.dispatcher.run(plan.run_id)
        counts = deliveries_db.status_counts(app.db, plan.run_id)
        assert summary.open == 0 and counts.get(DeliveryStatus.SENT, 0) == plan.planned > 0, counts
        received = outbox_by_contact(app.gateway)
        assert sum(received.values()) == plan.planned and set(received.values()) == {1}
        await app.close()

    run(go())


def test_a_server_that_is_away_or_drops_a_transaction_is_said_so(db_url: str) -> None:
    """A server that refuses connections, and one that drops the connection in the middle of a transaction, are
    the kind `unreachable` with words about the server (not "the file ... restore it from a backup"), in Chinese too."""
    with TcpProxy(*_server(db_url)) as proxy:
        url = _through(db_url, proxy)
        db = make_db_engine(url)

        def cut_in_the_middle() -> None:
            with transaction(db) as conn:
                conn.execute(text("SELECT 1"))
                proxy.cut()
                conn.execute(text("SELECT 1"))

        with pytest.raises(StorageError) as dropped:
            cut_in_the_middle()
        assert dropped.value.kind is Failure.UNREACHABLE
        proxy.down()
        with pytest.raises(StorageError) as refused:
            contacts_db.count_contacts(db)
        assert refused.value.kind is Failure.UNREACHABLE
        said = str(explain(refused.value))
        assert "the database server cannot be reached" in said and "backup" not in said, said
        assert explain(refused.value).kind == "unreachable"
        i18n.set_language(i18n.Language.ZH)
        assert "连接不上数据库服务器" in str(explain(dropped.value))
        db.dispose()


def test_serve_dispatches_a_run_again_when_the_server_is_back(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wecast serve` sending a run when its PostgreSQL server goes away for a few seconds (connections cut, then
    refused) and comes back: the run stops with one log line, is dispatched again by itself once the server
    answers, and completes — every delivery settled, no customer messaged twice (the sandbox here does not
    deduplicate by key, as WorkPro does not: what was caught mid-send is `unknown`, never resent). Before, the run
    stayed `running` and unsent until the service was restarted. The journeys' ticks meanwhile say their failure
    once, without a traceback (before: a traceback every second)."""
    monkeypatch.setattr(dispatch, "RECORD_PATIENCE", 2.0)  # results caught by the outage give up in 2 s, not 30
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "all.yaml").write_text(
        "id: all\nname: 全体\naudience: {}\nmessage: {template: '{{ name }}您好'}\n"
        "frequency_cap: false\nquiet_hours: false\nthrottle: {per_second: 25}\n",
        encoding="utf-8",
    )
    with TcpProxy(*_server(db_url)) as proxy:
        settings = web_settings(
            tmp_path,
            database_url=_through(db_url, proxy),
            sandbox={"contacts": 80, "honor_idempotency_key": False},
        )
        with caplog.at_level("WARNING"), LiveServer(settings) as srv:
            login(srv.client)
            started = srv.client.post("/api/v1/campaigns/all/run")
            assert started.status_code == 202, started.text
            run_id = started.json()["run"]["id"]
            time.sleep(1.0)  # a quarter of the run is sent
            proxy.down()
            # Away until the run has stopped (a short outage the results' wait rides out would prove nothing; under
            # load a fixed 1.5 s was such an outage now and then), then back.
            deadline = time.monotonic() + 60
            while not any("dispatching it again" in r.getMessage() for r in list(caplog.records)):
                assert time.monotonic() < deadline, "the run never stopped while the server was away"
                time.sleep(0.1)
            proxy.up()
            deadline = time.monotonic() + 60
            while (status := srv.client.get(f"/api/v1/runs/{run_id}").json()["status"]) != "completed":
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            received = outbox_by_contact(srv.app.gateway)
    assert any("dispatching it again" in r.getMessage() for r in caplog.records)
    # The run's stop and the journeys' failing ticks are each said in words, without a traceback, and the
    # journeys' not once a poll.
    assert not [r.getMessage() for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert len([r for r in caplog.records if r.name == "wecast.journeys" and r.levelname == "ERROR"]) <= 2
    db = make_db_engine(db_url, migrate=False)
    try:
        counts = deliveries_db.status_counts(db, run_id)
    finally:
        db.dispose()  # its connection was left to the garbage collector: "deleted while still open"
    assert not set(counts) - {DeliveryStatus.SENT, DeliveryStatus.UNKNOWN, DeliveryStatus.SKIPPED}, counts
    assert set(received.values()) == {1}, received.most_common(3)
    assert counts[DeliveryStatus.SENT] + counts.get(DeliveryStatus.UNKNOWN, 0) >= sum(received.values())
    assert counts[DeliveryStatus.SENT] <= sum(received.values())


def test_results_of_sends_made_wait_for_the_server_instead_of_turning_unknown(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes away (connections cut, then refused for a second) just as the dispatcher records a batch
    of results: the sends have happened, so their results wait for the server and are written when it is back —
    the run completes with everyone `sent` once, nothing `unknown`. Before, the batch was dropped and the run
    stopped; its rows, left `sending`, became `unknown` at the next take-over (on a gateway that does not
    deduplicate, as here)."""
    with TcpProxy(*_server(db_url)) as proxy:
        settings = write_settings(tmp_path, _through(db_url, proxy), contacts=40, idempotent=False)
        real = deliveries_db.write_results
        cuts: list[threading.Timer] = []

        def away_once(db: Any, results: Any, *args: Any, **kwargs: Any) -> None:
            if results and not cuts:  # the first batch of results of sends made (not a chunk's held-back rows)
                proxy.down()
                cuts.append(threading.Timer(1.0, proxy.up))
                cuts[0].start()
            real(db, results, *args, **kwargs)

        async def go() -> None:
            app = Wecast(settings)  # the real clock: the server is away for a second of real time
            await app.start()
            await app.sync()
            plan = app.plan(campaign(settings, PLAIN))
            monkeypatch.setattr(deliveries_db, "write_results", away_once)
            summary = await app.dispatcher.run(plan.run_id)
            counts = deliveries_db.status_counts(app.db, plan.run_id)
            assert cuts and summary.open == 0, counts
            assert counts.get(DeliveryStatus.SENT, 0) == plan.planned and DeliveryStatus.UNKNOWN not in counts, counts
            received = outbox_by_contact(app.gateway)
            assert sum(received.values()) == plan.planned and set(received.values()) == {1}
            await app.close()

        run(go())


def test_healthz_says_the_database_is_away_and_livez_still_answers(tmp_path: Path, db_url: str) -> None:
    """/healthz is readiness: with the PostgreSQL server away (connections cut, then refused) it answers 503 with
    stable keys naming what is down — the database — and words in the reader's language, and 200 again once the
    server is back; the gateway's login state is reported, not counted as down. /livez (liveness) answers 200
    throughout. Before, /healthz answered 200 "ok" with the database away."""
    with TcpProxy(*_server(db_url)) as proxy:
        settings = web_settings(tmp_path, database_url=_through(db_url, proxy))
        with LiveServer(settings, scheduler=False) as srv:
            client = srv.client
            before = client.get("/healthz")
            assert before.status_code == 200, before.text
            assert before.json()["checks"] == {"database": "ok", "gateway": "logged_out"}
            login(client)
            assert client.get("/healthz").json()["checks"] == {"database": "ok", "gateway": "logged_in"}
            proxy.down()
            away = client.get("/healthz")
            assert away.status_code == 503, away.text
            body = away.json()
            assert body["status"] == "error" and body["code"] == "database_unreachable"
            assert body["down"] == ["database"]
            assert body["checks"] == {"database": "unreachable", "gateway": "logged_in"}
            assert "the database does not answer" in body["error"]
            assert str(proxy.port) not in body["error"]  # an open endpoint: nothing of database_url
            zh = client.get("/healthz", headers={"Accept-Language": "zh-CN"}).json()["error"]
            assert "数据库没有响应" in zh
            live = client.get("/livez")
            assert live.status_code == 200 and live.json() == {"status": "ok"}
            proxy.up()
            deadline = time.monotonic() + 10
            while (back := client.get("/healthz")).status_code != 200:
                assert time.monotonic() < deadline, back.text
                time.sleep(0.1)
            assert back.json()["status"] == "ok" and "down" not in back.json()


def test_healthz_waits_for_a_server_that_does_not_answer_a_bounded_time(db_url: str) -> None:
    """A database server that accepts the connection and then says nothing (a hung server, a half-open firewall)
    is "not answering" after the check's timeout, not minutes later; and however many checks come meanwhile,
    one probe waits on it (one worker thread held, not one per request)."""
    from engine.web.app import DatabaseCheck

    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
    url = make_url(db_url).set(host="127.0.0.1", port=silent.getsockname()[1]).render_as_string(hide_password=False)
    db = make_db_engine(url, migrate=False)
    check = DatabaseCheck(db, timeout=0.5)
    threads = threading.active_count()

    async def go() -> None:
        try:
            started = time.monotonic()
            assert await asyncio.gather(*(check.answers() for _ in range(5))) == [False] * 5
            assert time.monotonic() - started < 3
            assert threading.active_count() <= threads + 1
        finally:
            silent.close()  # the probe's connection sees the end and its thread finishes (asyncio.run waits for it)

    try:
        asyncio.run(go())
    finally:
        db.dispose()


def test_wecast_run_with_a_server_that_does_not_answer_ends_in_bounded_time(tmp_path: Path, db_url: str) -> None:
    """`wecast run` whose database server accepts the connection and never answers gives up after the connect
    timeout (10 s unless the URL says `connect_timeout`) with the catalogued words — Chinese here — and exit status
    75 (try again later), not a traceback. Before, it waited for ever (no connect timeout), and a timeout was an
    "internal error" (status 70)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = make_url(db_url).set(host="127.0.0.1", port=silent.getsockname()[1]).render_as_string(hide_password=False)
    write_settings(tmp_path, url)
    (tmp_path / "campaigns").mkdir(exist_ok=True)
    (tmp_path / "campaigns" / "all.yaml").write_text(
        "id: all\nname: 全体\naudience: {}\nmessage: {template: '{{ name }}您好'}\n", encoding="utf-8"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "engine.cli", "--lang", "zh", "-c", str(tmp_path / "config.yaml"), "run", "all"]
    try:
        started = time.monotonic()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
        waited = time.monotonic() - started
    finally:
        silent.close()
    assert done.returncode == 75, (done.returncode, done.stderr)
    assert "连接不上数据库服务器" in done.stderr and "connection timeout expired" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert waited < 45, waited


@pytest.mark.parametrize(
    ("lang", "words"), [("en", "the database server cannot be reached"), ("zh", "连接不上数据库服务器")]
)
def test_wecast_run_with_the_server_refusing_connections_is_one_line_and_exit_75(
    tmp_path: Path, db_url: str, lang: str, words: str
) -> None:
    """`wecast run` whose database server refuses connections (stopped, wrong port): at once, one line in the
    reader's language saying what to check, exit status 75 (try again later), no traceback and never the password
    of database_url."""
    from click.testing import CliRunner

    from engine.cli import main

    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connections are refused
    write_settings(tmp_path, f"postgresql+psycopg://wecast:s3cret-pw@127.0.0.1:{port}/wecast", contacts=5)
    (tmp_path / "campaigns").mkdir(exist_ok=True)
    (tmp_path / "campaigns" / "c1.yaml").write_text("id: c1\nname: 测试\n" + PLAIN, encoding="utf-8")
    started = time.monotonic()
    result = CliRunner().invoke(main, ["--lang", lang, "-c", str(tmp_path / "config.yaml"), "run", "c1"])
    assert time.monotonic() - started < 10
    assert result.exit_code == 75, result.output
    assert words in result.output and "Connection refused" in result.output, result.output
    assert "Traceback" not in result.output and "s3cret-pw" not in result.output, result.output
