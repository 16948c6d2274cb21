"""SIGTERM as a preemption notice, timed: local processes stand in for pods (tiny model, two
executor instances, each run on its own cluster). A batch of streaming requests runs on one
executor; once each has received a few chunks the executor gets SIGTERM, as Kubernetes sends it
on a spot reclaim, with ``SPOTSERVE_EXECUTOR__TERMINATION_GRACE_S`` = the grace period (margin
2 s). With a grace the executor announces grace - margin through the monitor and serves on while
the planner moves its requests (with their KV caches when there is time); with 0 it stops at
once and the scheduler recovers its requests elsewhere from the committed tokens.

Reported per grace period: the victim requests, the time from SIGTERM to the last token of each
(median and max), the same batch's undisturbed time from the same point (its own run first, on
the same cluster), where they finished (moved with cache, recomputed elsewhere, or on the
victim before it left), and whether every output equals the undisturbed greedy one.

    python -m bench.sigterm [--graces 15,0] [--requests 8] [--max-tokens 960]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from bench.nats_failover import Received, stream_request
from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode
from shared.messages import Plan
from shared.subjects import PLANS_STREAM, PLANS_SUBJECT

PROMPT = "A pod on a spot node is reclaimed; request"
GREEDY: dict[str, object] = {"temperature": 0.0, "ignore_eos": True}
MARGIN_S = 2.0
# SIGTERM once every request has this many chunks (the batch is well under way).
SIGTERM_AFTER_CHUNKS = 16
ENV = {
    "SPOTSERVE_MONITOR__HEARTBEAT_S": "0.25",
    "SPOTSERVE_MONITOR__LEASE_S": "3",
    "SPOTSERVE_PLANNER__DEBOUNCE_S": "0.2",
    "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
    "SPOTSERVE_SCHEDULER__DISCOVERY_INTERVAL_S": "0.5",
    "SPOTSERVE_EXECUTOR__TERMINATION_MARGIN_S": str(MARGIN_S),
}
PLAN_WAIT_S = 240.0
FINISH_WAIT_S = 600.0


@dataclass
class SigtermOutcome:
    grace_s: float
    victims: int
    after_sigterm_s: list[float]  # SIGTERM to each victim's last token
    undisturbed_s: list[float]  # the same point to the last token, undisturbed
    moved_with_cache: int
    recomputed: int
    exact: int
    lost: int  # not finished, or ended by an error
    gaps_or_repeats: int
    executor_exit_s: float | None  # SIGTERM to the process's exit

    def lines(self) -> list[str]:
        def ms(values: list[float]) -> str:
            return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"

        exited = "n/a" if self.executor_exit_s is None else f"{self.executor_exit_s:.2f} s"
        return [
            f"grace {self.grace_s:g} s (announced {max(self.grace_s - MARGIN_S, 0):g} s):"
            f" {self.victims} requests on the SIGTERMed executor",
            f"  SIGTERM to last token: {ms(self.after_sigterm_s)}"
            f"  (undisturbed from the same point: {ms(self.undisturbed_s)})",
            f"  moved with their KV cache: {self.moved_with_cache}, recomputed elsewhere:"
            f" {self.recomputed}, finished on the victim: "
            f"{self.victims - self.moved_with_cache - self.recomputed}",
            f"  exact greedy outputs: {self.exact}/{self.victims}, lost: {self.lost}, gaps or"
            f" repeats: {self.gaps_or_repeats}; executor exited {exited} after SIGTERM",
        ]

    def summary(self) -> str:
        return (
            f"summary: grace_s={self.grace_s:g} victims={self.victims}"
            f" sigterm_to_last_token_max_s={max(self.after_sigterm_s):.2f}"
            f" undisturbed_max_s={max(self.undisturbed_s):.2f}"
            f" moved_with_cache={self.moved_with_cache} recomputed={self.recomputed}"
            f" exact={self.exact} lost={self.lost}"
        )


async def serving_plan(nc: Client) -> Plan:
    """The first plan over both executors."""
    js = nc.jetstream(timeout=10)
    deadline = time.monotonic() + PLAN_WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(NotFoundError, TimeoutError):
            message = await js.get_last_msg(PLANS_STREAM, PLANS_SUBJECT)
            plan = Plan.model_validate(decode(message.data or b""))
            if plan.fleet_seq >= 2 and plan.roles:
                return plan
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no plan over both executors within {PLAN_WAIT_S:.0f} s")


async def batch(
    client: SpotserveClient, requests: int, max_tokens: int, at_progress: asyncio.Event
) -> list[Received]:
    """Stream the batch; ``at_progress`` is set once every request has enough chunks."""
    seen: dict[int, Received] = {}

    def on_chunk(received: Received) -> None:
        seen[received.index] = received
        if len(seen) == requests and all(
            len(run.chunks) >= SIGTERM_AFTER_CHUNKS for run in seen.values()
        ):
            at_progress.set()

    runs = [
        stream_request(client, i, max_tokens, on_chunk, prompt=PROMPT, sampling=GREEDY)
        for i in range(requests)
    ]
    return list(await asyncio.wait_for(asyncio.gather(*runs), FINISH_WAIT_S))


def chunk_time_at(run: Received, chunks: int) -> float:
    return run.times[min(chunks, len(run.times)) - 1]


async def run_once(cluster: LocalCluster, requests: int, max_tokens: int) -> SigtermOutcome:
    nc = await connect(cluster.nats_url, cluster.nats_settings(), name="bench", deadline_s=10)
    try:
        plan = await serving_plan(nc)
        holder = plan.roles[0].instance_id
        executor = cluster.find(f"executor-{holder.removeprefix('instance-')}")
        client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=120)
        # A short batch warms the instance up; then the undisturbed run: the outputs to
        # compare and the time from the same point on.
        await batch(client, requests, SIGTERM_AFTER_CHUNKS, asyncio.Event())
        reference = await batch(client, requests, max_tokens, asyncio.Event())
        progress = asyncio.Event()
        running = asyncio.create_task(batch(client, requests, max_tokens, progress))
        progressed = asyncio.create_task(progress.wait())
        await asyncio.wait({progressed, running}, return_when=asyncio.FIRST_COMPLETED)
        if not progress.is_set():
            progressed.cancel()
            errors = {run.error for run in await running if run.error}
            raise RuntimeError(f"the batch ended before SIGTERM was due: {errors}")
        assert executor.process is not None
        executor.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        exit_s = asyncio.create_task(_exit_time(executor.process, signalled))
        runs = await running
        exited = await exit_s
    finally:
        await nc.close()
    ids = [run.request_id for run in runs]
    with_cache, recomputed = scheduler_moves(cluster.log_dir / "scheduler.log", ids, holder)
    after = [run.times[-1] - signalled for run in runs if run.times]
    undisturbed = [
        ref.times[-1] - chunk_time_at(ref, _chunks_at(run, signalled))
        for run, ref in zip(runs, reference, strict=True)
        if run.times and ref.times
    ]
    return SigtermOutcome(
        grace_s=0.0,
        victims=len(runs),
        after_sigterm_s=after,
        undisturbed_s=undisturbed,
        moved_with_cache=with_cache,
        recomputed=recomputed,
        lost=sum(not run.finished or run.error is not None for run in runs),
        exact=sum(run.tokens == ref.tokens for run, ref in zip(runs, reference, strict=True)),
        gaps_or_repeats=sum(run.caught_up or run.repeated for run in runs),
        executor_exit_s=exited,
    )


def _chunks_at(run: Received, moment: float) -> int:
    """How many chunks ``run`` had received at ``moment``."""
    return max(1, sum(1 for at in run.times if at <= moment))


async def _exit_time(
    process: subprocess.Popen[bytes], since: float, timeout_s: float = 120.0
) -> float | None:
    """Seconds from ``since`` to the process's exit (None: still running after timeout_s)."""
    while time.monotonic() < since + timeout_s:
        if process.poll() is not None:
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    return None


