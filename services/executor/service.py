"""Executor: owns one instance's model and KV cache; runs one decoding iteration per command.

Endpoints (nats.micro, one group per instance, declared in :mod:`shared.rpc`): ``step`` runs a
ragged batch and replies with the sampled token of each sequence, ``stage`` takes a pipeline
micro-batch from the previous stage, ``release`` frees KV slots, ``migrate`` / ``adopt`` move a
KV cache between instances and ``weights`` sends layers to a peer. The forward pass runs on a
dedicated thread (:mod:`services.executor.host`) so the event loop keeps answering pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from nats.errors import Error as NatsError
from nats.micro.service import Service

from services.executor import metrics
from services.executor.engines import build_engine, warm_up
from services.executor.host import EngineHost, InstancePart, compute_thread
from services.executor.kv_moves import KvMoves
from services.executor.registration import Registration
from services.executor.roles import RoleKeeper
from services.executor.stage_link import Placement, StageLink
from services.executor.steps import StepRunner
from services.executor.termination import Termination
from services.executor.weights import WeightsExchange
from shared.bus import reconnected_since
from shared.config import ExecutorSettings
from shared.loading.hostpool import load_from_host_pool
from shared.messages import HostLease, InstanceRecord
from shared.model.interface import InferenceEngine
from shared.model.profile import device_memory_bytes
from shared.model.spec import EngineSpec
from shared.modelsource import fetch_model, node_name, release_host_lease, resolve_model
from shared.readers import follow_plans
from shared.rpc import (
    ADOPT_ENDPOINT,
    EXECUTOR_RELEASE_ENDPOINT,
    MIGRATE_ENDPOINT,
    STAGE_ENDPOINT,
    STEP_ENDPOINT,
    WEIGHTS_ENDPOINT,
    add_endpoint,
    add_raw_endpoint,
)
from shared.runtime import ServiceContext
from shared.subjects import executor_reconnected_subject
from shared.transfer import TensorInbox


def default_instance_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:8]}"


def engine_spec(settings: ExecutorSettings, model_dir: Path) -> EngineSpec:
    return EngineSpec(
        model_dir=model_dir,
        device=settings.device,
        max_slots=settings.max_slots,
        max_seq_len=settings.max_seq_len,
        host_slots=settings.host_kv_slots,
        torch_threads=settings.torch_threads,
        block_size=settings.kv_block_size,
        kv_blocks=settings.kv_blocks,
    )


class Executor:
    """One instance's parts, wired together: the engine on its compute thread, the tensor
    inbox, and the handlers of steps, KV moves, weights and roles."""

    def __init__(self, context: ServiceContext, host: EngineHost, instance_id: str) -> None:
        self.context = context
        self.host = host
        self.instance_id = instance_id
        # KV caches, weights and hidden states other executors send here.
        self.inbox = TensorInbox(context.nc, instance_id)
        self.placement = Placement()
        part = InstancePart(context, host, self.inbox, instance_id)
        link = StageLink(part, self.placement)
        self.steps = StepRunner(part, self.placement, link)
        self.kv = KvMoves(context, host, self.inbox, instance_id)
        self.weights = WeightsExchange(context, host, self.inbox, instance_id)
        self.roles = RoleKeeper(host, self.weights, self.placement, instance_id)

    async def add_endpoints(self, service: Service) -> None:
        # Each instance has its own subjects (the scheduler addresses the instance holding the KV).
        address, log = self.instance_id, self.host.log
        await add_endpoint(service, STEP_ENDPOINT, self.steps.step, address=address, logger=log)
        await add_endpoint(
            service, EXECUTOR_RELEASE_ENDPOINT, self.steps.release, address=address, logger=log
        )
        await add_endpoint(service, MIGRATE_ENDPOINT, self.kv.migrate, address=address, logger=log)
        await add_endpoint(service, ADOPT_ENDPOINT, self.kv.adopt, address=address, logger=log)
        # A stage answers from a task once the later stages have sampled: a raw handler.
        await add_raw_endpoint(service, STAGE_ENDPOINT, self.steps.on_stage, address=address)
        await add_endpoint(
            service, WEIGHTS_ENDPOINT, self.weights.send, address=address, logger=log
        )

    def close(self) -> None:
        self.steps.close()
        self.host.close()


async def load_model(context: ServiceContext, ranks: int) -> tuple[Path, HostLease | None]:
    """The model directory, and a lease on the node's host-memory pool when it holds the
    model (one rank; tensor-parallel ranks read their shards from the node's disk copy)."""
    if context.settings.model.name is None:
        return await resolve_model(context), None
    fetched = await fetch_model(context, host_lease=ranks == 1)
    return Path(fetched.path), fetched.host


async def load_engine(
    context: ServiceContext,
    compute: ThreadPoolExecutor,
    spec: EngineSpec,
    ranks: int,
    lease: HostLease | None,
) -> InferenceEngine:
    """The first engine, warmed up (on the compute thread, like all torch work); from the
    host-memory pool under ``lease``, else from disk."""
    weights = partial(load_from_host_pool, lease) if lease else None

    def load() -> InferenceEngine:
        engine = build_engine(spec, ranks, weights)
        warm_up(engine)
        return engine

    started = time.perf_counter()
    try:
        engine = await asyncio.get_running_loop().run_in_executor(compute, load)
    finally:
        if lease is not None:
            await release_host_lease(context, lease)
    seconds = time.perf_counter() - started
    source = "host-pool" if lease else "disk"
    metrics.MODEL_LOAD_SECONDS.labels("start", source).observe(seconds)
    context.log.info(
        "model.loaded", source=source, tensor_parallel=ranks, seconds=round(seconds, 3)
    )
    return engine


async def announce_reconnects(context: ServiceContext, instance_id: str) -> None:
    """Tell the scheduler each time this connection comes back: a step reply sent while it was
    away is lost (core NATS), and the scheduler then recovers that step at once."""
    subject = executor_reconnected_subject(instance_id)
    while not context.stop.is_set():
        await reconnected_since(context.nc, context.nc.stats["reconnects"])
        context.log.info("executor.reconnected", instance_id=instance_id)
        with contextlib.suppress(NatsError):
            await context.nc.publish(subject, b"")


def service_metadata(
    settings: ExecutorSettings, instance_id: str, engine: InferenceEngine, model_dir: Path
) -> dict[str, str]:
    return {
        "instance_id": instance_id,
        "kv_blocks": str(engine.kv_blocks),
        "kv_block_size": str(engine.block_size),
        "max_seq_len": str(engine.context_length),
        "host_kv_slots": str(settings.host_kv_slots),
        "device": str(engine.device),
        "tensor_parallel": str(settings.tensor_parallel),
        "model": str(model_dir),
    }


def instance_record(
    context: ServiceContext, instance_id: str, engine: InferenceEngine
) -> InstanceRecord:
    settings, monitor = context.settings.executor, context.settings.monitor
    memory = settings.device_memory_bytes
    spot = monitor.price_class == "spot"
    now = time.time()
    return InstanceRecord(
        instance_id=instance_id,
        node=node_name(context.settings),
        devices=settings.tensor_parallel,
        device_kind=engine.device.type,
        device_memory_bytes=memory if memory is not None else device_memory_bytes(engine.device),
        price_class=monitor.price_class,
        price_per_hour=monitor.spot_price_per_hour if spot else monitor.on_demand_price_per_hour,
        pid=os.getpid(),
        started_at=now,
        heartbeat_at=now,
    )


async def serve(context: ServiceContext) -> None:
    settings = context.settings.executor
    instance_id = settings.instance_id or default_instance_id()
    ranks = settings.tensor_parallel
    model_dir, lease = await load_model(context, ranks)
    spec = engine_spec(settings, model_dir)
    compute = compute_thread()
    engine = await load_engine(context, compute, spec, ranks, lease)
    host = EngineHost(engine, spec, compute, context.log.bind(instance_id=instance_id))
    executor = Executor(context, host, instance_id)
    metrics.observe_engine_memory(
        engine.kv_blocks,
        settings.host_kv_slots,
        free_blocks=lambda: host.engine.num_free_blocks,
        offloaded=lambda: len(host.engine.offloaded_ids()),
    )
    service = await context.add_micro_service(
        "Runs decoding iterations of one instance's model",
        metadata=service_metadata(settings, instance_id, engine, model_dir),
    )
    await executor.add_endpoints(service)
    await executor.inbox.start()
    plans = asyncio.create_task(follow_plans(context, executor.roles.take_role), name="plans")
    watch = asyncio.create_task(host.watch_ranks(), name="ranks")
    reconnects = asyncio.create_task(announce_reconnects(context, instance_id), name="reconnects")
    registration = Registration(context, instance_record(context, instance_id, engine))
    await registration.start()
    termination = Termination(context, instance_id)
    await asyncio.to_thread(termination.clear)
    context.on_sigterm = termination.on_sigterm
    host.log.info("executor.ready", device=str(engine.device), model=str(model_dir))
    await context.stop.wait()
    plans.cancel()
    watch.cancel()
    reconnects.cancel()
    await registration.stop()
    await service.stop()
    await executor.inbox.stop()
    executor.close()
