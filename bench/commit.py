"""What committing an iteration's chunks to JetStream costs, by how they are published.

Side by side in one run, on one nats-server (JetStream on disk) started for it, for batches of
1, 8 and 32 chunks of the size of a token chunk:
- ``publish_async``: what the scheduler does (services/scheduler/tokens.py): one publish per
  chunk with its own ``Nats-Msg-Id``, then one wait for all their acks;
- ``atomic batch``: JetStream's atomic batch publish (ADR-50, nats-server 2.12+): core
  publishes with ``Nats-Batch-Id``/``Nats-Batch-Sequence`` and one request for the commit's ack.

It prints per chunk the CPU of this (the publishing) process and of nats-server, and the wall
time per iteration's commit.

    python -m bench.commit [--iterations-of-32 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
import uuid
from pathlib import Path

from nats.aio.client import Client
from nats.js.api import StreamConfig

from bench.decode_throughput import process_cpu_s
from shared.bus import connect
from shared.config import NatsSettings
from shared.natsserver import EmbeddedNatsServer

# A token chunk as the scheduler commits it, in msgpack: about this many bytes.
CHUNK_BYTES = 90
BATCH_SIZES = (1, 8, 32)
TIMEOUT_S = 10.0


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


STRATEGIES = {"publish_async": commit_publish_async, "atomic batch": commit_atomic_batch}


async def measure(server: EmbeddedNatsServer, chunks_total: int) -> list[str]:
    nc = await connect(server.url, NatsSettings(), name="bench-commit", deadline_s=10)
    await nc.jetstream().add_stream(
        StreamConfig(name="BENCH_COMMIT", subjects=["bench.commit.*"], allow_atomic=True)
    )
    assert server.process is not None
    pid, body, lines = server.process.pid, b"x" * CHUNK_BYTES, []
    try:
        for batch in BATCH_SIZES:
            iterations = max(1, chunks_total // batch)
            for name, commit in STRATEGIES.items():
                server_before, own_before = process_cpu_s(pid), own_cpu_s()
                started = time.perf_counter()
                for iteration in range(iterations):
                    await commit(
                        nc,
                        [
                            (f"bench.commit.r{j}", body, f"{name}.{batch}.{iteration}.{j}")
                            for j in range(batch)
                        ],
                    )
                wall = time.perf_counter() - started
                chunks = iterations * batch
                lines.append(
                    f"{batch:>5}  {name:>13}  {(own_cpu_s() - own_before) / chunks * 1e6:>19.1f}"
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
    print("batch       strategy  publisher CPU us/chunk  server CPU us/chunk  wall ms/commit")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
