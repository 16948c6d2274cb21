"""The planner service in a real cluster: fleet events in, epoch-numbered plans out (durably,
in order, continued across a planner restart), a preemption notice moving roles off the dying
instance, the arrival rate from admission, and the publish guard against a racing planner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError

from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.messages import ArrivalRate, InflightReport, InflightSequence, Plan
from shared.subjects import (
    ARRIVAL_RATE_KEY,
    FLEET_NOTICE,
    PLANS_STREAM,
    PLANS_SUBJECT,
    SCHEDULER_INFLIGHT,
    load_bucket,
)
from tests.helpers import connected, eventually, isolated_cluster

ENV = {
    "SPOTSERVE_MONITOR__HEARTBEAT_S": "0.25",
    "SPOTSERVE_MONITOR__LEASE_S": "3",
    "SPOTSERVE_PLANNER__DEBOUNCE_S": "0.3",
    "SPOTSERVE_ADMISSION__RATE_INTERVAL_S": "0.5",
    "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
    "SPOTSERVE_EXECUTOR__MAX_SLOTS": "2",
}


@pytest.fixture(scope="module")
def planning_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    with isolated_cluster(tmp_path_factory, "planner", tiny_model_dir, 2, ENV) as cluster:
        yield cluster


@pytest.fixture
async def pnc(planning_cluster: LocalCluster) -> AsyncIterator[Client]:
    async with connected(planning_cluster) as nc:
        yield nc


async def all_plans(nc: Client) -> list[Plan]:
    js = nc.jetstream(timeout=10)
    subscription = await js.subscribe(
        PLANS_SUBJECT, stream=PLANS_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    plans = []
    try:
        while True:
            try:
                message = await subscription.next_msg(timeout=0.5)
            except TimeoutError:
                return plans
            plans.append(Plan.model_validate(decode(message.data)))
    finally:
        await subscription.unsubscribe()


def assert_epochs_continue(plans: list[Plan]) -> None:
    assert [plan.epoch for plan in plans] == list(range(1, len(plans) + 1))
    fleet_seqs = [plan.fleet_seq for plan in plans]
    assert fleet_seqs == sorted(fleet_seqs)


async def executor_ids(cluster: LocalCluster, nc: Client) -> list[str]:
    from shared.discovery import discover
    from shared.subjects import SERVICE_EXECUTOR

    infos = await eventually(
        lambda: _two(discover(nc, SERVICE_EXECUTOR, window_s=0.5)), "two executors"
    )
    return sorted(info["metadata"]["instance_id"] for info in infos)


async def _two(found: object) -> list[dict[str, object]] | None:
    infos = await found  # type: ignore[misc]
    return infos if len(infos) >= 2 else None


async def test_plan_for_the_live_fleet_then_a_preemption_moves_roles_off(
    planning_cluster: LocalCluster, pnc: Client
) -> None:
    instances = await executor_ids(planning_cluster, pnc)

    async def both_joined() -> Plan | None:
        plans = await all_plans(pnc)
        return plans[-1] if plans and plans[-1].fleet_seq >= 2 else None

    first = await eventually(both_joined, "a plan after both executors joined", timeout_s=180)
    assert first.roles and {role.instance_id for role in first.roles} <= set(instances)
    assert first.config.devices == len(first.roles)
    # The tiny model fits one instance, and no load is arriving: the fewest instances serve it.
    assert first.config.pipeline == 1 and first.config.tensor == 1
    holder = first.roles[0].instance_id
    other = next(i for i in instances if i != holder)
    # Long requests in flight on both instances while the notice arrives.
    client = SpotserveClient(pnc)
    streams = [client.stream(f"long {i}", max_tokens=1000, ignore_eos=True) for i in range(2)]
    for stream in streams:
        await anext(stream)

    async def on_holder() -> list[InflightSequence] | None:
        reply = await pnc.request(SCHEDULER_INFLIGHT, b"", timeout=10)
        report = InflightReport.model_validate(decode(reply.data))
        return [s for s in report.sequences if s.instance_id == holder] or None

    served_by_holder = await eventually(on_holder, f"a request on {holder}")

    reply = await pnc.request(
        FLEET_NOTICE, encode({"instance_id": holder, "grace_s": 30.0}), timeout=30
    )
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.headers

    async def moved() -> Plan | None:
        # The plan that handles the notice (later ones may follow, e.g. on a new arrival rate).
        later = [p for p in await all_plans(pnc) if p.fleet_seq > first.fleet_seq]
        return later[0] if later else None

    second = await eventually(moved, "a plan after the preemption notice", timeout_s=60)
    assert {role.instance_id for role in second.roles} == {other}
    # The new holder gets every layer it lacks, off the dying instance (it is still alive
    # within its grace period) or from the loader; nothing is sourced from elsewhere.
    sources = {t.source_instance for t in second.transfers}
    assert sources <= {holder, None}
    assert {t.instance_id for t in second.transfers} <= {other}
    assert "dying" in second.reason
    # Just-in-time arrangement of the dying instance's requests: a 30 s grace period is
    # enough to finish or to decode on and then move the cache; nothing recomputes.
    decisions = {d.request_id: d for d in second.jit}
    for sequence in served_by_holder:
        decision = decisions[sequence.request_id]
        assert decision.instance_id == holder and decision.action in ("finish", "migrate")
        assert decision.decode_steps > 0
    assert_epochs_continue(await all_plans(pnc))
    for stream in streams:
        await stream.aclose()


async def test_a_restarted_planner_continues_the_epochs_without_replanning(
    planning_cluster: LocalCluster, pnc: Client
) -> None:
    before = await eventually(lambda: all_plans(pnc), "plans")
    planning_cluster.kill("planner")
    planning_cluster.restart("planner")
    from shared.discovery import discover
    from shared.subjects import SERVICE_PLANNER

    await eventually(
        lambda: discover(pnc, SERVICE_PLANNER, verb="PING", window_s=0.3), "the planner again"
    )
    # A new event after the restart: an added instance joins; the next plan is epoch n+1.
    reply = await pnc.request("spotserve.v1.fleet.add", encode({"count": 1}), timeout=60)
    added = decode(reply.data)["instance_ids"][0]

    async def next_plan() -> list[Plan] | None:
        plans = await all_plans(pnc)
        return plans if plans[-1].fleet_seq > before[-1].fleet_seq else None

    plans = await eventually(next_plan, f"a plan after {added} joined", timeout_s=180)
    assert_epochs_continue(plans)
    assert plans[: len(before)] == before  # nothing re-published or rewritten


async def test_a_racing_planner_cannot_fork_the_epochs(
    planning_cluster: LocalCluster, pnc: Client
) -> None:
    plans = await eventually(lambda: all_plans(pnc), "plans")
    js = pnc.jetstream(timeout=10)
    stale = plans[-1].model_copy(update={"epoch": plans[-1].epoch + 1})
    with pytest.raises(APIError, match="wrong last sequence"):
        # A planner that has not seen the latest plan publishes after an older sequence.
        await js.publish(
            PLANS_SUBJECT,
            encode(stale),
            headers={
                "Nats-Msg-Id": f"plan-race-{stale.epoch}",
                "Nats-Expected-Last-Subject-Sequence": "1",
            },
        )
    after = await all_plans(pnc)
    assert after[: len(plans)] == plans  # the racing plan was not appended (the planner's
    assert_epochs_continue(after)  # own later ones, e.g. on a new arrival rate, may be)


async def test_admission_publishes_the_arrival_rate(
    planning_cluster: LocalCluster, pnc: Client
) -> None:
    client = SpotserveClient(pnc)
    await asyncio.gather(
        *(client.generate(f"rate {i}", max_tokens=2, temperature=0.0) for i in range(3))
    )
    bucket = await load_bucket(pnc.jetstream(timeout=10))

    async def measured() -> ArrivalRate | None:
        entry = await bucket.get(ARRIVAL_RATE_KEY)
        rate = ArrivalRate.model_validate(decode(entry.value or b""))
        return rate if rate.requests_per_s > 0 else None

    rate = await eventually(measured, "a non-zero arrival rate")
    assert rate.window_s > 0
