"""The host-memory tier: a pool of reusable chunks in shared memory (ServerlessLLM's pinned pool).

The loader owns one pool per node: a file in shared memory (``/dev/shm``) cut into fixed-size
chunks. A model in the pool occupies a list of chunks, in any order, so the memory an evicted
model frees is reused by the next one without new allocations. Eviction is LRU over models that
no executor is copying from (a lease protects a model while an executor reads it).

Executors on the same node map the pool file and copy their model's chunks into their own
single allocation (host or device): the bulk bytes never go over NATS, only the lease does.
Space is reserved chunk by chunk with ``posix_fallocate``: a full ``/dev/shm`` is a clear
``OSError`` at admission, not a SIGBUS while writing through the mapping.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.loading.format import (
    ALIGNMENT,
    CheckpointError,
    CheckpointIndex,
    Layers,
    read_index,
)
from shared.loading.reader import (
    CHUNK_BYTES,
    _aligned_host_buffer,
    _check_files,
    _Chunk,
    _is_cached,
    _read_all,
    _views,
)
from shared.messages import HostLease

POOL_PREFIX = "spotserve-hostpool-"
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; 3.11 lacks the name


def partition_spans(index: CheckpointIndex) -> list[int]:
    """Bytes each partition takes in memory: its data padded to the alignment."""
    return [part.nbytes + (-part.nbytes) % ALIGNMENT for part in index.partitions]


def chunk_plan(index: CheckpointIndex, chunk_bytes: int) -> list[_Chunk]:
    """The model's bytes as pool-sized chunks; ``buffer_offset`` is the offset in a contiguous
    copy of all partitions. The k-th chunk of the plan lives in the k-th chunk of a lease."""
    spans = partition_spans(index)
    starts = [sum(spans[:i]) for i in range(len(spans))]
    return [
        _Chunk(p, offset, starts[p] + offset, min(chunk_bytes, spans[p] - offset))
        for p in range(len(spans))
        for offset in range(0, spans[p], chunk_bytes)
    ]


class PoolLayout:
    """Where a model's bytes lie in a pool: (partition, offset) -> pool offsets, following the
    chunk plan (the k-th chunk of the plan is pool chunk ``chunks[k]``)."""

    def __init__(self, index: CheckpointIndex, chunks: list[int], chunk_bytes: int) -> None:
        plan = chunk_plan(index, chunk_bytes)
        if len(plan) != len(chunks):
            raise CheckpointError(
                f"the pool holds {len(chunks)} chunks of this model, its index needs {len(plan)}"
            )
        self.chunks = chunks
        self.chunk_bytes = chunk_bytes
        self.first_chunk: dict[int, int] = {}
        for k, piece in enumerate(plan):
            self.first_chunk.setdefault(piece.partition, k)

    def segments(self, partition: int, offset: int, nbytes: int) -> Iterator[tuple[int, int]]:
        """(pool offset, length) pieces of ``nbytes`` at ``offset`` of ``partition``."""
        position, end = offset, offset + nbytes
        while position < end:
            k = self.first_chunk[partition] + position // self.chunk_bytes
            within = position % self.chunk_bytes
            length = min(end - position, self.chunk_bytes - within)
            yield self.chunks[k] * self.chunk_bytes + within, length
            position += length


@dataclass
class PooledModel:
    name: str
    directory: Path
    index: CheckpointIndex
    chunks: list[int]
    nbytes: int


def default_pool_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    from shared.config import spotserve_home

    return spotserve_home() / "shm"


def remove_stale_pools(directory: Path) -> list[Path]:
    """Delete pool files of loaders that died without cleaning up (pid in the name)."""
    removed = []
    for path in directory.glob(f"{POOL_PREFIX}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class HostChunkPool:
    """Thread-safe: admissions run in worker threads, lookups and leases on the event loop."""

    def __init__(
        self,
        directory: Path,
        node: str,
        capacity_bytes: int,
        chunk_bytes: int = CHUNK_BYTES,
        read_threads: int = 4,
        direct_io: bool = False,
    ) -> None:
        if chunk_bytes % ALIGNMENT:
            raise ValueError(f"chunk_bytes must be a multiple of {ALIGNMENT}")
        self.chunk_bytes = chunk_bytes
        self.num_chunks = capacity_bytes // chunk_bytes
        if self.num_chunks < 1:
            raise ValueError(f"a host pool of {capacity_bytes} bytes holds no {chunk_bytes} chunk")
        self.read_threads = read_threads
        self.direct_io = direct_io
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_pools(directory)
        self.path = directory / f"{POOL_PREFIX}{node}-{os.getpid()}"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        size = self.num_chunks * chunk_bytes
        os.ftruncate(self._fd, size)  # sparse: memory is used only by chunks in use
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED)
        self._memory = torch.frombuffer(self._map, dtype=torch.uint8)
        self._lock = threading.Lock()
        self._free: list[int] = list(range(self.num_chunks))
        self._reserved: set[int] = set()  # chunks whose space fallocate has already given
        self._models: OrderedDict[str, PooledModel] = OrderedDict()  # LRU first
        self._leases: dict[str, tuple[str, float]] = {}  # lease id -> (model, expires at)

    @property
    def capacity_bytes(self) -> int:
        return self.num_chunks * self.chunk_bytes

    def held(self) -> dict[str, int]:
        with self._lock:
            return {name: model.nbytes for name, model in self._models.items()}

    def free_chunks(self) -> int:
        with self._lock:
            return len(self._free)

    def lookup(self, name: str) -> PooledModel | None:
        with self._lock:
            model = self._models.get(name)
            if model is not None:
                self._models.move_to_end(name)
            return model

    def admit(self, name: str, directory: Path, verify: bool = True) -> PooledModel | None:
        """Read a converted model from disk into the pool (evicting LRU models as needed).

        None when it cannot fit: larger than the pool, or the rest is leased. Blocking."""
        if (model := self.lookup(name)) is not None:
            return model
        index = read_index(directory)
        paths = _check_files(directory, index)
        plan = chunk_plan(index, self.chunk_bytes)
        chunks = self._take(len(plan))
        if chunks is None:
            return None
        try:
            self._reserve(chunks)
            placed = [
                _Chunk(c.partition, c.file_offset, chunks[k] * self.chunk_bytes, c.nbytes)
                for k, c in enumerate(plan)
            ]
            # Files already in the page cache are copied from it; others are read with O_DIRECT
            # when the pool was made with direct_io (falling back where the filesystem refuses).
            direct = self.direct_io and not all(map(_is_cached, paths))
            _read_all(paths, self._memory, self._memory, placed, self.read_threads, direct=direct)
            if verify:
                self._verify(index, chunks, paths)
        except BaseException:
            with self._lock:
                self._free.extend(chunks)
            raise
        model = PooledModel(name, directory, index, chunks, sum(partition_spans(index)))
        with self._lock:
            self._models[name] = model
        return model

    def _take(self, count: int) -> list[int] | None:
        with self._lock:
            if count > self.num_chunks:
                return None
            now = time.monotonic()
            leased = {m for m, expires in self._leases.values() if expires > now}
            for victim in [n for n in self._models if n not in leased]:
                if len(self._free) >= count:
                    break
                self._free.extend(self._models.pop(victim).chunks)
            if len(self._free) < count:
                return None
            # Chunks used before first: their pages are allocated and mapped already.
            self._free.sort(key=lambda chunk: chunk not in self._reserved)
            taken, self._free = self._free[:count], self._free[count:]
            return taken

    def _reserve(self, chunks: list[int]) -> None:
        """Allocate and map new chunks' pages, in parallel threads (it is CPU work: zeroing)."""
        fresh = [chunk for chunk in chunks if chunk not in self._reserved]
        if not fresh:
            return  # the steady state: every chunk was used before
        with ThreadPoolExecutor(max_workers=self.read_threads) as pool:
            list(pool.map(self._reserve_chunk, fresh))
        self._reserved.update(fresh)

    def _reserve_chunk(self, chunk: int) -> None:
        start = chunk * self.chunk_bytes
        # ENOSPC here (shared memory full) instead of a SIGBUS on the first write.
        os.posix_fallocate(self._fd, start, self.chunk_bytes)
        # Map the pages now, once: every later load into this chunk finds them mapped.
        with contextlib.suppress(OSError):  # MADV_POPULATE_WRITE needs Linux 5.14
            self._map.madvise(MADV_POPULATE_WRITE, start, self.chunk_bytes)

    def _verify(self, index: CheckpointIndex, chunks: list[int], paths: list[Path]) -> None:
        """Every stored tensor piece against its CRC32, in parallel (zlib drops the GIL)."""
        layout = PoolLayout(index, chunks, self.chunk_bytes)
        pieces = [
            (name, stored.partition, stored.offset, stored.nbytes, stored.crc32)
            for name, entry in index.tensors.items()
            for stored in (entry.shards if entry.shards else (entry,))
        ]

        def intact(item: tuple[str, int, int, int, int]) -> bool:
            _name, partition, offset, nbytes, expected = item
            crc = 0
            for start, length in layout.segments(partition, offset, nbytes):
                crc = zlib.crc32(self._memory[start : start + length].numpy().data, crc)
            return crc == expected

        with ThreadPoolExecutor(max_workers=self.read_threads) as pool:
            results = list(pool.map(intact, pieces))
        for (name, partition, *_), ok in zip(pieces, results, strict=True):
            if not ok:
                raise CheckpointError(
                    f"partition file {paths[partition]} is corrupt (tensor {name} fails its CRC32)"
                )

    def lease(self, name: str, seconds: float) -> HostLease:
        """Protect a pooled model from eviction while an executor copies it."""
        with self._lock:
            model = self._models[name]
            lease_id = uuid.uuid4().hex
            self._leases[lease_id] = (name, time.monotonic() + seconds)
        return HostLease(
            lease_id=lease_id,
            pool_path=str(self.path),
            chunk_bytes=self.chunk_bytes,
            chunks=model.chunks,
            model_dir=str(model.directory),
        )

    def release(self, lease_id: str) -> bool:
        with self._lock:
            return self._leases.pop(lease_id, None) is not None

    def evict(self, name: str) -> bool:
        with self._lock:
            model = self._models.pop(name, None)
            if model is not None:
                self._free.extend(model.chunks)
            return model is not None

    def close(self) -> None:
        del self._memory
        self._map.close()
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


