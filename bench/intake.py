"""How long an accepted request waits in JetStream before the scheduler's intake takes it.

A real nats-server; Poisson arrivals published to a stream while one consumer loops over
``fetch`` with the scheduler's timeout, as ``services.scheduler.intake`` does. Side by side in
one run: fetching ``--baseline-batch`` messages per pull, and the scheduler's own
``FETCH_BATCH``. A pull for more than one can stay open on the server after the fetch returned,
and a request arriving meanwhile waits there for the pull to expire.

    python -m bench.intake [--requests 200] [--rate 5] [--baseline-batch 4]

Ends with ``summary: batch=B mean_ms=X p99_ms=Y max_ms=Z held=H/N`` per batch size (held:
taken more than 5 ms after it was stored).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from nats.errors import TimeoutError as NatsTimeoutError

from bench.workloads import mean, percentile
from services.scheduler.intake import FETCH_BATCH
from shared.bus import connect
from shared.config import NatsSettings, SchedulerSettings
from shared.natsserver import EmbeddedNatsServer

HELD_S = 0.005
JETSTREAM_TIMEOUT_S = 10.0


async def intake_delays(url: str, batch: int, requests: int, rate: float, seed: int) -> list[float]:
    """Seconds from each message's stored ack to the fetch that returned it."""
    nc = await connect(url, NatsSettings(), f"bench-intake-{batch}", 10)
    js = nc.jetstream(timeout=JETSTREAM_TIMEOUT_S)
    stream, subject = f"INTAKE{batch}", f"intake.{batch}"
    await js.add_stream(name=stream, subjects=[subject])
    subscription = await js.pull_subscribe(subject, durable=f"intake{batch}", stream=stream)
    timeout_s = SchedulerSettings().fetch_timeout_s
    stored: dict[bytes, float] = {}
    delays: list[float] = []

    async def consume() -> None:
        while len(delays) < requests:
            try:
                messages = await subscription.fetch(batch=batch, timeout=timeout_s)
            except NatsTimeoutError:
                continue
            now = time.monotonic()
            for message in messages:
                delays.append(now - stored[message.data])
                await message.ack()

    consumer = asyncio.create_task(consume())
    rng = random.Random(seed)
    for index in range(requests):
        await asyncio.sleep(rng.expovariate(rate))
        key = str(index).encode()
        await js.publish(subject, key)
        stored[key] = time.monotonic()
    await asyncio.wait_for(consumer, timeout_s * requests + 10)
    await nc.close()
    return delays


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="spotserve-bench-intake-") as store:
        server = EmbeddedNatsServer(Path(store))
        server.start()
        try:
            results = {
                batch: await intake_delays(server.url, batch, args.requests, args.rate, args.seed)
                for batch in (args.baseline_batch, FETCH_BATCH)
            }
        finally:
            server.stop()
    print(
        f"{args.requests} requests, Poisson {args.rate:g} req/s, fetch timeout"
        f" {SchedulerSettings().fetch_timeout_s:g} s (the scheduler's)"
    )
    for batch, delays in results.items():
        held = sum(1 for delay in delays if delay > HELD_S)
        print(
            f"summary: batch={batch} mean_ms={mean(delays) * 1e3:.1f}"
            f" p99_ms={percentile(delays, 0.99) * 1e3:.1f} max_ms={max(delays) * 1e3:.1f}"
            f" held={held}/{len(delays)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--baseline-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
