"""Bounded waiting, shared by the services: backoff between retries, polling until a condition
holds, a stop-aware sleep, and the supervision of background tasks (a task that dies is logged
at once instead of leaving a service half-working in silence)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

# Retries of a change that must not be lost start quickly and settle at a few seconds apart.
DEFAULT_FIRST_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 5.0
BACKOFF_FACTOR = 2.0


def backoff_delays(
    first_s: float = DEFAULT_FIRST_DELAY_S,
    max_s: float = DEFAULT_MAX_DELAY_S,
    factor: float = BACKOFF_FACTOR,
) -> Iterator[float]:
    """Endless delays for retries: ``first_s``, then ``factor`` times longer up to ``max_s``."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * factor, max_s)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float
) -> bool:
    """Call ``check`` every ``interval_s`` until it is true (True) or ``timeout_s`` has passed
    (False). ``check`` is called at least once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if await check():
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval_s, remaining))


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout_s``; whether it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout_s)
    except TimeoutError:
        return False
    return True


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile; True when it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def until_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T | None:
    """What ``awaitable`` gives, or None as soon as ``stop`` is set (``awaitable`` is then
    cancelled): a wait that needs no polling timeout to notice a stop."""
    work = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})  # let it take back what it was doing
    if work.cancelled():
        return None
    return work.result()


def supervised(
    coroutine: Coroutine[Any, Any, Any], name: str, log: structlog.stdlib.BoundLogger
) -> asyncio.Task[Any]:
    """A background task whose death by an exception is logged as ``task.died`` (a cancelled
    or finished task is not news)."""
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(lambda done: _log_death(done, log))
    return task


def _log_death(task: asyncio.Task[Any], log: structlog.stdlib.BoundLogger) -> None:
    if task.cancelled() or task.exception() is None:
        return
    log.error("task.died", task=task.get_name(), error=repr(task.exception()))


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has ended (their exceptions are not raised)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
