"""What both ends of a transfer agree on: chunk sizes, header names, the chunk layout, tensor
specs and the CRC32 they are checked with."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import torch

from shared.messages import SeqRange, TensorSpec

try:  # ISA-L's CRC32: zlib's checksum (same values), ~7x faster (carry-less multiplication)
    from isal.isal_zlib import crc32 as crc32

    CRC32_IMPLEMENTATION = "isal"
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    from zlib import crc32 as crc32

    CRC32_IMPLEMENTATION = "zlib"


# Chosen with ``python -m bench.transfer --sweep`` (2-4 MiB chunks and windows of 4-8 did
# best; 8 MiB chunks were slower). A server with a smaller max_payload (the stock 1 MiB) gets
# chunks of its max_payload less HEADER_ROOM.
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_WINDOW = 8
MIN_CHUNK_BYTES = 1024
# Room left under the server's max_payload for a chunk's headers.
HEADER_ROOM = 4096
# Tensors start at this alignment inside a transfer's buffer (any dtype can view them).
ALIGNMENT = 64
# Checksums and copies of at least this many bytes run in a thread, off the event loop.
THREAD_BYTES = 1 << 20
# Except for the receiver's copy of a chunk into its buffer with the CRC32 carried on over it:
# up to this size it runs on the event loop (with ISA-L ~0.5 ms for 4 MiB, less than nats-py's
# own copies of the same message there; a hop to a thread and back cost more, ~5% of the
# receiver's CPU in ``python -m bench.transfer``), larger chunks go to a thread.
STORE_INLINE_BYTES = DEFAULT_CHUNK_BYTES if CRC32_IMPLEMENTATION == "isal" else THREAD_BYTES
# The receiver copies a chunk and checksums what it wrote in slices of this size, each while
# it is in the CPU's cache (a micro-benchmark: ~0.035 CPU s per 256 MiB for copy + CRC32,
# against ~0.048 copying 4 MiB at a time and reading it back).
STORE_SLICE_BYTES = 256 << 10

SEQ_HEADER = "Spotserve-Seq"
SESSION_HEADER = "Spotserve-Session"
CRC_HEADER = "Spotserve-Crc32"


class ChunkLayout:
    """Tensor i owns the chunks ``[first_seq[i], first_seq[i] + ceil(nbytes_i / chunk))``."""

    def __init__(self, sizes: list[int], chunk_bytes: int) -> None:
        self.sizes = sizes
        self.chunk_bytes = chunk_bytes
        self.first_seq: list[int] = []
        seq = 0
        for size in sizes:
            self.first_seq.append(seq)
            seq += -(-size // chunk_bytes)
        self.n_chunks = seq

    def chunks_of(self, index: int) -> range:
        start = self.first_seq[index]
        return range(start, start + -(-self.sizes[index] // self.chunk_bytes))

    def locate(self, seq: int) -> tuple[int, int, int]:
        """(tensor index, byte offset in the tensor, length) of chunk ``seq``."""
        # Empty tensors share their first_seq with the next one: the last match is non-empty.
        index = bisect.bisect_right(self.first_seq, seq) - 1
        offset = (seq - self.first_seq[index]) * self.chunk_bytes
        return index, offset, min(self.chunk_bytes, self.sizes[index] - offset)

    def is_last_of_tensor(self, seq: int, index: int) -> bool:
        return seq == self.chunks_of(index).stop - 1


def aligned(nbytes: int) -> int:
    """A tensor's room in a receive buffer: its bytes rounded up to ``ALIGNMENT``."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def seq_ranges(flags: bytearray | bytes, value: int, stop: int | None = None) -> list[SeqRange]:
    """[start, end) ranges of the positions below ``stop`` whose flag equals ``value``."""
    stop = len(flags) if stop is None else min(stop, len(flags))
    ranges: list[SeqRange] = []
    start = None
    for seq in range(stop):
        if flags[seq] == value:
            if start is None:
                start = seq
        elif start is not None:
            ranges.append((start, seq))
            start = None
    if start is not None:
        ranges.append((start, stop))
    return ranges


def iter_ranges(ranges: list[SeqRange]) -> Iterator[int]:
    for start, stop in ranges:
        yield from range(start, stop)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(spec: TensorSpec) -> torch.dtype:
    """The dtype an offered tensor names; ValueError when it is unknown or does not fit the
    tensor's shape and size."""
    dtype = getattr(torch, spec.dtype, None) if not spec.dtype.startswith("_") else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {spec.name!r}: unknown or unsupported dtype {spec.dtype!r}")
    expected = dtype.itemsize
    for dim in spec.shape:
        expected *= dim
    if expected != spec.nbytes:
        raise ValueError(
            f"tensor {spec.name!r}: shape {spec.shape} of {spec.dtype} is {expected} bytes,"
            f" not {spec.nbytes}"
        )
    if spec.nbytes == 0 and spec.crc32 not in (None, 0):
        raise ValueError(f"tensor {spec.name!r} is empty but its crc32 is not 0")
    return dtype
