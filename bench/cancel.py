"""Cancellation, timed: how long a cancelled request keeps its batch slot (tiny model, one
executor instance, the gateway; real processes).

Two ways in, each repeated: an HTTP client of the gateway streaming a completion hangs up after
a few chunks (the gateway cancels the request), and a NATS client calls ``spotserve.v1.cancel``
mid-stream. Reported: from the hang-up (or the cancel call) to the scheduler no longer holding
the request (its ``inflight`` report, polled every 5 ms), median and max, next to the physical
floor, one decode iteration of the same batch (the median gap between the stream's chunks
before the cancel): the scheduler frees a slot at an iteration boundary.

    python -m bench.cancel [--repeats 10] [--background 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from nats.aio.client import Client

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.messages import Empty
from shared.rpc import INFLIGHT_ENDPOINT, call

PROMPT = "A client that hangs up, number"
MODEL = "tiny"
# Long enough never to end on its own before the cancel lands (tiny model: 1024 context).
MAX_TOKENS = 900
CANCEL_AFTER_CHUNKS = 8
POLL_S = 0.005
FREE_WAIT_S = 60.0
# The ids the gateway gives its requests (<hex>-<choice>); the others here are named.
GATEWAY_ID = re.compile(r"^[0-9a-f]{32}-[0-9]+$")


@dataclass
class Timings:
    """One way of cancelling: seconds to the free slot, and the iteration time seen."""

    to_free_s: list[float] = field(default_factory=list)
    iteration_s: list[float] = field(default_factory=list)

    def line(self, name: str) -> str:
        free = self.to_free_s
        iteration = statistics.median(self.iteration_s)
        return (
            f"{name}: to a free slot median {statistics.median(free) * 1000:.1f} ms,"
            f" max {max(free) * 1000:.1f} ms over {len(free)} cancels; one iteration"
            f" {iteration * 1000:.1f} ms (median ratio {statistics.median(free) / iteration:.2f})"
        )


async def held(nc: Client) -> set[str]:
    report = await call(nc, INFLIGHT_ENDPOINT, Empty(), timeout_s=10)
    return {sequence.request_id for sequence in report.sequences}


async def until_free(nc: Client, request_id: str, since: float) -> float:
    """Seconds from ``since`` until the scheduler no longer holds ``request_id``."""
    deadline = since + FREE_WAIT_S
    while time.monotonic() < deadline:
        if request_id not in await held(nc):
            return time.monotonic() - since
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"{request_id} still held {FREE_WAIT_S:.0f} s after its cancel")


def median_gap(times: list[float]) -> float:
    return statistics.median(b - a for a, b in itertools.pairwise(times))


async def hang_up_once(http: httpx.AsyncClient, nc: Client) -> tuple[float, float]:
    """Stream through the gateway, hang up after a few chunks; (to free, iteration) seconds."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
    body["ignore_eos"] = True
    times: list[float] = []
    async with http.stream("POST", "/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.monotonic())
            if len(times) >= CANCEL_AFTER_CHUNKS:
                (request_id,) = {id_ for id_ in await held(nc) if GATEWAY_ID.match(id_)}
                break
    hung_up = time.monotonic()  # leaving the block closed the connection
    return await until_free(nc, request_id, hung_up), median_gap(times)


async def cancel_once(client: SpotserveClient, nc: Client, index: int) -> tuple[float, float]:
    """Stream over NATS, cancel after a few chunks and read the stream to its cancelled end;
    (to free, iteration) seconds."""
    request_id = f"bench-cancel-{index}-{time.monotonic_ns()}"
    times: list[float] = []
    freed: asyncio.Task[float] | None = None
    finish_reason = None
    async for chunk in client.stream(
        f"{PROMPT} {index}", request_id=request_id, max_tokens=MAX_TOKENS, ignore_eos=True
    ):
        finish_reason = chunk.finish_reason
        if freed is None:
            times.append(time.monotonic())
        if len(times) == CANCEL_AFTER_CHUNKS and freed is None:
            cancelled = time.monotonic()
            await client.cancel(request_id)
            freed = asyncio.create_task(until_free(nc, request_id, cancelled))
    if freed is None or finish_reason != "cancelled":
        raise RuntimeError(f"{request_id} ended {finish_reason!r}, not cancelled")
    return await freed, median_gap(times)


async def background_load(client: SpotserveClient, count: int, stop: asyncio.Event) -> None:
    """``count`` other requests streaming meanwhile, so the batch is not just the one."""

    async def one(index: int) -> None:
        while not stop.is_set():
            await client.generate(
                f"Background request {index}",
                request_id=f"background-{index}-{time.monotonic_ns()}",
                max_tokens=200,
                ignore_eos=True,
            )

    tasks = [asyncio.create_task(one(index)) for index in range(count)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def measure(cluster: LocalCluster, repeats: int, background: int) -> dict[str, Timings]:
    base_url = (await cluster.urls()).gateway[0]
    nc = await connect(cluster.nats_url, cluster.nats_settings(), name="bench", deadline_s=10)
    client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
    stop = asyncio.Event()
    load = asyncio.create_task(background_load(client, background, stop))
    results = {"gateway hang-up": Timings(), "spotserve.v1.cancel": Timings()}
    try:
        await asyncio.sleep(2.0)  # the background batch under way
        async with httpx.AsyncClient(base_url=base_url) as http:
            for index in range(repeats):
                to_free, iteration = await hang_up_once(http, nc)
                results["gateway hang-up"].to_free_s.append(to_free)
                results["gateway hang-up"].iteration_s.append(iteration)
                to_free, iteration = await cancel_once(client, nc, index)
                results["spotserve.v1.cancel"].to_free_s.append(to_free)
                results["spotserve.v1.cancel"].iteration_s.append(iteration)
    finally:
        stop.set()
        await load
        await nc.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--background", type=int, default=3, help="other requests streaming")
    args = parser.parse_args()
    from shared.model.checkpoint import default_model_dir, ensure_model

    model_dir = ensure_model(default_model_dir("tiny"), "tiny")
    with tempfile.TemporaryDirectory(prefix="spotserve-cancel-") as base:
        env = {"SPOTSERVE_EXECUTOR__TORCH_THREADS": "1"}
        with LocalCluster(Path(base), instances=1, model_dir=model_dir, env=env) as cluster:
            results = asyncio.run(measure(cluster, args.repeats, args.background))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{stamp}: tiny model, 1 executor instance (1 torch thread), {args.background} other"
        f" requests streaming, cancel after {CANCEL_AFTER_CHUNKS} chunks"
    )
    for name, timings in results.items():
        print(timings.line(name))
    for name, timings in results.items():
        way = name.replace(" ", "-")
        print(
            f"summary: way={way} cancels={len(timings.to_free_s)}"
            f" to_free_median_ms={statistics.median(timings.to_free_s) * 1000:.1f}"
            f" to_free_max_ms={max(timings.to_free_s) * 1000:.1f}"
            f" iteration_ms={statistics.median(timings.iteration_s) * 1000:.1f}"
        )


if __name__ == "__main__":
    main()
