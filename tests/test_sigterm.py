"""SIGTERM as a preemption notice (Kubernetes: a spot reclaim reaches the pod as SIGTERM,
terminationGracePeriodSeconds before SIGKILL), with real processes standing in for pods.

The executor holding the requests gets SIGTERM with ``executor.termination_grace_s`` set: it
announces its own preemption (grace - margin) through the monitor exactly as a cloud notice
flows, its readiness check reports it draining (exit 3, which liveness accepts), it keeps
serving while the planner moves its requests, and it exits at the deadline. Every request
completes with the greedy output of an uninterrupted run, without gaps or repeats.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.executor.termination import notice_grace_s
from shared.client import SpotserveClient
from shared.cluster import LocalCluster, ServiceProcess
from shared.health import DRAINING, HEALTHY
from shared.messages import Plan
from shared.model.tokenizer import TextTokenizer
from tests.helpers import connected, eventually, isolated_cluster
from tests.test_planner_service import all_plans
from tests.test_reparallelization import ENV, finish_and_check, inflight, stream_all

PROMPTS = [f"Terminated pod request {i} says" for i in range(2)]
MAX_TOKENS = 800
GRACE_S, MARGIN_S = 6.0, 2.0


@pytest.fixture(scope="module")
def pod_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {
        **ENV,
        "SPOTSERVE_EXECUTOR__TERMINATION_GRACE_S": str(GRACE_S),
        "SPOTSERVE_EXECUTOR__TERMINATION_MARGIN_S": str(MARGIN_S),
    }
    with isolated_cluster(tmp_path_factory, "pods", tiny_model_dir, 2, env) as cluster:
        yield cluster


def test_the_announced_grace_keeps_the_margin_back() -> None:
    assert notice_grace_s(15.0, 2.0) == 13.0
    assert notice_grace_s(1.0, 2.0) == 0.0  # within the margin: stop at once
    assert notice_grace_s(None, 2.0) == 0.0  # not configured: SIGTERM is a clean stop


async def health(executor: ServiceProcess) -> int:
    """``spotserve health executor --this-node`` run as the executor's container would."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.cli",
        "health",
        "executor",
        "--this-node",
        "--timeout",
        "5",
        env=executor.env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 60)


def log_events(path: Path, event: str) -> list[dict[str, object]]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            records.append(record)
    return records


async def test_sigterm_drains_the_executor_through_a_preemption(
    pod_cluster: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async with connected(pod_cluster) as nc:

        async def serving_plan() -> Plan | None:
            plans = await all_plans(nc)
            return plans[-1] if plans and plans[-1].fleet_seq >= 2 else None

        plan = await eventually(serving_plan, "a plan over both executors", timeout_s=180)
        holder = plan.roles[0].instance_id
        executor = pod_cluster.find(f"executor-{holder.removeprefix('instance-')}")
        assert await health(executor) == HEALTHY

        client = SpotserveClient(nc)
        streams, firsts = await stream_all(client, PROMPTS, MAX_TOKENS)
        assert {s.instance_id for s in (await inflight(nc)).sequences} == {holder}

        assert executor.process is not None
        executor.process.send_signal(signal.SIGTERM)
        # Draining: not ready (exit 3), yet alive for liveness; serving on meanwhile.
        assert await health(executor) == DRAINING
        await finish_and_check(streams, firsts, PROMPTS, MAX_TOKENS, tiny_model_dir, tokenizer)

        # It leaves at its deadline (the monitor's SIGKILL stands in for the cloud's there).
        await eventually(lambda: not executor.alive, "the drained executor to exit", 60)

    # The notice flowed through the monitor as a cloud notice does, with grace - margin.
    notices = log_events(pod_cluster.log_dir / "monitor.log", "fleet.notice")
    ours = [n for n in notices if n.get("instance_id") == holder]
    assert [(n["source"], n["outcome"]) for n in ours] == [("sigterm", "new")]
    sent = log_events(pod_cluster.log_dir / f"{executor.log_path.stem}.log", "executor.terminating")
    assert [record["grace_s"] for record in sent] == [GRACE_S - MARGIN_S]
    # The requests moved to the other instance before the deadline, with their KV caches.
    scheduler_log = (pod_cluster.log_dir / "scheduler.log").read_text(encoding="utf-8")
    assert '"request.moved"' in scheduler_log
