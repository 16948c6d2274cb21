"""Fast loading of a converted checkpoint (ServerlessLLM's multi-threaded chunked reads).

All partitions are read into ONE host allocation (pinned when CUDA is the target) by several
threads issuing large aligned reads, with O_DIRECT where the filesystem allows it (falling back
to buffered reads otherwise); every tensor is a view into that allocation. For a CUDA target a
copier moves each finished chunk to one device allocation while later chunks are still being
read. Sizes are always checked; CRC32s when ``verify`` is set.

A pipeline stage (``layers``) and/or one tensor-parallel shard (``tp_rank``) reads only its own
byte ranges (``CheckpointIndex.read_ranges``), packed back to back in the one allocation.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import math
import mmap
import os
import queue
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from shared.loading.format import (
    ALIGNMENT,
    ByteRange,
    CheckpointError,
    CheckpointIndex,
    Layers,
    PieceEntry,
    TensorEntry,
    read_index,
    torch_dtype,
)

CHUNK_BYTES = 64 * 1024 * 1024
HUGE_PAGE = 2 * 1024 * 1024
ReadMode = Literal["auto", "direct", "buffered", "mmap"]


@dataclass(frozen=True)
class _Chunk:
    partition: int
    file_offset: int
    buffer_offset: int
    nbytes: int


def _aligned_host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """uint8 host memory whose start is ALIGNMENT-aligned (direct I/O needs it).

    Unpinned memory is an anonymous mapping backed by transparent huge pages where the kernel
    offers them: faulting in fresh 4 KiB pages cost a cold load ~20% of the disk's speed here,
    2 MiB pages almost nothing (see bench.loading)."""
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # page-aligned
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    shift = (-memory.data_ptr()) % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP off ("never"): 4 KiB pages it is
            mapping.madvise(mmap.MADV_HUGEPAGE, shift, nbytes)
    return memory[shift : shift + nbytes]


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass  # e.g. tmpfs: no direct I/O
    return os.open(path, os.O_RDONLY), False


def _check_files(directory: Path, index: CheckpointIndex) -> list[Path]:
    paths = []
    for part in index.partitions:
        path = directory / part.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"partition file {path} is missing") from None
        if size < part.nbytes:
            raise CheckpointError(
                f"partition file {path} is truncated: {size} bytes, the index says {part.nbytes}"
            )
        paths.append(path)
    return paths


def load_checkpoint(
    directory: Path,
    device: str | torch.device = "cpu",
    threads: int = 4,
    chunk_bytes: int = CHUNK_BYTES,
    mode: ReadMode = "auto",
    verify: bool = False,
    layers: Layers | None = None,
    tp_rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a converted checkpoint, as views into one allocation on ``device``.

    ``mode``: "direct" (O_DIRECT reads, bypassing the page cache; buffered where the filesystem
    refuses it), "buffered" (page-cache reads), "mmap" (CPU only: views of the page cache
    itself, no copy), "auto" (mmap when the files are already cached and the target is the CPU,
    else direct).

    ``layers`` (first, last) keeps one pipeline stage: those layers, plus the embeddings when
    first is 0 and the final norm and head when last is the final layer. ``tp_rank`` keeps one
    tensor-parallel shard: its piece of each split tensor, under the tensor's own name, plus the
    replicated tensors. Without a rank, split tensors are reassembled (a copy, not a view).
    With ``verify``, a partial load checks the CRC32 of each tensor it read.
    """
    index = read_index(directory)
    paths = _check_files(directory, index)
    device = torch.device(device)
    everything = index.covers_everything(layers, tp_rank)
    selected = index if everything else index.select(layers, tp_rank)
    if mode == "auto":
        # Cached files are mapped (no copy); cold ones read with O_DIRECT, which keeps several
        # large reads in flight at once and skips the page-cache copy.
        mode = "mmap" if device.type == "cpu" and all(map(_is_cached, paths)) else "direct"
    if mode == "mmap":
        if device.type != "cpu":
            raise ValueError("mode 'mmap' loads into CPU memory only")
        bases = [_mapped(path) for path in paths]
        if verify:
            _verify(selected, bases, paths, whole=everything)
        return _views(selected, bases)
    ranges = index.read_ranges(layers, tp_rank)
    spans = [end - start for _, start, end in ranges]
    starts = [sum(spans[:i]) for i in range(len(spans))]
    host = _aligned_host_buffer(sum(spans), pin=device.type == "cuda")
    chunks = [
        _Chunk(p, offset, starts[i] + offset - first, min(chunk_bytes, end - offset))
        for i, (p, first, end) in enumerate(ranges)
        for offset in range(first, end, chunk_bytes)
    ]
    target = (
        host if device.type == "cpu" else torch.empty(sum(spans), dtype=torch.uint8, device=device)
    )
    _read_all(paths, host, target, chunks, threads, direct=mode == "direct")
    if verify:
        _verify(selected, _slices(host, starts, spans), paths, whole=everything, ranges=ranges)
    return _views(selected, _slices(target, starts, spans), ranges=ranges)


