"""The model layer: embedded checkpoint, forward pass vs transformers, sampling, engine."""

from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel

from shared.model.checkpoint import (
    MODEL_FILES,
    MODEL_SIZES,
    default_model_dir,
    ensure_model,
    init_model,
    is_complete_model,
)
from shared.model.engine import (
    ContextLengthError,
    Engine,
    EngineError,
    InvalidStepError,
    NoFreeBlocksError,
    SequenceStep,
)
from shared.model.llama import KVCache, KVCacheFullError, ModelArgs, load_transformer
from shared.model.sampling import SamplingParams, sample_token, sample_tokens
from shared.model.tokenizer import IncrementalDetokenizer, TextTokenizer

TEXTS = [
    "Hello world, this is a test.",
    "café naïve über 中文 日本語 🙂 🦀 straße",
    "  leading spaces and 12345 digits!",
    "",
    "Ελλάδα привет 👍🏽 → €",
]
MULTIBYTE_TEXT = "Le café était très bon: 中文很好 🙂🦀 naïve ß ∑ 龍!"


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="session")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def engine(model_dir: Path) -> Engine:
    return Engine(model_dir, device="cpu", max_slots=6)


def _digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def greedy(request_id: str, token_ids: list[int], sample_index: int = 0) -> SequenceStep:
    return SequenceStep(request_id, token_ids, 0.0, 1.0, 0, sample_index)


# ---------------------------------------------------------------------------------------------
# Checkpoint


def test_init_model_is_byte_for_byte_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = init_model(tmp_path / "again", size="tiny", seed=0)
    assert sorted(p.name for p in again.iterdir()) == sorted(MODEL_FILES)
    assert _digests(again) == _digests(model_dir)
    other = _digests(init_model(tmp_path / "other", size="tiny", seed=1))
    assert other["model.safetensors"] != _digests(model_dir)["model.safetensors"]
    # The tokenizer depends on the size only: every seed of a size shares it.
    assert other["tokenizer.json"] == _digests(model_dir)["tokenizer.json"]


def test_init_model_refuses_to_overwrite(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        init_model(model_dir)
    target = init_model(tmp_path / "m", seed=1)
    init_model(target, seed=0, overwrite=True)
    assert _digests(target) == _digests(model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete model"):
        init_model(tmp_path / "junk")


def test_ensure_model_creates_once_even_when_racing(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: ensure_model(target, "tiny"), range(3)))
    assert results == [target] * 3
    assert is_complete_model(target)
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]
    before = _digests(target)
    assert ensure_model(target, "tiny") == target
    assert _digests(target) == before


def test_model_sizes_and_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert 3_000_000 < MODEL_SIZES["tiny"].num_params() < 10_000_000
    assert 80_000_000 < MODEL_SIZES["small"].num_params() < 130_000_000
    monkeypatch.setenv("SPOTSERVE_HOME", str(tmp_path))
    assert default_model_dir("small") == tmp_path / "models" / "small"


def test_config_matches_tokenizer_and_weights(model_dir: Path, tokenizer: TextTokenizer) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == tokenizer.vocab_size == MODEL_SIZES["tiny"].vocab_size
    model = load_transformer(model_dir, device=torch.device("cpu"))
    assert model.embed_tokens.weight.shape == (tokenizer.vocab_size, config["hidden_size"])
    assert model.dtype == torch.float32
    # Every id the model can produce decodes, and all 256 bytes are tokens.
    for token_id in range(tokenizer.vocab_size):
        tokenizer.decode([token_id], skip_special_tokens=False)
    assert all(tokenizer.token_to_id(c) is not None for c in ByteLevel.alphabet())
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == frozenset({2})
    assert tokenizer.context_length == config["max_position_embeddings"]


# ---------------------------------------------------------------------------------------------
# Compatibility with transformers


