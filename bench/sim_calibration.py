"""Calibration of the fleet simulation (``loadgen.simulate``) against the live system.

For each fleet trace: a live replay on an embedded cluster (a real nats-server, every service as
its own process, the ``tiny`` model on this machine's CPU; policy spotserve, played by
``loadgen.replay.Replayer``), then the simulation of the same arrivals (same spec and seed,
lengths fitted to the model's context as the replay fits them), fleet trace, grace period,
warm-up and time scale. The table puts their P50/P99 end-to-end latency, migrations and
reconfigurations side by side; the target is a sim/live latency ratio within 25%.

What the simulation is given, and where each figure comes from:

- the profile: measured here before the cluster starts (``measure_parallel_profile`` with the
  executors' torch threads) and handed to the live planner too (its profile path), so both plan
  on the same figures (the planner would otherwise measure one while the executors load, on the
  same cores: prefill times 10x too slow); its pipeline send costs measured over the cluster's
  NATS as the planner measures them (they weigh nothing at P = 1, the live max_pipeline);
- the live settings (``shared.config.Settings`` with the run's overrides): the planner's
  (``policy_settings``: max_pipeline 1, max_batch, rate_margin, whole instance groups; debounce,
  rate_change), admission's rate window and interval, the scheduler's batch size (at most the
  executor's KV slots) and policy;
- measured on the live cluster (the scheduler's iteration and overhead histograms, scraped
  before and after; its and admission's logs):
  - ``token_overhead_s``: after the replay, a lone request and then three at once, shaped as
    the replay's, five times each; per iteration, the probe's time less the profile's compute
    of its work (medians of the repeats); the difference per extra sequence in the batch (its
    token's sampling, commit and forward, and the longer context its decode attends to: the
    profile decodes after 16 tokens), at most what the replay's iterations took beyond their
    compute, per sequence in them;
  - ``request_overhead_s``: the lone probe request's end to end less its iterations
    (admission, JetStream, the scheduler's intake, the last token's commit and forward);
  - ``step_overhead_s``: the replay's mean iteration less the profile's compute of the same
    work (every request's prefill, the decode steps at the run's mean batch) and the
    per-sequence part: the NATS round trip, the scheduler's and executor's own time, and what
    this shared CPU adds to the compute while the run goes on;
- measured on the replay's record and streams:
  - ``restart_s`` (an added instance's join delay): from the trace's add to the instance's
    ``joined`` fleet event (process start, model load, registration), the median of the adds;
  - ``initial_rate_rps``: the rate the plan in force at the start was made for (the PLANS
    stream): the warm-up leaves the planner's last plan on a rate it read as the meter filled;
  - ``rate_phase_s``: when admission publishes its rate (every rate_interval_s on its own
    clock; the planner plans on the value last published), from its last published value;
  - ``warmup_end_s``: from the warm-up's start to the measured run's (the meter's content);
  - ``transfer_fixed_s`` / ``link_bytes_s``: a small and a large message through the cluster's
    NATS (a KV cache hand-over's set-up and bandwidth);
- what the embedded cluster is: every executor holds the whole model once it has joined
  (``preloaded``) and an instance without a role stays (``spares``: the whole trace).

The warm-up (the replay plays the first ``warmup_s`` wall seconds of the arrivals first, then
starts over) is the rate window plus two rate intervals and planner polls by default, so that
the plan in force at the start was made on a full window where the trace is long enough.

    python -m bench.sim_calibration [--fleet PATH ...] [--time-scale 0.1] \\
        [--arrivals gamma:0.16:1] [--output-tokens 64] [--grace 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from unittest import mock

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from loadgen.replay import PROMPT_TOKEN_RANGE, Replayer, ReplayOptions, stderr_progress
from loadgen.report import RequestRecord, RunRecord, summarize
from loadgen.simulate import SimCosts, SimOptions, simulate
from loadgen.traces import Arrival, FleetTrace, arrivals_from_spec, read_fleet_trace, scale_lengths
from services.planner.costmodel import step_seconds
from services.planner.mapping import rank_order
from services.planner.service import measure_send_s, policy_settings
from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode
from shared.config import LogSettings, Settings
from shared.logging import configure_logging
from shared.messages import ArrivalRate, FleetEvent, Plan
from shared.metrics import read_samples
from shared.model.profile import ParallelProfile, measure_parallel_profile, save_parallel_profile
from shared.model.tokenizer import TextTokenizer
from shared.security import init_credentials
from shared.subjects import ARRIVAL_RATE_KEY, FLEET_STREAM, PLANS_STREAM, load_bucket

TARGET = 0.25  # the bound on |sim/live - 1| of P50 and P99
# The SpotServe artifact's trace segments A_S and B_S, when this checkout sits beside the kit.
KIT_TRACES = Path(__file__).resolve().parents[2] / "shared/traces/spotserve"
KIT_SEGMENTS = {"A_S": "trace_0304_real.jsonl", "B_S": "trace_0506_real.jsonl"}
# Messages timed through NATS: a KV hand-over's set-up (a small message) and its bandwidth (a
# large one, below the server's default 1 MiB payload limit).
SMALL_MESSAGE = 1024
LARGE_MESSAGE = 512 * 1024
PROFILE_REPEATS = 5
# The probe after a replay (the per-sequence cost of an iteration): a lone request, then
# PROBE_WIDTHS[-1] at once, each shaped as the replay's first request (a decode step's cost
# grows with the context its batch attends to, which the profile measures at 16 tokens).
PROBE_WIDTHS = (1, 3)
PROBE_REPEATS = 5  # each width; the medians count (a hiccup of this shared machine does not)

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass
class Case:
    """One live replay and its simulation."""

    fleet: Path
    name: str = ""
    # Trace time: the paper's Gamma process (CV 1); at x0.1, 1.6 req/s of wall time (the demo's
    # 0.08 req/s at x0.025 is 3.2), and every segment longer than the 60 s rate window.
    arrivals: str = "gamma:0.16:1"
    time_scale: float = 0.1
    grace_s: float = 30.0  # trace seconds
    input_tokens: int = 512
    output_tokens: int = 64
    seed: int = 0
    warmup_s: float | None = None  # None: the rate window plus settle_s()
    env: dict[str, str] = field(default_factory=dict)  # SPOTSERVE_* settings of the cluster

    def label(self) -> str:
        return self.name or self.fleet.name


@dataclass
class Measured:
    """What the live run tells the simulation (see the module docstring)."""

    step_overhead_s: float
    token_overhead_s: float
    request_overhead_s: float
    join_delay_s: float | None  # None: no instance joined during the run
    initial_rate_rps: float
    rate_phase_s: float | None
    warmup_end_s: float | None
    transfer_fixed_s: float
    link_bytes_s: float
    comm_prefill_s: float
    comm_decode_s: float
    iteration_s: float  # the live run's mean iteration
    compute_s: float  # the profile's mean compute per iteration for the same work
    batch: float  # the live run's mean batch
    iterations: int


@dataclass
class Calibration:
    case: Case
    live: dict[str, Any]  # report.json content
    sim: dict[str, Any]
    measured: Measured
    options: SimOptions
    live_run: LiveRun
    sim_run: RunRecord

    def latency(self, report: str, percentile: str) -> float:
        value = (self.live if report == "live" else self.sim)["latency"]["e2e_s"][percentile]
        return float(value) if value is not None else math.nan

    def ratio(self, percentile: str) -> float:
        live = self.latency("live", percentile)
        return self.latency("sim", percentile) / live if live > 0 else math.nan

    def counts(self, key: str) -> tuple[int, int]:
        return int(self.live[key]), int(self.sim[key])


# -- the live settings ---------------------------------------------------------------------------


def live_settings(env: dict[str, str]) -> Settings:
    """The settings the cluster's services read: this environment plus the run's overrides."""
    with mock.patch.dict(os.environ, env):
        return Settings()


def settle_s(settings: Settings) -> float:
    """After the rate window is full: admission publishes the rate every rate_interval_s and the
    planner reads it every rate_poll_s; twice both leaves a plan made on a full window."""
    return 2 * (settings.admission.rate_interval_s + settings.planner.rate_poll_s)


def warmup_s(case: Case, settings: Settings) -> float:
    if case.warmup_s is not None:
        return case.warmup_s
    return settings.admission.rate_window_s + settle_s(settings)


def executor_threads(env: dict[str, str], instances: int) -> int:
    """Each executor's torch threads, as LocalCluster sets them."""
    configured = env.get("SPOTSERVE_EXECUTOR__TORCH_THREADS") or os.environ.get(
        "SPOTSERVE_EXECUTOR__TORCH_THREADS"
    )
    return int(configured) if configured else max(1, (os.cpu_count() or 1) // instances)


def measure_profile(model_dir: Path, device: str | None, threads: int) -> ParallelProfile:
    """The model's parallel profile on this machine, with the executors' torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_parallel_profile(model_dir, device, repeats=PROFILE_REPEATS)
    finally:
        torch.set_num_threads(before)


def fitted_arrivals(case: Case, trace: FleetTrace, context_length: int) -> list[Arrival]:
    """The replay's arrivals: the same spec, bounds and seed, fitted as it fits them."""
    arrivals = arrivals_from_spec(
        case.arrivals,
        duration_s=trace.duration_s,
        input_tokens=case.input_tokens,
        output_tokens=case.output_tokens,
        seed=case.seed,
    )
    return scale_lengths(arrivals, context_tokens=context_length - 1)


# -- the live run ---------------------------------------------------------------------------------


@dataclass
class Iterations:
    """The scheduler's iterations over a stretch of the run (its histograms' sums)."""

    count: int
    seconds: float  # the wall time the iterations took on the executors' busy time lines
    batch: float  # sequences in them, summed

    @classmethod
    def of(cls, m: dict[str, float]) -> Iterations:
        return cls(
            count=int(m["spotserve_scheduler_iteration_seconds_count"]),
            seconds=m["spotserve_scheduler_iteration_seconds_sum"],
            batch=m["spotserve_scheduler_batch_size_sum"],
        )

    def __sub__(self, other: Iterations) -> Iterations:
        return Iterations(
            self.count - other.count, self.seconds - other.seconds, self.batch - other.batch
        )


@dataclass
class LiveRun:
    record: RunRecord
    wall_start: float  # time.time() at the replay's 0
    warmup_end_s: float | None  # from the warm-up's start to 0 (None: no warm-up)
    published: ArrivalRate | None  # admission's last published rate (its time: the phase)
    plans: list[Plan]
    fleet_events: list[FleetEvent]
    iterations: Iterations  # the replay's (its warm-up included)
    # The probe after the replay: (width, its iterations, its requests' longest end-to-end
    # seconds) of each repeat, one request alone, then several.
    probes: list[tuple[int, Iterations, float]]
    sends: dict[str, float]  # one-way seconds by message size name


def replay_options(case: Case, settings: Settings) -> ReplayOptions:
    return ReplayOptions(
        arrivals=case.arrivals,
        policy="spotserve",
        fleet=read_fleet_trace(case.fleet),
        fleet_name=case.fleet.name,
        time_scale=case.time_scale,
        input_tokens=case.input_tokens,
        output_tokens=case.output_tokens,
        grace_s=case.grace_s,
        seed=case.seed,
        warmup_s=warmup_s(case, settings),
    )


def run_live(
    case: Case,
    profile: ParallelProfile,
    model_dir: Path,
    state_dir: Path,
    progress: Callable[[str], None] | None = None,
) -> LiveRun:
    trace = read_fleet_trace(case.fleet)
    profile_path = state_dir / "profile-parallel.json"
    save_parallel_profile(profile, profile_path)
    env = {**case.env, "SPOTSERVE_PLANNER__PROFILE_PATH": str(profile_path)}
    options = replay_options(case, live_settings(case.env))
    cluster = LocalCluster(
        state_dir / "cluster",
        instances=len(trace.initial_nodes),
        model_dir=model_dir,
        credentials=init_credentials(state_dir / "credentials"),
        env=env,
    )
    cluster.start()
    try:
        live = asyncio.run(_replay(cluster, options, profile, model_dir, progress))
    finally:
        cluster.stop()
    return live


async def _replay(
    cluster: LocalCluster,
    options: ReplayOptions,
    profile: ParallelProfile,
    model_dir: Path,
    progress: Callable[[str], None] | None,
) -> LiveRun:
    warmup_started: list[float] = []

    def watch(line: str) -> None:
        # The replayer reports its warm-up as it starts it (loadgen/replay.py _warm_up).
        if "warming up" in line and not warmup_started:
            warmup_started.append(time.time())
        if progress is not None:
            progress(line)

    settings = cluster.nats_settings()
    assert settings.url is not None
    nc = await connect(settings.url, settings, name="sim-calibration", default_user="operator")
    try:
        replayer = Replayer(nc, options, progress=watch)
        record = await replayer.run()
        wall_start = time.time() - replayer.now()
        metrics_url = await _scheduler_metrics_url(cluster)
        iterations = Iterations.of(await _scheduler_metrics(metrics_url))
        published = await _published_rate(nc)
        probes = await _probe(nc, metrics_url, record.requests[0])
        plans = await _read_stream(nc, PLANS_STREAM, Plan)
        events = await _read_stream(nc, FLEET_STREAM, FleetEvent)
    finally:
        await nc.close()
    # As the planner measures its pipeline sends (services/planner/service.py), as the planner
    # (the operator user may not publish to inboxes).
    planner = cluster.nats_settings(user="planner")
    assert planner.url is not None
    nc = await connect(planner.url, planner, name="sim-calibration-sends")
    try:
        context: Any = SimpleNamespace(nc=nc)
        activation = 4 * _hidden_size(model_dir)
        sends = {
            "prefill": await measure_send_s(context, activation * profile.prefill_tokens),
            "decode": await measure_send_s(context, activation),
            "small": await measure_send_s(context, SMALL_MESSAGE),
            "large": await measure_send_s(context, LARGE_MESSAGE),
        }
    finally:
        await nc.close()
    warmup_end = wall_start - warmup_started[0] if warmup_started else None
    return LiveRun(
        record, wall_start, warmup_end, published, plans, events, iterations, probes, sends
    )


async def _published_rate(nc: Client) -> ArrivalRate | None:
    """The arrival rate admission published last (when: its phase)."""
    try:
        entry = await (await load_bucket(nc.jetstream())).get(ARRIVAL_RATE_KEY)
    except (NatsError, JetStreamError):
        return None
    return ArrivalRate.model_validate(decode(entry.value or b""))


async def _probe(
    nc: Client, metrics_url: str, shape: RequestRecord
) -> list[tuple[int, Iterations, float]]:
    """After the replay: PROBE_WIDTHS concurrent requests shaped as ``shape``, one width after
    the other, each the scheduler's iterations it took (the cost of a wider batch: every
    sequence's token is sampled, committed and forwarded, its context attended to)."""
    client = SpotserveClient(nc)
    low, high = PROMPT_TOKEN_RANGE
    prompt = [low + i % (high - low) for i in range(shape.input_tokens)]

    async def one() -> float:
        started = time.perf_counter()
        async for _chunk in client.stream(
            prompt, max_tokens=shape.output_tokens, ignore_eos=True, temperature=0.0
        ):
            pass
        return time.perf_counter() - started

    probes = []
    for width in PROBE_WIDTHS:
        for _ in range(PROBE_REPEATS):
            before = Iterations.of(await _scheduler_metrics(metrics_url))
            e2e = max(await asyncio.gather(*(one() for _ in range(width))))
            await asyncio.sleep(0.2)  # the last iteration's overhead is observed after its reply
            its = Iterations.of(await _scheduler_metrics(metrics_url)) - before
            probes.append((width, its, e2e))
    return probes


async def _scheduler_metrics_url(cluster: LocalCluster) -> str:
    urls = (await cluster.urls()).metrics.get("scheduler", [])
    if not urls:
        raise RuntimeError("the scheduler advertises no metrics URL")
    return urls[0]


async def _scheduler_metrics(url: str) -> dict[str, float]:
    """The scheduler's Prometheus samples (name{labels} -> value)."""
    return await asyncio.to_thread(read_samples, url)


async def _read_stream(nc: Client, stream: str, model: type[ModelT]) -> list[ModelT]:
    js = nc.jetstream()
    info = await js.stream_info(stream)
    messages = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            message = await js.get_msg(stream, seq)
        except NotFoundError:
            continue  # deleted (a stream keeps a bounded history)
        messages.append(model.model_validate(decode(message.data or b"")))
    return messages


def _hidden_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config["hidden_size"])


