"""A compact Llama-family forward pass (gpt-fast style) with a paged, preallocated KV cache.

Covers Llama, Mistral and Qwen2 checkpoints in the Hugging Face layout. Module names mirror HF's
(``layers.{i}.self_attn.q_proj`` …) so a checkpoint loads by stripping the ``model.`` prefix, and
the projections stay separate matrices so they can be sharded one by one.

Parallelism, explicit in the module tree:
- a pipeline stage (``layers=(first, last)``) builds only those decoder layers (``self.layers[i]``
  is layer ``first + i``), the embeddings only when first is 0, the final norm and LM head only
  when last is the final layer; its KV cache holds its layers only. ``prefill`` and
  ``decode_one_token`` take token ids on the first stage, hidden states on later ones, and return
  logits on the last stage, hidden states (for the next stage) on the others.
- tensor parallel degree M (``tp``): each rank holds n_heads/M query and n_kv_heads/M KV heads
  (and 1/M of the MLP and of the vocabulary), its KV cache only its heads; see ``parallel.py``.
The whole model (one stage, M=1) builds exactly the modules it always did.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.model.blocks import blocks_for
from shared.model.parallel import TensorParallel, column_linear, row_linear

# model_type -> the causal-LM architecture of that family.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling ("llama3" rope type)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Read an HF ``config.json`` of the Llama / Mistral / Qwen2 family."""
        model_type = _check_architecture(config)
        dim = _require(config, "hidden_size")
        n_heads = _require(config, "num_attention_heads")
        theta, scaling = _rope_settings(config)
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab_size=_require(config, "vocab_size"),
            dim=dim,
            n_layers=_require(config, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or dim // n_heads),
            intermediate_size=_require(config, "intermediate_size"),
            max_position_embeddings=_context_length(config),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            # Qwen2 always has q/k/v biases (and no o_proj bias); Llama has attention_bias.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def _require(config: dict[str, Any], key: str) -> int:
    if not isinstance(config.get(key), int):
        raise ValueError(f"config.json needs an integer {key!r}, got {config.get(key)!r}")
    return int(config[key])


def _check_architecture(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    architectures = config.get("architectures") or [SUPPORTED_MODEL_TYPES[model_type]]
    if architectures[0] not in SUPPORTED_MODEL_TYPES.values():
        raise ValueError(
            f"unsupported architecture {architectures[0]!r}; only causal LMs are supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES.values())}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; expected 'silu'")
    return str(model_type)


def _context_length(config: dict[str, Any]) -> int:
    length = int(config.get("max_position_embeddings", 2048))
    # Without sliding-window attention the outputs are exact only inside the window: cap there.
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", config.get("model_type") == "mistral"):
        length = min(length, int(window))
    return length


def _rope_settings(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes "rope_parameters"; older configs use rope_theta + rope_scaling.
    params: dict[str, Any] = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: 'default', 'llama3'")


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (HF's rotate_half convention, so results match transformers)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    if args.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, args.rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(args: ModelArgs, max_seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """float32 cos/sin of shape [max_seq_len, head_dim]; cast to the activations' dtype at use."""
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = positions[:, None] * rope_inv_freq(args).to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCacheFullError(RuntimeError):
    """Fewer free KV cache blocks than asked for."""


class KVCache:
    """Paged K/V per layer: ``num_blocks`` blocks of ``block_size`` positions,
    [num_blocks, n_kv_heads, block_size, head_dim]. A sequence holds the blocks its positions
    need (position p in block ``table[p // block_size]``), taken as it grows and freed when it
    ends. A block of ``max_seq_len`` positions is the slotted layout: one block per sequence for
    its lifetime. Reads and writes go through flat indices (:meth:`index`) computed once per
    forward pass, so each layer's read is one gather into [B, n_kv_heads, L, head_dim]."""

    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 position, got {num_blocks} x {block_size}")
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.n_kv_heads = n_kv_heads
        self.max_seq_len = max_seq_len
        # Free list kept sorted descending, so pop() hands out the lowest block: deterministic.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, positions: int) -> int:
        return blocks_for(positions, self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise KVCacheFullError(
                f"{count} KV cache blocks asked for, {len(self._free)} of {self.num_blocks} free"
            )
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        taken = set(range(self.num_blocks)) - set(self._free)
        if not set(blocks) <= taken or len(set(blocks)) != len(blocks):
            raise ValueError(f"KV cache blocks {sorted(set(blocks) - taken)} are not allocated")
        self._free.extend(blocks)
        self._free.sort(reverse=True)

    def index(self, tables: Tensor, length: int) -> Tensor:
        """Flat indices [B, n_kv_heads, length] of positions 0..length-1 of each head, through
        block tables [B, n], into a layer's cache viewed as rows of head_dim."""
        positions = torch.arange(length, device=tables.device)
        blocks = tables[:, torch.div(positions, self.block_size, rounding_mode="floor")]
        heads = torch.arange(self.n_kv_heads, device=tables.device)
        starts = (blocks[:, None, :] * self.n_kv_heads + heads[None, :, None]) * self.block_size
        return starts + (positions % self.block_size)[None, None, :]

    def gather(self, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """K and V at ``index`` [..., L]: [..., L, head_dim] each (one copy, contiguous)."""
        flat = index.reshape(-1)
        k, v = self.k[layer], self.v[layer]
        shape = (*index.shape, k.shape[-1])
        # index_select on rows: several times faster on CPU than advanced indexing.
        return (
            k.view(-1, k.shape[-1]).index_select(0, flat).view(shape),
            v.view(-1, v.shape[-1]).index_select(0, flat).view(shape),
        )

    def scatter(self, layer: int, index: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k/v [..., head_dim] at ``index`` [...]."""
        flat = index.reshape(-1)
        keys, values = self.k[layer], self.v[layer]
        keys.view(-1, keys.shape[-1]).index_copy_(0, flat, k.reshape(-1, keys.shape[-1]))
        values.view(-1, values.shape[-1]).index_copy_(0, flat, v.reshape(-1, values.shape[-1]))

    def copy_out(
        self, blocks: list[int], length: int, pin_memory: bool
    ) -> list[tuple[Tensor, Tensor]]:
        """The first ``length`` positions held in ``blocks``, per layer, as contiguous host
        tensors [n_kv_heads, length, head_dim]: only what the sequence holds moves."""
        index = self.index(torch.tensor([blocks], device=self.k[0].device), length)[0]
        copies = []
        for layer in range(len(self.k)):
            pair = []
            for source in self.gather(layer, index):
                target = torch.empty(
                    source.shape, dtype=source.dtype, device="cpu", pin_memory=pin_memory
                )
                # Pinned host memory lets the device copy run asynchronously.
                target.copy_(source, non_blocking=pin_memory)
                pair.append(target)
            copies.append((pair[0], pair[1]))
        return copies

    def copy_in(self, blocks: list[int], copies: list[tuple[Tensor, Tensor]]) -> None:
        """Write host copies (from :meth:`copy_out`) into ``blocks`` from position 0."""
        if not copies:
            return
        device = self.k[0].device
        index = self.index(torch.tensor([blocks], device=device), copies[0][0].shape[1])[0]
        for layer, (k, v) in enumerate(copies):
            pinned = k.is_pinned()
            self.scatter(
                layer, index, k.to(device, non_blocking=pinned), v.to(device, non_blocking=pinned)
            )


class CacheView(Protocol):
    """How one forward pass reads and writes the cache (prefill of one sequence, or ragged
    decode)."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k/v [B, n_kv, T, D]; return the keys/values to attend over."""
        ...

    @property
    def attn_mask(self) -> Tensor | None: ...

    @property
    def is_causal(self) -> bool: ...


class PrefillView:
    """T new tokens of one sequence at positions start_pos .. start_pos+T-1, its blocks
    ``table`` [n] covering them."""

    def __init__(self, cache: KVCache, table: Tensor, start_pos: int, length: int) -> None:
        self.cache = cache
        end = start_pos + length
        # Indices of positions 0..end-1 [1, H, end], computed once for every layer.
        self.read = cache.index(table[None], end)
        self.write = self.read[0, :, start_pos:]
        # From position 0 the plain causal mask is right; a continuation also sees the prefix.
        self.is_causal = start_pos == 0
        self.attn_mask: Tensor | None = None
        if not self.is_causal:
            ones = torch.ones(length, end, dtype=torch.bool, device=table.device)
            self.attn_mask = ones.tril(diagonal=start_pos)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.cache.scatter(layer, self.write, k[0], v[0])
        return self.cache.gather(layer, self.read)


class DecodeView:
    """One new token per row; each row has its own block table (``tables`` [B, n], padded with
    any block) and position (a ragged batch)."""

    def __init__(self, cache: KVCache, tables: Tensor, positions: Tensor, max_len: int) -> None:
        self.cache = cache
        # Indices of every row's positions up to the batch's longest [B, H, max_len], once for
        # all layers; the new token's [B, H].
        self.read = cache.index(tables, max_len)
        rows = torch.arange(len(positions), device=positions.device)
        self.write = self.read[rows, :, positions]
        self.is_causal = False
        # Attend to the cache only up to the batch's longest row; mask each row past its own end.
        keys = torch.arange(max_len, device=positions.device)
        self.attn_mask: Tensor | None = (keys[None, :] <= positions[:, None])[:, None, None, :]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.cache.scatter(layer, self.write, k[:, :, 0], v[:, :, 0])
        return self.cache.gather(layer, self.read)


# ---------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and scale after casting back, exactly like HF's LlamaRMSNorm.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        # Index of this layer's K/V in the cache: its position within the stage.
        self.layer_idx = layer_idx
        degree = tp.world_size if tp is not None else 1
        # This rank's heads (all of them without tensor parallelism).
        self.n_heads, self.n_kv_heads = args.n_heads // degree, args.n_kv_heads // degree
        self.head_dim = args.head_dim
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.q_proj = column_linear(args.dim, q_out, args.qkv_bias, tp)
        self.k_proj = column_linear(args.dim, kv_out, args.qkv_bias, tp)
        self.v_proj = column_linear(args.dim, kv_out, args.qkv_bias, tp)
        self.o_proj = row_linear(q_out, args.dim, args.o_bias, tp)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, view: CacheView) -> Tensor:
        batch, length, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = view.update(self.layer_idx, k, v)
        # GQA: each kv head serves n_heads / n_kv_heads consecutive query heads (HF's repeat_kv).
        repeats = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(repeats, dim=1)
        values = values.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=view.attn_mask, is_causal=view.is_causal
        )
        projected: Tensor = self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        return projected

    def _heads(self, x: Tensor, n_heads: int) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, n_heads, self.head_dim).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.gate_proj = column_linear(args.dim, args.intermediate_size, False, tp)
        self.up_proj = column_linear(args.dim, args.intermediate_size, False, tp)
        self.down_proj = row_linear(args.intermediate_size, args.dim, False, tp)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx, tp)
        self.mlp = MLP(args, tp)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, view: CacheView) -> Tensor:
        h: Tensor = x + self.self_attn(self.input_layernorm(x), cos, sin, view)
        out: Tensor = h + self.mlp(self.post_attention_layernorm(h))
        return out


Layers = tuple[int, int]  # (first, last) decoder layers of a pipeline stage, inclusive


def check_parallel(args: ModelArgs, layers: Layers | None, tp: TensorParallel | None) -> Layers:
    """The stage's (first, last) layers; ValueError when the stage or the TP degree cannot be."""
    first, last = layers if layers is not None else (0, args.n_layers - 1)
    if not 0 <= first <= last < args.n_layers:
        raise ValueError(f"layers {first}..{last} are not a stage of layers 0..{args.n_layers - 1}")
    degree = tp.world_size if tp is not None else 1
    sizes = {
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.intermediate_size,
    }
    if not args.tie_word_embeddings:  # a tied head is the embedding: replicated, not split
        sizes["vocab_size"] = args.vocab_size
    for key, size in sizes.items():
        if size % degree:
            raise ValueError(
                f"{key} {size} is not divisible by the tensor-parallel degree {degree}"
            )
    return first, last


class Transformer(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        layers: Layers | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.args = args
        tp = tp if tp is not None and tp.world_size > 1 else None
        first, last = check_parallel(args, layers, tp)
        self.first_layer, self.last_layer, self.tp = first, last, tp
        self.is_first, self.is_last = first == 0, last == args.n_layers - 1
        self.embed_tokens: nn.Embedding | None = None
        if self.is_first:  # the embedding is replicated across tensor-parallel ranks
            self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        # self.layers[i] is decoder layer first + i; its K/V is cache layer i.
        self.layers = nn.ModuleList(
            DecoderLayer(args, i - first, tp) for i in range(first, last + 1)
        )
        self.norm: RMSNorm | None = None
        self.lm_head: nn.Linear | None = None
        if self.is_last:
            self.norm = RMSNorm(args.dim, args.norm_eps)
            # A tied head is the (replicated) embedding: whole on every rank, nothing to gather.
            head_tp = None if args.tie_word_embeddings else tp
            self.lm_head = column_linear(args.dim, args.vocab_size, False, head_tp, gather=True)
        if args.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight
        self.kv_cache: KVCache | None = None
        # float32 rope tables, made with the cache (not buffers, so .to(bf16) cannot round them).
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self._anchor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor().dtype

    def _anchor(self) -> Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens.weight
        first = cast(DecoderLayer, self.layers[0])  # a ModuleList item is typed as a Module
        return first.input_layernorm.weight

    @property
    def n_local_kv_heads(self) -> int:
        """KV heads this rank holds (and caches)."""
        return self.args.n_kv_heads // (self.tp.world_size if self.tp is not None else 1)

    def hf_layer_name(self, name: str) -> str | None:
        """This module's name for a checkpoint tensor (``model.`` prefix removed), or None when
        this stage does not hold it. A tied head past the first stage is the embedding."""
        if name.startswith("layers."):
            index, rest = name.removeprefix("layers.").split(".", 1)
            local = int(index) - self.first_layer
            return f"layers.{local}.{rest}" if 0 <= local < len(self.layers) else None
        if name.startswith("embed_tokens."):
            if self.is_first:
                return name
            tied_head = self.is_last and self.args.tie_word_embeddings
            return "lm_head.weight" if tied_head and name == "embed_tokens.weight" else None
        return name if self.is_last else None

    def setup_caches(self, num_blocks: int, max_seq_len: int, block_size: int = 16) -> KVCache:
        """Allocate the paged KV cache and the rope tables (replacing any previous cache)."""
        if not 0 < max_seq_len <= self.args.max_position_embeddings:
            raise ValueError(
                f"max_seq_len must be in 1..{self.args.max_position_embeddings}, got {max_seq_len}"
            )
        a = self.args
        self.kv_cache = KVCache(
            len(self.layers),
            num_blocks,
            block_size,
            self.n_local_kv_heads,
            max_seq_len,
            a.head_dim,
            self.dtype,
            self.device,
        )
        self._cos, self._sin = rope_tables(a, max_seq_len, self.device)
        return self.kv_cache

    @torch.inference_mode()
    def prefill(self, token_ids: Tensor, blocks: Tensor, start_pos: int = 0) -> Tensor:
        """Run T tokens of one sequence at positions start_pos.. into its KV cache ``blocks``
        [n] (enough for start_pos + T positions).

        ``token_ids`` [T] on the first stage, the previous stage's hidden states [T, dim] on a
        later one. Returns float32 logits [vocab] of the last position on the last stage, else
        the hidden states [T, dim] for the next stage."""
        cache, cos, sin = self._cache()
        length = int(token_ids.shape[0])
        if length == 0 or start_pos < 0 or start_pos + length > cache.max_seq_len:
            raise ValueError(
                f"prefill of {length} tokens at position {start_pos} does not fit "
                f"1..{cache.max_seq_len} positions"
            )
        if blocks.shape[0] < cache.blocks_for(start_pos + length):
            raise ValueError(f"{blocks.shape[0]} blocks cannot hold {start_pos + length} positions")
        view = PrefillView(cache, blocks.to(self.device), start_pos, length)
        span = slice(start_pos, start_pos + length)
        h = self._stage_input(token_ids)[None]
        h = self.run_layers(h, cos[span], sin[span], view)
        return self.head(h[:, -1])[0] if self.is_last else h[0]

    @torch.inference_mode()
    def decode_one_token(
        self, token_ids: Tensor, tables: Tensor, positions: Tensor, max_len: int | None = None
    ) -> Tensor:
        """One token per row at its own position, its KV cache in the blocks of its row of
        ``tables`` [B, n] (rows padded with any block); float32 logits [B, vocab] on the last
        stage, else hidden states [B, dim]. ``token_ids`` [B] on the first stage, else the
        previous stage's hidden states [B, dim].

        ``max_len`` (max(positions) + 1) may be given to skip a device sync; no two rows may
        share a block.
        """
        cache, cos, sin = self._cache()
        positions = positions.to(self.device)
        if max_len is None:
            max_len = int(positions.max().item()) + 1
        view = DecodeView(cache, tables.to(self.device), positions, max_len)
        # [B, D] -> [B, 1, 1, D]: broadcasts over heads and the single query position.
        cos_b, sin_b = cos[positions][:, None, None, :], sin[positions][:, None, None, :]
        h = self._stage_input(token_ids)[:, None]
        h = self.run_layers(h, cos_b, sin_b, view)
        return self.head(h[:, -1]) if self.is_last else h[:, -1]

    def _stage_input(self, x: Tensor) -> Tensor:
        """Token ids [N] -> embeddings [N, dim] on the first stage; a later stage's input is
        already hidden states [N, dim]."""
        embed = self.embed_tokens
        if embed is not None:
            embedded: Tensor = embed(x.to(embed.weight.device))
            return embedded
        if x.dim() != 2 or x.shape[1] != self.args.dim:
            raise ValueError(
                f"layers {self.first_layer}..{self.last_layer} take hidden states [N, "
                f"{self.args.dim}], got shape {list(x.shape)}"
            )
        return x.to(self.device, self.dtype)

    def run_layers(self, h: Tensor, cos: Tensor, sin: Tensor, view: CacheView) -> Tensor:
        """Apply this stage's decoder layers."""
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, view)
        return h

    def head(self, h: Tensor) -> Tensor:
        """Final norm and LM head (last stage only); logits always float32, whole vocabulary."""
        assert self.norm is not None and self.lm_head is not None, "not the last stage"
        logits: Tensor = self.lm_head(self.norm(h))
        return logits.float()

    def _cache(self) -> tuple[KVCache, Tensor, Tensor]:
        if self.kv_cache is None or self._cos is None or self._sin is None:
            raise RuntimeError("call setup_caches() before running the model")
        return self.kv_cache, self._cos, self._sin


# ---------------------------------------------------------------------------------------------
# Loading


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and bandwidth on GPUs; CPUs are exact and fast enough in float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Reads a checkpoint's tensors onto a device (e.g. from the loader's host-memory pool).
WeightsSource = Callable[[torch.device], dict[str, Tensor]]


def load_transformer(
    model_dir: Path,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    weights: WeightsSource | None = None,
    *,
    layers: Layers | None = None,
    tp: TensorParallel | None = None,
) -> Transformer:
    """Build a Transformer from an HF directory (config.json + safetensors, sharded or not,
    or spotserve's converted format); ``weights`` replaces reading the tensors from the dir.

    ``layers`` (first, last) builds one pipeline stage and reads only its tensors (a converted
    checkpoint: only their byte ranges). ``tp`` builds this rank's shard: read as such from a
    checkpoint converted with the same degree, else cut from the whole tensors."""
    model_dir = Path(model_dir)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        model = Transformer(args, layers, tp)
    if weights is not None:
        state = _checkpoint_names(weights(device), dtype, model)
    else:
        state = _read_state_dict(model_dir, device, dtype, model)
    state = _stage_state(state, model)
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {model_dir} does not match its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, assign=True)
    if args.tie_word_embeddings and model.embed_tokens is not None and model.lm_head is not None:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _stage_state(state: dict[str, Tensor], model: Transformer) -> dict[str, Tensor]:
    """Checkpoint names (``model.`` removed) -> the module's: only the stage's tensors, layers
    renumbered from the stage's first, whole tensors cut to the rank's shard."""
    expected = model.state_dict()  # meta tensors: the shapes this stage and rank hold
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        local = model.hf_layer_name(name)
        if local is None:
            continue
        if model.tp is not None and local in expected and tensor.shape != expected[local].shape:
            tensor = model.tp.shard(name, tensor)
        out[local] = tensor
    tied = model.args.tie_word_embeddings and model.lm_head is not None
    if tied and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def _read_state_dict(
    model_dir: Path, device: torch.device, dtype: torch.dtype, model: Transformer
) -> dict[str, Tensor]:
    from safetensors import safe_open

    from shared.loading.format import is_converted

    if is_converted(model_dir):
        return _read_converted(model_dir, device, dtype, model)
    state: dict[str, Tensor] = {}
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                # Old checkpoints store rope frequencies; they are recomputed here.
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                key = name.removeprefix("model.")
                if model.hf_layer_name(key) is not None:  # another stage's: not read at all
                    state[key] = handle.get_tensor(name).to(dtype)
    return state


def _read_converted(
    model_dir: Path, device: torch.device, dtype: torch.dtype, model: Transformer
) -> dict[str, Tensor]:
    """spotserve's loading-optimized format: one allocation on the device, tensors as views;
    a stage reads only its byte ranges, a rank only its shard when the degrees match."""
    from shared.loading.format import read_index
    from shared.loading.reader import load_checkpoint

    whole = model.is_first and model.is_last
    layers = None if whole else (model.first_layer, model.last_layer)
    tp = model.tp
    rank = None
    if tp is not None and read_index(model_dir).tp_degree == tp.world_size:
        rank = tp.rank
    loaded = load_checkpoint(model_dir, device=device, layers=layers, tp_rank=rank)
    if model.args.tie_word_embeddings and model.is_last and not model.is_first:
        # The tied head is the embedding, which only the first stage's ranges hold.
        first = load_checkpoint(model_dir, device=device, layers=(0, 0), tp_rank=rank)
        loaded["model.embed_tokens.weight"] = first["model.embed_tokens.weight"]
    return _checkpoint_names(loaded, dtype, model)


def _checkpoint_names(
    loaded: dict[str, Tensor], dtype: torch.dtype, model: Transformer
) -> dict[str, Tensor]:
    """HF tensor names -> without ``model.``, only those the stage holds (rope frequencies are
    recomputed, not loaded)."""
    state = {}
    for name, tensor in loaded.items():
        key = name.removeprefix("model.")
        if not name.endswith("rotary_emb.inv_freq") and model.hf_layer_name(key) is not None:
            state[key] = tensor.to(dtype)
    return state


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
