"""The model layer: embedded checkpoint, Llama forward pass, sampling, engine and tokenizer.

Names are imported lazily (PEP 562): ``from shared.model.tokenizer import TextTokenizer`` in the
admission service must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.model.checkpoint import (
        MODEL_SIZES,
        ModelSize,
        SizeSpec,
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
    from shared.model.interface import InferenceEngine
    from shared.model.llama import (
        KVCache,
        KVCacheFullError,
        ModelArgs,
        Transformer,
        load_transformer,
    )
    from shared.model.sampling import SamplingParams, sample_token, sample_tokens
    from shared.model.spec import EngineSpec
    from shared.model.tokenizer import IncrementalDetokenizer, TextTokenizer

_EXPORTS: dict[str, str] = {
    "MODEL_SIZES": "checkpoint",
    "ModelSize": "checkpoint",
    "SizeSpec": "checkpoint",
    "default_model_dir": "checkpoint",
    "ensure_model": "checkpoint",
    "init_model": "checkpoint",
    "is_complete_model": "checkpoint",
    "ContextLengthError": "engine",
    "Engine": "engine",
    "EngineError": "engine",
    "InvalidStepError": "engine",
    "NoFreeBlocksError": "engine",
    "SequenceStep": "engine",
    "InferenceEngine": "interface",
    "EngineSpec": "spec",
    "KVCache": "llama",
    "KVCacheFullError": "llama",
    "ModelArgs": "llama",
    "Transformer": "llama",
    "load_transformer": "llama",
    "SamplingParams": "sampling",
    "sample_token": "sampling",
    "sample_tokens": "sampling",
    "IncrementalDetokenizer": "tokenizer",
    "TextTokenizer": "tokenizer",
}

__all__ = [
    "MODEL_SIZES",
    "ContextLengthError",
    "Engine",
    "EngineError",
    "EngineSpec",
    "IncrementalDetokenizer",
    "InferenceEngine",
    "InvalidStepError",
    "KVCache",
    "KVCacheFullError",
    "ModelArgs",
    "ModelSize",
    "NoFreeBlocksError",
    "SamplingParams",
    "SequenceStep",
    "SizeSpec",
    "TextTokenizer",
    "Transformer",
    "default_model_dir",
    "ensure_model",
    "init_model",
    "is_complete_model",
    "load_transformer",
    "sample_token",
    "sample_tokens",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