# -- what the live run measured -------------------------------------------------------------------


def measure(
    live: LiveRun,
    case: Case,
    profile: ParallelProfile,
    played: list[Arrival],
    interval_s: float,
) -> Measured:
    """The simulation's live constants from the live run (see the module docstring);
    ``played``: every request the run sent (its warm-up's and the measured ones)."""
    before = [p for p in live.plans if p.created_at <= live.wall_start]
    plan = before[-1] if before else live.plans[0]
    shape = (plan.config.pipeline, plan.config.tensor)
    # Per sequence: the probe's wider batch against the lone request, each less the
    # profile's compute of its iterations (the lone request's prefill and decode steps).
    prompt = live.record.requests[0].input_tokens
    per_step = []  # by width: the median over repeats of (overhead, batch) per iteration
    for width in (PROBE_WIDTHS[0], PROBE_WIDTHS[-1]):
        repeats = [(its, e2e) for w, its, e2e in live.probes if w == width and its.count]
        overheads = [
            (its.seconds - _compute_s(profile, shape, [prompt] * width, its)) / its.count
            for its, _ in repeats
        ]
        batches = [its.batch / its.count for its, _ in repeats]
        per_step.append((statistics.median(overheads), statistics.median(batches)))
    (o_narrow, b_narrow), (o_wide, b_wide) = per_step
    token = max(0.0, (o_wide - o_narrow) / (b_wide - b_narrow)) if b_wide > b_narrow else 0.0
    # The lone request's end to end less its iterations: what a request spends outside them
    # (admission, JetStream, the scheduler's intake, the last token's commit and forward).
    lone = [e2e - its.seconds for w, its, e2e in live.probes if w == PROBE_WIDTHS[0]]
    # Per iteration: the replay's mean iteration less the profile's compute and the per
    # sequence part, so that the replay's iterations add up to what they took.
    run = live.iterations
    if run.count == 0:
        raise RuntimeError("the live run made no iterations")
    compute = _compute_s(profile, shape, [a.input_tokens for a in played], run)
    # The probe's per-sequence part is at most what the replay's iterations took beyond their
    # compute: a noisy probe would otherwise make the simulated iterations outlast the live
    # ones (with the per-iteration part clipped at 0).
    if run.batch:
        token = min(token, max(0.0, run.seconds - compute) / run.batch)
    step = (run.seconds - compute - token * run.batch) / run.count
    sends = live.sends
    return Measured(
        step_overhead_s=max(0.0, step),
        token_overhead_s=token,
        request_overhead_s=max(0.0, statistics.median(lone)),
        join_delay_s=_join_delay(live, case),
        initial_rate_rps=plan.arrival_rate_rps,
        rate_phase_s=_rate_phase(live, interval_s),
        warmup_end_s=live.warmup_end_s,
        transfer_fixed_s=sends["small"],
        link_bytes_s=(LARGE_MESSAGE - SMALL_MESSAGE) / max(sends["large"] - sends["small"], 1e-6),
        comm_prefill_s=sends["prefill"],
        comm_decode_s=sends["decode"],
        iteration_s=run.seconds / run.count,
        compute_s=compute / run.count,
        batch=run.batch / run.count,
        iterations=run.count,
    )


