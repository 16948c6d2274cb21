"""spotserve's loading-optimized checkpoint format.

A converted model is a directory with data-only partition files and one JSON index::

    index.json         {"version", "config", "partitions": [...], "tensors": {...}}
    part-00000.bin     raw tensor bytes, each tensor aligned to ALIGNMENT bytes
    config.json, tokenizer files ...   copied from the source so the directory is a model

Tensors are written in execution order (embeddings, layer 0 .. L-1, final norm, head), so a
pipeline stage (a layer range) reads one contiguous byte range. Every tensor and partition
carries its size and a CRC32 so truncation and corruption are found on load.

With a tensor-parallel degree M > 1 (index version 2, ``tp_degree`` M), Llama weights are split
Megatron-style: column-parallel projections (q/k/v, gate/up, lm_head) on dim 0, row-parallel ones
(o_proj, down_proj) on dim 1, the rest replicated. The layout is the embedding once, then one
region per shard m holding, in execution order, every layer's norms (copied into each region:
they are tiny) and shard m's pieces, then the final norm and shard m of the head. So a stage of
one shard is one byte range (plus the embedding's for the first stage) and a whole shard is one.
A split tensor's entry keeps its full shape, size and CRC32, its ``split_dim`` and its ``shards``
(one piece per rank); its ``partition``/``offset`` locate shard 0's piece. A per-region copy of
a replicated tensor has ``shards`` (one copy per rank) and no ``split_dim``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from pydantic import BaseModel, Field

FORMAT_VERSION = 1
# A tensor-parallel layout: a version-1 reader would misread its split tensors.
TP_FORMAT_VERSION = 2
INDEX_FILE = "index.json"
# Direct I/O needs offsets and lengths aligned to the logical block size; 4 KiB covers it.
ALIGNMENT = 4096
PARTITION_BYTES = 1 << 30
_COPIED_SUFFIXES = (".json", ".model", ".txt")
_SKIPPED = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW_PARALLEL = ("o_proj", "down_proj")

Layers = tuple[int, int]
ByteRange = tuple[int, int, int]  # (partition, start, end), start and end aligned


class CheckpointError(Exception):
    """A checkpoint is missing, truncated, corrupt or not what the index says."""


class PieceEntry(BaseModel):
    """One stored piece of a tensor: a tensor-parallel shard, or one shard's replicated copy."""

    partition: int
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    shape: list[int]
    crc32: int


class TensorEntry(BaseModel):
    partition: int
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    shape: list[int]
    dtype: str
    crc32: int
    layer: int | None = None
    split_dim: int | None = None
    shards: list[PieceEntry] | None = None

    def stored(self) -> list[tuple[int, int, int]]:
        """(partition, offset, nbytes) of the bytes that make up the whole tensor."""
        if self.split_dim is not None and self.shards:
            return [(p.partition, p.offset, p.nbytes) for p in self.shards]
        return [(self.partition, self.offset, self.nbytes)]


class PartitionEntry(BaseModel):
    file: str
    nbytes: int = Field(ge=0)
    crc32: int