def scheduler_moves(log_path: Path, request_ids: list[str], holder: str) -> tuple[int, int]:
    """(moved with their KV cache, recomputed elsewhere) of these requests, from the
    scheduler's log: planned moves, and the requests requeued when the holder was lost."""
    wanted = set(request_ids)
    with_cache = recomputed = 0
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        event = record.get("event")
        if event == "request.moved" and record.get("request_id") in wanted:
            with_cache += bool(record.get("with_cache"))
            recomputed += not record.get("with_cache")
        elif event == "executor.lost" and record.get("instance_id") == holder:
            recomputed += int(record.get("requeued") or 0)
    return with_cache, recomputed


def run_grace(
    base: Path, model_dir: Path, grace_s: float, requests: int, max_tokens: int
) -> SigtermOutcome:
    env = {**ENV, "SPOTSERVE_EXECUTOR__TERMINATION_GRACE_S": str(grace_s)}
    cluster = LocalCluster(base / f"grace-{grace_s:g}", instances=2, model_dir=model_dir, env=env)
    with cluster:
        outcome = asyncio.run(run_once(cluster, requests, max_tokens))
    outcome.grace_s = grace_s
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--graces", default="15,0", help="grace periods in seconds, comma-separated"
    )
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=960)
    args = parser.parse_args()
    from shared.model.checkpoint import default_model_dir, ensure_model

    model_dir = ensure_model(default_model_dir("tiny"), "tiny")
    graces = [float(value) for value in args.graces.split(",")]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="spotserve-sigterm-") as base:
        for grace_s in graces:
            outcomes.append(
                run_grace(Path(base), model_dir, grace_s, args.requests, args.max_tokens)
            )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{stamp}: tiny model, 2 executor instances (1 torch thread each), {args.requests}"
        f" requests of {args.max_tokens} tokens, SIGTERM after {SIGTERM_AFTER_CHUNKS} chunks each"
    )
    for outcome in outcomes:
        for line in outcome.lines():
            print(line)
    for outcome in outcomes:
        print(outcome.summary())


if __name__ == "__main__":
    main()
