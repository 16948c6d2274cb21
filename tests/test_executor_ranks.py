"""The executor's tensor-parallel ranks (services/executor/ranks.py): rank 0 here, a real worker
process beside it (gloo), every engine call on both. Greedy tokens equal the single-process
engine's; KV caches leave whole and arrive whole, so they move between M=2 and M=1 engines and
decoding goes on as if nothing happened; a refused call is refused on every rank and the ranks
still agree afterwards; a dead worker is a clear error, not a hang."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.executor.ranks import EngineSpec, RankFailedError, ShardedEngine
from shared.model.engine import Engine, EngineError, SequenceStep
from shared.model.tokenizer import TextTokenizer

PROMPTS = ["Tensor parallel ranks agree", "on every token they", "sample from gathered logits"]
STEPS = 12


@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path) -> EngineSpec:
    return EngineSpec(tiny_model_dir, "cpu", max_slots=4, max_seq_len=None, host_slots=4)


@pytest.fixture(scope="module")
def sharded(spec: EngineSpec) -> Iterator[ShardedEngine]:
    engine = ShardedEngine(spec, 2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, device="cpu", max_slots=4, host_slots=4)


def first_steps(prompts: list[list[int]], prefix: str) -> list[SequenceStep]:
    return [SequenceStep(f"{prefix}{i}", ids, 0.0, 1.0, 0, 0) for i, ids in enumerate(prompts)]


def decode(engine: Engine | ShardedEngine, steps: list[SequenceStep], count: int) -> list[dict]:
    """``count`` iterations from ``steps``; the tokens of each."""
    out = []
    for _ in range(count):
        tokens = engine.step(steps)
        out.append(tokens)
        steps = [
            SequenceStep(s.request_id, [tokens[s.request_id]], 0.0, 1.0, 0, s.sample_index + 1)
            for s in steps
        ]
    return out


def renamed(tokens: list[dict], prefix: str) -> list[dict]:
    return [{prefix + key[1:]: value for key, value in step.items()} for step in tokens]


def test_greedy_tokens_equal_the_single_process_engine(
    sharded: ShardedEngine, reference: Engine, tokenizer: TextTokenizer
) -> None:
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    got = decode(sharded, first_steps(prompts, "s"), STEPS)
    expected = decode(reference, first_steps(prompts, "r"), STEPS)
    assert got == renamed(expected, "s")
    assert sharded.model.layers[0].self_attn.q_proj.weight.shape[0] == 4 * 32  # half the heads
    sharded.release([f"s{i}" for i in range(len(prompts))])
    reference.release([f"r{i}" for i in range(len(prompts))])
    assert sharded.num_free_blocks == sharded.kv_blocks == reference.kv_blocks


def test_kv_caches_move_between_tensor_parallel_degrees(
    sharded: ShardedEngine, reference: Engine, tokenizer: TextTokenizer
) -> None:
    prompt = tokenizer.encode(PROMPTS[0])
    expected = [t["x"] for t in decode(reference, [SequenceStep("x", prompt, 0.0, 1.0, 0, 0)], 8)]
    reference.release(["x"])
    # Four tokens on M=2, the cache to M=1, four more there, back to M=2, the rest there.
    first = [t["x"] for t in decode(sharded, [SequenceStep("x", prompt, 0.0, 1.0, 0, 0)], 4)]
    length, tensors = sharded.export_kv("x")
    assert tensors["0.k"].shape[0] == 4  # every KV head: both ranks' shards
    sharded.release(["x"])
    assert reference.import_kv("x", length, tensors) == "host"
    reference.upload(["x"])
    step = SequenceStep("x", [first[-1]], 0.0, 1.0, 0, 4)
    middle = [t["x"] for t in decode(reference, [step], 2)]
    length, tensors = reference.export_kv("x")
    reference.release(["x"])
    assert sharded.import_kv("x", length, tensors) == "host"
    sharded.upload(["x"])
    step = SequenceStep("x", [middle[-1]], 0.0, 1.0, 0, 6)
    last = [t["x"] for t in decode(sharded, [step], 2)]
    assert first + middle + last == expected
    sharded.offload(["x"])
    assert sharded.offloaded_ids() == ["x"]
    sharded.release(["x"])


def test_a_refused_call_is_refused_everywhere_and_the_ranks_still_agree(
    sharded: ShardedEngine, reference: Engine, tokenizer: TextTokenizer
) -> None:
    with pytest.raises(EngineError, match="not offloaded"):
        sharded.upload(["nobody"])
    with pytest.raises(EngineError):
        sharded.step([SequenceStep("bad", [10**9], 0.0, 1.0, 0, 0)])  # token outside the vocab
    prompts = [tokenizer.encode(PROMPTS[1])]
    assert decode(sharded, first_steps(prompts, "a"), 4) == renamed(
        decode(reference, first_steps(prompts, "b"), 4), "a"
    )
    sharded.release(["a0"])
    reference.release(["b0"])


def test_a_dead_worker_rank_is_a_clear_error(sharded: ShardedEngine) -> None:
    """Last in this module: it kills the shared engine's worker (one process group per process)."""
    sharded.processes[0].kill()
    sharded.processes[0].join(10)
    assert sharded.dead_ranks() == [1]
    with pytest.raises(RankFailedError, match="rank 1"):
        sharded.release(["anything"])  # no collective: the dead pipe answers at once
