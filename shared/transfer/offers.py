"""The receiver's answer to an offer: check it, then accept it as a new transfer, resume the
one in progress under its id, or tell the sender it already arrived."""

from __future__ import annotations

import time

import structlog
import torch
from pydantic import ValidationError

from shared.codec import DecodeError, decode
from shared.messages import TransferAccept, TransferOffer
from shared.rpc import BadRequest, TooLarge, Unavailable
from shared.transfer.inbound import BufferPool, Inbound
from shared.transfer.ledger import TransferLedger
from shared.transfer.wire import HEADER_ROOM, MIN_CHUNK_BYTES, aligned, torch_dtype


class OfferDesk:
    """Admits offers into ``active`` (the inbox's transfers in progress, shared with it).

    ``window``: the most chunks a sender may have unacknowledged. ``max_bytes``: the most
    buffer bytes of transfers in progress (413 for an offer larger than that at all, 503 while
    the others leave no room)."""

    def __init__(
        self,
        active: dict[str, Inbound],
        ledger: TransferLedger,
        pool: BufferPool,
        window: int,
        max_bytes: int | None,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.active = active
        self.ledger = ledger
        self.pool = pool
        self.window = window
        self.max_bytes = max_bytes
        self.log = log

    @property
    def active_bytes(self) -> int:
        return sum(inbound.buffer_bytes for inbound in self.active.values())

    def answer(self, data: bytes, max_payload: int) -> tuple[TransferAccept, Inbound | None]:
        """The reply to an offer and the transfer it created (None: resumed or already
        complete); :class:`shared.rpc.RpcError` when it is refused."""
        offer, dtypes = self._parse(data, max_payload)
        tid = offer.transfer_id
        now = time.monotonic()
        window = min(offer.window, self.window)
        existing = self.active.get(tid)
        session = 0
        if existing is not None:
            if not existing.same_tensors(offer):
                raise BadRequest(f"transfer {tid} is in progress with other tensors")
            if existing.offer.chunk_bytes == offer.chunk_bytes:
                self.log.info("transfer.resumed", transfer_id=tid, source=offer.source)
                return existing.resume(offer, window, now), None
            # The same tensors in other chunks: start over (the old sender is superseded).
            session = existing.session + 1
            del self.active[tid]
            existing.free()
        elif (self.ledger.state(tid) or ("",))[0] == "complete":
            return TransferAccept(transfer_id=tid, state="complete", session=0, window=window), None
        self._check_room(tid, sum(aligned(spec.nbytes) for spec in offer.tensors))
        inbound = Inbound(offer, dtypes, window, now, self.pool, session)
        self.ledger.restart(tid)
        self.active[tid] = inbound
        self.log.info(
            "transfer.accepted",
            transfer_id=tid,
            source=offer.source,
            tensors=len(offer.tensors),
            nbytes=offer.total_bytes,
            chunks=inbound.layout.n_chunks,
            window=window,
        )
        return inbound.accept(), inbound

    def _parse(self, data: bytes, max_payload: int) -> tuple[TransferOffer, list[torch.dtype]]:
        try:
            offer = TransferOffer.model_validate(decode(data))
            dtypes = [torch_dtype(spec) for spec in offer.tensors]
        except (DecodeError, ValidationError, ValueError) as exc:
            raise BadRequest(f"bad transfer offer: {exc}") from None
        max_chunk_bytes = max_payload - HEADER_ROOM
        if not MIN_CHUNK_BYTES <= offer.chunk_bytes <= max_chunk_bytes:
            raise BadRequest(
                f"bad transfer offer: chunk_bytes {offer.chunk_bytes} is outside"
                f" [{MIN_CHUNK_BYTES}, {max_chunk_bytes}] (the server's max_payload"
                f" {max_payload} less {HEADER_ROOM} bytes for headers)"
            )
        return offer, dtypes

    def _check_room(self, transfer_id: str, padded: int) -> None:
        if self.max_bytes is None:
            return
        if padded > self.max_bytes:
            raise TooLarge(
                f"transfer {transfer_id} needs {padded} bytes, this inbox takes at most"
                f" {self.max_bytes}"
            )
        if self.active_bytes + padded > self.max_bytes:
            raise Unavailable(
                f"inbox busy: {self.active_bytes} of {self.max_bytes} bytes held by"
                f" transfers in progress; retry later"
            )
