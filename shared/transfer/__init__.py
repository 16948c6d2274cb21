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

Modules: :mod:`~shared.transfer.wire` (what both sides agree on: chunk layout, headers, CRC32),
:mod:`~shared.transfer.sender`, :mod:`~shared.transfer.receiver` (the inbox, with
:mod:`~shared.transfer.offers`, :mod:`~shared.transfer.inbound` and
:mod:`~shared.transfer.ledger`) and :mod:`~shared.transfer.errors`.
"""

from __future__ import annotations

from shared.transfer.errors import TransferError, TransferFailedError, TransferTimeoutError
from shared.transfer.inbound import ReceivedTransfer
from shared.transfer.ledger import OnComplete, OnFailed
from shared.transfer.receiver import TensorInbox
from shared.transfer.sender import Tamper, TransferStats, send_tensors
from shared.transfer.wire import (
    CRC32_IMPLEMENTATION,
    CRC_HEADER,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_WINDOW,
    SEQ_HEADER,
    SESSION_HEADER,
)

__all__ = [
    "CRC32_IMPLEMENTATION",
    "CRC_HEADER",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_WINDOW",
    "SEQ_HEADER",
    "SESSION_HEADER",
    "OnComplete",
    "OnFailed",
    "ReceivedTransfer",
    "Tamper",
    "TensorInbox",
    "TransferError",
    "TransferFailedError",
    "TransferStats",
    "TransferTimeoutError",
    "send_tensors",
]
