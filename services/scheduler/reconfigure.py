"""The scheduler's decisions when a plan changes the fleet, as pure functions.

The scheduler service (NATS, executors) and the fleet simulator (``loadgen.simulate``) both
call these, so a simulated reconfiguration takes exactly the decisions a live one takes:
which instances take new requests, which requests move off an instance and when, whether a
move carries the KV cache or recomputes it, where it goes, and what the baselines restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shared.messages import Plan


@dataclass(frozen=True)
class PlannedMove:
    at_tokens: int  # generated-token count
    move_by: float  # the planner's clock
    carry_cache: bool  # send the KV cache along ("migrate", an overrun "finish"); else recompute


@dataclass(frozen=True)
class BoundRequest:
    """A request the scheduler holds, with the instance its KV cache is bound to."""

    request_id: str
    instance_id: str | None
    generated_tokens: int


def serves(plan: Plan | None, instance_id: str) -> bool:
    """Whether new requests may go to this instance: it heads a replica (a pipeline's first
    stage; later stages get their work from the stage before). Without a plan, every one."""
    if plan is None:
        return True
    return any(r.instance_id == instance_id and r.stage == 0 for r in plan.roles)


def planned_moves(plan: Plan, requests: Iterable[BoundRequest]) -> dict[str, PlannedMove]:
    """The just-in-time arrangement's moves by request id, for the requests still bound where
    the plan's decision found them. "finish": it should end in place; "migrate": decode on for
    decode_steps, then move; "recompute": move now. Either way it moves by move_by if still
    there (the cost model's estimate may be optimistic). move_by leaves the time to send a
    cache, so a "finish" that overran still takes its cache along; after "recompute" (no such
    time) the new holder recomputes it from the committed tokens."""
    bound = {r.request_id: r for r in requests}
    moves = {}
    for decision in plan.jit:
        request = bound.get(decision.request_id)
        if request is None or request.instance_id != decision.instance_id:
            continue
        steps = decision.decode_steps if decision.action != "recompute" else 0
        moves[decision.request_id] = PlannedMove(
            at_tokens=request.generated_tokens + steps,
            move_by=decision.move_by if decision.move_by is not None else float("inf"),
            carry_cache=decision.action != "recompute",
        )
    return moves


def move_due(move: PlannedMove, generated_tokens: int, now: float) -> bool:
    return generated_tokens >= move.at_tokens or now >= move.move_by


def carries_cache(
    move: PlannedMove, plan: Plan | None, destination: str | None, cache_held: bool
) -> bool:
    """Whether a due move sends the KV cache (else the new holder recomputes it from the
    committed tokens): the plan said so, there is somewhere to send it, there is a cache, and
    each instance holds whole models (a pipeline stage's cache is only part of one)."""
    whole_models = plan is None or plan.config.pipeline == 1
    return move.carry_cache and whole_models and destination is not None and cache_held


def least_loaded(serving: Iterable[str], bound: Iterable[str | None]) -> str | None:
    """The serving instance with the fewest requests bound to it (ties: the smallest id)."""
    counts = {instance_id: 0 for instance_id in serving}
    for instance_id in bound:
        if instance_id in counts:
            counts[instance_id] += 1
    return min(counts, key=lambda i: (counts[i], i)) if counts else None


def restarts(plan: Plan, previous: Plan | None, instances: Iterable[str]) -> set[str]:
    """Instances whose requests the baselines restart from scratch under this plan. Restart
    (reparallelization): a new configuration stops every instance, which reloads, and every
    request starts again. Reroute: what an instance without a role holds restarts at once on
    the others (no use of the grace period). SpotServe: none."""
    instances = list(instances)
    if plan.reloads_everything(previous):
        return set(instances)
    if plan.mode == "reroute":
        with_role = {role.instance_id for role in plan.roles}
        return {i for i in instances if i not in with_role}
    return set()


def restarts_lost_requests(plan: Plan | None) -> bool:
    """Requests of an executor that is lost restart from scratch under the baselines (they
    keep no committed progress); SpotServe recomputes their caches from committed tokens."""
    return plan is not None and plan.mode in ("reroute", "restart")


def moves_by_instance(
    moves: Mapping[str, PlannedMove], requests: Iterable[BoundRequest]
) -> dict[str, dict[str, PlannedMove]]:
    """``planned_moves`` grouped by the instance each request is bound to."""
    where = {r.request_id: r.instance_id for r in requests}
    grouped: dict[str, dict[str, PlannedMove]] = {}
    for request_id, move in moves.items():
        instance_id = where.get(request_id)
        if instance_id is not None:
            grouped.setdefault(instance_id, {})[request_id] = move
    return grouped
