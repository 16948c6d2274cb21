"""Building an instance's engine: one factory for every kind, from an :class:`EngineSpec`."""

from __future__ import annotations

import torch

from services.executor.ranks import ShardedEngine
from shared.model.engine import Engine, SequenceStep
from shared.model.interface import InferenceEngine
from shared.model.llama import WeightsSource
from shared.model.spec import EngineSpec

# Tokens of the warm-up prefill: enough to run the prefill kernels once.
WARM_UP_PROMPT_TOKENS = 16
WARM_UP_ID = "warm-up"


def build_engine(
    spec: EngineSpec, ranks: int, weights: WeightsSource | None = None
) -> InferenceEngine:
    """The engine for ``spec`` on ``ranks`` tensor-parallel ranks, from ``weights`` (one rank
    only: tensor-parallel ranks read their shards from disk) or from ``spec.model_dir``."""
    if ranks > 1:
        if weights is not None:
            raise ValueError("tensor-parallel ranks read their shards from disk, not weights")
        return ShardedEngine(spec, ranks)
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    return Engine.from_spec(spec, None, weights)


def warm_up(engine: InferenceEngine) -> None:
    """One prefill and one decode before serving: the first real request should not pay for
    the kernels' first-call setup."""
    prompt = [0] * WARM_UP_PROMPT_TOKENS
    first = engine.step([SequenceStep(WARM_UP_ID, prompt, 0.0, 1.0, 0, 0)])
    engine.step([SequenceStep(WARM_UP_ID, [first[WARM_UP_ID]], 0.0, 1.0, 0, 1)])
    engine.release([WARM_UP_ID])
