"""Discrete-event simulation of the scheduling policies on a measured profile.

It drives the project's real policy classes (FCFS, skip-join MLFQ) with a simulated clock.
Each iteration takes, from the model's timing profile, the prefill time of every sequence
that starts in it plus one decode iteration of the batch. An SRPT oracle, which knows every
job's remaining tokens, runs on the same workload as the best case any scheduler could reach.
It answers "what ratio is possible on this workload at all", so a result of the system
benchmark (`bench.scheduling`) can be judged against it.

    python -m bench.scheduling_sim [--requests 2000] [--load 0.85] [--batch 4] [--scale 0.25]
"""

from __future__ import annotations

import argparse
import heapq
from collections.abc import Callable
from pathlib import Path

from bench.scheduling import DEFAULT_TRACE, Job, load_lengths, make_jobs, mean, percentile
from services.scheduler.mlfq import SkipJoinMlfqPolicy
from services.scheduler.policy import ExecutorView, FcfsPolicy, SchedulerPolicy, StepOutput
from services.scheduler.sequence import Sequence
from shared.config import MlfqSettings
from shared.messages import AcceptedRequest
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.profile import ModelProfile, find_profile, load_profile
from shared.model.tokenizer import IncrementalDetokenizer, TextTokenizer

PolicyFactory = Callable[[Callable[[], float]], SchedulerPolicy]


class SrptOracle(FcfsPolicy):
    """Shortest remaining processing time, knowing each job's output length (not realisable:
    the best case). Reorders the whole set every iteration, preempting freely."""

    def schedule(self, executor: ExecutorView) -> list[Sequence]:
        everyone = [*self.waiting, *self.running.get(executor.instance_id, [])]
        everyone.sort(key=lambda s: s.request.max_tokens - len(s.generated))
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


def simulate(
    make_policy: PolicyFactory, jobs: list[Job], profile: ModelProfile, batch: int,
    tokenizer: TextTokenizer,
) -> list[float]:  # fmt: skip
    """Job completion times under one policy."""
    clock = [0.0]
    policy: SchedulerPolicy = make_policy(lambda: clock[0])
    view = ExecutorView("sim", max_batch_size=batch, kv_slots=1 << 20)
    arrivals = [(job.arrival_s, i, job) for i, job in enumerate(jobs)]
    heapq.heapify(arrivals)
    finished: dict[int, float] = {}
    index_of: dict[Sequence, int] = {}
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
        took = sum(profile.prefill_time_s(len(s.request.prompt_token_ids)) for s in new)
        took += profile.decode_time_s(decoding) if decoding else 0.0
        clock[0] += took
        for sequence in chosen:
            sequence.append(5, frozenset())
            if sequence.finished:
                finished[index_of[sequence]] = clock[0]
        policy.update_from_output(StepOutput("sim", chosen, took))
    return [finished[i] - job.arrival_s for i, job in enumerate(jobs)]


def mlfq_factory(settings: MlfqSettings, profile: ModelProfile) -> PolicyFactory:
    def make(clock: Callable[[], float]) -> SchedulerPolicy:
        return SkipJoinMlfqPolicy(settings, profile.prefill_time_s, clock)

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--load", type=float, default=0.85)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_dir = ensure_model(default_model_dir(args.size), args.size)
    path = find_profile(model_dir)
    profile = load_profile(path) if path else None
    if profile is None:
        raise SystemExit(f"no profile for {model_dir}: run `spotserve profile --size {args.size}`")
    tokenizer = TextTokenizer.from_model_dir(model_dir)
    lengths = load_lengths(args.trace)
    context = tokenizer.context_length

    def jobs_at(rate: float) -> list[Job]:
        return make_jobs(lengths, args.requests, rate, context, 8, args.scale, args.seed)

    # Capacity: the executor time all jobs need at full batches.
    burst = jobs_at(0.0)
    work = (
        sum(profile.prefill_time_s(len(j.prompt_token_ids)) for j in burst)
        + sum(j.output_tokens for j in burst) * profile.decode_time_s(args.batch) / args.batch
    )
    rate = args.load * args.requests / work
    jobs = jobs_at(rate)
    policies = {
        "fcfs": lambda _clock: FcfsPolicy(),
        **{
            f"mlfq starve {s:g}s": mlfq_factory(MlfqSettings(starvation_s=s), profile)
            for s in (2.0, 10.0, 1e9)
        },
        "srpt oracle": lambda _clock: SrptOracle(),
    }
    results = {
        name: simulate(make, jobs, profile, args.batch, tokenizer)
        for name, make in policies.items()
    }
    fcfs = results["fcfs"]
    print(
        f"simulated {args.requests} jobs, {args.trace.name} x{args.scale}, batch {args.batch},"
        f" load {args.load:.0%} ({rate:.2f} req/s), profile {path}"
    )
    print(f"{'policy':>20}  {'avg JCT':>8}  {'P99 JCT':>8}  {'FCFS/x avg':>10}  {'FCFS/x P99':>10}")
    for name, jct in results.items():
        p99 = percentile(jct, 0.99)
        print(
            f"{name:>20}  {mean(jct):>8.2f}  {p99:>8.2f}"
            f"  {mean(fcfs) / mean(jct):>10.2f}  {percentile(fcfs, 0.99) / p99:>10.2f}"
        )


if __name__ == "__main__":
    main()
