"""The loopback default is not an open door (issue 7 item 7): a page the operator visits cannot change anything
through the browser (Origin and Sec-Fetch-Site checks, JSON bodies only), DNS rebinding is refused (Host
check), and an API key of whitespace is refused at start. Clients that are not browsers (curl) are unaffected."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web_harness import MANUAL, LiveServer, login, make_settings

from engine.errors import ConfigError
from engine.gateways.sandbox import SandboxGateway
from engine.settings import load_settings
from storage.runs import list_runs


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root: Path = tmp_path_factory.mktemp("security")
    settings = make_settings(root)
    (root / "campaigns" / "new_customers.yaml").write_text(MANUAL, encoding="utf-8")
    with LiveServer(settings) as server:
        login(server.client)
        # The scheduler syncs contacts after a login in the background; sync now, so the tests never race it.
        server.client.post("/api/v1/contacts/sync").raise_for_status()
        yield server


def runs_planned(live: LiveServer) -> int:
    return len(list_runs(live.app.db, campaign_id="new_customers"))


def outbox_size(live: LiveServer) -> int:
    gateway = live.app.gateway
    assert isinstance(gateway, SandboxGateway)
    return len(gateway.outbox_messages())


def a_contact(live: LiveServer) -> str:
    return str(live.client.get("/api/v1/contacts", params={"friend": True, "limit": 1}).json()["items"][0]["id"])


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "http://127.0.0.1:1"},  # another port is another origin
        {"Origin": "null"},  # sandboxed frames, files
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_a_cross_site_request_changes_nothing(live: LiveServer, headers: dict[str, str]) -> None:
    """A state-changing request a web page makes (any other Origin, `null`, or marked cross-site by the browser) is
    refused with 403 before it runs: no run is planned, nothing is sent, the account stays logged in."""
    before_runs, before_sent = runs_planned(live), outbox_size(live)
    for method, path, body in (
        ("POST", "/api/v1/campaigns/new_customers/run", None),
        ("POST", "/send-message", {"id": a_contact(live), "message": "hi"}),
        ("POST", "/goEnd", None),
    ):
        answer = live.client.request(method, path, json=body, headers=headers)
        assert answer.status_code == 403, (path, answer.text)
        assert "cannot change anything" in answer.json()["error"]
    assert runs_planned(live) == before_runs and outbox_size(live) == before_sent
    assert live.client.get("/api/v1/login").json()["state"] == "logged_in"


def test_the_servers_own_pages_and_curl_may_change_things(live: LiveServer) -> None:
    """A request from this server's own origin, and one without an Origin (curl, scripts), go through."""
    contact = a_contact(live)
    own = live.client.post("/send-message", json={"id": contact, "message": "来自本页"}, headers={"Origin": live.url})
    assert own.status_code == 200, own.text
    plain = live.client.post("/send-message", json={"id": contact, "message": "来自 curl"})
    assert plain.status_code == 200, plain.text


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"id": "X", "message": "hi"}'),  # what a form or fetch() sends without a preflight
        ("application/x-www-form-urlencoded", b"id=X&message=hi"),
        (None, b'{"id": "X", "message": "hi"}'),  # a typeless Blob
    ],
)
def test_bodies_are_read_only_as_declared_json(live: LiveServer, content_type: str | None, body: bytes) -> None:
    """A body without `Content-Type: application/json` is refused with 415 and nothing is sent: what a page can
    post cross-site without a CORS preflight is never read as JSON."""
    before = outbox_size(live)
    headers = {"Content-Type": content_type} if content_type else {}
    content = body.replace(b"X", a_contact(live).encode())
    request = live.client.build_request("POST", "/send-message", content=content, headers=headers)
    assert request.headers.get("content-type") == content_type
    answer = live.client.send(request)
    assert answer.status_code == 415, answer.text
    assert "Content-Type: application/json" in answer.json()["error"]
    assert outbox_size(live) == before


