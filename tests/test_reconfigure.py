"""The reconfiguration decisions the scheduler service and the simulator share
(services/scheduler/reconfigure.py, services/planner/fleet.py) and the +O trace's backfill."""

from __future__ import annotations

from pathlib import Path

from loadgen.traces import backfill_nodes, read_fleet_trace
from services.planner.fleet import FleetState, needs_plan, plan_trigger
from services.scheduler.reconfigure import (
    BoundRequest,
    PlannedMove,
    carries_cache,
    least_loaded,
    move_due,
    moves_by_instance,
    planned_moves,
    restarts,
    serves,
)
from shared.messages import (
    DeviceRole,
    FleetEvent,
    InstanceRecord,
    JitDecision,
    ParallelConfig,
    Plan,
    ServingMode,
)


def role(instance: str, replica: int, stage: int = 0) -> DeviceRole:
    return DeviceRole(instance_id=instance, device=0, replica=replica, stage=stage, tp_rank=0,
                      first_layer=stage, last_layer=stage)  # fmt: skip


def plan(
    roles: list[DeviceRole],
    jit: list[JitDecision] = (),  # type: ignore[assignment]
    mode: ServingMode = "spotserve",
    pipeline: int = 1,
    epoch: int = 2,
) -> Plan:
    config = ParallelConfig(data=1, pipeline=pipeline, tensor=1, batch=4, latency_s=1.0,
                            throughput_rps=1.0)  # fmt: skip
    return Plan(epoch=epoch, created_at=0.0, reason="test", fleet_seq=1, config=config,
                roles=roles, transfers=[], jit=list(jit), decision_s=0.0, mode=mode)  # fmt: skip


def decision(request_id: str, instance: str, action: str, steps: int = 0) -> JitDecision:
    return JitDecision(request_id=request_id, instance_id=instance, action=action,  # type: ignore[arg-type]
                       decode_steps=steps, move_by=100.0)  # fmt: skip


def test_only_replica_heads_take_new_requests() -> None:
    pipeline = plan([role("a", 0, 0), role("b", 0, 1), role("c", 1, 0)], pipeline=2)
    assert serves(pipeline, "a") and serves(pipeline, "c")
    assert not serves(pipeline, "b") and not serves(pipeline, "gone")
    assert serves(None, "anything")  # no planner: every executor serves


def test_planned_moves_follow_the_jit_decisions_for_requests_still_there() -> None:
    decisions = [
        decision("finish", "a", "finish", 5),
        decision("migrate", "a", "migrate", 3),
        decision("recompute", "a", "recompute", 7),
        decision("moved-away", "a", "migrate", 3),
    ]
    bound = [
        BoundRequest("finish", "a", 10),
        BoundRequest("migrate", "a", 20),
        BoundRequest("recompute", "a", 30),
        BoundRequest("moved-away", "b", 1),
    ]
    moves = planned_moves(plan([role("b", 0)], decisions), bound)
    assert moves == {
        "finish": PlannedMove(at_tokens=15, move_by=100.0, carry_cache=True),
        "migrate": PlannedMove(at_tokens=23, move_by=100.0, carry_cache=True),
        "recompute": PlannedMove(at_tokens=30, move_by=100.0, carry_cache=False),
    }
    assert set(moves_by_instance(moves, bound)) == {"a"}
    assert move_due(moves["migrate"], 23, 0.0) and move_due(moves["migrate"], 0, 100.0)
    assert not move_due(moves["migrate"], 22, 99.0)


def test_a_cache_travels_only_whole_somewhere_and_when_it_exists() -> None:
    carry = PlannedMove(1, 1.0, carry_cache=True)
    whole = plan([role("a", 0)])
    staged = plan([role("a", 0, 0), role("b", 0, 1)], pipeline=2)
    assert carries_cache(carry, whole, "b", cache_held=True)
    assert not carries_cache(carry, staged, "b", cache_held=True)  # a stage holds a part
    assert not carries_cache(carry, whole, None, cache_held=True)
    assert not carries_cache(carry, whole, "b", cache_held=False)
    assert not carries_cache(PlannedMove(1, 1.0, carry_cache=False), whole, "b", True)


def test_least_loaded_counts_bound_requests() -> None:
    assert least_loaded(["b", "c"], ["b", "b", "c", None, "a"]) == "c"
    assert least_loaded(["c", "b"], []) == "b"  # ties: the smallest id
    assert least_loaded([], ["a"]) is None


def test_what_the_baselines_restart() -> None:
    before = plan([role("a", 0), role("b", 1)], epoch=1)
    after = [role("a", 0)]
    assert restarts(plan(after, mode="spotserve"), before, ["a", "b"]) == set()
    assert restarts(plan(after, mode="reroute"), before, ["a", "b"]) == {"b"}
    assert restarts(plan(after, mode="restart"), before, ["a", "b"]) == {"a", "b"}
    same = plan([role("a", 0), role("b", 1)], mode="restart")
    assert restarts(same, before, ["a", "b"]) == set()  # nothing changed: nothing reloads
    assert plan(after, mode="reroute").weights_from_disk
    assert not plan(after, mode="spotserve").weights_from_disk


def record(name: str) -> InstanceRecord:
    return InstanceRecord(instance_id=name, node=name, devices=1, device_kind="cpu",
                          device_memory_bytes=1, started_at=0.0, heartbeat_at=0.0)  # fmt: skip


def test_fleet_events_and_when_a_plan_is_due() -> None:
    state = FleetState()
    assert plan_trigger(state, None, "spotserve") == "initial"
    state.apply(FleetEvent(kind="joined", instance=record("a"), at=0.0), 1)
    state.apply(FleetEvent(kind="joined", instance=record("b"), at=0.0), 2)
    assert needs_plan(state, None, "spotserve", 0.0, 0.25)
    current = plan([role("a", 0)]).model_copy(update={"fleet_seq": 2, "arrival_rate_rps": 1.0})
    assert not needs_plan(state, current, "spotserve", 1.2, 0.25)  # within 25%
    assert needs_plan(state, current, "spotserve", 1.3, 0.25)
    assert plan_trigger(state, current, "reroute") == "mode"
    state.apply(FleetEvent(kind="preempt-notice", instance=record("a"), at=1.0, deadline=31.0), 3)
    assert plan_trigger(state, current, "spotserve") == "fleet"
    view = state.view(10.0, 1.0, "spotserve")
    assert [i.instance_id for i in view.live] == ["b"]
    assert [d.record.instance_id for d in view.dying] == ["a"]
    state.apply(FleetEvent(kind="lost", instance=record("a"), at=31.0), 4)
    assert "a" in state.gone and not state.view(40.0, 1.0, "spotserve").dying


def test_backfill_nodes_are_the_adds_90_s_after_a_remove(tmp_path: Path) -> None:
    trace = tmp_path / "plus_o.jsonl"
    trace.write_text(
        '[0, "add", {"nodes": ["n0", "n1", "n2"]}]\n'
        '[60000, "remove", {"nodes": ["n0", "n1"]}]\n'
        '[100000, "add", {"nodes": ["n3"]}]\n'
        '[150000, "add", {"nodes": ["n4", "n5", "n6"]}]\n'
        '[200000, "DONE", {"nodes": []}]\n'
    )
    # Two removed at 60 s: two of the three added at 150 s stand in for them.
    assert backfill_nodes(read_fleet_trace(trace)) == {"n4", "n5"}
    assert backfill_nodes(read_fleet_trace(trace), delay_s=40.0) == {"n3"}