def _slices(buffer: torch.Tensor, starts: list[int], spans: list[int]) -> list[torch.Tensor]:
    return [buffer[start : start + span] for start, span in zip(starts, spans, strict=True)]


def _is_cached(path: Path) -> bool:
    """Whether the file's first, middle and last pages are in the page cache (an RWF_NOWAIT
    read fails with EAGAIN instead of going to the disk)."""
    if not hasattr(os, "RWF_NOWAIT"):
        return False
    size = path.stat().st_size
    probe = bytearray(ALIGNMENT)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in {0, (size // 2) // ALIGNMENT * ALIGNMENT, max(0, size - ALIGNMENT)}:
            try:
                if size and os.preadv(fd, [probe], offset, os.RWF_NOWAIT) <= 0:
                    return False
            except OSError:  # EAGAIN: not cached; or RWF_NOWAIT unsupported here
                return False
    finally:
        os.close(fd)
    return True


def _mapped(path: Path) -> torch.Tensor:
    with open(path, "rb") as handle:
        # Private copy-on-write mapping: writable for torch, backed by the page cache.
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _read_all(
    paths: list[Path],
    host: torch.Tensor,
    target: torch.Tensor,
    chunks: list[_Chunk],
    threads: int,
    direct: bool,
) -> None:
    handles = [_open(path, direct) for path in paths]
    landed: queue.Queue[_Chunk | None] = queue.Queue()
    copier = None
    if target.device.type != "cpu":
        copier = threading.Thread(target=_copy_to_device, args=(host, target, landed))
        copier.start()
    memory = host.numpy()
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = [pool.submit(_read_chunk, handles, memory, chunk, landed) for chunk in chunks]
            for future in futures:
                future.result()
    finally:
        landed.put(None)
        if copier is not None:
            copier.join()
        for fd, _ in handles:
            os.close(fd)


def _read_chunk(
    handles: list[tuple[int, bool]],
    memory: np.ndarray,
    chunk: _Chunk,
    landed: queue.Queue[_Chunk | None],
) -> None:
    fd, direct = handles[chunk.partition]
    view = memory.data[chunk.buffer_offset : chunk.buffer_offset + chunk.nbytes]
    try:
        _read_into(fd, view, chunk.file_offset)
    except OSError as exc:
        if not (direct and exc.errno == errno.EINVAL):
            raise
        # A filesystem that accepted O_DIRECT at open but refuses these reads: read buffered.
        buffered = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            _read_into(buffered, view, chunk.file_offset)
        finally:
            os.close(buffered)
    landed.put(chunk)


def _read_into(fd: int, view: memoryview, file_offset: int) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], file_offset + done)
        if count == 0:
            break  # end of file: the aligned tail past the data is zero padding
        done += count


