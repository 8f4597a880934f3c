"""Start a coroutine at once and give it a Task only if it has to wait.

The worker uses it for its own lease calls, not for handlers: its first step
runs in the caller's Task (or in none), so ``asyncio.current_task()``, and
with it ``asyncio.timeout``, TaskGroup and anyio, would see the wrong Task.
A handler gets a Task of its own (started eagerly on Python 3.12 and later).

A worker that runs many short async handlers pays more for a Task per job
(create, schedule, step, done callback) than for the handler itself: about
14 us of CPU per job on our 2-core benchmark machine (100,000 trivial
coroutines, Python 3.11), against under 1 us for running the coroutine's
first step in place. Python 3.12's eager tasks do the same; this works on
3.10 and 3.11 too.

The first step runs in a copy of the current context, and the Task that
continues a coroutine which did suspend runs in that same copy, so a handler
sees one context from start to end, as it would in an ordinary Task.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any

_HANDED_OVER = object()  # _Continue's pending value once the Task has it


class _Continue(Coroutine[Any, Any, Any]):
    """The rest of a coroutine that already yielded ``pending``, for a Task.

    The Task's first step gets ``pending`` (the future the coroutine waits
    for); every later value the Task sends or throws goes to the coroutine
    itself: the same hand-over ``await`` does between nested coroutines. A
    throw before that first step (the Task cancelled at once) goes to the
    coroutine too, so its ``finally`` blocks run and what it holds is released;
    an ``async def`` wrapper would drop it without ever resuming the coroutine.
    """

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def send(self, value: Any) -> Any:
        pending = self._pending
        if pending is not _HANDED_OVER:
            self._pending = _HANDED_OVER
            return pending
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._pending = _HANDED_OVER
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover (old form)

    def close(self) -> None:
        self._pending = _HANDED_OVER
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        raise TypeError("pgqueue.eager continuations are driven by their Task")


def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
    """Run ``coro`` up to its first suspension, in a copy of the context.

    Returns None when the coroutine finished without suspending (its return
    value is dropped and an exception it raised propagates here), else the
    Task that runs the rest of it. Call from a running event loop.
    """
    started = future(coro)
    if isinstance(started, asyncio.Task):
        return started
    started.result()  # what it raised, raised here
    return None


def future(coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    """Like :func:`start`, but always a future: the Task, or, when ``coro``
    finished in place, a future done with its result or its exception."""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    try:
        pending = context.run(coro.send, None)
    except StopIteration as stop:
        done = loop.create_future()
        done.set_result(stop.value)
        return done
    except Exception as exc:
        done = loop.create_future()
        done.set_exception(exc)
        return done
    return _continue(coro, pending, context)


def _continue(
    coro: Coroutine[Any, Any, Any], pending: Any, context: contextvars.Context
) -> asyncio.Task[Any]:
    loop = asyncio.get_running_loop()
    # Created inside the context, the Task copies it (create_task's context=
    # argument is 3.11+).
    return context.run(loop.create_task, _Continue(coro, pending))
