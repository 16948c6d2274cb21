"""Serving through a preemption, measured through a real cluster, side by side in one run:

- spotserve, grace G: the serving instance gets a notice with a grace period while requests
  stream; the planner moves its role to the other (already loaded) instance and the requests
  follow the just-in-time arrangement (finish in place when the grace period allows, else
  decode on, then move with their KV caches streamed peer to peer);
- spotserve, no grace: the same notice with grace 0 (the instance is SIGKILLed at once; its
  requests resume from their committed tokens);
- restart-and-reload: every executor is killed and a fresh instance loads the model through
  its node's loader before serving again (the baseline SpotServe compares with).

For each: seconds from the event until the system serves a new request again, and the largest
gap between two chunks a streaming request sees across the event (next to its median gap).

    python -m bench.reparallelize [--size tiny] [--requests 4] [--max-tokens 400] [--graces 5,1]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client

from shared.bus import connect
from shared.client import GenerateError, SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.loading.store import push_model
from shared.messages import InflightReport, TokenChunk
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.natsserver import EmbeddedNatsServer
from shared.subjects import FLEET_ADD, FLEET_NOTICE, SCHEDULER_INFLIGHT

ENV = {
    "SPOTSERVE_MONITOR__HEARTBEAT_S": "0.25",
    "SPOTSERVE_MONITOR__LEASE_S": "3",
    "SPOTSERVE_PLANNER__DEBOUNCE_S": "0.2",
    "SPOTSERVE_SCHEDULER__DISCOVERY_INTERVAL_S": "0.5",
    "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
}


@dataclass
class Outcome:
    scenario: str
    serving_again_s: float
    max_gap_s: float
    median_gap_s: float


async def timed_stream(stream: AsyncIterator[TokenChunk]) -> list[float]:
    arrivals = []
    async for _chunk in stream:
        arrivals.append(time.perf_counter())
    return arrivals


async def serving_again(client: SpotserveClient, since: float) -> float:
    """Seconds from ``since`` until a one-token request completes."""
    while True:
        try:
            await asyncio.wait_for(client.generate("probe", max_tokens=1, temperature=0.0), 60)
            return time.perf_counter() - since
        except (GenerateError, TimeoutError):
            await asyncio.sleep(0.05)


async def serving_instance(nc: Client) -> str:
    while True:
        reply = await nc.request(SCHEDULER_INFLIGHT, b"", timeout=10)
        report = InflightReport.model_validate(decode(reply.data))
        instances = {sequence.instance_id for sequence in report.sequences}
        instances.discard(None)
        if len(instances) == 1:
            return str(instances.pop())
        await asyncio.sleep(0.05)


async def scenario(
    cluster: LocalCluster, name: str, grace_s: float | None, requests: int, max_tokens: int
) -> Outcome:
    nc = await connect(cluster.nats_url, NatsSettings(), name="bench", deadline_s=10)
    client = SpotserveClient(nc)
    try:
        await client.generate("warm up", max_tokens=4, temperature=0.0)
        streams = [
            client.stream(f"stream {i}", max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
            for i in range(requests)
        ]
        firsts = [await anext(stream) for stream in streams]
        del firsts
        tasks = [asyncio.create_task(timed_stream(stream)) for stream in streams]
        await asyncio.sleep(0.5)  # some steady-state decoding before the event
        victim = await serving_instance(nc)
        event = time.perf_counter()
        if grace_s is None:
            for service in cluster.services:
                if service.name == "spotserve-executor":
                    cluster.kill(service.log_path.stem)
            await nc.request(FLEET_ADD, encode({"count": 1}), timeout=30)
        else:
            body = encode({"instance_id": victim, "grace_s": grace_s})
            await nc.request(FLEET_NOTICE, body, timeout=30)
        again = await serving_again(client, event)
        arrivals = await asyncio.wait_for(asyncio.gather(*tasks), 600)
    finally:
        await nc.close()
    gaps = [b - a for times in arrivals for a, b in itertools.pairwise(times)]
    return Outcome(name, again, max(gaps), statistics.median(gaps))


def run_cluster(
    model_dir: Path, name: str, grace_s: float | None, requests: int, max_tokens: int
) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="spotserve-reparallelize-") as tmp:
        server = EmbeddedNatsServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(_push(server.url, model_dir))
            env = {
                **ENV,
                "SPOTSERVE_MODEL__NAME": "bench-model",
                "SPOTSERVE_LOADER__MODELS_DIR": str(Path(tmp) / "node-disk"),
            }
            cluster = LocalCluster(
                Path(tmp) / "cluster", 2, model_dir, nats_url=server.url, env=env
            )
            cluster.start()
            try:
                return asyncio.run(scenario(cluster, name, grace_s, requests, max_tokens))
            finally:
                cluster.stop()
        finally:
            server.stop()


async def _push(nats_url: str, model_dir: Path) -> None:
    nc = await connect(nats_url, NatsSettings(), name="bench-push", deadline_s=10)
    try:
        await push_model(nc, nc.jetstream(timeout=120), model_dir, "bench-model")
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument(
        "--graces", default="5,1", help="grace periods to try, comma separated (seconds)"
    )
    args = parser.parse_args()
    os.environ.setdefault("SPOTSERVE_LOG__LEVEL", "warning")
    model_dir = ensure_model(default_model_dir(args.size), args.size)
    graces = [float(g) for g in args.graces.split(",")]
    scenarios: list[tuple[str, float | None]] = [
        *((f"spotserve, grace {g:g} s", g) for g in graces),
        ("spotserve, no grace", 0.0),
        ("restart-and-reload", None),
    ]
    outcomes = [
        run_cluster(model_dir, name, grace, args.requests, args.max_tokens)
        for name, grace in scenarios
    ]
    print(
        f"{args.size} model, 2 instances, {args.requests} requests of {args.max_tokens} tokens"
        " streaming through the event"
    )
    print(f"{'scenario':>26}  {'serving again s':>15}  {'max gap s':>9}  {'median gap s':>12}")
    for o in outcomes:
        print(
            f"{o.scenario:>26}  {o.serving_again_s:>15.2f}  {o.max_gap_s:>9.2f}"
            f"  {o.median_gap_s:>12.3f}"
        )
    base = outcomes[-1]
    for o in outcomes[:-1]:
        print(
            f"restart-and-reload / {o.scenario}: serving again"
            f" {base.serving_again_s / o.serving_again_s:.1f}x,"
            f" max gap {base.max_gap_s / o.max_gap_s:.1f}x"
        )


if __name__ == "__main__":
    main()
