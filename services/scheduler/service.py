"""Scheduler: consumes accepted requests, runs iteration-level batches on the executors,
commits every token to JetStream and only then forwards it to the client.

Its parts, each a module of this package:
- ``intake``: pulls from the REQUESTS stream while fewer than ``max_inflight_requests`` are
  held, keeps them alive, acks each when it has finished (a crash loses nothing);
- ``executors``: the executor pool, found through $SRV discovery, and the requests to them;
- ``iteration``: one loop per executor instance: schedule -> step request -> tokens;
- ``plans``: the planner's plans applied (roles, moves with or without the KV cache);
- ``tokens``: commits each iteration's chunks (JetStream), then forwards them, overlapped
  with the executor's next iteration;
- ``cancellation``: requests a client cancelled end at their executor's next iteration.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path

from services.scheduler import metrics
from services.scheduler.cancellation import Cancellations
from services.scheduler.executors import ExecutorHandle, ExecutorPool
from services.scheduler.intake import RequestIntake
from services.scheduler.iteration import IterationLoop
from services.scheduler.mlfq import SkipJoinMlfqPolicy
from services.scheduler.plans import PlanApplier
from services.scheduler.policy import make_policy
from services.scheduler.policy_base import SchedulerPolicy
from services.scheduler.sequence import Sequence
from services.scheduler.tokens import TokenPublisher
from shared.config import ConfigurationError, SchedulerSettings
from shared.messages import Empty, InflightReport
from shared.model.profile import find_profile, load_profile
from shared.model.tokenizer import TextTokenizer
from shared.modelsource import resolve_model
from shared.readers import follow_plans
from shared.rpc import INFLIGHT_ENDPOINT, add_endpoint
from shared.runtime import ServiceContext

# On stop: how long the loops get to end, and the outbox to be committed and forwarded.
SHUTDOWN_WAIT_S = 10.0


class Scheduler:
    """The scheduler's parts, wired together."""

    def __init__(
        self, context: ServiceContext, tokenizer: TextTokenizer, policy: SchedulerPolicy
    ) -> None:
        self.context = context
        self.policy = policy
        self.intake = RequestIntake(context, tokenizer, on_request=self._on_request)
        self.tokens = TokenPublisher(context, self.intake)
        self.pool = ExecutorPool(context, policy, run_loop=self._run_executor)
        self.plans = PlanApplier(context, policy, self.pool, self.intake.held)
        self.cancellations = Cancellations(
            context, policy, self.pool, self.intake.held, self.tokens
        )
        self.iterations = IterationLoop(
            context,
            policy,
            self.pool,
            self.plans,
            self.intake,
            self.tokens,
            self.cancellations,
            tokenizer.eos_token_ids,
        )

    @property
    def held(self) -> dict[str, Sequence]:
        return self.intake.held

    @property
    def executors(self) -> dict[str, ExecutorHandle]:
        return self.pool.executors

    def _on_request(self, sequence: Sequence) -> None:
        self.policy.add_request(sequence)
        self.cancellations.taken(sequence)
        self.pool.wake_all()

    async def _run_executor(self, handle: ExecutorHandle) -> None:
        await self.iterations.run(handle)

    async def on_inflight(self, _: Empty) -> InflightReport:
        """The requests held now, with where their KV caches are."""
        return InflightReport(
            sequences=[s.inflight() for s in self.held.values() if not s.finished]
        )

    def start_loops(self) -> list[asyncio.Task[None]]:
        """The long-running loops but the publisher (it outlives them, to drain the outbox)."""
        # A cancel marker put while the marker subscription stands is seen by it; one put
        # before (or missed while NATS was away) by the sweep.
        return [
            asyncio.create_task(self.cancellations.watch(), name="cancel-watch"),
            asyncio.create_task(self.cancellations.work(), name="cancel-work"),
            asyncio.create_task(self.cancellations.sweep(), name="cancel-sweep"),
            asyncio.create_task(self.intake.consume(), name="consume"),
            asyncio.create_task(self.pool.discover(), name="discover"),
            asyncio.create_task(self.pool.watch_reconnects(), name="executor-reconnects"),
            asyncio.create_task(self.intake.keepalive(), name="keepalive"),
            asyncio.create_task(follow_plans(self.context, self.plans.apply_plan), name="plans"),
        ]

    async def shut_down(
        self, loops: list[asyncio.Task[None]], publisher: asyncio.Task[None]
    ) -> None:
        """Let the loops end, commit and forward what was computed, then let go of the
        requests still held (JetStream hands them to the next scheduler)."""
        self.pool.wake_all()
        executor_tasks = self.pool.loop_tasks()
        await asyncio.wait(loops + executor_tasks, timeout=SHUTDOWN_WAIT_S)
        try:
            await asyncio.wait_for(self.tokens.outbox.join(), timeout=SHUTDOWN_WAIT_S)
        except TimeoutError:
            self.context.log.warning("scheduler.outbox_not_drained")
        publisher.cancel()
        for task in loops + executor_tasks:
            task.cancel()
        await self.intake.release_held()


