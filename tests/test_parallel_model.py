"""Pipeline stages and tensor parallelism of the model: real forward passes on the tiny model.

- P stages chained in one process, the hidden states between them through a codec round trip (as
  over NATS), generate exactly the single engine's tokens: ragged batches, two micro-batches per
  stage, sequences joining, leaving, offloaded and uploaded midway, greedy and seeded sampling.
- A stage reads only its own tensors (byte ranges of a converted checkpoint) and caches only its
  layers.
- Tensor parallel M=2 in two processes (gloo): logits within 1e-4 relative of the reference,
  greedy tokens equal, the shards read from a ``--tp 2`` checkpoint equal those cut from the whole
  tensors, the KV cache holds the rank's heads; and P=2 x M=2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from shared.codec import decode, encode
from shared.loading import reader
from shared.loading.format import convert, read_index
from shared.model.engine import (
    Engine,
    EngineError,
    InvalidStepError,
    SequenceStep,
    StageBatch,
    StageResult,
)
from shared.model.parallel import TensorParallel, run_ranks
from shared.model.tokenizer import TextTokenizer

PROMPTS = [
    "Hello world, this is a test.",
    "Spot instances are cheap but can be taken away",
    "café naïve über 中文",
    "The " * 30,
    "a",
    "Pipelines pass hidden states from stage to stage.",
]
STAGINGS = {
    "P2": [(0, 1), (2, 3)],
    "P4": [(0, 0), (1, 1), (2, 2), (3, 3)],
    "P2-uneven": [(0, 2), (3, 3)],
}
TP_STEPS = 16


@pytest.fixture(scope="module")
def prompts(tokenizer: TextTokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in PROMPTS]


@pytest.fixture(scope="module")
def converted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The tiny model in the loading-optimized format, tensor-parallel degree 1 and 2."""
    root = tmp_path_factory.mktemp("parallel-converted")
    for degree in (1, 2):
        convert(tiny_model_dir, root / f"tp{degree}", tp_degree=degree)
    return {degree: root / f"tp{degree}" for degree in (1, 2)}


@pytest.fixture(scope="module")
def biased_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF Llama with q/k/v/o biases and a tied head: column- and row-parallel biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_bias=True,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    directory = tmp_path_factory.mktemp("biased") / "llama"
    model.save_pretrained(directory)
    return directory


def relay(batch: StageBatch) -> StageBatch:
    """What the executor does between stages: encode for NATS, decode on the other side."""
    return StageBatch.from_wire(decode(encode(batch.to_wire())))


def run_pipeline(stages: list[Engine], seqs: list[SequenceStep]) -> StageResult:
    batch = StageBatch(seqs)
    for stage in stages:
        result = stage.run_stage(batch)
        if result.next is not None:
            batch = relay(result.next)
    return result


def step_of(request_id: str, tokens: list[int], done: int, sampled: bool) -> SequenceStep:
    if sampled:
        return SequenceStep(request_id, tokens, 0.8, 0.9, 1234 + int(request_id[1:]), done)
    return SequenceStep(request_id, tokens, 0.0, 1.0, 0, done)


# ---------------------------------------------------------------------------------------------
# Pipeline stages


