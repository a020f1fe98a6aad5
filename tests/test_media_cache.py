"""The gateways' media cache (`engine.gateways.media_cache`): each file read once per content, checked against
the hash it was validated with, kept within a memory bound."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from engine.errors import PermanentError
from engine.gateways.media_cache import InFlight, MediaCache, MediaContent
from engine.messages import Media

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def media(folder: Path, name: str, data: bytes) -> Media:
    path = folder / name
    path.write_bytes(data)
    return Media(name=name, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def length_cache(max_bytes: int = 1 << 20) -> MediaCache[int]:
    return MediaCache(lambda _m, content: len(content.data), lambda n: n, max_bytes)


async def test_concurrent_sends_read_once(tmp_path: Path) -> None:
    """Fifty sends of one file at once wait for one read."""
    cache = length_cache()
    poster = media(tmp_path, "poster.png", b"\x89PNG" + b"x" * 5000)
    sizes = await asyncio.gather(*(cache.get(poster, 10_000) for _ in range(50)))
    assert set(sizes) == {5004}
    assert cache.reads == 1


async def test_refusals(tmp_path: Path) -> None:
    """Missing, over the limit, empty, or changed since it was checked: a PermanentError each, and nothing kept."""
    cache = length_cache()
    with pytest.raises(PermanentError, match="missing"):
        await cache.get(Media(name="gone.png", path=tmp_path / "gone.png"), 10)
    big = media(tmp_path, "big.png", b"x" * 11)
    with pytest.raises(PermanentError, match="over the limit"):
        await cache.get(big, 10)
    with pytest.raises(PermanentError, match="empty"):
        await cache.get(media(tmp_path, "empty.png", b""), 10)
    changed = media(tmp_path, "changed.png", b"before")
    (tmp_path / "changed.png").write_bytes(b"after!")
    with pytest.raises(PermanentError, match="changed"):
        await cache.get(changed, 10)
    assert cache.reads == 0


async def test_bounded_least_recently_used(tmp_path: Path) -> None:
    """Past `max_bytes` the least recently used entry goes (and is read again when asked for)."""
    cache = length_cache(max_bytes=250)
    a, b, c = (media(tmp_path, f"{n}.bin", n.encode() * 100) for n in "abc")
    await cache.get(a, 1000)
    await cache.get(b, 1000)
    await cache.get(a, 1000)  # a is now the most recent
    await cache.get(c, 1000)  # over 250 bytes: b goes
    assert cache.reads == 3
    await cache.get(a, 1000)
    assert cache.reads == 3
    await cache.get(b, 1000)
    assert cache.reads == 4


async def test_encoding_sees_the_checked_content(tmp_path: Path) -> None:
    """The encoder receives the bytes and their sha256, equal to the declared one."""
    seen: list[MediaContent] = []

    def encode(_media: Media, content: MediaContent) -> str:
        seen.append(content)
        return content.sha256

    cache: MediaCache[str] = MediaCache(encode, len)
    item = media(tmp_path, "a.pdf", b"%PDF-1.4")
    assert await cache.get(item, 100) == item.sha256
    assert seen[0].data == b"%PDF-1.4"


async def _hold(bound: InFlight, n: int, seen: list[int], gate: asyncio.Event) -> None:
    await bound.acquire(n)
    try:
        seen.append(bound.used)
        await gate.wait()
    finally:
        bound.release(n)


async def test_in_flight_bytes_are_bounded() -> None:
    """Requests of 60 bytes under a 100-byte bound go one at a time, ten of 10 bytes all at once, and one bigger
    than the bound goes alone; every one of them is served."""
    for size, count, most in ((60, 5, 60), (10, 10, 100), (250, 3, 250)):
        bound = InFlight(100)
        seen: list[int] = []
        gate = asyncio.Event()
        tasks = [asyncio.create_task(_hold(bound, size, seen, gate)) for _ in range(count)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)
        assert (len(seen), bound.peak, bound.used) == (count, most, 0)


async def test_a_cancelled_wait_takes_nothing() -> None:
    """A send cancelled while it waits for room holds no share, and the others still get theirs."""
    bound = InFlight(100)
    await bound.acquire(80)
    waiting = asyncio.create_task(bound.acquire(50))
    later = asyncio.create_task(bound.acquire(50))
    await asyncio.sleep(0.01)
    waiting.cancel()
    bound.release(80)
    await later
    assert waiting.cancelled() and bound.used == 50


async def test_a_wait_for_room_has_a_limit() -> None:
    """A request that finds no room within its timeout raises TimeoutError and takes nothing."""
    bound = InFlight(100)
    await bound.acquire(80)
    with pytest.raises(TimeoutError):
        await bound.acquire(50, timeout=0.05)
    assert bound.used == 80
    bound.release(80)
    await bound.acquire(50, timeout=0.05)
    assert bound.used == 50