def test_hf_tokenizer_agrees(model_dir: Path, tokenizer: TextTokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in [*TEXTS, MULTIBYTE_TEXT]:
        ids = tokenizer.encode(text)
        assert ids == hf(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_engine_matches_hf_generate(
    model_dir: Path, tokenizer: TextTokenizer, hf_model: torch.nn.Module
) -> None:
    """Ragged batches (sequences joining and leaving at different steps) == HF greedy."""
    prompts = [tokenizer.encode(text) for text in [*TEXTS[:3], TEXTS[4], "The " * 40]]
    starts = [0, 0, 2, 3, 7]
    new_tokens = [24, 20, 22, 20, 21]
    engine = Engine(model_dir, device="cpu", max_slots=len(prompts))
    generated: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for step in range(40):
        batch = [
            greedy(str(i), prompts[i] if not out else [out[-1]], len(out))
            for i, out in generated.items()
            if starts[i] <= step and len(out) < new_tokens[i]
        ]
        for request_id, token in engine.step(batch).items():
            generated[int(request_id)].append(token)
        engine.release(str(i) for i, out in generated.items() if len(out) == new_tokens[i])
    assert engine.num_free_blocks == engine.kv_blocks
    for i, prompt in enumerate(prompts):
        expected = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens[i],
            eos_token_id=None,  # generate the full length; the engine never stops either
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert generated[i] == expected, f"prompt {i}"


def test_logits_match_hf(
    model_dir: Path, tokenizer: TextTokenizer, hf_model: torch.nn.Module
) -> None:
    model = load_transformer(model_dir, device=torch.device("cpu"))
    model.setup_caches(num_blocks=8, max_seq_len=64, block_size=16)
    a, b = tokenizer.encode(TEXTS[0]), tokenizer.encode(TEXTS[1])
    with torch.no_grad():
        ref_a = hf_model(torch.tensor([a])).logits[0].float()
        ref_b = hf_model(torch.tensor([b])).logits[0].float()
    # Each sequence's blocks interleaved with the other's: the tables alone say where it is.
    table_a, table_b = torch.tensor([6, 0, 4, 2]), torch.tensor([1, 7, 3, 5])
    torch.testing.assert_close(model.prefill(torch.tensor(a[:-1]), table_a)[None], ref_a[-2:-1])
    torch.testing.assert_close(model.prefill(torch.tensor(b[:-3]), table_b)[None], ref_b[-4:-3])
    # A ragged decode of both rows at their own positions.
    rows = model.decode_one_token(
        torch.tensor([a[-1], b[-3]]),
        torch.stack([table_a, table_b]),
        torch.tensor([len(a) - 1, len(b) - 3]),
    )
    torch.testing.assert_close(rows, torch.stack([ref_a[-1], ref_b[-3]]))


def test_prefill_in_two_chunks_equals_one(model_dir: Path, tokenizer: TextTokenizer) -> None:
    model = load_transformer(model_dir, device=torch.device("cpu"))
    model.setup_caches(num_blocks=32, max_seq_len=128, block_size=8)
    ids = torch.tensor(tokenizer.encode(MULTIBYTE_TEXT + " " + TEXTS[0]))
    tables = torch.arange(32).view(2, 16)
    whole = model.prefill(ids, tables[0])
    model.prefill(ids[:9], tables[1])  # the continuation starts inside the second block
    split = model.prefill(ids[9:], tables[1], start_pos=9)
    assert whole.dtype == torch.float32 and whole.shape == (model.args.vocab_size,)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    # The cache holds the same K/V either way, so decoding continues identically.
    n = len(ids)
    both = model.decode_one_token(torch.tensor([5, 5]), tables, torch.tensor([n, n]))
    torch.testing.assert_close(both[0], both[1], rtol=1e-4, atol=1e-5)


def _tiny_hf_dir(tmp_path: Path, family: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling=scaling, rope_theta=5e5))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)  # random biases and norms too: they must load right
    model.save_pretrained(tmp_path / family)
    return tmp_path / family