def _compute_s(
    profile: ParallelProfile, shape: tuple[int, int], prompts: list[int], its: Iterations
) -> float:
    """The profile's compute for these iterations: each request's prefill (the iteration it
    starts in charges its prompt) and a decode step at their mean decoding batch each."""
    pipeline, tensor = shape
    prefill = sum(step_seconds(profile, pipeline, tensor, 1, tokens, 0) for tokens in prompts)
    decoding = max(0.0, its.batch - len(prompts)) / its.count
    return prefill + its.count * _decode_s(profile, pipeline, tensor, decoding)


def _rate_phase(live: LiveRun, interval_s: float) -> float | None:
    """When admission published its rate first after the replay's 0: it publishes every
    interval_s (plus a put's milliseconds) from its own start."""
    if live.published is None:
        return None
    phase = (live.published.at - live.wall_start) % interval_s
    return phase or interval_s


def _decode_s(profile: ParallelProfile, pipeline: int, tensor: int, batch: float) -> float:
    """One decode step at a (mean, fractional) batch: linear between the whole sizes."""
    low = math.floor(batch)
    below = step_seconds(profile, pipeline, tensor, 0, 0, low) if low > 0 else 0.0
    above = step_seconds(profile, pipeline, tensor, 0, 0, low + 1)
    return below + (above - below) * (batch - low)