class CheckpointIndex(BaseModel):
    version: int = FORMAT_VERSION
    partitions: list[PartitionEntry]
    tensors: dict[str, TensorEntry]
    tp_degree: int = Field(default=1, ge=1)

    @property
    def num_layers(self) -> int:
        return 1 + max((e.layer for e in self.tensors.values() if e.layer is not None), default=-1)

    def to_json(self) -> str:
        # A single-shard index is written exactly as before: the newer fields only when used.
        exclude: Any = None
        if self.tp_degree == 1:
            exclude = {"tp_degree": True, "tensors": {"__all__": {"split_dim", "shards"}}}
        return self.model_dump_json(indent=1, exclude=exclude)

    def layer_range_bytes(self, first: int, last: int) -> tuple[int, int, int]:
        """(partition, start, end) covering layers first..last if they share one partition."""
        pieces = [
            piece
            for e in self.tensors.values()
            if e.layer is not None and first <= e.layer <= last
            for piece in e.stored()
        ]
        partitions = {partition for partition, _, _ in pieces}
        if len(partitions) != 1:
            raise CheckpointError(f"layers {first}..{last} span partitions {sorted(partitions)}")
        return (
            partitions.pop(),
            min(offset for _, offset, _ in pieces),
            max(offset + nbytes for _, offset, nbytes in pieces),
        )

    def covers_everything(self, layers: Layers | None, tp_rank: int | None) -> bool:
        self._check_selection(layers, tp_rank)
        all_layers = layers is None or tuple(layers) == (0, self.num_layers - 1)
        return all_layers and (tp_rank is None or self.tp_degree == 1)

    def select(self, layers: Layers | None = None, tp_rank: int | None = None) -> CheckpointIndex:
        """The entries that stage ``layers`` (first, last) of shard ``tp_rank`` needs, over the
        same partitions: embeddings when first is 0, the final norm and head when last is the
        final layer. With a rank, each split tensor becomes a plain entry of that rank's piece
        and each per-region replicated tensor one of that rank's copy."""
        self._check_selection(layers, tp_rank)
        first, last = layers if layers is not None else (0, self.num_layers - 1)
        rank = tp_rank if self.tp_degree > 1 else None
        chosen: dict[str, TensorEntry] = {}
        for name, entry in self.tensors.items():
            if "embed" in name:  # as in execution_order: embeddings lead the first stage
                wanted = first == 0
            elif entry.layer is None:
                wanted = last == self.num_layers - 1
            else:
                wanted = first <= entry.layer <= last
            if not wanted:
                continue
            if rank is None or not entry.shards:
                chosen[name] = entry
                continue
            piece = entry.shards[rank]
            chosen[name] = TensorEntry(
                partition=piece.partition,
                offset=piece.offset,
                nbytes=piece.nbytes,
                shape=piece.shape,
                dtype=entry.dtype,
                crc32=piece.crc32,
                layer=entry.layer,
            )
        return self.model_copy(update={"tensors": chosen})

    def read_ranges(
        self, layers: Layers | None = None, tp_rank: int | None = None
    ) -> list[ByteRange]:
        """The aligned byte ranges holding what ``select`` picks, adjacent tensors coalesced
        (only alignment padding lies between them); everything is one range per partition."""
        if self.covers_everything(layers, tp_rank):
            return [(p, 0, _aligned(part.nbytes)) for p, part in enumerate(self.partitions)]
        pieces = sorted(
            piece
            for entry in self.select(layers, tp_rank).tensors.values()
            for piece in entry.stored()
            if piece[2]
        )
        ranges: list[ByteRange] = []
        for partition, offset, nbytes in pieces:
            end = _aligned(offset + nbytes)
            if ranges and ranges[-1][0] == partition and offset <= ranges[-1][2]:
                ranges[-1] = (partition, ranges[-1][1], max(end, ranges[-1][2]))
            else:
                ranges.append((partition, offset, end))
        return ranges

    def _check_selection(self, layers: Layers | None, tp_rank: int | None) -> None:
        if tp_rank is not None and not 0 <= tp_rank < self.tp_degree:
            if self.tp_degree == 1:
                raise CheckpointError(
                    f"tp_rank {tp_rank} asked of a checkpoint without tensor parallelism"
                    " (tp_degree 1); convert it with --tp"
                )
            raise CheckpointError(
                f"tp_rank {tp_rank} is out of range: the checkpoint has tp_degree {self.tp_degree}"
            )
        if layers is not None:
            first, last = layers
            if not 0 <= first <= last < self.num_layers:
                raise CheckpointError(
                    f"layers {first}..{last} are out of range: the checkpoint has layers"
                    f" 0..{self.num_layers - 1}"
                )


