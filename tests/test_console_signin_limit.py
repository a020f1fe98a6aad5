"""The console's sign-in limits wrong API keys per client address (engine.web.attempts): five within ten minutes,
then 429 with Retry-After and a translated message, without the key being checked; other addresses are not
affected; the key and the guesses are never logged. Over real HTTP (uvicorn on loopback, clients bound to
127.0.0.1 and 127.0.0.2)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import httpx
import pytest

from engine.web.attempts import FailedAttempts
from engine.web.sessions import COOKIE

try:
    from web_harness import LiveServer, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, make_settings

KEY = "signin-limit-key-0123456789abcdef"
GUESSES = [f"guess-{i}-not-the-key" for i in range(8)]


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory, clock: Clock) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("signin-limit")
    settings = make_settings(root, api={"key": KEY})
    attempts = FailedAttempts(limit=5, window=600, now=clock)
    with LiveServer(settings, require_key=True, loopback_only=False, scheduler=False, signin_attempts=attempts) as live:
        yield live


def browser(server: LiveServer, address: str = "127.0.0.1") -> tuple[httpx.Client, str]:
    """A client connecting from `address`, with the sign-in page's CSRF token."""
    client = httpx.Client(base_url=server.url, timeout=30, transport=httpx.HTTPTransport(local_address=address))
    found = re.search(r'"X-CSRF-Token": "([0-9a-f]+)"', client.get("/console/signin").text)
    assert found
    return client, found.group(1)


def sign_in(client: httpx.Client, token: str, key: str, lang: str = "") -> httpx.Response:
    return client.post(
        "/console/signin" + (f"?lang={lang}" if lang else ""),
        json={"key": key, "next": "/console/campaigns"},
        headers={"x-csrf-token": token, "hx-request": "true"},
    )


def test_five_wrong_keys_then_429_until_the_window_passes(
    server: LiveServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Five wrong keys answer 401; then every attempt from that address — the right key too — is 429 with
    Retry-After and says in Chinese (or English) how long to wait, and sets no session; another address still
    signs in; ten minutes after the first wrong key the right one works again. Neither the key nor a guess is
    ever logged."""
    caplog.set_level(logging.DEBUG)
    client, token = browser(server)
    try:
        for guess in GUESSES[:5]:
            clock.now += 10
            assert sign_in(client, token, guess).status_code == 401
        refused = sign_in(client, token, KEY)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(600 - 40)
        assert "错误密钥次数过多" in refused.text and "10 分钟后再试" in refused.text
        assert COOKIE not in refused.headers.get("set-cookie", "")
        english = sign_in(client, token, GUESSES[5], lang="en")
        assert english.status_code == 429
        assert "Too many wrong keys from your address: try again in 10 minutes." in english.text
        assert client.get("/api/v1/contacts").status_code == 401  # no session was given

        other, other_token = browser(server, "127.0.0.2")
        try:
            assert sign_in(other, other_token, KEY).status_code == 204
            assert other.get("/api/v1/contacts").status_code == 200
        finally:
            other.close()

        clock.now += 600 - 40 - 1
        almost = sign_in(client, token, KEY)
        assert almost.status_code == 429 and almost.headers["retry-after"] == "1"
        clock.now += 1
        assert sign_in(client, token, KEY).status_code == 204
        assert client.get("/api/v1/contacts").status_code == 200
    finally:
        client.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("5 wrong API keys from 127.0.0.1" in w for w in warnings), warnings
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in logged
    assert not any(g in logged for g in GUESSES)


def test_the_right_key_clears_the_failures(server: LiveServer, clock: Clock) -> None:
    """Four wrong keys, then the right one: the count starts again, so four more wrong keys are still only 401s;
    the fifth in a row brings the 429."""
    first, token = browser(server)
    try:
        for guess in GUESSES[:4]:
            assert sign_in(first, token, guess).status_code == 401
        assert sign_in(first, token, KEY).status_code == 204
    finally:
        first.close()
    again, token = browser(server)  # the same address, a new browser session
    try:
        for guess in GUESSES[:5]:
            assert sign_in(again, token, guess).status_code == 401
        assert sign_in(again, token, GUESSES[6]).status_code == 429
    finally:
        again.close()


def test_failed_attempts_slide_and_stay_bounded() -> None:
    """Failures older than the window no longer count (one at a time, as they age), and only the most recent
    `max_addresses` addresses are remembered."""
    now = [0.0]
    attempts = FailedAttempts(limit=3, window=100, max_addresses=2, now=lambda: now[0])
    for t in (0, 10, 20):
        now[0] = t
        attempts.failed("a")
    assert attempts.retry_after("a") == 80
    now[0] = 100  # the first failure has left the window
    assert attempts.retry_after("a") is None
    assert attempts.failed("a") == 3 and attempts.retry_after("a") == 10
    attempts.failed("b")
    attempts.failed("c")  # "a" failed least recently: forgotten
    assert attempts.retry_after("a") is None
    assert attempts.failed("a") == 1


def test_wrong_bearer_keys_count_too(server: LiveServer, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """The Authorization header is no way around the limit: five wrong Bearer keys from an address, and every
    request presenting a key from there — the right one too — is 429 with Retry-After, and so is the console's
    sign-in (one limit); requests without a key are answered as before, other addresses are not affected."""
    caplog.set_level(logging.DEBUG)
    api = httpx.Client(base_url=server.url, timeout=30)
    try:
        for guess in GUESSES[:5]:
            assert api.get("/api/v1/contacts", headers={"authorization": f"Bearer {guess}"}).status_code == 401
        refused = api.get("/api/v1/contacts", headers={"authorization": f"Bearer {KEY}"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "600"
        assert "too many wrong API keys" in refused.json()["error"]
        assert api.get("/healthz").status_code == 200
        assert api.get("/api/v1/contacts").status_code == 401  # no key presented: the usual answer
    finally:
        api.close()
    browser_client, token = browser(server)
    try:
        assert sign_in(browser_client, token, KEY).status_code == 429
    finally:
        browser_client.close()
    other = httpx.Client(base_url=server.url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    try:
        assert other.get("/api/v1/contacts", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        other.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "5 wrong API keys from 127.0.0.1" in logged
    assert KEY not in logged and not any(g in logged for g in GUESSES)
