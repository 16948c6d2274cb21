"""A whole spot fleet on a virtual clock: ``spotserve-loadgen simulate``.

Every decision is the code the services run, called as it is there:

- the planner: ``FleetState`` / ``needs_plan`` (services/planner/fleet.py) decide when to plan,
  ``SpotServePolicy.plan`` picks the configuration, the Kuhn-Munkres mapping, the migration
  plan and the just-in-time arrangement; its rate input is admission's ``ArrivalMeter``;
- the scheduler: the policy classes (FCFS, skip-join MLFQ) batch at iteration level,
  ``plan_memory`` plans KV swaps, and services/scheduler/reconfigure.py decides what a plan
  does to requests (which instances serve, which requests move, with or without their cache,
  where to, what the baselines restart); ``Sequence`` commits tokens as the service does;
- the baselines are the same code under another ``Plan.mode``.

Only time, executors, links and loading are modelled (``SimCosts``): an iteration takes the
cost model's time for its prefill and decode batches (``costmodel.step_seconds``, from the
profile), weights and KV caches move at the link bandwidths plus a fixed cost, loading from
disk takes the loader's q + n/b (``LoaderInventory.estimate_load_s``), and a restarted engine
takes ``restart_s`` before it loads. There are no threads and no NATS: a run of a 20-minute
segment takes seconds.

The fleet trace is played as ``replay`` plays it: the trace's first nodes are up (and loaded)
at 0, an ``add`` is an instance that joins after an engine start, a ``remove`` at t is a
preemption notice at t - grace and the instance is gone at t. Times are trace seconds times
``time_scale`` (as in replay), compute times are not scaled.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from loadgen.report import InstanceSpan, RequestRecord, RunRecord
from loadgen.traces import Arrival, FleetTrace, backfill_nodes
from services.admission.service import ArrivalMeter
from services.planner.costmodel import NoFeasibleConfig, step_seconds
from services.planner.fleet import FleetState, in_flight_requests, needs_plan
from services.planner.policy import SpotServePolicy, paper_settings
from services.scheduler.kvmemory import apply_after_step, apply_before_step, plan_memory
from services.scheduler.policy import ExecutorView, SchedulerPolicy, StepOutput, make_policy
from services.scheduler.reconfigure import (
    BoundRequest,
    PlannedMove,
    carries_cache,
    least_loaded,
    move_due,
    planned_moves,
    restarts,
    restarts_lost_requests,
    serves,
)
from services.scheduler.sequence import Sequence
from shared.config import MlfqSettings, PlannerSettings
from shared.messages import (
    AcceptedRequest,
    FleetEvent,
    HeldModel,
    InflightSequence,
    InstanceRecord,
    LoaderInventory,
    Plan,
    ServingMode,
)
from shared.model.profile import ParallelProfile

# The token every simulated step samples (its value does not matter: ignore_eos).
SIM_TOKEN = 5
MODEL = "model"
# The artifact's "+O" traces backfill a preemption with an on-demand instance this much later.
BACKFILL_S = 90.0
# The largest on-demand fleet the simulation sizes for a rate.
MAX_ON_DEMAND = 64
# Simulated seconds after the last arrival and fleet event before the rest is unfinished.
UNFINISHED_AFTER_S = 24 * 3600.0


@dataclass(frozen=True)
class SimCosts:
    """What the simulation charges; the same for every policy. Sources in the README
    ("Simulating the paper's scale")."""

    # Between instances: the SpotServe artifact's migration estimate, 50 Gbit/s per node.
    link_bytes_s: float = 50e9 / 8
    # Inside an instance (device to device, device to host): PCIe 3.0 x16 (a T4's bus).
    pcie_bytes_s: float = 15.75e9
    # Fixed cost of a hand-over (weights or a KV cache): the artifact's 0.5 s.
    transfer_fixed_s: float = 0.5
    # Loader tiers (q + n/b): local disk, the loader's cold read measured by bench.loading;
    # remote store: the artifact's S3 read (tools/s3_load.log: 629 MB in 5.7 s).
    disk_bytes_s: float = 2.0e9
    remote_bytes_s: float = 0.11e9
    loader_queue_s: float = 0.0
    # An engine (re)start before it loads: process, CUDA context, communicators.
    restart_s: float = 10.0
    # Outside the executor, per iteration (the scheduler's RPC and commit); 0 at paper scale,
    # measured for the live system by bench.sim_calibration.
    step_overhead_s: float = 0.0
    # Outside the profile's compute, per sequence in an iteration's batch (its token's commit
    # and forward, its share of the step command and of sampling); 0 at paper scale, measured
    # for the live system by bench.sim_calibration.
    token_overhead_s: float = 0.0
    # Per request, outside the iterations: admission's hand-over through JetStream to the
    # scheduler, and the last token's commit and forward to the client (charged on the way
    # in); 0 at paper scale, measured for the live system by bench.sim_calibration.
    request_overhead_s: float = 0.0
    # Planner: events within this window become one plan; admission's rate meter.
    debounce_s: float = 0.5
    rate_window_s: float = 60.0
    rate_interval_s: float = 5.0
    rate_change: float = 0.25


@dataclass(frozen=True)
class SimOptions:
    profile: ParallelProfile
    arrivals: list[Arrival]
    policy: ServingMode = "spotserve"
    arrivals_name: str = "arrivals"
    fleet: FleetTrace | None = None
    fleet_name: str | None = None
    grace_s: float = 30.0  # trace seconds
    time_scale: float = 1.0
    max_batch: int = 4
    scheduler: str = "fcfs"
    # Each executor's paged KV cache (blocks of kv_block_size positions); None: room for every
    # sequence bound to it (a non-preemptive scheduler never holds more than its batch).
    kv_blocks: int | None = None
    kv_block_size: int = 16
    host_kv_slots: int = 16
    spares: int = 0
    # The on-demand policy's fleet: None: what the planner needs for the mean arrival rate.
    on_demand_instances: int | None = None
    # Nodes of the fleet trace added this long after a remove are on-demand ("+O" traces).
    backfill_s: float = BACKFILL_S
    planner: PlannerSettings = field(default_factory=paper_settings)
    costs: SimCosts = field(default_factory=SimCosts)
    warmup: bool = True  # the rate meter starts with the first window of arrivals
    # The replay's warm-up played the arrivals of its first warmup_s wall seconds, and 0 came
    # warmup_end_s after it started (its last request's end): the meter holds those within its
    # window at 0. None: one rate window for both.
    warmup_s: float | None = None
    warmup_end_s: float | None = None
    # The rate the plan in force at 0 was made for; None: the meter's rate at 0. A replay's
    # warm-up leaves the live planner's last plan at a rate it read while the meter was still
    # filling (it re-plans only on a change above rate_change), so a calibration against a
    # live run starts from that plan's rate (bench.sim_calibration reads it off the PLANS
    # stream), as it starts from the trace's first nodes.
    initial_rate_rps: float | None = None
    # When admission first publishes its rate after 0 (then every rate_interval_s); None: at
    # rate_interval_s. A live admission publishes on its own clock, and the planner plans on
    # the rate last published, so a calibration against a live run takes its phase.
    rate_phase_s: float | None = None
    # Every instance holds the whole model from its join on (the embedded cluster's executors
    # load it before they register, and an executor given a role of the layers it holds keeps
    # its engine): a role of all layers lands at once, without a transfer. False: an instance
    # loads its role's weights when it gets one (the paper's setting).
    preloaded: bool = False


class SimulationError(ValueError):
    """Inputs the simulation cannot run (the profile lacks what the fleet needs, ...)."""


class _NoText:
    """The simulation generates token ids only; text is not modelled."""

    stopped = False

    def add(self, _token_ids: list[int]) -> str:
        return ""

    def flush(self) -> str:
        return ""


@dataclass
class SimInstance:
    record: InstanceRecord
    price_class: Literal["spot", "on-demand"]
    held_since: float | None = None  # billed from here (None: not held)
    spans: list[InstanceSpan] = field(default_factory=list)
    gone: bool = False
    engine_up: bool = True  # an engine runs (joined, not given back): no restart to serve
    # The replica role it serves now, the one it is loading, and when that one lands.
    role: str | None = None
    target: str | None = None
    swap_at: float = 0.0


@dataclass
class Executor:
    """A replica's head (its stage-0 instance): where the scheduler runs iterations."""

    view: ExecutorView
    generation: int  # a new one when its replica breaks: an iteration in flight is lost
    busy: bool = False
    blocked_until: float = 0.0
    moves: dict[str, PlannedMove] = field(default_factory=dict)


