"""The API documentation pages work without the internet: /docs and /redoc load their scripts and styles from
`wecast serve` itself (the fastapi-offline wheel's copies), never from a CDN."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from web_harness import LiveServer, make_settings


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer(make_settings(tmp_path_factory.mktemp("docs"))) as server:
        yield server


REFERENCE = re.compile(
    r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*['"]([^'"]+)['"]|(?:spec-url)\s*=\s*["']([^"']+)["']"""
)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_references_only_this_server(live: LiveServer, page: str) -> None:
    """Every script, style, icon and spec the page loads is on this server, and each of them answers 200."""
    client = live.client
    answer = client.get(page)
    assert answer.status_code == 200
    html = answer.text
    loaded = [next(g for g in m.groups() if g) for m in REFERENCE.finditer(html)]
    assert loaded, html
    base = str(client.base_url) + page
    for ref in loaded:
        url = urljoin(base, ref)
        assert urlsplit(url).netloc == client.base_url.netloc.decode(), f"{page} loads {ref} from another host"
        assert client.get(url).status_code == 200, url
    # No host at all beyond this one appears as a URL in the page (fonts, CDNs, analytics).
    assert not re.search(r"https?://(?!127\.0\.0\.1|localhost)", html), html
    assert any(ref.endswith((".js",)) for ref in loaded)


def test_assets_ship_in_the_installed_wheel() -> None:
    """The assets are files of an installed package (a wheel dependency), so an offline install has them."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"
    assert (static / "swagger-ui-bundle.js").stat().st_size > 100_000
    assert (static / "redoc.standalone.js").stat().st_size > 100_000
