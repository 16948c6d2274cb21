"""How long an accepted request waits in JetStream before the scheduler's intake takes it.

A real nats-server; Poisson arrivals published to a stream while one consumer takes them with
the scheduler's fetch timeout. Side by side in one run: ``fetch`` of ``--baseline-batch``
messages per pull, and the scheduler's own way (``services.scheduler.intake.pull_requests``: a
pull for one, then a short one for what else is there). A pull for more than one can stay open
on the server after the fetch returned, and a request arriving meanwhile waits there for the
pull to expire.

    python -m bench.intake [--requests 200] [--rate 5] [--baseline-batch 4]

Ends with ``summary: intake=NAME mean_ms=X p99_ms=Y max_ms=Z held=H/N`` per way (held: taken
more than 5 ms after it was stored).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from bench.workloads import mean, percentile
from services.scheduler.intake import pull_requests
from shared.bus import connect
from shared.config import NatsSettings, SchedulerSettings
from shared.natsserver import EmbeddedNatsServer

HELD_S = 0.005
JETSTREAM_TIMEOUT_S = 10.0


async def intake_delays(
    url: str, name: str, batch: int | None, requests: int, rate: float, seed: int
) -> list[float]:
    """Seconds from each message's stored ack to its taking: by fetches of ``batch`` messages,
    or (None) by the scheduler's ``pull_requests``."""
    nc = await connect(url, NatsSettings(), f"bench-intake-{name}", 10)
    js = nc.jetstream(timeout=JETSTREAM_TIMEOUT_S)
    stream, subject = f"INTAKE_{name.upper()}", f"intake.{name}"
    await js.add_stream(name=stream, subjects=[subject])
    subscription = await js.pull_subscribe(subject, durable=f"intake-{name}", stream=stream)
    timeout_s = SchedulerSettings().fetch_timeout_s
    stored: dict[bytes, float] = {}
    delays: list[float] = []

    async def take(message: Msg) -> None:
        delays.append(time.monotonic() - stored[message.data])
        await message.ack()

    async def consume() -> None:
        while len(delays) < requests:
            try:
                if batch is None:
                    async for message in pull_requests(subscription, requests, timeout_s):
                        await take(message)
                    continue
                for message in await subscription.fetch(batch=batch, timeout=timeout_s):
                    await take(message)
            except NatsTimeoutError:
                continue

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
            ways = {f"fetch-{args.baseline_batch}": args.baseline_batch, "scheduler": None}
            results = {
                name: await intake_delays(
                    server.url, name, batch, args.requests, args.rate, args.seed
                )
                for name, batch in ways.items()
            }
        finally:
            server.stop()
    print(
        f"{args.requests} requests, Poisson {args.rate:g} req/s, fetch timeout"
        f" {SchedulerSettings().fetch_timeout_s:g} s (the scheduler's)"
    )
    for name, delays in results.items():
        held = sum(1 for delay in delays if delay > HELD_S)
        print(
            f"summary: intake={name} mean_ms={mean(delays) * 1e3:.1f}"
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