class Simulation:
    def __init__(self, options: SimOptions) -> None:
        self.o = options
        self.costs = options.costs
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.profile = options.profile
        self.policy = SpotServePolicy(self.profile, options.planner)
        self.scheduler: SchedulerPolicy = _scheduler_policy(options, self.profile, lambda: self.now)
        self.meter = ArrivalMeter(self.costs.rate_window_s, clock=lambda: self.now)
        self.fleet = FleetState()
        self.fleet_seq = 0
        self.plan: Plan | None = None
        self.plan_due: float | None = None
        self.instances: dict[str, SimInstance] = {}
        self.replicas: dict[str, list[str]] = {}  # role key -> member instance ids
        self.heads: dict[str, str] = {}  # role key -> head instance id
        self.executors: dict[str, Executor] = {}
        self.sequences: dict[str, Sequence] = {}
        self.records: dict[str, RequestRecord] = {}
        self.fleet_events: list[tuple[float, str, str]] = []
        self.preemptions = 0
        self.plans = 0
        self.migrations = 0
        self.on_demand_nodes: set[str] = set()
        # Added nodes that have not joined yet, and those a notice cancelled before they did.
        self.joining: set[str] = set()
        self.cancelled: set[str] = set()
        self.role_counter = itertools.count()
        self.generations = itertools.count()
        self.remaining = len(options.arrivals)
        self.published_rps: float | None = None  # the rate admission published last
        # Every replica's members and head, old ones included (they drain until they break).
        self.members: dict[str, list[str]] = {}
        self.head_of: dict[str, str] = {}
        last = max((a.at_s for a in options.arrivals), default=0.0)
        end = options.fleet.duration_s if options.fleet is not None else 0.0
        # Past this, requests still waiting are reported unfinished (no instance is left).
        self.horizon = (max(last, end) * options.time_scale) + UNFINISHED_AFTER_S

    # -- the event loop ----------------------------------------------------------------------

    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (max(time, self.now), next(self.counter), action))

    def run(self) -> RunRecord:
        self._start_fleet()
        for index, arrival in enumerate(self.o.arrivals):
            self.at(arrival.at_s * self.o.time_scale, lambda i=index, a=arrival: self._arrive(i, a))
        first_tick = self.o.rate_phase_s
        self.at(self.costs.rate_interval_s if first_tick is None else first_tick, self._meter_tick)
        while self.events and self.remaining > 0 and self.events[0][0] <= self.horizon:
            self.now, _, action = heapq.heappop(self.events)
            action()
        return self._record()

    # -- fleet ---------------------------------------------------------------------------------

    def _start_fleet(self) -> None:
        o, scale = self.o, self.o.time_scale
        if o.fleet is not None and o.policy != "ondemand":
            self.on_demand_nodes = backfill_nodes(o.fleet, o.backfill_s)
            first = o.fleet.events[0].at_s
            initial = set(o.fleet.initial_nodes)
            for node in o.fleet.initial_nodes:
                self._join(node)
            for event in o.fleet.events:
                t = (event.at_s - first) * scale
                if event.kind == "add" and not (event.at_s <= first and event.node in initial):
                    self.at(t + self.costs.restart_s, lambda n=event.node: self._join(n))
                    self.at(t, lambda n=event.node: self._add(n))
                elif event.kind == "remove":
                    notice = max(0.0, t - o.grace_s * scale)
                    self.at(notice, lambda n=event.node, d=t: self._notice(n, d))
                    self.at(t, lambda n=event.node: self._gone(n))
        else:
            count = o.on_demand_instances or self._instances_for_rate()
            self.on_demand_nodes = {f"node-{i}" for i in range(count)}
            for i in range(count):
                self._join(f"node-{i}")
        # The initial plan: weights already loaded, the meter warmed up (as replay warms up).
        if o.warmup:
            window = self.costs.rate_window_s
            span = window if o.warmup_s is None else o.warmup_s
            end = span if o.warmup_end_s is None else o.warmup_end_s
            for arrival in o.arrivals:
                if arrival.at_s * scale < span:
                    self.meter._arrivals.append(arrival.at_s * scale - end)
            self.meter.started = -window
        self._replan(initial=True)
        if self.plan is None:
            live = len(self.fleet.instances)
            raise SimulationError(
                f"{self.profile.model} fits no configuration of the {live} instances the run"
                f" starts with ({self.profile.devices_per_instance} devices each, at least"
                f" {self.profile.min_devices_per_replica} devices per replica)"
            )

    def _instances_for_rate(self) -> int:
        """The on-demand fleet: the fewest instances on which the planner's search meets the
        mean arrival rate (with its margin), plus the spares."""
        arrivals = self.o.arrivals
        span = max(a.at_s for a in arrivals) * self.o.time_scale if arrivals else 1.0
        rate = len(arrivals) / max(span, 1e-9)
        records: list[InstanceRecord] = []
        for count in range(1, MAX_ON_DEMAND + 1):
            records.append(self._record_for(f"probe-{count}"))
            try:
                if not self.policy.configuration(records, rate).needs_on_demand:
                    return count + self.o.spares
            except NoFeasibleConfig:
                continue  # the model does not fit this few instances
        return MAX_ON_DEMAND + self.o.spares

    def _record_for(self, node: str) -> InstanceRecord:
        price = "on-demand" if node in self.on_demand_nodes else "spot"
        return InstanceRecord(
            instance_id=node,
            node=node,
            devices=self.profile.devices_per_instance,
            device_kind="cuda",
            device_memory_bytes=self.profile.device_memory_bytes,
            price_class=price,
            started_at=self.now,
            heartbeat_at=self.now,
        )

    def _fleet_event(
        self, kind: str, record: InstanceRecord, deadline: float | None = None
    ) -> None:
        self.fleet_seq += 1
        event = FleetEvent(kind=kind, instance=record, at=self.now, deadline=deadline)
        self.fleet.apply(event, self.fleet_seq)
        self._plan_soon()

    def _note(self, node: str, kind: str) -> None:
        self.fleet_events.append((self.now, kind, node))

    def _add(self, node: str) -> None:
        self.joining.add(node)
        self._note(node, "add")

    def _join(self, node: str) -> None:
        if node in self.cancelled:
            self.cancelled.discard(node)
            return
        self.joining.discard(node)
        record = self._record_for(node)
        price: Literal["spot", "on-demand"] = (
            "on-demand" if node in self.on_demand_nodes or self.o.policy == "ondemand" else "spot"
        )
        self.instances[node] = SimInstance(record, price)
        self._fleet_event("joined", record)

    def _notice(self, node: str, deadline: float) -> None:
        if node in self.joining:
            # The monitor's merge rule: a notice for an added instance that has not joined yet
            # cancels the add (its process is stopped, the planner never hears of it); the
            # replay counts the notice all the same. Without this the node joined late and
            # stayed for the rest of the run.
            self.joining.discard(node)
            self.cancelled.add(node)
            self.preemptions += 1
            self._note(node, "notice")
            return
        instance = self.instances.get(node)
        if instance is None or instance.gone:
            return
        self.preemptions += 1
        self._note(node, "notice")
        self._fleet_event("preempt-notice", instance.record, deadline)

    def _gone(self, node: str) -> None:
        instance = self.instances.get(node)
        if instance is None:
            return
        instance.gone = True
        self._note(node, "kill")
        self._release(instance)
        self._fleet_event("lost", instance.record)
        self._refresh_replicas()

    def _hold(self, instance: SimInstance) -> None:
        if instance.held_since is None:
            instance.held_since = self.now
            instance.spans.append(InstanceSpan(instance.record.instance_id,
                                               instance.price_class, self.now))  # fmt: skip

    def _release(self, instance: SimInstance) -> None:
        if instance.held_since is not None:
            instance.spans[-1].end_s = self.now
            instance.held_since = None
        instance.role = instance.target = None
        instance.engine_up = False

    # -- planning ------------------------------------------------------------------------------

    def _plan_soon(self) -> None:
        due = self.now + self.costs.debounce_s
        self.plan_due = due
        self.at(due, lambda: self._plan_if_due(due))

    def _plan_if_due(self, due: float) -> None:
        if self.plan_due == due:  # a later event pushed it back: that one plans
            self.plan_due = None
            # As the planner service after a quiet debounce window: only if a plan is due (the
            # initial plan already covers the first nodes' joins, which scheduled this one).
            rate = self._planner_rate()
            if needs_plan(self.fleet, self.plan, self.o.policy, rate, self.costs.rate_change):
                self._replan()

    def _meter_tick(self) -> None:
        # Admission publishes its meter's rate; the planner knows that one until the next.
        rate = self.published_rps = self.meter.rate().requests_per_s
        if self.plan_due is None and needs_plan(self.fleet, self.plan, self.o.policy,
                                                rate, self.costs.rate_change):  # fmt: skip
            self._replan()
        if self.remaining > 0:
            self.at(self.now + self.costs.rate_interval_s, self._meter_tick)

    def _planner_rate(self) -> float:
        """The rate the planner knows: the one admission published last (before the first,
        the meter's: the warm-up's)."""
        if self.published_rps is None:
            return self.meter.rate().requests_per_s
        return self.published_rps

    def _replan(self, initial: bool = False) -> None:
        rate = self._planner_rate()
        if initial and self.o.initial_rate_rps is not None:
            rate = self.o.initial_rate_rps
        if not self.fleet.has_live():
            return
        inflight = [
            InflightSequence(
                request_id=s.request_id,
                instance_id=s.executor,
                context_tokens=s.cached_tokens,
                generated_tokens=len(s.generated),
                max_tokens=s.request.max_tokens,
            )
            for s in self.sequences.values()
            if not s.finished
        ]
        requests = in_flight_requests(inflight, self.plan, self.profile.kv_bytes_per_token)
        view = self.fleet.view(self.now, rate, self.o.policy, requests)
        epoch = (self.plan.epoch if self.plan else 0) + 1
        try:
            plan = self.policy.plan(view, self.plan, epoch, self.now)
        except NoFeasibleConfig:
            return  # nothing fits the live instances: wait for more
        plan = plan.model_copy(update={"arrival_rate_rps": rate})
        if not initial:
            self.plans += 1
            self.migrations += sum(1 for d in plan.jit if d.action == "migrate")
        self._apply_plan(plan, initial)

    def _apply_plan(self, plan: Plan, initial: bool) -> None:
        previous, self.plan = self.plan, plan
        roles = self._role_keys(plan, previous)
        reload = plan.reloads_everything(previous)
        landing = self._load_times(plan, roles, reload, initial)
        for node, instance in self.instances.items():
            target = roles.get(node)
            if target is None:
                instance.target = None
                continue
            self._hold(instance)
            if target == instance.role and not reload:
                instance.target = None
                continue
            instance.target, instance.swap_at = target, landing[node]
            self.at(landing[node], lambda n=node, t=target: self._swap(n, t))
        # The scheduler's part (services/scheduler/plans.py apply_plan).
        for head, executor in self.executors.items():
            executor.view = replace(executor.view, accepts_new=serves(plan, head))
        for head in restarts(plan, previous, list(self.executors)):
            self._restart_on(head, from_scratch=True)
        bound = [BoundRequest(s.request_id, s.executor, len(s.generated))
                 for s in self.sequences.values() if not s.finished]  # fmt: skip
        for request_id, move in planned_moves(plan, bound).items():
            head = self.sequences[request_id].executor
            if head in self.executors:
                self.executors[head].moves[request_id] = move
        settled = max(landing.values(), default=self.now)
        self.at(settled, lambda epoch=plan.epoch: self._settle(epoch))
        self._refresh_replicas()

    def _role_keys(self, plan: Plan, previous: Plan | None) -> dict[str, str]:
        """Instance -> a key of its replica role; a replica whose roles are all the same as
        before keeps its key (it serves on without a pause)."""

        def signature(p: Plan, replica: int) -> frozenset[tuple[Any, ...]]:
            return frozenset((r.instance_id, r.device, r.stage, r.tp_rank, r.first_layer,
                              r.last_layer) for r in p.roles if r.replica == replica)  # fmt: skip

        old_keys: dict[frozenset[tuple[Any, ...]], str] = {}
        if previous is not None:
            for replica in {r.replica for r in previous.roles}:
                members = {r.instance_id for r in previous.roles if r.replica == replica}
                key = next((self.instances[m].role for m in members if m in self.instances), None)
                if key is not None:
                    old_keys[signature(previous, replica)] = key
        keys: dict[str, str] = {}
        self.replicas, self.heads = {}, {}
        for replica in sorted({r.replica for r in plan.roles}):
            sig = signature(plan, replica)
            key = old_keys.get(sig) or f"r{next(self.role_counter)}"
            members = sorted({r.instance_id for r in plan.roles if r.replica == replica})
            head = next(r.instance_id for r in plan.roles
                        if r.replica == replica and r.stage == 0 and r.tp_rank == 0)  # fmt: skip
            self.replicas[key], self.heads[key] = members, head
            keys.update({m: key for m in members})
        return keys

    def _load_times(
        self, plan: Plan, roles: dict[str, str], reload: bool, initial: bool
    ) -> dict[str, float]:
        """When each instance with a new role has its weights."""
        c = self.costs
        landing: dict[str, float] = {}
        for node, key in roles.items():
            instance = self.instances[node]
            if initial or (key == instance.role and not reload):
                landing[node] = self.now
                continue
            last = self.profile.num_layers - 1
            whole = all(r.first_layer == 0 and r.last_layer == last
                        for r in plan.roles if r.instance_id == node)  # fmt: skip
            if self.o.preloaded and whole and instance.engine_up and not reload:
                landing[node] = self.now  # the engine it runs already holds these layers
                continue
            transfers = [t for t in plan.transfers if t.kind == "weights" and t.instance_id == node]
            restart = c.restart_s if reload or not instance.engine_up else 0.0
            instance.engine_up = True
            if reload or plan.weights_from_disk:
                mine = [r for r in plan.roles if r.instance_id == node]
                disk = sum(
                    _role_bytes(self.profile, r.first_layer, r.last_layer, plan) for r in mine
                )
                peer = local = 0
            else:
                peer = sum(t.nbytes for t in transfers
                           if t.source_instance not in (None, node))  # fmt: skip
                local = sum(t.nbytes for t in transfers if t.source_instance == node)
                disk = sum(t.nbytes for t in transfers if t.source_instance is None)
            loader = self._loader(node).estimate_load_s(MODEL, disk) or 0.0
            seconds = max(peer / c.link_bytes_s, local / c.pcie_bytes_s, loader)
            # The plan's own decision time (milliseconds, wall clock) is not charged: runs
            # stay deterministic.
            landing[node] = self.now + restart + c.transfer_fixed_s + seconds
        return landing

    def _loader(self, node: str) -> LoaderInventory:
        c = self.costs
        return LoaderInventory(
            node=node,
            models={MODEL: HeldModel(tier="local-disk", nbytes=self.profile.weight_bytes)},
            bandwidth_bps={"local-disk": c.disk_bytes_s, "remote": c.remote_bytes_s},
            queue_s=c.loader_queue_s,
            updated_at=self.now,
        )

    def _swap(self, node: str, key: str) -> None:
        instance = self.instances.get(node)
        if instance is None or instance.gone or instance.target != key:
            return
        instance.role, instance.target = key, None
        self._refresh_replicas()

    def _settle(self, epoch: int) -> None:
        """The reconfiguration of ``epoch`` has landed: instances without a role (beyond the
        spares) are given back."""
        if self.plan is None or self.plan.epoch != epoch:
            return
        with_role = {r.instance_id for r in self.plan.roles}
        idle = [i for n, i in self.instances.items()
                if n not in with_role and not i.gone and i.held_since is not None]  # fmt: skip
        for instance in idle[self.o.spares :]:
            self._release(instance)
        self._refresh_replicas()

    # -- replicas and executors ----------------------------------------------------------------

    def _operational(self) -> dict[str, str]:
        """Head -> role key of every replica whose members all serve its role now."""
        serving: dict[str, list[str]] = {}
        for node, instance in self.instances.items():
            if instance.role is not None and not instance.gone:
                serving.setdefault(instance.role, []).append(node)
        heads = {}
        for key, members in serving.items():
            expected = self.members.get(key)
            if expected is not None and sorted(members) == expected:
                heads[self.head_of[key]] = key
        return heads

    def _refresh_replicas(self) -> None:
        # Remember every replica's members and head, old ones included (they drain).
        for key, members in self.replicas.items():
            self.members[key], self.head_of[key] = members, self.heads[key]
        operational = self._operational()
        for head in list(self.executors):
            if head not in operational:
                self._break(head)
        for head in operational:
            if head not in self.executors:
                view = ExecutorView(head, max_batch_size=self.o.max_batch,
                                    kv_blocks=self.o.kv_blocks or 1 << 30,
                                    block_size=self.o.kv_block_size,
                                    host_slots=self.o.host_kv_slots,
                                    accepts_new=serves(self.plan, head))  # fmt: skip
                self.executors[head] = Executor(view, generation=next(self.generations))
        self._wake_all()

    def _break(self, head: str) -> None:
        """The replica headed here stopped (a member died, swapped or was given back): what it
        holds recomputes elsewhere (the baselines restart it from scratch)."""
        executor = self.executors.pop(head)
        executor.generation = next(self.generations)
        lost = self.scheduler.requeue_executor(head)
        if restarts_lost_requests(self.plan):
            for sequence in lost:
                sequence.restart_from_scratch()

    def _restart_on(self, head: str, from_scratch: bool) -> None:
        executor = self.executors.get(head)
        if executor is None:
            return
        executor.moves.clear()
        for sequence in self.scheduler.requeue_executor(head):
            if from_scratch:
                sequence.restart_from_scratch()
        executor.generation = next(self.generations)
        executor.busy = False

    def _wake_all(self) -> None:
        for head in list(self.executors):
            self._maybe_step(head)

    def _maybe_step(self, head: str) -> None:
        executor = self.executors.get(head)
        if executor is None or executor.busy:
            return
        if executor.blocked_until > self.now:
            self.at(executor.blocked_until, lambda: self._maybe_step(head))
            return
        self._apply_moves(head, executor)
        if executor.blocked_until > self.now:
            self.at(executor.blocked_until, lambda: self._maybe_step(head))
            return
        batch = self.scheduler.schedule(executor.view)
        if not batch:
            return
        memory = plan_memory(executor.view, batch, self.scheduler.priority_order(executor.view))
        batch = memory.batch
        apply_before_step(memory)
        seconds = self._step_seconds(batch, memory)
        executor.busy = True
        generation = executor.generation
        self.at(self.now + seconds,
                lambda: self._step_done(head, generation, batch, memory, seconds))  # fmt: skip

    def _step_seconds(self, batch: list[Sequence], memory: Any) -> float:
        assert self.plan is not None
        config = self.plan.config
        new = [s for s in batch if s.cached_tokens == 0]
        tokens = max((len(s.request.prompt_token_ids) + len(s.generated) for s in new), default=0)
        seconds = step_seconds(self.profile, config.pipeline, config.tensor, len(new), tokens,
                               len(batch) - len(new))  # fmt: skip
        swapped = [*memory.offload, *memory.upload]
        swap_bytes = sum(_kv_bytes(self.profile, s) for s in swapped)
        overhead = self.costs.step_overhead_s + len(batch) * self.costs.token_overhead_s
        return seconds + swap_bytes / self.costs.pcie_bytes_s + overhead

    def _step_done(
        self, head: str, generation: int, batch: list[Sequence], memory: Any, seconds: float
    ) -> None:
        executor = self.executors.get(head)
        if executor is None or executor.generation != generation:
            return  # the replica broke during the iteration: its sequences were requeued
        executor.busy = False
        for sequence in batch:
            chunk = sequence.append(SIM_TOKEN, frozenset())
            record = self.records[sequence.request_id]
            if chunk is not None:
                record.token_s.extend([self.now] * len(chunk.token_ids))
            if sequence.finished:
                record.finish_reason = sequence.finish_reason
                record.restarts = sequence.restarts
                del self.sequences[sequence.request_id]
                self.remaining -= 1
        self.scheduler.update_from_output(StepOutput(head, batch, seconds))
        apply_after_step(memory)
        self._wake_all()

    def _apply_moves(self, head: str, executor: Executor) -> None:
        """As the scheduler does between two iterations (services/scheduler/plans.py)."""
        for request_id, move in list(executor.moves.items()):
            sequence = self.sequences.get(request_id)
            if sequence is None or sequence.executor != head:
                del executor.moves[request_id]
                continue
            if not move_due(move, len(sequence.generated), self.now):
                continue
            del executor.moves[request_id]
            serving = [h for h, e in self.executors.items() if h != head and e.view.accepts_new]
            destination = least_loaded(serving, (s.executor for s in self.sequences.values()))
            if carries_cache(move, self.plan, destination, sequence.kv_location != "none"):
                assert destination is not None
                # The source's loop waits for the hand-over, as the service's does.
                seconds = self.costs.transfer_fixed_s + _kv_bytes(self.profile, sequence) / (
                    self.costs.link_bytes_s
                )
                executor.blocked_until = self.now + seconds
                self.scheduler.rebind(sequence, destination)
                sequence.cache_on_host()
            else:
                self.scheduler.requeue(sequence)

    # -- requests ------------------------------------------------------------------------------

    def _arrive(self, index: int, arrival: Arrival) -> None:
        request_id = f"r{index}"
        self.meter.record()
        request = AcceptedRequest(
            request_id=request_id, prompt_token_ids=[SIM_TOKEN] * arrival.input_tokens,
            max_tokens=arrival.output_tokens, temperature=0.0, top_p=1.0, seed=0, stop=[],
            stream=True, ignore_eos=True, reply_subject=None, encoding="msgpack",
            accepted_at=self.now,
        )  # fmt: skip
        sequence = Sequence(request, message=None, detokenizer=_NoText())  # type: ignore[arg-type]
        self.sequences[request_id] = sequence
        self.records[request_id] = RequestRecord(
            request_id, self.now, arrival.input_tokens, arrival.output_tokens
        )
        delay = self.costs.request_overhead_s
        if delay > 0:
            self.at(self.now + delay, lambda: self._take(sequence))
        else:
            self._take(sequence)

    def _take(self, sequence: Sequence) -> None:
        self.scheduler.add_request(sequence)
        self._wake_all()

    # -- the report ----------------------------------------------------------------------------

    def _record(self) -> RunRecord:
        for instance in self.instances.values():
            if instance.held_since is not None:
                instance.spans[-1].end_s = self.now
        records = [self.records[f"r{i}"] for i in range(len(self.o.arrivals))]
        for record in records:
            sequence = self.sequences.get(record.request_id)
            if sequence is not None:
                record.restarts = sequence.restarts
        return RunRecord(
            policy=self.o.policy,
            arrivals=self.o.arrivals_name,
            fleet_trace=self.o.fleet_name,
            time_scale=self.o.time_scale,
            duration_s=self.now,
            requests=records,
            instances=[span for i in self.instances.values() for span in i.spans],
            preemptions=self.preemptions,
            migrations=self.migrations,
            reconfigurations=self.plans,
            fleet_events=self.fleet_events,
        )


