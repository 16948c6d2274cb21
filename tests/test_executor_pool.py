"""The scheduler's executor pool when an executor is dropped and found again: the loop of the
dropped handle cannot drop the handle that replaced it (a late step failure of the old loop
would otherwise requeue the new loop's requests and leave the executor to two loops at once),
sends no further step and takes no token from a reply that comes after the drop."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import structlog

from services.scheduler.executors import ExecutorHandle, ExecutorPool
from services.scheduler.iteration import LaunchedStep
from services.scheduler.kvmemory import MemoryPlan
from services.scheduler.policy import FcfsPolicy
from services.scheduler.policy_base import ExecutorView
from shared.config import Settings
from shared.messages import StepResult
from shared.model.tokenizer import TextTokenizer
from shared.runtime import ServiceContext
from tests.helpers import bare_iteration_loop
from tests.test_units_scheduler import make_request, make_sequence

DISCOVERED = [{"metadata": {"instance_id": "exec-x", "kv_blocks": "64"}}]


async def test_a_dropped_handle_cannot_drop_the_one_that_replaced_it(
    tokenizer: TextTokenizer,
) -> None:
    loops: list[ExecutorHandle] = []

    async def run_loop(handle: ExecutorHandle) -> None:
        loops.append(handle)
        await handle.gone.wait()

    context = SimpleNamespace(settings=Settings(), log=structlog.get_logger())
    policy = FcfsPolicy()
    pool = ExecutorPool(cast(ServiceContext, context), policy, run_loop)
    discovered = cast(list[dict[str, Any]], DISCOVERED)
    pool._join(discovered)
    first = pool.executors["exec-x"]
    pool.drop("exec-x", "missing from discovery")
    assert first.gone.is_set() and "exec-x" not in pool.executors

    pool._join(discovered)  # found again: a new handle and loop
    second = pool.executors["exec-x"]
    assert second is not first
    sequence = make_sequence(tokenizer, make_request([5, 6], max_tokens=8))
    policy.add_request(sequence)
    assert policy.schedule(second.view) == [sequence]  # bound to exec-x, in its batch

    pool.drop("exec-x", "step timed out", first)  # the old loop's late failure
    assert pool.executors["exec-x"] is second and not second.gone.is_set()
    assert sequence.executor == "exec-x"  # the new loop's request stays where it runs

    pool.drop("exec-x", "step timed out", second)
    assert "exec-x" not in pool.executors and second.gone.is_set()
    assert sequence.executor is None  # requeued: any executor may recompute it
    await asyncio.wait_for(asyncio.gather(*pool_tasks(first, second)), timeout=5)
    assert loops == [first, second]


def pool_tasks(*handles: ExecutorHandle) -> list[asyncio.Task[None]]:
    return [handle.task for handle in handles if handle.task is not None]


async def test_a_dropped_handles_loop_sends_no_step_and_takes_no_token(
    tokenizer: TextTokenizer,
) -> None:
    policy = FcfsPolicy()
    loop = bare_iteration_loop(policy)
    handle = ExecutorHandle(view=ExecutorView(instance_id="exec-x", max_batch_size=4))
    sequence = make_sequence(tokenizer, make_request([5, 6], max_tokens=8))
    policy.add_request(sequence)
    batch = policy.schedule(handle.view)
    sequence.pending = 1  # in the step in flight

    async def reply() -> StepResult:
        return StepResult(tokens={sequence.request_id: 9}, compute_s=0.01)

    running = LaunchedStep(batch, MemoryPlan(batch), 0.0, 0.0, asyncio.create_task(reply()), False)
    handle.gone.set()  # dropped (and its sequences requeued) while the step ran
    policy.requeue_executor("exec-x")
    sequence.pending = 1  # taken into another executor's step since
    assert loop._launch(handle, batch, 0.0, None) is None
    assert await loop._finish(handle, running, None) is None
    assert sequence.generated == [] and sequence.cached_tokens == 0
    assert sequence.pending == 1  # the other loop's bookkeeping is left alone
