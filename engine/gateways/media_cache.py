"""Media files read once per gateway, not once per recipient.

A campaign sends the same 5 MB poster to 10,000 customers: a gateway reads the file once, checks it is the file
that was validated (its sha256), turns it into what it sends (WorkPro on a server without Upload: a FileBox JSON
with the content as base64; the sandbox: the content's hash and size) and keeps that by content, so every later
send reuses it. Entries are kept least-recently-used first out, within `max_bytes`; reading and encoding run in a
worker thread, so the event loop never waits on the disk; concurrent sends of one file wait for the same read.

Sending is the other half: every request carrying a file inline is a copy of it (WorkPro: the FileBox string in
the protobuf message, its serialized bytes, gRPC's own buffer — about 20 MB for a 5 MB image), so `InFlight`
bounds how many such bytes are in flight at once, whatever the dispatcher's concurrency: a 5 MB poster goes one
request at a time while small files and cards still go side by side.

WorkPro's Upload keeps the bytes as read (`MediaContent`) and streams slices of them per send: one copy of the
file, however many recipients.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.errors import PermanentError
from engine.messages import Media

T = TypeVar("T")
DEFAULT_MAX_BYTES = 128 * 1024 * 1024  # a few posters and price lists, encoded


@dataclass(frozen=True)
class MediaContent:
    """A local media file as read: its bytes, and their sha256 (checked against the declared one)."""

    data: bytes
    sha256: str


def read_media(media: Media, limit: int) -> MediaContent:
    """Read a local media file, refusing it (PermanentError) if it is missing, not a regular file, over `limit`
    bytes, empty, or not the content that was checked (its declared sha256)."""
    if media.path is None:
        raise PermanentError(f"{media.name} is a URL, not a local file")
    try:
        if not media.path.is_file():
            raise PermanentError(f"the file {media.name} is missing or not a regular file ({media.path})")
        size = media.path.stat().st_size
        if size > limit:
            raise PermanentError(f"the file {media.name} is {size:,} bytes, over the limit of {limit:,}")
        data = media.read()
    except OSError as exc:
        raise PermanentError(f"cannot read the file {media.name}: {exc.strerror or exc}") from None
    if not data:
        raise PermanentError(f"the file {media.name} is empty")
    if len(data) > limit:  # it grew after the size check
        raise PermanentError(f"the file {media.name} is {len(data):,} bytes, over the limit of {limit:,}")
    digest = hashlib.sha256(data).hexdigest()
    if media.sha256 and digest != media.sha256:
        raise PermanentError(f"the file {media.name} changed after it was checked (its sha256 differs)")
    return MediaContent(data, digest)


class MediaCache(Generic[T]):
    """One encoded form of each local media file, kept by content. `encode` turns what was read into what the
    gateway sends; `weigh` says how many bytes that keeps in memory."""

    def __init__(
        self,
        encode: Callable[[Media, MediaContent], T],
        weigh: Callable[[T], int],
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._encode = encode
        self._weigh = weigh
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[T, int]] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Future[T]] = {}
        self._bytes = 0
        self.reads = 0  # files read from disk so far (what "read once" is measured by)

    @staticmethod
    def _key(media: Media) -> tuple[str, str]:
        # The name travels with the content (a FileBox carries it), so the same poster under two names is two
        # entries; without a declared hash the path stands in for the content.
        return (media.sha256 or f"path:{media.path}", media.name)

    async def get(self, media: Media, limit: int) -> T:
        """The encoded form of `media` (a local file of at most `limit` bytes), read at most once while cached."""
        key = self._key(media)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry[0]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await asyncio.to_thread(self._load, media, limit)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: a read nobody else waited for must not warn at exit
            raise
        finally:
            del self._pending[key]
        future.set_result(value)
        self._store(key, value)
        return value

    def _load(self, media: Media, limit: int) -> T:
        content = read_media(media, limit)
        self.reads += 1
        return self._encode(media, content)

    def _store(self, key: tuple[str, str], value: T) -> None:
        weight = self._weigh(value)
        self._entries[key] = (value, weight)
        self._bytes += weight
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped


DEFAULT_IN_FLIGHT_BYTES = 8 * 1024 * 1024  # one 5 MB image's FileBox (6.7 MB of base64) at a time


class InFlight:
    """At most `limit` bytes of requests in flight at once; a request bigger than that goes alone. Released
    synchronously, so a cancelled send never holds its share."""

    def __init__(self, limit: int = DEFAULT_IN_FLIGHT_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most bytes ever in flight at once (what the bound is checked by)
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int, timeout: float | None = None) -> None:
        """Wait until `n` more bytes fit (or nothing else is in flight), then count them in. Raises TimeoutError
        after `timeout` seconds of waiting, having taken nothing."""
        async with asyncio.timeout(timeout):
            while not self._fits(n):
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        """Count `n` bytes out and let the waiting requests look again."""
        self.used -= n
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
