"""Planner service: turns fleet events into epoch-numbered plans.

It reads the FLEET stream from the start with an ordered consumer (so a restarted planner
rebuilds the same fleet view), and whenever it has caught up with events its last plan does not
cover, it asks its policy for a new plan and publishes it durably on the PLANS stream as epoch
n+1. Publishing is guarded by the stream's last sequence: a second planner that raced it fails
to publish instead of forking the epochs. Events that arrive together (an add and a remove
inside one debounce window) become one reconfiguration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from functools import partial
from pathlib import Path

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from services.planner import metrics
from services.planner.costmodel import NoFeasibleConfig
from services.planner.fleet import FleetState, in_flight_requests, needs_plan, plan_trigger
from services.planner.jit import InFlightRequest
from services.planner.policy import FleetView, PlannerPolicy, SpotServePolicy
from shared.codec import DecodeError, decode, encode
from shared.config import PlannerSettings
from shared.messages import (
    ArrivalRate,
    Empty,
    FleetEvent,
    InflightSequence,
    Plan,
    ServingMode,
)
from shared.model.profile import (
    ParallelProfile,
    default_parallel_profile_path,
    load_parallel_profile,
    measure_parallel_profile,
    save_parallel_profile,
)
from shared.modelsource import resolve_model
from shared.readers import FOLLOW_HEARTBEAT_S, read_serving_mode
from shared.rpc import INFLIGHT_ENDPOINT, RpcError, call
from shared.runtime import ServiceContext
from shared.subjects import (
    ARRIVAL_RATE_KEY,
    FLEET_STREAM,
    FLEET_SUBJECT_PREFIX,
    PLANS_STREAM,
    PLANS_SUBJECT,
    load_bucket,
)
from shared.waiting import cancel_and_wait, sleep_unless_stopped, supervised

# Bound on JetStream's acknowledgement of a published plan.
PUBLISH_PLAN_TIMEOUT_S = 10.0
# Bound on each echo of the NATS send-time measurement (a message of up to a prefill's size).
SEND_PROBE_TIMEOUT_S = 10.0


async def last_plan(context: ServiceContext) -> tuple[Plan | None, int]:
    """The current plan and its stream sequence (None, 0 when there is none)."""
    try:
        message = await context.js.get_last_msg(PLANS_STREAM, PLANS_SUBJECT)
    except NotFoundError:
        return None, 0
    return Plan.model_validate(decode(message.data or b"")), message.seq or 0


async def publish_plan(context: ServiceContext, plan: Plan, after_seq: int) -> int:
    """Durably append a plan; refused if another plan was published after ``after_seq``."""
    headers = {
        "Nats-Msg-Id": f"plan-{plan.epoch}",
        "Nats-Expected-Last-Subject-Sequence": str(after_seq),
    }
    ack = await context.js.publish(
        PLANS_SUBJECT, encode(plan), headers=headers, timeout=PUBLISH_PLAN_TIMEOUT_S
    )
    return ack.seq


async def read_arrival_rate(context: ServiceContext) -> ArrivalRate | None:
    try:
        bucket = await load_bucket(context.js)
        entry = await bucket.get(ARRIVAL_RATE_KEY)
        return ArrivalRate.model_validate(decode(entry.value or b""))
    except (NotFoundError, NatsError, JetStreamError, DecodeError, ValidationError):
        return None


async def measure_send_s(context: ServiceContext, nbytes: int, repeats: int = 5) -> float:
    """One-way time of an ``nbytes`` message through this NATS server (half a round trip)."""
    inbox = context.nc.new_inbox()

    async def echo(message: Msg) -> None:
        with contextlib.suppress(NatsError):
            await message.respond(message.data)

    subscription = await context.nc.subscribe(inbox, cb=echo)
    payload = bytes(nbytes)
    samples = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            await context.nc.request(inbox, payload, timeout=SEND_PROBE_TIMEOUT_S)
            samples.append((time.perf_counter() - started) / 2)
    finally:
        await subscription.unsubscribe()
    return sorted(samples)[len(samples) // 2]


async def read_inflight(context: ServiceContext) -> list[InflightSequence]:
    """The scheduler's requests in flight; none when no scheduler answers in time."""
    try:
        report = await call(context.nc, INFLIGHT_ENDPOINT, Empty())
    except (RpcError, NatsError) as exc:
        context.log.warning("planner.inflight_unavailable", error=repr(exc))
        return []
    return report.sequences


