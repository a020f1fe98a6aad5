"""Storage: the schema carries a version from day one; times come back timezone-aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, update

from storage.db import SchemaError, make_db_engine, schema_version
from storage.models import META, RUNS, SCHEMA_VERSION


def test_new_database_records_the_schema_version_and_reopens_cleanly(tmp_path: Path) -> None:
    """A new database stores SCHEMA_VERSION; opening it again changes nothing."""
    url = f"sqlite:///{tmp_path}/w.sqlite"
    first = make_db_engine(url)
    assert schema_version(first) == SCHEMA_VERSION
    first.dispose()
    again = make_db_engine(url)
    assert schema_version(again) == SCHEMA_VERSION
    again.dispose()


def test_a_database_from_a_newer_release_is_refused_not_damaged(tmp_path: Path) -> None:
    """A database written by a newer wecast is refused with a clear error instead of being altered."""
    url = f"sqlite:///{tmp_path}/w.sqlite"
    db = make_db_engine(url)
    with db.begin() as conn:
        conn.execute(update(META).where(META.c.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    db.dispose()
    with pytest.raises(SchemaError, match="newer than this wecast"):
        make_db_engine(url)


def run_row(run_key: str, created_at: datetime) -> dict[str, object]:
    return {
        "campaign_id": "c",
        "run_key": run_key,
        "trigger": "manual",
        "status": "running",
        "timezone": "Asia/Shanghai",
        "campaign_file": "",
        "campaign_hash": "",
        "settings": {},
        "owner": "",
        "error": "",
        "planned": 0,
        "skipped_at_plan": 0,
        "created_at": created_at,
    }


def test_times_are_stored_utc_and_returned_aware(tmp_path: Path) -> None:
    """An aware time in any zone is stored as UTC and read back aware; a naive time is rejected."""
    db = make_db_engine(f"sqlite:///{tmp_path}/w.sqlite")
    shanghai = timezone(timedelta(hours=8))
    when = datetime(2026, 1, 5, 10, 0, tzinfo=shanghai)
    with db.begin() as conn:
        conn.execute(RUNS.insert().values(**run_row("k", when)))
    with db.connect() as conn:
        stored = conn.execute(select(RUNS.c.created_at)).scalar_one()
        raw = conn.exec_driver_sql("SELECT created_at FROM campaign_runs").scalar_one()
    assert stored == when and stored.tzinfo is UTC
    assert str(raw).startswith("2026-01-05 02:00:00")
    with pytest.raises(Exception, match="naive datetime"), db.begin() as conn:
        conn.execute(RUNS.insert().values(**run_row("k2", datetime(2026, 1, 5, 10, 0))))
    db.dispose()
