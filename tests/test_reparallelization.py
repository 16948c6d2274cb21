"""Serving through a preemption, with real processes: monitor -> planner -> scheduler acting on
the plan (new requests only to instances with a role, the just-in-time arrangement moving
requests off the dying instance) -> the instance SIGKILLed at its deadline. Every request
completes with the greedy output of an uninterrupted run, its stream without gaps or repeats."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from nats.aio.client import Client

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.discovery import discover
from shared.messages import InflightReport, Plan, TokenChunk
from shared.model.engine import Engine, SequenceStep
from shared.model.tokenizer import TextTokenizer
from shared.subjects import FLEET_NOTICE, SCHEDULER_INFLIGHT, SERVICE_EXECUTOR
from tests.helpers import connected, eventually, isolated_cluster
from tests.test_end_to_end import hf_greedy as transformers_greedy
from tests.test_planner_service import all_plans

ENV = {
    "SPOTSERVE_MONITOR__HEARTBEAT_S": "0.25",
    "SPOTSERVE_MONITOR__LEASE_S": "3",
    "SPOTSERVE_PLANNER__DEBOUNCE_S": "0.2",
    "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
    "SPOTSERVE_SCHEDULER__DISCOVERY_INTERVAL_S": "0.5",
}
PROMPTS = [f"Preempted request number {i} says" for i in range(4)]
# Long enough that no request can finish inside the short grace periods used here, whatever
# the machine's speed: the just-in-time arrangement must move them.
MAX_TOKENS = 800


@functools.cache
def reference_engine(model_dir: Path) -> Engine:
    return Engine(model_dir, max_slots=1)


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The uninterrupted greedy output: transformers for short outputs, the project's engine
    (equal to transformers, tests/test_end_to_end.py) in-process for long ones."""
    if max_tokens <= 40:
        return transformers_greedy(model_dir, prompt_ids, max_tokens)
    engine = reference_engine(model_dir)
    tokens: list[int] = []
    step = SequenceStep("reference", prompt_ids, 0.0, 1.0, 0, 0)
    try:
        for index in range(max_tokens):
            token = engine.step([step])["reference"]
            tokens.append(token)
            step = SequenceStep("reference", [token], 0.0, 1.0, 0, index + 1)
    finally:
        engine.release(["reference"])
    return tokens


@pytest.fixture(scope="module")
def spot_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    with isolated_cluster(tmp_path_factory, "spot", tiny_model_dir, 2, ENV) as cluster:
        yield cluster


@pytest.fixture
async def snc(spot_cluster: LocalCluster) -> AsyncIterator[Client]:
    async with connected(spot_cluster) as nc:
        yield nc


async def collect(stream: AsyncIterator[TokenChunk], first: TokenChunk) -> list[TokenChunk]:
    chunks = [first]
    async for chunk in stream:
        chunks.append(chunk)
    return chunks


async def inflight(nc: Client) -> InflightReport:
    reply = await nc.request(SCHEDULER_INFLIGHT, b"", timeout=10)
    return InflightReport.model_validate(decode(reply.data))


