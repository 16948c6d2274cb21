"""Tensor-parallel layout of the loading-optimized format: Megatron-style shards, each stage of a
shard one contiguous byte range, partial loads that read (and verify) only what they return."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.loading import reader
from shared.loading.format import (
    ALIGNMENT,
    CheckpointError,
    convert,
    layer_of,
    read_index,
    tp_split_dim,
)
from shared.loading.reader import ReadMode, load_checkpoint
from tests.test_cli import cli_env, spotserve

NUM_LAYERS = 4  # the tiny model
STAGES = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 3), (0, 3)]


@pytest.fixture(scope="module")
def source(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The tiny model converted with tensor-parallel degree 1 and 2."""
    root = tmp_path_factory.mktemp("sharded")
    for degree in (1, 2):
        convert(tiny_model_dir, root / f"tp{degree}", tp_degree=degree)
    return {degree: root / f"tp{degree}" for degree in (1, 2)}


def expected_names(names: list[str], layers: tuple[int, int] | None) -> set[str]:
    if layers is None:
        return set(names)
    first, last = layers
    chosen = set()
    for name in names:
        layer = layer_of(name)
        if "embed" in name:
            if first == 0:
                chosen.add(name)
        elif layer is None:
            if last == NUM_LAYERS - 1:
                chosen.add(name)
        elif first <= layer <= last:
            chosen.add(name)
    return chosen


def shard_of(name: str, tensor: torch.Tensor, rank: int, degree: int) -> torch.Tensor:
    dim = tp_split_dim(name, tensor.dim())
    return tensor if dim is None else torch.chunk(tensor, degree, dim)[rank]


@pytest.mark.parametrize("degree", [1, 2])
@pytest.mark.parametrize("mode", ["direct", "buffered", "mmap"])
def test_full_load_is_bit_identical_to_the_source(
    checkpoints: dict[int, Path], source: dict[str, torch.Tensor], degree: int, mode: ReadMode
) -> None:
    loaded = load_checkpoint(checkpoints[degree], mode=mode, chunk_bytes=1 << 20, verify=True)
    assert set(loaded) == set(source)
    for name, tensor in source.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_index_records_the_split(checkpoints: dict[int, Path]) -> None:
    assert read_index(checkpoints[1]).tp_degree == 1
    assert "tp_degree" not in (checkpoints[1] / "index.json").read_text()  # unchanged format
    index = read_index(checkpoints[2])
    assert index.tp_degree == 2 and index.version == 2
    q = index.tensors["model.layers.0.self_attn.q_proj.weight"]
    down = index.tensors["model.layers.0.mlp.down_proj.weight"]
    assert q.split_dim == 0 and q.shards and [p.shape for p in q.shards] == [[128, 256]] * 2
    assert (
        down.split_dim == 1 and down.shards and [p.shape for p in down.shards] == [[256, 344]] * 2
    )
    assert index.tensors["lm_head.weight"].split_dim == 0
    embed = index.tensors["model.embed_tokens.weight"]
    assert embed.shards is None and embed.offset == 0  # stored once, first
    norm = index.tensors["model.layers.0.input_layernorm.weight"]
    assert norm.split_dim is None and norm.shards and len(norm.shards) == 2  # a copy per shard


def test_shards_are_torch_chunks_and_concatenate_to_the_source(
    checkpoints: dict[int, Path], source: dict[str, torch.Tensor]
) -> None:
    shards = [load_checkpoint(checkpoints[2], tp_rank=r, verify=True) for r in range(2)]
    for name, tensor in source.items():
        for rank in range(2):
            assert torch.equal(shards[rank][name], shard_of(name, tensor, rank, 2)), (name, rank)
        dim = tp_split_dim(name, tensor.dim())
        if dim is not None:
            assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), tensor), name


@pytest.mark.parametrize("mode", ["buffered", "mmap"])
@pytest.mark.parametrize("layers", [*STAGES, None])
@pytest.mark.parametrize("tp_rank", [None, 0, 1])
def test_stage_of_a_shard_returns_exactly_its_tensors(
    checkpoints: dict[int, Path],
    source: dict[str, torch.Tensor],
    layers: tuple[int, int] | None,
    tp_rank: int | None,
    mode: ReadMode,
) -> None:
    loaded = load_checkpoint(
        checkpoints[2], layers=layers, tp_rank=tp_rank, mode=mode, chunk_bytes=8192, verify=True
    )
    assert set(loaded) == expected_names(list(source), layers)
    for name, tensor in loaded.items():
        want = source[name] if tp_rank is None else shard_of(name, source[name], tp_rank, 2)
        assert torch.equal(tensor, want), name


def test_single_shard_checkpoint_loads_stages_and_rank_zero(
    checkpoints: dict[int, Path], source: dict[str, torch.Tensor]
) -> None:
    for layers in STAGES:
        loaded = load_checkpoint(checkpoints[1], layers=layers, mode="buffered")
        assert set(loaded) == expected_names(list(source), layers)
        assert all(torch.equal(loaded[n], source[n]) for n in loaded)
    assert set(load_checkpoint(checkpoints[1], tp_rank=0)) == set(source)


def test_a_partial_load_is_one_allocation_of_views(checkpoints: dict[int, Path]) -> None:
    loaded = load_checkpoint(checkpoints[2], layers=(1, 2), tp_rank=1, mode="buffered")
    storages = {tensor.untyped_storage().data_ptr() for tensor in loaded.values()}
    assert len(storages) == 1
    size = next(iter(loaded.values())).untyped_storage().nbytes()
    assert size < read_index(checkpoints[2]).partitions[0].nbytes // 3


