"""The planner's figures (issue 5): decision time, and bytes moved by Kuhn-Munkres vs naive.

1. Decision time (search + JIT + mapping + migration plan) of SpotServePolicy for 4, 16 and 64
   instances x 4 GPUs: a warm fleet serving the 20B model at 90 % of what all but one instance
   can sustain, with a full batch of requests in flight on every replica; then one instance that
   holds a role gets a preemption notice (30 s grace) and the policy plans the next epoch.
   Median of --repeats runs. Target: < 100 ms at 64 instances (the paper: < 1 s).
2. Bytes moved on the SpotServe traces A_S and B_S (../shared/traces/spotserve): the events are
   replayed through the policy only. Each node is one instance of 4 GPUs; a ``remove`` at t is a
   preemption notice at t - 30 s (the paper's grace period) and the instance is gone at t; an
   ``add`` at t is an instance that joins at t. Each change is one plan; its bytes are every
   transfer's (from peers and from the loader). The same replay runs with the Kuhn-Munkres
   mapping and with the naive one (keep rank order); the first placement (everything from the
   loader, the same for both) is reported apart.

    python -m bench.planner [--profile tests/fixtures/t4_gpt_20b.json] [--rate 0.35]
                            [--trace PATH ...] [--repeats 5] [--fill-spare]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.planner.costmodel import search
from services.planner.jit import InFlightRequest
from services.planner.mapping import km_mapping, naive_mapping
from services.planner.policy import DyingInstance, FleetView, Mapper, SpotServePolicy
from shared.config import PlannerSettings
from shared.messages import InstanceRecord, Plan
from shared.model.profile import ParallelProfile

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces" / "spotserve"
DEFAULT_TRACES = (TRACES / "trace_0304_real.jsonl", TRACES / "trace_0506_real.jsonl")
DEFAULT_PROFILE = ROOT / "tests" / "fixtures" / "t4_gpt_20b.json"
GRACE_S = 30.0
GB = 1e9


def instance(name: str, profile: ParallelProfile, at: float = 0.0) -> InstanceRecord:
    return InstanceRecord(
        instance_id=name, node=name, devices=4, device_kind="cuda",
        device_memory_bytes=profile.device_memory_bytes, started_at=at, heartbeat_at=at,
    )  # fmt: skip


def requests_for(plan: Plan, profile: ParallelProfile, settings: PlannerSettings):
    """A full batch in flight on every replica, at staggered progress."""
    result = []
    for replica in range(plan.config.data):
        for k in range(plan.config.batch):
            generated = (37 * (replica * plan.config.batch + k)) % settings.output_tokens
            tokens = settings.input_tokens + generated
            result.append(
                InFlightRequest(f"r{replica}-{k}", replica, generated, settings.output_tokens,
                                tokens * profile.kv_bytes_per_token)
            )  # fmt: skip
    return result


def decision_time(
    profile: ParallelProfile, count: int, settings: PlannerSettings, repeats: int
) -> tuple[float, dict[str, float], Plan]:
    fleet = [instance(f"node-{i}", profile) for i in range(count)]
    # 90 % of the most that all but one instance can sustain: most of the fleet is in use.
    best = search(profile, fleet[:-1], 1e9, settings.input_tokens, settings.output_tokens,
                  settings.max_batch, fill_spare=True)  # fmt: skip
    rate = 0.9 * best.config.throughput_rps
    policy = SpotServePolicy(profile, settings)
    first = policy.plan(FleetView(live=fleet, arrival_rate_rps=rate), None, 1, 0.0)
    victim = first.roles[len(first.roles) // 2].instance_id
    view = FleetView(
        live=[i for i in fleet if i.instance_id != victim],
        dying=[DyingInstance(next(i for i in fleet if i.instance_id == victim), 100.0 + GRACE_S)],
        arrival_rate_rps=rate,
        requests=requests_for(first, profile, settings),
        fleet_seq=2,
    )
    times, parts, plan = [], [], first
    for _ in range(repeats):
        plan = policy.plan(view, first, 2, 100.0)
        times.append(plan.decision_s)
        parts.append(dict(policy.timings))
    median = statistics.median(times)
    index = times.index(median) if median in times else 0
    return median, parts[index], plan


@dataclass(frozen=True)
class Event:
    at: float  # seconds
    kind: str  # "join" | "notice"
    nodes: tuple[str, ...]


def load_trace(path: Path) -> list[Event]:
    """SpotServe trace lines ``[t_ms, "add"|"remove"|"other"|"DONE", {"nodes": [...]}]``."""
    events = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        t_ms, kind, body = json.loads(line)
        nodes = tuple(body.get("nodes", []))
        if kind == "add" and nodes:
            events.append(Event(t_ms / 1000, "join", nodes))
        elif kind == "remove" and nodes:
            events.append(Event(max(0.0, t_ms / 1000 - GRACE_S), "notice", nodes))
    return sorted(events, key=lambda e: e.at)


@dataclass
class Replay:
    plans: int = 0
    first_bytes: int = 0
    moved_bytes: int = 0
    peer_bytes: int = 0
    loader_bytes: int = 0


def replay(
    events: list[Event], profile: ParallelProfile, settings: PlannerSettings, rate: float,
    mapper: Mapper,
) -> tuple[Replay, list[str]]:  # fmt: skip
    policy = SpotServePolicy(profile, settings, mapper)
    live: dict[str, InstanceRecord] = {}
    dying: dict[str, DyingInstance] = {}
    previous: Plan | None = None
    result, log = Replay(), []
    for seq, event in enumerate(events, start=1):
        for name in list(dying):  # past their deadline: gone
            if dying[name].deadline <= event.at:
                del dying[name]
        if event.kind == "join":
            live.update({n: instance(n, profile, event.at) for n in event.nodes})
        else:
            for name in event.nodes:
                record = live.pop(name, None)
                if record is not None:
                    dying[name] = DyingInstance(record, event.at + GRACE_S)
        view = FleetView(list(live.values()), list(dying.values()), rate, (), seq)
        plan = policy.plan(view, previous, seq, event.at)
        moved = sum(t.nbytes for t in plan.transfers)
        if previous is None:
            result.first_bytes = moved
        else:
            result.moved_bytes += moved
            result.peer_bytes += sum(t.nbytes for t in plan.transfers if t.source_instance)
            result.loader_bytes += sum(t.nbytes for t in plan.transfers if not t.source_instance)
        result.plans += 1
        c = plan.config
        log.append(
            f"  t={event.at:7.1f}s {event.kind:6} {','.join(event.nodes):24} live {len(live):2}"
            f"  D={c.data} P={c.pipeline} M={c.tensor} B={c.batch}  moved {moved / GB:7.2f} GB"
        )
        previous = plan
    return result, log


@dataclass(frozen=True)
class Setting:
    profile: Path
    rate: float
    fill_spare: bool

    def label(self, profile: ParallelProfile) -> str:
        mode = "fill-spare" if self.fill_spare else "fewest"
        return f"{profile.model.split(':')[0]} {self.rate} req/s {mode}"


# The setting first (20B at 0.35 req/s), then where replicas span instances.
FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_SETTINGS = (
    Setting(DEFAULT_PROFILE, 0.35, False),
    Setting(DEFAULT_PROFILE, 0.35, True),
    Setting(FIXTURES / "t4_gpt_30b.json", 0.2, False),
    Setting(FIXTURES / "t4_gpt_30b.json", 0.2, True),
)


def load_profile(path: Path) -> ParallelProfile:
    return ParallelProfile.model_validate_json(path.read_text())


def cold_start_s(profile: ParallelProfile, count: int, settings: PlannerSettings) -> float:
    fleet = [instance(f"node-{i}", profile) for i in range(count)]
    best = search(profile, fleet, 1e9, settings.input_tokens, settings.output_tokens,
                  settings.max_batch, fill_spare=True)  # fmt: skip
    view = FleetView(live=fleet, arrival_rate_rps=0.9 * best.config.throughput_rps)
    return SpotServePolicy(profile, settings).plan(view, None, 1, 0.0).decision_s


def iter_rows(args: argparse.Namespace, settings_list: list[Setting]) -> Iterator[str]:
    first = settings_list[0]
    profile = load_profile(first.profile)
    settings = PlannerSettings(fill_spare=first.fill_spare, max_pipeline=None)
    yield f"decision time, {profile.model.split(':')[0]} ({first.profile.name}), {settings}"
    yield (
        "  notice: warm fleet at 90 % of what all but one instance sustain, a full batch in"
        " flight per replica, one instance with a role gets a 30 s notice; cold: first plan,"
        " every role from the loader"
    )
    yield (
        f"  {'instances':>9} {'GPUs':>5} {'config':>16} {'transfers':>9} {'notice ms':>9}"
        f" {'search':>7} {'jit':>6} {'mapping':>8} {'migration':>9} {'cold ms':>8}"
    )
    for count in (4, 16, 64):
        median, parts, plan = decision_time(profile, count, settings, args.repeats)
        cold = statistics.median(cold_start_s(profile, count, settings) for _ in range(3))
        c = plan.config
        config = f"D{c.data} P{c.pipeline} M{c.tensor} B{c.batch}"
        ms = {k: v * 1e3 for k, v in parts.items()}
        yield (
            f"  {count:>9} {count * 4:>5} {config:>16} {len(plan.transfers):>9}"
            f" {median * 1e3:>9.1f} {ms['config']:>7.1f} {ms['jit']:>6.1f}"
            f" {ms['mapping']:>8.1f} {ms['migration']:>9.1f} {cold * 1e3:>8.1f}"
        )
    yield ""
    yield "bytes moved on the traces after the first placement, Kuhn-Munkres vs naive (rank order):"
    yield (
        f"  {'setting':<34} {'trace':<22} {'plans':>5} {'first GB':>8} {'KM GB':>8}"
        f" {'naive GB':>8} {'naive/KM':>8}"
    )
    for setting in settings_list:
        profile = load_profile(setting.profile)
        settings = PlannerSettings(fill_spare=setting.fill_spare, max_pipeline=None)
        for path in args.trace:
            events = load_trace(Path(path))
            km, km_log = replay(events, profile, settings, setting.rate, km_mapping)
            naive, naive_log = replay(events, profile, settings, setting.rate, naive_mapping)
            ratio = (
                f"{naive.moved_bytes / km.moved_bytes:.2f}"
                if km.moved_bytes
                else ("1 (0/0)" if not naive.moved_bytes else "inf")
            )
            yield (
                f"  {setting.label(profile):<34} {Path(path).name:<22} {km.plans:>5}"
                f" {km.first_bytes / GB:>8.1f} {km.moved_bytes / GB:>8.2f}"
                f" {naive.moved_bytes / GB:>8.2f} {ratio:>8}"
            )
            if args.verbose:
                yield "   km:"
                yield from km_log
                yield "   naive:"
                yield from naive_log


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--profile", help="a ParallelProfile JSON (default: the matrix below)")
    parser.add_argument("--rate", type=float, default=0.35, help="arrival rate with --profile")
    parser.add_argument("--fill-spare", action="store_true", help="with --profile")
    parser.add_argument("--trace", action="append", help="SpotServe JSON-lines trace")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="one line per plan")
    args = parser.parse_args()
    args.trace = args.trace or [str(p) for p in DEFAULT_TRACES]
    settings = (
        [Setting(Path(args.profile), args.rate, args.fill_spare)]
        if args.profile
        else list(DEFAULT_SETTINGS)
    )
    for row in iter_rows(args, settings):
        print(row, flush=True)


if __name__ == "__main__":
    main()
