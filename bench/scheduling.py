"""The scheduling policies on the running system, side by side in one run.

The same workload is replayed through a fresh local cluster once per policy (adaptive, FCFS,
skip-join MLFQ): Poisson arrivals, input/output lengths sampled from a named workload
(``--workload``, repeatable: ``azure-conv``, ``azure-code``, ``mix``; default ``azure-conv``)
scaled to the model's context, outputs forced to the trace's length. The arrival rate is set
from a calibration run (all requests at once under FCFS; the executor's total compute time per
request at full batches) so that the executor is ``--load`` busy (default 85%); each run
reports the busy fraction it really had.

    python -m bench.scheduling [--workload azure-code] [--requests 120] [--load 0.85]

Prints average and P99 job completion time (JCT) and time to first token (TTFT) per policy,
their ratios to FCFS, KV swaps, and the scheduler's own time per iteration as a fraction of
the executor's iteration time (from the scheduler's step log); then one line per workload and
policy: ``summary: workload=W policy=P avg_vs_fcfs=X p99_vs_fcfs=Y``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.bus import connect
from shared.client import Completion, SpotserveClient
from shared.cluster import LocalCluster
from shared.config import NatsSettings
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.tokenizer import TextTokenizer

AZURE_TRACES = Path(__file__).resolve().parents[2] / "shared/traces/azure"
# Named workloads: the Azure traces whose (input, output) lengths they sample; "mix" takes as
# many rows from each.
WORKLOADS: dict[str, tuple[str, ...]] = {
    "azure-conv": ("AzureLLMInferenceTrace_conv.csv",),
    "azure-code": ("AzureLLMInferenceTrace_code.csv",),
    "mix": ("AzureLLMInferenceTrace_conv.csv", "AzureLLMInferenceTrace_code.csv"),
}


@dataclass(frozen=True)
class Job:
    arrival_s: float
    prompt_token_ids: list[int]
    output_tokens: int


def load_lengths(trace: Path) -> list[tuple[int, int]]:
    with trace.open(newline="") as handle:
        return [
            (int(row["ContextTokens"]), int(row["GeneratedTokens"]))
            for row in csv.DictReader(handle)
            if int(row["ContextTokens"]) > 0 and int(row["GeneratedTokens"]) > 0
        ]


def workload_lengths(name: str, traces: Path = AZURE_TRACES) -> list[tuple[int, int]]:
    """The (input, output) lengths of a named workload, equally many rows from each trace."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    parts = [load_lengths(traces / file) for file in WORKLOADS[name]]
    rows = min(len(part) for part in parts)
    return [row for part in parts for row in part[:rows]]


def make_jobs(
    lengths: list[tuple[int, int]],
    count: int,
    rate: float,
    context: int,
    vocab_size: int,
    scale: float,
    seed: int,
) -> list[Job]:
    """Sample rows, scale lengths by ``scale`` (clipped to the context), Poisson arrivals."""
    rng = random.Random(seed)
    rows = rng.sample(lengths, count)
    max_input, max_output = context // 2, context // 4
    jobs, clock = [], 0.0
    for context_tokens, generated in rows:
        inputs = max(1, min(max_input, round(context_tokens * scale)))
        outputs = max(1, min(max_output, round(generated * scale)))
        prompt = [rng.randrange(3, vocab_size) for _ in range(inputs)]
        jobs.append(Job(clock, prompt, outputs))
        clock += rng.expovariate(rate) if rate > 0 else 0.0
    return jobs


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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
    )


# Replayed in this order; the ratios are to FCFS.
LIVE_POLICIES = ("adaptive", "fcfs", "skip-join-mlfq")


def run_workload(
    name: str, args: argparse.Namespace, model_dir: Path, tokenizer: TextTokenizer
) -> dict[str, RunResult]:
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
    # At full batches the executor needs compute_s for all requests: that is its capacity.
    capacity = args.requests / calibration.compute_s
    rate = args.load * capacity
    jobs = make_jobs(
        lengths, args.requests, rate, tokenizer.context_length, tokenizer.vocab_size,
        args.scale, args.seed,
    )  # fmt: skip
    results = {policy: run_policy(model_dir, policy, jobs, env) for policy in LIVE_POLICIES}
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
    return results


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
        results = run_workload(name, args, model_dir, tokenizer)
        fcfs = results["fcfs"]
        for policy, result in results.items():
            summaries.append(
                f"summary: workload={name} policy={policy}"
                f" avg_vs_fcfs={mean(fcfs.jct) / mean(result.jct):.2f}"
                f" p99_vs_fcfs={percentile(fcfs.jct, 0.99) / percentile(result.jct, 0.99):.2f}"
            )
    for line in summaries:
        print(line)


def mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values)


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
