"""Peer-to-peer tensor streaming over core NATS: chunked, credit flow controlled, checksummed.

Executors hand each other weights (by layer / shard) and KV caches (by request) with this:

* the receiver runs a :class:`TensorInbox` for its instance: it accepts offers, grants
  credits, writes chunks into one preallocated buffer per transfer (the tensors are views
  into it), verifies every tensor's size and CRC32 and then hands the tensors over (an
  ``on_complete`` callback and/or ``await inbox.receive(transfer_id)``). It carries each
  tensor's CRC32 on over the bytes it has just written, chunk by chunk, while they arrive in
  order (the usual case); a tensor whose chunks came out of order is checked in one pass over
  its buffer (in a thread) once complete;
* the sender calls :func:`send_tensors`, which never has more than ``window`` chunks
  unacknowledged: it publishes only against credit the receiver returned after writing.

Protocol (subjects in :mod:`shared.subjects`, models in :mod:`shared.messages`):

1. ``spotserve.v1.transfer.<dst>.offer`` (request): :class:`TransferOffer` - transfer id, the
   tensors (name, dtype, shape, nbytes, crc32 when known), chunk size, the window the sender
   would like and its ack subject. Reply :class:`TransferAccept` (the granted window, the chunk
   ranges to send: all of them, or only the missing ones when a transfer of that id is already
   in progress - a resume, possibly from another source) or an error (nats.micro headers +
   :class:`ErrorReply`).
2. ``spotserve.v1.transfer.<dst>.data.<transfer_id>``: the chunks, raw bytes; the headers carry
   the sequence number, the session (one per offer of a transfer id) and, on a tensor's last
   chunk, the tensor's CRC32 (the sender computes checksums in a thread while it streams).
   Chunk ``seq`` is a fixed-size slice of one tensor (tensors are chunked one after another in
   offer order; a tensor's last chunk may be short), so the layout is known to both sides.
3. The receiver publishes a :class:`TransferAck` to the sender's ack subject after each chunk
   it has written (``granted`` is cumulative, so acks may be lost or reordered), with resend
   requests (a tensor whose checksum failed), ``done`` when every tensor is verified, or
   ``error`` when it gives up (a tensor failed its checksum too often).
4. A sender that hears nothing for ``stall_timeout_s`` probes ``….status``: the reply says
   which chunks are missing (lost ones are resent) and renews the credit, or that the transfer
   is complete / failed / unknown; "no responders" means the receiver is gone - the sender
   fails at once with :class:`TransferError` and the caller can try another destination.
5. ``….abort``: a cancelled sender tells the receiver to free the transfer now.

Checksums are CRC-32 as zlib computes them (``zlib.crc32`` values, so checksums known from
elsewhere can be passed in), computed with ISA-L's SIMD implementation (the ``isal``
package: ~15 GB/s a core against zlib's ~2) when it is installed, else with zlib; both
release the GIL.

Receive buffers come from a small pool: a buffer whose tensors are all gone is reused
(pages already mapped) by a later transfer instead of being returned to the OS.

A receiver frees a transfer whose source went silent for ``idle_timeout_s`` and reports it
failed; an offer of the same id from another holder resumes it before that (only the missing
chunks; with another chunk size it starts over), or starts it afresh after. Duplicate and
out-of-order chunks are harmless (idempotent by sequence number).
Nothing is handed over before every tensor has passed its checksum.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import inspect
import mmap
import os
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
import torch
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from pydantic import ValidationError

from shared.codec import DecodeError, decode, encode
from shared.messages import (
    ErrorCode,
    ErrorDetail,
    ErrorReply,
    SeqRange,
    TensorSpec,
    TransferAbort,
    TransferAccept,
    TransferAck,
    TransferOffer,
    TransferStatusReply,
    TransferStatusRequest,
)
from shared.subjects import (
    TRANSFER_SUBJECT_PREFIX,
    transfer_abort_subject,
    transfer_data_subject,
    transfer_inbox_subject,
    transfer_offer_subject,
    transfer_status_subject,
)

try:  # ISA-L's CRC32: zlib's checksum (same values), ~7x faster (carry-less multiplication)
    from isal.isal_zlib import crc32 as _crc32

    CRC32_IMPLEMENTATION = "isal"
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    from zlib import crc32 as _crc32

    CRC32_IMPLEMENTATION = "zlib"

log = structlog.get_logger()

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

Tamper = Callable[[int, memoryview], "bytes | bytearray | memoryview | None"]


class TransferError(RuntimeError):
    """A send did not complete: the receiver refused, failed it, vanished or timed out."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransferTimeoutError(TransferError):
    """The whole transfer did not complete within ``timeout_s``."""


class TransferFailedError(RuntimeError):
    """Receiver side: the transfer was given up (its sender went silent, a checksum kept
    failing, the sender aborted, the inbox stopped). Another offer of the id may follow."""

    def __init__(self, transfer_id: str, reason: str) -> None:
        super().__init__(f"transfer {transfer_id} failed: {reason}")
        self.transfer_id = transfer_id
        self.reason = reason