@pytest.mark.parametrize("family", ["qwen2", "llama3-rope"])
def test_other_llama_family_checkpoints_match_hf(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    directory = _tiny_hf_dir(tmp_path, family)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = load_transformer(directory, device=torch.device("cpu"))
    model.setup_caches(num_blocks=1, max_seq_len=200, block_size=200)  # one slot
    ids = torch.arange(150) % 96  # past original_max_position_embeddings: scaling matters
    with torch.no_grad():
        expected = hf(ids[None]).logits[0, -1].float()
    torch.testing.assert_close(
        model.prefill(ids, torch.tensor([0])), expected, rtol=1e-4, atol=1e-4
    )


def test_model_args_reject_unsupported_configs(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert ModelArgs.from_hf_config(config).head_dim == 32
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelArgs.from_hf_config({**config, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelArgs.from_hf_config({**config, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="architecture"):
        ModelArgs.from_hf_config({**config, "architectures": ["LlamaForSequenceClassification"]})


def test_kv_cache_blocks() -> None:
    cache = KVCache(1, 3, 4, 1, 12, 2, torch.float32, torch.device("cpu"))
    assert (cache.blocks_for(0), cache.blocks_for(4), cache.blocks_for(5)) == (0, 1, 2)
    assert (cache.allocate(2), cache.num_free) == ([0, 1], 1)
    with pytest.raises(KVCacheFullError, match="2 KV cache blocks asked for, 1 of 3 free"):
        cache.allocate(2)
    cache.free([1])
    with pytest.raises(ValueError, match="not allocated"):
        cache.free([1])
    assert cache.allocate(2) == [1, 2]
    # A copy out and back in moves only the positions held, through any blocks.
    positions = torch.arange(6, dtype=torch.float32)
    cache.k[0][2, 0, :, 0] = positions[:4]
    cache.k[0][0, 0, :2, 0] = positions[4:]
    ((k, _v),) = cache.copy_out([2, 0], 6, pin_memory=False)
    assert k.shape == (1, 6, 2) and k[0, :, 0].tolist() == positions.tolist()
    cache.copy_in([1, 2], [(k, k)])
    assert cache.k[0][1, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert cache.k[0][2, 0, :2, 0].tolist() == [4, 5]


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_reproducible_and_greedy_at_the_limits() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(3)) * 2
    argmax = int(logits.argmax())
    draws = [sample_token(logits, 1.0, 1.0, seed=7, sample_index=i) for i in range(40)]
    assert draws == [sample_token(logits, 1.0, 1.0, seed=7, sample_index=i) for i in range(40)]
    other = [sample_token(logits, 1.0, 1.0, seed=8, sample_index=i) for i in range(40)]
    assert draws != other
    assert len(set(draws)) > 5
    assert sample_token(logits, 0.0, 1.0, seed=7, sample_index=0) == argmax
    assert {sample_token(logits, 1.5, 1e-6, seed=s, sample_index=0) for s in range(20)} == {argmax}
    # top_p keeps the smallest nucleus: never a token outside the top ones by mass.
    nucleus = set(torch.topk(logits, 30).indices.tolist())
    sampled = {sample_token(logits, 1.0, 0.3, seed=s, sample_index=1) for s in range(50)}
    assert sampled <= nucleus
    with pytest.raises(ValueError, match="top_p"):
        sample_token(logits, 1.0, 0.0, seed=0, sample_index=0)


def test_batched_sampling_equals_per_row() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(0.0, 1.0, 1, 0),
        SamplingParams(0.8, 0.9, 1, 5),
        SamplingParams(1.2, 1.0, 2, 0),
        SamplingParams(0.0, 0.5, 3, 9),
    ]
    expected = [
        sample_token(row, p.temperature, p.top_p, p.seed, p.sample_index)
        for row, p in zip(logits, params, strict=True)
    ]
    assert sample_tokens(logits, params) == expected


def test_engine_sampling_survives_a_resume_elsewhere(
    model_dir: Path, tokenizer: TextTokenizer, engine: Engine
) -> None:
    """A request recomputed on another engine from its committed tokens draws the same."""
    prompt = tokenizer.encode(TEXTS[0])

    def run(eng: Engine, tokens: list[int], done: list[int], count: int) -> list[int]:
        out = list(done)
        step = SequenceStep("r", tokens + done, 1.0, 0.95, 1234, len(done))
        while len(out) < count:
            out.append(eng.step([step])["r"])
            step = SequenceStep("r", [out[-1]], 1.0, 0.95, 1234, len(out))
        eng.release(["r"])
        return out

    full = run(engine, prompt, [], 12)
    assert run(engine, prompt, [], 12) == full
    resumed = run(Engine(model_dir, device="cpu", max_slots=1), prompt, full[:5], 12)
    assert resumed == full


# ---------------------------------------------------------------------------------------------
# Engine errors


def test_engine_refuses_bad_steps_without_side_effects(
    engine: Engine, tokenizer: TextTokenizer
) -> None:
    assert engine.step([greedy("a", [1, 5, 6])]).keys() == {"a"}
    free = engine.num_free_blocks

    def refused(error: type[EngineError], match: str, steps: list[SequenceStep]) -> None:
        with pytest.raises(error, match=match):
            engine.step(steps)
        assert engine.num_free_blocks == free
        assert not engine.has_sequence("new") and engine.sequence_length("a") == 3

    too_many = [greedy(f"n{i}", [1]) for i in range(free + 1)]
    refused(NoFreeBlocksError, f"needs {free + 1} more KV cache blocks", too_many)
    context = engine.context_length
    refused(ContextLengthError, "over the context length", [greedy("new", [1] * (context + 1))])
    refused(ContextLengthError, "context", [greedy("a", [7] * (context - 2))])
    refused(InvalidStepError, "outside the vocabulary", [greedy("new", [1, engine.vocab_size])])
    refused(InvalidStepError, "outside the vocabulary", [greedy("new", [-1])])
    refused(InvalidStepError, "empty token list", [greedy("new", [])])
    refused(InvalidStepError, "appears twice", [greedy("new", [1]), greedy("new", [1])])
    refused(InvalidStepError, "temperature", [SequenceStep("new", [1], -1.0, 1.0, 0, 0)])
    # A valid sequence in a refused batch is not applied either.
    refused(InvalidStepError, "vocabulary", [greedy("a", [4]), greedy("new", [10**9])])
    engine.release(["a", "unknown"])
    assert engine.num_free_blocks == free + 1 and not engine.has_sequence("a")


def test_engine_fills_exactly_to_the_context(model_dir: Path) -> None:
    engine = Engine(model_dir, device="cpu", max_slots=2, max_seq_len=16)
    assert engine.context_length == 16
    assert engine.eos_token_ids == frozenset({2}) and engine.device == torch.device("cpu")
    engine.step([greedy("a", list(range(3, 18)))])  # 15 positions
    token = engine.step([greedy("a", [4])])["a"]  # the 16th
    with pytest.raises(ContextLengthError, match="17 tokens"):
        engine.step([greedy("a", [token])])
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model_dir, device="cpu", max_seq_len=16, block_size=8, kv_blocks=1)


def test_paged_engine_fits_short_sequences_and_grows_them_by_blocks(model_dir: Path) -> None:
    # The memory of 2 sequences of the full context (16 positions): 4 blocks of 8.
    engine = Engine(model_dir, device="cpu", max_slots=2, max_seq_len=16, block_size=8)
    assert (engine.kv_blocks, engine.block_size) == (4, 8)
    engine.step([greedy(name, [1, 2, 3]) for name in "wxyz"])  # 4 sequences: 1 block each
    assert engine.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError, match="needs 1 more KV cache blocks"):
        engine.step([greedy("w", [4] * 6)])  # 9 positions: a second block
    engine.release(["x"])
    engine.step([greedy("w", [4] * 6)])
    assert engine.sequence_length("w") == 9 and engine.num_free_blocks == 0
    # An upload takes the blocks its positions need, no more.
    engine = Engine(model_dir, device="cpu", max_slots=2, max_seq_len=16, block_size=8,
                    host_slots=2)  # fmt: skip
    engine.step([greedy("a", [1] * 9), greedy("b", [1])])
    engine.offload(["a", "b"])
    assert engine.fitting_uploads(["a", "b"]) == ["a", "b"]
    engine.step([greedy("c", [1] * 12)])
    assert engine.fitting_uploads(["a", "b"]) == ["a"]
    assert engine.fitting_uploads(["b", "a"]) == ["b"]


# ---------------------------------------------------------------------------------------------
# Incremental detokenization


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*pieces, detok.flush()]


def test_detokenizer_reproduces_decode(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE_TEXT)[1:]
    # The text really does split characters across tokens, or this test would prove little.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    for chunk in (1, 2, 5):
        detok = IncrementalDetokenizer(tokenizer)
        pieces = _stream(detok, ids, chunk)
        assert not any("\ufffd" in piece for piece in pieces)
        assert "".join(pieces) == detok.text == MULTIBYTE_TEXT
        assert not detok.stopped


def test_detokenizer_on_random_ids(tokenizer: TextTokenizer) -> None:
    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(120)]
        detok = IncrementalDetokenizer(tokenizer)
        assert "".join(_stream(detok, ids, rng.randint(1, 4))) == tokenizer.decode(ids)


