"""Planning policies behind one small interface (in the spirit of vLLM's SchedulerInterface and
of services/scheduler/policy.py).

The service owns the NATS side (fleet events, the arrival rate, publishing epoch-numbered plans
durably); a policy only turns a view of the fleet and the previous plan into the next plan,
synchronously and without I/O. A different planner is one class implementing
:class:`PlannerPolicy`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.planner.costmodel import SearchResult, estimate, search
from services.planner.jit import InFlightRequest, arrange, migrate_seconds
from services.planner.layout import group_sizes, target_replica
from services.planner.mapping import MappingResult, km_mapping
from services.planner.migration import KvMove, MigrationPlan, plan_migration
from shared.config import PlannerSettings
from shared.messages import (
    DeviceRole,
    InstanceRecord,
    JitDecision,
    ParallelConfig,
    Plan,
    ServingMode,
)
from shared.model.profile import ParallelProfile

GB = 1e9


@dataclass(frozen=True)
class DyingInstance:
    """An instance with a preemption notice: it serves no new role but may still send."""

    record: InstanceRecord
    deadline: float  # the planner's clock, like ``now``


@dataclass(frozen=True)
class FleetView:
    """What a policy may know of the fleet when it plans."""

    live: Sequence[InstanceRecord]  # running, without a preemption notice
    dying: Sequence[DyingInstance] = ()
    arrival_rate_rps: float = 0.0
    # Requests being served under the previous plan (replica = the previous plan's replica).
    requests: Sequence[InFlightRequest] = ()
    fleet_seq: int = 0  # the last fleet event taken into account, passed through to the plan
    mode: ServingMode = "spotserve"  # passed through to the plan; the baselines plan less


class PlannerPolicy(Protocol):
    def plan(self, view: FleetView, previous: Plan | None, epoch: int, now: float) -> Plan:
        """The plan of ``epoch`` for this fleet. Instances of ``previous.roles`` that are in
        neither ``view.live`` nor ``view.dying`` (with a deadline after ``now``) are gone.
        Raises costmodel.NoFeasibleConfig when the live instances cannot hold the model."""
        ...


Mapper = Callable[
    [Sequence[DeviceRole] | None, Sequence[InstanceRecord], ParallelConfig, ParallelProfile,
     Mapping[int, int] | None],
    MappingResult,
]  # fmt: skip


def paper_settings() -> PlannerSettings:
    """The SpotServe paper's search over every pipeline degree that fits: the default of a
    policy built on its own (the simulator, the benches); the service passes its settings."""
    return PlannerSettings(max_pipeline=None)


@dataclass
class SpotServePolicy:
    """SpotServe's planner: cost-model search, Kuhn-Munkres mapping, progressive migration
    within a memory budget, just-in-time arrangement of the dying instances' requests."""

    profile: ParallelProfile
    settings: PlannerSettings = field(default_factory=paper_settings)
    mapper: Mapper = km_mapping
    # Seconds spent in each part of the last plan() (config, jit, mapping, migration).
    timings: dict[str, float] = field(default_factory=dict)

    def configuration(
        self,
        instances: Sequence[InstanceRecord],
        measured_rps: float,
        previous: Plan | None = None,
        fixed: tuple[int, int] | None = None,
    ) -> SearchResult:
        """The configuration search for these instances at this measured arrival rate (with
        the settings' margin); ``fixed`` (P, M) for the rerouting baseline."""
        s = self.settings
        return search(
            self.profile, instances, s.target_rate(measured_rps), s.input_tokens,
            s.output_tokens, s.max_batch, tolerance=s.tolerance,
            memory_reserve_fraction=s.memory_reserve_fraction,
            prefer=previous.config if previous and s.keep_previous else None,
            fill_spare=s.fill_spare, gpipe_prefill=s.gpipe_prefill, max_pipeline=s.max_pipeline,
            continuous_batching=s.continuous_batching,
            whole_instance_groups=s.whole_instance_groups, fixed=fixed,
        )  # fmt: skip

    def plan(self, view: FleetView, previous: Plan | None, epoch: int, now: float) -> Plan:
        started = time.perf_counter()
        s, profile = self.settings, self.profile
        live_ids = {i.instance_id for i in view.live}
        dying = {d.record.instance_id: d.deadline for d in view.dying if d.deadline > now}
        dying = {k: v for k, v in dying.items() if k not in live_ids}
        old_roles = list(previous.roles) if previous else []

        fixed = None
        if previous is not None and view.mode == "reroute":
            fixed = (previous.config.pipeline, previous.config.tensor)
        result = self.configuration(view.live, view.arrival_rate_rps, previous, fixed)
        config = result.config
        t_config = time.perf_counter()

        # The baselines make no use of the grace period: what a dying instance holds stays
        # there until it is gone, then restarts from scratch (the scheduler's part).
        baseline = view.mode in ("reroute", "restart")
        jit = [] if baseline else self._arrange(view, previous, old_roles, live_ids, dying, now)
        actions = {d.request_id: d for d in jit}
        moves = []
        serving = {r.replica for r in old_roles}
        for request in [] if baseline else view.requests:  # baselines move no KV cache
            decision = actions.get(request.request_id)
            if decision is not None and decision.action != "migrate":
                continue  # finishes in place, or recomputes from its committed tokens
            if request.replica not in serving:
                continue  # no cache anywhere (no previous plan): nothing to move
            steps = decision.decode_steps if decision else 0
            size = request.kv_bytes + steps * profile.kv_bytes_per_token
            moves.append(KvMove(request.request_id, request.replica,
                                target_replica(request.replica, config.data), size))  # fmt: skip
        kv_by_replica: dict[int, int] = {}
        for move in moves:
            kv_by_replica[move.old_replica] = kv_by_replica.get(move.old_replica, 0) + move.kv_bytes
        t_jit = time.perf_counter()

        hosts = view.live
        if s.whole_instance_groups:  # only instances whose devices make one group of this M
            hosts = [i for i in view.live if i.devices == config.tensor]
        mapping = self.mapper(old_roles, hosts, config, profile, kv_by_replica)
        t_mapping = time.perf_counter()

        reserve = 1.0 - s.memory_reserve_fraction
        budget = {
            i.instance_id: int(i.device_memory_bytes * reserve)
            for i in view.live
            if i.device_memory_bytes > 0
        }
        migration = plan_migration(
            old_roles, mapping.roles, profile, alive=live_ids, dying=dying,
            kv_moves=moves, memory_budget=budget,
        )  # fmt: skip
        finished = time.perf_counter()
        self.timings = {
            "config": t_config - started,
            "jit": t_jit - t_config,
            "mapping": t_mapping - t_jit,
            "migration": finished - t_mapping,
        }
        reason = _reason(view, dying, result.needs_on_demand, config, mapping, migration, jit)
        return Plan(
            epoch=epoch,
            created_at=now,
            reason=reason,
            fleet_seq=view.fleet_seq,
            config=config,
            roles=mapping.roles,
            transfers=migration.transfers,
            jit=jit,
            needs_on_demand=result.needs_on_demand,
            decision_s=finished - started,
            mode=view.mode,
        )

    def _arrange(
        self,
        view: FleetView,
        previous: Plan | None,
        old_roles: list[DeviceRole],
        live: set[str],
        dying: Mapping[str, float],
        now: float,
    ) -> list[JitDecision]:
        """JIT decisions for the requests of every replica that loses an instance. A replica
        that lost an instance without notice recomputes (its deadline is now)."""
        if previous is None or not view.requests:
            return []
        deadlines = dict(dying)
        for role in old_roles:
            if role.instance_id not in live and role.instance_id not in dying:
                deadlines[role.instance_id] = now  # gone
        # The earliest deadline among the instances each replica depends on.
        depends: dict[int, str] = {}
        for role in old_roles:
            if role.instance_id in deadlines:
                current = depends.get(role.replica)
                if current is None or deadlines[role.instance_id] < deadlines[current]:
                    depends[role.replica] = role.instance_id
        affected = [(r, depends[r.replica]) for r in view.requests if r.replica in depends]
        if not affected:
            return []
        old = previous.config
        est = estimate(
            self.profile, old.pipeline, old.tensor, old.batch, self.settings.input_tokens,
            self.settings.output_tokens, gpipe_prefill=self.settings.gpipe_prefill,
            continuous_batching=self.settings.continuous_batching,
        )  # fmt: skip
        share = _kv_share(old_roles, self.profile.num_layers)
        held: dict[str, float] = {}
        for request, instance_id in affected:
            fraction = share.get((instance_id, request.replica), 0.0)
            held[instance_id] = held.get(instance_id, 0.0) + request.kv_bytes * fraction
        t_migrate = {
            i: migrate_seconds(int(b), self.settings.kv_bandwidth_bytes_s,
                               self.settings.kv_overhead_s)
            for i, b in held.items()
        }  # fmt: skip
        # A request's time per token: under continuous batching its batch also stops for the
        # prefills of the requests that join it (the cost model's latency spread over tokens),
        # so a "finish" is not promised on the bare decode step.
        t_decode = est.decode_step_s
        if self.settings.continuous_batching:
            t_decode = est.latency_s / self.settings.output_tokens
        return arrange(affected, deadlines, now, t_decode, t_migrate, est.prefill_s)


