"""The executor pool: the executor instances found through $SRV discovery, their liveness,
and the requests the scheduler sends them (step, release), all through shared.rpc.

An executor missing from several discoveries in a row, or one whose step finds nobody
listening or times out, is dropped: the sequences bound to it wait again and recompute their
caches elsewhere (or restart from scratch under the baselines' plans).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from services.scheduler import metrics
from services.scheduler.policy_base import ExecutorView, SchedulerPolicy
from services.scheduler.reconfigure import PlannedMove, restarts_lost_requests, serves
from shared.bus import reconnected_since
from shared.discovery import discover
from shared.messages import Plan, ReleaseCommand, StepCommand, StepResult
from shared.rpc import (
    EXECUTOR_RELEASE_ENDPOINT,
    STEP_ENDPOINT,
    NoResponders,
    RpcError,
    RpcTimeout,
    call,
)
from shared.runtime import ServiceContext
from shared.subjects import EXECUTOR_RECONNECTED_SUBJECTS, SERVICE_EXECUTOR
from shared.waiting import wait_event

# An executor missing from this many discoveries in a row is considered gone.
MISSED_DISCOVERIES_LIMIT = 3
# How often an iteration in flight checks whether NATS reconnected meanwhile.
RECONNECT_POLL_S = 0.5


class StepFailedError(Exception):
    def __init__(self, message: str, executor_lost: bool) -> None:
        super().__init__(message)
        self.executor_lost = executor_lost


@dataclass
class ExecutorHandle:
    view: ExecutorView
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending_release: list[str] = field(default_factory=list)
    # The first command to an executor frees whatever an earlier scheduler left there.
    release_all: bool = True
    missed_discoveries: int = 0
    # Set when the executor is considered dead: an in-flight step stops waiting for it.
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the executor says its NATS connection came back: a reply it sent meanwhile is
    # lost, so an in-flight step stops waiting for it too.
    reconnected: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # Requests a plan moves off this executor -> when they move (whichever comes first).
    moves: dict[str, PlannedMove] = field(default_factory=dict)
    # The restart baseline: drop everything here before the next iteration.
    restart: bool = False


# The loop that runs one executor's iterations, started when the executor joins.
ExecutorLoop = Callable[[ExecutorHandle], Coroutine[Any, Any, None]]


@dataclass
class ExecutorPool:
    """The executors the scheduler knows, by instance id, and the plan they serve under."""

    context: ServiceContext
    policy: SchedulerPolicy
    run_loop: ExecutorLoop
    executors: dict[str, ExecutorHandle] = field(default_factory=dict)
    # The plan in force: which instances take new requests, and how lost ones recover.
    plan: Plan | None = None

    def follow(self, plan: Plan) -> None:
        """Serve under ``plan``: new requests go only to the instances it gives a role."""
        self.plan = plan
        for instance_id, handle in self.executors.items():
            handle.view = replace(handle.view, accepts_new=serves(plan, instance_id))

    def wake_all(self) -> None:
        for handle in self.executors.values():
            handle.wake.set()

    def serving(self, exclude: str) -> list[str]:
        """The live instances that take new requests, but ``exclude``."""
        return [
            instance_id
            for instance_id, handle in self.executors.items()
            if instance_id != exclude and handle.view.accepts_new and not handle.gone.is_set()
        ]

    def loop_tasks(self) -> list[asyncio.Task[None]]:
        return [handle.task for handle in self.executors.values() if handle.task is not None]

    # ---- discovery and liveness ----

    async def discover(self) -> None:
        while not self.context.stop.is_set():
            try:
                infos = await discover(self.context.nc, SERVICE_EXECUTOR)
            except NatsError as exc:
                self.context.log.warning("discovery.failed", error=repr(exc))
                infos = []
            seen = self._join(infos)
            self._count_missing(seen)
            await wait_event(
                self.context.stop, self.context.settings.scheduler.discovery_interval_s
            )

    def _join(self, infos: list[dict[str, Any]]) -> set[str]:
        """Add the executors discovered for the first time; the instance ids seen."""
        seen = set()
        for info in infos:
            metadata = info.get("metadata") or {}
            instance_id = metadata.get("instance_id")
            if not instance_id:
                continue
            seen.add(instance_id)
            if instance_id not in self.executors:
                self._add(instance_id, metadata)
            self.executors[instance_id].missed_discoveries = 0
        return seen

    def _count_missing(self, seen: set[str]) -> None:
        for instance_id, handle in list(self.executors.items()):
            if instance_id not in seen:
                handle.missed_discoveries += 1
                if handle.missed_discoveries >= MISSED_DISCOVERIES_LIMIT:
                    self.drop(instance_id, "missing from discovery")

    def _add(self, instance_id: str, metadata: dict[str, str]) -> None:
        kv_blocks = max(1, int(metadata.get("kv_blocks", 1)))
        view = ExecutorView(
            instance_id=instance_id,
            max_batch_size=min(self.context.settings.scheduler.max_batch_size, kv_blocks),
            kv_blocks=kv_blocks,
            block_size=max(1, int(metadata.get("kv_block_size", 16))),
            host_slots=max(0, int(metadata.get("host_kv_slots", 0))),
            max_seq_len=max(1, int(metadata.get("max_seq_len", 1 << 30))),
            accepts_new=serves(self.plan, instance_id),
        )
        handle = ExecutorHandle(view=view)
        handle.task = asyncio.create_task(self.run_loop(handle))
        self.executors[instance_id] = handle
        handle.wake.set()
        self.context.log.info(
            "executor.joined", instance_id=instance_id, max_batch=view.max_batch_size
        )

    def drop(self, instance_id: str, reason: str, handle: ExecutorHandle | None = None) -> None:
        """The executor is gone: its sequences wait again for any other. With ``handle``: only
        if that is still the one serving ``instance_id`` (a loop whose handle was dropped, and
        the executor found again since, must not drop the new one)."""
        if handle is not None and self.executors.get(instance_id) is not handle:
            return
        handle = self.executors.pop(instance_id, None)
        if handle is None:
            return
        handle.gone.set()
        handle.wake.set()
        lost = self.policy.requeue_executor(instance_id)
        if restarts_lost_requests(self.plan):
            for sequence in lost:
                sequence.restart_from_scratch()
            metrics.RESTARTS.inc(len(lost))
        self.context.log.warning(
            "executor.lost", instance_id=instance_id, reason=reason, requeued=len(lost)
        )
        self.wake_all()

    # ---- requests to executors ----

    async def step(self, handle: ExecutorHandle, command: StepCommand) -> StepResult:
        """The step's reply, or StepFailedError as soon as discovery declares the executor dead
        (a request to a killed process would otherwise wait for the whole step timeout)."""
        handle.reconnected.clear()
        step = asyncio.create_task(self._step(handle.view.instance_id, command))
        gone = asyncio.create_task(handle.gone.wait())
        reconnects = self.context.nc.stats["reconnects"]
        reconnected = asyncio.create_task(
            reconnected_since(self.context.nc, reconnects, RECONNECT_POLL_S)
        )
        peer_reconnected = asyncio.create_task(handle.reconnected.wait())
        waits = {gone, reconnected, peer_reconnected}
        try:
            await asyncio.wait({step, *waits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not step.done():
            step.cancel()
            if handle.gone.is_set():
                raise StepFailedError("executor gone during the step", executor_lost=True)
            # A reply sent while NATS was away is lost for good (core NATS does not redeliver):
            # recover now (recompute from the committed tokens), not after the step timeout.
            whose = "the executor's" if handle.reconnected.is_set() else "our"
            message = f"{whose} NATS connection came back during the step"
            raise StepFailedError(message, executor_lost=False)
        return step.result()

    async def watch_reconnects(self) -> None:
        """Executors announce their reconnects (``executor_reconnected_subject``)."""

        async def on_reconnected(message: Msg) -> None:
            handle = self.executors.get(message.subject.split(".")[-2])
            if handle is not None:
                handle.reconnected.set()

        subscription = await self.context.nc.subscribe(
            EXECUTOR_RECONNECTED_SUBJECTS, cb=on_reconnected
        )
        try:
            await self.context.stop.wait()
        finally:
            with contextlib.suppress(NatsError):
                await subscription.unsubscribe()

    async def _step(self, instance_id: str, command: StepCommand) -> StepResult:
        try:
            return await call(
                self.context.nc,
                STEP_ENDPOINT,
                command,
                address=instance_id,
                timeout_s=self.context.settings.scheduler.step_timeout_s,
            )
        except NoResponders:
            raise StepFailedError("executor has no responders", executor_lost=True) from None
        except RpcTimeout:
            raise StepFailedError("step timed out", executor_lost=True) from None
        except RpcError as exc:
            # The executor's error answer, or a reply that is no StepResult.
            raise StepFailedError(f"executor error {exc}", executor_lost=False) from None
        except NatsError as exc:
            raise StepFailedError(f"step request failed: {exc!r}", executor_lost=False) from None

    async def release(self, handle: ExecutorHandle) -> None:
        """Free the caches of the requests that ended on ``handle``."""
        request_ids, handle.pending_release = handle.pending_release, []
        try:
            await call(
                self.context.nc,
                EXECUTOR_RELEASE_ENDPOINT,
                ReleaseCommand(request_ids=request_ids),
                address=handle.view.instance_id,
                timeout_s=self.context.settings.scheduler.step_timeout_s,
            )
        except (RpcError, NatsError) as exc:
            self.context.log.warning("release.failed", error=repr(exc))
