"""shared.waiting's stop-aware wait: the awaited value, or None once the stop is set (the wait
is then cancelled, so nothing it would have taken is lost)."""

from __future__ import annotations

import asyncio

from shared.waiting import until_stopped


async def test_until_stopped_gives_what_the_awaitable_gives() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    queue.put_nowait("plan")
    assert await until_stopped(queue.get(), asyncio.Event()) == "plan"


async def test_until_stopped_gives_none_on_stop_and_takes_nothing() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    stop = asyncio.Event()
    waiting = asyncio.create_task(until_stopped(queue.get(), stop))
    await asyncio.sleep(0)
    stop.set()
    assert await waiting is None
    queue.put_nowait("later")
    assert queue.get_nowait() == "later"  # the cancelled get did not take it


async def test_until_stopped_passes_on_the_awaitables_error() -> None:
    async def fails() -> None:
        raise ValueError("unreadable")

    try:
        await until_stopped(fails(), asyncio.Event())
    except ValueError as exc:
        assert str(exc) == "unreadable"
    else:
        raise AssertionError("the error was swallowed")
