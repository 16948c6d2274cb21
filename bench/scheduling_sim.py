"""Discrete-event simulation of the scheduling policies on a measured profile.

It drives the project's real policy classes (FCFS, skip-join MLFQ, the adaptive Gittins
policy) with a simulated clock. Each iteration takes, from the model's timing profile, the
prefill time of every sequence that starts in it plus one decode iteration of the batch. An
SRPT oracle, which knows every job's remaining tokens, runs on the same workload as the best
case any scheduler could reach: it answers "what ratio is possible on this workload at all".

Workloads (``--workload``, repeatable; default all): ``azure-conv`` and ``azure-code`` sample
the (input, output) lengths of the Azure LLM inference traces, ``mix`` both equally; lengths
scaled by ``--scale``, Poisson arrivals at ``--load`` (repeatable; default 0.85) of the
executor's capacity at full batches. Per workload and load: avg and P99 JCT and TTFT of each
policy and their ratios to FCFS (FCFS's value / the policy's: higher is better). It ends with
one line per workload and policy at the first load given:
``summary: workload=W policy=P avg_vs_fcfs=X p99_vs_fcfs=Y oracle_avg_vs_fcfs=Z``.

    python -m bench.scheduling_sim [--workload azure-code] [--load 0.85] [--requests 2000]
"""

from __future__ import annotations

import argparse
import heapq
from collections.abc import Callable
from dataclasses import dataclass

from bench.workloads import WORKLOADS, Job, make_jobs, mean, percentile, workload_lengths
from services.scheduler.gittins import prefill_in_tokens
from services.scheduler.policy import (
    ExecutorView,
    FcfsPolicy,
    SchedulerPolicy,
    StepOutput,
    make_policy,
)
from services.scheduler.sequence import Sequence
from shared.messages import AcceptedRequest
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.profile import ModelProfile, find_profile, load_profile
from shared.model.tokenizer import IncrementalDetokenizer, TextTokenizer

PolicyFactory = Callable[[Callable[[], float]], SchedulerPolicy]


class SrptOracle(FcfsPolicy):
    """Shortest remaining processing time, knowing each job's output length (not realisable:
    the best case). Remaining time counts the prefill of a job not started yet (in output
    tokens' time). Reorders the whole set every iteration, preempting freely."""

    def __init__(self, prefill_tokens: Callable[[int], float]) -> None:
        super().__init__()
        self.prefill_tokens = prefill_tokens

    def remaining(self, sequence: Sequence) -> float:
        left = sequence.request.max_tokens - len(sequence.generated)
        if sequence.cached_tokens == 0:
            left += self.prefill_tokens(len(sequence.request.prompt_token_ids))
        return left

    def schedule(self, executor: ExecutorView) -> list[Sequence]:
        everyone = [*self.waiting, *self.running.get(executor.instance_id, [])]
        everyone.sort(key=self.remaining)
        batch = everyone[: executor.max_batch_size]
        for sequence in batch:
            sequence.bind_to(executor.instance_id)
        self.running[executor.instance_id] = batch
        self.waiting = type(self.waiting)(s for s in everyone if s not in batch)
        return list(batch)


def sequence_for(job: Job, index: int, tokenizer: TextTokenizer) -> Sequence:
    request = AcceptedRequest(
        request_id=f"job{index}", prompt_token_ids=job.prompt_token_ids,
        max_tokens=job.output_tokens, temperature=0.0, top_p=1.0, seed=0, stop=[],
        stream=False, ignore_eos=True, reply_subject=None, encoding="msgpack",
        accepted_at=job.arrival_s,
    )  # fmt: skip
    return Sequence(request, message=None, detokenizer=IncrementalDetokenizer(tokenizer, []))  # type: ignore[arg-type]


@dataclass
class SimResult:
    jct: list[float]
    ttft: list[float]
    compute_s: float = 0.0  # the iterations' compute, as the profile (times the scale) gives it
    iterations: int = 0


@dataclass(frozen=True)
class Calibration:
    """What the live system adds to the profile, measured on a live run of the same jobs:
    ``compute_scale`` (the executor's compute over the profile's for the same iterations) and
    ``iteration_overhead_s`` (the wall time of an iteration outside the executor's compute:
    the step round trip over NATS, the scheduler's planning and commit)."""

    compute_scale: float = 1.0
    iteration_overhead_s: float = 0.0


def simulate(
    policy_factory: PolicyFactory, jobs: list[Job], profile: ModelProfile, batch: int,
    tokenizer: TextTokenizer, calibration: Calibration = Calibration(),
) -> SimResult:  # fmt: skip
    """Job completion times and times to first token under one policy."""
    clock = [0.0]
    policy: SchedulerPolicy = policy_factory(lambda: clock[0])
    view = ExecutorView("sim", max_batch_size=batch, kv_blocks=1 << 20)
    arrivals = [(job.arrival_s, i, job) for i, job in enumerate(jobs)]
    heapq.heapify(arrivals)
    finished: dict[int, float] = {}
    first_token: dict[int, float] = {}
    index_of: dict[Sequence, int] = {}
    compute_s, iterations = 0.0, 0
    while len(finished) < len(jobs):
        while arrivals and arrivals[0][0] <= clock[0]:
            _, i, job = heapq.heappop(arrivals)
            sequence = sequence_for(job, i, tokenizer)
            index_of[sequence] = i
            policy.add_request(sequence)
        chosen = policy.schedule(view)
        if not chosen:
            clock[0] = arrivals[0][0]
            continue
        new = [s for s in chosen if s.cached_tokens == 0]
        decoding = len(chosen) - len(new)
        compute = sum(profile.prefill_time_s(len(s.request.prompt_token_ids)) for s in new)
        compute += profile.decode_time_s(decoding) if decoding else 0.0
        compute *= calibration.compute_scale
        took = compute + calibration.iteration_overhead_s
        compute_s += compute
        iterations += 1
        clock[0] += took
        for sequence in chosen:
            sequence.append(5, frozenset())
            first_token.setdefault(index_of[sequence], clock[0])
            if sequence.finished:
                finished[index_of[sequence]] = clock[0]
        policy.update_from_output(StepOutput("sim", chosen, took))
    return SimResult(
        jct=[finished[i] - job.arrival_s for i, job in enumerate(jobs)],
        ttft=[first_token[i] - job.arrival_s for i, job in enumerate(jobs)],
        compute_s=compute_s,
        iterations=iterations,
    )