def _kv_bytes(profile: ParallelProfile, sequence: Sequence) -> int:
    return sequence.cached_tokens * profile.kv_bytes_per_token


def _role_bytes(profile: ParallelProfile, first: int, last: int, plan: Plan) -> float:
    """Weight bytes of one device's role (its layers' share of one tensor shard)."""
    layers = (last - first + 1) * profile.layer_bytes / plan.config.tensor
    embed = profile.embed_bytes if first == 0 else 0
    head = profile.head_bytes / plan.config.tensor if last == profile.num_layers - 1 else 0
    return layers + embed + head


def _scheduler_policy(
    options: SimOptions, profile: ParallelProfile, clock: Callable[[], float]
) -> SchedulerPolicy:
    config = (1, min(profile.tensor_degrees()))

    def prefill_time_s(tokens: int) -> float:
        return step_seconds(profile, *config, 1, tokens, 0)

    def decode_time_s(batch: int) -> float:
        return step_seconds(profile, *config, 0, 0, batch)

    return make_policy(
        options.scheduler,
        MlfqSettings(),
        prefill_time_s,
        decode_time_s=decode_time_s,
        max_batch_size=options.max_batch,
        clock=clock,
    )


def simulate(options: SimOptions) -> RunRecord:
    """One policy over the arrivals and the fleet trace; a RunRecord for loadgen.report."""
    if not options.arrivals:
        raise SimulationError(f"no requests in {options.arrivals_name}")
    tensor = options.profile.devices_per_instance
    if options.planner.whole_instance_groups:
        options.profile.check_covers(tensor, options.max_batch, options.profile.model)
    return Simulation(options).run()