class Planner:
    def __init__(
        self, context: ServiceContext, policy: PlannerPolicy, profile: ParallelProfile
    ) -> None:
        self.context = context
        self.settings = context.settings.planner
        self.policy = policy
        self.profile = profile
        self.log = context.log
        self.state = FleetState()
        self.previous: Plan | None = None
        self.plan_seq = 0  # stream sequence of the current plan
        self.arrival_rate = 0.0
        self.mode: ServingMode = "spotserve"

    def view(self, now: float, requests: list[InFlightRequest] | None = None) -> FleetView:
        return self.state.view(now, self.arrival_rate, self.mode, requests or [])

    def trigger(self) -> str:
        """Why a plan is due now (the ``trigger`` label of the plans counter)."""
        return plan_trigger(self.state, self.previous, self.mode)

    def needs_plan(self) -> bool:
        return needs_plan(
            self.state, self.previous, self.mode, self.arrival_rate, self.settings.rate_change
        )

    async def replan(self) -> None:
        sequences = await read_inflight(self.context)
        kv_per_token = self.profile.kv_bytes_per_token
        requests = in_flight_requests(sequences, self.previous, kv_per_token)
        now = time.time()  # deadlines are the monitor's wall clock: same host or NTP-synced
        view = self.view(now, requests)
        if not view.live:
            self.log.warning("planner.no_live_instances", dying=len(view.dying))
            return
        epoch = (self.previous.epoch if self.previous else 0) + 1
        trigger = self.trigger()
        try:
            plan = await asyncio.to_thread(self.policy.plan, view, self.previous, epoch, now)
        except NoFeasibleConfig as exc:
            metrics.PLAN_FAILURES.labels("infeasible").inc()
            self.log.error("planner.infeasible", error=str(exc), live=len(view.live))
            return
        plan = plan.model_copy(update={"arrival_rate_rps": self.arrival_rate})
        try:
            self.plan_seq = await publish_plan(self.context, plan, self.plan_seq)
        except (TimeoutError, NatsError, JetStreamError) as exc:
            # Another planner published first, or JetStream is away: start from what is stored.
            metrics.PLAN_FAILURES.labels("publish_failed").inc()
            self.log.warning("planner.publish_failed", epoch=epoch, error=repr(exc))
            await self.reload_last_plan()
            return
        self.previous = plan
        observe_published(plan, trigger)
        self.log.info(
            "planner.plan",
            epoch=epoch,
            fleet_seq=plan.fleet_seq,
            decision_ms=round(plan.decision_s * 1000, 2),
            transfers=len(plan.transfers),
            reason=plan.reason,
        )

    async def reload_last_plan(self) -> None:
        """Start again from the stored plan. While the stream cannot be read either (it elects
        a leader) keep ours: the next quiet window plans again, and a stale sequence only
        makes that publish refused and this read retried."""
        try:
            self.previous, self.plan_seq = await last_plan(self.context)
        except (TimeoutError, NatsError, JetStreamError) as exc:
            self.log.warning("planner.plan_unreadable", error=repr(exc))
            return
        observe_current(self.previous)

    async def watch_inputs(self) -> None:
        """The arrival rate (admission's meter) and the serving mode (the admin endpoint)."""
        while not self.context.stop.is_set():
            rate = await read_arrival_rate(self.context)
            if rate is not None:
                self.arrival_rate = rate.requests_per_s
            mode = await read_serving_mode(self.context)
            if mode is not None:
                self.mode = mode
            await sleep_unless_stopped(self.context.stop, self.settings.rate_poll_s)

    async def run(self) -> None:
        """Follow the FLEET stream from its start; plan whenever caught up and out of date."""
        self.previous, self.plan_seq = await last_plan(self.context)
        observe_current(self.previous)
        subscription = await self.context.js.subscribe(
            f"{FLEET_SUBJECT_PREFIX}.*",
            stream=FLEET_STREAM,
            ordered_consumer=True,
            idle_heartbeat=FOLLOW_HEARTBEAT_S,
        )
        try:
            while not self.context.stop.is_set():
                try:
                    message = await subscription.next_msg(timeout=self.settings.debounce_s)
                except TimeoutError:
                    # Quiet for a debounce window: everything that came together is applied.
                    if self.needs_plan():
                        await self.replan()
                    continue
                self.apply(message)
        finally:
            await subscription.unsubscribe()

    def apply(self, message: Msg) -> None:
        seq = message.metadata.sequence.stream
        try:
            event = FleetEvent.model_validate(decode(message.data))
        except (DecodeError, ValidationError) as exc:
            # Only the monitor writes here; skip what cannot be read rather than stall forever.
            self.log.error("planner.bad_fleet_event", seq=seq, error=str(exc))
            self.state.last_seq = max(self.state.last_seq, seq)
            return
        self.state.apply(event, seq)


