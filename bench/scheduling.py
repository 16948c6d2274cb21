"""The scheduling policies on the running system, side by side in one run.

The same workload is replayed through a fresh local cluster once per policy (adaptive, FCFS,
skip-join MLFQ): Poisson arrivals, input/output lengths sampled from a named workload
(``--workload``, repeatable: ``azure-conv``, ``azure-code``, ``mix``; default ``azure-conv``)
scaled to the model's context, outputs forced to the trace's length. The arrival rate is set
from a calibration run (all requests at once under FCFS: the system's throughput at full
batches) to ``--load`` of that capacity (default 85%); each run reports the fraction of its
time the executor really computed.

    python -m bench.scheduling [--workload azure-code] [--requests 120] [--load 0.85]

Prints average and P99 job completion time (JCT) and time to first token (TTFT) per policy,
their ratios to FCFS, KV swaps, and the scheduler's own time per iteration as a fraction of
the executor's iteration time (from the scheduler's step log). The same jobs then go through
``bench.scheduling_sim``'s simulation (the same policy classes on the model's measured
profile, calibrated on the live FCFS run: its compute over the profile's and its time per
iteration outside the executor), with the SRPT oracle, and the live and simulated ratios to
FCFS are printed side by side. It ends with one line per workload and policy (the default
policy first): ``summary: workload=W policy=P avg_vs_fcfs=X p99_vs_fcfs=Y oracle_avg_vs_fcfs=Z
sim_avg_vs_fcfs=S sim_p99_vs_fcfs=T`` (the oracle's and the sim_ ratios simulated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.scheduling_sim import Calibration, policies, simulate
from bench.workloads import WORKLOADS, Job, make_jobs, mean, percentile, workload_lengths
from shared.bus import connect
from shared.client import Completion, SpotserveClient
from shared.cluster import LocalCluster
from shared.config import NatsSettings
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.profile import find_profile, load_profile
from shared.model.tokenizer import TextTokenizer


async def replay(nats_url: str, jobs: list[Job]) -> list[Completion]:
    nc = await connect(nats_url, NatsSettings(), name="bench-scheduling")
    client = SpotserveClient(nc, first_chunk_timeout_s=1800, chunk_timeout_s=600)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(job: Job) -> Completion:
        await asyncio.sleep(max(0.0, start + job.arrival_s - loop.time()))
        return await client.generate(
            job.prompt_token_ids,
            max_tokens=job.output_tokens,
            temperature=0.0,
            ignore_eos=True,
        )

    try:
        return await asyncio.gather(*(one(job) for job in jobs))
    finally:
        await nc.close()


class SimJcts(Protocol):
    """What a run gives per job, live or simulated: JCT and TTFT seconds."""

    jct: list[float]
    ttft: list[float]


@dataclass
class RunResult:
    jct: list[float]
    ttft: list[float]
    makespan: float
    scheduler_fraction: float
    swaps: int
    # Executor compute time / wall time of the run.
    busy_fraction: float
    compute_s: float
    iterations: int
    # Mean wall time of an iteration outside the executor's compute (messaging and the
    # scheduler's time that did not overlap the compute: the step log's wall_ms).
    iteration_overhead_s: float


def run_policy(model_dir: Path, policy: str, jobs: list[Job], env: dict[str, str]) -> RunResult:
    env = env | {"SPOTSERVE_SCHEDULER__POLICY": policy, "SPOTSERVE_LOG__LEVEL": "debug"}
    with tempfile.TemporaryDirectory(prefix=f"spotserve-bench-{policy}-") as state:
        with LocalCluster(Path(state), instances=1, model_dir=model_dir, env=env) as cluster:
            completions = asyncio.run(replay(cluster.nats_url, jobs))
        steps = [
            json.loads(line)
            for line in (Path(state) / "logs" / "scheduler.log").open()
            if '"step.done"' in line
        ]
    scheduler_ms = sum(step["scheduler_ms"] for step in steps)
    makespan = max(c.finished_at for c in completions) - min(c.sent_at for c in completions)
    compute_ms = sum(step["compute_ms"] for step in steps)
    return RunResult(
        jct=[c.latency_s for c in completions],
        ttft=[c.ttft_s or c.latency_s for c in completions],
        makespan=makespan,
        scheduler_fraction=scheduler_ms / compute_ms if compute_ms else 0.0,
        swaps=sum(step.get("offloaded", 0) + step.get("uploaded", 0) for step in steps),
        busy_fraction=compute_ms / 1000 / makespan,
        compute_s=compute_ms / 1000,
        iterations=len(steps),
        iteration_overhead_s=sum(step["wall_ms"] - step["compute_ms"] for step in steps)
        / 1000
        / max(1, len(steps)),
    )


# Replayed in this order; the ratios are to FCFS.
LIVE_POLICIES = ("adaptive", "fcfs", "skip-join-mlfq")


def run_workload(
    name: str, args: argparse.Namespace, model_dir: Path, tokenizer: TextTokenizer
) -> tuple[dict[str, RunResult], dict[str, SimJcts]]:
    lengths = workload_lengths(name)
    env = {
        "SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": str(args.batch),
        "SPOTSERVE_EXECUTOR__MAX_SLOTS": str(args.kv_slots),
    }
    burst = make_jobs(
        lengths, args.requests, 0.0, tokenizer.context_length, tokenizer.vocab_size,
        args.scale, args.seed,
    )  # fmt: skip
    calibration = run_policy(model_dir, "fcfs", burst, env)
    # All requests at once keep the batches full: the system's throughput then (its wall time,
    # the overheads outside the executor's compute included) is its capacity.
    capacity = args.requests / calibration.makespan
    rate = args.load * capacity
    jobs = make_jobs(
        lengths, args.requests, rate, tokenizer.context_length, tokenizer.vocab_size,
        args.scale, args.seed,
    )  # fmt: skip
    results = {policy: run_policy(model_dir, policy, jobs, env) for policy in LIVE_POLICIES}
    results_sim = simulate_jobs(jobs, model_dir, args.batch, tokenizer, results["fcfs"])
    inputs = [len(job.prompt_token_ids) for job in jobs]
    outputs = [job.output_tokens for job in jobs]
    print(
        f"{name}: model {model_dir.name} | {args.requests} requests (lengths x{args.scale}:"
        f" input mean {mean(inputs):.0f}, output mean {mean(outputs):.0f} tokens) | batch"
        f" {args.batch}, KV memory of {args.kv_slots} full-context sequences | capacity"
        f" {capacity:.2f} req/s, Poisson"
        f" rate {rate:.2f} req/s ({args.load:.0%})"
    )
    report(results)
    compare(results, results_sim)
    return results, results_sim


def simulate_jobs(
    jobs: list[Job], model_dir: Path, batch: int, tokenizer: TextTokenizer, fcfs: RunResult
) -> dict[str, SimJcts]:
    """The same jobs through bench.scheduling_sim (the same policy classes on the model's
    measured profile), with the SRPT oracle, calibrated on the live FCFS run: its compute
    over the profile's for the same jobs under FCFS, and its overhead per iteration."""
    path = find_profile(model_dir)
    if path is None:
        raise SystemExit(f"no profile of {model_dir}: run `spotserve profile --model {model_dir}`")
    profile = load_profile(path)
    made = policies(profile, batch)
    plain = simulate(made["fcfs"], jobs, profile, batch, tokenizer)
    calibration = Calibration(
        compute_scale=fcfs.compute_s / plain.compute_s,
        iteration_overhead_s=fcfs.iteration_overhead_s,
    )
    print(
        f"simulation calibrated on the live FCFS run: compute x{calibration.compute_scale:.2f}"
        f" of the profile's, {calibration.iteration_overhead_s * 1000:.1f} ms per iteration"
        f" outside it ({fcfs.iterations} live iterations, {plain.iterations} simulated)"
    )
    return {
        policy: simulate(make, jobs, profile, batch, tokenizer, calibration)
        for policy, make in made.items()
    }


