"""Tensor-parallel instances in a running system: two executors of M=2 ranks each (real worker
processes, gloo on CPU), the planner choosing M=2 from a profile it measured at that degree.
Requests stream from one instance; it is preempted with a grace period and their KV caches move
whole (both ranks' heads) to the other instance, which splits them over its ranks and decodes
on: every stream equals the single-process greedy output, without gaps or repeats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import encode
from shared.discovery import discover
from shared.messages import Plan
from shared.model.tokenizer import TextTokenizer
from shared.subjects import FLEET_NOTICE, SERVICE_EXECUTOR
from tests.helpers import connected, eventually, isolated_cluster
from tests.test_planner_service import all_plans
from tests.test_reparallelization import ENV, finish_and_check, hf_greedy, inflight, stream_all

PROMPTS = [f"Sharded over two ranks {i}" for i in range(3)]
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def tp_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {
        **ENV,
        "SPOTSERVE_EXECUTOR__TENSOR_PARALLEL": "2",
        "SPOTSERVE_PLANNER__TENSOR_DEGREES": "[2]",
    }
    with isolated_cluster(tmp_path_factory, "tp", tiny_model_dir, 2, env) as cluster:
        yield cluster


async def test_tensor_parallel_instances_serve_and_hand_over_their_caches(
    tp_cluster: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async with connected(tp_cluster) as nc:

        async def tensor_plan() -> Plan | None:
            plans = await all_plans(nc)
            ok = plans and plans[-1].config.tensor == 2 and plans[-1].fleet_seq >= 2
            return plans[-1] if ok else None

        plan = await eventually(tensor_plan, "a plan of M=2 over both instances", timeout_s=240)
        holder = plan.roles[0].instance_id
        # Both ranks of the holder have a role: one group of the instance's two devices.
        assert sorted((r.device, r.tp_rank) for r in plan.roles if r.instance_id == holder) == [
            (0, 0),
            (1, 1),
        ]
        client = SpotserveClient(nc)
        streams, firsts = await stream_all(client, PROMPTS, MAX_TOKENS)
        assert {s.instance_id for s in (await inflight(nc)).sequences} == {holder}

        await nc.request(FLEET_NOTICE, encode({"instance_id": holder, "grace_s": 1.0}), timeout=30)
        await finish_and_check(streams, firsts, PROMPTS, MAX_TOKENS, tiny_model_dir, tokenizer)

        async def holder_gone() -> bool:
            infos = await discover(nc, SERVICE_EXECUTOR, window_s=0.5)
            return holder not in {info["metadata"]["instance_id"] for info in infos}

        await eventually(holder_gone, "the preempted executor to be killed", timeout_s=60)
        prompt = "After the sharded preemption"
        after = await client.generate(prompt, max_tokens=8, temperature=0.0)
        assert after.token_ids == hf_greedy(tiny_model_dir, tokenizer.encode(prompt), 8)

    log = (tp_cluster.log_dir / "scheduler.log").read_text()
    moved = [json.loads(line) for line in log.splitlines() if '"request.moved"' in line]
    assert moved and all(record["with_cache"] for record in moved)
    for index in range(2):
        executor_log = (tp_cluster.log_dir / f"executor-{index}.log").read_text()
        assert '"tensor_parallel": 2' in executor_log
