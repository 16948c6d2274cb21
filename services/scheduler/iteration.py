"""One loop per executor instance: schedule -> KV memory plan -> step request -> tokens.

Between two iterations the loop carries out what reconfiguration asked of its executor
(a restart, due moves). A failed step frees everything the executor holds and lets the batch
recompute from its committed tokens; a request whose steps keep failing gets an error.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from shared.rpc import BadRequest, Internal, RpcError
from shared.runtime import ServiceContext
from shared.waiting import wait_event

# How long an idle loop with planned moves sleeps unless woken: a plan's move_by passes
# without any event. Everything else that gives it work (a request, a plan, a cancel, a stop,
# the executor's loss) wakes it; without moves it still looks every IDLE_CHECK_S.
IDLE_WAKE_S = 1.0
IDLE_CHECK_S = 30.0
# Pause after a step failed on an executor that is still there, before it is tried again.
STEP_FAILURE_BACKOFF_S = 0.2


@dataclass
class LaunchedStep:
    """A step sent to an executor whose reply the loop has not applied yet."""

    batch: list[Sequence]
    memory: MemoryPlan
    planned: float  # when the loop began planning it (perf_counter)
    sent: float
    reply: asyncio.Task[StepResult]
    pipelined: bool  # sent while the step before it ran


@dataclass
class IterationLoop:
    """Runs the iterations of each executor of the pool.

    The next step goes out while the current one runs (asynchronous scheduling): the executor
    finds it waiting when it replies, so the round trip and the scheduler's own work (planning,
    applying tokens, committing) overlap its compute. A sequence in both feeds the token the
    executor samples in the first (``StepSequence.continues``). Everything that changes an
    executor's caches outside a step (a restart, a planned move, a KV swap) waits for the step
    in flight to be applied first, so it still happens at an iteration boundary. A cancel does
    not wait: its request ends at once (the token the step in flight computes for it is thrown
    away) and its release goes to the executor with the next step.
    """

    context: ServiceContext
    policy: SchedulerPolicy
    pool: ExecutorPool
    plans: PlanApplier
    intake: RequestIntake
    tokens: TokenPublisher
    cancellations: Cancellations
    eos_token_ids: frozenset[int]

    async def run(self, handle: ExecutorHandle) -> None:
        running: LaunchedStep | None = None
        # When the reply before came (None: the loop has waited idle since, or a step failed).
        last_reply: float | None = None
        try:
            while not handle.gone.is_set() and not self.context.stop.is_set():
                planned = time.perf_counter()
                if running is not None and self._needs_quiet(handle):
                    last_reply = await self._finish(handle, running, last_reply)
                    running = None
                    continue
                if running is None:
                    await self._between_steps(handle)
                else:
                    # A cancelled request in the step in flight ends now: that step's token
                    # for it is thrown away, its release goes out with the next step.
                    await self.cancellations.apply(handle)
                # A wake from here on (a request added while this loop plans, fails one or
                # releases) is kept for the idle wait below, not cleared after the fact.
                handle.wake.clear()
                batch = await self._refuse_too_long(handle, self.policy.schedule(handle.view))
                if running is not None:
                    batch = [s for s in batch if s.pending == 0 or s.can_continue]
                launched = self._launch(handle, batch, planned, running) if batch else None
                if running is not None:
                    last_reply = await self._finish(handle, running, last_reply)
                    if last_reply is None and launched is not None:
                        await self._discard(handle, launched)
                        launched = None
                    running = launched
                    continue
                if launched is not None:
                    running = launched
                    continue
                if handle.gone.is_set():
                    break
                if handle.pending_release:
                    await self.pool.release(handle)
                await wait_event(handle.wake, IDLE_WAKE_S if handle.moves else IDLE_CHECK_S)
                last_reply = None
        finally:
            if running is not None:
                running.reply.cancel()

    def _needs_quiet(self, handle: ExecutorHandle) -> bool:
        """Something must change the executor's caches outside a step: apply the step in
        flight first."""
        return handle.restart or bool(handle.moves)

    async def _between_steps(self, handle: ExecutorHandle) -> None:
        """What reconfiguration and clients asked of the executor, with no step in flight."""
        if handle.restart:
            self.plans.restart_on(handle)
        await self.cancellations.apply(handle)
        await self.plans.apply_moves(handle)

    async def _refuse_too_long(
        self, handle: ExecutorHandle, batch: list[Sequence]
    ) -> list[Sequence]:
        """``batch`` without the sequences that would outgrow the executor's context: those get
        an error now (admission checks the model's context, which an executor may cap lower)."""
        fitting = []
        limit = handle.view.max_seq_len
        for sequence in batch:
            if sequence.pending or sequence.most_positions <= limit:
                fitting.append(sequence)
                continue
            self.policy.remove(sequence)
            message = (
                f"prompt ({len(sequence.request.prompt_token_ids)} tokens) plus max_tokens"
                f" ({sequence.request.max_tokens}) is {sequence.most_positions} tokens, over the"
                f" context length {limit} of the executors serving this model"
                f" (SPOTSERVE_EXECUTOR__MAX_SEQ_LEN); lower max_tokens"
            )
            await self._fail(sequence, message, BadRequest)
        return fitting

    async def _fail(
        self, sequence: Sequence, message: str, error_type: type[RpcError] = Internal
    ) -> None:
        """End ``sequence`` with an error answer; its committed chunks' runs are closed."""
        await self.intake.fail(sequence, message, error_type)
        await self.tokens.put(IterationOutput(chunks=[], failed=[sequence]))

    def _launch(
        self,
        handle: ExecutorHandle,
        batch: list[Sequence],
        planned: float,
        running: LaunchedStep | None,
    ) -> LaunchedStep | None:
        """Send one step of ``batch`` (its memory plan's fitting part) to ``handle``. None when
        it or the step running moves caches: it is planned again once that one is applied."""
        if handle.gone.is_set():
            # Dropped while this loop awaited something: the executor may be serving a newer
            # handle's loop already, whose steps this one's would interleave with.
            return None
        if running is not None and running.memory.moves_caches:
            return None  # its prefetch takes blocks after it that this plan would not see
        memory = plan_memory(handle.view, batch, self.policy.priority_order(handle.view))
        if running is not None and (memory.moves_caches or len(memory.batch) < len(batch)):
            return None
        if not memory.batch:
            # Unreachable while sequences fit the context (whose blocks every cache holds).
            self.context.log.error("step.nothing_fits", instance_id=handle.view.instance_id)
            return None
        batch = memory.batch
        command = self._command(handle, batch, memory)
        apply_before_step(memory)
        for sequence in batch:
            sequence.pending += 1
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.STEPS_SENT.labels("after_reply" if running is None else "while_running").inc()
        observe_swaps(memory)
        sent = time.perf_counter()
        reply = asyncio.create_task(self.pool.step(handle, command))
        return LaunchedStep(batch, memory, planned, sent, reply, running is not None)

    async def _finish(
        self, handle: ExecutorHandle, step: LaunchedStep, last_reply: float | None
    ) -> float | None:
        """Wait for ``step``'s reply and apply it; when the reply came, None if the step
        failed. ``last_reply``: when the reply before came (None: the loop waited idle)."""
        failure: StepFailedError | None = None
        try:
            result = await step.reply
        except StepFailedError as exc:
            failure = exc
        if handle.gone.is_set():
            # Dropped while the step ran: drop() requeued its sequences, which may be in
            # another executor's step already. Neither its outcome nor its bookkeeping are
            # theirs any more; they recompute.
            return None
        if failure is not None:
            for sequence in step.batch:
                sequence.pending = 0
            await self._on_step_failed(handle, step.batch, failure)
            return None
        received = time.perf_counter()
        # The time this iteration adds to its executor's busy time line: from the reply before
        # (the scheduler's applying and planning in between, unless they overlapped this
        # step's compute), or from when the loop began planning it after an idle wait.
        wall_s = received - (step.planned if last_reply is None else last_reply)
        metrics.ITERATION.observe(wall_s)
        for sequence in step.batch:
            sequence.pending = max(0, sequence.pending - 1)
        apply_after_step(step.memory)
        await self._apply(handle, step.batch, result)
        # The scheduler's own time for this iteration: planning it and applying its reply.
        scheduler_s = step.sent - step.planned + time.perf_counter() - received
        metrics.OVERHEAD.observe(scheduler_s)
        memory = step.memory
        self.context.log.debug(
            "step.done",
            instance_id=handle.view.instance_id,
            batch=len(step.batch),
            offloaded=len(memory.offload),
            uploaded=len(memory.upload) + len(memory.prefetch),
            dropped=len(memory.drop),
            compute_ms=round(result.compute_s * 1000, 2),
            round_trip_ms=round((received - step.sent) * 1000, 2),
            wall_ms=round(wall_s * 1000, 2),
            scheduler_ms=round(scheduler_s * 1000, 3),
            pipelined=step.pipelined,
        )
        return received

    async def _discard(self, handle: ExecutorHandle, step: LaunchedStep) -> None:
        """A step sent behind one that failed: its reply, if any, is not applied (the failure
        frees the executor's caches and its sequences recompute from their committed tokens)."""
        with contextlib.suppress(StepFailedError):
            await step.reply
        if handle.gone.is_set():
            return  # drop() requeued them (see _finish)
        for sequence in step.batch:
            sequence.pending = 0

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
                await self._fail(sequence, f"generation failed after repeated errors: {exc}")
        if exc.executor_lost:
            self.pool.drop(instance_id, str(exc), handle)
            return
        for sequence in self.policy.requeue_executor(instance_id):
            sequence.lose_cache()
        await asyncio.sleep(STEP_FAILURE_BACKOFF_S)

    async def _apply(
        self, handle: ExecutorHandle, batch: list[Sequence], result: StepResult
    ) -> None:
        chunks: list[tuple[Sequence, TokenChunk]] = []
        for sequence in batch:
            if sequence.finished:
                continue  # it ended in the step before, which this one was sent behind
            token_id = result.tokens.get(sequence.request_id)
            if token_id is None:
                self.context.log.error("step.missing_token", request_id=sequence.request_id)
                continue
            chunk = sequence.append(token_id, self.eos_token_ids)
            if chunk is not None:
                chunks.append((sequence, chunk))
            else:
                metrics.REPLAYED_TOKENS.inc()
            if chunk is not None and chunk.finish_reason is not None:
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
