"""Loader: one per node; owns the node's checkpoint tiers.

remote store (JetStream Object Store ``spotserve-models``) -> local disk -> host memory (a
shared-memory pool of reusable chunks, LRU) -> the executor's device. ``spotserve.v1.loader.
<node>.fetch`` brings a converted model to local disk (pulled and checked against its index when
missing) and replies with its path; with ``host_lease`` it also reads the model into the host
pool and leases it to the caller, who copies it from shared memory and then calls ``release``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from services.loader import metrics
from shared import rpc
from shared.codec import encode
from shared.config import spotserve_home
from shared.loading.format import CheckpointError, is_converted, read_index
from shared.loading.hostpool import HostChunkPool, default_pool_dir, host_copy_bps
from shared.loading.store import (
    RemoteStoreError,
    check_model_name,
    inventory_bucket,
    pull_model,
    remote_model_bytes,
)
from shared.messages import (
    FetchModelReply,
    FetchModelRequest,
    HeldModel,
    HostLease,
    LeaseReleased,
    LoaderInventory,
    ReleaseLeaseRequest,
    Tier,
)
from shared.modelsource import node_name
from shared.runtime import ServiceContext

# A refused fetch -> the fetch errors' ``reason`` label.
FETCH_REASON_OF_ERROR: dict[type[rpc.RpcError], str] = {
    rpc.BadRequest: "bad_request",
    rpc.NotFound: "not_found",
    rpc.Unavailable: "unavailable",
}


def count_fetch_refusal(error: rpc.RpcError) -> None:
    reason = FETCH_REASON_OF_ERROR.get(type(error), "internal")
    metrics.FETCH_ERRORS.labels(reason).inc()


class Loader:
    def __init__(
        self,
        context: ServiceContext,
        node: str,
        models_dir: Path,
        pool: HostChunkPool | None = None,
    ) -> None:
        self.context = context
        self.node = node
        self.models_dir = models_dir
        self.pool = pool
        self.log = context.log.bind(node=node)
        # One pull per model at a time; concurrent fetches of it wait for that pull.
        self._locks: dict[str, asyncio.Lock] = {}
        self.bandwidth_bps: dict[str, float] = {}
        # Pulls in progress: (start time, bytes) -> the queue wait q of the estimates.
        self._pulls: dict[str, tuple[float, int]] = {}
        self._inventory: KeyValue | None = None
        # Model -> signature of its files when their CRC32s were last checked.
        self._checked: dict[str, tuple[tuple[int, int, int], ...]] = {}

    async def on_fetch(self, body: FetchModelRequest) -> FetchModelReply:
        try:
            name = check_model_name(body.model)
        except ValueError as exc:
            raise rpc.BadRequest(f"bad fetch request: {exc}") from None
        started = time.perf_counter()
        try:
            path, tier = await self._ensure_local(name)
            lease = None
            if body.host_lease and self.pool is not None:
                tier, lease = await self._lease_from_pool(name, path, tier)
        except CheckpointError as exc:
            self.log.warning("fetch.failed", model=name, error=str(exc))
            raise rpc.NotFound(str(exc)) from None
        except RemoteStoreError as exc:
            self.log.warning("fetch.remote_unavailable", model=name, error=str(exc))
            raise rpc.Unavailable(f"the remote store did not deliver: {exc}; retry later") from None
        seconds = time.perf_counter() - started
        metrics.FETCHES.labels(tier).inc()
        metrics.FETCH_SECONDS.labels(tier).observe(seconds)
        self.log.info("fetch.done", model=name, tier=tier, seconds=round(seconds, 3))
        return FetchModelReply(model=name, path=str(path), tier=tier, seconds=seconds, host=lease)

    async def _lease_from_pool(
        self, name: str, path: Path, tier: Tier
    ) -> tuple[Tier, HostLease | None]:
        """The model in the host pool (read in when missing), leased; no lease if it cannot fit
        (the caller then reads local disk, which is always there)."""
        assert self.pool is not None
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if self.pool.lookup(name) is not None:
                tier = "host-memory"
            else:
                # CRC32s are checked once per file version (inode, size, mtime): at the pull
                # or at the first admission.
                signature = await asyncio.to_thread(_files_signature, path)
                checked = self._checked.get(name) == signature
                verify = self.context.settings.loader.verify and not checked
                started = time.perf_counter()
                try:
                    pooled = await asyncio.to_thread(self.pool.admit, name, path, verify)
                except OSError as exc:  # e.g. /dev/shm full
                    self.log.warning("pool.admit_failed", model=name, error=str(exc))
                    return tier, None
                if pooled is None:
                    self.log.info("pool.no_room", model=name, capacity=self.pool.capacity_bytes)
                    return tier, None
                metrics.LOAD_SECONDS.labels("host-memory").observe(time.perf_counter() - started)
                metrics.LOADED_BYTES.labels("host-memory").inc(pooled.nbytes)
                self._checked[name] = signature
                await self.publish_inventory()
            lease = self.pool.lease(name, self.context.settings.loader.host_lease_s)
            metrics.HOST_LEASES.inc()
            return tier, lease

    async def on_release(self, body: ReleaseLeaseRequest) -> LeaseReleased:
        return LeaseReleased(released=self.pool is not None and self.pool.release(body.lease_id))

    async def _ensure_local(self, name: str) -> tuple[Path, Tier]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            path = self.models_dir / name
            if await asyncio.to_thread(is_converted, path):
                return path, "local-disk"
            started = time.perf_counter()
            nc, js = self.context.nc, self.context.js
            self._pulls[name] = (started, await remote_model_bytes(js, name))
            await self.publish_inventory()
            try:
                await pull_model(nc, js, name, path)
            finally:
                self._pulls.pop(name, None)
            # The pull checked every partition.
            self._checked[name] = await asyncio.to_thread(_files_signature, path)
            pulled = await asyncio.to_thread(_model_bytes, path)
            seconds = time.perf_counter() - started
            metrics.LOAD_SECONDS.labels("local-disk").observe(seconds)
            metrics.LOADED_BYTES.labels("local-disk").inc(pulled)
            self._measured("remote", pulled / seconds)
            await self.publish_inventory()
            return path, "remote"

    def queue_s(self) -> float:
        """Estimated seconds until the pulls in progress are done (0 when idle or unmeasured)."""
        bandwidth = self.bandwidth_bps.get("remote")
        if not bandwidth:
            return 0.0
        now = time.perf_counter()
        return sum(max(0.0, n / bandwidth - (now - t)) for t, n in self._pulls.values())

    def _measured(self, tier: str, bps: float) -> None:
        # Exponentially weighted: recent transfers count most, one outlier does not rule.
        previous = self.bandwidth_bps.get(tier)
        self.bandwidth_bps[tier] = bps if previous is None else 0.7 * bps + 0.3 * previous
        metrics.BANDWIDTH.labels(tier).set(self.bandwidth_bps[tier])

    async def publish_inventory(self) -> None:
        """Put this node's inventory in the KV bucket (the planner's input)."""
        models = await asyncio.to_thread(_held_models, self.models_dir)
        if self.pool is not None:
            for name, nbytes in self.pool.held().items():
                models[name] = HeldModel(tier="host-memory", nbytes=nbytes)
        inventory = LoaderInventory(
            node=self.node,
            models=models,
            bandwidth_bps=dict(self.bandwidth_bps),
            queue_s=self.queue_s(),
            updated_at=time.time(),
        )
        try:
            if self._inventory is None:
                self._inventory = await inventory_bucket(self.context.js)
            await self._inventory.put(self.node, encode(inventory))
        except NatsError as exc:
            self.log.warning("inventory.publish_failed", error=repr(exc))

    async def measure_disk(self) -> None:
        """Local-disk read bandwidth, from a sequential read of a file written for it."""
        bps = await asyncio.to_thread(_disk_read_bps, self.models_dir)
        self._measured("local-disk", bps)
        if self.pool is not None:
            self._measured("host-memory", await asyncio.to_thread(host_copy_bps))


def _files_signature(path: Path) -> tuple[tuple[int, int, int], ...]:
    stats = [file.stat() for file in sorted(path.glob("part-*.bin"))]
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


def _model_bytes(path: Path) -> int:
    return sum(part.nbytes for part in read_index(path).partitions)


def _held_models(models_dir: Path) -> dict[str, HeldModel]:
    if not models_dir.is_dir():
        return {}
    return {
        entry.name: HeldModel(tier="local-disk", nbytes=_model_bytes(entry))
        for entry in sorted(models_dir.iterdir())
        if not entry.name.startswith(".") and is_converted(entry)
    }


def _disk_read_bps(models_dir: Path, nbytes: int = 64 * 1024 * 1024) -> float:
    """Write a probe file, evict it from the page cache, time one sequential read of it."""
    models_dir.mkdir(parents=True, exist_ok=True)
    probe = models_dir / ".bandwidth-probe"
    try:
        with open(probe, "wb") as handle:
            handle.write(os.urandom(1024 * 1024) * (nbytes // (1024 * 1024)))
            handle.flush()
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        with open(probe, "rb", buffering=0) as handle:
            while handle.read(16 * 1024 * 1024):
                pass
        return nbytes / (time.perf_counter() - started)
    finally:
        probe.unlink(missing_ok=True)


async def serve(context: ServiceContext) -> None:
    settings = context.settings.loader
    node = node_name(context.settings)
    models_dir = settings.models_dir or spotserve_home() / "checkpoints"
    pool = None
    if settings.host_pool_bytes:
        pool = await asyncio.to_thread(
            HostChunkPool,
            settings.host_pool_dir or default_pool_dir(),
            node,
            settings.host_pool_bytes,
            settings.host_pool_chunk_bytes,
            direct_io=settings.direct_io,
        )
    loader = Loader(context, node, models_dir, pool)
    if pool is not None:
        metrics.HOST_POOL_CAPACITY.set(pool.capacity_bytes)
        # Read when scraped (the pool is thread-safe).
        metrics.HOST_POOL_USED.set_function(
            lambda: pool.capacity_bytes - pool.free_chunks() * pool.chunk_bytes
        )
    service = await context.add_micro_service(
        "Brings converted models from the remote store to this node's disk and host memory",
        metadata={
            "node": node,
            "models_dir": str(models_dir),
            "host_pool": str(pool.path) if pool else "",
        },
    )
    await rpc.add_endpoint(
        service,
        rpc.FETCH_ENDPOINT,
        loader.on_fetch,
        address=node,
        logger=loader.log,
        on_error=count_fetch_refusal,
    )
    await rpc.add_endpoint(
        service, rpc.LEASE_RELEASE_ENDPOINT, loader.on_release, address=node, logger=loader.log
    )
    await loader.measure_disk()
    await loader.publish_inventory()
    loader.log.info("loader.ready", models_dir=str(models_dir), bandwidth_bps=loader.bandwidth_bps)
    try:
        await context.stop.wait()
        await service.stop()
    finally:
        if pool is not None:
            pool.close()