def observe_published(plan: Plan, trigger: str) -> None:
    metrics.PLANS.labels(trigger).inc()
    metrics.DECISION_SECONDS.observe(plan.decision_s)
    for transfer in plan.transfers:
        source = "loader" if transfer.source_instance is None else "peer"
        metrics.TRANSFER_BYTES.labels(transfer.kind, source).inc(transfer.nbytes)
    for decision in plan.jit:
        metrics.JIT_DECISIONS.labels(decision.action).inc()
    observe_current(plan)


def observe_current(plan: Plan | None) -> None:
    """The gauges of the current plan."""
    if plan is None:
        return
    metrics.PLAN_EPOCH.set(plan.epoch)
    metrics.PARALLEL_DEGREE.labels("data").set(plan.config.data)
    metrics.PARALLEL_DEGREE.labels("pipeline").set(plan.config.pipeline)
    metrics.PARALLEL_DEGREE.labels("tensor").set(plan.config.tensor)
    metrics.NEEDS_ON_DEMAND.set(1 if plan.needs_on_demand else 0)


def policy_settings(settings: PlannerSettings) -> PlannerSettings:
    """The configured settings as the policy plans with them: whole-instance groups, which is
    what the executors serve."""
    return settings.model_copy(update={"whole_instance_groups": True})


async def load_or_measure_profile(context: ServiceContext) -> ParallelProfile:
    """The cost model's profile: the configured or default file, measured now if missing;
    the pipeline send costs always measured over this NATS link."""
    model_dir = await resolve_model(context)
    device = context.settings.executor.device or "cpu"
    path = context.settings.planner.profile_path or default_parallel_profile_path(model_dir, device)
    degrees = tuple(context.settings.planner.tensor_degrees)
    profile = await asyncio.to_thread(load_parallel_profile, path)
    if profile is None or not set(degrees) <= set(profile.tensor_degrees()):
        context.log.info("planner.profiling", model=str(model_dir), device=device, tensor=degrees)
        profile = await asyncio.to_thread(
            partial(measure_parallel_profile, model_dir, device, tensor_degrees=degrees)
        )
        await asyncio.to_thread(save_parallel_profile, profile, path)
    hidden = await asyncio.to_thread(_hidden_size, model_dir)
    activation = 4 * hidden  # bytes per token of float32 activations between stages
    return profile.model_copy(
        update={
            "comm_prefill_s": await measure_send_s(context, activation * profile.prefill_tokens),
            "comm_decode_s": await measure_send_s(context, activation),
        }
    )


def _hidden_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config["hidden_size"])


async def serve(context: ServiceContext) -> None:
    profile = await load_or_measure_profile(context)
    policy = SpotServePolicy(profile, policy_settings(context.settings.planner))
    planner = Planner(context, policy, profile)
    service = await context.add_micro_service(
        "Picks parallel configurations, device mappings and migration plans",
        metadata={"profile": profile.model, "device": profile.device},
    )
    context.log.info(
        "planner.ready",
        comm_prefill_ms=round(profile.comm_prefill_s * 1000, 3),
        comm_decode_ms=round(profile.comm_decode_s * 1000, 3),
    )
    inputs = supervised(planner.watch_inputs(), "inputs", context.log)
    try:
        await planner.run()
    finally:
        await cancel_and_wait([inputs])
        await service.stop()