def test_detokenizer_flushes_a_dangling_character(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("ok 🦀")[1:]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add([i]) for i in ids[:-1]) == "ok"  # the crab is incomplete
    tail = detok.flush()
    assert tail.startswith(" ") and tail.endswith("\ufffd")
    assert detok.text == tokenizer.decode(ids[:-1])


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["world"], "Hello "),
        (["lo wor", "xyz"], "Hel"),
        (["中文"], "Le café était très bon: "),
        (["🦀"], "Le café était très bon: 中文很好 🙂"),
    ],
)
def test_detokenizer_stop_strings(tokenizer: TextTokenizer, stop: list[str], expected: str) -> None:
    text = "Hello world" if stop[0] in "Hello world" else MULTIBYTE_TEXT
    ids = tokenizer.encode(text)[1:]
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    emitted = ""
    for token_id in ids:
        emitted += detok.add([token_id])
        # Nothing past the cut is ever emitted: no partial stop string either.
        assert expected.startswith(emitted)
    assert emitted == detok.text == expected
    assert detok.stopped and detok.add([5]) == "" and detok.flush() == ""


def test_detokenizer_releases_a_false_stop_prefix(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("Hello world. Bye")[1:]
    detok = IncrementalDetokenizer(tokenizer, stop=["world peace", "Bye now"])
    pieces = _stream(detok, ids)
    assert "".join(pieces) == "Hello world. Bye" and not detok.stopped
    assert pieces[-1] == "Bye"  # held until the end: it could still have become "Bye now"