def _kv_share(roles: Sequence[DeviceRole], num_layers: int) -> dict[tuple[str, int], float]:
    """Fraction of a replica's KV caches (layers x slices) each instance holds."""
    sizes = group_sizes(roles)
    share: dict[tuple[str, int], float] = {}
    for role in roles:
        key = (role.instance_id, role.replica)
        layers = role.last_layer - role.first_layer + 1
        share[key] = share.get(key, 0.0) + layers / num_layers / sizes[role.replica, role.stage]
    return share


def _reason(
    view: FleetView,
    dying: Mapping[str, float],
    needs_on_demand: bool,
    config: ParallelConfig,
    mapping: MappingResult,
    migration: MigrationPlan,
    jit: list[JitDecision],
) -> str:
    counts = {a: sum(1 for d in jit if d.action == a) for a in ("finish", "migrate", "recompute")}
    text = (
        f"{len(view.live)} live + {len(dying)} dying instances at {view.arrival_rate_rps:.3g}"
        f" req/s: D={config.data} P={config.pipeline} M={config.tensor} B={config.batch},"
        f" latency {config.latency_s:.2f} s, {config.throughput_rps:.3g} req/s"
    )
    if needs_on_demand:
        text += " (below the arrival rate: on-demand capacity needed)"
    text += (
        f"; keeps {mapping.reused_bytes / GB:.2f} GB in place, moves"
        f" {migration.peer_bytes / GB:.2f} GB from peers and"
        f" {migration.loader_bytes / GB:.2f} GB from the loader"
    )
    if jit:
        text += "; jit: " + ", ".join(f"{n} {a}" for a, n in counts.items() if n)
    return text
