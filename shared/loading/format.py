"""spotserve's loading-optimized checkpoint format.

A converted model is a directory with data-only partition files and one JSON index::

    index.json         {"version", "config", "partitions": [...], "tensors": {...}}
    part-00000.bin     raw tensor bytes, each tensor aligned to ALIGNMENT bytes
    config.json, tokenizer files ...   copied from the source so the directory is a model

Tensors are written in execution order (embeddings, layer 0 .. L-1, final norm, head), so a
pipeline stage (a layer range) reads one contiguous byte range. Every tensor and partition
carries its size and a CRC32 so truncation and corruption are found on load.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from pydantic import BaseModel, Field

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
# Direct I/O needs offsets and lengths aligned to the logical block size; 4 KiB covers it.
ALIGNMENT = 4096
PARTITION_BYTES = 1 << 30
_COPIED_SUFFIXES = (".json", ".model", ".txt")
_SKIPPED = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


class CheckpointError(Exception):
    """A checkpoint is missing, truncated, corrupt or not what the index says."""


class TensorEntry(BaseModel):
    partition: int
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    shape: list[int]
    dtype: str
    crc32: int
    layer: int | None = None


class PartitionEntry(BaseModel):
    file: str
    nbytes: int = Field(ge=0)
    crc32: int


class CheckpointIndex(BaseModel):
    version: int = FORMAT_VERSION
    partitions: list[PartitionEntry]
    tensors: dict[str, TensorEntry]

    def layer_range_bytes(self, first: int, last: int) -> tuple[int, int, int]:
        """(partition, start, end) covering layers first..last if they share one partition."""
        entries = [
            e for e in self.tensors.values() if e.layer is not None and first <= e.layer <= last
        ]
        partitions = {e.partition for e in entries}
        if len(partitions) != 1:
            raise CheckpointError(f"layers {first}..{last} span partitions {sorted(partitions)}")
        return (
            partitions.pop(),
            min(e.offset for e in entries),
            max(e.offset + e.nbytes for e in entries),
        )


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
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def convert(
    source: Path,
    destination: Path,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckpointIndex:
    """Convert an HF model directory; written to a temp dir, renamed into place when complete."""
    if not (source / "config.json").exists():
        raise CheckpointError(f"{source} is not a model directory (no config.json)")
    if destination.exists() and not force:
        raise FileExistsError(f"{destination} exists; use --force to replace it")
    tensors = dict(iter_source_tensors(source))
    order = execution_order(list(tensors))
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        index = _write_partitions(staging, tensors, order, progress)
        for file in source.iterdir():
            if file.suffix in _COPIED_SUFFIXES and file.name not in _SKIPPED:
                shutil.copy2(file, staging / file.name)
        (staging / INDEX_FILE).write_text(index.model_dump_json(indent=1))
        staging.chmod(0o755)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def _write_partitions(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    order: list[str],
    progress: Callable[[int, int], None] | None,
) -> CheckpointIndex:
    entries: dict[str, TensorEntry] = {}
    partitions: list[PartitionEntry] = []
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    written = 0
    handle, number, offset, crc = None, -1, 0, 0
    try:
        for name in order:
            data = _raw_bytes(tensors[name])
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
            tensor = tensors[name]
            entries[name] = TensorEntry(
                partition=number,
                offset=offset,
                nbytes=len(data),
                shape=list(tensor.shape),
                dtype=str(tensor.dtype).removeprefix("torch."),
                crc32=zlib.crc32(data),
                layer=layer_of(name),
            )
            offset += len(data)
            written += len(data)
            if progress:
                progress(written, total)
        if handle is not None:
            partitions.append(_close_partition(handle, number, offset, crc))
    finally:
        if handle is not None and not handle.closed:
            handle.close()
    return CheckpointIndex(partitions=partitions, tensors=entries)


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
        return CheckpointIndex.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} has no {INDEX_FILE}: not a converted checkpoint (spotserve convert)"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a valid index: {exc}") from None


def is_converted(directory: Path) -> bool:
    return (directory / INDEX_FILE).exists()