def _join_delay(live: LiveRun, case: Case) -> float | None:
    """Median seconds from a trace add (its time on the replay's clock) to the added
    instance's ``joined`` event; the replay's adds pair with the trace's in time order."""
    trace = read_fleet_trace(case.fleet)
    first = trace.events[0].at_s
    initial = set(trace.initial_nodes)
    asked = sorted(
        (e.at_s - first) * case.time_scale
        for e in trace.events
        if e.kind == "add" and not (e.at_s <= first and e.node in initial)
    )
    added = [iid for _, kind, iid in sorted(live.record.fleet_events) if kind == "add"]
    joined = {
        e.instance.instance_id: e.at - live.wall_start
        for e in live.fleet_events
        if e.kind == "joined"
    }
    delays = [joined[iid] - at for at, iid in zip(asked, added, strict=False) if iid in joined]
    return statistics.median(delays) if delays else None


# -- the simulation -------------------------------------------------------------------------------


def sim_fleet(live: LiveRun, trace: FleetTrace) -> FleetTrace:
    """The trace with its first nodes named so that the simulation's planner ranks them as the
    live planner ranked their instances: those serving at the start first (the plan in force
    then), the others by their instances' start (``mapping.rank_order``). The simulation's
    first nodes all start at 0, so its planner ranks them by name; the live ones started in
    whatever order their processes did, and the replay maps the trace's first nodes onto
    them in the monitor's order (``RunRecord.instances`` lists them in the trace's order)."""
    nodes = trace.initial_nodes
    spans = live.record.instances[: len(nodes)]
    records = {e.instance.instance_id: e.instance for e in live.fleet_events if e.kind == "joined"}
    instance_of = {node: span.instance_id for node, span in zip(nodes, spans, strict=False)}
    if len(instance_of) < len(nodes) or not all(i in records for i in instance_of.values()):
        return trace  # not every first node is known: keep the trace's names
    before = [p for p in live.plans if p.created_at <= live.wall_start]
    roles = (
        sorted(before[-1].roles, key=lambda r: (r.replica, r.stage, r.tp_rank)) if before else []
    )
    serving = list(dict.fromkeys(r.instance_id for r in roles))

    def live_rank(node: str) -> tuple[Any, ...]:
        instance_id = instance_of[node]
        place = serving.index(instance_id) if instance_id in serving else len(serving)
        return place, rank_order(records[instance_id])

    def sim_rank(node: str) -> tuple[Any, ...]:
        named: Any = SimpleNamespace(instance_id=node, started_at=0.0)
        return rank_order(named)

    renamed = dict(zip(sorted(nodes, key=live_rank), sorted(nodes, key=sim_rank), strict=True))
    return replace(
        trace,
        events=[replace(e, node=renamed.get(e.node, e.node)) for e in trace.events],
        initial_nodes=[renamed[node] for node in nodes],
    )