async def test_requests_stream_through_a_preemption_with_a_grace_period(
    spot_cluster: LocalCluster, snc: Client, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async def serving_plan() -> Plan | None:
        plans = await all_plans(snc)
        return plans[-1] if plans and plans[-1].fleet_seq >= 2 else None

    plan = await eventually(serving_plan, "a plan over both executors", timeout_s=180)
    holder = plan.roles[0].instance_id
    client = SpotserveClient(snc)
    streams = [
        client.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0)
        for prompt in PROMPTS
    ]
    firsts = [await anext(stream) for stream in streams]
    # Only the instance with a role took them.
    report = await inflight(snc)
    assert {s.instance_id for s in report.sequences} == {holder}

    # 2 s: on a loaded machine the planner's reaction ate most of a 1 s grace period, and it
    # rightly chose to recompute (no time left to move a cache), which is not what this tests.
    # On a fast one it may expect them to finish in place; those that overrun move by their
    # move time with their caches all the same.
    reply = await snc.request(
        FLEET_NOTICE, encode({"instance_id": holder, "grace_s": 2.0}), timeout=30
    )
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.headers
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(s, f) for s, f in zip(streams, firsts, strict=True))), 300
    )

    for prompt, chunks in zip(PROMPTS, results, strict=True):
        assert [c.index for c in chunks] == list(range(len(chunks)))  # no gap, no repeat
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == hf_greedy(tiny_model_dir, tokenizer.encode(prompt), MAX_TOKENS)
        assert chunks[-1].finish_reason == "length"

    # The holder is gone (SIGKILL at its deadline); new work is served by the other instance.
    async def holder_gone() -> bool:
        infos = await discover(snc, SERVICE_EXECUTOR, window_s=0.5)
        return holder not in {info["metadata"]["instance_id"] for info in infos}

    await eventually(holder_gone, "the preempted executor to be killed", timeout_s=60)
    after = await client.generate("After the preemption", max_tokens=8, temperature=0.0)
    assert after.token_ids == hf_greedy(tiny_model_dir, tokenizer.encode("After the preemption"), 8)
    log = (spot_cluster.log_dir / "scheduler.log").read_text()
    # The requests left the dying instance by their move time, before its SIGKILL, with their
    # KV caches streamed peer to peer (no prefill recomputed).
    assert '"plan.applied"' in log and '"request.moved"' in log
    assert '"with_cache": true' in log


async def stream_all(
    client: SpotserveClient, prompts: list[str], max_tokens: int
) -> tuple[list[AsyncIterator[TokenChunk]], list[TokenChunk]]:
    streams = [
        client.stream(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        for prompt in prompts
    ]
    return streams, [await anext(stream) for stream in streams]


async def finish_and_check(
    streams: list[AsyncIterator[TokenChunk]],
    firsts: list[TokenChunk],
    prompts: list[str],
    max_tokens: int,
    model_dir: Path,
    tokenizer: TextTokenizer,
) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(s, f) for s, f in zip(streams, firsts, strict=True))), 300
    )
    for prompt, chunks in zip(prompts, results, strict=True):
        assert [c.index for c in chunks] == list(range(len(chunks)))
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == hf_greedy(model_dir, tokenizer.encode(prompt), max_tokens)


