"""A media URL cannot reach inside the network (engine.gateways.fetch): what the wecom gateway fetches for an image,
file or cover given by URL it uploads and sends to customers, so loopback, private, link-local and metadata
addresses are refused before any connection — by name, by literal and behind a redirect — and only https is
fetched. Real servers on loopback stand in for the internet where a test needs one to answer."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from engine.errors import PermanentError
from engine.gateways.fetch import IPAddress, fetch_public, is_public
from engine.messages import ImagePart, Media, Message

try:
    from wecom_harness import running
except ImportError:  # pragma: no cover
    from tests.wecom_harness import running

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Listener:
    """A loopback HTTP server that records every connection and answers each request with `reply(path)`."""

    def __init__(self, reply: Callable[[str], bytes]) -> None:
        self.reply = reply
        self.connections = 0
        self.paths: list[str] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.paths.append(path)
                writer.write(self.reply(path))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def listening(reply: Callable[[str], bytes], host: str = "127.0.0.1") -> AsyncIterator[tuple[Listener, int]]:
    listener = Listener(reply)
    server = await asyncio.start_server(listener._serve, host, 0)
    try:
        yield listener, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def answer(status: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


SECRET = b"internal-only: db password hunter2"


def only(*allowed: str) -> Callable[[IPAddress], bool]:
    """An address policy for tests: these loopback addresses stand in for the public internet."""
    return lambda address: address in {ipaddress.ip_address(a) for a in allowed}


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:{port}/secret",
        "https://localhost:{port}/secret",  # a name that resolves to loopback
        "https://[::1]:{port}/secret",
        "https://[::ffff:127.0.0.1]:{port}/secret",  # IPv4-mapped IPv6
        "https://0x7f000001:{port}/secret",  # 127.0.0.1 written as one hexadecimal number
        "https://2130706433:{port}/secret",  # ... and as one decimal number
        "https://169.254.169.254/latest/meta-data/iam/security-credentials/",  # a cloud's metadata service
        "https://10.0.0.5/admin",
        "https://192.168.1.1/",
        "https://100.64.0.1/",  # shared address space (carrier-grade NAT)
        "https://0.0.0.0:{port}/secret",
    ],
)
async def test_an_internal_address_is_refused_before_any_connection(url: str) -> None:
    """A media URL whose host is (or resolves to) an internal address is refused, naming the reason, and nothing
    connects to it."""
    async with listening(lambda _: answer("200 OK", SECRET)) as (listener, port):
        with pytest.raises(PermanentError, match="internal address"):
            await fetch_public(url.format(port=port), 1_000_000)
        assert listener.connections == 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/secret", "file:///etc/passwd", "ftp://127.0.0.1/x", "//x/y"])
async def test_only_https_is_fetched(url: str) -> None:
    """Any scheme but https is refused without a connection (here even to an address the policy allows)."""
    async with listening(lambda _: answer("200 OK", SECRET)) as (listener, port):
        with pytest.raises(PermanentError, match="must be https"):
            await fetch_public(url.format(port=port), 1_000_000, allow=only("127.0.0.1"))
        assert listener.connections == 0


async def test_a_redirect_into_the_network_is_refused() -> None:
    """A server the policy allows (127.0.0.1 standing in for the internet) that redirects to an internal one
    (127.0.0.2) gets no further: the redirect's target is checked as the first URL was, and never reached."""
    async with listening(lambda _: answer("200 OK", SECRET), host="127.0.0.2") as (inside, inside_port):
        target = f"http://127.0.0.2:{inside_port}/secret"
        async with listening(lambda _: answer("302 Found", Location=target)) as (outside, port):
            with pytest.raises(PermanentError, match="internal address"):
                await fetch_public(
                    f"http://127.0.0.1:{port}/poster.png", 1_000_000, allow=only("127.0.0.1"), schemes=("http",)
                )
            assert outside.paths == ["/poster.png"]
        assert inside.connections == 0


async def test_redirects_that_stay_outside_are_followed_a_few_times() -> None:
    """Redirects to allowed addresses are followed (a CDN's usual answer), relative ones included, up to five;
    a sixth is refused."""

    def reply(path: str) -> bytes:
        hop = int(path.rsplit("/", 1)[1])
        return answer("200 OK", b"\x89PNG poster") if hop == 0 else answer("302 Found", Location=f"/hop/{hop - 1}")

    async with listening(reply) as (listener, port):
        got = await fetch_public(f"http://127.0.0.1:{port}/hop/5", 1_000, allow=only("127.0.0.1"), schemes=("http",))
        assert got == b"\x89PNG poster"
        assert listener.paths == [f"/hop/{n}" for n in range(5, -1, -1)]
        with pytest.raises(PermanentError, match="more than 5 redirects"):
            await fetch_public(f"http://127.0.0.1:{port}/hop/6", 1_000, allow=only("127.0.0.1"), schemes=("http",))


async def test_the_request_names_the_host_it_was_given() -> None:
    """The connection goes to the address that was checked, and the request still carries the URL's own host name
    (a server of many sites answers by it)."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer("200 OK", b"ok"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        got = await fetch_public(f"http://localhost:{port}/a.png", 100, allow=only("127.0.0.1"), schemes=("http",))
    finally:
        server.close()
        await server.wait_closed()
    assert got == b"ok"
    assert f"host: localhost:{port}".encode() in seen[0].lower()


def test_public_addresses_are_public() -> None:
    """The policy lets the internet through: public IPv4 and IPv6 addresses pass, the rest do not."""
    assert is_public(ipaddress.ip_address("93.184.216.34"))
    assert is_public(ipaddress.ip_address("2606:2800:220:1:248:1893:25c8:1946"))
    for inside in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "169.254.169.254", "::1", "fe80::1", "fd00::1", "224.0.0.1"):
        assert not is_public(ipaddress.ip_address(inside)), inside


async def test_the_wecom_gateway_never_fetches_an_internal_url(tmp_path: Path) -> None:
    """An image part given as a URL to a loopback service: the 群发 task fails for good with the reason, nothing
    connects to the service, nothing is uploaded to WeCom and no task is submitted."""
    async with listening(lambda _: answer("200 OK", b"\x89PNG\r\n\x1a\n" + SECRET)) as (listener, port):
        image = Media("poster.png", url=f"https://127.0.0.1:{port}/poster.png")
        async with running(tmp_path, customers=3, staff=1) as r:
            ids = r.fake.customers_of("zhangwei")
            with pytest.raises(PermanentError, match="internal address"):
                await r.gateway.submit_batch(ids, Message((ImagePart(image),)), idempotency_key="x", sender="zhangwei")
            assert r.fake.calls["media/upload"] == 0
            assert r.fake.calls["externalcontact/add_msg_template"] == 0
        assert listener.connections == 0