@pytest.mark.parametrize("host", ["evil.example:9898", "wecast.rebind.example", "192.168.1.5:9898", ""])
def test_a_forged_host_is_refused_on_loopback(live: LiveServer, host: str) -> None:
    """On the loopback default a request must name a loopback host: DNS rebinding (a page whose name resolves to
    127.0.0.1) sends its own name and gets 421, for reads and writes alike; loopback names of any form pass."""
    with httpx.Client(base_url=live.url, timeout=10) as client:
        for method, path in (("GET", "/api/v1/contacts"), ("POST", "/goEnd")):
            request = client.build_request(method, path)
            request.headers["Host"] = host
            answer = client.send(request)
            assert answer.status_code == 421, (host, path, answer.text)
        for ok in (f"127.0.0.1:{live.port}", f"localhost:{live.port}", "127.0.0.2", "[::1]:9898"):
            request = client.build_request("GET", "/healthz")
            request.headers["Host"] = ok
            assert client.send(request).status_code == 200, ok
    assert live.client.get("/api/v1/login").json()["state"] == "logged_in"


def test_beyond_loopback_any_host_is_served_behind_the_key(tmp_path: Path) -> None:
    """Bound beyond loopback (with a key, as serve requires), the Host is not checked: the machine's names and
    addresses all work, and the key guards every endpoint but /healthz."""
    settings = make_settings(tmp_path, api={"key": "k-123456"})
    with LiveServer(settings, require_key=True, loopback_only=False, scheduler=False) as server:
        headers = {"Host": "wecast.internal:9898"}
        assert server.client.get("/healthz", headers=headers).status_code == 200
        assert server.client.get("/api/v1/login", headers=headers).status_code == 401
        auth = {**headers, "Authorization": "Bearer k-123456"}
        assert server.client.get("/api/v1/login", headers=auth).status_code == 200