def ratios(jct: list[float], ttft: list[float], fcfs: SimJcts) -> tuple[float, float, float]:
    """FCFS's mean JCT, P99 JCT and mean TTFT over these (higher is better)."""
    return (
        mean(fcfs.jct) / mean(jct),
        percentile(fcfs.jct, 0.99) / percentile(jct, 0.99),
        mean(fcfs.ttft) / mean(ttft),
    )


def compare(live: dict[str, RunResult], sim: dict[str, SimJcts]) -> None:
    """Each policy's ratios to FCFS, live and simulated on the same jobs, side by side."""
    print("ratios to FCFS, live and simulated (same jobs); sim/live")
    columns = ("avg live", "avg sim", "sim/live", "P99 live", "P99 sim", "TTFT live", "TTFT sim")
    print(f"{'policy':>15}  " + "  ".join(f"{c:>9}" for c in columns))
    for policy, result in live.items():
        got = ratios(result.jct, result.ttft, live["fcfs"])
        expected = ratios(sim[policy].jct, sim[policy].ttft, sim["fcfs"])
        cells = (
            got[0],
            expected[0],
            expected[0] / got[0],
            got[1],
            expected[1],
            got[2],
            expected[2],
        )
        print(f"{policy:>15}  " + "  ".join(f"{c:>9.2f}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--load", type=float, default=0.85, help="target executor utilisation")
    parser.add_argument("--scale", type=float, default=0.25, help="trace length scale")
    parser.add_argument("--batch", type=int, default=4, help="max batch size")
    parser.add_argument(
        "--kv-slots", type=int, default=8, help="KV memory per executor, in full-context sequences"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_dir = args.model or ensure_model(default_model_dir(args.size), args.size)
    tokenizer = TextTokenizer.from_model_dir(model_dir)
    summaries = []
    for name in args.workload or ["azure-conv"]:
        results, sim = run_workload(name, args, model_dir, tokenizer)
        oracle = ratios(sim["srpt oracle"].jct, sim["srpt oracle"].ttft, sim["fcfs"])[0]
        for policy, result in results.items():
            live = ratios(result.jct, result.ttft, results["fcfs"])
            simulated = ratios(sim[policy].jct, sim[policy].ttft, sim["fcfs"])
            summaries.append(
                f"summary: workload={name} policy={policy} avg_vs_fcfs={live[0]:.2f}"
                f" p99_vs_fcfs={live[1]:.2f} oracle_avg_vs_fcfs={oracle:.2f}"
                f" sim_avg_vs_fcfs={simulated[0]:.2f} sim_p99_vs_fcfs={simulated[1]:.2f}"
            )
    for line in summaries:
        print(line)


def report(results: dict[str, RunResult]) -> None:
    columns = ("avg JCT s", "P99 JCT s", "avg TTFT s", "P99 TTFT s", "swaps", "busy", "sched/exec")
    print(f"{'policy':>15}  " + "  ".join(f"{c:>10}" for c in columns))
    for policy, r in results.items():
        cells = (
            f"{mean(r.jct):.2f}",
            f"{percentile(r.jct, 0.99):.2f}",
            f"{mean(r.ttft):.2f}",
            f"{percentile(r.ttft, 0.99):.2f}",
            str(r.swaps),
            f"{r.busy_fraction:.0%}",
            f"{r.scheduler_fraction:.2%}",
        )
        print(f"{policy:>15}  " + "  ".join(f"{c:>10}" for c in cells))
    fcfs = results["fcfs"]
    for policy, r in results.items():
        if policy == "fcfs":
            continue
        print(
            f"FCFS / {policy}: avg JCT {mean(fcfs.jct) / mean(r.jct):.2f}x,"
            f" P99 JCT {percentile(fcfs.jct, 0.99) / percentile(r.jct, 0.99):.2f}x,"
            f" avg TTFT {mean(fcfs.ttft) / mean(r.ttft):.2f}x,"
            f" P99 TTFT {percentile(fcfs.ttft, 0.99) / percentile(r.ttft, 0.99):.2f}x"
        )


if __name__ == "__main__":
    main()
