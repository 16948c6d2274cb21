"""What committing an iteration's chunks to JetStream costs, by how they are published.

Side by side in one run, on one nats-server (JetStream on disk) started for it, for batches of
1, 8 and 32 chunks of the size of a token chunk:
- ``publish_async``: one JetStream publish per chunk with its own ``Nats-Msg-Id``, then one
  wait for all their acks (what the scheduler does);
- ``atomic batch``: JetStream's atomic batch publish (ADR-50, nats-server 2.12+): core
  publishes with ``Nats-Batch-Id``/``Nats-Batch-Sequence`` and one request for the commit's ack;
- ``fast batch``: JetStream's fast ingest (nats-server 2.14+): each chunk stored as it
  arrives, one ack for the batch's last chunk (``FastBatchPublisher`` below);
- ``iteration record``: one message holding every chunk of the iteration, plus the runs on
  the requests' own subjects that are due (``services.scheduler.tokens.run_due``, requests of
  RUN_CHUNKS tokens: a run at their first and last chunk), all with ``publish_async`` and one
  wait for the acks (what the scheduler does).

It prints per chunk the CPU of this (the publishing) process and of nats-server, and the wall
time per iteration's commit.

    python -m bench.commit [--chunks 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import StreamConfig

from bench.decode_throughput import own_cpu_s, process_cpu_s
from services.scheduler.tokens import RUN_CHUNKS, run_due
from shared.bus import connect
from shared.codec import encode
from shared.config import NatsSettings
from shared.messages import ChunkRecord, TokenChunk
from shared.natsserver import EmbeddedNatsServer

# A token chunk as the scheduler commits it, in msgpack: about this many bytes.
CHUNK_BYTES = 90
BATCH_SIZES = (1, 8, 32)
TIMEOUT_S = 10.0


# Messages between two flow acks the server sends during a fast batch (it may send more).
FAST_BATCH_FLOW = 1000


class BatchRefusedError(RuntimeError):
    """JetStream answered a batch with an error: the batch ended there."""


class FastBatchPublisher:
    """Stores lists of messages in a stream that allows batched publishes (JetStream's fast
    ingest, nats-server 2.14+): core publishes whose reply subjects carry the batch protocol
    (``<inbox>.<flow>.<gap>.<sequence>.<operation>.$FI``), and one ack, for the batch's last
    message, instead of one per message. Each message is stored as it arrives, not atomically;
    a batch whose messages did not all arrive ends in an error (gaps fail the batch): a retry
    would send the same messages as a new batch, and their ``Nats-Msg-Id`` drops those the
    failed try stored."""

    START, ADD, COMMIT = 0, 1, 2

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.batches = 0
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.subscription: Subscription | None = None

    async def publish(self, messages: list[tuple[str, bytes, str]], timeout_s: float) -> None:
        """Store ``messages`` (subject, body, Nats-Msg-Id); returns once JetStream has acked
        the last of them."""
        if self.subscription is None:
            self.subscription = await self.nc.subscribe(f"{self.inbox}.>", cb=self._on_ack)
        self.batches += 1
        batch = f"{self.batches}"
        acked = asyncio.get_running_loop().create_future()
        self.waiting[batch] = acked
        try:
            for number, (subject, body, message_id) in enumerate(messages, start=1):
                operation = self._operation(number, len(messages))
                reply = f"{self.inbox}.{batch}.{FAST_BATCH_FLOW}.fail.{number}.{operation}.$FI"
                await self.nc.publish(
                    subject, body, reply=reply, headers={"Nats-Msg-Id": message_id}
                )
            answer = await asyncio.wait_for(acked, timeout_s)
        finally:
            self.waiting.pop(batch, None)
        if answer.get("count") != len(messages):
            raise BatchRefusedError(f"a batch of {len(messages)} messages was acked as {answer}")

    def _operation(self, number: int, count: int) -> int:
        if number == count:
            return self.COMMIT
        return self.START if number == 1 else self.ADD

    async def _on_ack(self, message: Msg) -> None:
        batch = message.subject[len(self.inbox) + 1 :].split(".", 1)[0]
        acked = self.waiting.get(batch)
        if acked is None or acked.done():
            return  # a batch given up on, or a flow ack
        status = (message.headers or {}).get("Status")
        if status is not None:
            # No stream takes the subject (503), or another status instead of an ack.
            acked.set_exception(BatchRefusedError(f"batch answered with status {status}"))
            return
        try:
            answer = json.loads(message.data)
        except ValueError:
            acked.set_exception(BatchRefusedError(f"unreadable batch ack {message.data[:200]!r}"))
            return
        error = answer.get("error")
        if answer.get("type") == "gap":
            # A message of the batch never arrived: JetStream ends the batch before it.
            acked.set_exception(BatchRefusedError(f"a batch lost messages on the way: {answer}"))
        elif error is not None:
            acked.set_exception(
                BatchRefusedError(
                    f"JetStream refused a batch: {error.get('description')}"
                    f" (error {error.get('err_code')})"
                )
            )
        elif "batch" in answer:
            acked.set_result(answer)


async def commit_publish_async(nc: Client, messages: list[tuple[str, bytes, str]]) -> None:
    js = nc.jetstream()
    acks = [
        await js.publish_async(subject, body, headers={"Nats-Msg-Id": message_id})
        for subject, body, message_id in messages
    ]
    await asyncio.wait_for(asyncio.gather(*acks), TIMEOUT_S)


async def commit_atomic_batch(nc: Client, messages: list[tuple[str, bytes, str]]) -> None:
    batch_id = uuid.uuid4().hex
    for number, (subject, body, message_id) in enumerate(messages, start=1):
        headers = {
            "Nats-Batch-Id": batch_id,
            "Nats-Batch-Sequence": str(number),
            "Nats-Msg-Id": message_id,
        }
        if number < len(messages):
            await nc.publish(subject, body, headers=headers)
            continue
        headers["Nats-Batch-Commit"] = "1"
        reply = await nc.request(subject, body, timeout=TIMEOUT_S, headers=headers)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise RuntimeError(f"atomic batch refused: {answer['error']}")


def iteration_records(
    iteration: int, messages: list[tuple[str, bytes, str]]
) -> list[tuple[str, bytes, str]]:
    """The messages the scheduler commits for ``messages`` as one iteration: one record of all
    of them, and a run for each whose request (of RUN_CHUNKS chunks, all in step) is due one."""
    index = iteration % RUN_CHUNKS
    bodies = [body for _, body, _ in messages]
    records = [("bench.iterations", encode(ChunkRecord(chunks=bodies)), f"i{iteration}")]
    for subject, body, message_id in messages:
        last = index == RUN_CHUNKS - 1
        chunk = TokenChunk(
            request_id=subject,
            index=index,
            token_ids=[],
            text="",
            finish_reason="length" if last else None,
        )
        unrun = RUN_CHUNKS - 1 if last else index + 1
        if run_due(chunk, unrun):
            run = encode(ChunkRecord(chunks=[body] * unrun))
            records.append((subject, run, f"{message_id}.run"))
    return records


async def measure(server: EmbeddedNatsServer, chunks_total: int) -> list[str]:
    nc = await connect(server.url, NatsSettings(), name="bench-commit", deadline_s=10)
    await nc.jetstream().add_stream(
        StreamConfig(
            name="BENCH_COMMIT",
            subjects=["bench.commit.*", "bench.iterations"],
            allow_atomic=True,
            allow_batched=True,
        )
    )
    fast = FastBatchPublisher(nc)

    async def commit_fast_batch(nc: Client, messages: list[tuple[str, bytes, str]]) -> None:
        await fast.publish(messages, TIMEOUT_S)

    strategies = {
        "publish_async": commit_publish_async,
        "atomic batch": commit_atomic_batch,
        "fast batch": commit_fast_batch,
        "iteration record": commit_publish_async,
    }
    assert server.process is not None
    pid, body, lines = server.process.pid, b"x" * CHUNK_BYTES, []
    try:
        for batch in BATCH_SIZES:
            iterations = max(1, chunks_total // batch)
            for name, commit in strategies.items():
                server_before, own_before = process_cpu_s(pid), own_cpu_s()
                started = time.perf_counter()
                for iteration in range(iterations):
                    messages = [
                        (f"bench.commit.r{j}", body, f"{name}.{batch}.{iteration}.{j}")
                        for j in range(batch)
                    ]
                    if name == "iteration record":
                        messages = iteration_records(iteration, messages)
                    await commit(nc, messages)
                wall = time.perf_counter() - started
                chunks = iterations * batch
                lines.append(
                    f"{batch:>5}  {name:>16}  {(own_cpu_s() - own_before) / chunks * 1e6:>19.1f}"
                    f"  {(process_cpu_s(pid) - server_before) / chunks * 1e6:>19.1f}"
                    f"  {wall / iterations * 1e3:>16.2f}"
                )
    finally:
        await nc.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3000, help="chunks per cell")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spotserve-bench-") as store:
        with EmbeddedNatsServer(Path(store)) as server:
            lines = asyncio.run(measure(server, args.chunks))
    print(f"{args.chunks} chunks of {CHUNK_BYTES} bytes per cell, one nats-server, file store")
    print("batch          strategy  publisher CPU us/chunk  server CPU us/chunk  wall ms/commit")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