@pytest.mark.parametrize("staging", list(STAGINGS))
def test_pipeline_generates_like_one_engine(
    tiny_model_dir: Path, converted: dict[int, Path], prompts: list[list[int]], staging: str
) -> None:
    """Two micro-batches, each run through every stage in turn (stage s runs micro-batch 0, then
    1, before stage s+1 does), with joins, a release, an offload/upload and a new arrival."""
    source = converted[1] if staging == "P2" else tiny_model_dir  # both loaders
    stages = [
        Engine(source, device="cpu", max_slots=5, host_slots=1, layers=layers)
        for layers in STAGINGS[staging]
    ]
    reference = Engine(tiny_model_dir, device="cpu", max_slots=5, host_slots=1)
    # request -> (micro-batch, first step, tokens to generate, sampled)
    plan = {
        "r0": (0, 0, 10, False),
        "r1": (0, 0, 4, False),  # released after step 3: its slot goes to r5
        "r2": (1, 0, 10, True),
        "r3": (1, 2, 8, False),  # joins late
        "r4": (1, 3, 7, False),
        "r5": (0, 5, 6, False),  # arrives after r1 left
    }
    out: dict[str, list[int]] = {rid: [] for rid in plan}
    for step in range(14):
        if step == 6:  # r0 waits in host memory for one step, on every stage alike
            for engine in [reference, *stages]:
                engine.offload(["r0"])
        if step == 7:
            for engine in [reference, *stages]:
                engine.upload(["r0"])
        micro_batches: dict[int, list[SequenceStep]] = {}
        for micro in (0, 1):
            seqs = [
                step_of(
                    rid, [out[rid][-1]] if out[rid] else prompts[int(rid[1:])], len(out[rid]), s
                )
                for rid, (mb, start, count, s) in plan.items()
                if mb == micro and start <= step and len(out[rid]) < count
                if not (step == 6 and rid == "r0")  # offloaded
            ]
            if seqs:
                micro_batches[micro] = seqs
        # As pipelined: each stage runs every micro-batch before the next stage runs any.
        flowing = {micro: StageBatch(seqs) for micro, seqs in micro_batches.items()}
        results: dict[int, StageResult] = {}
        for stage in stages:
            for micro, batch in flowing.items():
                result = stage.run_stage(batch)
                if result.next is not None:
                    flowing[micro] = relay(result.next)
                results[micro] = result
        for micro, seqs in micro_batches.items():
            expected, got = reference.run_stage(StageBatch(seqs)), results[micro]
            assert got.tokens == expected.tokens, f"step {step}, micro-batch {micro}"
            assert got.logits is not None and expected.logits is not None
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
            for rid, token in got.tokens.items():
                out[rid].append(token)
        finished = [rid for rid, (_, _, count, _) in plan.items() if len(out[rid]) == count]
        for engine in [reference, *stages]:
            engine.release(finished)
    assert all(len(out[rid]) == count for rid, (_, _, count, _) in plan.items())
    for stage in stages:
        assert stage.num_free_blocks == stage.kv_blocks and not stage.sequence_ids()
    # The run_stage path of the reference equals its plain step() path too.
    plain = Engine(tiny_model_dir, device="cpu", max_slots=1)
    tokens = [plain.step([step_of("r0", prompts[0], 0, False)])["r0"]]
    for i in range(1, 10):
        tokens.append(plain.step([step_of("r0", [tokens[-1]], i, False)])["r0"])
    assert tokens == out["r0"]


def test_stage_checks_what_it_receives(tiny_model_dir: Path) -> None:
    first = Engine(tiny_model_dir, device="cpu", max_slots=2, layers=(0, 1))
    last = Engine(tiny_model_dir, device="cpu", max_slots=2, layers=(2, 3))
    assert (first.is_first_stage, first.is_last_stage, last.layers) == (True, False, (2, 3))
    seqs = [step_of("a", [1, 5, 6], 0, False), step_of("b", [1, 7], 0, False)]
    with pytest.raises(EngineError, match="use run_stage"):
        first.step(seqs)
    handed = first.run_stage(StageBatch(seqs)).next
    assert handed is not None and handed.positions == [0, 0]
    assert handed.hidden is not None and handed.hidden.shape == (5, first.model.args.dim)

    def refused(batch: StageBatch, engine: Engine, match: str) -> None:
        before = (engine.num_free_blocks, engine.sequence_length("a"))
        with pytest.raises(InvalidStepError, match=match):
            engine.run_stage(batch)
        assert (engine.num_free_blocks, engine.sequence_length("a")) == before

    refused(StageBatch(seqs, hidden=handed.hidden), first, "not hidden states")
    refused(StageBatch(seqs), last, r"needs hidden states \[5, 256\]")
    refused(StageBatch(seqs, [0, 0], handed.hidden[:4]), last, "needs hidden states")
    refused(StageBatch(seqs, [0, 3], handed.hidden), last, "the batch says")
    assert last.run_stage(relay(handed)).tokens is not None
    # Both stages now hold a and b at 3 and 2 positions; an out-of-step batch is refused.
    following = [step_of("a", [9], 1, False), step_of("b", [9], 1, False)]
    nxt = first.run_stage(StageBatch(following)).next
    assert nxt is not None and nxt.positions == [3, 2]
    with pytest.raises(InvalidStepError, match="the batch says"):
        last.run_stage(StageBatch(following, [3, 3], nxt.hidden))
    assert last.run_stage(nxt).tokens is not None
    assert last.sequence_length("a") == first.sequence_length("a") == 4
    # An empty micro-batch passes through.
    empty = first.run_stage(StageBatch([])).next
    assert empty is not None and empty.hidden is not None and empty.hidden.shape == (0, 256)
    assert last.run_stage(relay(empty)).tokens == {}


