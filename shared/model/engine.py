"""The in-process inference engine the executor service wraps.

Synchronous and not thread-safe: the service runs every call in one dedicated thread. A step
takes a ragged batch: new sequences are prefilled one by one, and all single-token continuations
run together as one decode batch with per-row positions. The KV cache is paged: a sequence holds
the blocks of ``block_size`` positions its length needs, taken as it grows (all or nothing per
step), so short sequences leave room for more of them.

Pipeline stage (``layers=(first, last)``): ``run_stage`` takes a :class:`StageBatch` (one
micro-batch: the scheduler's steps, plus the previous stage's hidden states past the first stage)
and returns the batch for the next stage, or, on the last stage, the sampled tokens. Each stage
keeps its own KV blocks for its layers and the same per-sequence bookkeeping, so release, offload
and upload work per stage exactly as on a whole model. Tensor parallel (``tp``): every rank runs
the same calls with the same inputs; the collectives inside make their results identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from shared.model.blocks import blocks_for
from shared.model.llama import Layers, Transformer, WeightsSource, load_transformer
from shared.model.parallel import TensorParallel
from shared.model.sampling import SamplingParams, sample_tokens, validate_sampling
from shared.model.spec import EngineSpec
from shared.model.tokenizer import TextTokenizer, read_eos_token_ids

_T = TypeVar("_T")


class EngineError(Exception):
    """A step or release the engine refuses; nothing of the step was applied."""


class NoFreeBlocksError(EngineError):
    """A step or upload needs more KV cache blocks than are free."""


class ContextLengthError(EngineError):
    """A sequence would grow past the engine's context length."""


class HostSwapFullError(EngineError):
    """More offloaded KV caches than the host swap holds."""


class UnknownSequenceError(EngineError):
    """An offload or upload names a sequence the engine does not hold there."""


class InvalidStepError(EngineError):
    """A malformed step: empty or out-of-vocabulary tokens, duplicate ids, bad sampling."""


@dataclass(frozen=True)
class SequenceStep:
    request_id: str
    # The whole prompt (or prompt + committed tokens, on recompute) on a sequence's first step;
    # afterwards exactly one token: the last one sampled.
    token_ids: list[int]
    temperature: float
    top_p: float
    seed: int
    # Tokens generated before this step; seeds the sampler so a resumed request draws the same.
    sample_index: int


@dataclass(frozen=True)
class StageBatch:
    """One micro-batch on its way through a pipeline.

    ``seqs``: the steps as the scheduler sent them (every stage sees the same ones: the token
    counts, the sampling parameters for the last stage). ``positions``: each sequence's start
    position (its cached length); the first stage fills it in, later stages check it against
    their own KV cache. ``hidden``: past the first stage, the previous stage's output
    [sum of len(token_ids), dim], rows in ``seqs`` order, each sequence's tokens in order.
    """

    seqs: list[SequenceStep]
    positions: list[int] | None = None
    hidden: Tensor | None = None

    def to_wire(self) -> dict[str, Any]:
        """Plain values and one tensor, for ``shared.codec.encode`` (msgpack)."""
        return {
            "seqs": [
                [s.request_id, s.token_ids, s.temperature, s.top_p, s.seed, s.sample_index]
                for s in self.seqs
            ],
            "positions": self.positions,
            "hidden": self.hidden,
        }

    @classmethod
    def from_wire(cls, payload: dict[str, Any]) -> StageBatch:
        """The inverse of :meth:`to_wire` (after ``shared.codec.decode``)."""
        try:
            seqs = [
                SequenceStep(str(rid), list(tokens), float(temp), float(top_p), int(seed), int(i))
                for rid, tokens, temp, top_p, seed, i in payload["seqs"]
            ]
            positions = payload.get("positions")
            hidden = payload.get("hidden")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidStepError(f"malformed stage batch: {exc!r}") from None
        if hidden is not None and not isinstance(hidden, Tensor):
            raise InvalidStepError("a stage batch's hidden states must be a tensor")
        return cls(seqs, None if positions is None else [int(p) for p in positions], hidden)


@dataclass(frozen=True)
class StageResult:
    """What ``run_stage`` produced: ``next`` (not the last stage) for the next stage; on the last
    stage the sampled ``tokens`` and the float32 ``logits`` [len(seqs), vocab] they came from."""

    next: StageBatch | None = None
    tokens: dict[str, int] | None = None
    logits: Tensor | None = None


