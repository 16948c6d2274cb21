"""KV-cache offload/upload (engine), memory planning (scheduler), and the whole system under
memory pressure with skip-join MLFQ: nothing crashes, every request finishes, greedy output is
identical to FCFS without offloading."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.scheduler.kvmemory import MemoryPlan, apply_before_step, plan_memory
from services.scheduler.policy import ExecutorView
from services.scheduler.sequence import Sequence
from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.config import NatsSettings
from shared.messages import AcceptedRequest
from shared.model.engine import (
    Engine,
    HostSwapFullError,
    InvalidStepError,
    NoFreeBlocksError,
    SequenceStep,
    UnknownSequenceError,
)
from shared.model.tokenizer import IncrementalDetokenizer, TextTokenizer
from shared.rpc import BadRequest
from tests.helpers import isolated_cluster

# ---- engine ----------------------------------------------------------------------------


def greedy(request_id: str, token: int, index: int) -> SequenceStep:
    return SequenceStep(request_id, [token], 0.0, 1.0, 0, index)


@pytest.mark.parametrize("host_slots", [0, 2])
def test_a_kv_cache_exported_to_another_engine_decodes_on_identically(
    tiny_model_dir: Path, host_slots: int
) -> None:
    source = Engine(tiny_model_dir, max_slots=2, host_slots=2)
    destination = Engine(tiny_model_dir, max_slots=2, host_slots=host_slots)
    token = source.step([SequenceStep("a", list(range(5, 60)), 0.0, 1.0, 0, 0)])["a"]
    for index in range(1, 4):
        token = source.step([greedy("a", token, index)])["a"]
    length, tensors = source.export_kv("a")
    assert length == 58 and set(tensors) == {f"{i}.{kv}" for i in range(4) for kv in "kv"}
    # The codec round trip an executor-to-executor transfer makes.
    from shared.codec import decode, encode

    tensors = decode(encode(tensors))
    landed = destination.import_kv("a", length, tensors)
    assert landed == ("host" if host_slots else "device")
    if landed == "host":
        destination.upload(["a"])
    here, there = token, token
    for index in range(4, 20):
        here = source.step([greedy("a", here, index)])["a"]
        there = destination.step([greedy("a", there, index)])["a"]
        assert here == there
    with pytest.raises(InvalidStepError, match="already has a KV cache"):
        destination.import_kv("a", length, tensors)
    tensors.pop("3.v")
    with pytest.raises(InvalidStepError, match="layer 3"):
        destination.import_kv("b", length, tensors)
    with pytest.raises(UnknownSequenceError):
        source.export_kv("nope")


def test_offload_then_upload_is_bit_exact(tiny_model_dir: Path) -> None:
    engine = Engine(tiny_model_dir, max_slots=2, host_slots=2)
    first = engine.step([SequenceStep("a", list(range(5, 60)), 0.0, 1.0, 0, 0)])
    before = engine.cache.copy_out(engine._sequences["a"].blocks, 55, pin_memory=False)
    engine.offload(["a"])
    assert engine.num_free_blocks == engine.kv_blocks and engine.offloaded_ids() == ["a"]
    # Other sequences overwrite the freed blocks meanwhile.
    engine.step([SequenceStep("c", list(range(7, 30)), 0.0, 1.0, 0, 0)])
    engine.step([SequenceStep("b", list(range(9, 80)), 0.0, 1.0, 0, 0)])
    engine.release(["b"])
    engine.upload(["a"])
    # Uploaded into other blocks than it left (c took the first ones), bit for bit.
    assert engine._sequences["a"].blocks != list(range(4))
    after = engine.cache.copy_out(engine._sequences["a"].blocks, 55, pin_memory=False)
    for (k, v), (k2, v2) in zip(before, after, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    swapped = engine.step([greedy("a", first["a"], 1)])

    reference = Engine(tiny_model_dir, max_slots=1)
    token = reference.step([SequenceStep("a", list(range(5, 60)), 0.0, 1.0, 0, 0)])["a"]
    assert reference.step([greedy("a", token, 1)]) == swapped


def test_paged_cache_generates_what_the_slotted_one_does(tiny_model_dir: Path) -> None:
    # Blocks of the whole context length are the slotted layout: one block per sequence. The
    # same ragged schedule (new sequences joining, chunked prefills, offload and upload, a
    # release reusing memory) must sample the same tokens, greedy and seeded.
    def run(engine: Engine) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        prompts = {"a": list(range(5, 40)), "b": list(range(9, 14)), "c": list(range(3, 60))}

        def step(names: str) -> None:
            batch = []
            for name in names:
                tokens = [out[name][-1]] if out[name] else prompts[name]
                temperature = 0.0 if name == "a" else 0.9
                batch.append(SequenceStep(name, tokens, temperature, 0.9, 7, len(out[name])))
            for name, token in engine.step(batch).items():
                out[name].append(token)

        for _ in range(6):
            step("a")
        for _ in range(20):
            step("ab")
        engine.offload(["a"])
        step("c")
        engine.release(["b"])
        engine.upload(["a"])
        for _ in range(15):
            step("ac")
        return out

    slotted = Engine(tiny_model_dir, max_slots=3, max_seq_len=96, block_size=96, host_slots=1)
    paged = Engine(tiny_model_dir, max_seq_len=96, block_size=4, kv_blocks=40, host_slots=1)
    assert slotted.kv_blocks == 3 and paged.block_size == 4
    assert run(paged) == run(slotted)


def test_swap_errors_are_clear_and_change_nothing(tiny_model_dir: Path) -> None:
    engine = Engine(tiny_model_dir, max_slots=1, max_seq_len=32, host_slots=1)
    engine.step([SequenceStep("a", [5, 6, 7], 0.0, 1.0, 0, 0)])
    with pytest.raises(UnknownSequenceError, match="without a KV cache"):
        engine.offload(["nope"])
    engine.offload(["a"])
    with pytest.raises(InvalidStepError, match="upload it first"):
        engine.step([greedy("a", 5, 1)])
    engine.step([SequenceStep("b", list(range(5, 22)), 0.0, 1.0, 0, 0)])  # both blocks
    with pytest.raises(HostSwapFullError, match="host swap"):
        engine.offload(["b"])
    with pytest.raises(NoFreeBlocksError, match="needs 1 KV cache blocks, only 0 of 2"):
        engine.upload(["a"])
    with pytest.raises(UnknownSequenceError, match="not offloaded"):
        engine.upload(["b"])
    assert engine.offloaded_ids() == ["a"] and engine.has_sequence("b")
    engine.release(["a", "b"])
    assert engine.sequence_ids() == [] and engine.num_free_blocks == 2


# ---- planning --------------------------------------------------------------------------


def make_sequence(
    tokenizer: TextTokenizer, name: str, executor: str | None, where: str, generated: int = 0
) -> Sequence:
    """A 3-token prompt; with a cache, ``generated`` tokens so far, all cached but the last."""
    request = AcceptedRequest(
        request_id=name, prompt_token_ids=[1, 5, 6], max_tokens=8, temperature=0.0, top_p=1.0,
        seed=0, stop=[], stream=True, ignore_eos=True, reply_subject=None, encoding="msgpack",
        accepted_at=0.0,
    )  # fmt: skip
    sequence = Sequence(request, message=None, detokenizer=IncrementalDetokenizer(tokenizer, []))  # type: ignore[arg-type]
    if executor is not None:
        sequence.bind_to(executor)
    if where == "device":
        sequence.cache_on_device()
    elif where == "host":
        sequence.cache_on_host()
    if where != "none":
        sequence.generated = [7] * generated
        sequence.cached_tokens = 3 + generated - 1 if generated else 3
    return sequence


def names(sequences: list[Sequence]) -> list[str]:
    return [s.request_id for s in sequences]


def test_plan_offloads_the_least_urgent_and_prefetches_the_next(tokenizer: TextTokenizer) -> None:
    view = ExecutorView("x", max_batch_size=2, kv_blocks=3, block_size=4, host_slots=4)
    # Priority order: n1 (new), h1 (on host), d1, d2, d3 (on device), h2 (on host).
    n1 = make_sequence(tokenizer, "n1", None, "none")
    h1 = make_sequence(tokenizer, "h1", "x", "host")
    d1, d2, d3 = (make_sequence(tokenizer, f"d{i}", "x", "device") for i in (1, 2, 3))
    h2 = make_sequence(tokenizer, "h2", "x", "host")
    n1.bind_to("x")  # bound by schedule()
    plan = plan_memory(view, [n1, h1], [n1, h1, d1, d2, d3, h2])
    # Two blocks needed, none free: the two least urgent resident ones leave.
    assert names(plan.offload) == ["d3", "d2"]
    assert names(plan.upload) == ["h1"]
    assert plan.drop == []
    # After the step: n1, h1, d1 resident; no block left for prefetching.
    assert plan.prefetch == []
    apply_before_step(plan)
    assert (d3.kv_location, h1.kv_location) == ("host", "device")


def test_plan_drops_when_the_host_swap_is_full(tokenizer: TextTokenizer) -> None:
    view = ExecutorView("x", max_batch_size=1, kv_blocks=1, block_size=4, host_slots=0)
    new = make_sequence(tokenizer, "new", "x", "none")
    old = make_sequence(tokenizer, "old", "x", "device")
    plan = plan_memory(view, [new], [new, old])
    assert plan.offload == [] and names(plan.drop) == ["old"]
    apply_before_step(plan)
    assert old.executor is None and old.kv_location == "none" and old.cached_tokens == 0


def test_plan_prefetches_next_in_line_into_free_blocks(tokenizer: TextTokenizer) -> None:
    view = ExecutorView("x", max_batch_size=1, kv_blocks=3, block_size=4, host_slots=4)
    running = make_sequence(tokenizer, "run", "x", "device")
    nxt = make_sequence(tokenizer, "next", "x", "host")
    other = make_sequence(tokenizer, "elsewhere", "y", "host")
    plan = plan_memory(view, [running], [running, other, nxt])
    assert plan == MemoryPlan(batch=[running], prefetch=[nxt])


# ---- the system under memory pressure --------------------------------------------------

PROMPTS = [f"Request number {i} " + "with more words " * (i % 4) for i in range(8)]
LENGTHS = [6, 30, 10, 24, 4, 18, 12, 26]  # the longest takes 64 positions


@pytest.fixture(scope="module")
def pressure_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {
        "SPOTSERVE_SCHEDULER__POLICY": "skip-join-mlfq",
        # Tiny quanta: jobs get demoted and preempted after a few iterations.
        "SPOTSERVE_SCHEDULER__MLFQ__BASE_QUANTUM_S": "0.002",
        "SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": "2",
        # Far less KV memory than the load: 8 blocks of 8 positions, one context (a request
        # takes 2-8; their prompts alone take 28), room for 2 offloaded caches.
        "SPOTSERVE_EXECUTOR__MAX_SEQ_LEN": "64",
        "SPOTSERVE_EXECUTOR__KV_BLOCK_SIZE": "8",
        "SPOTSERVE_EXECUTOR__KV_BLOCKS": "8",
        "SPOTSERVE_EXECUTOR__HOST_KV_SLOTS": "2",
        "SPOTSERVE_LOG__LEVEL": "debug",
    }
    with isolated_cluster(tmp_path_factory, "pressure", tiny_model_dir, 1, env) as cluster:
        yield cluster


async def run_prompts(nats_url: str) -> list[list[int]]:
    nc = await connect(nats_url, NatsSettings(), name="pressure-tests", deadline_s=10)
    client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
    try:
        completions = await asyncio.gather(
            *(
                client.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
                for prompt, n in zip(PROMPTS, LENGTHS, strict=True)
            )
        )
    finally:
        await nc.close()
    return [c.token_ids for c in completions]


async def test_memory_pressure_every_request_finishes_identically(
    pressure_cluster: LocalCluster, cluster: LocalCluster
) -> None:
    reference = await run_prompts(cluster.nats_url)  # the session cluster: FCFS, no pressure
    got = await run_prompts(pressure_cluster.nats_url)
    assert [len(tokens) for tokens in got] == LENGTHS
    assert got == reference
    steps = [
        json.loads(line)
        for line in (pressure_cluster.log_dir / "scheduler.log").open()
        if '"step.done"' in line
    ]
    # The point of the test: caches really moved (offloaded, dropped, uploaded).
    assert sum(step["offloaded"] for step in steps) > 0
    assert sum(step["uploaded"] for step in steps) > 0
    assert sum(step["dropped"] for step in steps) > 0
    # The scheduler's memory accounting matched the executor's: no step was refused.
    assert '"step.failed"' not in (pressure_cluster.log_dir / "scheduler.log").read_text()


def test_plan_counts_blocks_as_sequences_grow(tokenizer: TextTokenizer) -> None:
    view = ExecutorView("x", max_batch_size=2, kv_blocks=4, block_size=4, host_slots=4)
    # 5 tokens after this step (3 + 2 generated): a second block; the new one takes one.
    growing = make_sequence(tokenizer, "growing", "x", "device", generated=2)
    new = make_sequence(tokenizer, "new", "x", "none")
    idle = [make_sequence(tokenizer, f"idle{i}", "x", "device", generated=1) for i in (1, 2)]
    plan = plan_memory(view, [growing, new], [growing, new, *idle])
    # 2 + 1 for the batch, 2 held by the idle ones: one of them (the least urgent) leaves.
    assert names(plan.batch) == ["growing", "new"] and names(plan.offload) == ["idle2"]
    # A batch whose own growth exceeds the cache runs its longest fitting prefix.
    small = ExecutorView("x", max_batch_size=2, kv_blocks=2, block_size=4, host_slots=4)
    plan = plan_memory(small, [growing, new], [growing, new, *idle])
    assert names(plan.batch) == ["growing"] and names(plan.offload) == ["idle2", "idle1"]
    # What is prefetched must fit the blocks left: a 2-block cache does not fit 1.
    parked = make_sequence(tokenizer, "parked", "x", "host", generated=3)
    plan = plan_memory(view, [new], [new, *idle, parked])
    assert plan.prefetch == [] and plan.offload == []
    plan = plan_memory(view, [new], [new, idle[0], parked])
    assert names(plan.prefetch) == ["parked"]


def test_plan_counts_host_room_before_the_uploads_leave(tokenizer: TextTokenizer) -> None:
    # The executor offloads first: a cache about to be uploaded still occupies the host swap.
    view = ExecutorView("x", max_batch_size=2, kv_blocks=2, block_size=4, host_slots=1)
    back = make_sequence(tokenizer, "back", "x", "host")
    new = make_sequence(tokenizer, "new", "x", "none")
    old1 = make_sequence(tokenizer, "old1", "x", "device")
    old2 = make_sequence(tokenizer, "old2", "x", "device")
    plan = plan_memory(view, [back, new], [back, new, old1, old2])
    assert names(plan.upload) == ["back"]
    assert plan.offload == [] and names(plan.drop) == ["old2", "old1"]


async def test_a_request_over_the_executors_context_gets_a_clear_error(
    pressure_cluster: LocalCluster,
) -> None:
    # Admission checks the model's context; this executor caps it at 64 positions.
    nc = await connect(pressure_cluster.nats_url, NatsSettings(), name="too-long", deadline_s=10)
    client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
    try:
        with pytest.raises(BadRequest, match="is 65 tokens, over the context length 64"):
            await client.generate(PROMPTS[7], max_tokens=27, temperature=0.0, ignore_eos=True)
        # The scheduler goes on serving.
        completion = await client.generate(PROMPTS[7], max_tokens=26, temperature=0.0)
        assert len(completion.token_ids) > 0
    finally:
        await nc.close()