def _copy_to_device(
    host: torch.Tensor, target: torch.Tensor, landed: queue.Queue[_Chunk | None]
) -> None:
    # torch leaves this constructor unannotated.
    stream = torch.cuda.Stream(device=target.device)  # type: ignore[no-untyped-call]
    with torch.cuda.stream(stream):
        while (chunk := landed.get()) is not None:
            start, end = chunk.buffer_offset, chunk.buffer_offset + chunk.nbytes
            target[start:end].copy_(host[start:end], non_blocking=True)
    stream.synchronize()


def _locator(
    bases: list[torch.Tensor], ranges: list[ByteRange] | None
) -> Callable[[int, int, int], torch.Tensor]:
    """(partition, offset, nbytes) -> those bytes: ``bases[i]`` holds partition i, or, when
    ``ranges`` is given, the bytes of range i."""
    if ranges is None:
        return lambda partition, offset, nbytes: bases[partition][offset : offset + nbytes]
    keys = [(partition, start) for partition, start, _ in ranges]

    def locate(partition: int, offset: int, nbytes: int) -> torch.Tensor:
        i = bisect.bisect_right(keys, (partition, offset)) - 1
        if nbytes == 0:
            return bases[max(i, 0)][:0]
        if i < 0 or ranges[i][0] != partition or offset + nbytes > ranges[i][2]:
            raise CheckpointError(
                f"bytes {offset}..{offset + nbytes} of partition {partition} were not read"
            )
        return bases[i][offset - ranges[i][1] : offset - ranges[i][1] + nbytes]

    return locate


def _verify(
    index: CheckpointIndex,
    bases: list[torch.Tensor],
    paths: list[Path],
    whole: bool = True,
    ranges: list[ByteRange] | None = None,
) -> None:
    """Whole partitions' CRC32s, or (``whole`` False) those of just the tensors in ``index``."""
    if whole:
        for number, part in enumerate(index.partitions):
            data = bases[number][: part.nbytes].numpy().data
            if zlib.crc32(data) != part.crc32:
                raise CheckpointError(f"partition file {paths[number]} is corrupt (CRC32 mismatch)")
        return
    locate = _locator(bases, ranges)
    for name, entry in index.tensors.items():
        pieces = (
            entry.shards
            if entry.split_dim is not None and entry.shards
            else [entry]  # a plain entry, or copy 0 of a per-shard replicated tensor
        )
        for piece in pieces:
            data = locate(piece.partition, piece.offset, piece.nbytes).numpy().data
            if zlib.crc32(data) != piece.crc32:
                raise CheckpointError(
                    f"partition file {paths[piece.partition]} is corrupt (CRC32 mismatch in {name})"
                )


def _views(
    index: CheckpointIndex,
    bases: list[torch.Tensor],
    ranges: list[ByteRange] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors as views of each partition's bytes (``bases[i]`` holds partition i, or range i of
    ``ranges``). Split tensors are reassembled from their shards into a new tensor."""
    locate = _locator(bases, ranges)
    tensors = {}
    for name, entry in index.tensors.items():
        dtype = torch_dtype(entry.dtype)
        if entry.split_dim is not None and entry.shards:
            parts = [_view(name, locate, p, dtype, p.shape) for p in entry.shards]
            tensors[name] = torch.cat(parts, dim=entry.split_dim)
            if list(tensors[name].shape) != entry.shape:
                raise CheckpointError(
                    f"tensor {name}: its shards make shape {list(tensors[name].shape)}, the index"
                    f" says {entry.shape}"
                )
        else:
            tensors[name] = _view(name, locate, entry, dtype, entry.shape)
    return tensors


def _view(
    name: str,
    locate: Callable[[int, int, int], torch.Tensor],
    piece: TensorEntry | PieceEntry,
    dtype: torch.dtype,
    shape: list[int],
) -> torch.Tensor:
    expected = dtype.itemsize * math.prod(shape)
    if expected != piece.nbytes:
        raise CheckpointError(
            f"tensor {name}: {piece.nbytes} bytes in the index, but shape {shape} of"
            f" {str(dtype).removeprefix('torch.')} needs {expected}"
        )
    return locate(piece.partition, piece.offset, piece.nbytes).view(dtype).view(shape)