def load_from_host_pool(
    lease: HostLease,
    device: str | torch.device = "cpu",
    threads: int = 4,
    layers: Layers | None = None,
    tp_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """A leased model's tensors (or one stage / tensor-parallel shard of them, like
    ``load_checkpoint``), copied from the pool into one allocation on ``device``."""
    device = torch.device(device)
    index = read_index(Path(lease.model_dir))
    layout = PoolLayout(index, lease.chunks, lease.chunk_bytes)
    everything = index.covers_everything(layers, tp_rank)
    selected = index if everything else index.select(layers, tp_rank)
    ranges = index.read_ranges(layers, tp_rank)
    spans = [end - start for _, start, end in ranges]
    starts = [sum(spans[:i]) for i in range(len(spans))]
    copies = []  # (destination offset, pool offset, bytes)
    for (partition, first, end), destination in zip(ranges, starts, strict=True):
        for source, length in layout.segments(partition, first, end - first):
            copies.append((destination, source, length))
            destination += length
    with open(lease.pool_path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        target = None
        if device.type == "cuda":
            target = _copy_registered(mapping, copies, sum(spans), device)
        if target is None:
            host = _aligned_host_buffer(sum(spans), pin=device.type == "cuda")
            _copy_chunks(np.frombuffer(mapping, dtype=np.uint8), host.numpy(), copies, threads)
            target = host if device.type == "cpu" else host.to(device)
    finally:
        mapping.close()
    bases = [target[start : start + span] for start, span in zip(starts, spans, strict=True)]
    return _views(selected, bases, ranges)


def _copy_chunks(
    source: np.ndarray, destination: np.ndarray, copies: list[tuple[int, int, int]], threads: int
) -> None:
    def copy(item: tuple[int, int, int]) -> None:
        to, start, length = item
        # numpy releases the GIL for plain copies: the threads copy in parallel.
        np.copyto(destination[to : to + length], source[start : start + length])

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(copy, copies))


def _copy_registered(
    mapping: mmap.mmap, copies: list[tuple[int, int, int]], total: int, device: torch.device
) -> torch.Tensor | None:
    """CUDA: page-lock the mapped pool in this process (cudaHostRegister) and DMA each piece
    straight into one device allocation. None if registration is refused (then the caller
    copies through a pinned staging buffer)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer: it is only ever read
        source = torch.frombuffer(mapping, dtype=torch.uint8)
    # torch leaves cudart() unannotated.
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    # cudaHostRegisterPortable | cudaHostRegisterReadOnly: the pool is mapped read-only here.
    if int(cudart.cudaHostRegister(source.data_ptr(), source.numel(), 0x01 | 0x08)) != 0:
        return None
    try:
        target = torch.empty(total, dtype=torch.uint8, device=device)
        for to, start, length in copies:
            target[to : to + length].copy_(source[start : start + length], non_blocking=True)
        torch.cuda.synchronize(device)
        return target
    finally:
        cudart.cudaHostUnregister(source.data_ptr())
        del source


def host_copy_bps(nbytes: int = 64 * 1024 * 1024) -> float:
    """Measured memory-to-memory copy bandwidth: the host tier's b in q + n/b."""
    source = np.ones(nbytes, dtype=np.uint8)
    destination = np.empty_like(source)
    np.copyto(destination, source)  # first touch of the pages is not what we measure
    started = time.perf_counter()
    np.copyto(destination, source)
    return nbytes / max(time.perf_counter() - started, 1e-9)
