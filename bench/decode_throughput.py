"""Decode tokens/s of the whole system vs the executor's forward pass in-process.

Same model, same batch sizes, same torch threads, side by side in one run:
- in-process: ``Engine.step`` called directly (the executor's forward pass, no NATS);
- system: client -> admission -> JetStream -> scheduler -> executor -> JetStream -> client,
  one executor instance, all requests sent at once so they decode as one batch.

Decode rate = the tokens decoded while the whole batch decodes (from the last request's first
token to the first request's last token) / that time, so prefill, queueing and requests joining
or leaving are left out of both sides alike. Per batch size it reports the wall time
the system adds to each iteration (its time per iteration less the in-process one; "of it
beyond the step" is the part the executor's compute does not explain: the scheduler's mean
iteration time less the executor's mean step time, from their metrics) and the CPU
time the processes other than the executor (scheduler, admission, the other services,
nats-server, and this client) spend per generated token, from ``/proc`` and ``getrusage``;
"of it idle" is what the token path's services spend in as long a time with no request
(timers, heartbeats: a cost per second, not per token), watched just before each run; a line
per batch size splits the service CPU by process, and another gives the bare NATS floor of it
(:func:`nats_floor`: one core-NATS message per token at the same pace, and nothing else).
``--torch-threads 1`` leaves one of two cores to the services, so the ratio shows the system's
own overhead rather than the services competing with torch for the cores. Each repeat runs the
in-process side right before the system side of the same batch size; the ratio and the added
time are the medians of those pairs (the tok/s and ms columns the medians of each side).

    python -m bench.decode_throughput [--size small] [--batch-sizes 1,8,32] [--tokens 64] \\
        [--torch-threads 1]

Ends with one line per batch size:
``summary: batch=B ratio=R overhead_ms_per_iteration=X service_cpu_us_per_token=Y``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from nats.aio.msg import Msg

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import encode
from shared.config import NatsSettings
from shared.messages import TokenChunk
from shared.metrics import read_samples
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.engine import Engine, SequenceStep
from shared.model.tokenizer import TextTokenizer
from shared.subjects import SERVICE_ADMISSION, SERVICE_EXECUTOR, SERVICE_SCHEDULER

PROMPT = "Spot instances are cheap but can be taken away with two minutes of notice, so"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Before each run: how long the token path's processes are watched with no request.
IDLE_WINDOW_S = 3.0
# How long the floor's publisher may take to report once its last message arrived.
FLOOR_RESULT_TIMEOUT_S = 30.0


def in_process_rate(model_dir: Path, batch_size: int, tokens: int, prompt_ids: list[int]) -> float:
    engine = Engine(model_dir, max_slots=batch_size)
    ids = [f"r{i}" for i in range(batch_size)]

    def step(inputs: dict[str, list[int]], index: int) -> dict[str, int]:
        return engine.step(
            [SequenceStep(rid, toks, 0.0, 1.0, 0, index) for rid, toks in inputs.items()]
        )

    last = step({rid: prompt_ids for rid in ids}, 0)
    started = time.perf_counter()
    for index in range(1, tokens):
        last = step({rid: [token] for rid, token in last.items()}, index)
    elapsed = time.perf_counter() - started
    engine.release(ids)
    return batch_size * (tokens - 1) / elapsed


# The services on the token path besides the executor; the others only keep timers.
TOKEN_PATH_SERVICES = (SERVICE_SCHEDULER, SERVICE_ADMISSION)


@dataclass
class SystemRun:
    rate: float  # decode tokens per second
    tokens: int  # generated, every one of them (the first included)
    service_cpu_s: float  # CPU seconds of the token path's processes but the executor's
    other_cpu_s: float  # CPU seconds of the other services
    idle_cpu_s: float  # of service_cpu_s, what those processes spend idle in as long a time
    # Mean iteration wall time on the scheduler's side less the executor's mean step time.
    added_by_system_s: float
    per_process: dict[str, float]  # service_cpu_s by process


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def service_pids(cluster: LocalCluster) -> tuple[dict[str, int], list[int]]:
    """The token path's processes but the executors (scheduler, admission, nats-server) by
    name, and the other services'."""
    path, others = {}, []
    for service in cluster.services:
        if service.name == SERVICE_EXECUTOR or service.process is None:
            continue
        if service.name in TOKEN_PATH_SERVICES:
            path[service.name.removeprefix("spotserve-")] = service.process.pid
        else:
            others.append(service.process.pid)
    if cluster.nats is not None and cluster.nats.process is not None:
        path["nats-server"] = cluster.nats.process.pid
    return path, others


