"""Peer-to-peer tensor streaming (shared.transfer) against a real nats-server.

Receivers and senders that must die mid-transfer run as their own processes
(``python -m tests.test_transfer receiver|sender …``, see the bottom of this file).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import nats
import pytest
import torch
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from shared.codec import decode, encode
from shared.config import LogSettings
from shared.logging import configure_logging
from shared.messages import TransferAccept, TransferAck, TransferOffer
from shared.natsserver import EmbeddedNatsServer
from shared.subjects import (
    transfer_data_subject,
    transfer_offer_subject,
    transfer_status_subject,
)
from shared.transfer import (
    CRC_HEADER,
    SEQ_HEADER,
    SESSION_HEADER,
    ReceivedTransfer,
    TensorInbox,
    TransferError,
    TransferFailedError,
    TransferTimeoutError,
    send_tensors,
)
from shared.transfer import receiver as transfer
from tests.helpers import eventually

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def make_tensors(seed: int = 0, big_mb: int = 20) -> dict[str, torch.Tensor]:
    """Every kind the executors move; ``big`` is larger than the server's max payload."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "fp32": torch.randn(300, 257, generator=g),
        "fp16": torch.randn(1000, generator=g).to(torch.float16),
        "bf16": torch.randn(64, 33, generator=g).to(torch.bfloat16),
        "int64": torch.randint(-(2**62), 2**62, (5000,), generator=g),
        "bool": torch.rand(77, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 7),
        "transposed": torch.randn(40, 30, generator=g).t(),  # not contiguous
    }
    if big_mb:
        tensors["big"] = torch.randn(big_mb * MIB // 4, generator=g)
    return tensors


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> dtype, shape and sha256 of the bytes (bit-exact comparison, NaN-safe)."""
    out = {}
    for name, tensor in tensors.items():
        flat = tensor.contiguous().reshape(-1).view(torch.uint8)
        sha = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        out[name] = f"{tensor.dtype}/{list(tensor.shape)}/{sha}"
    return out


def assert_bit_exact(received: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
    assert list(received) == list(sent)
    assert digest(received) == digest(sent)


@pytest.fixture
async def nc2(nats_server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    """A second connection: the receiving side (real transfers cross two connections)."""
    client = await nats.connect(nats_server.url, name="tests-receiver")
    yield client
    await client.close()


class Peer:
    """A receiver or sender in its own process (python -m tests.test_transfer ...)."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_transfer", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    async def line(self, timeout_s: float = 60.0) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout_s)
        return raw.decode().strip()

    async def wait(self, timeout_s: float = 60.0) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.stop()


# -- the happy path and flow control ---------------------------------------------------------


async def test_bit_exact_transfer_of_every_kind_of_tensor(nc: Client, nc2: Client) -> None:
    tensors = make_tensors()
    completed: list[ReceivedTransfer] = []
    async with TensorInbox(nc2, "rx-exact", window=4, on_complete=completed.append) as inbox:
        stats = await send_tensors(
            nc, "rx-exact", tensors, transfer_id="exact-1", window=16, chunk_bytes=MIB
        )
        await eventually(lambda: completed, "the completed transfer", timeout_s=30)
    result = completed[0]
    assert_bit_exact(result.tensors, tensors)
    assert result.tensors["transposed"].shape == (30, 40)
    assert result.tensors["scalar"].dim() == 0
    assert stats.state == "accepted" and stats.window == 4  # the receiver's limit wins
    assert stats.chunks_resent == 0 and stats.chunks == stats.chunks_sent
    assert stats.chunks > 20  # "big" alone is 20 chunks: larger than max_payload
    assert stats.max_in_flight <= 4 and result.max_in_flight <= 4
    assert inbox.active_bytes == 0
    # The tensors are writable views the executor can use directly.
    result.tensors["fp32"].add_(1)


class SlowInbox(TensorInbox):
    """A receiver that is slow to write chunks (the event loop stays free to read)."""

    async def _on_chunk(self, transfer_id, msg):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.004)
        await super()._on_chunk(transfer_id, msg)


