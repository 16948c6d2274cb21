"""One loop per executor instance: schedule -> KV memory plan -> step request -> tokens.

Between two iterations the loop carries out what reconfiguration asked of its executor
(a restart, due moves). A failed step frees everything the executor holds and lets the batch
recompute from its committed tokens; a request whose steps keep failing gets an error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from services.scheduler import metrics
from services.scheduler.cancellation import Cancellations
from services.scheduler.executors import ExecutorHandle, ExecutorPool, StepFailedError
from services.scheduler.intake import RequestIntake
from services.scheduler.kvmemory import MemoryPlan, apply_after_step, apply_before_step, plan_memory
from services.scheduler.plans import PlanApplier
from services.scheduler.policy_base import SchedulerPolicy, StepOutput
from services.scheduler.sequence import Sequence
from services.scheduler.tokens import IterationOutput, TokenPublisher
from shared.messages import StepCommand, StepResult, TokenChunk
from shared.runtime import ServiceContext
from shared.waiting import wait_event

# How long an idle loop sleeps unless woken: it still looks for due moves (a plan's move_by
# passes without any event) and for a stop.
IDLE_WAKE_S = 1.0
# Pause after a step failed on an executor that is still there, before it is tried again.
STEP_FAILURE_BACKOFF_S = 0.2


@dataclass
class IterationLoop:
    """Runs the iterations of each executor of the pool."""

    context: ServiceContext
    policy: SchedulerPolicy
    pool: ExecutorPool
    plans: PlanApplier
    intake: RequestIntake
    tokens: TokenPublisher
    cancellations: Cancellations
    eos_token_ids: frozenset[int]

    async def run(self, handle: ExecutorHandle) -> None:
        while not handle.gone.is_set() and not self.context.stop.is_set():
            planned = time.perf_counter()
            if handle.restart:
                self.plans.restart_on(handle)
            await self.cancellations.apply(handle)
            await self.plans.apply_moves(handle)
            batch = self.policy.schedule(handle.view)
            if batch:
                await self._iterate(handle, batch, planned)
                continue
            if handle.pending_release:
                await self.pool.release(handle)
            handle.wake.clear()
            await wait_event(handle.wake, IDLE_WAKE_S)

    async def _iterate(self, handle: ExecutorHandle, batch: list[Sequence], planned: float) -> None:
        """One step of ``batch`` on ``handle``; ``planned``: when the loop began it."""
        memory = plan_memory(handle.view, batch, self.policy.priority_order(handle.view))
        batch = memory.batch
        command = self._command(handle, batch, memory)
        apply_before_step(memory)
        metrics.BATCH_SIZE.observe(len(batch))
        observe_swaps(memory)
        sent = time.perf_counter()
        try:
            result = await self.pool.step(handle, command)
        except StepFailedError as exc:
            await self._on_step_failed(handle, batch, exc)
            return
        received = time.perf_counter()
        metrics.ITERATION.observe(received - sent)
        apply_after_step(memory)
        await self._apply(handle, batch, result)
        # The scheduler's own time for this iteration, outside the executor.
        overhead_s = sent - planned + time.perf_counter() - received
        metrics.OVERHEAD.observe(overhead_s)
        self.context.log.debug(
            "step.done",
            instance_id=handle.view.instance_id,
            batch=len(batch),
            offloaded=len(memory.offload),
            uploaded=len(memory.upload) + len(memory.prefetch),
            dropped=len(memory.drop),
            compute_ms=round(result.compute_s * 1000, 2),
            round_trip_ms=round((received - sent) * 1000, 2),
            scheduler_ms=round(overhead_s * 1000, 3),
        )

    @staticmethod
    def _command(handle: ExecutorHandle, batch: list[Sequence], memory: MemoryPlan) -> StepCommand:
        """The step request; it carries the releases pending on ``handle`` (then cleared)."""
        command = StepCommand(
            sequences=[sequence.step_input() for sequence in batch],
            release=[*handle.pending_release, *(s.request_id for s in memory.drop)],
            release_all=handle.release_all,
            offload=[sequence.request_id for sequence in memory.offload],
            upload=[sequence.request_id for sequence in memory.upload],
            prefetch=[sequence.request_id for sequence in memory.prefetch],
        )
        handle.pending_release = []
        handle.release_all = False
        return command

    async def _on_step_failed(
        self, handle: ExecutorHandle, batch: list[Sequence], exc: StepFailedError
    ) -> None:
        instance_id = handle.view.instance_id
        self.context.log.warning("step.failed", instance_id=instance_id, error=str(exc))
        metrics.STEP_FAILURES.labels("true" if exc.executor_lost else "false").inc()
        # Whatever the executor holds is suspect (a swap may have half happened): free all of
        # it and let every sequence bound there recompute from its committed tokens.
        handle.release_all = True
        handle.pending_release = []
        for sequence in batch:
            sequence.failed_steps += 1
            if sequence.failed_steps > self.context.settings.scheduler.max_step_retries:
                self.policy.remove(sequence)
                await self.intake.fail(sequence, f"generation failed after repeated errors: {exc}")
        if exc.executor_lost:
            self.pool.drop(instance_id, str(exc))
            return
        for sequence in self.policy.requeue_executor(instance_id):
            sequence.lose_cache()
        await asyncio.sleep(STEP_FAILURE_BACKOFF_S)

    async def _apply(
        self, handle: ExecutorHandle, batch: list[Sequence], result: StepResult
    ) -> None:
        chunks: list[tuple[Sequence, TokenChunk]] = []
        for sequence in batch:
            token_id = result.tokens.get(sequence.request_id)
            if token_id is None:
                self.context.log.error("step.missing_token", request_id=sequence.request_id)
                continue
            chunk = sequence.append(token_id, self.eos_token_ids)
            if chunk is not None:
                chunks.append((sequence, chunk))
            else:
                metrics.REPLAYED_TOKENS.inc()
            if sequence.finished:
                handle.pending_release.append(sequence.request_id)
        self.policy.update_from_output(
            StepOutput(instance_id=handle.view.instance_id, batch=batch, compute_s=result.compute_s)
        )
        # Bounded: if committing falls behind, the executor loops wait here.
        await self.tokens.put(IterationOutput(chunks=chunks))


def observe_swaps(memory: MemoryPlan) -> None:
    """Count the KV cache moves an iteration asks of its executor."""
    for action, moved in (
        ("offload", memory.offload),
        ("upload", memory.upload),
        ("prefetch", memory.prefetch),
        ("drop", memory.drop),
    ):
        if moved:
            metrics.KV_SWAPS.labels(action).inc(len(moved))