def path_cpu_s(path: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each token-path process, this client included."""
    return {name: process_cpu_s(pid) for name, pid in path.items()} | {"client": own_cpu_s()}


async def generate_batch(nats_url: str, batch_size: int, tokens: int) -> tuple[float, int]:
    """Decode rate and tokens generated of ``batch_size`` requests sent at once."""
    nc = await connect(nats_url, NatsSettings(), name="bench")
    client = SpotserveClient(nc)
    try:
        completions = await asyncio.gather(
            *(
                client.generate(PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True)
                for _ in range(batch_size)
            )
        )
    finally:
        await nc.close()
    generated = sum(len(c.token_ids) for c in completions)
    return full_batch_rate([c.chunk_times for c in completions]), generated


def full_batch_rate(chunk_times: list[list[float]]) -> float:
    """Tokens per second while every request decodes: the chunks after the last request's
    first one, up to the first request's last one."""
    start = max(times[0] for times in chunk_times)
    end = min(times[-1] for times in chunk_times)
    if end <= start:
        raise SystemExit("the requests never decoded together: give more --tokens")
    decoded = sum(1 for times in chunk_times for at in times if start < at <= end)
    return decoded / (end - start)


@dataclass(frozen=True)
class StepTimes:
    """Sums and counts of the scheduler's iteration histogram (the wall time an iteration
    adds to its executor's time line) and of the executor's step histogram (its compute)."""

    iteration_sum_s: float
    iterations: float
    step_sum_s: float
    steps: float

    @classmethod
    def scrape(cls, scheduler_url: str, executor_url: str) -> StepTimes:
        values = read_samples(scheduler_url) | read_samples(executor_url)
        return cls(
            values["spotserve_scheduler_iteration_seconds_sum"],
            values["spotserve_scheduler_iteration_seconds_count"],
            values["spotserve_executor_step_seconds_sum"],
            values["spotserve_executor_step_seconds_count"],
        )

    def added_since(self, before: StepTimes) -> float:
        """Mean seconds an iteration took on the scheduler's side beyond the executor's step."""
        iterations = max(1.0, self.iterations - before.iterations)
        steps = max(1.0, self.steps - before.steps)
        wall = (self.iteration_sum_s - before.iteration_sum_s) / iterations
        return wall - (self.step_sum_s - before.step_sum_s) / steps


def metrics_urls(cluster: LocalCluster) -> tuple[str, str]:
    urls = asyncio.run(cluster.urls()).metrics
    # Keyed by the service name without its "spotserve-" prefix.
    scheduler = SERVICE_SCHEDULER.removeprefix("spotserve-")
    executor = SERVICE_EXECUTOR.removeprefix("spotserve-")
    return urls[scheduler][0], urls[executor][0]


def idle_cpu_rate(pids: list[int]) -> float:
    """CPU seconds per second the processes spend with no request (timers, heartbeats)."""
    before, started = sum(process_cpu_s(pid) for pid in pids), time.monotonic()
    time.sleep(IDLE_WINDOW_S)
    return (sum(process_cpu_s(pid) for pid in pids) - before) / (time.monotonic() - started)


@dataclass(frozen=True)
class Floor:
    """CPU seconds per message of the bare NATS path alone, by process."""

    publisher_s: float
    server_s: float
    subscriber_s: float

    @property
    def total_s(self) -> float:
        return self.publisher_s + self.server_s + self.subscriber_s


def nats_floor(
    nats_url: str, server_pid: int, batch_size: int, tokens: int, pace_s: float
) -> Floor:
    """The physical limit of the service CPU: one core-NATS message per token, as the
    scheduler forwards a chunk, and nothing else (no commit, no step, no scheduling).

    A publisher process sends ``batch_size`` chunk-sized messages every ``pace_s`` (the system
    run's time per iteration) to as many subjects, ``tokens`` times; this process receives
    them; both count their own CPU, nats-server's from ``/proc`` over the same time."""
    return asyncio.run(_floor(nats_url, server_pid, batch_size, tokens, pace_s))


async def _floor(
    nats_url: str, server_pid: int, batch_size: int, tokens: int, pace_s: float
) -> Floor:
    prefix = f"_INBOX.floor.{uuid.uuid4().hex}"
    subjects = [f"{prefix}.{i}" for i in range(batch_size)]
    nc = await connect(nats_url, NatsSettings(), name="bench-floor-client")
    received, first, done = 0, asyncio.Event(), asyncio.Event()

    async def on_message(_message: Msg) -> None:
        nonlocal received
        received += 1
        first.set()
        if received == batch_size * tokens:
            done.set()

    try:
        for subject in subjects:
            await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        context = multiprocessing.get_context("spawn")
        results, sender = context.Pipe(duplex=False)
        publisher = context.Process(
            target=floor_publisher, args=(nats_url, subjects, tokens, pace_s, sender)
        )
        publisher.start()
        # The publisher's clock starts at its first message, this side's at its first receipt.
        await asyncio.wait_for(first.wait(), timeout=60)
        client_before, server_before = own_cpu_s(), process_cpu_s(server_pid)
        await asyncio.wait_for(done.wait(), timeout=tokens * pace_s * 10 + 60)
        client_s, server_s = own_cpu_s() - client_before, process_cpu_s(server_pid) - server_before
        if not await asyncio.to_thread(results.poll, FLOOR_RESULT_TIMEOUT_S):
            code = publisher.exitcode
            raise SystemExit(f"the floor's publisher sent no result (exit code {code})")
        publisher_s = results.recv()
        publisher.join(FLOOR_RESULT_TIMEOUT_S)
    finally:
        await nc.close()
    messages = batch_size * tokens
    return Floor(publisher_s / messages, server_s / messages, client_s / messages)


def floor_publisher(
    nats_url: str, subjects: list[str], tokens: int, pace_s: float, results: Connection
) -> None:
    """The floor's publisher, in its own process as the scheduler is: sends its CPU seconds."""
    results.send(asyncio.run(_publish_floor(nats_url, subjects, tokens, pace_s)))


async def _publish_floor(nats_url: str, subjects: list[str], tokens: int, pace_s: float) -> float:
    chunk = TokenChunk(request_id=uuid.uuid4().hex, index=10, token_ids=[1234], text=" spot")
    body = encode(chunk)
    nc = await connect(nats_url, NatsSettings(), name="bench-floor-publisher")
    try:
        started = own_cpu_s()
        for _ in range(tokens):
            for subject in subjects:
                await nc.publish(subject, body)
            await asyncio.sleep(pace_s)
        await nc.flush()
        return own_cpu_s() - started
    finally:
        await nc.close()


def system_run(
    cluster: LocalCluster, urls: tuple[str, str], batch_size: int, tokens: int
) -> SystemRun:
    path, others = service_pids(cluster)
    idle_rate = idle_cpu_rate(list(path.values()))
    times_before = StepTimes.scrape(*urls)
    before = path_cpu_s(path)
    before_others = sum(process_cpu_s(pid) for pid in others)
    started = time.monotonic()
    rate, generated = asyncio.run(generate_batch(cluster.nats_url, batch_size, tokens))
    idle_cpu_s = idle_rate * (time.monotonic() - started)
    after = path_cpu_s(path)
    after_others = sum(process_cpu_s(pid) for pid in others)
    added_s = StepTimes.scrape(*urls).added_since(times_before)
    per_process = {name: after[name] - before[name] for name in after}
    return SystemRun(
        rate,
        generated,
        sum(per_process.values()),
        after_others - before_others,
        idle_cpu_s,
        added_s,
        per_process,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (overrides --size)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; median reported")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="in-process and executor (default: torch's)"
    )
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_dir = args.model or ensure_model(default_model_dir(args.size), args.size)
    prompt_ids = TextTokenizer.from_model_dir(model_dir).encode(PROMPT)
    threads = args.torch_threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    # Each system run right after its in-process run: a machine whose speed drifts (shared,
    # noisy) moves both sides of a ratio alike.
    in_process: dict[int, list[float]] = {b: [] for b in batch_sizes}
    system: dict[int, list[SystemRun]] = {b: [] for b in batch_sizes}
    with tempfile.TemporaryDirectory(prefix="spotserve-bench-") as state:
        env = {
            "SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": str(max(batch_sizes)),
            "SPOTSERVE_EXECUTOR__MAX_SLOTS": str(max(batch_sizes)),
            "SPOTSERVE_EXECUTOR__TORCH_THREADS": str(threads),
        }
        with LocalCluster(Path(state), instances=1, model_dir=model_dir, env=env) as cluster:
            urls = metrics_urls(cluster)
            system_run(cluster, urls, 1, 8)  # warm-up
            for _ in range(args.repeats):
                for b in batch_sizes:
                    in_process[b].append(in_process_rate(model_dir, b, args.tokens, prompt_ids))
                    system[b].append(system_run(cluster, urls, b, args.tokens))
            assert cluster.nats is not None and cluster.nats.process is not None
            floors = {
                b: nats_floor(
                    cluster.nats_url,
                    cluster.nats.process.pid,
                    b,
                    args.tokens,
                    b / statistics.median(run.rate for run in system[b]),
                )
                for b in batch_sizes
            }
    print(
        f"model {model_dir} | {args.tokens} tokens/request | torch threads {threads} (in-process"
        f" and executor) | median of {args.repeats} | {os.cpu_count()} cores"
    )
    header = ("batch", "in-process tok/s", "system tok/s", "ratio", "ms/iter in-proc",
              "ms/iter system", "added ms/iter", "of it beyond the step", "service CPU us/token",
              "of it idle",
              "other services us/token")  # fmt: skip
    print("  ".join(f"{h:>{max(len(h), 5)}}" for h in header))
    summaries = []
    for b in batch_sizes:
        runs = system[b]
        ratio = statistics.median(
            run.rate / alone for run, alone in zip(runs, in_process[b], strict=True)
        )
        rate, alone = statistics.median(run.rate for run in runs), statistics.median(in_process[b])
        cpu_us = statistics.median(run.service_cpu_s / run.tokens for run in runs) * 1e6
        other_us = statistics.median(run.other_cpu_s / run.tokens for run in runs) * 1e6
        idle_us = statistics.median(run.idle_cpu_s / run.tokens for run in runs) * 1e6
        beyond_ms = statistics.median(run.added_by_system_s for run in runs) * 1e3
        iteration_ms, in_process_ms = b / rate * 1e3, b / alone * 1e3
        added_ms = statistics.median(
            b / run.rate * 1e3 - b / alone_rate * 1e3
            for run, alone_rate in zip(runs, in_process[b], strict=True)
        )
        cells = (f"{b}", f"{alone:.1f}", f"{rate:.1f}", f"{ratio:.2f}",
                 f"{in_process_ms:.2f}", f"{iteration_ms:.2f}", f"{added_ms:.2f}",
                 f"{beyond_ms:.2f}", f"{cpu_us:.0f}", f"{idle_us:.0f}",
                 f"{other_us:.0f}")  # fmt: skip
        print("  ".join(f"{c:>{max(len(h), 5)}}" for c, h in zip(cells, header, strict=True)))
        summaries.append(
            f"summary: batch={b} ratio={ratio:.2f} overhead_ms_per_iteration={added_ms:.2f}"
            f" service_cpu_us_per_token={cpu_us:.0f}"
        )
    print()
    for b in batch_sizes:
        runs = system[b]
        split = ", ".join(
            f"{name} {statistics.median(r.per_process[name] / r.tokens for r in runs) * 1e6:.0f}"
            for name in runs[0].per_process
        )
        print(f"batch {b}: service CPU us/token by process: {split}")
        floor = floors[b]
        service_us = statistics.median(run.service_cpu_s / run.tokens for run in runs) * 1e6
        times_floor = service_us / (floor.total_s * 1e6)
        print(
            f"batch {b}: bare NATS floor us/token (one message per token at the same pace,"
            f" nothing else): publisher {floor.publisher_s * 1e6:.0f}, nats-server"
            f" {floor.server_s * 1e6:.0f}, client {floor.subscriber_s * 1e6:.0f}, total"
            f" {floor.total_s * 1e6:.0f}; the service CPU is {times_floor:.1f}x it"
        )
    print()
    for line in summaries:
        print(line)


if __name__ == "__main__":
    main()
