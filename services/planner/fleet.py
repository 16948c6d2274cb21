"""The planner's view of the fleet between plans, and when a new plan is due, as pure code.

The planner service (which reads fleet events from JetStream) and the fleet simulator
(``loadgen.simulate``) both keep a :class:`FleetState` and ask :func:`plan_trigger` /
:func:`needs_plan` when to call the policy, so both re-plan on the same events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.planner.jit import InFlightRequest
from services.planner.policy import DyingInstance, FleetView
from shared.messages import FleetEvent, InflightSequence, InstanceRecord, Plan, ServingMode


@dataclass
class FleetState:
    """The fleet as the events so far describe it."""

    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    deadlines: dict[str, float] = field(default_factory=dict)  # dying instance -> deadline
    gone: set[str] = field(default_factory=set)
    last_seq: int = 0

    def apply(self, event: FleetEvent, seq: int) -> None:
        instance_id = event.instance.instance_id
        if event.kind == "joined":
            self.instances[instance_id] = event.instance
            self.gone.discard(instance_id)
        elif event.kind == "preempt-notice" and instance_id in self.instances:
            self.deadlines[instance_id] = event.deadline or event.at
        elif event.kind in ("lost", "left"):
            self.instances.pop(instance_id, None)
            self.deadlines.pop(instance_id, None)
            self.gone.add(instance_id)
        self.last_seq = max(self.last_seq, seq)

    def has_live(self) -> bool:
        return any(i not in self.deadlines for i in self.instances)

    def view(
        self,
        now: float,
        arrival_rate_rps: float,
        mode: ServingMode,
        requests: Sequence[InFlightRequest] = (),
    ) -> FleetView:
        live = [r for i, r in self.instances.items() if i not in self.deadlines]
        dying = [
            DyingInstance(self.instances[i], deadline)
            for i, deadline in self.deadlines.items()
            if deadline > now
        ]
        return FleetView(
            live=live,
            dying=dying,
            arrival_rate_rps=arrival_rate_rps,
            requests=list(requests),
            fleet_seq=self.last_seq,
            mode=mode,
        )


def plan_trigger(state: FleetState, previous: Plan | None, mode: ServingMode) -> str:
    """Why a plan would be due now (the ``trigger`` label of the plans counter)."""
    if previous is None:
        return "initial"
    if state.last_seq > previous.fleet_seq:
        return "fleet"
    if mode != previous.mode:
        return "mode"
    return "arrival_rate"


def needs_plan(
    state: FleetState,
    previous: Plan | None,
    mode: ServingMode,
    arrival_rate_rps: float,
    rate_change: float,
) -> bool:
    """A plan is due on a fleet event, on a mode switch or the first plan (with a live
    instance), or when the arrival rate moved by more than ``rate_change`` of the rate the
    previous plan used."""
    trigger = plan_trigger(state, previous, mode)
    if trigger == "fleet":
        return True
    if trigger != "arrival_rate":
        return state.has_live()
    assert previous is not None
    used = previous.arrival_rate_rps
    moved = abs(arrival_rate_rps - used) > rate_change * max(used, 0.01)
    return state.has_live() and moved


def in_flight_requests(
    sequences: list[InflightSequence], previous: Plan | None, kv_bytes_per_token: int
) -> list[InFlightRequest]:
    """Requests on instances with a role in the previous plan, by that plan's replica."""
    replica_of = {role.instance_id: role.replica for role in previous.roles} if previous else {}
    return [
        InFlightRequest(
            request_id=sequence.request_id,
            replica=replica_of[sequence.instance_id],
            generated_tokens=sequence.generated_tokens,
            max_tokens=sequence.max_tokens,
            kv_bytes=sequence.context_tokens * kv_bytes_per_token,
        )
        for sequence in sequences
        if sequence.instance_id in replica_of
    ]