@dataclass
class _Sequence:
    blocks: list[int]  # its KV cache blocks, in position order
    length: int  # positions holding valid K/V


@dataclass
class _HostCopy:
    length: int
    layers: list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class _Plan:
    new: list[SequenceStep]  # no cache yet: prefill from position 0
    extend: list[SequenceStep]  # known, several tokens: prefill continuing at its length
    decode: list[SequenceStep]  # known, one token: joins the batched decode


class Engine:
    def __init__(
        self,
        model_dir: Path,
        device: str | None = None,
        max_slots: int = 16,
        max_seq_len: int | None = None,
        host_slots: int = 0,
        weights: WeightsSource | None = None,
        *,
        layers: Layers | None = None,
        tp: TensorParallel | None = None,
        block_size: int = 16,
        kv_blocks: int | None = None,
    ) -> None:
        """``max_slots``: the device KV budget in sequences of the full context length (the
        pool holds ``max_slots`` x blocks of ``max_seq_len``), unless ``kv_blocks`` gives it in
        blocks; ``host_slots``: offloaded caches kept in host memory."""
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if block_size < 1 or (kv_blocks is not None and kv_blocks < 1):
            raise ValueError(f"block_size, kv_blocks must be >= 1, got {block_size}, {kv_blocks}")
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.model_dir = Path(model_dir)
        self.tp = tp
        self.model: Transformer = load_transformer(
            self.model_dir,
            torch.device(device) if device else None,
            weights=weights,
            layers=layers,
            tp=tp,
        )
        limit = self.model.args.max_position_embeddings
        self.max_seq_len = limit if max_seq_len is None else min(max_seq_len, limit)
        if kv_blocks is None:
            kv_blocks = max_slots * blocks_for(self.max_seq_len, block_size)
        if kv_blocks < blocks_for(self.max_seq_len, block_size):
            raise ValueError(
                f"{kv_blocks} KV cache blocks of {block_size} cannot hold one sequence of the"
                f" context length {self.max_seq_len}"
            )
        self.cache = self.model.setup_caches(kv_blocks, self.max_seq_len, block_size)
        self._eos_token_ids = self._read_eos_ids()
        self._sequences: dict[str, _Sequence] = {}
        # Offloaded KV caches (FastServe's host swap), at most host_slots of them.
        self.host_slots = host_slots
        self._host: dict[str, _HostCopy] = {}

    @classmethod
    def from_spec(
        cls, spec: EngineSpec, tp: TensorParallel | None, weights: WeightsSource | None = None
    ) -> Engine:
        """The engine ``spec`` describes: one tensor-parallel rank's (``tp``) or a whole one,
        from ``weights`` or read from ``spec.model_dir``."""
        return cls(
            spec.model_dir,
            # A whole engine takes the device as configured (None: the default device).
            device=spec.rank_device(tp.rank) if tp else spec.device,
            max_slots=spec.max_slots,
            max_seq_len=spec.max_seq_len,
            host_slots=spec.host_slots,
            weights=weights,
            layers=spec.layers,
            tp=tp,
            block_size=spec.block_size,
            kv_blocks=spec.kv_blocks,
        )

    # -- properties the executor service reports -------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def layers(self) -> tuple[int, int]:
        """The decoder layers (first, last) this engine holds."""
        return self.model.first_layer, self.model.last_layer

    @property
    def n_layers(self) -> int:
        """Decoder layers of the whole model."""
        return self.model.args.n_layers

    @property
    def world_size(self) -> int:
        """Tensor-parallel ranks computing each call (1: none)."""
        return self.tp.world_size if self.tp else 1

    @property
    def can_send_weights(self) -> bool:
        """Whole tensors here (not a tensor-parallel rank's shards): they can go to a peer."""
        return self.tp is None

    @property
    def is_first_stage(self) -> bool:
        return self.model.is_first

    @property
    def is_last_stage(self) -> bool:
        return self.model.is_last

    @property
    def context_length(self) -> int:
        """Most positions a sequence may use: max_position_embeddings, or max_seq_len if lower."""
        return self.max_seq_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def num_free_blocks(self) -> int:
        return self.cache.num_free

    @property
    def kv_blocks(self) -> int:
        """KV cache blocks on the device."""
        return self.cache.num_blocks

    @property
    def block_size(self) -> int:
        """Positions per KV cache block."""
        return self.cache.block_size

    def fitting_uploads(self, request_ids: list[str]) -> list[str]:
        """The longest prefix of these offloaded sequences whose caches fit the free blocks."""
        free, fitting = self.cache.num_free, []
        for request_id in request_ids:
            copy = self._host.get(request_id)
            if copy is None or self.cache.blocks_for(copy.length) > free:
                break
            free -= self.cache.blocks_for(copy.length)
            fitting.append(request_id)
        return fitting

    def has_sequence(self, request_id: str) -> bool:
        return request_id in self._sequences

    def sequence_ids(self) -> list[str]:
        """Every sequence whose KV cache the engine holds (on the device or offloaded)."""
        return [*self._sequences, *self._host]

    def sequence_length(self, request_id: str) -> int:
        """Positions of the sequence's device cache holding K/V (0 if unknown)."""
        sequence = self._sequences.get(request_id)
        return sequence.length if sequence else 0

    def held_layers(self) -> set[int]:
        """Layers it holds, with -1 for the embeddings and ``n_layers`` for the norm and head."""
        first, final = self.layers
        held = set(range(first, final + 1))
        held |= {-1} if self.is_first_stage else set()
        held |= {self.n_layers} if self.is_last_stage else set()
        return held

    def checkpoint_tensors(self, layers: list[int]) -> dict[str, Tensor]:
        """Its weights for these layers (numbered as :meth:`held_layers`) under their
        checkpoint (HF) names."""
        tensors = {}
        for name, parameter in self.model.named_parameters():
            if name.startswith("layers."):
                index, rest = name.removeprefix("layers.").split(".", 1)
                layer = self.model.first_layer + int(index)
                if layer in layers:
                    tensors[f"model.layers.{layer}.{rest}"] = parameter.detach()
            elif name.startswith("embed_tokens."):
                if -1 in layers:
                    tensors[f"model.{name}"] = parameter.detach()
            elif self.n_layers in layers:
                head = name.startswith("lm_head.")
                tensors[name if head else f"model.{name}"] = parameter.detach()
        return tensors

    # -- lifecycle ---------------------------------------------------------------------------

    def rebuild(self, spec: EngineSpec, weights: WeightsSource | None = None) -> Engine:
        """A new engine for ``spec`` (another layer range), from ``weights`` or from disk."""
        return Engine.from_spec(spec, self.tp, weights)

    def dead_ranks(self) -> list[int]:
        """Tensor-parallel ranks whose process died: none in this process's engine."""
        return []

    def close(self) -> None:
        """Nothing to stop: the engine's memory goes with its last reference."""

    # -- the work --------------------------------------------------------------------------

    def step(self, seqs: list[SequenceStep]) -> dict[str, int]:
        """Run one iteration; return the sampled token of each sequence (request_id -> id).
        A whole model only: a pipeline stage runs ``run_stage``."""
        if not seqs:
            return {}
        if not (self.model.is_first and self.model.is_last):
            raise EngineError(f"this engine holds layers {self.layers}: use run_stage")
        plan = self._plan(seqs)
        return self._run(seqs, plan, None, lambda logits: self._sample(seqs, logits)[0])

    def run_stage(self, batch: StageBatch) -> StageResult:
        """Run one micro-batch through this stage's layers (all or nothing, like ``step``).

        First stage: ``batch.hidden`` is None and the tokens are embedded. Later stages: the
        previous stage's hidden states, and ``batch.positions`` must match this stage's cache.
        Not the last stage: returns ``next``, the batch to send on (positions filled in, hidden
        states [rows, dim] in the model's dtype). Last stage: ``tokens`` sampled per sequence
        exactly as ``step`` samples them, and their ``logits``."""
        seqs = batch.seqs
        plan = self._plan(seqs) if seqs else _Plan(new=[], extend=[], decode=[])
        positions = [self.sequence_length(seq.request_id) for seq in seqs]
        if batch.positions is not None and list(batch.positions) != positions:
            raise InvalidStepError(
                f"stage {self.layers} holds positions {positions} of {[s.request_id for s in seqs]}"
                f", the batch says {list(batch.positions)}"
            )
        inputs = self._stage_inputs(batch)

        def finish(outputs: dict[str, Tensor]) -> StageResult:
            if not self.model.is_last:
                rows = [outputs[seq.request_id] for seq in seqs]
                empty = torch.empty(0, self.model.args.dim, dtype=self.model.dtype)
                hidden = torch.cat(rows) if rows else empty.to(self.device)
                return StageResult(next=StageBatch(seqs, positions, hidden))
            if not seqs:
                return StageResult(tokens={})
            tokens, logits = self._sample(seqs, outputs)
            return StageResult(tokens=tokens, logits=logits)

        return self._run(seqs, plan, inputs, finish)

    def release(self, request_ids: Iterable[str]) -> None:
        """Free the blocks (and host copies) of these sequences; unknown ids are ignored."""
        for request_id in request_ids:
            sequence = self._sequences.pop(request_id, None)
            if sequence is not None:
                self.cache.free(sequence.blocks)
            self._host.pop(request_id, None)

    def offloaded_ids(self) -> list[str]:
        return list(self._host)

    def offload(self, request_ids: list[str]) -> None:
        """Move these sequences' KV caches to host memory and free their blocks (all or none)."""
        missing = [rid for rid in request_ids if rid not in self._sequences]
        if missing:
            raise UnknownSequenceError(f"cannot offload sequences without a KV cache: {missing}")
        if len(self._host) + len(request_ids) > self.host_slots:
            raise HostSwapFullError(
                f"offloading {len(request_ids)} caches would exceed the host swap of "
                f"{self.host_slots} ({len(self._host)} held)"
            )
        pin = self.device.type == "cuda"
        for request_id in request_ids:
            sequence = self._sequences.pop(request_id)
            layers = self.cache.copy_out(sequence.blocks, sequence.length, pin_memory=pin)
            self._host[request_id] = _HostCopy(length=sequence.length, layers=layers)
            self.cache.free(sequence.blocks)
        if pin:
            torch.cuda.synchronize(self.device)  # the blocks may be reused right away

    def upload(self, request_ids: list[str]) -> None:
        """Bring offloaded KV caches back into free blocks (all or none)."""
        missing = [rid for rid in request_ids if rid not in self._host]
        if missing:
            raise UnknownSequenceError(f"cannot upload sequences not offloaded: {missing}")
        needed = sum(self.cache.blocks_for(self._host[rid].length) for rid in request_ids)
        if needed > self.cache.num_free:
            raise NoFreeBlocksError(
                f"uploading {len(request_ids)} caches needs {needed} KV cache blocks, only "
                f"{self.cache.num_free} of {self.cache.num_blocks} are free"
            )
        for request_id in request_ids:
            copy = self._host.pop(request_id)
            self._place(request_id, copy.length, copy.layers)

    def export_kv(self, request_id: str) -> tuple[int, dict[str, Tensor]]:
        """A sequence's KV cache as named host tensors (``<layer>.k``/``<layer>.v``, the
        stage's local layers), for another executor; the sequence stays here until released."""
        if request_id in self._sequences:
            sequence = self._sequences[request_id]
            layers = self.cache.copy_out(sequence.blocks, sequence.length, pin_memory=False)
            length = sequence.length
        elif request_id in self._host:
            length, layers = self._host[request_id].length, self._host[request_id].layers
        else:
            raise UnknownSequenceError(f"no KV cache of {request_id} here")
        tensors = {}
        for layer, (k, v) in enumerate(layers):
            tensors[f"{layer}.k"], tensors[f"{layer}.v"] = k, v
        return length, tensors

    def import_kv(
        self, request_id: str, length: int, tensors: dict[str, Tensor], into: str = "auto"
    ) -> str:
        """Take a KV cache exported by another executor: into the host swap when it has room
        (the scheduler uploads it before the sequence runs), else into free device blocks;
        ``into="host"`` always parks it in host memory. Returns where it landed."""
        if request_id in self._sequences or request_id in self._host:
            raise InvalidStepError(f"{request_id} already has a KV cache here")
        layers = []
        for layer in range(len(self.cache.k)):
            k, v = tensors.get(f"{layer}.k"), tensors.get(f"{layer}.v")
            expected = (self.cache.n_kv_heads, length, self.cache.k[layer].shape[-1])
            if k is None or v is None or tuple(k.shape) != expected or k.shape != v.shape:
                raise InvalidStepError(
                    f"KV cache of {request_id}: layer {layer} should be {expected}, got"
                    f" {None if k is None else tuple(k.shape)}"
                )
            dtype = self.cache.k[layer].dtype
            layers.append((k.to(dtype), v.to(dtype)))
        if length > self.max_seq_len:
            raise InvalidStepError(f"KV cache of {length} positions exceeds {self.max_seq_len}")
        if into == "host" or len(self._host) < self.host_slots:
            self._host[request_id] = _HostCopy(length=length, layers=layers)
            return "host"
        if self.cache.blocks_for(length) > self.cache.num_free:
            raise NoFreeBlocksError(
                f"no room for the KV cache of {request_id}: {self.cache.blocks_for(length)}"
                f" blocks, {self.cache.num_free} free"
            )
        self._place(request_id, length, layers)
        return "device"

    def _place(self, request_id: str, length: int, layers: list[tuple[Tensor, Tensor]]) -> None:
        """Copy a host cache into newly taken device blocks (the caller checked they fit)."""
        blocks = self.cache.allocate(self.cache.blocks_for(length))
        self.cache.copy_in(blocks, layers)
        self._sequences[request_id] = _Sequence(blocks=blocks, length=length)

    # -- helpers -----------------------------------------------------------------------------

    def _run(
        self,
        seqs: list[SequenceStep],
        plan: _Plan,
        inputs: dict[str, Tensor] | None,
        finish: Callable[[dict[str, Tensor]], _T],
    ) -> _T:
        """Prefill new and extended sequences one by one, decode the rest as one batch, then
        ``finish(outputs)`` (logits on the last stage, else hidden states, per sequence); commit
        the new lengths only when all of it succeeded, and return what ``finish`` made."""
        outputs: dict[str, Tensor] = {}
        grown = {seq.request_id: self.cache.allocate(self._growth(seq)) for seq in seqs}
        try:
            for seq in [*plan.new, *plan.extend]:
                outputs[seq.request_id] = self._prefill(seq, self._table(seq, grown), inputs)
            if plan.decode:
                outputs.update(self._decode(plan.decode, grown, inputs))
            result = finish(outputs)
        except BaseException:
            # The cache positions written are past every sequence's length: harmless garbage.
            self.cache.free([block for blocks in grown.values() for block in blocks])
            raise
        self._commit(seqs, grown)
        return result

    def _growth(self, seq: SequenceStep) -> int:
        """New blocks this step's tokens need beyond those the sequence holds."""
        known = self._sequences.get(seq.request_id)
        held, length = (len(known.blocks), known.length) if known else (0, 0)
        return self.cache.blocks_for(length + len(seq.token_ids)) - held

    def _table(self, seq: SequenceStep, grown: dict[str, list[int]]) -> list[int]:
        """The sequence's blocks for this step: those it holds, then those just taken."""
        known = self._sequences.get(seq.request_id)
        return [*(known.blocks if known else []), *grown[seq.request_id]]

    def _stage_inputs(self, batch: StageBatch) -> dict[str, Tensor] | None:
        """Past the first stage, each sequence's rows of the incoming hidden states."""
        if self.model.is_first:
            if batch.hidden is not None:
                raise InvalidStepError("the first stage embeds token ids, not hidden states")
            return None
        hidden = batch.hidden
        rows = sum(len(seq.token_ids) for seq in batch.seqs)
        if hidden is None or tuple(hidden.shape) != (rows, self.model.args.dim):
            shape = None if hidden is None else list(hidden.shape)
            raise InvalidStepError(
                f"stage {self.layers} needs hidden states [{rows}, {self.model.args.dim}] for "
                f"this batch, got {shape}"
            )
        hidden = hidden.to(self.device, self.model.dtype)
        inputs, start = {}, 0
        for seq in batch.seqs:
            inputs[seq.request_id] = hidden[start : start + len(seq.token_ids)]
            start += len(seq.token_ids)
        return inputs

    def _plan(self, seqs: list[SequenceStep]) -> _Plan:
        """Validate the whole batch before any compute, and split it by kind of work."""
        seen: set[str] = set()
        plan = _Plan(new=[], extend=[], decode=[])
        for seq in seqs:
            if seq.request_id in seen:
                raise InvalidStepError(f"request {seq.request_id!r} appears twice in one step")
            seen.add(seq.request_id)
            self._check_tokens(seq)
            self._check_sampling(seq)
            if seq.request_id in self._host:
                raise InvalidStepError(
                    f"request {seq.request_id!r} is offloaded to host memory: upload it first"
                )
            known = self._sequences.get(seq.request_id)
            self._check_length(seq, known.length if known else 0)
            if known is None:
                plan.new.append(seq)
            elif len(seq.token_ids) == 1:
                plan.decode.append(seq)
            else:
                plan.extend.append(seq)
        needed = sum(self._growth(seq) for seq in seqs)
        if needed > self.cache.num_free:
            raise NoFreeBlocksError(
                f"this step needs {needed} more KV cache blocks ({len(plan.new)} new sequences),"
                f" only {self.cache.num_free} of {self.cache.num_blocks} are free"
            )
        return plan

    def _check_tokens(self, seq: SequenceStep) -> None:
        if not seq.token_ids:
            raise InvalidStepError(f"request {seq.request_id!r} has an empty token list")
        bad = [t for t in seq.token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidStepError(
                f"request {seq.request_id!r} has token ids outside the vocabulary "
                f"[0, {self.vocab_size}): {bad[:5]}"
            )

    def _check_sampling(self, seq: SequenceStep) -> None:
        try:
            validate_sampling(seq.temperature, seq.top_p)
        except ValueError as exc:
            raise InvalidStepError(f"request {seq.request_id!r}: {exc}") from None

    def _check_length(self, seq: SequenceStep, length: int) -> None:
        total = length + len(seq.token_ids)
        if total > self.max_seq_len:
            raise ContextLengthError(
                f"request {seq.request_id!r} would reach {total} tokens "
                f"({length} cached + {len(seq.token_ids)} new), over the context length "
                f"{self.max_seq_len}"
            )

    def _prefill(
        self, seq: SequenceStep, table: list[int], inputs: dict[str, Tensor] | None
    ) -> Tensor:
        if inputs is None:
            x = torch.tensor(seq.token_ids, dtype=torch.long, device=self.device)
        else:
            x = inputs[seq.request_id]
        return self.model.prefill(x, self._long(table), self.sequence_length(seq.request_id))

    def _decode(
        self,
        seqs: list[SequenceStep],
        grown: dict[str, list[int]],
        inputs: dict[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        positions = [self._sequences[seq.request_id].length for seq in seqs]
        if inputs is None:
            x = self._long([seq.token_ids[0] for seq in seqs])
        else:
            x = torch.cat([inputs[seq.request_id] for seq in seqs])
        tables = [self._table(seq, grown) for seq in seqs]
        width = max(len(table) for table in tables)
        # Rows padded with block 0: positions past a row's length are masked out.
        padded = [table + [0] * (width - len(table)) for table in tables]
        out = self.model.decode_one_token(
            x,
            torch.tensor(padded, dtype=torch.long, device=self.device),
            self._long(positions),
            max_len=max(positions) + 1,  # known here: saves a device sync
        )
        if not self.model.is_last:
            out = out[:, None]  # hidden rows [1, dim]: one token each, like a prefill's [T, dim]
        return {seq.request_id: out[row] for row, seq in enumerate(seqs)}

    def _sample(
        self, seqs: list[SequenceStep], logits: dict[str, Tensor]
    ) -> tuple[dict[str, int], Tensor]:
        stacked = torch.stack([logits[seq.request_id] for seq in seqs])
        params = [SamplingParams(s.temperature, s.top_p, s.seed, s.sample_index) for s in seqs]
        tokens = sample_tokens(stacked, params)
        return {seq.request_id: token for seq, token in zip(seqs, tokens, strict=True)}, stacked

    def _commit(self, seqs: list[SequenceStep], grown: dict[str, list[int]]) -> None:
        for seq in seqs:
            sequence = self._sequences.setdefault(seq.request_id, _Sequence(blocks=[], length=0))
            sequence.blocks.extend(grown[seq.request_id])
            sequence.length += len(seq.token_ids)

    def _long(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _read_eos_ids(self) -> frozenset[int]:
        try:
            return TextTokenizer.from_model_dir(self.model_dir).eos_token_ids
        except FileNotFoundError:  # a directory without tokenizer.json: config files only
            return read_eos_token_ids(self.model_dir)