@pytest.mark.parametrize("where", ["env", "file"])
def test_a_whitespace_api_key_is_refused_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """An API key of only whitespace (an empty secret, a stray newline) is a config error naming api.key, not a
    key that matches an empty header; a key with a trailing newline is used without it."""
    cfg = tmp_path / "config.yaml"
    if where == "env":
        cfg.write_text("version: 1\n", encoding="utf-8")
        monkeypatch.setenv("WECAST_API_KEY", " \n")
    else:
        cfg.write_text('version: 1\napi:\n  key: "   "\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"api\.key.*empty or only whitespace"):
        load_settings(cfg)
    monkeypatch.setenv("WECAST_API_KEY", "s3cret\n")
    cfg.write_text("version: 1\n", encoding="utf-8")
    key = load_settings(cfg).api.key
    assert key is not None and key.get_secret_value() == "s3cret"


def _raw(live: LiveServer, head: bytes, chunks: Iterator[bytes] = iter(())) -> tuple[int, bytes]:
    """Send `head` (and then `chunks`, as long as the server reads them) on a socket of its own; the answer's status
    and body."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=20) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed: what it said is still to be read
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_body_announced_over_the_limit_is_refused_unread(live: LiveServer) -> None:
    """A request whose Content-Length is over the limit (here 100 GB) is answered 413 at once, before any of its
    body is sent: the server never waits for it, never holds it in memory."""
    head = (
        b"POST /send-message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000000\r\n\r\n"
    )
    started = time.monotonic()
    status, body = _raw(live, head)
    assert status == 413, body
    assert json.loads(body)["code"] == "too_large"
    assert time.monotonic() - started < 5
    assert live.client.get("/healthz").status_code == 200


def test_a_streamed_body_is_stopped_at_the_limit(live: LiveServer) -> None:
    """A body sent without a length (chunked) is refused with 413 once it passes the limit; the rest of it is not
    read, and nothing is sent."""
    before = outbox_size(live)
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'8\r\n{"id": "\r\n'
        piece = b"a" * (1024 * 1024)
        for _ in range(64):
            sent += len(piece)
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b'2\r\n"}\r\n0\r\n\r\n'

    head = (
        b"POST /send-message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    status, body = _raw(live, head, chunks())
    assert status == 413, body[:300]
    assert sent < 40 * 1024 * 1024  # stopped well before the 64 MB were all sent
    assert outbox_size(live) == before
    assert live.client.get("/healthz").status_code == 200


def test_the_largest_body_the_api_takes_fits_the_limit(live: LiveServer) -> None:
    """A /send-message-all to 100,000 ids (its documented maximum) of 64 characters each is read and answered as
    usual, not refused for its size."""
    ids = [f"wm{i:062d}" for i in range(100_000)]
    answer = live.client.post("/send-message-all", json={"ids": ids, "message": "hi"})
    assert answer.status_code == 404, answer.text[:300]  # none of them is a contact: read, looked up, answered
    assert answer.json()["code"] == "not_found"


NUL_REQUESTS = [
    ("POST", "/send-message", {"id": "abc\u0000def", "message": "hi"}, "id"),
    ("POST", "/send-message-all", {"ids": ["ok", "a\u0000"], "message": "hi"}, "ids.1"),
    ("POST", "/get-all-user", {"cursor": "a\u0000"}, "cursor"),
    ("GET", "/api/v1/contacts?q=%00", None, "q"),
    ("GET", "/api/v1/contacts?tag=VIP&tag=%00", None, "tag"),
    ("GET", "/api/v1/contacts/a%00b", None, "contact_id"),
    ("GET", "/api/v1/deliveries?contact_id=a%00b", None, "contact_id"),
    ("GET", "/api/v1/runs?campaign=a%00b", None, "campaign"),
    ("GET", "/api/v1/contacts/a%00/journeys", None, "contact_id"),
    ("PUT", "/api/v1/contacts/a%00/optout", {"note": "x"}, "contact_id"),
    ("PUT", "/api/v1/contacts/a/optout", {"note": "x\u0000"}, "note"),
    ("GET", "/console/customers?q=%00", None, "q"),
    ("GET", "/console/customers/a%00b", None, "contact_id"),
]


def test_a_nul_character_anywhere_is_a_bad_request_on_both_databases(tmp_path: Path, db_url: str) -> None:
    """A NUL (U+0000) in a path, a query parameter or a JSON string is a 422 naming the field, on SQLite and on
    PostgreSQL alike (whose text cannot hold one: a NUL reaching a query was a 500 there); nothing is sent, and an
    escaped backslash before "u0000" is only text."""
    with LiveServer(make_settings(tmp_path, database_url=db_url), scheduler=False) as server:
        login(server.client)
        for method, path, body, field in NUL_REQUESTS:
            answer = server.client.request(method, path, json=body)
            assert answer.status_code == 422, (path, answer.text)
            assert answer.json()["code"] == "invalid_request" and answer.json()["field"] == field, answer.text
            assert "U+0000" in answer.json()["error"]
        assert outbox_size(server) == 0
        literal = server.client.post("/send-message", json={"id": "no-such-\\u0000", "message": "hi"})
        assert literal.status_code == 404, literal.text  # the text \u0000, not a NUL: an id like any other


def test_ids_beyond_what_the_database_holds_are_refused_on_both_databases(tmp_path: Path, db_url: str) -> None:
    """A run or delivery id past the largest the database holds (PostgreSQL's integer) is a 422 naming the field —
    it was a 500 on PostgreSQL — while the largest one is looked up as usual (and is not found)."""
    from storage.models import MAX_ID

    with LiveServer(make_settings(tmp_path, database_url=db_url), scheduler=False) as server:
        for path in (
            f"/api/v1/runs/{MAX_ID + 1}",
            f"/api/v1/deliveries?run_id={MAX_ID + 1}",
            f"/console/runs/{MAX_ID + 1}",
            f"/console/deliveries?before={MAX_ID + 1}",
        ):
            answer = server.client.get(path)
            assert answer.status_code == 422, (path, answer.text)
        assert server.client.get(f"/api/v1/runs/{MAX_ID}").status_code == 404
        assert server.client.get(f"/api/v1/deliveries?run_id={MAX_ID}").json() == {"deliveries": []}
        assert server.client.get(f"/console/runs/{MAX_ID}").status_code == 404
