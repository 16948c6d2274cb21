"""The scheduler's iteration loop does not sleep through a request added while it was busy: an
idle loop waits for a wake (a request, a plan, a drop) up to IDLE_CHECK_S, so a wake that came
while it released finished requests must still be there when it starts to wait."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest

from services.scheduler import iteration
from services.scheduler.executors import ExecutorHandle
from services.scheduler.policy import FcfsPolicy
from services.scheduler.policy_base import ExecutorView
from shared.messages import StepCommand, StepResult
from shared.model.tokenizer import TextTokenizer
from tests.helpers import bare_iteration_loop
from tests.test_units_scheduler import make_request, make_sequence


async def nothing(*_: object) -> None:
    return None


async def test_a_request_added_while_the_loop_releases_is_stepped(
    tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long enough that a missed wake would hang the test rather than just slow it.
    monkeypatch.setattr(iteration, "IDLE_CHECK_S", 3600.0)
    policy = FcfsPolicy()
    handle = ExecutorHandle(view=ExecutorView(instance_id="exec-x", max_batch_size=4))
    handle.pending_release = ["finished-in-the-step-before"]
    sequence = make_sequence(tokenizer, make_request([5, 6], max_tokens=8))
    stepped: asyncio.Queue[StepCommand] = asyncio.Queue()

    async def release(released: ExecutorHandle) -> None:
        released.pending_release = []
        await asyncio.sleep(0)  # the release's round trip; a request arrives meanwhile
        policy.add_request(sequence)
        released.wake.set()  # what the scheduler does for a new request (pool.wake_all)

    async def step(_: ExecutorHandle, command: StepCommand) -> StepResult:
        await stepped.put(command)
        await asyncio.Event().wait()  # no answer: the test ends with the first step
        raise AssertionError("unreachable")

    loop = bare_iteration_loop(
        policy,
        pool=SimpleNamespace(release=release, step=step),
        plans=SimpleNamespace(apply_moves=nothing),
        cancellations=SimpleNamespace(apply=nothing),
    )
    running = asyncio.create_task(loop.run(handle))
    try:
        command = await asyncio.wait_for(stepped.get(), timeout=30)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert [s.request_id for s in command.sequences] == [sequence.request_id]
