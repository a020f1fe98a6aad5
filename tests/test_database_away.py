"""A PostgreSQL server that ends wecast's connections under it (a restart, an administrator's
`pg_terminate_backend`, an idle-session timeout, a failover): wecast goes on with new connections — the next
step after the kill works, whatever it is — and never sends a delivery twice.

The connections are ended with `pg_terminate_backend` from an administrator's connection (the server itself is
never stopped: other test sessions use it), chosen by the `application_name` each test gives its engine.
"""

from __future__ import annotations

import os
import resource
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import ADMIN_URL
from helpers import PLAIN, campaign, outbox_by_contact, run, started, write_settings
from sqlalchemy import text
from sqlalchemy.engine import make_url

from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage.db import make_db_engine
from storage.models import DeliveryStatus

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def _named(db_url: str) -> tuple[str, str]:
    """`db_url` with an application name of its own (what `_terminate` picks its connections by), and that name."""
    name = f"wecast-away-{uuid.uuid4().hex[:10]}"
    return make_url(db_url).update_query_dict({"application_name": name}).render_as_string(hide_password=False), name


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