def test_stage_holds_and_reads_only_its_layers(
    tiny_model_dir: Path,
    converted: dict[int, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = load_file(str(tiny_model_dir / "model.safetensors"))
    read: list[int] = []
    real_read_all = reader._read_all

    def counting_read_all(paths: Any, host: Any, target: Any, chunks: Any, *a: Any, **k: Any):
        read.append(sum(chunk.nbytes for chunk in chunks))
        real_read_all(paths, host, target, chunks, *a, **k)

    monkeypatch.setattr(reader, "_read_all", counting_read_all)
    monkeypatch.setattr(reader, "_is_cached", lambda path: False)  # read, not mmap
    index = read_index(converted[1])
    total = sum(part.nbytes for part in index.partitions)
    for layers in [(0, 0), (1, 2), (3, 3)]:
        read.clear()
        stage = Engine(converted[1], device="cpu", max_slots=3, layers=layers)
        first, last = layers
        ranges = index.read_ranges(layers)
        assert read == [sum(end - start for _, start, end in ranges)]
        assert read[0] < total / 2
        # Exactly the stage's tensors, renumbered from its first layer, equal to the source's.
        state = stage.model.state_dict()
        expected: dict[str, str] = {}
        for name in source:
            local = stage.model.hf_layer_name(name.removeprefix("model."))
            if local is not None:
                expected[local] = name
        assert set(state) == set(expected)
        for local, name in expected.items():
            assert torch.equal(state[local], source[name]), local
        layer_names = {n for n in expected.values() if ".layers." in n}
        assert {int(n.split(".")[2]) for n in layer_names} == set(range(first, last + 1))
        assert (stage.model.embed_tokens is not None) == (first == 0)
        assert (stage.model.lm_head is not None) == (stage.model.norm is not None) == (last == 3)
        # The KV cache: this stage's layers only.
        assert len(stage.cache.k) == len(stage.cache.v) == last - first + 1
        blocks = 3 * -(-stage.max_seq_len // 16)  # 3 sequences of the full context
        assert stage.cache.k[0].shape == (blocks, 4, 16, 32)


def test_stage_from_an_hf_dir_reads_only_its_tensors(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors

    got: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.handle = real_open(*args, **kwargs)

        def __enter__(self) -> Recording:
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.handle.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self.inner.keys())

        def get_tensor(self, name: str) -> torch.Tensor:
            got.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    Engine(tiny_model_dir, device="cpu", max_slots=1, layers=(2, 3))
    assert got and all(".layers.2." in n or ".layers.3." in n or "layers" not in n for n in got)
    assert "model.embed_tokens.weight" not in got and "lm_head.weight" in got


def test_tied_head_on_a_last_stage(biased_tied_dir: Path) -> None:
    """A tied head past the first stage is loaded from the embedding."""
    whole = Engine(biased_tied_dir, device="cpu", max_slots=1)
    stages = [Engine(biased_tied_dir, device="cpu", max_slots=1, layers=(i, i)) for i in (0, 1)]
    assert stages[1].model.lm_head is not None and stages[1].model.embed_tokens is None
    assert torch.equal(stages[1].model.lm_head.weight, whole.model.embed_tokens.weight)
    seqs = [step_of("r0", [3, 14, 15, 92, 65], 0, False)]
    for i in range(4):
        expected = whole.run_stage(StageBatch(seqs))
        got = run_pipeline(stages, seqs)
        assert got.tokens == expected.tokens
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        seqs = [step_of("r0", [got.tokens["r0"]], i + 1, False)]


# ---------------------------------------------------------------------------------------------
# Tensor parallel: two processes, gloo


def _generate(run: Any, prompts: list[list[int]], steps: int) -> tuple[list[Any], list[Tensor]]:
    """Greedy ragged generation: prompt i joins at step i; the tokens and logits of each step."""
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    tokens, logits = [], []
    for step in range(steps):
        seqs = [
            step_of(rid, prompts[int(rid[1:])] if not done else [done[-1]], len(done), False)
            for rid, done in out.items()
            if int(rid[1:]) <= step
        ]
        result = run(seqs)
        tokens.append(result.tokens)
        logits.append(result.logits)
        for rid, token in result.tokens.items():
            out[rid].append(token)
    return tokens, logits


def _tp_rank(
    tp: TensorParallel,
    model_dir: Path,
    converted_tp2: Path,
    biased_dir: Path,
    prompts: list[list[int]],
) -> dict[str, Any]:
    torch.set_num_threads(1)  # two ranks on a small shared machine
    reference = Engine(model_dir, device="cpu", max_slots=4)
    sliced = Engine(model_dir, device="cpu", max_slots=4, tp=tp)  # cut from the whole tensors
    sharded = Engine(converted_tp2, device="cpu", max_slots=4, tp=tp)  # read as shards
    stages = [
        Engine(converted_tp2, device="cpu", max_slots=4, layers=layers, tp=tp)
        for layers in [(0, 1), (2, 3)]
    ]

    def engine_run(engine: Engine) -> Any:
        return lambda seqs: engine.run_stage(StageBatch(seqs))

    results: dict[str, Any] = {
        name: _generate(run, prompts, TP_STEPS)
        for name, run in [
            ("reference", engine_run(reference)),
            ("sliced", engine_run(sliced)),
            ("sharded", engine_run(sharded)),
            ("pipeline", lambda seqs: run_pipeline(stages, seqs)),
        ]
    }
    a, b = sliced.model.state_dict(), sharded.model.state_dict()
    results["same_shards"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results["kv_heads"] = [sliced.cache.k[0].shape[1], stages[1].cache.k[1].shape[1]]
    results["q_rows"] = sliced.model.layers[0].self_attn.q_proj.weight.shape[0]
    biased_ref = Engine(biased_dir, device="cpu", max_slots=2)
    biased_tp = Engine(biased_dir, device="cpu", max_slots=2, tp=tp)
    short = [[t % 96 for t in prompt] for prompt in prompts[:2]]
    results["biased_reference"] = _generate(engine_run(biased_ref), short, 6)
    results["biased_tp"] = _generate(engine_run(biased_tp), short, 6)
    return results


@pytest.fixture(scope="module")
def tp_results(
    tiny_model_dir: Path,
    converted: dict[int, Path],
    biased_tied_dir: Path,
    prompts: list[list[int]],
) -> list[dict[str, Any]]:
    args = (tiny_model_dir, converted[2], biased_tied_dir, prompts[:4])
    return run_ranks(_tp_rank, 2, args, backend="gloo", timeout_s=240)


def _max_relative(got: list[Tensor], expected: list[Tensor]) -> float:
    return max(
        float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, expected, strict=True)
    )


@pytest.mark.parametrize("variant", ["sliced", "sharded", "pipeline"])
def test_tensor_parallel_matches_reference(tp_results: list[dict[str, Any]], variant: str) -> None:
    """M=2 from a whole checkpoint (sliced), from a --tp 2 one (sharded), and P=2 x M=2."""
    for rank, results in enumerate(tp_results):
        tokens, logits = results[variant]
        ref_tokens, ref_logits = results["reference"]
        assert _max_relative(logits, ref_logits) < 1e-4, f"rank {rank}"
        assert tokens == ref_tokens, f"rank {rank}"
        assert sum(len(t) for t in tokens) > 3 * TP_STEPS  # ragged batches of up to 4
    # Both ranks gathered the same logits, so they sampled the same tokens.
    assert tp_results[0][variant][0] == tp_results[1][variant][0]


def test_tensor_parallel_shards_and_cache(tp_results: list[dict[str, Any]]) -> None:
    for results in tp_results:
        assert results["same_shards"]  # --tp 2 shards == the cut of the whole tensors
        assert results["kv_heads"] == [2, 2]  # 4 KV heads / M
        assert results["q_rows"] == 4 * 32  # 8 query heads / M, head_dim 32
        tokens, logits = results["biased_tp"]
        ref_tokens, ref_logits = results["biased_reference"]
        assert tokens == ref_tokens
        assert _max_relative(logits, ref_logits) < 1e-4
