"""The baselines of the SpotServe comparison are modes of the same running system, switched
through admission's admin endpoint: under ``reroute`` a preempted instance's requests restart
from scratch on the others at the notice; under ``restart`` a new configuration reloads every
instance and restarts every request. Either way every stream equals the uninterrupted greedy
output, without a token repeated or missing (regenerated tokens are not sent again)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.discovery import discover
from shared.messages import ModeReply, Plan
from shared.model.tokenizer import TextTokenizer
from shared.subjects import ADMIN_MODE, FLEET_NOTICE, SERVICE_EXECUTOR, executor_step_subject
from tests.helpers import connected, eventually, isolated_cluster
from tests.test_planner_service import all_plans
from tests.test_reparallelization import ENV, finish_and_check, inflight, stream_all

MAX_TOKENS = 200


@pytest.fixture(scope="module")
def mode_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {**ENV, "SPOTSERVE_PLANNER__FILL_SPARE": "true", "SPOTSERVE_PLANNER__RATE_POLL_S": "0.5"}
    with isolated_cluster(tmp_path_factory, "modes", tiny_model_dir, 3, env) as cluster:
        yield cluster


async def set_mode(nc: Client, mode: str) -> Plan:
    reply = await nc.request(ADMIN_MODE, encode({"mode": mode}), timeout=10)
    assert ModeReply.model_validate(decode(reply.data)).mode == mode

    async def plan_under_mode() -> Plan | None:
        plans = await all_plans(nc)
        return plans[-1] if plans and plans[-1].mode == mode else None

    return await eventually(plan_under_mode, f"a plan under {mode}", timeout_s=120)


def log_records(cluster: LocalCluster, name: str, event: str) -> list[dict[str, object]]:
    lines = (cluster.log_dir / f"{name}.log").read_text().splitlines()
    return [json.loads(line) for line in lines if f'"{event}"' in line]


async def preempt_and_check(
    nc: Client, mode: str, prompts: list[str], model_dir: Path, tokenizer: TextTokenizer
) -> str:
    plan = await set_mode(nc, mode)
    assert plan.jit == []
    streams, firsts = await stream_all(SpotserveClient(nc), prompts, MAX_TOKENS)
    holders = sorted({s.instance_id for s in (await inflight(nc)).sequences} - {None})
    victim = holders[0]
    # A long grace period the baselines make no use of.
    await nc.request(FLEET_NOTICE, encode({"instance_id": victim, "grace_s": 30.0}), timeout=30)
    await finish_and_check(streams, firsts, prompts, MAX_TOKENS, model_dir, tokenizer)
    return victim


async def test_modes_are_read_and_set_and_bad_ones_refused(mode_cluster: LocalCluster) -> None:
    async with connected(mode_cluster) as nc:
        reply = await nc.request(ADMIN_MODE, encode({}), timeout=10)
        assert ModeReply.model_validate(decode(reply.data)).mode == "spotserve"
        bad = await nc.request(ADMIN_MODE, encode({"mode": "fastest"}), timeout=10)
        assert (bad.headers or {}).get("Nats-Service-Error-Code") == "400"
        assert "mode" in (bad.headers or {}).get("Nats-Service-Error", "")


async def test_reroute_restarts_a_preempted_instances_requests_at_the_notice(
    mode_cluster: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async with connected(mode_cluster) as nc:
        prompts = [f"Rerouted request {i}" for i in range(4)]
        victim = await preempt_and_check(nc, "reroute", prompts, tiny_model_dir, tokenizer)
    restarted = log_records(mode_cluster, "scheduler", "requests.restarted")
    assert any(r["instance_id"] == victim and r["request_ids"] for r in restarted)
    assert log_records(mode_cluster, "scheduler", "request.moved") == []  # no cache moved


async def test_restart_reloads_every_instance_and_restarts_every_request(
    mode_cluster: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async with connected(mode_cluster) as nc:
        prompts = [f"Restarted request {i}" for i in range(3)]
        before = {
            name: len(log_records(mode_cluster, name, "role.taken"))
            for name in ("executor-0", "executor-1", "executor-2")
        }
        victim = await preempt_and_check(nc, "restart", prompts, tiny_model_dir, tokenizer)
        await set_mode(nc, "spotserve")  # leave the cluster as other tests expect it
    assert log_records(mode_cluster, "scheduler", "plan.restart_everything")
    # The survivors reloaded their weights for the new configuration.
    reloaded = [
        name
        for name, count in before.items()
        if len(log_records(mode_cluster, name, "role.taken")) > count
        and victim != f"instance-{name.removeprefix('executor-')}"
    ]
    assert reloaded


async def test_an_executor_refuses_a_step_for_a_cache_it_does_not_hold(
    mode_cluster: LocalCluster,
) -> None:
    """An executor that reloaded (the restart baseline) or lost a cache must not start a new
    sequence from a decode's single token: the scheduler then recomputes instead."""
    step = {
        "sequences": [
            {"request_id": "ghost", "token_ids": [5], "temperature": 0.0, "top_p": 1.0,
             "seed": 0, "sample_index": 7, "cached_tokens": 7}
        ]
    }  # fmt: skip
    async with connected(mode_cluster) as nc:
        live = await discover(nc, SERVICE_EXECUTOR, window_s=0.5)  # some were preempted above
        instance_id = live[0]["metadata"]["instance_id"]
        reply = await nc.request(executor_step_subject(instance_id), encode(step), timeout=30)
    headers = reply.headers or {}
    assert headers.get("Nats-Service-Error-Code") == "400", headers
    assert "holds 0 positions" in headers.get("Nats-Service-Error", "")
