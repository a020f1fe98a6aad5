"""Blocking work (database calls, planning, parsing) kept off the event loop, so one slow call never stalls every
send and every HTTP answer of `wecast serve`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `fn` in a worker thread and wait for it without blocking the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class GroupCommit(Generic[T]):
    """Records from concurrent tasks written together (group commit): `await put(item)` returns once a call of
    `write(items)`, in a worker thread, has written it — or raises what that call raised. Items that arrive while
    a write runs go into the next one, so under load each write carries many items, and one write at a time is
    in flight: no two transactions of the same kind queue for SQLite's write lock, and each item costs a row, not
    a commit. A caller cancelled while it waits does not take its item back: it is written all the same."""

    def __init__(self, write: Callable[[Sequence[T]], None]) -> None:
        self._write = write
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def put(self, item: T) -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._drain())
        await written

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await off_loop(self._write, [item for item, _ in batch])
            except asyncio.CancelledError:  # the loop is closing: nobody waits any more
                for _, written in batch + self._waiting:
                    written.cancel()
                raise
            except Exception as exc:
                for _, written in batch:
                    if not written.done():
                        written.set_exception(exc)
                continue
            for _, written in batch:
                if not written.done():
                    written.set_result(None)
