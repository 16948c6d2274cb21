"""The sending end of tensor transfers: :func:`send_tensors`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import structlog
import torch
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import ValidationError

from shared.codec import DecodeError, decode, encode
from shared.messages import (
    SeqRange,
    TensorSpec,
    TransferAbort,
    TransferAccept,
    TransferAck,
    TransferOffer,
    TransferStatusReply,
    TransferStatusRequest,
)
from shared.rpc import NoResponders, RpcTimeout, error_of, request_raw
from shared.subjects import (
    transfer_abort_subject,
    transfer_data_subject,
    transfer_offer_subject,
    transfer_status_subject,
)
from shared.transfer.errors import TransferError, TransferTimeoutError
from shared.transfer.wire import (
    CRC_HEADER,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_WINDOW,
    HEADER_ROOM,
    MIN_CHUNK_BYTES,
    SEQ_HEADER,
    SESSION_HEADER,
    THREAD_BYTES,
    ChunkLayout,
    crc32,
    dtype_name,
    iter_ranges,
)

log = structlog.get_logger()

# The whole transfer must complete within this long.
SEND_TIMEOUT_S = 120.0
# Silence from the receiver for this long makes the sender probe the transfer's status.
STALL_TIMEOUT_S = 2.0
# Bounds each control request (offer, status probe).
CONTROL_TIMEOUT_S = 5.0
# Bounds the flush that makes sure an abort left before the sender gives up.
ABORT_FLUSH_TIMEOUT_S = 1
# A transfer's source name, when the caller gives none, is cut to what an offer takes.
MAX_SOURCE_CHARS = 128

Payload = bytes | bytearray | memoryview
Tamper = Callable[[int, memoryview], Payload | None]


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
class SendOptions:
    """How one transfer is sent (see :func:`send_tensors`)."""

    window: int = DEFAULT_WINDOW
    timeout_s: float = SEND_TIMEOUT_S
    stall_timeout_s: float = STALL_TIMEOUT_S
    control_timeout_s: float = CONTROL_TIMEOUT_S
    tamper: Tamper | None = None


def _host_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """The tensor's bytes in host memory, contiguous (a copy only when needed)."""
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise TypeError(f"cannot stream a {tensor.layout} / quantized tensor")
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    host = host.resolve_conj().resolve_neg().contiguous()
    return host, host.reshape(-1).view(torch.uint8).numpy().data


def _needs_thread(tensor: torch.Tensor) -> bool:
    cheap = tensor.device.type == "cpu" and tensor.is_contiguous()
    return not cheap and tensor.nbytes >= THREAD_BYTES


async def _tensor_specs(
    tensors: Mapping[str, torch.Tensor], checksums: Mapping[str, int]
) -> tuple[list[TensorSpec], list[memoryview]]:
    """Each tensor's spec and its bytes in host memory (copied in a thread when large)."""
    specs: list[TensorSpec] = []
    views: list[memoryview] = []
    for name, tensor in tensors.items():
        if _needs_thread(tensor):
            host, view = await asyncio.to_thread(_host_bytes, tensor)
        else:
            host, view = _host_bytes(tensor)
        spec = TensorSpec(
            name=name,
            dtype=dtype_name(host.dtype),
            shape=list(host.shape),
            nbytes=len(view),
            crc32=checksums.get(name),
        )
        specs.append(spec)
        views.append(view)
    return specs, views


