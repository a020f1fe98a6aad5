"""OpenAPI-driven fuzzing with schemathesis against a real uvicorn: whatever the generated request, the
server answers without a 5xx. Bounded (a few examples per operation) to stay fast."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

try:
    from web_harness import BROKEN, CAMPAIGN, LiveServer, make_settings
except ImportError:  # pragma: no cover
    from tests.web_harness import BROKEN, CAMPAIGN, LiveServer, make_settings


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    (root / "campaigns").mkdir()
    (root / "campaigns" / "vip_daily.yaml").write_text(CAMPAIGN, encoding="utf-8")
    (root / "campaigns" / "broken.yaml").write_text(BROKEN, encoding="utf-8")
    with LiveServer(make_settings(root, sandbox={"auto_login": True}, api={"send_wait": "2s"})) as server:
        yield server


def test_no_server_errors(fuzz_server: LiveServer) -> None:
    """Any request the OpenAPI schema allows (or almost allows), on every operation, gets a non-5xx answer."""
    schema = schemathesis.openapi.from_dict(fuzz_server.client.get("/openapi.json").json())
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_server.url, timeout=30)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.body!r}: {response.status_code} {response.text[:300]}"
                )

        check()
    assert failures == []
