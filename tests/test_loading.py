"""The loading-optimized checkpoint format: conversion, bit-exact loading, and clear errors on
truncated, corrupt or inconsistent checkpoints."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.loading.format import ALIGNMENT, INDEX_FILE, CheckpointError, convert, read_index
from shared.loading.reader import ReadMode, _aligned_host_buffer, load_checkpoint


@pytest.fixture(scope="module")
def converted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("converted") / "tiny"
    convert(tiny_model_dir, destination)
    return destination


def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("mode", ["direct", "buffered", "mmap", "auto"])
@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20, 64 << 20])
def test_every_tensor_loads_bit_identical(
    converted: Path, tiny_model_dir: Path, mode: ReadMode, chunk_bytes: int
) -> None:
    expected = reference(tiny_model_dir)
    loaded = load_checkpoint(converted, mode=mode, chunk_bytes=chunk_bytes, verify=True)
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_direct_reads_fall_back_where_the_filesystem_refuses_them(
    converted: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some filesystems refuse O_DIRECT at open (EINVAL): "direct" (and "auto" on cold files)
    # then read buffered. Simulated, since this machine's filesystems all accept it.
    real_open = os.open
    refused: list[str] = []

    def open_without_direct_io(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            refused.append(str(path))
            raise OSError(errno.EINVAL, "O_DIRECT not supported", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_without_direct_io)
    loaded = load_checkpoint(converted, mode="direct", verify=True)
    assert refused  # the direct open was tried and refused
    expected = reference(tiny_model_dir)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def test_direct_reads_refused_after_open_are_read_buffered(
    converted: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some filesystems accept O_DIRECT at open and refuse the reads (EINVAL): read buffered.
    real_preadv = os.preadv
    refused: list[int] = []

    def preadv_without_direct_io(fd: int, buffers: Any, offset: int, *args: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", preadv_without_direct_io)
    loaded = load_checkpoint(converted, mode="direct", chunk_bytes=1 << 20, verify=True)
    assert refused
    expected = reference(tiny_model_dir)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("nbytes", [0, 1, 4096, (2 << 20) + 12345])
def test_host_buffers_are_aligned_for_direct_io_and_writable(nbytes: int) -> None:
    buffer = _aligned_host_buffer(nbytes, pin=False)
    assert buffer.numel() == nbytes and buffer.dtype == torch.uint8
    assert nbytes == 0 or buffer.data_ptr() % ALIGNMENT == 0
    buffer.fill_(7)
    assert int(buffer.sum()) == 7 * nbytes


def test_converted_directory_is_a_model_and_layers_are_contiguous(converted: Path) -> None:
    assert (converted / "config.json").exists() and (converted / "tokenizer.json").exists()
    index = read_index(converted)
    offsets = {name: entry.offset for name, entry in index.tensors.items()}
    assert min(offsets, key=offsets.get) == "model.embed_tokens.weight"
    assert all(entry.offset % 4096 == 0 for entry in index.tensors.values())
    partition, start, end = index.layer_range_bytes(1, 2)
    inside = [e for e in index.tensors.values() if e.layer in (1, 2)]
    outside = [e for e in index.tensors.values() if e.layer not in (1, 2)]
    assert all(start <= e.offset and e.offset + e.nbytes <= end for e in inside)
    assert all(e.offset + e.nbytes <= start or e.offset >= end for e in outside)
    assert partition == 0


def test_pytorch_bin_source_converts_too(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "bin-model"
    source.mkdir()
    (source / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    expected = reference(tiny_model_dir)
    torch.save(expected, source / "pytorch_model.bin")
    convert(source, tmp_path / "out")
    loaded = load_checkpoint(tmp_path / "out")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def copy_of(converted: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(converted, target)
    return target


def test_truncated_partition_names_the_file(converted: Path, tmp_path: Path) -> None:
    broken = copy_of(converted, tmp_path)
    part = broken / "part-00000.bin"
    part.write_bytes(part.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"part-00000\.bin is truncated"):
        load_checkpoint(broken)


def test_corrupt_partition_is_found_by_its_checksum(converted: Path, tmp_path: Path) -> None:
    broken = copy_of(converted, tmp_path)
    part = broken / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    for mode in ("buffered", "mmap"):
        with pytest.raises(CheckpointError, match=r"part-00000\.bin is corrupt"):
            load_checkpoint(broken, mode=mode, verify=True)


def test_missing_index_and_inconsistent_shape_are_clear(converted: Path, tmp_path: Path) -> None:
    broken = copy_of(converted, tmp_path)
    index = json.loads((broken / INDEX_FILE).read_text())
    index["tensors"]["model.norm.weight"]["shape"] = [3, 3]
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*needs 36"):
        load_checkpoint(broken)
    (broken / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no index\.json"):
        load_checkpoint(broken)


def test_convert_refuses_to_overwrite_and_leaves_nothing_half_written(
    tiny_model_dir: Path, converted: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileExistsError, match="--force"):
        convert(tiny_model_dir, converted)

    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_model_dir, tmp_path / "half", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_converting_names_the_file_and_leaves_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A file-size limit makes the writes fail the way a full disk does (an OSError mid-file).
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))\n"
        "from pathlib import Path\n"
        "from shared.loading.format import CheckpointError, convert\n"
        "try:\n"
        "    convert(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "except CheckpointError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir), str(out / "tiny")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert "cannot write" in result.stdout and "part-00000.bin" in result.stdout
    assert list(out.iterdir()) == []  # no half-written model, no staging directory
