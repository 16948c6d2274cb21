"""The instance's engine and the one thread every torch call runs on.

One thread does all torch work, loading included: the engine and its KV cache are not
thread-safe, steps are ordered, and CPU (OpenMP) kernels run ~40% slower when a second
thread's team of workers exists beside the one that computes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, TypeVar

import structlog
import torch

from services.executor import metrics
from services.executor.ranks import RankFailedError
from shared.messages import StageCommand, StepCommand
from shared.model.interface import InferenceEngine
from shared.model.spec import EngineSpec
from shared.runtime import ServiceContext
from shared.transfer import TensorInbox, TransferStats, send_tensors

_T = TypeVar("_T")

# A KV cache is at most a few hundred MB: this bounds sending it and waiting for it (and the
# same for a stage's weights or a micro-batch's hidden states).
KV_TRANSFER_TIMEOUT_S = 60.0
# Seconds between checks that every tensor-parallel rank is alive.
RANK_WATCH_S = 1.0
# Exit status of an executor that lost a tensor-parallel rank (the instance cannot serve).
EXIT_RANK_LOST = 70


def compute_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")


class EngineHost:
    """Holds the current engine (replaced when a plan gives the instance another stage) and
    runs calls on it on the compute thread, in the order they are made."""

    def __init__(
        self,
        engine: InferenceEngine,
        spec: EngineSpec,
        compute: ThreadPoolExecutor,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.engine = engine
        self.spec = spec  # the whole model's; a stage's is this with its layers
        self.log = log
        self._compute = compute

    async def run(self, call: Callable[..., _T], *args: object) -> _T:
        """``call(*args)`` on the compute thread, after every call queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, call, *args)

    def apply_kv_commands(self, command: StepCommand | StageCommand) -> None:
        """Before a step, in this order: release, offload, upload (every stage alike)."""
        engine = self.engine
        if command.release_all:
            engine.release(engine.sequence_ids())
        elif command.release:
            engine.release(command.release)
        if command.offload:
            engine.offload(command.offload)
            metrics.KV_SWAPS.labels("offload").inc(len(command.offload))
        if command.upload:
            engine.upload(command.upload)
            metrics.KV_SWAPS.labels("upload").inc(len(command.upload))

    def start_prefetch(self, request_ids: list[str]) -> None:
        """Queue uploads of these offloaded caches behind the work already queued: they
        overlap the scheduler's commit and planning, and the next step, queued behind them,
        finds the caches in place."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._compute, self._prefetch, request_ids)
        future.add_done_callback(self._prefetch_done)

    def _prefetch(self, request_ids: list[str]) -> list[str]:
        """Upload what is offloaded here, as far as blocks are free; returns what was not."""
        held = set(self.engine.offloaded_ids())
        ready = self.engine.fitting_uploads([rid for rid in request_ids if rid in held])
        if ready:
            self.engine.upload(ready)
            metrics.KV_SWAPS.labels("upload").inc(len(ready))
        return [rid for rid in request_ids if rid not in ready]

    def _prefetch_done(self, future: asyncio.Future[list[str]]) -> None:
        # The scheduler counts on these uploads; if one did not happen its next step is refused
        # and the scheduler recovers (frees everything here and recomputes).
        if future.exception() is not None:
            self.log.error("prefetch.failed", error=repr(future.exception()))
        elif future.result():
            self.log.warning("prefetch.incomplete", not_uploaded=future.result())

    async def watch_ranks(self) -> None:
        """An instance that lost a tensor-parallel rank cannot compute (its all-reduces would
        wait for the dead rank): it ends at once, like a preempted instance without grace, and
        its requests resume elsewhere from their committed tokens."""
        while self.engine.world_size > 1:
            dead = self.engine.dead_ranks()
            if dead:
                self.rank_lost(RankFailedError(f"tensor-parallel ranks {dead} died"))
            await asyncio.sleep(RANK_WATCH_S)

    def rank_lost(self, exc: RankFailedError) -> NoReturn:
        self.log.critical("executor.rank_lost", error=str(exc))
        # Not a graceful stop: the compute thread may be stuck in a collective with the dead
        # rank, and a clean shutdown would wait for it.
        os._exit(EXIT_RANK_LOST)

    def close(self) -> None:
        self._compute.submit(self.engine.close).result()
        self._compute.shutdown(wait=True)


class InstancePart:
    """A part of the executor: what each of them works with (the service, the engine on its
    thread, the tensor inbox, the instance's id)."""

    def __init__(
        self, context: ServiceContext, host: EngineHost, inbox: TensorInbox, instance_id: str
    ) -> None:
        self.context = context
        self.host = host
        self.inbox = inbox
        self.instance_id = instance_id
        self.log = host.log

    async def send_to_peer(
        self, destination: str, tensors: dict[str, torch.Tensor], transfer_id: str
    ) -> TransferStats:
        """Stream tensors to a peer's inbox, under this instance's name, within the bound on
        peer transfers."""
        return await send_tensors(
            self.context.nc,
            destination,
            tensors,
            transfer_id=transfer_id,
            source=self.instance_id,
            timeout_s=KV_TRANSFER_TIMEOUT_S,
        )
