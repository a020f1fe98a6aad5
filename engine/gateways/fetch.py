"""Fetching a media file a message names by URL, without letting the URL reach inside the network.

A campaign's image, file or mini-program cover may be an https URL instead of a file; the `wecom` gateway fetches
it to upload it to WeCom (`media/upload`), and what it fetched goes to customers. Whoever may write a campaign or
call the API could otherwise have wecast read what only the server can reach — `https://10.0.0.5/admin`, a
cloud's metadata at `http://169.254.169.254/` behind a redirect, a service on 127.0.0.1 — and send it out as a
file. So `fetch_public`:

* takes https URLs only, at every hop;
* resolves the host itself and refuses it unless every address is a public one (`is_public`: not loopback,
  private, link-local, shared, multicast, reserved or unspecified — IPv4-mapped IPv6 included), then connects to
  the address it checked (TLS still verifies the certificate for the host's name, via SNI), so a name that
  resolves differently the second time (DNS rebinding) cannot slip past;
* follows at most `MAX_REDIRECTS` redirects, each checked as the first URL; never uses the environment's proxy
  settings (the wecom client does not either);
* stops at `limit` bytes and at `DEADLINE` seconds in all, however slowly the server drips its answer.

Every refusal is a PermanentError saying why (a failure that may pass — no answer, a 5xx, a name that does not
resolve now — a TransientError), never with the content.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx

from engine.errors import PermanentError, TransientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_REDIRECTS = 5
DEADLINE = 60.0  # seconds for the whole fetch, redirects included
TIMEOUT = 30.0  # seconds for each connect, read and write


def is_public(address: IPAddress) -> bool:
    """Whether `address` is on the public internet (what a media URL may lead to)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def _addresses(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:
        raise PermanentError(f"the host {host!r} of a media URL is not a valid name") from None
    except OSError as exc:  # the name does not resolve now: perhaps a moment later
        raise TransientError(f"cannot resolve the host {host!r} of a media URL: {exc.strerror or exc}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in found]


async def _checked(url: str, allow: Callable[[IPAddress], bool], schemes: tuple[str, ...]) -> tuple[str, str, str]:
    """(the URL with its host replaced by the checked address, the host's name, its Host header) for `url`."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in schemes:
        raise PermanentError(f"a media URL must be {' or '.join(schemes)}, not {parts.scheme or 'without a scheme'}")
    host = parts.hostname
    if not host:
        raise PermanentError("a media URL needs a host")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise PermanentError("a media URL's port is not a number from 0 to 65535") from None
    addresses = await _addresses(host, port)
    refused = [a for a in addresses if not allow(a)]
    if refused or not addresses:
        raise PermanentError(
            f"the media URL's host {host!r} is an internal address ({refused[0] if refused else 'none'}): "
            "media URLs must lead to the public internet"
        )
    pinned = addresses[0]
    literal = f"[{pinned}]" if pinned.version == 6 else str(pinned)
    netloc = f"{literal}:{port}"
    target = parts._replace(netloc=netloc).geturl()
    authority = parts.netloc.rpartition("@")[2]  # no user:password in the Host header
    return target, host, authority


async def fetch_public(
    url: str,
    limit: int,
    *,
    name: str = "",
    allow: Callable[[IPAddress], bool] = is_public,
    schemes: tuple[str, ...] = ("https",),
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The content at `url` (at most `limit` bytes), fetched as the module docstring says. `allow`, `schemes` and
    `transport` are for tests (loopback servers standing in for the internet). Raises PermanentError."""
    what = name or url
    try:
        async with (
            asyncio.timeout(DEADLINE),
            httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False, transport=transport) as http,
        ):
            for _ in range(MAX_REDIRECTS + 1):
                target, host, authority = await _checked(url, allow, schemes)
                request = http.build_request(
                    "GET", target, headers={"Host": authority}, extensions={"sni_hostname": host}
                )
                response = await http.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code >= 500:
                        raise TransientError(f"{what}: HTTP {response.status_code} fetching the file")
                    if response.status_code != 200:
                        raise PermanentError(f"{what}: HTTP {response.status_code} fetching the file")
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise PermanentError(f"{what} is larger than {limit:,} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
                finally:
                    await response.aclose()
            raise PermanentError(f"{what}: more than {MAX_REDIRECTS} redirects fetching the file")
    except TimeoutError:
        raise TransientError(f"{what}: fetching the file took more than {DEADLINE:.0f} s") from None
    except httpx.TransportError as exc:  # could not connect, or the connection broke
        raise TransientError(f"{what}: cannot fetch the file ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise PermanentError(f"{what}: cannot fetch the file ({type(exc).__name__})") from None