@pytest.mark.parametrize("degree", [1, 2])
def test_stages_and_shards_are_few_ranges_of_only_their_bytes(
    checkpoints: dict[int, Path], degree: int
) -> None:
    index = read_index(checkpoints[degree])
    ranks = [None] if degree == 1 else [None, *range(degree)]
    for layers in [*STAGES, None]:
        for tp_rank in ranks:
            ranges = index.read_ranges(layers, tp_rank)
            if tp_rank is not None or degree == 1:
                assert len(ranges) <= 2, (layers, tp_rank, ranges)
            if index.covers_everything(layers, tp_rank):
                assert len(ranges) == len(index.partitions)  # whole partitions
                continue
            # Nothing but the selected tensors (and their alignment padding) is read.
            pieces = [p for e in index.select(layers, tp_rank).tensors.values() for p in e.stored()]
            wanted = sum(n + (-n) % ALIGNMENT for _, _, n in pieces)
            assert sum(end - start for _, start, end in ranges) == wanted, (layers, tp_rank)
            assert all(start % ALIGNMENT == 0 == end % ALIGNMENT for _, start, end in ranges)


def test_the_reader_reads_only_the_ranges(
    checkpoints: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[reader._Chunk] = []
    real = reader._read_all

    def spy(paths, host, target, chunks, threads, direct):  # type: ignore[no-untyped-def]
        read.extend(chunks)
        real(paths, host, target, chunks, threads, direct)

    monkeypatch.setattr(reader, "_read_all", spy)
    load_checkpoint(checkpoints[2], layers=(2, 3), tp_rank=1, mode="buffered", chunk_bytes=4096)
    ranges = read_index(checkpoints[2]).read_ranges((2, 3), 1)
    assert sum(c.nbytes for c in read) == sum(end - start for _, start, end in ranges)
    for chunk in read:
        assert any(
            p == chunk.partition
            and start <= chunk.file_offset < chunk.file_offset + chunk.nbytes
            and chunk.file_offset + chunk.nbytes <= end
            for p, start, end in ranges
        )


def corrupt(checkpoint: Path, tmp_path: Path, name: str, rank: int) -> Path:
    """A copy with one byte flipped inside shard ``rank``'s piece of ``name``."""
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    piece = read_index(broken).tensors[name].shards[rank]  # type: ignore[index]
    part = broken / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[piece.offset + piece.nbytes // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    return broken


@pytest.mark.parametrize("mode", ["buffered", "mmap"])
def test_partial_verify_checks_only_what_was_read(
    checkpoints: dict[int, Path], tmp_path: Path, mode: ReadMode
) -> None:
    broken = corrupt(checkpoints[2], tmp_path, "model.layers.3.self_attn.q_proj.weight", rank=1)
    load_checkpoint(broken, tp_rank=0, mode=mode, verify=True)
    load_checkpoint(broken, layers=(0, 2), tp_rank=1, mode=mode, verify=True)
    with pytest.raises(CheckpointError, match=r"part-00000\.bin is corrupt.*layers\.3"):
        load_checkpoint(broken, layers=(2, 3), tp_rank=1, mode=mode, verify=True)
    with pytest.raises(CheckpointError, match=r"part-00000\.bin is corrupt"):
        load_checkpoint(broken, layers=(3, 3), mode=mode, verify=True)  # reassembles rank 1
    with pytest.raises(CheckpointError, match=r"part-00000\.bin is corrupt"):
        load_checkpoint(broken, mode=mode, verify=True)


def test_bad_stages_and_ranks_are_clear(checkpoints: dict[int, Path]) -> None:
    for layers in [(0, NUM_LAYERS), (2, 1), (-1, 0)]:
        with pytest.raises(CheckpointError, match=r"out of range.*layers 0\.\.3"):
            load_checkpoint(checkpoints[2], layers=layers)
    with pytest.raises(CheckpointError, match=r"tp_rank 2 is out of range.*tp_degree 2"):
        load_checkpoint(checkpoints[2], tp_rank=2)
    with pytest.raises(CheckpointError, match=r"tp_degree 1\).*--tp"):
        load_checkpoint(checkpoints[1], tp_rank=1)


def test_indivisible_shapes_are_refused_naming_the_tensor(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*not divisible by 3"):
        convert(tiny_model_dir, out / "tp3", tp_degree=3)
    # Every dim divides by 8, but 4 KV heads cannot be split 8 ways.
    with pytest.raises(CheckpointError, match=r"num_key_value_heads 4"):
        convert(tiny_model_dir, out / "tp8", tp_degree=8)
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_converts_with_tp(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    done = spotserve("convert", str(tiny_model_dir), str(tmp_path / "tp2"), "--tp", "2", env=env)
    assert done.returncode == 0, done.stderr
    assert "2 tensor-parallel shards" in done.stdout
    assert read_index(tmp_path / "tp2").tp_degree == 2
    refused = spotserve("convert", str(tiny_model_dir), str(tmp_path / "tp3"), "--tp", "3", env=env)
    assert refused.returncode == 1 and "not divisible by 3" in refused.stderr
    assert "--tp" in spotserve("convert", "--help", env=env).stdout