def observe_gauges(scheduler: Scheduler) -> None:
    """Gauges read when scraped (from the metrics server's thread: single reads only, and
    copies of the dicts the event loop changes)."""

    def held() -> list[Sequence]:
        return [s for s in list(scheduler.held.values()) if not s.finished]

    metrics.HELD.set_function(lambda: len(held()))
    metrics.WAITING.set_function(lambda: sum(1 for s in held() if s.executor is None))
    metrics.RUNNING.set_function(lambda: sum(1 for s in held() if s.executor is not None))
    metrics.EXECUTORS.set_function(lambda: len(scheduler.executors))
    policy = scheduler.policy
    if isinstance(policy, SkipJoinMlfqPolicy):
        for level in range(policy.settings.num_queues):
            metrics.MLFQ_QUEUE.labels(str(level)).set_function(partial(policy.queue_length, level))


def build_policy(
    settings: SchedulerSettings, model_dir: Path
) -> tuple[SchedulerPolicy, Path | None]:
    """The configured policy, and the timing profile it uses (None: none)."""
    if settings.policy == "fcfs":
        return make_policy(settings.policy), None
    path = settings.profile_path or find_profile(model_dir)
    profile = load_profile(path) if path else None
    if settings.policy == "adaptive":
        # Without a profile, a prefill is not counted in a new job's index.
        policy = make_policy(
            settings.policy,
            adaptive=settings.adaptive,
            prefill_time_s=profile.prefill_time_s if profile else None,
            decode_time_s=profile.decode_time_s if profile else None,
            max_batch_size=settings.max_batch_size,
        )
        return policy, path if profile else None
    if profile is None:
        raise ConfigurationError(
            f"policy skip-join-mlfq needs a timing profile of {model_dir}: run `spotserve profile"
            f" --model {model_dir}` (or set SPOTSERVE_SCHEDULER__PROFILE_PATH)"
        )
    return make_policy(settings.policy, settings.mlfq, profile.prefill_time_s), path


async def serve(context: ServiceContext) -> None:
    model_dir = await resolve_model(context)
    tokenizer = await asyncio.to_thread(TextTokenizer.from_model_dir, model_dir)
    policy, profile = await asyncio.to_thread(build_policy, context.settings.scheduler, model_dir)
    scheduler = Scheduler(context, tokenizer, policy)
    observe_gauges(scheduler)
    service = await context.add_micro_service(
        "Batches accepted requests at iteration level and streams their tokens",
        metadata={"policy": context.settings.scheduler.policy},
    )
    await add_endpoint(service, INFLIGHT_ENDPOINT, scheduler.on_inflight, logger=context.log)
    loops = scheduler.start_loops()
    publisher = asyncio.create_task(scheduler.tokens.publish(), name="publish")
    context.log.info(
        "scheduler.ready",
        policy=context.settings.scheduler.policy,
        profile=str(profile) if profile else None,
    )
    started = time.monotonic()
    await context.stop.wait()
    context.log.info("scheduler.stopping", uptime_s=round(time.monotonic() - started, 1))
    await scheduler.shut_down(loops, publisher)
    await service.stop()