@dataclass(frozen=True)
class TransferStats:
    """What :func:`send_tensors` did."""

    transfer_id: str
    destination: str
    state: Literal["accepted", "resumed", "complete"]  # the receiver's answer to the offer
    tensors: int
    total_bytes: int
    chunk_bytes: int
    window: int  # granted by the receiver
    chunks: int  # in the whole transfer
    chunks_sent: int  # resends included
    chunks_resent: int
    bytes_sent: int
    probes: int  # status probes after a stall
    max_in_flight: int  # most chunks unacknowledged at once (never more than ``window``)
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


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


# -- the chunk layout, shared by both sides ----------------------------------------------------


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


def _ranges(flags: bytearray | bytes, value: int, stop: int | None = None) -> list[SeqRange]:
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(spec: TensorSpec) -> torch.dtype:
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


def _error_of(msg: Msg) -> tuple[str, str] | None:
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        return headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, "")
    return None


# -- receiver ------------------------------------------------------------------------------------


class _BufferPool:
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


class _Inbound:
    """One transfer being received."""

    def __init__(
        self,
        offer: TransferOffer,
        dtypes: list[torch.dtype],
        window: int,
        now: float,
        pool: _BufferPool,
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
            size += -(-spec.nbytes // ALIGNMENT) * ALIGNMENT
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
        self.session = 0
        self.first_session = 0
        self.sessions = 1
        self.window = window
        # Credit accounting of the current session (see TensorInbox._on_chunk).
        self.acked = 0  # chunks acknowledged in this session: granted = acked + window
        self.max_in_flight = 0
        self.duplicates = 0
        self.checksum_failures = 0
        self.started = now
        self.last_activity = now

    def same_tensors(self, offer: TransferOffer) -> bool:
        def key(spec: TensorSpec) -> tuple[Any, ...]:
            return spec.name, spec.dtype, tuple(spec.shape), spec.nbytes

        return [key(spec) for spec in offer.tensors] == [key(spec) for spec in self.offer.tensors]

    def region(self, index: int) -> np.ndarray:
        assert self.array is not None
        start = self.offsets[index]
        return self.array[start : start + self.offer.tensors[index].nbytes]

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

    def free(self) -> None:
        self.array = None
        self.buffer = None


def _store(target: np.ndarray, data: bytes, crc: int | None) -> int | None:
    """Copy a chunk into its place; with ``crc`` (the tensor's CRC32 up to the chunk), the
    CRC32 carried on over the written bytes, a slice at a time while the slice is in cache.
    Neither holds the GIL (numpy's copy, ISA-L/zlib)."""
    source = np.frombuffer(data, dtype=np.uint8)
    for start in range(0, len(source), STORE_SLICE_BYTES):
        written = target[start : start + STORE_SLICE_BYTES]
        np.copyto(written, source[start : start + STORE_SLICE_BYTES])
        if crc is not None:
            crc = _crc32(written, crc)
    return crc


OnComplete = Callable[[ReceivedTransfer], "Awaitable[None] | None"]
OnFailed = Callable[[str, str], "Awaitable[None] | None"]


class TensorInbox:
    """An instance's receiving end: ``async with TensorInbox(nc, "inst-1") as inbox: ...``.

    Finished transfers go to ``on_complete`` and to whoever awaits :meth:`receive`; with
    neither, they wait (in memory) until :meth:`receive` claims them.

    ``window``: the most chunks a sender may have unacknowledged (per transfer; a sender may
    ask for fewer). ``idle_timeout_s``: a transfer whose source sent nothing for this long is
    failed and its buffer freed. ``max_bytes``: the most buffer bytes of transfers in progress
    (offers beyond it are refused: 413 larger than that at all, 503 busy now).
    ``checksum_retries``: how often a tensor that fails its CRC32 is asked for again before the
    transfer fails. ``pending_bytes_limit``: nats-py's limit on chunks queued here (several
    transfers' windows must fit). ``pool_bytes``: idle receive buffers kept for reuse.
    """

    def __init__(
        self,
        nc: Client,
        instance_id: str,
        *,
        window: int = DEFAULT_WINDOW,
        idle_timeout_s: float = 30.0,
        max_bytes: int | None = None,
        checksum_retries: int = 2,
        on_complete: OnComplete | None = None,
        on_failed: OnFailed | None = None,
        pending_bytes_limit: int = 256 * 1024 * 1024,
        pool_bytes: int = 512 << 20,
    ) -> None:
        self.nc = nc
        self.instance_id = instance_id
        self.window = window
        self.idle_timeout_s = idle_timeout_s
        self.max_bytes = max_bytes
        self.checksum_retries = checksum_retries
        self.on_complete = on_complete
        self.on_failed = on_failed
        self.pending_bytes_limit = pending_bytes_limit
        self.log = log.bind(instance_id=instance_id)
        self._prefix = f"{TRANSFER_SUBJECT_PREFIX}.{instance_id}."
        self._pool = _BufferPool(pool_bytes)
        self._active: dict[str, _Inbound] = {}
        self._finished: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._results: dict[str, ReceivedTransfer] = {}
        self._waiters: dict[str, list[asyncio.Future[ReceivedTransfer]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Recent failures (transfer id -> reason), for operators and tests.
        self.failures: OrderedDict[str, str] = OrderedDict()
        # Most chunks delivered and not yet written and acknowledged, over every transfer.
        self.max_in_flight = 0
        self.dropped_chunks = 0  # chunks of unknown transfers or without valid headers

    # ---- lifecycle ----

    @property
    def max_chunk_bytes(self) -> int:
        return self.nc.max_payload - HEADER_ROOM

    @property
    def active_bytes(self) -> int:
        """Bytes of the buffers held by transfers in progress."""
        return sum(inbound.buffer_bytes for inbound in self._active.values())

    @property
    def pooled_bytes(self) -> int:
        """Bytes of idle receive buffers kept for reuse (at most ``pool_bytes``)."""
        return self._pool.idle_bytes

    @property
    def active(self) -> list[str]:
        return list(self._active)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            transfer_inbox_subject(self.instance_id),
            cb=self._on_message,
            pending_bytes_limit=self.pending_bytes_limit,
            pending_msgs_limit=1 << 20,
        )
        # nats-py puts a flush's PING ahead of commands still pending (the SUB): the second
        # PONG comes after the server has registered the subscription.
        await self.nc.flush(timeout=10)
        await self.nc.flush(timeout=10)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for inbound in list(self._active.values()):
            await self._fail(inbound, "the receiving inbox stopped")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> TensorInbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def receive(self, transfer_id: str, timeout_s: float) -> ReceivedTransfer:
        """The transfer once complete; :class:`TransferFailedError` if it is given up while
        waited for (a re-sourced retry may follow: wait again), TimeoutError after timeout_s."""
        if transfer_id in self._results:
            return self._results.pop(transfer_id)
        future: asyncio.Future[ReceivedTransfer] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(transfer_id, [])
        waiters.append(future)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise TimeoutError(
                f"transfer {transfer_id} did not arrive within {timeout_s:.1f} s"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(transfer_id, None)

    # ---- dispatch ----

    async def _on_message(self, msg: Msg) -> None:
        kind = msg.subject.removeprefix(self._prefix)
        try:
            if kind.startswith("data."):
                await self._on_chunk(kind.removeprefix("data."), msg)
            elif kind == "offer":
                await self._on_offer(msg)
            elif kind == "status":
                await self._on_status(msg)
            elif kind == "abort":
                await self._on_abort(msg)
            elif msg.reply:
                await self._reply_error(msg, ErrorCode.NOT_FOUND, f"no such subject {msg.subject}")
        except Exception as exc:  # never let a bad message take the inbox down
            self.log.exception("transfer.inbox_error", subject=msg.subject)
            if msg.reply and not kind.startswith("data."):
                with contextlib.suppress(Exception):
                    await self._reply_error(msg, ErrorCode.INTERNAL, f"inbox error: {exc!r}")

    async def _reply_error(self, msg: Msg, code: ErrorCode, message: str) -> None:
        message = " ".join(message.split())[:2000]  # header values are single lines
        body = ErrorReply(error=ErrorDetail(code=str(code), message=message))
        headers = {ERROR_CODE_HEADER: str(code), ERROR_HEADER: message}
        await self.nc.publish(msg.reply, encode(body), headers=headers)

    # ---- offers ----

    async def _on_offer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            offer = TransferOffer.model_validate(decode(msg.data))
            dtypes = [_torch_dtype(spec) for spec in offer.tensors]
        except (DecodeError, ValidationError, ValueError) as exc:
            await self._reply_error(msg, ErrorCode.BAD_REQUEST, f"bad transfer offer: {exc}")
            return
        if not MIN_CHUNK_BYTES <= offer.chunk_bytes <= self.max_chunk_bytes:
            await self._reply_error(
                msg,
                ErrorCode.BAD_REQUEST,
                f"bad transfer offer: chunk_bytes {offer.chunk_bytes} is outside"
                f" [{MIN_CHUNK_BYTES}, {self.max_chunk_bytes}] (the server's max_payload"
                f" {self.nc.max_payload} less {HEADER_ROOM} bytes for headers)",
            )
            return
        tid = offer.transfer_id
        now = time.monotonic()
        window = min(offer.window, self.window)
        existing = self._active.get(tid)
        session = 0
        if existing is not None and not existing.same_tensors(offer):
            await self._reply_error(
                msg, ErrorCode.BAD_REQUEST, f"transfer {tid} is in progress with other tensors"
            )
            return
        if existing is not None and existing.offer.chunk_bytes != offer.chunk_bytes:
            # The same tensors in other chunks: start over (the old sender is superseded).
            session = existing.session + 1
            del self._active[tid]
            existing.free()
            existing = None
        if existing is not None:
            # Resume, maybe from another source: the old sender (if alive) is superseded.
            existing.session += 1
            existing.sessions += 1
            existing.source, existing.ack_subject = offer.source, offer.ack_subject
            existing.acked = 0
            existing.window, existing.last_activity = window, now
            accept = TransferAccept(
                transfer_id=tid,
                state="resumed",
                session=existing.session,
                window=window,
                missing=_ranges(existing.have, 0),
            )
            self.log.info("transfer.resumed", transfer_id=tid, source=offer.source)
            await msg.respond(encode(accept))
            return
        finished = self._finished.get(tid)
        if finished is not None and finished[0] == "complete":
            accept = TransferAccept(transfer_id=tid, state="complete", session=0, window=window)
            await msg.respond(encode(accept))
            return
        padded = sum(-(-spec.nbytes // ALIGNMENT) * ALIGNMENT for spec in offer.tensors)
        if self.max_bytes is not None:
            if padded > self.max_bytes:
                await self._reply_error(
                    msg,
                    ErrorCode.TOO_LARGE,
                    f"transfer {tid} needs {padded} bytes, this inbox takes at most"
                    f" {self.max_bytes}",
                )
                return
            if self.active_bytes + padded > self.max_bytes:
                await self._reply_error(
                    msg,
                    ErrorCode.UNAVAILABLE,
                    f"inbox busy: {self.active_bytes} of {self.max_bytes} bytes held by"
                    f" transfers in progress; retry later",
                )
                return
        inbound = _Inbound(offer, dtypes, window, now, self._pool)
        # Sessions before this one used another chunk layout: their chunks are ignored.
        inbound.session = inbound.first_session = session
        self._finished.pop(tid, None)  # a failed earlier attempt starts afresh
        self._active[tid] = inbound
        self.log.info(
            "transfer.accepted",
            transfer_id=tid,
            source=offer.source,
            tensors=len(offer.tensors),
            nbytes=offer.total_bytes,
            chunks=inbound.layout.n_chunks,
            window=window,
        )
        if inbound.unverified == 0:  # nothing to send: only empty tensors (or none)
            accept = TransferAccept(
                transfer_id=tid, state="complete", session=session, window=window
            )
            await msg.respond(encode(accept))
            await self._complete(inbound, tell_sender=False)
            return
        accept = TransferAccept(
            transfer_id=tid,
            state="accepted",
            session=session,
            window=window,
            missing=[(0, inbound.layout.n_chunks)],
        )
        await msg.respond(encode(accept))

    # ---- chunks ----

    async def _on_chunk(self, transfer_id: str, msg: Msg) -> None:
        inbound = self._active.get(transfer_id)
        headers = msg.headers or {}
        try:
            seq = int(headers[SEQ_HEADER])
            session = int(headers[SESSION_HEADER])
        except (KeyError, ValueError):
            seq = session = -1
        if inbound is None or session < inbound.first_session:
            self.dropped_chunks += 1
            return
        inbound.last_activity = time.monotonic()
        current = session == inbound.session
        # Chunks delivered here and not yet written and acknowledged: this one and those
        # queued behind it (of any transfer: exact while one transfer is active). A sender
        # that keeps to its credit never gets more than its window queued here.
        queued = 1 + (self._sub.pending_msgs if self._sub is not None else 0)
        inbound.max_in_flight = max(inbound.max_in_flight, queued)
        self.max_in_flight = max(self.max_in_flight, queued)
        resend: list[SeqRange] = []
        if 0 <= seq < inbound.layout.n_chunks:
            index, offset, length = inbound.layout.locate(seq)
            data = msg.data
            last = inbound.layout.is_last_of_tensor(seq, index)
            crc_text = headers.get(CRC_HEADER)
            if len(data) != length or (last and inbound.expected[index] is None and not crc_text):
                # Truncated, padded or without the tensor's checksum: ask for it again.
                self.log.warning("transfer.bad_chunk", transfer_id=transfer_id, seq=seq)
                resend.append((seq, seq + 1))
            elif inbound.have[seq] or inbound.verified[index] or index in inbound.verifying:
                inbound.duplicates += 1
            else:
                assert inbound.array is not None
                start = inbound.offsets[index] + offset
                target = inbound.array[start : start + length]
                # In order (the usual case): carry the tensor's CRC32 on over this chunk
                # while it is still in cache, instead of another pass over the whole tensor.
                in_order = inbound.crc_upto[index] == offset
                running = inbound.crc[index] if in_order else None
                if length > STORE_INLINE_BYTES:
                    crc = await asyncio.to_thread(_store, target, data, running)
                    if self._active.get(transfer_id) is not inbound:
                        return  # failed or stopped meanwhile
                else:
                    crc = _store(target, data, running)
                if crc is not None:
                    inbound.crc[index] = crc
                    inbound.crc_upto[index] += length
                else:
                    inbound.crc_upto[index] = -1
                inbound.have[seq] = 1
                inbound.left[index] -= 1
                if last and inbound.expected[index] is None:
                    try:
                        inbound.expected[index] = int(crc_text or "")
                    except ValueError:
                        inbound.expected[index] = -1  # fails verification: resent
                if inbound.left[index] == 0:
                    spec = inbound.offer.tensors[index]
                    done = inbound.crc_upto[index] == spec.nbytes
                    inbound.verifying.add(index)
                    self._spawn(self._verify(inbound, index, inbound.crc[index] if done else None))
        if current:
            inbound.acked += 1
            await self._ack(inbound, resend=resend)

    async def _ack(self, inbound: _Inbound, **fields: Any) -> None:
        ack = TransferAck(
            transfer_id=inbound.transfer_id,
            session=inbound.session,
            granted=inbound.acked + inbound.window,
            **fields,
        )
        await self.nc.publish(inbound.ack_subject, encode(ack))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _verify(self, inbound: _Inbound, index: int, crc: int | None) -> None:
        """Check a complete tensor against its CRC32: ``crc`` if it was computed chunk by
        chunk, else in one pass over the buffer (in a thread when large)."""
        if self._active.get(inbound.transfer_id) is not inbound:
            return  # failed or stopped meanwhile
        inbound.verifying.add(index)
        try:
            if crc is None:
                region = inbound.region(index)
                if len(region) >= THREAD_BYTES:
                    crc = await asyncio.to_thread(_crc32, region)
                else:
                    crc = _crc32(region)
        finally:
            inbound.verifying.discard(index)
        if self._active.get(inbound.transfer_id) is not inbound:
            return  # failed or stopped meanwhile
        spec = inbound.offer.tensors[index]
        if crc == inbound.expected[index]:
            inbound.verified[index] = True
            inbound.unverified -= 1
            if inbound.unverified == 0:
                await self._complete(inbound)
            return
        inbound.attempts[index] += 1
        inbound.checksum_failures += 1
        self.log.warning(
            "transfer.checksum_mismatch",
            transfer_id=inbound.transfer_id,
            tensor=spec.name,
            attempt=inbound.attempts[index],
        )
        if inbound.attempts[index] > self.checksum_retries:
            await self._fail(
                inbound,
                f"tensor {spec.name!r} failed its size/CRC32 check {inbound.attempts[index]} times",
            )
            return
        chunks = inbound.layout.chunks_of(index)
        for seq in chunks:
            inbound.have[seq] = 0
        inbound.left[index] = len(chunks)
        inbound.expected[index] = spec.crc32
        inbound.crc[index] = inbound.crc_upto[index] = 0
        await self._ack(inbound, resend=[(chunks.start, chunks.stop)])

    async def _complete(self, inbound: _Inbound, tell_sender: bool = True) -> None:
        tid = inbound.transfer_id
        del self._active[tid]
        self._remember(tid, "complete", None)
        result = ReceivedTransfer(
            transfer_id=tid,
            source=inbound.source,
            tensors=inbound.tensors(),
            nbytes=inbound.offer.total_bytes,
            chunks=inbound.layout.n_chunks,
            duplicates=inbound.duplicates,
            checksum_failures=inbound.checksum_failures,
            sessions=inbound.sessions,
            max_in_flight=inbound.max_in_flight,
            seconds=time.monotonic() - inbound.started,
        )
        inbound.free()
        self.log.info(
            "transfer.complete",
            transfer_id=tid,
            source=inbound.source,
            nbytes=result.nbytes,
            seconds=round(result.seconds, 4),
        )
        if tell_sender:
            with contextlib.suppress(Exception):
                await self._ack(inbound, done=True)
        waiters = self._waiters.get(tid, [])
        for future in waiters:
            if not future.done():
                future.set_result(result)
        if self.on_complete is not None:
            await self._call(self.on_complete, result)
        elif not waiters:
            self._results[tid] = result

    async def _fail(self, inbound: _Inbound, reason: str, tell_sender: bool = True) -> None:
        tid = inbound.transfer_id
        if self._active.get(tid) is not inbound:
            return
        del self._active[tid]
        inbound.free()
        self._remember(tid, "failed", reason)
        self.failures[tid] = reason
        while len(self.failures) > 1024:
            self.failures.popitem(last=False)
        self.log.warning("transfer.failed", transfer_id=tid, source=inbound.source, reason=reason)
        if tell_sender:
            with contextlib.suppress(Exception):
                await self._ack(inbound, error=reason)
        for future in self._waiters.get(tid, []):
            if not future.done():
                future.set_exception(TransferFailedError(tid, reason))
        if self.on_failed is not None:
            await self._call(self.on_failed, tid, reason)

    async def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.log.exception("transfer.callback_error")

    def _remember(self, transfer_id: str, state: str, reason: str | None) -> None:
        self._finished[transfer_id] = (state, reason)
        self._finished.move_to_end(transfer_id)
        while len(self._finished) > 4096:
            self._finished.popitem(last=False)

    # ---- status probes, aborts, idle sources ----

    async def _on_status(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            request = TransferStatusRequest.model_validate(decode(msg.data))
        except (DecodeError, ValidationError) as exc:
            await self._reply_error(msg, ErrorCode.BAD_REQUEST, f"bad status request: {exc}")
            return
        tid = request.transfer_id
        inbound = self._active.get(tid)
        if inbound is None:
            state, reason = self._finished.get(tid, ("unknown", None))
            reply = TransferStatusReply(transfer_id=tid, state=state, error=reason)  # type: ignore[arg-type]
        elif request.session != inbound.session:
            reply = TransferStatusReply(
                transfer_id=tid, state="superseded", error="another source took the transfer over"
            )
        else:
            inbound.last_activity = time.monotonic()
            # The probe arrived after every chunk the sender published before it (one
            # publisher, one subscription: NATS keeps the order): what has not arrived is
            # lost. Forgive those credits; the missing chunks are resent.
            inbound.acked = max(inbound.acked, request.sent)
            reply = TransferStatusReply(
                transfer_id=tid,
                state="active",
                granted=inbound.acked + inbound.window,
                missing=_ranges(inbound.have, 0, request.next_seq),
            )
        await msg.respond(encode(reply))

    async def _on_abort(self, msg: Msg) -> None:
        try:
            abort = TransferAbort.model_validate(decode(msg.data))
        except (DecodeError, ValidationError) as exc:
            if msg.reply:
                await self._reply_error(msg, ErrorCode.BAD_REQUEST, f"bad abort: {exc}")
            return
        inbound = self._active.get(abort.transfer_id)
        if inbound is not None and inbound.session == abort.session:
            await self._fail(inbound, f"aborted by its sender: {abort.reason}", tell_sender=False)

    async def _sweep(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for inbound in list(self._active.values()):
                idle = now - inbound.last_activity
                if idle > self.idle_timeout_s and not inbound.verifying:
                    await self._fail(
                        inbound,
                        f"nothing from its source {inbound.source} for {idle:.1f} s"
                        " (the sender is gone or stalled)",
                    )


# -- sender --------------------------------------------------------------------------------------


def _host_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """The tensor's bytes in host memory, contiguous (a copy only when needed)."""
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise TypeError(f"cannot stream a {tensor.layout} / quantized tensor")
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    host = host.resolve_conj().resolve_neg().contiguous()
    return host, memoryview(host.reshape(-1).view(torch.uint8).numpy())


def _needs_thread(tensor: torch.Tensor) -> bool:
    cheap = tensor.device.type == "cpu" and tensor.is_contiguous()
    return not cheap and tensor.nbytes >= THREAD_BYTES


class _Sender:
    def __init__(
        self,
        nc: Client,
        destination: str,
        transfer_id: str,
        source: str,
        window: int,
        chunk_bytes: int,
        deadline: float,
        stall_timeout_s: float,
        control_timeout_s: float,
        tamper: Tamper | None,
    ) -> None:
        self.nc = nc
        self.destination = destination
        self.transfer_id = transfer_id
        self.source = source
        self.window = window
        self.chunk_bytes = chunk_bytes
        self.deadline = deadline
        self.stall_timeout_s = stall_timeout_s
        self.control_timeout_s = control_timeout_s
        self.tamper = tamper
        self.log = log.bind(transfer_id=transfer_id, destination=destination)
        self.session = 0
        self.granted = 0
        self.sent = 0
        self.resent = 0
        self.bytes_sent = 0
        self.probes = 0
        self.max_in_flight = 0
        self.resend: set[int] = set()
        self.next_seq = 0  # every chunk below this was sent at least once (or not needed)
        self.done = False
        self.error: str | None = None
        self.wake = asyncio.Event()
        self.layout = ChunkLayout([], chunk_bytes)
        self.views: list[memoryview] = []
        self.crcs: list[asyncio.Future[int]] = []

    def remaining(self) -> float:
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TransferTimeoutError(
                f"transfer {self.transfer_id} to {self.destination} did not complete in time"
            )
        return left

    def check(self) -> None:
        if self.error is not None:
            raise TransferError(
                f"receiver {self.destination} failed transfer {self.transfer_id}: {self.error}"
            )
        self.remaining()

    async def request(self, subject: str, body: bytes, what: str) -> Msg:
        timeout = min(self.control_timeout_s, self.remaining())
        try:
            reply = await self.nc.request(subject, body, timeout=timeout)
        except NoRespondersError:
            raise TransferError(
                f"no tensor inbox answers at {self.destination} ({what}): the receiver is gone"
            ) from None
        except (NatsTimeoutError, TimeoutError):
            raise TransferError(
                f"receiver {self.destination} did not answer the {what} within {timeout:.1f} s"
            ) from None
        error = _error_of(reply)
        if error is not None:
            code, message = error
            raise TransferError(
                f"receiver {self.destination} refused the {what} ({code}): {message}", code=code
            )
        return reply

    async def on_ack(self, msg: Msg) -> None:
        try:
            ack = TransferAck.model_validate(decode(msg.data))
        except (DecodeError, ValidationError):
            self.log.warning("transfer.bad_ack")
            return
        if ack.transfer_id != self.transfer_id or ack.session != self.session:
            return
        self.granted = max(self.granted, ack.granted)
        self.add_resends(ack.resend)
        self.done = self.done or ack.done
        if ack.error is not None:
            self.error = ack.error
        self.wake.set()

    def add_resends(self, ranges: list[SeqRange]) -> None:
        for start, stop in ranges:
            self.resend.update(range(max(0, start), min(stop, self.layout.n_chunks)))

    async def wait(self) -> None:
        """Until an ack arrives; after ``stall_timeout_s`` of silence, probe the receiver."""
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(min(self.stall_timeout_s, self.remaining())):
                await self.wake.wait()
        except TimeoutError:
            await self.probe()
        self.wake.clear()

    async def probe(self, next_seq: int | None = None) -> None:
        self.probes += 1
        request = TransferStatusRequest(
            transfer_id=self.transfer_id,
            session=self.session,
            sent=self.sent,
            next_seq=self.next_seq if next_seq is None else next_seq,
        )
        reply = await self.request(
            transfer_status_subject(self.destination), encode(request), "status probe"
        )
        try:
            status = TransferStatusReply.model_validate(decode(reply.data))
        except (DecodeError, ValidationError) as exc:
            raise TransferError(f"bad status reply from {self.destination}: {exc}") from None
        self.log.info("transfer.probe", state=status.state, missing=len(status.missing))
        if status.state == "complete":
            self.done = True
        elif status.state == "active":
            self.granted = max(self.granted, status.granted)
            self.add_resends(status.missing)
        else:
            why = {
                "unknown": "it no longer knows the transfer (timed out or restarted)",
                "superseded": "another source took the transfer over",
                "failed": f"it failed the transfer: {status.error}",
            }[status.state]
            raise TransferError(f"receiver {self.destination}: {why}")

    async def checksums(self) -> None:
        """CRC32 of every tensor, in order, in a thread: ready before its last chunk goes."""
        for index, future in enumerate(self.crcs):
            if future.done():
                continue
            view = self.views[index]
            if len(view) >= THREAD_BYTES:
                crc = await asyncio.to_thread(_crc32, view)
            else:
                crc = _crc32(view)
            future.set_result(crc)

    async def publish(self, seq: int, subject: str) -> None:
        index, offset, length = self.layout.locate(seq)
        payload: bytes | bytearray | memoryview | None = self.views[index][offset : offset + length]
        headers = {SEQ_HEADER: str(seq), SESSION_HEADER: str(self.session)}
        if self.layout.is_last_of_tensor(seq, index):
            try:
                async with asyncio.timeout(self.remaining()):
                    crc = await asyncio.shield(self.crcs[index])
            except TimeoutError:
                self.remaining()  # raises TransferTimeoutError
                raise
            headers[CRC_HEADER] = str(crc)
        if self.tamper is not None:
            assert payload is not None
            payload = self.tamper(seq, payload)  # type: ignore[arg-type]
        self.sent += 1
        self.max_in_flight = max(self.max_in_flight, self.sent - (self.granted - self.window))
        if payload is None:
            return  # dropped (fault tests): as if lost in flight
        self.bytes_sent += len(payload)
        await self.nc.publish(subject, payload, headers=headers)  # type: ignore[arg-type]

    async def stream(self, missing: list[SeqRange]) -> None:
        subject = transfer_data_subject(self.destination, self.transfer_id)
        count = self.layout.n_chunks
        fresh = _iter_ranges([(max(0, start), min(stop, count)) for start, stop in missing])
        self.next_seq = 0
        upcoming = next(fresh, None)
        while True:
            self.check()
            if self.done:
                return
            if upcoming is None and not self.resend:
                await self.wait()  # everything sent once: wait for the end or resend requests
                continue
            if self.sent >= self.granted:
                await self.wait()
                continue
            if self.resend:
                seq = min(self.resend)
                self.resend.discard(seq)
                self.resent += 1
            else:
                assert upcoming is not None
                seq = upcoming
                upcoming = next(fresh, None)
                self.next_seq = seq + 1
            await self.publish(seq, subject)

    async def abort(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            abort = TransferAbort(transfer_id=self.transfer_id, session=self.session, reason=reason)
            await self.nc.publish(transfer_abort_subject(self.destination), encode(abort))
            await self.nc.flush(timeout=1)


def _iter_ranges(ranges: list[SeqRange]) -> Iterator[int]:
    for start, stop in ranges:
        yield from range(start, stop)


async def send_tensors(
    nc: Client,
    destination: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    transfer_id: str | None = None,
    source: str | None = None,
    window: int = DEFAULT_WINDOW,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = 120.0,
    stall_timeout_s: float = 2.0,
    control_timeout_s: float = 5.0,
    checksums: Mapping[str, int] | None = None,
    tamper: Tamper | None = None,
) -> TransferStats:
    """Stream ``tensors`` to the :class:`TensorInbox` of instance ``destination``.

    Never more than ``window`` chunks (of ``chunk_bytes``, at most the server's max_payload
    less room for headers) are unacknowledged. ``transfer_id`` names the transfer for the
    receiver: offering an id it is still receiving resumes it (only the missing chunks are
    sent; any holder of the same tensors may do that), an id it completed is not sent again.
    ``checksums`` (name -> CRC32) skips computing known ones. ``tamper(seq, bytes)`` is for
    fault tests: it returns the bytes to publish for chunk ``seq`` (None: drop the chunk).

    Raises :class:`TransferError` (refused, failed by the receiver, receiver gone: try another
    destination) or :class:`TransferTimeoutError` after ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    chunk = min(chunk_bytes, nc.max_payload - HEADER_ROOM)
    if chunk < MIN_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be at least {MIN_CHUNK_BYTES}")
    if window < 1:
        raise ValueError("window must be at least 1")
    transfer_id = transfer_id or uuid.uuid4().hex
    sender = _Sender(
        nc,
        destination,
        transfer_id,
        source or f"{socket.gethostname()}-{os.getpid()}"[:128],
        window,
        chunk,
        loop.time() + timeout_s,
        stall_timeout_s,
        control_timeout_s,
        tamper,
    )
    names = list(tensors)
    hosts: list[torch.Tensor] = []
    for name in names:
        tensor = tensors[name]
        if _needs_thread(tensor):
            host, view = await asyncio.to_thread(_host_bytes, tensor)
        else:
            host, view = _host_bytes(tensor)
        hosts.append(host)
        sender.views.append(view)
    known = dict(checksums or {})
    specs = [
        TensorSpec(
            name=name,
            dtype=_dtype_name(host.dtype),
            shape=list(host.shape),
            nbytes=len(view),
            crc32=known.get(name),
        )
        for name, host, view in zip(names, hosts, sender.views, strict=True)
    ]
    sender.layout = ChunkLayout([spec.nbytes for spec in specs], chunk)
    for spec in specs:
        future: asyncio.Future[int] = loop.create_future()
        if spec.crc32 is not None:
            future.set_result(spec.crc32)
        elif spec.nbytes == 0:
            future.set_result(0)
        sender.crcs.append(future)
    ack_subject = nc.new_inbox()
    ack_sub = await nc.subscribe(ack_subject, cb=sender.on_ack)
    crc_task: asyncio.Task[None] | None = None
    try:
        offer = TransferOffer(
            transfer_id=transfer_id,
            source=sender.source,
            tensors=specs,
            total_bytes=sum(spec.nbytes for spec in specs),
            chunk_bytes=chunk,
            window=window,
            ack_subject=ack_subject,
        )
        reply = await sender.request(transfer_offer_subject(destination), encode(offer), "offer")
        try:
            accept = TransferAccept.model_validate(decode(reply.data))
        except (DecodeError, ValidationError) as exc:
            raise TransferError(f"bad reply to the offer from {destination}: {exc}") from None
        sender.session, sender.window = accept.session, accept.window
        sender.granted = accept.window
        if accept.state != "complete":
            crc_task = asyncio.create_task(sender.checksums())
            await sender.stream(accept.missing)
    except asyncio.CancelledError:
        await sender.abort("the sender was cancelled")
        raise
    except Exception as exc:
        # A local fault (not the receiver's doing, not a timeout: a timed-out transfer stays
        # resumable): free the receiver now rather than after its idle timeout.
        if not isinstance(exc, TransferError):
            await sender.abort(f"the sender failed: {exc!r}")
        raise
    finally:
        if crc_task is not None:
            crc_task.cancel()
            await asyncio.gather(crc_task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await ack_sub.unsubscribe()
    stats = TransferStats(
        transfer_id=transfer_id,
        destination=destination,
        state=accept.state,
        tensors=len(specs),
        total_bytes=offer.total_bytes,
        chunk_bytes=chunk,
        window=sender.window,
        chunks=sender.layout.n_chunks,
        chunks_sent=sender.sent,
        chunks_resent=sender.resent,
        bytes_sent=sender.bytes_sent,
        probes=sender.probes,
        max_in_flight=max(0, sender.max_in_flight),
        seconds=time.perf_counter() - started,
    )
    sender.log.info(
        "transfer.sent",
        state=stats.state,
        nbytes=stats.total_bytes,
        chunks_sent=stats.chunks_sent,
        resent=stats.chunks_resent,
        seconds=round(stats.seconds, 4),
    )
    return stats
