"""How an engine is built: the one description every engine (and every tensor-parallel rank)
is made from (:meth:`shared.model.engine.Engine.from_spec`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shared.model.llama import Layers


@dataclass(frozen=True)
class EngineSpec:
    """An engine's model, device, KV cache sizes and layer range (picklable: it crosses to
    tensor-parallel worker processes)."""

    model_dir: Path
    device: str | None
    max_slots: int
    max_seq_len: int | None
    host_slots: int
    layers: Layers | None = None
    torch_threads: int | None = None
    block_size: int = 16
    kv_blocks: int | None = None

    def rank_device(self, rank: int) -> str | None:
        """Rank r on the r-th GPU; all ranks on the CPU otherwise."""
        if (self.device is None and torch.cuda.is_available()) or self.device == "cuda":
            return f"cuda:{rank}"
        return self.device
