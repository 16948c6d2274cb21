"""What the executor needs of an engine, whether one process holds the whole of each layer
(:class:`shared.model.engine.Engine`) or tensor-parallel ranks share them
(``services.executor.ranks.ShardedEngine``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import torch

from shared.model.engine import SequenceStep, StageBatch, StageResult
from shared.model.llama import WeightsSource

if TYPE_CHECKING:
    from shared.model.spec import EngineSpec


class InferenceEngine(Protocol):
    """Synchronous and not thread-safe: every call runs on the executor's compute thread
    (the reads below may also come from a metrics scrape)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def layers(self) -> tuple[int, int]:
        """The decoder layers (first, last) this engine holds."""
        ...

    @property
    def n_layers(self) -> int:
        """Decoder layers of the whole model."""
        ...

    @property
    def is_first_stage(self) -> bool: ...

    @property
    def is_last_stage(self) -> bool: ...

    @property
    def world_size(self) -> int:
        """Tensor-parallel ranks computing each call (1: none)."""
        ...

    @property
    def can_send_weights(self) -> bool:
        """Whether it holds whole tensors it can hand to a peer (and take from peers) under
        their checkpoint names; tensor-parallel ranks hold shards and read them from disk."""
        ...

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def kv_blocks(self) -> int:
        """KV cache blocks on the device."""
        ...

    @property
    def block_size(self) -> int:
        """Positions per KV cache block."""
        ...

    @property
    def context_length(self) -> int:
        """Most positions one sequence may use."""
        ...

    def fitting_uploads(self, request_ids: list[str]) -> list[str]:
        """The longest prefix of these offloaded sequences whose caches fit the free blocks."""
        ...

    def sequence_ids(self) -> list[str]: ...

    def offloaded_ids(self) -> list[str]: ...

    def sequence_length(self, request_id: str) -> int: ...

    def step(self, seqs: list[SequenceStep]) -> dict[str, int]: ...

    def run_stage(self, batch: StageBatch) -> StageResult: ...

    def release(self, request_ids: Iterable[str]) -> None: ...

    def offload(self, request_ids: list[str]) -> None: ...

    def upload(self, request_ids: list[str]) -> None: ...

    def export_kv(self, request_id: str) -> tuple[int, dict[str, torch.Tensor]]: ...

    def import_kv(
        self, request_id: str, length: int, tensors: dict[str, torch.Tensor], into: str = "auto"
    ) -> str: ...

    def held_layers(self) -> set[int]:
        """Layers it holds, with -1 for the embeddings and ``n_layers`` for the norm and head."""
        ...

    def checkpoint_tensors(self, layers: list[int]) -> dict[str, torch.Tensor]:
        """Its weights for these layers (numbered as :meth:`held_layers`) under their
        checkpoint (HF) names; only where :attr:`can_send_weights`."""
        ...

    def rebuild(self, spec: EngineSpec, weights: WeightsSource | None = None) -> InferenceEngine:
        """The engine for ``spec`` (another layer range), from ``weights`` or from disk: a new
        engine, or this one with every rank rebuilt."""
        ...

    def dead_ranks(self) -> list[int]:
        """Tensor-parallel ranks whose process died."""
        ...

    def close(self) -> None: ...