def sim_options(
    case: Case,
    settings: Settings,
    profile: ParallelProfile,
    arrivals: list[Arrival],
    measured: Measured,
    trace: FleetTrace,
) -> SimOptions:
    planner, admission = settings.planner, settings.admission
    defaults = SimCosts()
    costs = SimCosts(
        link_bytes_s=measured.link_bytes_s,
        transfer_fixed_s=measured.transfer_fixed_s,
        # Only a join waits for an engine start here (preloaded instances, none given back).
        restart_s=measured.join_delay_s
        if measured.join_delay_s is not None
        else defaults.restart_s,
        step_overhead_s=measured.step_overhead_s,
        token_overhead_s=measured.token_overhead_s,
        request_overhead_s=measured.request_overhead_s,
        debounce_s=planner.debounce_s,
        rate_window_s=admission.rate_window_s,
        rate_interval_s=admission.rate_interval_s,
        rate_change=planner.rate_change,
    )
    nodes = {e.node for e in trace.events}
    return SimOptions(
        profile=profile.model_copy(
            update={
                "comm_prefill_s": measured.comm_prefill_s,
                "comm_decode_s": measured.comm_decode_s,
            }
        ),
        arrivals=arrivals,
        policy="spotserve",
        arrivals_name=case.arrivals,
        fleet=trace,
        fleet_name=case.fleet.name,
        grace_s=case.grace_s,
        time_scale=case.time_scale,
        # The scheduler's batch: its max_batch_size (the executors' KV blocks hold far more).
        max_batch=settings.scheduler.max_batch_size,
        scheduler=settings.scheduler.policy,
        host_kv_slots=settings.executor.host_kv_slots,
        spares=len(nodes),  # the embedded cluster gives no idle executor back
        planner=policy_settings(planner),
        costs=costs,
        warmup=measured.warmup_end_s is not None,
        warmup_s=warmup_s(case, settings),
        warmup_end_s=measured.warmup_end_s,
        initial_rate_rps=measured.initial_rate_rps,
        rate_phase_s=measured.rate_phase_s,
        preloaded=True,
    )


