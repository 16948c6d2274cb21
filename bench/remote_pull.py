"""Remote-store throughput: push and pull of a converted model, this store vs stock nats-py.

A real nats-server (the embedded one: loopback, file storage, max_payload 8 MiB), the `small`
model converted once, then side by side in one run, each pushed under its own name:
(a) baseline, stock nats-py: ``ObjectStore.put`` per file (128 KiB chunks, one ack at a time),
    ``ObjectStore.get(writeinto=...)`` per file (ordered push consumer), then the CRC check of
    every partition against the index (``load_checkpoint(verify=True)``), as the loader did;
(b) spotserve: ``push_model`` / ``pull_model`` (1 MiB chunks, acks pipelined; a pull consumer
    with read-ahead, digest, CRC32 against the index and writes in threads as chunks arrive;
    the files concurrently);
(c) for scale, the disk: a plain sequential write of as many bytes to the same directory.
Every step starts after an ``os.sync()`` (the previous step's dirty pages written back, so
that no step is slowed by another's writeback). MB/s are of the model's bytes (all files);
best of ``--repeats``.

    python -m bench.remote_pull [--size small] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from nats.js import JetStreamContext

from shared.bus import connect
from shared.config import NatsSettings
from shared.loading.format import INDEX_FILE, convert
from shared.loading.reader import load_checkpoint
from shared.loading.store import models_bucket, pull_model, push_model
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.natsserver import EmbeddedNatsServer


def model_files(directory: Path) -> list[Path]:
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.name != INDEX_FILE)
    return [*files, directory / INDEX_FILE]


async def stock_push(js: JetStreamContext, directory: Path, name: str) -> None:
    """The previous push_model: one ObjectStore.put per file, the index last."""
    bucket = await models_bucket(js)
    for file in await asyncio.to_thread(model_files, directory):
        handle = await asyncio.to_thread(open, file, "rb")
        try:
            await bucket.put(f"{name}/{file.name}", handle)
        finally:
            await asyncio.to_thread(handle.close)


async def stock_pull(js: JetStreamContext, name: str, destination: Path) -> float:
    """The previous pull_model's transfer: ObjectStore.get per file; returns its seconds."""
    started = time.perf_counter()
    bucket = await models_bucket(js)
    listing = await bucket.list()
    await asyncio.to_thread(destination.mkdir, parents=True)
    for info in listing:
        if info.name and info.name.startswith(f"{name}/"):
            target = destination / info.name.split("/", 1)[1]
            handle = await asyncio.to_thread(open, target, "wb")
            try:
                await bucket.get(info.name, writeinto=handle)
            finally:
                await asyncio.to_thread(handle.close)
    return time.perf_counter() - started


async def run(
    url: str, model: Path, nbytes: int, work: Path, repeats: int
) -> list[tuple[str, float, float]]:
    nc = await connect(url, NatsSettings(), name="bench-remote")
    js = nc.jetstream(timeout=120)
    best: dict[str, float] = {}

    async def timed(label: str, step: Awaitable[object]) -> None:
        # Dirty pages of the previous step (the server's store, the last pull) written back
        # first, so that no step pays for another one's writeback.
        await asyncio.to_thread(os.sync)
        started = time.perf_counter()
        await step
        best[label] = max(best.get(label, 0.0), nbytes / (time.perf_counter() - started))

    async def stock_pull_checked(name: str, target: Path) -> None:
        await stock_pull(js, name, target)
        await asyncio.to_thread(load_checkpoint, target, mode="buffered", verify=True)

    try:
        for attempt in range(repeats):
            stock, new = f"stock-{attempt}", f"new-{attempt}"
            await timed("stock push", stock_push(js, model, stock))
            await timed("stock get", stock_pull(js, stock, work / "get-only"))
            await timed("stock pull", stock_pull_checked(stock, work / stock))
            await timed("new push", push_model(nc, js, model, new))
            await timed("new pull", pull_model(nc, js, new, work / new))
            await timed("disk", asyncio.to_thread(plain_write, work / "plain.bin", nbytes))
            for target in ("get-only", stock, new, "plain.bin"):
                await asyncio.to_thread(shutil.rmtree, work / target, True)
    finally:
        await nc.close()
    nan = float("nan")
    return [
        ("nats-py put/get (baseline)", best["stock push"], best["stock pull"]),
        ("  of which get alone", nan, best["stock get"]),
        ("spotserve push/pull", best["new push"], best["new pull"]),
        ("disk: plain write", nan, best["disk"]),
    ]


def plain_write(path: Path, nbytes: int) -> None:
    """``nbytes`` written sequentially (8 MiB writes, no fsync, like a pull)."""
    block = os.urandom(8 * 1024 * 1024)
    with open(path, "wb") as handle:
        for offset in range(0, nbytes, len(block)):
            handle.write(block[: nbytes - offset])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    source = ensure_model(default_model_dir(args.size), args.size)
    with tempfile.TemporaryDirectory(prefix="spotserve-remote-", dir=source.parent) as tmp:
        work = Path(tmp)
        model = work / "converted"
        convert(source, model)
        nbytes = sum(f.stat().st_size for f in model.iterdir())
        files = len(list(model.iterdir()))
        with EmbeddedNatsServer(work / "nats") as server:
            rows = asyncio.run(run(server.url, model, nbytes, work, args.repeats))
    print(
        f"remote store, {args.size} model ({nbytes / 1e6:.0f} MB in {files} files),"
        f" loopback nats-server, best of {args.repeats}"
    )
    print(f"{'path':>28}  {'push MB/s':>10}  {'pull MB/s':>10}")
    for label, push, pull in rows:
        push_text = "" if push != push else f"{push / 1e6:.0f}"
        print(f"{label:>28}  {push_text:>10}  {pull / 1e6:>10.0f}")


if __name__ == "__main__":
    main()
