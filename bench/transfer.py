"""Tensor streaming throughput between two processes vs raw NATS publish/subscribe.

An embedded nats-server (loopback, max_payload 8 MiB); a receiver process that runs a
:class:`shared.transfer.TensorInbox` and, beside it, a plain subscriber. Side by side in one
run, alternating, best of ``--repeats`` each:

(a) raw: a plain publisher fires the same bytes as 1 MiB messages at the subscriber (pending
    limits large enough to take them all), timed until the subscriber reports it has received
    every byte - no flow control, no checksums, no copies into tensors: the limit of NATS and
    nats-py on this machine;
(b) spotserve: ``send_tensors`` of ``--mib`` MiB of bf16 tensors (8 MiB each) to the
    receiver's inbox, timed from the call until it returns (the receiver has written every
    chunk into its buffer, checked every tensor's size and CRC32, and said so); the sender's
    own checksums included. The receiver drops each result, so later transfers reuse pooled
    buffers; the first transfer's figure (fresh buffers: page faults) is printed too.
Beside each figure, the CPU seconds the sender, nats-server and receiver processes spent: on a
small machine CPU is the limit, and what separates the two is the transfer's own work - the
receiver's copy of every chunk into its buffer, both sides' CRC32 (ISA-L, ~15 GB/s a core;
zlib's would be ~2 GB/s: the header line says which one runs) and the acknowledgements.

    python -m bench.transfer [--mib 256] [--chunk-kib 4096] [--window 8] [--repeats 3]
    python -m bench.transfer --sweep        # chunk sizes x windows, to choose the defaults
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import torch
from nats.aio.client import Client

from shared.config import LogSettings
from shared.logging import configure_logging
from shared.natsserver import EmbeddedNatsServer
from shared.transfer import (
    CRC32_IMPLEMENTATION,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_WINDOW,
    ReceivedTransfer,
    TensorInbox,
    TransferStats,
    send_tensors,
)

RAW_SUBJECT = "bench.raw"
RAW_START = "bench.raw.start"
RAW_DONE = "bench.raw.done"
RECEIVER_INSTANCE = "bench-receiver"
RAW_MESSAGE_BYTES = 1 << 20
MIB = 1 << 20


class BenchNatsServer(EmbeddedNatsServer):
    """The embedded server, with room for the raw baseline: without flow control its
    subscriber falls behind, and the server would cut it off as a slow consumer (64 MiB)."""

    def config_text(self) -> str:
        return super().config_text() + 'max_pending: 2147483648\nwrite_deadline: "60s"\n'


async def receiver(url: str) -> None:
    """The receiving process: a tensor inbox and a plain subscriber, until stdin closes."""
    nc = await nats.connect(url, name="bench-receiver")
    expected = 0
    got = 0

    async def on_start(msg) -> None:
        nonlocal expected, got
        expected, got = int(msg.data), 0
        await msg.respond(b"ok")

    async def on_raw(msg) -> None:
        nonlocal got
        got += len(msg.data)
        if got >= expected:
            await nc.publish(RAW_DONE, str(got).encode())

    def on_complete(result: ReceivedTransfer) -> None:
        pass  # dropped: the buffer is freed

    await nc.subscribe(RAW_START, cb=on_start)
    await nc.subscribe(
        RAW_SUBJECT, cb=on_raw, pending_bytes_limit=4 << 30, pending_msgs_limit=1 << 20
    )
    async with TensorInbox(nc, RECEIVER_INSTANCE, window=1024, on_complete=on_complete):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.close()


async def raw_run(nc: Client, nbytes: int) -> tuple[float, None]:
    """Seconds to publish ``nbytes`` as 1 MiB messages until the subscriber has them all."""
    await nc.request(RAW_START, str(nbytes).encode(), timeout=10)
    done = asyncio.get_running_loop().create_future()

    async def on_done(msg) -> None:
        if not done.done():
            done.set_result(int(msg.data))

    sub = await nc.subscribe(RAW_DONE, cb=on_done)
    await nc.flush()
    payload = torch.randint(0, 256, (RAW_MESSAGE_BYTES,), dtype=torch.uint8).numpy().tobytes()
    started = time.perf_counter()
    sent = 0
    while sent < nbytes:
        chunk = payload[: min(RAW_MESSAGE_BYTES, nbytes - sent)]
        await nc.publish(RAW_SUBJECT, chunk)
        sent += len(chunk)
    await asyncio.wait_for(done, 120)
    seconds = time.perf_counter() - started
    await sub.unsubscribe()
    return seconds, None


def make_tensors(total_mib: int) -> dict[str, torch.Tensor]:
    """``total_mib`` MiB of bf16 tensors of 8 MiB each (a layer's matrices), seeded."""
    generator = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}.weight": torch.randn(4 * MIB, generator=generator).to(torch.bfloat16)
        for i in range(max(1, total_mib // 8))
    }


async def transfer_run(
    nc: Client, tensors: dict[str, torch.Tensor], chunk_bytes: int, window: int, run: int
) -> tuple[float, TransferStats]:
    started = time.perf_counter()
    stats = await send_tensors(
        nc,
        RECEIVER_INSTANCE,
        tensors,
        transfer_id=f"bench-{run}",
        window=window,
        chunk_bytes=chunk_bytes,
        timeout_s=300,
    )
    assert stats.chunks_resent == 0 and stats.max_in_flight <= window, stats
    return time.perf_counter() - started, stats


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Best:
    mb_per_s: float = 0.0
    cpu: tuple[float, ...] = ()
    all: list[float] = field(default_factory=list)

    def add(self, mb_per_s: float, cpu: tuple[float, ...]) -> None:
        self.all.append(mb_per_s)
        if mb_per_s > self.mb_per_s:
            self.mb_per_s, self.cpu = mb_per_s, cpu

    @property
    def median(self) -> float:
        return statistics.median(self.all)

    def describe(self) -> str:
        cpu = "/".join(f"{c:.2f}" for c in self.cpu)
        return (
            f"{self.mb_per_s:5.0f} MB/s (median {self.median:4.0f};"
            f" CPU s sender/server/receiver {cpu})"
        )


async def measure(
    url: str, pids: list[int], total_mib: int, settings: list[tuple[int, int]], repeats: int
) -> list[tuple[int, int, Best, Best]]:
    """(chunk, window, raw, transfer) per setting, alternating raw and transfer runs."""
    nc = await nats.connect(url, name="bench-sender")
    tensors = make_tensors(total_mib)
    nbytes = sum(t.nbytes for t in tensors.values())
    rows = []
    run = 0

    async def timed(coro) -> tuple[float, tuple[float, ...], object]:
        before = [cpu_seconds(pid) for pid in pids]
        seconds, extra = await coro
        cpu = tuple(cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True))
        return nbytes / seconds / 1e6, cpu, extra

    for chunk_bytes, window in settings:
        raw, transfer = Best(), Best()
        for _ in range(repeats):
            mb_per_s, cpu, _ = await timed(raw_run(nc, nbytes))
            raw.add(mb_per_s, cpu)
            mb_per_s, cpu, stats = await timed(transfer_run(nc, tensors, chunk_bytes, window, run))
            if run == 0:
                print(f"first transfer (fresh receive buffers): {mb_per_s:.0f} MB/s", flush=True)
            run += 1
            transfer.add(mb_per_s, cpu)
        chunk = stats.chunk_bytes  # type: ignore[attr-defined]
        rows.append((chunk, window, raw, transfer))
        print(
            f"chunk {chunk / MIB:5.2f} MiB, window {window:3}: raw {raw.describe()}\n"
            f"{'':27}transfer {transfer.describe()}  ratio"
            f" {transfer.mb_per_s / raw.mb_per_s:.2f}"
            f" (of medians {transfer.median / raw.median:.2f})",
            flush=True,
        )
    await nc.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of tensors per transfer")
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK_BYTES // 1024)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="chunk sizes x windows")
    parser.add_argument("--role", choices=["main", "receiver"], default="main")
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging(LogSettings(level="warning"), "bench-transfer")
    if args.role == "receiver":
        asyncio.run(receiver(args.url))
        return
    if args.sweep:
        settings = [(mib * MIB, w) for mib in (1, 2, 4, 8) for w in (2, 4, 8, 16)]
    else:
        settings = [(args.chunk_kib * 1024, args.window)]
    with tempfile.TemporaryDirectory(prefix="spotserve-bench-transfer-") as tmp:
        with BenchNatsServer(Path(tmp)) as server:
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.transfer", "--role", "receiver", "--url", server.url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            try:
                assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
                print(
                    f"{args.mib} MiB of bf16 tensors, sender -> receiver process over an embedded"
                    f" nats-server (loopback), {os.cpu_count()} CPUs; best of {args.repeats};"
                    f" CRC32 by {CRC32_IMPLEMENTATION}"
                )
                assert server.process is not None
                pids = [os.getpid(), server.process.pid, child.pid]
                rows = asyncio.run(measure(server.url, pids, args.mib, settings, args.repeats))
            finally:
                if child.stdin is not None:
                    child.stdin.close()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
    chunk, window, raw, transfer = max(rows, key=lambda row: row[3].mb_per_s)
    print(
        f"raw NATS pub/sub {raw.mb_per_s:.0f} MB/s, spotserve transfer {transfer.mb_per_s:.0f}"
        f" MB/s (chunk {chunk / MIB:.2f} MiB, window {window}),"
        f" ratio {transfer.mb_per_s / raw.mb_per_s:.2f} best/best,"
        f" {transfer.median / raw.median:.2f} median/median (target >= 0.7)"
    )


if __name__ == "__main__":
    main()
