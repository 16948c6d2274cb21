"""Checkpoint loading into CPU memory: this loader vs the usual ways, and the physical limit.

Same checkpoint (the `small` model, fp32), cold (every file evicted from the page cache with
posix_fadvise DONTNEED first) and warm (read once before), side by side in one run:
(a) this loader (auto: mmap when cached, else buffered threads; and direct I/O; and the loader
service's path: into its host-memory pool of reused chunks, as a node does after its first model),
(b) safetensors.torch.load_file, (c) torch.load of a .bin, (d) transformers from_pretrained,
(e) a plain sequential read of the same bytes (into one reused buffer; `dd` to /dev/null; whole
files into fresh memory). Ratios are against the fastest (e) row. Every page of every loaded
tensor is touched inside the timing (mmap-backed loaders return before reading).

    python -m bench.loading [--size small] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.loading.format import convert
from shared.loading.hostpool import HostChunkPool, default_pool_dir
from shared.loading.reader import load_checkpoint
from shared.model.checkpoint import default_model_dir, ensure_model

READ_BYTES = 16 * 1024 * 1024


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(paths: list[Path]) -> None:
    """The physical limit: one sequential pass over the bytes, nothing else."""
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass


def dd_read(paths: list[Path]) -> None:
    """The physical limit as the issue names it: ``dd`` to /dev/null, in its own process."""
    for path in paths:
        subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", f"bs={READ_BYTES}"],
            check=True,
            capture_output=True,
        )


def one_big_read(paths: list[Path]) -> list[bytes]:
    """The physical limit as a loader meets it: each file read whole into fresh memory."""
    contents = []
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            contents.append(handle.read())
    return contents


def touch(result: object) -> None:
    """Read one byte of every page: mmap-backed loaders (safetensors, from_pretrained) return
    before the data is read, so without this they would be timed doing nothing."""
    if isinstance(result, torch.nn.Module):
        tensors = [p.data for p in result.parameters()]
    elif isinstance(result, dict):
        tensors = list(result.values())
    else:
        return
    for tensor in tensors:
        if tensor.numel():
            tensor.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def measure(
    cases: dict[str, tuple[Callable[[], object], list[Path]]], cold: bool, repeats: int
) -> dict[str, float]:
    """Median seconds per case. The cases take turns within each repeat, starting one further
    each time, so the disk's drift over the run (±15% here) and whatever a case leaves behind
    for the next one touch every case alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            load, files = cases[name]
            if cold:
                evict(files)
            else:
                plain_read(files)  # make sure it is cached
            started = time.perf_counter()
            touch(load())
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    model_dir = ensure_model(default_model_dir(args.size), args.size)
    with tempfile.TemporaryDirectory(prefix="spotserve-bench-load-", dir=model_dir.parent) as tmp:
        converted = Path(tmp) / "converted"
        convert(model_dir, converted)
        bin_dir = Path(tmp) / "bin"
        bin_dir.mkdir()
        torch.save(load_file(str(model_dir / "model.safetensors")), bin_dir / "pytorch_model.bin")
        parts = sorted(converted.glob("part-*.bin"))
        safetensors_file = model_dir / "model.safetensors"
        nbytes = sum(
            t.numel() * t.element_size() for t in load_file(str(safetensors_file)).values()
        )

        def from_pretrained() -> object:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

        pool = HostChunkPool(default_pool_dir(), "bench", 2 * nbytes, read_threads=args.threads)

        def into_pool(direct_io: bool) -> object:
            # Chunks are reused from the previous run (the pool's steady state); CRC32s are
            # checked once per file version by the loader, not on every load.
            pool.evict("bench")
            pool.direct_io = direct_io
            return pool.admit("bench", converted, verify=False)

        cases: dict[str, tuple[Callable[[], object], list[Path]]] = {
            "(e) plain sequential read": (lambda: plain_read(parts), parts),
            "(e) dd to /dev/null, bs=16M": (lambda: dd_read(parts), parts),
            "(e) one big read, fresh memory": (lambda: one_big_read(parts), parts),
            "(a) spotserve, auto": (
                lambda: load_checkpoint(converted, threads=args.threads, mode="auto"),
                parts,
            ),
            "(a) loader -> host pool, buffered": (lambda: into_pool(False), parts),
            "(a) loader -> host pool, O_DIRECT": (lambda: into_pool(True), parts),
            "(a) spotserve, direct I/O": (
                lambda: load_checkpoint(converted, threads=args.threads, mode="direct"),
                parts,
            ),
            "(b) safetensors load_file": (
                lambda: load_file(str(safetensors_file)),
                [safetensors_file],
            ),
            "(c) torch.load .bin": (
                lambda: torch.load(bin_dir / "pytorch_model.bin", weights_only=True),
                [bin_dir / "pytorch_model.bin"],
            ),
            "(d) transformers from_pretrained": (from_pretrained, [safetensors_file]),
        }
        os.sync()  # the conversions' write-back would compete with the first cold reads
        try:
            cold_times = measure(cases, cold=True, repeats=args.repeats)
            warm_times = measure(cases, cold=False, repeats=args.repeats)
        finally:
            pool.close()
        results = {name: (cold_times[name], warm_times[name]) for name in cases}
    limits = [times for name, times in results.items() if name.startswith("(e)")]
    # The fastest physical-limit row, cold and warm: the most demanding yardstick.
    limit_cold, limit_warm = min(c for c, _ in limits), min(w for _, w in limits)
    big_cold, big_warm = results["(e) one big read, fresh memory"]
    print(
        f"{nbytes / 1e6:.0f} MB of tensors ({args.size}), median of {args.repeats}, into CPU memory"
    )
    print("x limit: against the fastest (e) row; x big: against one big read into fresh memory")
    print("(the page faults every loader pays)")
    header = f"{'cold GB/s':>9}  {'x limit':>7}  {'x big':>5}  {'warm GB/s':>9}  {'x limit':>7}"
    print(f"{'':>34}  {header}  {'x big':>5}")
    for name, (cold, warm) in results.items():
        print(
            f"{name:>34}  {nbytes / cold / 1e9:>9.2f}  {limit_cold / cold:>7.2f}"
            f"  {big_cold / cold:>5.2f}  {nbytes / warm / 1e9:>9.2f}  {limit_warm / warm:>7.2f}"
            f"  {big_warm / warm:>5.2f}"
        )


if __name__ == "__main__":
    main()