async def test_a_slow_receiver_never_has_more_than_the_window_queued(
    nc: Client, nc2: Client
) -> None:
    tensors = {"w": torch.arange(60 * 16 * 1024, dtype=torch.int32)}  # 60 chunks of 64 KiB
    async with SlowInbox(nc2, "rx-slow", window=3) as inbox:
        stats = await send_tensors(
            nc, "rx-slow", tensors, transfer_id="slow-1", chunk_bytes=64 * 1024, window=8
        )
        result = await inbox.receive("slow-1", timeout_s=30)
    assert_bit_exact(result.tensors, tensors)
    assert stats.window == 3 and stats.max_in_flight == 3
    # Measured at the receiver: chunks delivered to it and not yet written and acknowledged.
    assert 1 <= result.max_in_flight <= 3
    assert inbox.max_in_flight <= 3


async def test_the_window_instrument_sees_a_sender_that_ignores_credit(
    nc: Client, nc2: Client
) -> None:
    """Negative control: publishing without credit piles chunks up at the receiver."""
    tensors = {"w": torch.arange(30 * 16 * 1024, dtype=torch.int32)}  # 30 chunks of 64 KiB
    chunk = 64 * 1024
    async with SlowInbox(nc2, "rx-flood", window=3) as inbox:
        acks = await nc.subscribe(nc.new_inbox())
        offer = offer_for(tensors, "flood-1", chunk, acks.subject)
        accept = TransferAccept.model_validate(
            decode((await nc.request(transfer_offer_subject("rx-flood"), encode(offer))).data)
        )
        raw = tensors["w"].view(torch.uint8).numpy().tobytes()
        for seq in range(30):
            headers = {SEQ_HEADER: str(seq), SESSION_HEADER: str(accept.session)}
            if seq == 29:
                headers[CRC_HEADER] = str(offer.tensors[0].crc32)
            await nc.publish(
                transfer_data_subject("rx-flood", "flood-1"),
                raw[seq * chunk : (seq + 1) * chunk],
                headers=headers,
            )
        result = await inbox.receive("flood-1", timeout_s=30)
        await acks.unsubscribe()
    assert_bit_exact(result.tensors, tensors)
    assert result.max_in_flight > 3


def offer_for(
    tensors: dict[str, torch.Tensor], transfer_id: str, chunk: int, ack_subject: str
) -> TransferOffer:
    specs = []
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        specs.append(
            {
                "name": name,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "nbytes": len(raw),
                "crc32": zlib.crc32(raw),
            }
        )
    return TransferOffer.model_validate(
        {
            "transfer_id": transfer_id,
            "source": "tests",
            "tensors": specs,
            "total_bytes": sum(spec["nbytes"] for spec in specs),
            "chunk_bytes": chunk,
            "window": 64,
            "ack_subject": ack_subject,
        }
    )


async def test_duplicate_and_out_of_order_chunks_are_harmless(nc: Client, nc2: Client) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(5000, generator=g), "b": torch.randn(3000, generator=g)}
    chunk = 4096
    async with TensorInbox(nc2, "rx-order") as inbox:
        acks = await nc.subscribe(nc.new_inbox())
        offer = offer_for(tensors, "order-1", chunk, acks.subject)
        reply = await nc.request(transfer_offer_subject("rx-order"), encode(offer), timeout=10)
        accept = TransferAccept.model_validate(decode(reply.data))
        assert accept.state == "accepted" and accept.missing == [(0, 5 + 3)]
        raw = b"".join(
            t.view(torch.uint8).numpy().tobytes() for t in tensors.values()
        )  # 20000 + 12000 bytes: chunks 0-4 of "a", 5-7 of "b"
        pieces = {}
        for seq in range(5):
            pieces[seq] = raw[seq * chunk : min((seq + 1) * chunk, 20000)]
        for k, seq in enumerate(range(5, 8)):
            start = 20000 + k * chunk
            pieces[seq] = raw[start : min(start + chunk, 32000)]
        order = [7, 3, 3, 0, 6, 1, 7, 4, 2, 5, 0]  # reversed-ish, with duplicates
        for seq in order:
            await nc.publish(
                transfer_data_subject("rx-order", "order-1"),
                pieces[seq],
                headers={SEQ_HEADER: str(seq), SESSION_HEADER: str(accept.session)},
            )
        result = await inbox.receive("order-1", timeout_s=30)
        assert_bit_exact(result.tensors, tensors)
        assert result.duplicates == 3
        # Every chunk returned its credit (duplicates too); one more ack says done.
        got = [
            TransferAck.model_validate(decode((await acks.next_msg(timeout=10)).data))
            for _ in range(len(order) + 1)
        ]
        assert [ack.done for ack in got].count(True) == 1
        assert max(ack.granted for ack in got) == len(order) + accept.window
        assert all(ack.resend == [] and ack.error is None for ack in got)
        await acks.unsubscribe()


