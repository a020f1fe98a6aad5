"""contacts.follow_user_ids: stored by a sync, read back leading staff member first, and added to a database of
schema version 2 by the 2 -> 3 migration (existing contacts keep their data and have no staff until the next sync)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from storage.contacts import ContactRow, follow_users, upsert_contacts
from storage.db import make_db_engine, schema_version
from storage.models import META, SCHEMA_VERSION

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_sync_stores_the_staff_members_in_order(db_url: str) -> None:
    """follow_user_ids round-trips in order; a contact without any is left out of follow_users, and a later sync
    replaces the list."""
    db = make_db_engine(db_url)
    upsert_contacts(
        db, [ContactRow("wmA", name="甲", follow_user_ids=("lina", "zhangwei")), ContactRow("wmB", name="乙")], NOW
    )
    assert follow_users(db, ["wmA", "wmB", "wmNone"]) == {"wmA": ("lina", "zhangwei")}
    upsert_contacts(db, [ContactRow("wmA", name="甲", follow_user_ids=("zhangwei",))], NOW)
    assert follow_users(db, ["wmA"]) == {"wmA": ("zhangwei",)}
    db.dispose()


def test_a_version_2_database_gains_the_column(db_url: str) -> None:
    """A database at schema 2 (no follow_user_ids column) is migrated on open (2 -> 3 adds it): its contacts are
    kept, with no staff members, and new syncs store them."""
    db = make_db_engine(db_url)
    upsert_contacts(db, [ContactRow("wmOld", name="老客户")], NOW)
    with db.begin() as conn:
        conn.execute(text("ALTER TABLE contacts DROP COLUMN follow_user_ids"))
        conn.execute(text(f"UPDATE {META.name} SET value = '2' WHERE key = 'schema_version'"))
    db.dispose()
    migrated = make_db_engine(db_url)
    assert schema_version(migrated) == SCHEMA_VERSION
    assert follow_users(migrated, ["wmOld"]) == {}
    with migrated.connect() as conn:
        assert conn.execute(text("SELECT name FROM contacts WHERE id = 'wmOld'")).scalar() == "老客户"
    upsert_contacts(migrated, [ContactRow("wmOld", name="老客户", follow_user_ids=("lina",))], NOW)
    assert follow_users(migrated, ["wmOld"]) == {"wmOld": ("lina",)}
    migrated.dispose()