def _aligned(offset: int) -> int:
    return offset + (-offset) % ALIGNMENT


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the index")
    return dtype


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def execution_order(names: list[str]) -> list[str]:
    """Embeddings first, then layers in order, then everything else (norm, head)."""

    def key(name: str) -> tuple[int, int, str]:
        layer = layer_of(name)
        if "embed" in name:
            return (0, 0, name)
        if layer is not None:
            return (1, layer, name)
        return (2, 0, name)

    return sorted(names, key=key)


def tp_split_dim(name: str, ndim: int) -> int | None:
    """Megatron-style tensor-parallel split dimension of a weight, None when replicated.

    A row-parallel bias is added after the all-reduce, so it stays whole."""
    if "embed" in name:
        return None
    if any(key in name for key in _COLUMN_PARALLEL) and ndim >= 1:
        return 0
    if any(key in name for key in _ROW_PARALLEL) and ndim >= 2:
        return 1
    return None


def iter_source_tensors(source: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of an HF directory: safetensors (single or sharded) or PyTorch .bin files."""
    from safetensors import safe_open

    files = sorted(source.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        return
    bins = sorted(source.glob("*.bin"))
    if not bins:
        raise CheckpointError(f"{source} has no *.safetensors or *.bin weights")
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True)
        yield from state.items()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().view(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


# What is written, in file order: (tensor name, shard rank or None when stored once, bytes).
_Item = tuple[str, int | None, torch.Tensor]


def _layout(tensors: dict[str, torch.Tensor], tp_degree: int) -> list[_Item]:
    order = execution_order(list(tensors))
    if tp_degree == 1:
        return [(name, None, tensors[name]) for name in order]
    pieces: dict[str, tuple[torch.Tensor, ...]] = {}
    for name in order:
        tensor = tensors[name]
        dim = tp_split_dim(name, tensor.dim())
        if dim is None:
            continue
        if tensor.shape[dim] % tp_degree:
            raise CheckpointError(
                f"cannot split {name} (shape {list(tensor.shape)}) into {tp_degree}"
                f" tensor-parallel shards: dim {dim} is not divisible by {tp_degree}"
            )
        pieces[name] = torch.chunk(tensor, tp_degree, dim)
    head = [name for name in order if "embed" in name]
    rest = [name for name in order if "embed" not in name]
    items: list[_Item] = [(name, None, tensors[name]) for name in head]
    for rank in range(tp_degree):
        items += [(n, rank, pieces[n][rank] if n in pieces else tensors[n]) for n in rest]
    return items


def _check_heads(source: Path, tp_degree: int) -> None:
    """Each shard must hold whole attention heads, not just an even number of rows."""
    import json

    config = json.loads((source / "config.json").read_text())
    for key in ("num_attention_heads", "num_key_value_heads"):
        count = config.get(key)
        if isinstance(count, int) and count % tp_degree:
            raise CheckpointError(
                f"{key} {count} of {source} is not divisible by the tensor-parallel degree"
                f" {tp_degree}"
            )


def convert(
    source: Path,
    destination: Path,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    tp_degree: int = 1,
) -> CheckpointIndex:
    """Convert an HF model directory; written to a temp dir, renamed into place when complete.

    ``tp_degree`` > 1 writes the tensor-parallel layout described in the module docstring."""
    if not (source / "config.json").exists():
        raise CheckpointError(f"{source} is not a model directory (no config.json)")
    if tp_degree < 1:
        raise CheckpointError(f"the tensor-parallel degree must be >= 1, not {tp_degree}")
    if destination.exists() and not force:
        raise FileExistsError(f"{destination} exists; use --force to replace it")
    tensors = dict(iter_source_tensors(source))
    items = _layout(tensors, tp_degree)
    if tp_degree > 1:
        _check_heads(source, tp_degree)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        partitions, pieces = _write_partitions(staging, items, progress)
        index = _build_index(tensors, partitions, pieces, tp_degree)
        for file in source.iterdir():
            if file.suffix in _COPIED_SUFFIXES and file.name not in _SKIPPED:
                shutil.copy2(file, staging / file.name)
        (staging / INDEX_FILE).write_text(index.to_json())
        staging.chmod(0o755)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def _build_index(
    tensors: dict[str, torch.Tensor],
    partitions: list[PartitionEntry],
    pieces: dict[tuple[str, int | None], PieceEntry],
    tp_degree: int,
) -> CheckpointIndex:
    entries: dict[str, TensorEntry] = {}
    for name in execution_order(list(tensors)):
        tensor = tensors[name]
        shards = [pieces[name, rank] for rank in range(tp_degree)] if (name, 0) in pieces else None
        first = shards[0] if shards else pieces[name, None]
        split_dim = tp_split_dim(name, tensor.dim()) if shards else None
        entries[name] = TensorEntry(
            partition=first.partition,
            offset=first.offset,
            nbytes=tensor.numel() * tensor.element_size(),
            shape=list(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            crc32=zlib.crc32(_raw_bytes(tensor)) if split_dim is not None else first.crc32,
            layer=layer_of(name),
            split_dim=split_dim,
            shards=shards,
        )
    return CheckpointIndex(
        version=FORMAT_VERSION if tp_degree == 1 else TP_FORMAT_VERSION,
        partitions=partitions,
        tensors=entries,
        tp_degree=tp_degree,
    )


def _write_partitions(
    directory: Path,
    items: list[_Item],
    progress: Callable[[int, int], None] | None,
) -> tuple[list[PartitionEntry], dict[tuple[str, int | None], PieceEntry]]:
    pieces: dict[tuple[str, int | None], PieceEntry] = {}
    partitions: list[PartitionEntry] = []
    total = sum(t.numel() * t.element_size() for _, _, t in items)
    written = 0
    handle, number, offset, crc = None, -1, 0, 0
    try:
        for name, rank, tensor in items:
            data = _raw_bytes(tensor)
            if handle is None or (offset + len(data) > PARTITION_BYTES and offset > 0):
                if handle is not None:
                    partitions.append(_close_partition(handle, number, offset, crc))
                number += 1
                handle = open(directory / f"part-{number:05d}.bin", "wb")
                offset, crc = 0, 0
            padding = (-offset) % ALIGNMENT
            if padding:
                handle.write(b"\0" * padding)
                crc = zlib.crc32(b"\0" * padding, crc)
                offset += padding
            handle.write(data)
            crc = zlib.crc32(data, crc)
            pieces[name, rank] = PieceEntry(
                partition=number,
                offset=offset,
                nbytes=len(data),
                shape=list(tensor.shape),
                crc32=zlib.crc32(data),
            )
            offset += len(data)
            written += len(data)
            if progress:
                progress(written, total)
        if handle is not None:
            partitions.append(_close_partition(handle, number, offset, crc))
    except OSError as exc:
        # A full disk (or quota, or file size limit): say which file, keep the cause.
        path = directory / f"part-{number:05d}.bin"
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if handle is not None and not handle.closed:
            with contextlib.suppress(OSError):  # flushing what a full disk refused fails again
                handle.close()
    return partitions, pieces


def _close_partition(handle: BinaryIO, number: int, size: int, crc: int) -> PartitionEntry:
    # Pad the file to the alignment so the last direct read may be whole blocks.
    padding = (-size) % ALIGNMENT
    handle.write(b"\0" * padding)
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    return PartitionEntry(file=f"part-{number:05d}.bin", nbytes=size, crc32=crc)


def read_index(directory: Path) -> CheckpointIndex:
    path = directory / INDEX_FILE
    try:
        index = CheckpointIndex.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} has no {INDEX_FILE}: not a converted checkpoint (spotserve convert)"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a valid index: {exc}") from None
    if index.version > TP_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is format version {index.version}; this spotserve reads up to"
            f" {TP_FORMAT_VERSION} (convert the model again)"
        )
    return index


def is_converted(directory: Path) -> bool:
    return (directory / INDEX_FILE).exists()
