"""The receiving end of tensor transfers: one :class:`TensorInbox` per instance."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any

import numpy as np
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from shared.codec import DecodeError, decode, encode
from shared.messages import (
    SeqRange,
    TransferAbort,
    TransferStatusReply,
    TransferStatusRequest,
)
from shared.rpc import BadRequest, Internal, NotFound, RpcError
from shared.rpc import publish_error as _publish_error
from shared.subjects import TRANSFER_SUBJECT_PREFIX, transfer_inbox_subject
from shared.transfer.inbound import BufferPool, Inbound, ReceivedTransfer
from shared.transfer.ledger import OnComplete, OnFailed, TransferLedger
from shared.transfer.offers import OfferDesk
from shared.transfer.wire import (
    CRC_HEADER,
    DEFAULT_WINDOW,
    HEADER_ROOM,
    SEQ_HEADER,
    SESSION_HEADER,
    STORE_INLINE_BYTES,
    STORE_SLICE_BYTES,
    THREAD_BYTES,
    crc32,
)

log = structlog.get_logger()

# A transfer whose source sent nothing for this long is failed and its buffer freed.
IDLE_TIMEOUT_S = 30.0
# nats-py's limit on chunks queued here: several transfers' windows must fit.
PENDING_BYTES_LIMIT = 256 << 20
PENDING_MSGS_LIMIT = 1 << 20
# Idle receive buffers kept for reuse.
POOL_BYTES = 512 << 20
# How often a tensor that fails its CRC32 is asked for again before the transfer fails.
CHECKSUM_RETRIES = 2
# Bounds each of the two flushes that make sure the server has the inbox's subscription.
FLUSH_TIMEOUT_S = 10
# The idle sweep runs a few times per idle timeout, within these bounds.
SWEEP_MIN_S, SWEEP_MAX_S = 0.05, 1.0


def _store(target: np.ndarray, data: bytes, crc: int | None) -> int | None:
    """Copy a chunk into its place; with ``crc`` (the tensor's CRC32 up to the chunk), the
    CRC32 carried on over the written bytes, a slice at a time while the slice is in cache.
    Neither holds the GIL (numpy's copy, ISA-L/zlib)."""
    source = np.frombuffer(data, dtype=np.uint8)
    for start in range(0, len(source), STORE_SLICE_BYTES):
        written = target[start : start + STORE_SLICE_BYTES]
        np.copyto(written, source[start : start + STORE_SLICE_BYTES])
        if crc is not None:
            crc = crc32(written, crc)
    return crc


async def _store_chunk(target: np.ndarray, data: bytes, crc: int | None) -> int | None:
    """:func:`_store`, in a thread for a chunk over ``STORE_INLINE_BYTES``."""
    if len(data) > STORE_INLINE_BYTES:
        return await asyncio.to_thread(_store, target, data, crc)
    return _store(target, data, crc)


async def _region_crc(region: np.ndarray) -> int:
    """A whole tensor's CRC32, in a thread when large."""
    if len(region) >= THREAD_BYTES:
        return await asyncio.to_thread(crc32, region)
    return crc32(region)


def _parse(model: type[BaseModel], data: bytes, what: str) -> Any:
    try:
        return model.model_validate(decode(data))
    except (DecodeError, ValidationError) as exc:
        raise BadRequest(f"bad {what}: {exc}") from None


def _chunk_headers(headers: dict[str, str] | None) -> tuple[int, int]:
    """A chunk's (seq, session); (-1, -1) when its headers are missing or not numbers."""
    try:
        return int((headers or {})[SEQ_HEADER]), int((headers or {})[SESSION_HEADER])
    except (KeyError, ValueError):
        return -1, -1


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
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_bytes: int | None = None,
        checksum_retries: int = CHECKSUM_RETRIES,
        on_complete: OnComplete | None = None,
        on_failed: OnFailed | None = None,
        pending_bytes_limit: int = PENDING_BYTES_LIMIT,
        pool_bytes: int = POOL_BYTES,
    ) -> None:
        self.nc = nc
        self.instance_id = instance_id
        self.idle_timeout_s = idle_timeout_s
        self.checksum_retries = checksum_retries
        self.pending_bytes_limit = pending_bytes_limit
        self.log = log.bind(instance_id=instance_id)
        self._prefix = f"{TRANSFER_SUBJECT_PREFIX}.{instance_id}."
        self._pool = BufferPool(pool_bytes)
        self._active: dict[str, Inbound] = {}
        self._ledger = TransferLedger(on_complete, on_failed, self.log)
        self._desk = OfferDesk(self._active, self._ledger, self._pool, window, max_bytes, self.log)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
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
        return self._desk.active_bytes

    @property
    def pooled_bytes(self) -> int:
        """Bytes of idle receive buffers kept for reuse (at most ``pool_bytes``)."""
        return self._pool.idle_bytes

    @property
    def active(self) -> list[str]:
        return list(self._active)

    @property
    def failures(self) -> OrderedDict[str, str]:
        """Recent failures (transfer id -> reason), for operators and tests."""
        return self._ledger.failures

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            transfer_inbox_subject(self.instance_id),
            cb=self._on_message,
            pending_bytes_limit=self.pending_bytes_limit,
            pending_msgs_limit=PENDING_MSGS_LIMIT,
        )
        # nats-py puts a flush's PING ahead of commands still pending (the SUB): the second
        # PONG comes after the server has registered the subscription.
        await self.nc.flush(timeout=FLUSH_TIMEOUT_S)
        await self.nc.flush(timeout=FLUSH_TIMEOUT_S)
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
        return await self._ledger.receive(transfer_id, timeout_s)

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
            else:
                raise NotFound(f"no such subject {msg.subject}")
        except RpcError as exc:
            await _publish_error(self.nc, msg, exc)
        except Exception as exc:  # never let a bad message take the inbox down
            self.log.exception("transfer.inbox_error", subject=msg.subject)
            if not kind.startswith("data."):
                with contextlib.suppress(Exception):
                    await _publish_error(self.nc, msg, Internal(f"inbox error: {exc!r}"))

    # ---- offers ----

    async def _on_offer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        accept, created = self._desk.answer(msg.data, self.nc.max_payload)
        await msg.respond(encode(accept))
        if created is not None and created.unverified == 0:
            await self._complete(created, tell_sender=False)

    # ---- chunks ----

    async def _on_chunk(self, transfer_id: str, msg: Msg) -> None:
        inbound = self._active.get(transfer_id)
        seq, session = _chunk_headers(msg.headers)
        if inbound is None or session < inbound.first_session:
            self.dropped_chunks += 1
            return
        inbound.last_activity = time.monotonic()
        # Chunks delivered here and not yet written and acknowledged: this one and those
        # queued behind it (of any transfer: exact while one transfer is active). A sender
        # that keeps to its credit never gets more than its window queued here.
        queued = 1 + (self._sub.pending_msgs if self._sub is not None else 0)
        inbound.max_in_flight = max(inbound.max_in_flight, queued)
        self.max_in_flight = max(self.max_in_flight, queued)
        resend: list[SeqRange] = []
        if 0 <= seq < inbound.layout.n_chunks:
            written = await self._write(inbound, seq, msg)
            if written is None:
                return  # failed or stopped meanwhile
            resend = written
        if session == inbound.session:
            inbound.acked += 1
            await self._ack(inbound, resend=resend)

    async def _write(self, inbound: Inbound, seq: int, msg: Msg) -> list[SeqRange] | None:
        """Write one chunk into the transfer's buffer; the chunks to ask for again, or None
        when the transfer ended while the chunk was being written."""
        index, offset, length = inbound.layout.locate(seq)
        crc_text = (msg.headers or {}).get(CRC_HEADER)
        kind = inbound.classify(seq, index, len(msg.data), crc_text)
        if kind == "bad":
            self.log.warning("transfer.bad_chunk", transfer_id=inbound.transfer_id, seq=seq)
            return [(seq, seq + 1)]
        if kind == "duplicate":
            inbound.duplicates += 1
            return []
        target = inbound.target(index, offset, length)
        crc = await _store_chunk(target, msg.data, inbound.running_crc(index, offset))
        if self._active.get(inbound.transfer_id) is not inbound:
            return None
        if inbound.record(seq, index, length, crc, crc_text):
            inbound.verifying.add(index)
            self._spawn(self._verify(inbound, index, inbound.complete_crc(index)))
        return []

    async def _ack(self, inbound: Inbound, **fields: Any) -> None:
        await self.nc.publish(inbound.ack_subject, encode(inbound.ack(**fields)))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _verify(self, inbound: Inbound, index: int, crc: int | None) -> None:
        """Check a complete tensor against its CRC32: ``crc`` if it was computed chunk by
        chunk, else in one pass over the buffer (in a thread when large)."""
        if self._active.get(inbound.transfer_id) is not inbound:
            return  # failed or stopped meanwhile
        inbound.verifying.add(index)
        try:
            crc = await _region_crc(inbound.region(index)) if crc is None else crc
        finally:
            inbound.verifying.discard(index)
        if self._active.get(inbound.transfer_id) is not inbound:
            return  # failed or stopped meanwhile
        if crc == inbound.expected[index]:
            inbound.verified[index] = True
            inbound.unverified -= 1
            if inbound.unverified == 0:
                await self._complete(inbound)
            return
        await self._checksum_failed(inbound, index)

    async def _checksum_failed(self, inbound: Inbound, index: int) -> None:
        spec = inbound.offer.tensors[index]
        attempts = inbound.checksum_failed(index)
        self.log.warning(
            "transfer.checksum_mismatch",
            transfer_id=inbound.transfer_id,
            tensor=spec.name,
            attempt=attempts,
        )
        if attempts > self.checksum_retries:
            reason = f"tensor {spec.name!r} failed its size/CRC32 check {attempts} times"
            await self._fail(inbound, reason)
            return
        await self._ack(inbound, resend=[inbound.retry_tensor(index)])

    async def _complete(self, inbound: Inbound, tell_sender: bool = True) -> None:
        del self._active[inbound.transfer_id]
        result = inbound.result(time.monotonic())
        inbound.free()
        self.log.info(
            "transfer.complete",
            transfer_id=inbound.transfer_id,
            source=inbound.source,
            nbytes=result.nbytes,
            seconds=round(result.seconds, 4),
        )
        if tell_sender:
            with contextlib.suppress(Exception):
                await self._ack(inbound, done=True)
        await self._ledger.completed(result)

    async def _fail(self, inbound: Inbound, reason: str, tell_sender: bool = True) -> None:
        tid = inbound.transfer_id
        if self._active.get(tid) is not inbound:
            return
        del self._active[tid]
        inbound.free()
        self.log.warning("transfer.failed", transfer_id=tid, source=inbound.source, reason=reason)
        if tell_sender:
            with contextlib.suppress(Exception):
                await self._ack(inbound, error=reason)
        await self._ledger.failed(tid, reason)

    # ---- status probes, aborts, idle sources ----

    async def _on_status(self, msg: Msg) -> None:
        if not msg.reply:
            return
        request: TransferStatusRequest = _parse(TransferStatusRequest, msg.data, "status request")
        tid = request.transfer_id
        inbound = self._active.get(tid)
        if inbound is None:
            state, reason = self._ledger.state(tid) or ("unknown", None)
            reply = TransferStatusReply(transfer_id=tid, state=state, error=reason)
        else:
            reply = inbound.status(request, time.monotonic())
        await msg.respond(encode(reply))

    async def _on_abort(self, msg: Msg) -> None:
        try:
            abort: TransferAbort = _parse(TransferAbort, msg.data, "abort")
        except BadRequest:
            if msg.reply:
                raise
            return
        inbound = self._active.get(abort.transfer_id)
        if inbound is not None and inbound.session == abort.session:
            await self._fail(inbound, f"aborted by its sender: {abort.reason}", tell_sender=False)

    async def _sweep(self) -> None:
        period = max(SWEEP_MIN_S, min(SWEEP_MAX_S, self.idle_timeout_s / 4))
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
