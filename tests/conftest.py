"""Fixtures for the whole suite.

`db_url` runs a test once on SQLite and once on PostgreSQL (as APScheduler's `raw_datastore` runs its data store
tests over every backend). A PostgreSQL test gets an empty schema of its own (dropped afterwards) in a database
that the session creates on the local server (`WECAST_TEST_PG`, default postgres@127.0.0.1:5432, trust auth)
with an ICU en-US collation — what real installations usually have, under which string ranges do not sort by
code point — and a Shanghai session time zone, so nothing may lean on SQLite's byte order or on the server's
clock zone. Without a reachable server those runs skip, except under CI (`CI` set), where they fail: a green CI
run must mean PostgreSQL was tested.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import write_settings
from sqlalchemy.engine import make_url

from engine import i18n
from engine.settings import Settings


@pytest.fixture(autouse=True)
def english_locale(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts in English whatever the machine's locale (a test of Chinese output asks for it), and
    leaves the process language as it found it (the CLI sets it)."""
    for name in i18n.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    before = i18n.current()
    i18n.set_language(i18n.Language.EN)
    yield
    i18n.set_language(before)


ADMIN_URL = os.environ.get("WECAST_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _unavailable(reason: str) -> None:
    message = f"PostgreSQL tests need a server at {make_url(ADMIN_URL).render_as_string()}: {reason}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message + " (CI is set: start PostgreSQL before the tests, see .ci/run)", pytrace=False)
    pytest.skip(message)


def _admin() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        _unavailable(f"the psycopg driver is not installed ({exc}); pip install -e '.[test]'")
    url = make_url(ADMIN_URL).set(drivername="postgresql")
    try:
        return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        _unavailable(str(exc).strip())
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The session's PostgreSQL database (skip, or under CI fail, when the server does not answer)."""
    name = f"wecast_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        try:
            admin.execute(
                f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        except Exception:  # a server built without ICU: the default collation still tests the rest
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        # Commits need not wait for the disk here (only a server crash could lose them, never a killed client):
        # the tests' many small transactions stay fast.
        admin.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")
    try:
        yield name
    finally:
        with _admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _fresh_pg_schema(database: str) -> Iterator[str]:
    """An empty schema in `database`, first on the search path of every connection made with the URL yielded."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin_url = make_url(ADMIN_URL).set(drivername="postgresql", database=database)
    import psycopg

    with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    options = f"-c timezone=Asia/Shanghai -c search_path={schema}"
    url = make_url(ADMIN_URL).set(database=database, query={"options": options})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty database for one test: a SQLite file, or a PostgreSQL schema of its own (dropped afterwards).
    `@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)` runs a test on one backend only."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/wecast.sqlite"
    else:
        yield from _fresh_pg_schema(request.getfixturevalue("pg_database"))


@pytest.fixture
def fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> Iterator[Callable[[], str]]:
    """`fresh_db_url()`: one more new, empty database on the backend of this test's `db_url` (a SQLite file, a
    PostgreSQL schema), for tests that need several (each dropped afterwards)."""
    with ExitStack() as stack:
        made = 0

        def fresh() -> str:
            nonlocal made
            made += 1
            if db_url.startswith("sqlite"):
                return f"sqlite:///{tmp_path}/wecast-{made}.sqlite"
            return stack.enter_context(contextmanager(_fresh_pg_schema)(request.getfixturevalue("pg_database")))

        yield fresh


@pytest.fixture
def make_settings(tmp_path: Path, db_url: str) -> Callable[..., Settings]:
    """`make_settings(contacts=40, faults="{error_rate: 0.2}", ...)`: settings over this test's database and
    folder (see `helpers.write_settings`)."""

    def make(**kwargs: Any) -> Settings:
        return write_settings(tmp_path, db_url, **kwargs)

    return make
