"""Missing-field detection against real contacts (SQLite + the sandbox's demo customers), in
`build_preview` and in `wecast validate`."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from engine import audience
from engine.cli import main
from engine.contacts import sync_contacts
from engine.gateways.sandbox import SandboxGateway
from engine.plan import build_preview
from engine.settings import SandboxSettings, Settings
from engine.spec import Campaign, load_campaign
from storage.contacts import load_contact_views
from storage.db import make_db_engine

NOW = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Synced:
    folder: Path
    db_url: str
    state_file: Path
    db: Engine
    views: list[dict[str, Any]]


async def _sync(folder: Path) -> Synced:
    state_file = folder / "s.sqlite"
    gateway = SandboxGateway(SandboxSettings(state_file=state_file, contacts=200))
    await gateway.start()
    db_url = f"sqlite:///{folder / 'w.sqlite'}"
    db = make_db_engine(db_url)
    try:
        await sync_contacts(gateway, db)
    finally:
        await gateway.close()
    views = load_contact_views(db)
    return Synced(folder, db_url, state_file, db, views)


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = asyncio.run(_sync(tmp_path_factory.mktemp("synced")))
    yield data
    data.db.dispose()


def campaign(folder: Path, template: str, *, extra: str = "", name: str = "city_promo") -> Campaign:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: 城市推广\naudience: {{}}\nmessage:\n  template: |\n    {template}\n{extra}", encoding="utf-8"
    )
    return load_campaign(path, Settings(version=1))


def reachable_lacking(views: list[dict[str, Any]], field: str) -> tuple[list[str], int]:
    """Ids of recipients (per the audience rules) lacking `field`, and the number of recipients."""
    chosen = audience.select(views, now=NOW).recipients
    return [c["id"] for c in chosen if not c.get(field)], len(chosen)


def test_sandbox_data_has_contacts_without_a_city(synced: Synced) -> None:
    """The demo data includes reachable customers without a city, so the tests below are meaningful."""
    lacking, total = reachable_lacking(synced.views, "city")
    assert total > 100
    assert 0 < len(lacking) < total


def test_template_using_a_field_some_lack_fails_preview(synced: Synced, tmp_path: Path) -> None:
    """`{{ city }}` fails Preview.problems(), naming city and how many recipients lack it."""
    lacking, total = reachable_lacking(synced.views, "city")
    c = campaign(tmp_path, "{{ city }}的朋友您好，新店开业！")
    preview = build_preview(synced.db, c, now=NOW)
    assert sorted(preview.missing["city"]) == sorted(lacking)
    assert len(preview.recipients) == total - len(lacking)
    problems = preview.problems()
    assert len(problems) == 1
    message = str(problems[0])
    assert message.startswith(f"{c.file}:5: message.template: ")
    assert f"'city' is missing for {len(lacking)} of {total} recipients" in message


def test_default_makes_the_same_template_pass(synced: Synced, tmp_path: Path) -> None:
    """With `| default(...)` every recipient gets a message and there are no problems."""
    lacking, total = reachable_lacking(synced.views, "city")
    c = campaign(tmp_path, "{{ city | default('您所在城市') }}的朋友您好，新店开业！")
    preview = build_preview(synced.db, c, now=NOW)
    assert preview.problems() == []
    assert preview.missing == {}
    assert len(preview.recipients) == total
    texts = {r.contact_id: r.text for r in preview.recipients}
    assert all(texts[cid].startswith("您所在城市") for cid in lacking)


def test_on_missing_field_skip_excludes_with_the_reason(synced: Synced, tmp_path: Path) -> None:
    """`on_missing_field: skip` leaves out recipients lacking the field, with a reason naming it."""
    lacking, total = reachable_lacking(synced.views, "city")
    c = campaign(tmp_path, "{{ city }}的朋友您好！", extra="  on_missing_field: skip\n")
    preview = build_preview(synced.db, c, now=NOW)
    assert preview.problems() == []
    assert len(preview.recipients) == total - len(lacking)
    skipped = {e.contact_id: e for e in preview.excluded if e.category == "missing_field"}
    assert sorted(skipped) == sorted(lacking)
    assert all("city" in e.reason for e in skipped.values())
    assert all(e.recorded for e in skipped.values())


def test_two_missing_fields_are_both_reported(synced: Synced, tmp_path: Path) -> None:
    """A template using two fields that some lack reports each field with its own count."""
    no_city, total = reachable_lacking(synced.views, "city")
    no_alias, _ = reachable_lacking(synced.views, "alias")
    c = campaign(tmp_path, "{{ alias }}（{{ city }}）您好")
    preview = build_preview(synced.db, c, now=NOW)
    assert sorted(preview.missing["city"]) == sorted(no_city)
    assert sorted(preview.missing["alias"]) == sorted(no_alias)
    message = str(preview.problems()[0])
    assert f"'city' is missing for {len(no_city)} of {total}" in message
    assert f"'alias' is missing for {len(no_alias)} of {total}" in message


# -- wecast validate ---------------------------------------------------------------------------------


def write_config(folder: Path, synced: Synced, campaigns_dir: Path) -> Path:
    path = folder / "config.yaml"
    path.write_text(
        f"version: 1\ndatabase_url: '{synced.db_url}'\ncampaigns_dir: '{campaigns_dir}'\n"
        f"sandbox:\n  state_file: '{synced.state_file}'\n",
        encoding="utf-8",
    )
    return path


def validate(config: Path, *paths: Path) -> Any:
    return CliRunner().invoke(
        main,
        ["-c", str(config), "validate", *map(str, paths)],
        env={"WECAST_CONFIG": None, "WECAST_DATABASE_URL": None},
    )


def test_validate_reports_a_bad_campaign_with_file_line_field(synced: Synced, tmp_path: Path) -> None:
    """`wecast validate` exits 2 and prints file:line: field: reason for an invalid campaign."""
    folder = tmp_path / "campaigns"
    folder.mkdir()
    bad = folder / "bad.yaml"
    bad.write_text("name: 坏活动\naudience:\n  tag_any: [VIP]\nmessage:\n  template: 你好\n", encoding="utf-8")
    (folder / "good.yaml").write_text("name: 好活动\naudience: {}\nmessage:\n  template: 你好\n", encoding="utf-8")
    result = validate(write_config(tmp_path, synced, folder))
    assert result.exit_code == 2, result.output
    assert f"{bad}:3: audience.tag_any: unknown field" in re.sub(r"\s*\n\s*", "", result.stderr)
    assert "good.yaml" in result.stdout
    assert "Traceback" not in result.output


def test_validate_checks_templates_against_contacts(synced: Synced, tmp_path: Path) -> None:
    """With synced contacts, validate fails a template field some recipients lack, naming it and the count."""
    folder = tmp_path / "campaigns"
    folder.mkdir()
    c = campaign(folder, "{{ city }}您好")
    lacking, total = reachable_lacking(synced.views, "city")
    result = validate(write_config(tmp_path, synced, folder))
    assert result.exit_code == 2, result.output
    stderr = re.sub(r"\s*\n\s*", " ", result.stderr)
    assert f"{c.file}:5: message.template:" in stderr
    assert f"'city' is missing for {len(lacking)} of {total} recipients" in stderr


def test_validate_passes_the_shipped_examples(synced: Synced, tmp_path: Path) -> None:
    """The example campaigns in campaigns/ validate cleanly (exit 0), also against the demo contacts."""
    config = write_config(tmp_path, synced, REPO / "campaigns")
    result = validate(config)
    assert result.exit_code == 0, result.output
    for name in ("weekly_vip", "store_opening_hz", "new_customer_care", "new_year_greeting"):
        assert name in result.stdout
    explicit = validate(config, REPO / "campaigns" / "weekly_vip.yaml")
    assert explicit.exit_code == 0, explicit.output
