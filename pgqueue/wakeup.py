"""`Wakeup`: what the worker's lease loop sleeps on between looks at the queue."""

from __future__ import annotations

import asyncio


class Wakeup:
    """An event the lease loop sleeps on, with a timeout but no Task.

    ``asyncio.wait_for(event.wait(), t)`` makes a Task per sleep; on the path
    from NOTIFY to a leased job that was a measurable part of pickup latency.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float) -> None:
        """Return when set, or after ``timeout`` seconds."""
        if self._set:
            return
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
