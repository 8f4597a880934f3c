"""pgqueue.eager: a coroutine runs in place until it has to wait."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from pgqueue import eager

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outer")


def test_a_coroutine_that_never_waits_finishes_without_a_task() -> None:
    ran = []

    async def handler() -> None:
        ran.append(asyncio.current_task())

    async def main() -> None:
        outer = asyncio.current_task()
        assert eager.start(handler()) is None
        assert ran == [outer]  # it ran in place, inside the caller's step

    asyncio.run(main())


def test_a_coroutine_that_waits_continues_in_a_task_with_its_result() -> None:
    steps = []

    async def handler() -> int:
        steps.append("first")
        await asyncio.sleep(0.01)
        steps.append("second")
        return 42

    async def main() -> None:
        task = eager.start(handler())
        assert task is not None
        assert steps == ["first"]
        assert await task == 42
        assert steps == ["first", "second"]

    asyncio.run(main())


def test_errors_reach_the_caller_or_the_task() -> None:
    async def fails_at_once() -> None:
        raise ValueError("now")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    async def main() -> None:
        with pytest.raises(ValueError, match="now"):
            eager.start(fails_at_once())
        task = eager.start(fails_later())
        assert task is not None
        with pytest.raises(ValueError, match="later"):
            await task

    asyncio.run(main())


@pytest.mark.parametrize("first_step", ["taken", "not taken"])
def test_cancelling_the_task_cancels_the_coroutine_where_it_waits(
    first_step: str,
) -> None:
    """Also when the Task is cancelled before the loop ran it at all: the
    coroutine, suspended in its first await, gets the CancelledError there."""
    cleaned = []

    async def handler() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)

    async def main() -> None:
        task = eager.start(handler())
        assert task is not None
        if first_step == "taken":
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]

    asyncio.run(main())


def test_a_coroutine_that_yields_to_the_loop_once_goes_on() -> None:
    async def handler() -> str:
        await asyncio.sleep(0)  # yields None to the Task, not a future
        await asyncio.sleep(0)
        return "done"

    async def main() -> None:
        task = eager.start(handler())
        assert task is not None
        assert await task == "done"

    asyncio.run(main())


def test_a_caught_error_from_an_awaited_future_lets_the_coroutine_go_on() -> None:
    async def handler(fut: asyncio.Future[int]) -> str:
        try:
            await fut
        except KeyError:
            return "recovered"
        return "no error"

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = eager.start(handler(fut))
        assert task is not None
        fut.set_exception(KeyError("x"))
        assert await task == "recovered"

    asyncio.run(main())


def test_the_handler_keeps_one_context_of_its_own() -> None:
    seen = []

    async def handler() -> None:
        var.set("inner")
        await asyncio.sleep(0)
        seen.append(var.get())

    async def main() -> None:
        task = eager.start(handler())
        assert var.get() == "outer"  # the first step's change did not leak out
        assert task is not None
        await task
        assert seen == ["inner"]  # and the rest of the handler still sees it

    asyncio.run(main())


def test_future_always_gives_a_future_with_the_outcome() -> None:
    async def at_once() -> int:
        return 7

    async def fails_at_once() -> None:
        raise ValueError("now")

    async def later() -> int:
        await asyncio.sleep(0)
        return 8

    async def main() -> None:
        done = eager.future(at_once())
        assert done.done() and done.result() == 7
        failed = eager.future(fails_at_once())
        assert failed.done()
        with pytest.raises(ValueError, match="now"):
            failed.result()
        assert await eager.future(later()) == 8

    asyncio.run(main())