# -- one case, the table --------------------------------------------------------------------------


def calibrate(
    case: Case,
    model_dir: Path,
    state_dir: Path,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """The live replay of ``case``, then its simulation; both reports."""
    settings = live_settings(case.env)
    trace = read_fleet_trace(case.fleet)
    threads = executor_threads(case.env, len(trace.initial_nodes))
    profile = measure_profile(model_dir, settings.executor.device, threads)
    live = run_live(case, profile, model_dir, state_dir, progress)
    context_length = TextTokenizer.from_model_dir(model_dir).context_length
    arrivals = fitted_arrivals(case, trace, context_length)
    shapes = [(r.input_tokens, r.output_tokens) for r in live.record.requests]
    if shapes != [(a.input_tokens, a.output_tokens) for a in arrivals]:
        raise RuntimeError("the simulation's arrivals are not the ones the replay played")
    warm = warmup_s(case, settings)
    played = [a for a in arrivals if a.at_s * case.time_scale < warm] + arrivals
    measured = measure(live, case, profile, played, settings.admission.rate_interval_s)
    options = sim_options(case, settings, profile, arrivals, measured, sim_fleet(live, trace))
    sim = simulate(options)
    return Calibration(
        case=case,
        live=summarize(live.record),
        sim=summarize(sim, clock="simulated"),
        measured=measured,
        options=options,
        live_run=live,
        sim_run=sim,
    )


def within(ratio: float, bound: float = TARGET) -> bool:
    return abs(ratio - 1.0) <= bound


def pipe_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table(results: list[Calibration], bound: float = TARGET) -> str:
    header = [
        "trace", "requests", "live P50 (s)", "sim P50 (s)", "sim/live", "live P99 (s)",
        "sim P99 (s)", "sim/live", "migrations live/sim", "reconfigurations live/sim",
        f"within {bound:.0%}",
    ]  # fmt: skip
    rows = []
    for r in results:
        p50, p99 = r.ratio("p50"), r.ratio("p99")
        migrations, reconfigurations = r.counts("migrations"), r.counts("reconfigurations")
        ok = within(p50, bound) and within(p99, bound)
        rows.append([
            r.case.label(), f"{r.live['counts']['completed']}/{r.live['counts']['requests']}",
            f"{r.latency('live', 'p50'):.3f}", f"{r.latency('sim', 'p50'):.3f}", f"{p50:.2f}",
            f"{r.latency('live', 'p99'):.3f}", f"{r.latency('sim', 'p99'):.3f}", f"{p99:.2f}",
            f"{migrations[0]}/{migrations[1]}", f"{reconfigurations[0]}/{reconfigurations[1]}",
            "yes" if ok else "no",
        ])  # fmt: skip
    return pipe_table(header, rows)


def cases_table(results: list[Calibration]) -> str:
    header = [
        "trace", "arrivals (trace time)", "tokens in/out", "time scale", "grace (trace s)",
        "warm-up asked (s)",
    ]  # fmt: skip
    rows = [
        [
            r.case.label(),
            r.case.arrivals,
            f"{r.case.input_tokens}/{r.case.output_tokens}",
            str(r.case.time_scale),
            f"{r.case.grace_s:g}",
            f"{r.options.warmup_s:g}",
        ]
        for r in results
    ]
    return pipe_table(header, rows)


def constants_table(results: list[Calibration]) -> str:
    header = [
        "trace", "live iteration (ms)", "mean batch", "profile compute (ms)", "step overhead (ms)",
        "per-sequence overhead (ms)", "request overhead (ms)", "join delay (s)",
        "initial rate (req/s)", "warm-up played (s)", "KV hand-over set-up (ms)",
        "NATS bandwidth (MB/s)",
    ]  # fmt: skip
    rows = []
    for r in results:
        m = r.measured
        join = f"{m.join_delay_s:.2f}" if m.join_delay_s is not None else "n/a"
        warm = f"{m.warmup_end_s:.1f}" if m.warmup_end_s is not None else "none"
        rows.append([
            r.case.label(), f"{m.iteration_s * 1e3:.2f}", f"{m.batch:.2f}",
            f"{m.compute_s * 1e3:.2f}", f"{m.step_overhead_s * 1e3:.2f}",
            f"{m.token_overhead_s * 1e3:.2f}", f"{m.request_overhead_s * 1e3:.1f}",
            join, f"{m.initial_rate_rps:.3f}", warm,
            f"{m.transfer_fixed_s * 1e3:.2f}", f"{m.link_bytes_s / 1e6:.0f}",
        ])  # fmt: skip
    return pipe_table(header, rows)


@contextmanager
def _state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spotserve-calibration-") as state:
        yield Path(state)


# Ours, not a real trace: every first node is preempted in turn (two spares join early), so the
# instance serving is always among them; with 256-token outputs and a 12 s grace period (1.2 s
# of wall time at x0.1, 0.2 s left after the planner's debounce and a hand-over's set-up) the
# just-in-time arrangement migrates the requests that cannot finish in place.
SERVING_PREEMPTED = """\
[0, "add", {"nodes": ["node-0", "node-1", "node-2"]}]
[60000, "add", {"nodes": ["node-3", "node-4"]}]
[300000, "remove", {"nodes": ["node-0"]}]
[600000, "remove", {"nodes": ["node-1"]}]
[900000, "remove", {"nodes": ["node-2"]}]
[1200000, "DONE", {}]
"""


def default_cases(out: Path) -> list[Case]:
    """The kit's A_S and B_S segments (without the kit, the demo's example segment), then a
    segment that preempts the serving instance, with long requests: migrations."""
    if KIT_TRACES.is_dir():
        cases = [Case(KIT_TRACES / file, name=name) for name, file in KIT_SEGMENTS.items()]
    else:
        from loadgen.cli import EXAMPLE_SEGMENT

        path = out / "example-segment.jsonl"
        path.write_text(EXAMPLE_SEGMENT, encoding="utf-8")
        cases = [Case(path, name="example")]
    path = out / "serving-preempted.jsonl"
    path.write_text(SERVING_PREEMPTED, encoding="utf-8")
    migrating = Case(
        path, name="serving-preempted", arrivals="gamma:0.08:1", grace_s=12.0, output_tokens=256
    )
    return [*cases, migrating]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--fleet",
        type=Path,
        action="append",
        help="fleet trace (repeat; default: A_S, B_S and a segment preempting the serving one)",
    )
    # Each unset option: the case's own (Case's defaults; the migrating segment's own).
    parser.add_argument("--time-scale", type=float, help=f"default {Case.time_scale}")
    parser.add_argument("--arrivals", help=f"trace-time arrivals spec (default {Case.arrivals})")
    parser.add_argument("--input-tokens", type=int, help=f"default {Case.input_tokens}")
    parser.add_argument("--output-tokens", type=int, help=f"default {Case.output_tokens}")
    parser.add_argument("--grace", type=float, help=f"trace seconds (default {Case.grace_s})")
    parser.add_argument("--seed", type=int, help=f"default {Case.seed}")
    parser.add_argument("--warmup", type=float, help="wall seconds (default: window + settle)")
    parser.add_argument("--out", type=Path, help="write each live and simulated report here")
    args = parser.parse_args()
    configure_logging(LogSettings(level="warning"), "bench-sim-calibration")
    from shared.model.checkpoint import default_model_dir, ensure_model

    given = {
        "time_scale": args.time_scale, "arrivals": args.arrivals, "grace_s": args.grace,
        "input_tokens": args.input_tokens, "output_tokens": args.output_tokens,
        "seed": args.seed, "warmup_s": args.warmup,
    }  # fmt: skip
    overrides = {name: value for name, value in given.items() if value is not None}
    model_dir = ensure_model(default_model_dir("tiny"), "tiny")
    results = []
    with _state_dir() as scratch:
        out = args.out or scratch
        out.mkdir(parents=True, exist_ok=True)
        cases = [Case(path) for path in args.fleet] if args.fleet else default_cases(out)
        for case in cases:
            case = replace(case, **overrides)
            print(f"{case.label()}: live replay at x{case.time_scale} ...", file=sys.stderr)
            with _state_dir() as state:
                result = calibrate(case, model_dir, state, progress=stderr_progress)
            results.append(result)
            if args.out:
                for kind, report in (("live", result.live), ("sim", result.sim)):
                    path = args.out / f"{case.label()}-{kind}.json"
                    path.write_text(json.dumps(report, indent=1), encoding="utf-8")
            print(table([result]), file=sys.stderr)
    print(table(results))
    print()
    print(cases_table(results))
    print()
    print(constants_table(results))


if __name__ == "__main__":
    main()