class _Sender:
    """One transfer's sending side: the credit it holds, what the receiver asked to have
    again, and the counters its :class:`TransferStats` report."""

    def __init__(
        self,
        nc: Client,
        destination: str,
        transfer_id: str,
        source: str,
        options: SendOptions,
        chunk_bytes: int,
    ) -> None:
        self.nc = nc
        self.destination = destination
        self.transfer_id = transfer_id
        self.source = source
        self.options = options
        self.window = options.window
        self.chunk_bytes = chunk_bytes
        self.deadline = asyncio.get_running_loop().time() + options.timeout_s
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

    def load(self, specs: list[TensorSpec], views: list[memoryview]) -> None:
        """The tensors to send: their layout in chunks and their checksums (known ones now,
        the others computed by :meth:`checksums`)."""
        self.views = views
        self.layout = ChunkLayout([spec.nbytes for spec in specs], self.chunk_bytes)
        loop = asyncio.get_running_loop()
        for spec in specs:
            future: asyncio.Future[int] = loop.create_future()
            if spec.crc32 is not None:
                future.set_result(spec.crc32)
            elif spec.nbytes == 0:
                future.set_result(0)
            self.crcs.append(future)

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
        timeout = min(self.options.control_timeout_s, self.remaining())
        try:
            reply = await request_raw(self.nc, subject, body, timeout)
        except NoResponders:
            raise TransferError(
                f"no tensor inbox answers at {self.destination} ({what}): the receiver is gone"
            ) from None
        except RpcTimeout:
            raise TransferError(
                f"receiver {self.destination} did not answer the {what} within {timeout:.1f} s"
            ) from None
        error = error_of(reply.headers)
        if error is not None:
            raise TransferError(
                f"receiver {self.destination} refused the {what} ({error.code}): {error.message}",
                code=error.code,
            )
        return reply

    async def offer(self, offer: TransferOffer) -> TransferAccept:
        reply = await self.request(transfer_offer_subject(self.destination), encode(offer), "offer")
        try:
            accept = TransferAccept.model_validate(decode(reply.data))
        except (DecodeError, ValidationError) as exc:
            raise TransferError(f"bad reply to the offer from {self.destination}: {exc}") from None
        self.session, self.window = accept.session, accept.window
        self.granted = accept.window
        return accept

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
            async with asyncio.timeout(min(self.options.stall_timeout_s, self.remaining())):
                await self.wake.wait()
        except TimeoutError:
            await self.probe()
        self.wake.clear()

    async def probe(self) -> None:
        self.probes += 1
        request = TransferStatusRequest(
            transfer_id=self.transfer_id,
            session=self.session,
            sent=self.sent,
            next_seq=self.next_seq,
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
                crc = await asyncio.to_thread(crc32, view)
            else:
                crc = crc32(view)
            future.set_result(crc)

    async def publish(self, seq: int, subject: str) -> None:
        index, offset, length = self.layout.locate(seq)
        chunk = self.views[index][offset : offset + length]
        headers = {SEQ_HEADER: str(seq), SESSION_HEADER: str(self.session)}
        if self.layout.is_last_of_tensor(seq, index):
            try:
                async with asyncio.timeout(self.remaining()):
                    crc = await asyncio.shield(self.crcs[index])
            except TimeoutError:
                self.remaining()  # raises TransferTimeoutError
                raise
            headers[CRC_HEADER] = str(crc)
        tamper = self.options.tamper
        payload = chunk if tamper is None else tamper(seq, chunk)
        self.sent += 1
        self.max_in_flight = max(self.max_in_flight, self.sent - (self.granted - self.window))
        if payload is None:
            return  # dropped (fault tests): as if lost in flight
        self.bytes_sent += len(payload)
        # nats-py sends any buffer (no copy of the memoryview); its annotation says bytes.
        await self.nc.publish(subject, payload, headers=headers)  # type: ignore[arg-type]

    def pop_resend(self) -> int:
        seq = min(self.resend)
        self.resend.discard(seq)
        self.resent += 1
        return seq

    async def stream(self, missing: list[SeqRange]) -> None:
        subject = transfer_data_subject(self.destination, self.transfer_id)
        count = self.layout.n_chunks
        fresh = iter_ranges([(max(0, start), min(stop, count)) for start, stop in missing])
        self.next_seq = 0
        upcoming = next(fresh, None)
        while True:
            self.check()
            if self.done:
                return
            if (upcoming is None and not self.resend) or self.sent >= self.granted:
                # Everything sent once (wait for the end or resend requests), or out of credit.
                await self.wait()
                continue
            if self.resend:
                seq = self.pop_resend()
            else:
                assert upcoming is not None
                seq, upcoming = upcoming, next(fresh, None)
                self.next_seq = seq + 1
            await self.publish(seq, subject)

    async def abort(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            abort = TransferAbort(transfer_id=self.transfer_id, session=self.session, reason=reason)
            await self.nc.publish(transfer_abort_subject(self.destination), encode(abort))
            await self.nc.flush(timeout=ABORT_FLUSH_TIMEOUT_S)

    def stats(
        self, state: Literal["accepted", "resumed", "complete"], seconds: float
    ) -> TransferStats:
        return TransferStats(
            transfer_id=self.transfer_id,
            destination=self.destination,
            state=state,
            tensors=len(self.views),
            total_bytes=sum(self.layout.sizes),
            chunk_bytes=self.chunk_bytes,
            window=self.window,
            chunks=self.layout.n_chunks,
            chunks_sent=self.sent,
            chunks_resent=self.resent,
            bytes_sent=self.bytes_sent,
            probes=self.probes,
            max_in_flight=max(0, self.max_in_flight),
            seconds=seconds,
        )


async def send_tensors(
    nc: Client,
    destination: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    transfer_id: str | None = None,
    source: str | None = None,
    window: int = DEFAULT_WINDOW,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = SEND_TIMEOUT_S,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    control_timeout_s: float = CONTROL_TIMEOUT_S,
    checksums: Mapping[str, int] | None = None,
    tamper: Tamper | None = None,
) -> TransferStats:
    """Stream ``tensors`` to the :class:`~shared.transfer.TensorInbox` of instance
    ``destination``.

    Never more than ``window`` chunks (of ``chunk_bytes``, at most the server's max_payload
    less room for headers) are unacknowledged. ``transfer_id`` names the transfer for the
    receiver: offering an id it is still receiving resumes it (only the missing chunks are
    sent; any holder of the same tensors may do that), an id it completed is not sent again.
    ``checksums`` (name -> CRC32) skips computing known ones. ``tamper(seq, bytes)`` is for
    fault tests: it returns the bytes to publish for chunk ``seq`` (None: drop the chunk).

    Raises :class:`TransferError` (refused, failed by the receiver, receiver gone: try another
    destination) or :class:`TransferTimeoutError` after ``timeout_s``.
    """
    started = time.perf_counter()
    chunk = min(chunk_bytes, nc.max_payload - HEADER_ROOM)
    if chunk < MIN_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be at least {MIN_CHUNK_BYTES}")
    if window < 1:
        raise ValueError("window must be at least 1")
    options = SendOptions(window, timeout_s, stall_timeout_s, control_timeout_s, tamper)
    sender = _Sender(
        nc,
        destination,
        transfer_id or uuid.uuid4().hex,
        source or f"{socket.gethostname()}-{os.getpid()}"[:MAX_SOURCE_CHARS],
        options,
        chunk,
    )
    specs, views = await _tensor_specs(tensors, checksums or {})
    sender.load(specs, views)
    state = await _run(sender, specs)
    stats = sender.stats(state, time.perf_counter() - started)
    sender.log.info(
        "transfer.sent",
        state=stats.state,
        nbytes=stats.total_bytes,
        chunks_sent=stats.chunks_sent,
        resent=stats.chunks_resent,
        seconds=round(stats.seconds, 4),
    )
    return stats


async def _run(
    sender: _Sender, specs: list[TensorSpec]
) -> Literal["accepted", "resumed", "complete"]:
    """Offer the tensors, then stream what the receiver asks for until it has all of them;
    returns the receiver's answer to the offer. A sender that fails by its own fault or is
    cancelled tells the receiver, which then frees the transfer at once."""
    nc = sender.nc
    ack_subject = nc.new_inbox()
    ack_sub = await nc.subscribe(ack_subject, cb=sender.on_ack)
    crc_task: asyncio.Task[None] | None = None
    try:
        offer = TransferOffer(
            transfer_id=sender.transfer_id,
            source=sender.source,
            tensors=specs,
            total_bytes=sum(spec.nbytes for spec in specs),
            chunk_bytes=sender.chunk_bytes,
            window=sender.window,
            ack_subject=ack_subject,
        )
        accept = await sender.offer(offer)
        if accept.state != "complete":
            crc_task = asyncio.create_task(sender.checksums())
            await sender.stream(accept.missing)
        return accept.state
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
