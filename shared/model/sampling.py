"""Stateless, reproducible token sampling.

Each draw uses a fresh CPU generator seeded from (request seed, sample index): a request resumed
on another executor after a crash draws exactly the tokens it would have drawn, with no RNG state
to carry over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    seed: int
    sample_index: int


def validate_sampling(temperature: float, top_p: float) -> None:
    """Raise ValueError for parameters ``sample_token`` would reject."""
    if not temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def mix_seed(seed: int, sample_index: int) -> int:
    """splitmix64 of (seed, index): nearby seeds/indices give unrelated generator seeds."""
    z = (seed * 0x9E3779B97F4A7C15 + sample_index + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z >> 1  # torch.Generator.manual_seed wants a value that fits in int64


def sample_token(
    logits: Tensor, temperature: float, top_p: float, seed: int, sample_index: int
) -> int:
    """Greedy when temperature == 0, else temperature + top-p (nucleus) sampling."""
    validate_sampling(temperature, top_p)
    if temperature == 0.0:
        return int(torch.argmax(logits))
    # Always sample on the CPU in float32: the same draw whatever device made the logits.
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass
        # before it is still below top_p (the first token always stays).
        before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
        sorted_probs = sorted_probs[: max(1, int((before < top_p).sum()))]
    cdf = torch.cumsum(sorted_probs.double(), dim=0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mix_seed(seed, sample_index))
    draw = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    index = min(int(torch.searchsorted(cdf, draw, right=True)), len(cdf) - 1)
    return int(order[index])


def sample_tokens(logits: Tensor, params: Sequence[SamplingParams]) -> list[int]:
    """Batched ``sample_token`` over rows of ``logits`` [B, vocab]; identical results per row.

    Greedy rows share one argmax (one device sync); sampled rows go through ``sample_token``.
    """
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(params)} sampling params")
    for p in params:
        validate_sampling(p.temperature, p.top_p)
    greedy = torch.argmax(logits, dim=-1).tolist()
    return [
        greedy[row]
        if p.temperature == 0.0
        else sample_token(logits[row], p.temperature, p.top_p, p.seed, p.sample_index)
        for row, p in enumerate(params)
    ]