async def test_an_instance_joins_then_one_dies_without_grace_while_requests_stream(
    spot_cluster: LocalCluster, snc: Client, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    client = SpotserveClient(snc)
    prompts = [f"Joining while streaming {i}" for i in range(3)]
    streams, firsts = await stream_all(client, prompts, MAX_TOKENS)
    before = await all_plans(snc)
    reply = await snc.request("spotserve.v1.fleet.add", encode({"count": 1}), timeout=60)
    added = decode(reply.data)["instance_ids"][0]

    async def plan_with_added() -> Plan | None:
        plans = await all_plans(snc)
        return plans[-1] if plans[-1].fleet_seq > before[-1].fleet_seq else None

    await eventually(plan_with_added, f"a plan after {added} joined", timeout_s=180)
    await finish_and_check(streams, firsts, prompts, MAX_TOKENS, tiny_model_dir, tokenizer)

    # Now a serving instance dies with no grace at all: the requests it serves resume from
    # their committed tokens elsewhere (the prefill is recomputed), nothing lost or repeated.
    # (Usually one instance serves them all; on a slow machine the planner may use both.)
    streams, firsts = await stream_all(client, prompts, MAX_TOKENS)
    held_by = [s.instance_id for s in (await inflight(snc)).sequences if s.instance_id]
    assert held_by
    victim = max(sorted(set(held_by)), key=held_by.count)
    reply = await snc.request(
        FLEET_NOTICE, encode({"instance_id": victim, "grace_s": 0.0}), timeout=30
    )
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.headers
    await finish_and_check(streams, firsts, prompts, MAX_TOKENS, tiny_model_dir, tokenizer)


@pytest.fixture(scope="module")
def three_instances(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {**ENV, "SPOTSERVE_PLANNER__FILL_SPARE": "true"}  # every instance serves a replica
    with isolated_cluster(tmp_path_factory, "three", tiny_model_dir, 3, env) as cluster:
        yield cluster


async def test_two_preemptions_at_once_while_an_instance_joins(
    three_instances: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async with connected(three_instances) as nc:

        async def three_replicas() -> Plan | None:
            plans = await all_plans(nc)
            last = plans[-1] if plans else None
            return last if last and len({r.instance_id for r in last.roles}) == 3 else None

        await eventually(three_replicas, "a plan with three replicas", timeout_s=180)
        client = SpotserveClient(nc)
        prompts = [f"Two at once {i}" for i in range(6)]
        streams, firsts = await stream_all(client, prompts, MAX_TOKENS)
        serving = sorted({s.instance_id for s in (await inflight(nc)).sequences} - {None})
        assert len(serving) >= 2, serving
        # Two notices at once; their requests move (with their caches) to the third instance
        # while a fourth joins.
        for victim in serving[:2]:
            body = encode({"instance_id": victim, "grace_s": 1.0})
            await nc.request(FLEET_NOTICE, body, timeout=30)
        await nc.request("spotserve.v1.fleet.add", encode({"count": 1}), timeout=60)
        await finish_and_check(streams, firsts, prompts, MAX_TOKENS, tiny_model_dir, tokenizer)


def moved_requests(cluster: LocalCluster) -> list[dict[str, object]]:
    """The scheduler's "request.moved" log records so far."""
    records = []
    for line in (cluster.log_dir / "scheduler.log").read_text().splitlines():
        if '"request.moved"' in line:
            records.append(json.loads(line))
    return records


async def test_a_second_preemption_arrives_while_caches_move(
    three_instances: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async with connected(three_instances) as nc:
        before = await all_plans(nc)
        await nc.request("spotserve.v1.fleet.add", encode({"count": 1}), timeout=60)

        async def three_live_replicas() -> Plan | None:
            plans = await all_plans(nc)
            last = plans[-1]
            fresh = last.fleet_seq > before[-1].fleet_seq
            return last if fresh and len({r.instance_id for r in last.roles}) == 3 else None

        await eventually(three_live_replicas, "three replicas again", timeout_s=180)
        client = SpotserveClient(nc)
        prompts = [f"Second preemption {i}" for i in range(6)]
        streams, firsts = await stream_all(client, prompts, MAX_TOKENS)
        sequences = (await inflight(nc)).sequences
        counts: dict[str, int] = {}
        for sequence in sequences:
            if sequence.instance_id:
                counts[sequence.instance_id] = counts.get(sequence.instance_id, 0) + 1
        first_victim = max(counts, key=counts.__getitem__)
        seen = len(moved_requests(three_instances))
        body = encode({"instance_id": first_victim, "grace_s": 1.0})
        await nc.request(FLEET_NOTICE, body, timeout=30)

        # As soon as requests start leaving it, the instance now serving the most is preempted.
        def left_first_victim() -> list[dict[str, object]]:
            records = moved_requests(three_instances)[seen:]
            return [r for r in records if r["source"] == first_victim]

        await eventually(left_first_victim, "a request moved off the first victim", timeout_s=60)

        async def busiest_other() -> str | None:
            held: dict[str, int] = {}
            for sequence in (await inflight(nc)).sequences:
                if sequence.instance_id not in (None, first_victim):
                    held[sequence.instance_id] = held.get(sequence.instance_id, 0) + 1
            return max(held, key=held.__getitem__) if held else None

        second_victim = await eventually(busiest_other, "requests on another instance")
        body = encode({"instance_id": second_victim, "grace_s": 1.0})
        await nc.request(FLEET_NOTICE, body, timeout=30)
        await finish_and_check(streams, firsts, prompts, MAX_TOKENS, tiny_model_dir, tokenizer)


@pytest.fixture(scope="module")
def small_instances(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    # Instances that register 16 MB of device memory: the tiny model (about 20 MB of weights)
    # fits no single one, so the planner makes a two-stage pipeline across both.
    env = {
        **ENV,
        "SPOTSERVE_EXECUTOR__DEVICE_MEMORY_BYTES": "16000000",
        "SPOTSERVE_PLANNER__MAX_PIPELINE": "4",
        # Prefills' hidden states go through shared.transfer (chunked), decodes' inline.
        "SPOTSERVE_EXECUTOR__STAGE_MESSAGE_BYTES": "16384",
        "SPOTSERVE_LOG__LEVEL": "debug",  # the first stage's per-iteration micro-batch record
    }
    with isolated_cluster(tmp_path_factory, "pipeline", tiny_model_dir, 2, env) as cluster:
        yield cluster


async def test_a_two_stage_pipeline_across_instances_generates_like_one_model(
    small_instances: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    async with connected(small_instances) as nc:

        async def pipeline_plan() -> Plan | None:
            plans = await all_plans(nc)
            return plans[-1] if plans and plans[-1].config.pipeline == 2 else None

        plan = await eventually(pipeline_plan, "a two-stage plan", timeout_s=180)
        stages = sorted(plan.roles, key=lambda role: role.stage)
        assert [(r.first_layer, r.last_layer) for r in stages] == [(0, 1), (2, 3)]

        def roles_taken() -> bool:
            logs = [small_instances.log_dir / f"executor-{i}.log" for i in range(2)]
            return all('"role.taken"' in log.read_text() for log in logs)

        await eventually(roles_taken, "both executors to load their stages", timeout_s=120)
        client = SpotserveClient(nc)
        prompts = [f"Through the pipeline {i}" for i in range(3)]
        streams, firsts = await stream_all(client, prompts, 40)
        # Only the first stage's instance is addressed by the scheduler.
        held = {s.instance_id for s in (await inflight(nc)).sequences} - {None}
        assert held == {stages[0].instance_id}
        await finish_and_check(streams, firsts, prompts, 40, tiny_model_dir, tokenizer)
        # Each iteration's batch went as micro-batches (one per stage), and the second stage
        # still had one while the first computed the next.
        index = stages[0].instance_id.removeprefix("instance-")
        first_log = small_instances.log_dir / f"executor-{index}.log"
        records = [
            json.loads(line)
            for line in first_log.read_text().splitlines()
            if "pipeline.step" in line
        ]
        assert any(record["micro_batches"] == 2 for record in records)
        assert sum(record["overlapped"] for record in records) > 0
        # A long prompt: its hidden states (tokens x dim) are far over the inline limit.
        long_prompt = " ".join(f"word{i}" for i in range(120))
        completion = await client.generate(long_prompt, max_tokens=8, temperature=0.0)
        assert completion.token_ids == hf_greedy(tiny_model_dir, tokenizer.encode(long_prompt), 8)


async def test_a_stage_sends_its_weights_to_a_peer_under_checkpoint_names(
    small_instances: LocalCluster, tiny_model_dir: Path
) -> None:
    """What a new stage holder asks a peer for (the plan's peer-to-peer weight transfers)."""
    from safetensors.torch import load_file

    from shared.messages import WeightsSendCommand
    from shared.subjects import executor_weights_subject
    from shared.transfer import TensorInbox

    nc = await connect(small_instances.nats_url, NatsSettings(), name="t", deadline_s=10)
    inbox = TensorInbox(nc, "test-peer")
    await inbox.start()
    try:
        plan = (await all_plans(nc))[-1]
        last_stage = max(plan.roles, key=lambda role: role.stage)
        command = WeightsSendCommand(layers=[2, 3, 4], destination="test-peer", transfer_id="w1")
        reply = await nc.request(
            executor_weights_subject(last_stage.instance_id), encode(command), timeout=60
        )
        assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.headers
        received = (await inbox.receive("w1", timeout_s=60)).tensors
        source = load_file(str(tiny_model_dir / "model.safetensors"))
        expected = {
            name
            for name in source
            if name.startswith(("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head."))
        }
        assert set(received) == expected
        assert all(torch.equal(received[name], source[name]) for name in expected)
        # Layers it does not hold are refused, clearly.
        command = WeightsSendCommand(layers=[0], destination="test-peer", transfer_id="w2")
        reply = await nc.request(
            executor_weights_subject(last_stage.instance_id), encode(command), timeout=60
        )
        assert (reply.headers or {}).get("Nats-Service-Error-Code") == "404"
    finally:
        await inbox.stop()
        await nc.close()
