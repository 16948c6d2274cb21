"""The embedded default model: a seeded random Llama checkpoint plus a trained byte-level BPE.

Nothing is downloaded: ``init_model`` builds a standard Hugging Face Llama directory from a seed,
byte for byte the same on every run, so tests and benchmarks need no model hub.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save_file

ModelSize = Literal["tiny", "small"]

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<s>", "</s>", "<unk>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Files that make a directory a complete model; model.safetensors is written last.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)
_ROPE_THETA = 10000.0
_RMS_NORM_EPS = 1e-5
_INIT_STD = 0.02


@dataclass(frozen=True)
class SizeSpec:
    """Shape of one embedded model size (vocab_size is the tokenizer's training target)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    # Pseudo-words in the tokenizer's training corpus: more words allow more merges.
    corpus_words: int
    lexicon_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count (untied embeddings), computed without allocating anything."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h


MODEL_SIZES: dict[ModelSize, SizeSpec] = {
    "tiny": SizeSpec(
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=688,
        vocab_size=4096,
        max_position_embeddings=1024,
        corpus_words=60_000,
        lexicon_size=6_000,
    ),
    "small": SizeSpec(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        vocab_size=16384,
        max_position_embeddings=2048,
        corpus_words=240_000,
        lexicon_size=24_000,
    ),
}


def default_model_dir(size: ModelSize = "tiny") -> Path:
    """``$SPOTSERVE_HOME/models/<size>`` (SPOTSERVE_HOME defaults to ~/.cache/spotserve)."""
    from shared.config import spotserve_home

    return spotserve_home() / "models" / size


def is_complete_model(directory: Path) -> bool:
    return all((directory / name).is_file() for name in MODEL_FILES)


def ensure_model(directory: Path, size: ModelSize = "tiny", seed: int = 0) -> Path:
    """Create the model at ``directory`` unless one is there; safe when processes race."""
    directory = Path(directory)
    if is_complete_model(directory):
        return directory
    try:
        return init_model(directory, size=size, seed=seed)
    except FileExistsError:
        # Another process won the race: its rename was atomic, so its model is complete.
        if is_complete_model(directory):
            return directory
        raise


def init_model(
    directory: Path, size: ModelSize = "tiny", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a deterministic random Llama model (HF layout) to ``directory`` and return it."""
    directory = Path(directory)
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    _refuse_existing(directory, overwrite)
    spec = MODEL_SIZES[size]
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename: a half-written model is never visible.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        _write_model_files(staging, spec, seed)
        _publish(staging, directory, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _refuse_existing(directory: Path, overwrite: bool) -> None:
    if overwrite or not directory.exists():
        return
    if is_complete_model(directory):
        raise FileExistsError(
            f"a model already exists at {directory}; replace it with overwrite=True (CLI: --force)"
        )
    if not directory.is_dir() or any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} exists and is not a complete model; remove it, or replace it"
            " with overwrite=True (CLI: --force)"
        )


def _publish(staging: Path, directory: Path, overwrite: bool) -> None:
    """Atomically move the finished model into place (replacing the old one if asked)."""
    if directory.is_dir() and not any(directory.iterdir()):
        # An empty placeholder directory is not a model (a racing process may remove it first).
        with contextlib.suppress(OSError):
            directory.rmdir()
    if overwrite and directory.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.rename(directory, trash / "model")
        try:
            os.rename(staging, directory)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(staging, directory)
    except OSError as exc:
        # rename(2) refuses a non-empty target: someone else published first.
        raise FileExistsError(
            f"a model appeared at {directory} while this one was being written"
        ) from exc


def _write_model_files(directory: Path, spec: SizeSpec, seed: int) -> None:
    tokenizer_json = build_tokenizer_json(spec.vocab_size, spec.corpus_words, spec.lexicon_size)
    vocab_size = _vocab_size_of(tokenizer_json)
    _write_json(directory / "config.json", _model_config(spec, vocab_size))
    _write_json(directory / "generation_config.json", _generation_config())
    _write_json(directory / "special_tokens_map.json", _special_tokens_map())
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(spec))
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    save_file(
        random_weights(spec, vocab_size, seed),
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    # mkdtemp makes a private 0700 directory; a published model is readable like any cache.
    for name in MODEL_FILES:
        (directory / name).chmod(0o644)
    directory.chmod(0o755)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    # sort_keys + fixed indent: the same bytes on every run.
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _vocab_size_of(tokenizer_json: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------------------------------------
# Config files


def _model_config(spec: SizeSpec, vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": _INIT_STD,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": _RMS_NORM_EPS,
        "rope_scaling": None,
        "rope_theta": _ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _generation_config() -> dict[str, Any]:
    # No pad token exists; like most Llama checkpoints, padding reuses EOS.
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}


def _special_tokens_map() -> dict[str, Any]:
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}


def _tokenizer_config(spec: SizeSpec) -> dict[str, Any]:
    added = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, content in ((UNK_ID, UNK_TOKEN), (BOS_ID, BOS_TOKEN), (EOS_ID, EOS_TOKEN))
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK_TOKEN,
    }


# ---------------------------------------------------------------------------------------------
# Weights


def weight_shapes(spec: SizeSpec, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """HF Llama weight names and shapes, in a fixed order."""
    h, inter = spec.hidden_size, spec.intermediate_size
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "self_attn.q_proj.weight"] = (q_out, h)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_out, h)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_out, h)
        shapes[prefix + "self_attn.o_proj.weight"] = (h, q_out)
        shapes[prefix + "mlp.gate_proj.weight"] = (inter, h)
        shapes[prefix + "mlp.up_proj.weight"] = (inter, h)
        shapes[prefix + "mlp.down_proj.weight"] = (h, inter)
        shapes[prefix + "input_layernorm.weight"] = (h,)
        shapes[prefix + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab_size, h)
    return shapes


def random_weights(spec: SizeSpec, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded N(0, 0.02) matrices and all-ones norms, float32 (numpy: no torch needed here)."""
    tensors: dict[str, np.ndarray] = {}
    for index, (name, shape) in enumerate(weight_shapes(spec, vocab_size).items()):
        if len(shape) == 1:
            tensors[name] = np.ones(shape, dtype=np.float32)
            continue
        # One independent stream per tensor, derived from (seed, index): order-independent.
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(_INIT_STD)
        tensors[name] = values
    return tensors


# ---------------------------------------------------------------------------------------------
# Tokenizer

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_ONSETS = ("", "st", "tr", "pl", "ch", "sh", "th", "br", "gr", "kr")
_CODAS = ("", "", "", "n", "r", "s", "l", "t", "nd", "st")
_PUNCTUATION = (",", ",", ".", ".", ".", "!", "?", ";", ":", " -", "'s", "...")
# Non-ASCII words: common ones get merged, rare characters stay split into byte tokens.
_FOREIGN_WORDS = (
    "café",
    "naïve",
    "über",
    "señor",
    "façade",
    "déjà",
    "crème",
    "smörgåsbord",
    "résumé",
    "Ærø",
    "straße",
    "Ελλάδα",
    "привет",
    "中文",
    "日本語",
    "你好",
    "世界",
    "東京",
    "漢字",
    "こんにちは",
    "한국어",
)
_RARE_WORDS = ("🙂", "🚀", "👍🏽", "∑", "→", "€", "龍", "鬱")


def _syllable(rng: random.Random) -> str:
    onset = rng.choice(_ONSETS) or rng.choice(_CONSONANTS)
    return onset + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _lexicon(rng: random.Random, size: int) -> list[str]:
    words: dict[str, None] = {}  # insertion-ordered set: deterministic
    while len(words) < size:
        words["".join(_syllable(rng) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))] = None
    return list(words)


def _corpus(seed: int, num_words: int, lexicon_size: int) -> Iterator[str]:
    """Seeded pseudo-text: Zipf-distributed words, punctuation, digits and non-ASCII words."""
    rng = random.Random(seed)
    lexicon = _lexicon(rng, lexicon_size)
    # Cumulative weights computed once: rng.choices would redo them for every sentence.
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(lexicon))))
    produced = 0
    while produced < num_words:
        length = rng.randint(4, 16)
        words = rng.choices(lexicon, cum_weights=cum_weights, k=length)
        for i in range(length):
            roll = rng.random()
            if roll < 0.04:
                words[i] = str(rng.randint(0, 10 ** rng.randint(1, 5)))
            elif roll < 0.07:
                words[i] = rng.choice(_FOREIGN_WORDS)
            elif roll < 0.075:
                words[i] = rng.choice(_RARE_WORDS)
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice(_PUNCTUATION)
        produced += length


@functools.lru_cache(maxsize=4)
def build_tokenizer_json(vocab_size: int, corpus_words: int, lexicon_size: int) -> str:
    """Train the byte-level BPE (cached: every seed of a size shares one tokenizer)."""
    # Training is deterministic (merge ties break on token ids), whatever the thread count.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(1234, corpus_words, lexicon_size), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tokenizer.to_str(pretty=True)
