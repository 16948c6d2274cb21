"""The receiver's state of one transfer: its buffer (from a pool of recycled ones), which
chunks arrived, each tensor's running CRC32 and the flow-control credit of its session."""

from __future__ import annotations

import mmap
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from shared.messages import (
    SeqRange,
    TensorSpec,
    TransferAccept,
    TransferAck,
    TransferOffer,
    TransferStatusReply,
    TransferStatusRequest,
)
from shared.transfer.wire import ChunkLayout, aligned, seq_ranges

ChunkKind = Literal["bad", "duplicate", "new"]


@dataclass(frozen=True)
class ReceivedTransfer:
    """A verified transfer. The tensors are views into one buffer (read-write, host memory):
    keeping any of them keeps the whole buffer alive; clone one to keep it alone."""

    transfer_id: str
    source: str
    tensors: dict[str, torch.Tensor]
    nbytes: int
    chunks: int
    duplicates: int  # chunks that arrived again (ignored)
    checksum_failures: int  # tensors received again after a checksum mismatch
    sessions: int  # offers it took (1 + resumes)
    max_in_flight: int  # most chunks delivered to the inbox and not yet acknowledged
    seconds: float


class BufferPool:
    """Receive buffers, recycled.

    A finished transfer's tensors are views into one buffer; once the last of them is gone,
    the buffer comes back here with its pages already mapped instead of going back to the OS
    (the first write into fresh memory costs a page fault per 4 KiB: as much again as the
    copy). Keeps at most ``limit_bytes`` of idle buffers; 0 turns recycling off.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._idle: list[mmap.mmap] = []
        # Buffers come back from whichever thread drops the last tensor.
        self._lock = threading.RLock()

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(len(block) for block in self._idle)

    def take(self, size: int) -> torch.Tensor:
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        block = None
        with self._lock:
            fits = [b for b in self._idle if size <= len(b) <= 2 * size]
            if fits:
                block = min(fits, key=len)
                self._idle.remove(block)
        if block is None:
            block = mmap.mmap(-1, size)
        view = memoryview(block)[:size]
        if self.limit_bytes > 0:
            # torch keeps `view` alive as long as any tensor shares the buffer.
            weakref.finalize(view, self._give_back, block)
        return torch.frombuffer(view, dtype=torch.uint8)

    def _give_back(self, block: mmap.mmap) -> None:
        with self._lock:
            self._idle.append(block)
            while sum(len(b) for b in self._idle) > self.limit_bytes:
                self._idle.pop(0).close()


class Inbound:
    """One transfer being received."""

    def __init__(
        self,
        offer: TransferOffer,
        dtypes: list[torch.dtype],
        window: int,
        now: float,
        pool: BufferPool,
        session: int = 0,
    ) -> None:
        self.offer = offer
        self.transfer_id = offer.transfer_id
        self.source = offer.source
        self.ack_subject = offer.ack_subject
        self.dtypes = dtypes
        self.layout = ChunkLayout([spec.nbytes for spec in offer.tensors], offer.chunk_bytes)
        self.offsets: list[int] = []
        size = 0
        for spec in offer.tensors:
            self.offsets.append(size)
            size += aligned(spec.nbytes)
        self.buffer_bytes = size
        self.buffer: torch.Tensor | None = pool.take(size)
        self.array: np.ndarray | None = self.buffer.numpy() if size else None
        count = len(offer.tensors)
        self.have = bytearray(self.layout.n_chunks)
        self.left = [len(self.layout.chunks_of(i)) for i in range(count)]
        self.expected: list[int | None] = [spec.crc32 for spec in offer.tensors]
        self.verified = [spec.nbytes == 0 for spec in offer.tensors]
        self.unverified = self.verified.count(False)
        self.verifying: set[int] = set()
        # Each tensor's CRC32 so far, computed chunk by chunk as the chunks are written in
        # order: ``crc[i]`` covers its first ``crc_upto[i]`` bytes (-1: a chunk came out of
        # order, the tensor is checked in one pass once complete).
        self.crc = [0] * count
        self.crc_upto = [0] * count
        self.attempts = [0] * count
        # Sessions before ``session`` used another chunk layout: their chunks are ignored.
        self.session = self.first_session = session
        self.sessions = 1
        self.window = window
        # Credit accounting of the current session: granted = acked + window.
        self.acked = 0
        self.max_in_flight = 0
        self.duplicates = 0
        self.checksum_failures = 0
        self.started = now
        self.last_activity = now

    # ---- offers ----

    def same_tensors(self, offer: TransferOffer) -> bool:
        def key(spec: TensorSpec) -> tuple[Any, ...]:
            return spec.name, spec.dtype, tuple(spec.shape), spec.nbytes

        return [key(spec) for spec in offer.tensors] == [key(spec) for spec in self.offer.tensors]

    def accept(self) -> TransferAccept:
        """The answer to the offer that created this transfer."""
        if self.unverified == 0:  # nothing to send: only empty tensors (or none)
            return TransferAccept(
                transfer_id=self.transfer_id,
                state="complete",
                session=self.session,
                window=self.window,
            )
        return TransferAccept(
            transfer_id=self.transfer_id,
            state="accepted",
            session=self.session,
            window=self.window,
            missing=[(0, self.layout.n_chunks)],
        )

    def resume(self, offer: TransferOffer, window: int, now: float) -> TransferAccept:
        """A new session from another offer of the same tensors, maybe from another source:
        the old sender (if alive) is superseded; only the missing chunks are asked for."""
        self.session += 1
        self.sessions += 1
        self.source, self.ack_subject = offer.source, offer.ack_subject
        self.acked = 0
        self.window, self.last_activity = window, now
        return TransferAccept(
            transfer_id=self.transfer_id,
            state="resumed",
            session=self.session,
            window=window,
            missing=seq_ranges(self.have, 0),
        )

    # ---- chunks ----

    def classify(self, seq: int, index: int, size: int, crc_text: str | None) -> ChunkKind:
        """bad: truncated, padded or without the tensor's checksum (asked for again);
        duplicate: already written or its tensor already checked; new: to be written."""
        length = self.layout.locate(seq)[2]
        last = self.layout.is_last_of_tensor(seq, index)
        if size != length or (last and self.expected[index] is None and not crc_text):
            return "bad"
        if self.have[seq] or self.verified[index] or index in self.verifying:
            return "duplicate"
        return "new"

    def target(self, index: int, offset: int, length: int) -> np.ndarray:
        assert self.array is not None
        start = self.offsets[index] + offset
        return self.array[start : start + length]

    def running_crc(self, index: int, offset: int) -> int | None:
        """The tensor's CRC32 up to ``offset`` when its chunks came in order so far (the usual
        case: the CRC32 is carried on over the chunk while it is in cache), else None."""
        return self.crc[index] if self.crc_upto[index] == offset else None

    def record(
        self, seq: int, index: int, length: int, crc: int | None, crc_text: str | None
    ) -> bool:
        """Note a written chunk; True when it completed its tensor (to be verified)."""
        if crc is not None:
            self.crc[index] = crc
            self.crc_upto[index] += length
        else:
            self.crc_upto[index] = -1
        self.have[seq] = 1
        self.left[index] -= 1
        if self.layout.is_last_of_tensor(seq, index) and self.expected[index] is None:
            try:
                self.expected[index] = int(crc_text or "")
            except ValueError:
                self.expected[index] = -1  # fails verification: resent
        return self.left[index] == 0

    def complete_crc(self, index: int) -> int | None:
        """A complete tensor's CRC32 if it was carried on over every chunk, else None."""
        done = self.crc_upto[index] == self.offer.tensors[index].nbytes
        return self.crc[index] if done else None

    def checksum_failed(self, index: int) -> int:
        """Count a tensor's failed check; returns how often it has failed."""
        self.attempts[index] += 1
        self.checksum_failures += 1
        return self.attempts[index]

    def retry_tensor(self, index: int) -> SeqRange:
        """Forget a tensor that failed its checksum; returns its chunks, to be resent."""
        chunks = self.layout.chunks_of(index)
        for seq in chunks:
            self.have[seq] = 0
        self.left[index] = len(chunks)
        self.expected[index] = self.offer.tensors[index].crc32
        self.crc[index] = self.crc_upto[index] = 0
        return chunks.start, chunks.stop

    def region(self, index: int) -> np.ndarray:
        assert self.array is not None
        start = self.offsets[index]
        return self.array[start : start + self.offer.tensors[index].nbytes]

    # ---- status probes, the end ----

    def status(self, request: TransferStatusRequest, now: float) -> TransferStatusReply:
        if request.session != self.session:
            return TransferStatusReply(
                transfer_id=self.transfer_id,
                state="superseded",
                error="another source took the transfer over",
            )
        self.last_activity = now
        # The probe arrived after every chunk the sender published before it (one publisher,
        # one subscription: NATS keeps the order): what has not arrived is lost. Forgive those
        # credits; the missing chunks are resent.
        self.acked = max(self.acked, request.sent)
        return TransferStatusReply(
            transfer_id=self.transfer_id,
            state="active",
            granted=self.acked + self.window,
            missing=seq_ranges(self.have, 0, request.next_seq),
        )

    def ack(self, **fields: Any) -> TransferAck:
        """An ack of the current session: its credit, and ``fields`` (resend, done, error)."""
        return TransferAck(
            transfer_id=self.transfer_id,
            session=self.session,
            granted=self.acked + self.window,
            **fields,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for index, spec in enumerate(self.offer.tensors):
            if spec.nbytes == 0:
                out[spec.name] = torch.empty(spec.shape, dtype=self.dtypes[index])
                continue
            assert self.buffer is not None
            start = self.offsets[index]
            flat = self.buffer[start : start + spec.nbytes].view(self.dtypes[index])
            out[spec.name] = flat.view(spec.shape)
        return out

    def result(self, now: float) -> ReceivedTransfer:
        return ReceivedTransfer(
            transfer_id=self.transfer_id,
            source=self.source,
            tensors=self.tensors(),
            nbytes=self.offer.total_bytes,
            chunks=self.layout.n_chunks,
            duplicates=self.duplicates,
            checksum_failures=self.checksum_failures,
            sessions=self.sessions,
            max_in_flight=self.max_in_flight,
            seconds=now - self.started,
        )

    def free(self) -> None:
        self.array = None
        self.buffer = None