def policies(profile: ModelProfile, batch: int) -> dict[str, PolicyFactory]:
    """The policies compared, the adaptive one first; the oracle last."""
    return {
        "adaptive": lambda clock: make_policy(
            "adaptive",
            prefill_time_s=profile.prefill_time_s,
            decode_time_s=profile.decode_time_s,
            max_batch_size=batch,
            clock=clock,
        ),
        "fcfs": lambda _clock: FcfsPolicy(),
        "skip-join-mlfq": lambda clock: make_policy(
            "skip-join-mlfq", prefill_time_s=profile.prefill_time_s, clock=clock
        ),
        "srpt oracle": lambda _clock: SrptOracle(
            prefill_in_tokens(profile.prefill_time_s, profile.decode_time_s, batch)
        ),
    }


def ratio(fcfs: list[float], other: list[float], q: float | None) -> float:
    """FCFS's mean (q None) or q-quantile over the policy's: > 1 means better than FCFS."""
    if q is None:
        return mean(fcfs) / mean(other)
    return percentile(fcfs, q) / percentile(other, q)


def run_workload(
    name: str, load: float, args: argparse.Namespace, profile: ModelProfile,
    tokenizer: TextTokenizer,
) -> dict[str, SimResult]:  # fmt: skip
    lengths = workload_lengths(name)
    context = tokenizer.context_length

    def jobs_at(rate: float) -> list[Job]:
        return make_jobs(lengths, args.requests, rate, context, 8, args.scale, args.seed)

    # Capacity: the executor time all jobs need at full batches.
    burst = jobs_at(0.0)
    work = (
        sum(profile.prefill_time_s(len(j.prompt_token_ids)) for j in burst)
        + sum(j.output_tokens for j in burst) * profile.decode_time_s(args.batch) / args.batch
    )
    rate = load * args.requests / work
    jobs = jobs_at(rate)
    outputs = [job.output_tokens for job in jobs]
    spread = (sum((o - mean(outputs)) ** 2 for o in outputs) / len(outputs)) ** 0.5
    print(
        f"\n{name} at load {load:.0%} ({rate:.2f} req/s): {args.requests} jobs, output mean"
        f" {mean(outputs):.0f} tokens, CV {spread / mean(outputs):.2f}, max {max(outputs)}"
    )
    results = {
        policy: simulate(make, jobs, profile, args.batch, tokenizer)
        for policy, make in policies(profile, args.batch).items()
    }
    fcfs = results["fcfs"]
    header = ("avg JCT", "P99 JCT", "avg TTFT", "P99 TTFT", "JCT x", "P99 x", "TTFT x")
    print(f"{'policy':>15}  " + "  ".join(f"{c:>8}" for c in header))
    for policy, result in results.items():
        cells = (
            f"{mean(result.jct):.2f}",
            f"{percentile(result.jct, 0.99):.2f}",
            f"{mean(result.ttft):.2f}",
            f"{percentile(result.ttft, 0.99):.2f}",
            f"{ratio(fcfs.jct, result.jct, None):.2f}",
            f"{ratio(fcfs.jct, result.jct, 0.99):.2f}",
            f"{ratio(fcfs.ttft, result.ttft, None):.2f}",
        )
        print(f"{policy:>15}  " + "  ".join(f"{c:>8}" for c in cells))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--load", action="append", type=float)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workloads = args.workload or list(WORKLOADS)
    loads = args.load or [0.85]
    model_dir = ensure_model(default_model_dir(args.size), args.size)
    path = find_profile(model_dir)
    profile = load_profile(path) if path else None
    if profile is None:
        raise SystemExit(f"no profile for {model_dir}: run `spotserve profile --size {args.size}`")
    tokenizer = TextTokenizer.from_model_dir(model_dir)
    print(
        f"simulated, model {model_dir.name}, batch {args.batch}, lengths x{args.scale},"
        f" profile {path}; ratios: FCFS / policy (higher is better)"
    )
    summaries = []
    for name in workloads:
        for index, load in enumerate(loads):
            results = run_workload(name, load, args, profile, tokenizer)
            if index:
                continue
            fcfs, oracle = results["fcfs"], results["srpt oracle"]
            for policy, result in results.items():
                if policy == "srpt oracle":
                    continue
                summaries.append(
                    f"summary: workload={name} policy={policy}"
                    f" avg_vs_fcfs={ratio(fcfs.jct, result.jct, None):.2f}"
                    f" p99_vs_fcfs={ratio(fcfs.jct, result.jct, 0.99):.2f}"
                    f" oracle_avg_vs_fcfs={ratio(fcfs.jct, oracle.jct, None):.2f}"
                )
    print()
    for line in summaries:
        print(line)


if __name__ == "__main__":
    main()