async def test_large_chunks_out_of_order_are_checked_and_a_bad_one_resent(
    nc: Client, nc2: Client
) -> None:
    """In order, the receiver carries a tensor's CRC32 on chunk by chunk; out of order it
    checks the whole tensor (in a thread) once complete: a corrupted chunk is caught either
    way and the tensor asked for again."""
    g = torch.Generator().manual_seed(12)
    tensors = {"w": torch.randn(3 * MIB // 4 + 1000, generator=g), "v": torch.randn(10)}
    chunk = MIB  # "w" is chunks 0-3 (the last one 4000 bytes), "v" chunk 4
    async with TensorInbox(nc2, "rx-big-order") as inbox:
        acks = await nc.subscribe(nc.new_inbox())
        offer = offer_for(tensors, "big-order-1", chunk, acks.subject)
        reply = await nc.request(transfer_offer_subject("rx-big-order"), encode(offer), timeout=10)
        accept = TransferAccept.model_validate(decode(reply.data))
        assert accept.missing == [(0, 5)]
        raw = tensors["w"].view(torch.uint8).numpy().tobytes()
        pieces = {seq: raw[seq * chunk : (seq + 1) * chunk] for seq in range(4)}
        pieces[4] = tensors["v"].view(torch.uint8).numpy().tobytes()
        damaged = bytearray(pieces[1])
        damaged[12345] ^= 0x10

        async def publish(seq: int, data: bytes) -> None:
            await nc.publish(
                transfer_data_subject("rx-big-order", "big-order-1"),
                data,
                headers={SEQ_HEADER: str(seq), SESSION_HEADER: str(accept.session)},
            )

        for seq in (2, 0, 4):
            await publish(seq, pieces[seq])
        await publish(1, bytes(damaged))
        await publish(3, pieces[3])
        resend = []
        while not resend:
            ack = TransferAck.model_validate(decode((await acks.next_msg(timeout=10)).data))
            assert not ack.done and ack.error is None
            resend = ack.resend
        assert resend == [(0, 4)]  # all of "w" again
        for seq in (0, 1, 2, 3):  # in order now
            await publish(seq, pieces[seq])
        result = await inbox.receive("big-order-1", timeout_s=30)
        await acks.unsubscribe()
    assert_bit_exact(result.tensors, tensors)
    assert result.checksum_failures == 1


async def test_large_chunks_are_copied_and_checksummed_off_the_event_loop(
    nc: Client, nc2: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores: list[tuple[int, bool, bool]] = []
    store = transfer._store

    def spy(target, data, crc):  # type: ignore[no-untyped-def]
        on_loop = threading.current_thread() is threading.main_thread()
        stores.append((len(data), on_loop, crc is not None))
        return store(target, data, crc)

    monkeypatch.setattr(transfer, "_store", spy)
    # Chunks up to STORE_INLINE_BYTES (4 MiB with ISA-L) are stored on the event loop.
    monkeypatch.setattr(transfer, "STORE_INLINE_BYTES", MIB - 1)
    tensors = {"w": torch.randn(MIB), "small": torch.randn(100)}  # 4 chunks of 1 MiB, 400 B
    async with TensorInbox(nc2, "rx-threads") as inbox:
        await send_tensors(nc, "rx-threads", tensors, transfer_id="threads-1", chunk_bytes=MIB)
        assert_bit_exact((await inbox.receive("threads-1", timeout_s=30)).tensors, tensors)
    # In order: every chunk carries its tensor's CRC32 on (no second pass); the large ones in
    # a thread, the small one on the event loop.
    assert stores == [(MIB, False, True)] * 4 + [(400, True, True)]


async def test_the_checksum_is_zlib_crc32(nc: Client, nc2: Client) -> None:
    """Checksums computed elsewhere with zlib (``checksums=``) are the ones checked."""
    data = torch.randint(0, 256, (3 * MIB + 17,), dtype=torch.uint8).numpy().tobytes()
    assert transfer.crc32(data) == zlib.crc32(data)
    assert transfer.crc32(data[5:], 123456) == zlib.crc32(data[5:], 123456)
    tensors = make_tensors(seed=11, big_mb=3)
    known = {
        name: zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, t in tensors.items()
    }
    async with TensorInbox(nc2, "rx-zlib", checksum_retries=0) as inbox:
        await send_tensors(nc, "rx-zlib", tensors, transfer_id="zlib-1", checksums=known)
        assert_bit_exact((await inbox.receive("zlib-1", timeout_s=30)).tensors, tensors)
        wrong = {**known, "big": known["big"] ^ 1}
        with pytest.raises(TransferError, match="CRC32"):
            await send_tensors(nc, "rx-zlib", tensors, transfer_id="zlib-2", checksums=wrong)


async def test_concurrent_transfers_into_one_inbox(nc: Client, nc2: Client) -> None:
    batches = {f"many-{i}": make_tensors(seed=20 + i, big_mb=3) for i in range(4)}
    async with TensorInbox(nc2, "rx-many", window=3) as inbox:
        sends = [
            send_tensors(nc, "rx-many", tensors, transfer_id=tid, chunk_bytes=MIB)
            for tid, tensors in batches.items()
        ]
        stats = await asyncio.gather(*sends)
        results = [await inbox.receive(tid, timeout_s=30) for tid in batches]
    for result, tensors in zip(results, batches.values(), strict=True):
        assert_bit_exact(result.tensors, tensors)
    assert all(s.max_in_flight <= 3 for s in stats)
    assert inbox.max_in_flight <= 4 * 3  # every window at once, at most


async def test_resending_a_completed_transfer_sends_nothing(nc: Client, nc2: Client) -> None:
    tensors = make_tensors(seed=5, big_mb=0)
    async with TensorInbox(nc2, "rx-twice") as inbox:
        first = await send_tensors(nc, "rx-twice", tensors, transfer_id="twice-1")
        again = await send_tensors(nc, "rx-twice", tensors, transfer_id="twice-1")
        assert_bit_exact((await inbox.receive("twice-1", timeout_s=10)).tensors, tensors)
    assert first.state == "accepted" and first.chunks_sent == first.chunks
    assert again.state == "complete" and again.chunks_sent == 0


async def test_only_empty_tensors(nc: Client, nc2: Client) -> None:
    tensors = {"nothing": torch.empty(0), "zeros": torch.empty(3, 0, dtype=torch.bfloat16)}
    async with TensorInbox(nc2, "rx-empty") as inbox:
        stats = await send_tensors(nc, "rx-empty", tensors, transfer_id="empty-1")
        result = await inbox.receive("empty-1", timeout_s=10)
    assert stats.state == "complete" and stats.chunks == 0
    assert_bit_exact(result.tensors, tensors)


async def test_receive_buffers_are_recycled_without_stale_bytes(nc: Client, nc2: Client) -> None:
    first = {"k": torch.full((3 * MIB,), 7, dtype=torch.int32)}
    second = {"k": torch.arange(3 * MIB, dtype=torch.int32)}
    async with TensorInbox(nc2, "rx-pool") as inbox:
        await send_tensors(nc, "rx-pool", first, transfer_id="pool-1")
        result = await inbox.receive("pool-1", timeout_s=30)
        assert_bit_exact(result.tensors, first)
        address = result.tensors["k"].data_ptr()
        assert inbox.pooled_bytes == 0
        del result
        gc.collect()
        assert inbox.pooled_bytes == 12 * MIB  # the buffer came back, not to the OS
        await send_tensors(nc, "rx-pool", second, transfer_id="pool-2")
        result = await inbox.receive("pool-2", timeout_s=30)
        assert result.tensors["k"].data_ptr() == address and inbox.pooled_bytes == 0
        assert_bit_exact(result.tensors, second)


# -- faults in flight ----------------------------------------------------------------------------


def flip_once(seq_to_corrupt: int) -> tuple[list[int], object]:
    corrupted: list[int] = []

    def tamper(seq: int, data: memoryview) -> bytes | memoryview:
        if seq != seq_to_corrupt or corrupted:
            return data
        corrupted.append(seq)
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x40
        return bytes(damaged)

    return corrupted, tamper


async def test_a_corrupted_chunk_is_detected_and_its_tensor_resent(nc: Client, nc2: Client) -> None:
    tensors = make_tensors(seed=1, big_mb=4)
    completed: list[ReceivedTransfer] = []
    async with TensorInbox(nc2, "rx-corrupt", on_complete=completed.append) as inbox:
        corrupted, tamper = flip_once(seq_to_corrupt=2)  # inside "big" (4 chunks of 1 MiB)
        stats = await send_tensors(
            nc, "rx-corrupt", tensors, transfer_id="corrupt-1", chunk_bytes=MIB, tamper=tamper
        )
        await eventually(lambda: completed, "the completed transfer", timeout_s=30)
    assert corrupted == [2]
    result = completed[0]
    assert_bit_exact(result.tensors, tensors)
    assert result.checksum_failures == 1
    assert stats.chunks_resent >= 1 and stats.chunks_sent > stats.chunks
    assert inbox.failures == {}


async def test_a_chunk_corrupted_every_time_fails_the_transfer(nc: Client, nc2: Client) -> None:
    tensors = make_tensors(seed=2, big_mb=2)
    completed: list[ReceivedTransfer] = []
    failed: list[tuple[str, str]] = []

    def always(seq: int, data: memoryview) -> bytes:
        damaged = bytearray(data)
        damaged[0] ^= 0x01
        return bytes(damaged)

    inbox = TensorInbox(
        nc2,
        "rx-bad",
        checksum_retries=2,
        on_complete=completed.append,
        on_failed=lambda tid, reason: failed.append((tid, reason)),
    )
    async with inbox:
        waiter = asyncio.create_task(inbox.receive("bad-1", timeout_s=30))
        with pytest.raises(TransferError, match="CRC32"):
            await send_tensors(nc, "rx-bad", tensors, transfer_id="bad-1", tamper=always)
        with pytest.raises(TransferFailedError, match="failed its size/CRC32 check 3 times"):
            await waiter
        assert inbox.active_bytes == 0 and inbox.active == []
        # Another holder with good bytes: a fresh attempt under the same id succeeds.
        await send_tensors(nc, "rx-bad", tensors, transfer_id="bad-1")
        await eventually(lambda: completed, "the re-sourced transfer", timeout_s=30)
    assert completed[0].checksum_failures == 0  # the failed attempt left nothing behind
    assert_bit_exact(completed[0].tensors, tensors)
    assert [tid for tid, _ in failed] == ["bad-1"]


async def test_a_lost_chunk_is_found_by_a_status_probe_and_resent(nc: Client, nc2: Client) -> None:
    tensors = make_tensors(seed=4, big_mb=3)
    dropped: list[int] = []

    def drop_once(seq: int, data: memoryview) -> memoryview | None:
        if seq == 1 and not dropped:
            dropped.append(seq)
            return None
        return data

    async with TensorInbox(nc2, "rx-lost") as inbox:
        stats = await send_tensors(
            nc,
            "rx-lost",
            tensors,
            transfer_id="lost-1",
            window=2,
            chunk_bytes=MIB,
            stall_timeout_s=0.3,
            tamper=drop_once,
        )
        result = await inbox.receive("lost-1", timeout_s=30)
    assert dropped == [1] and stats.probes >= 1 and stats.chunks_resent >= 1
    assert_bit_exact(result.tensors, tensors)


async def test_a_timed_out_sender_leaves_the_transfer_to_another_holder(
    nc: Client, nc2: Client
) -> None:
    tensors = make_tensors(seed=10, big_mb=6)

    def black_hole_from_3(seq: int, data: memoryview) -> memoryview | None:
        return data if seq < 3 else None

    async with TensorInbox(nc2, "rx-timeout", idle_timeout_s=600) as inbox:
        with pytest.raises(TransferTimeoutError, match="did not complete in time"):
            await send_tensors(
                nc,
                "rx-timeout",
                tensors,
                transfer_id="timeout-1",
                chunk_bytes=MIB,
                stall_timeout_s=0.2,
                timeout_s=3.0,
                tamper=black_hole_from_3,
            )
        assert inbox.active == ["timeout-1"]  # kept: resumable
        dropped = inbox.dropped_chunks
        late: list[asyncio.Future] = []

        def late_chunk_of_the_first_sender(seq: int, data: memoryview) -> memoryview:
            if seq == 0:  # in the old layout (1 MiB chunks, session 0): must be ignored
                stale = nc.publish(
                    transfer_data_subject("rx-timeout", "timeout-1"),
                    b"x" * MIB,
                    headers={SEQ_HEADER: "1", SESSION_HEADER: "0"},
                )
                late.append(asyncio.ensure_future(stale))
            return data

        # Another holder, another chunk size: the receiver starts the transfer over.
        stats = await send_tensors(
            nc,
            "rx-timeout",
            tensors,
            transfer_id="timeout-1",
            chunk_bytes=2 * MIB,
            tamper=late_chunk_of_the_first_sender,
        )
        result = await inbox.receive("timeout-1", timeout_s=30)
        await asyncio.gather(*late)
        assert inbox.dropped_chunks == dropped + 1
    assert stats.state == "accepted" and stats.chunks_sent == stats.chunks
    assert_bit_exact(result.tensors, tensors)


async def test_a_cancelled_sender_frees_the_receiver_at_once(nc: Client, nc2: Client) -> None:
    tensors = make_tensors(seed=6, big_mb=6)
    task: asyncio.Task | None = None

    def cancel_at_3(seq: int, data: memoryview) -> memoryview:
        if seq == 3 and task is not None:
            task.cancel()
        return data

    async with TensorInbox(nc2, "rx-cancel", idle_timeout_s=600) as inbox:
        task = asyncio.create_task(
            send_tensors(
                nc,
                "rx-cancel",
                tensors,
                transfer_id="cancel-1",
                chunk_bytes=MIB,
                tamper=cancel_at_3,
            )
        )
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: "cancel-1" in inbox.failures, "the abort", timeout_s=30)
        assert "aborted by its sender" in inbox.failures["cancel-1"]
        assert inbox.active_bytes == 0


# -- bad control messages ------------------------------------------------------------------------


def good_offer_body(ack_subject: str = "_INBOX.tests") -> dict:
    return {
        "transfer_id": "malformed-1",
        "source": "tests",
        "tensors": [{"name": "w", "dtype": "float32", "shape": [2, 3], "nbytes": 24}],
        "total_bytes": 24,
        "chunk_bytes": 4096,
        "window": 4,
        "ack_subject": ack_subject,
    }


def variant(**changes: object) -> bytes:
    body = good_offer_body()
    for key, value in changes.items():
        if key.startswith("tensor_"):
            body["tensors"][0][key.removeprefix("tensor_")] = value
        else:
            body[key] = value
    return msgpack.packb(body)


MALFORMED_OFFERS = {
    "not msgpack": (b"\xc1\xff garbage", "not valid msgpack"),
    "not a map": (msgpack.packb([1, 2, 3]), "bad transfer offer"),
    "missing fields": (msgpack.packb({"transfer_id": "x"}), "Field required"),
    "bad id": (variant(transfer_id="a.b"), "transfer_id"),
    "unknown dtype": (variant(tensor_dtype="float33"), "unknown or unsupported dtype"),
    "dunder dtype": (variant(tensor_dtype="__class__"), "unknown or unsupported dtype"),
    "not a dtype": (variant(tensor_dtype="tensor"), "unknown or unsupported dtype"),
    "size mismatch": (variant(tensor_nbytes=25, total_bytes=25), "is 24 bytes, not 25"),
    "negative dim": (variant(tensor_shape=[-2, 3]), "greater than or equal to 0"),
    "wrong total": (variant(total_bytes=99), "total_bytes"),
    "chunk too big": (variant(chunk_bytes=64 * MIB), "chunk_bytes 67108864 is outside"),
    "chunk too small": (variant(chunk_bytes=16), "chunk_bytes 16 is outside"),
    "window zero": (variant(window=0), "window"),
    "bad crc": (variant(tensor_crc32=2**40), "crc32"),
}


@pytest.mark.parametrize("case", list(MALFORMED_OFFERS))
async def test_a_malformed_offer_gets_a_clear_error(nc: Client, nc2: Client, case: str) -> None:
    body, expected = MALFORMED_OFFERS[case]
    async with TensorInbox(nc2, "rx-malformed") as inbox:
        reply = await nc.request(transfer_offer_subject("rx-malformed"), body, timeout=10)
        assert reply.headers is not None and reply.headers[ERROR_CODE_HEADER] == "400"
        assert expected in reply.headers[ERROR_HEADER]
        assert expected in decode(reply.data)["error"]["message"]
        assert inbox.active == []


async def test_bad_control_messages_never_break_the_inbox(nc: Client, nc2: Client) -> None:
    tensors = make_tensors(seed=7, big_mb=0)
    async with TensorInbox(nc2, "rx-robust", max_bytes=4 * MIB) as inbox:
        status = await nc.request(transfer_status_subject("rx-robust"), b"\x00\x01", timeout=10)
        assert status.headers is not None and status.headers[ERROR_CODE_HEADER] == "400"
        assert "bad status request" in status.headers[ERROR_HEADER]
        unknown = await nc.request("spotserve.v1.transfer.rx-robust.nonsense", b"", timeout=10)
        assert unknown.headers is not None and unknown.headers[ERROR_CODE_HEADER] == "404"
        # Chunks of unknown transfers and chunks without headers are dropped.
        await nc.publish(transfer_data_subject("rx-robust", "nobody"), b"x" * 100)
        await nc.publish(
            transfer_data_subject("rx-robust", "nobody"), b"x", headers={SEQ_HEADER: "zz"}
        )
        # Too large for this inbox at all: 413.
        with pytest.raises(TransferError, match=r"refused the offer \(413\)") as too_big:
            await send_tensors(nc, "rx-robust", {"huge": torch.zeros(2 * MIB)})
        assert too_big.value.code == "413"
        # Another offer under the id of a transfer in progress, with other tensors: 400.
        first = offer_for({"a": torch.zeros(1000)}, "conflict-1", 1024, "_INBOX.x")
        other = offer_for({"a": torch.zeros(999)}, "conflict-1", 1024, "_INBOX.x")
        offer_subject = transfer_offer_subject("rx-robust")
        assert (await nc.request(offer_subject, encode(first), timeout=10)).headers is None
        conflict = await nc.request(offer_subject, encode(other), timeout=10)
        assert conflict.headers is not None and conflict.headers[ERROR_CODE_HEADER] == "400"
        assert "in progress with other tensors" in conflict.headers[ERROR_HEADER]
        await eventually(lambda: inbox.dropped_chunks == 2, "dropped chunks", timeout_s=10)
        # Still serving.
        await send_tensors(nc, "rx-robust", tensors, transfer_id="robust-1")
        assert_bit_exact((await inbox.receive("robust-1", timeout_s=10)).tensors, tensors)


async def test_no_receiver_is_a_clear_error(nc: Client) -> None:
    with pytest.raises(TransferError, match="no tensor inbox answers at rx-nobody"):
        await send_tensors(nc, "rx-nobody", {"w": torch.zeros(4)})


# -- peers that die ------------------------------------------------------------------------------


async def test_a_receiver_killed_mid_transfer_fails_the_sender_who_retries_elsewhere(
    nats_server: EmbeddedNatsServer, nc: Client, nc2: Client, peers: list[Peer]
) -> None:
    doomed = Peer("receiver", nats_server.url, "rx-doomed")
    peers.append(doomed)
    assert await doomed.line() == "ready"
    tensors = make_tensors(seed=8, big_mb=12)
    killed: list[int] = []

    def kill_receiver_at_4(seq: int, data: memoryview) -> memoryview:
        if seq == 4 and not killed:
            os.kill(doomed.process.pid, signal.SIGKILL)
            killed.append(seq)
        return data

    with pytest.raises(TransferError, match="rx-doomed"):
        await send_tensors(
            nc,
            "rx-doomed",
            tensors,
            transfer_id="doomed-1",
            chunk_bytes=MIB,
            window=2,
            stall_timeout_s=0.5,
            timeout_s=60,
            tamper=kill_receiver_at_4,
        )
    assert killed == [4] and await doomed.wait() == -signal.SIGKILL
    # The same transfer to another destination.
    async with TensorInbox(nc2, "rx-survivor") as inbox:
        stats = await send_tensors(nc, "rx-survivor", tensors, transfer_id="doomed-1")
        result = await inbox.receive("doomed-1", timeout_s=30)
    assert stats.state == "accepted"
    assert_bit_exact(result.tensors, tensors)


async def test_a_sender_killed_mid_transfer_is_failed_freed_and_resourced(
    nats_server: EmbeddedNatsServer, nc: Client, nc2: Client, peers: list[Peer]
) -> None:
    failed: list[str] = []
    inbox = TensorInbox(
        nc2, "rx-orphan", idle_timeout_s=2.0, on_failed=lambda tid, reason: failed.append(tid)
    )
    async with inbox:
        waiter = asyncio.create_task(inbox.receive("orphan-1", timeout_s=60))
        sender = Peer("sender", nats_server.url, "rx-orphan", "orphan-1", "--die-at", "5")
        peers.append(sender)
        assert await sender.wait() == -signal.SIGKILL
        with pytest.raises(TransferFailedError, match="nothing from its source"):
            await waiter
        assert failed == ["orphan-1"]
        assert inbox.active == [] and inbox.active_bytes == 0  # buffers freed
        # Re-sourced: another holder of the same tensors sends them under the same id.
        tensors = make_tensors(seed=9)
        stats = await send_tensors(nc, "rx-orphan", tensors, transfer_id="orphan-1")
        result = await inbox.receive("orphan-1", timeout_s=30)
    assert stats.state == "accepted" and stats.chunks_sent == stats.chunks
    assert_bit_exact(result.tensors, tensors)


async def test_a_sender_killed_mid_transfer_is_resumed_by_another_holder(
    nats_server: EmbeddedNatsServer, nc: Client, nc2: Client, peers: list[Peer]
) -> None:
    async with TensorInbox(nc2, "rx-resume", idle_timeout_s=120) as inbox:
        sender = Peer("sender", nats_server.url, "rx-resume", "resume-1", "--die-at", "12")
        peers.append(sender)
        assert await sender.wait() == -signal.SIGKILL
        assert inbox.active == ["resume-1"]
        tensors = make_tensors(seed=9)
        stats = await send_tensors(
            nc, "rx-resume", tensors, transfer_id="resume-1", chunk_bytes=MIB
        )
        result = await inbox.receive("resume-1", timeout_s=30)
    assert stats.state == "resumed"
    assert 0 < stats.chunks_sent < stats.chunks  # only what had not arrived
    assert result.sessions == 2
    assert_bit_exact(result.tensors, tensors)


# -- the peer processes --------------------------------------------------------------------------


async def _receiver(url: str, instance: str) -> None:
    nc = await nats.connect(url, name=f"peer-{instance}")

    def report(result: ReceivedTransfer) -> None:
        line = {"transfer_id": result.transfer_id, "digest": digest(result.tensors)}
        print(json.dumps(line), flush=True)

    async with TensorInbox(nc, instance, on_complete=report):
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)
    await nc.close()


async def _sender(url: str, destination: str, transfer_id: str, die_at: int) -> None:
    nc = await nats.connect(url, name=f"peer-sender-{transfer_id}")

    def die(seq: int, data: memoryview) -> memoryview:
        if seq == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return data

    await send_tensors(
        nc,
        destination,
        make_tensors(seed=9),
        transfer_id=transfer_id,
        window=2,
        chunk_bytes=MIB,
        tamper=die,
    )
    await nc.close()


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["receiver", "sender"])
    parser.add_argument("url")
    parser.add_argument("instance")
    parser.add_argument("transfer_id", nargs="?")
    parser.add_argument("--die-at", type=int, default=-1)
    args = parser.parse_args()
    configure_logging(LogSettings(), f"test-transfer-{args.role}")  # to stderr
    if args.role == "receiver":
        asyncio.run(_receiver(args.url, args.instance))
    else:
        asyncio.run(_sender(args.url, args.instance, args.transfer_id, args.die_at))


if __name__ == "__main__":
    _main()
