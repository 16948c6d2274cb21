"""Cold start from each checkpoint tier: seconds from an executor asking for a model to its
first generated token.

A real nats-server and a real loader process; the model (`small`) is pushed to the remote store
first. For each tier the executor side (this process) asks the loader to fetch the model,
builds the engine from the converted checkpoint and runs a first prefill:
- remote store: the node's disk is empty, the loader pulls the model over NATS;
- local disk: the model is on the node's disk, evicted from the page cache;
- host memory: the model is on disk and in the page cache.

    python -m bench.cold_start [--size small]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.loading import evict
from shared.bus import connect
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.loading.store import push_model
from shared.messages import FetchModelReply
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.engine import Engine, SequenceStep
from shared.natsserver import EmbeddedNatsServer
from shared.subjects import loader_fetch_subject

NODE = "bench-node"


async def first_token(nats_url: str, model: str) -> tuple[float, float, str]:
    """(seconds to first token, of which fetching, tier) for one executor start."""
    nc = await connect(nats_url, NatsSettings(), name="bench-executor")
    try:
        started = time.perf_counter()
        reply = await nc.request(loader_fetch_subject(NODE), encode({"model": model}), timeout=600)
        fetched = FetchModelReply.model_validate(decode(reply.data))
        fetched_at = time.perf_counter()
        engine = await asyncio.to_thread(Engine, Path(fetched.path), max_slots=1)
        await asyncio.to_thread(engine.step, [SequenceStep("r", [3] * 16, 0.0, 1.0, 0, 0)])
        return time.perf_counter() - started, fetched_at - started, fetched.tier
    finally:
        await nc.close()


async def wait_for_loader(nats_url: str) -> None:
    nc = await connect(nats_url, NatsSettings(), name="bench-wait")
    try:
        for _ in range(600):
            try:
                await nc.request(loader_fetch_subject(NODE), b"{}", timeout=1)
                return
            except Exception:
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    args = parser.parse_args()
    model_dir = ensure_model(default_model_dir(args.size), args.size)
    with tempfile.TemporaryDirectory(prefix="spotserve-cold-", dir=model_dir.parent) as tmp:
        server = EmbeddedNatsServer(Path(tmp) / "nats")
        server.start()
        disk = Path(tmp) / "node-disk"
        env = dict(os.environ)
        env.update(
            SPOTSERVE_NATS__URL=server.url,
            SPOTSERVE_LOADER__NODE=NODE,
            SPOTSERVE_LOADER__MODELS_DIR=str(disk),
        )
        import subprocess

        loader = subprocess.Popen(
            [sys.executable, "-m", "services.loader"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            asyncio.run(_push(server.url, model_dir, args.size))
            asyncio.run(wait_for_loader(server.url))
            rows = []
            shutil.rmtree(disk, ignore_errors=True)
            rows.append(("remote store", *asyncio.run(first_token(server.url, args.size))))
            evict(sorted((disk / args.size).glob("part-*.bin")))
            rows.append(
                ("local disk (cold cache)", *asyncio.run(first_token(server.url, args.size)))
            )
            rows.append(("host memory (cached)", *asyncio.run(first_token(server.url, args.size))))
        finally:
            loader.terminate()
            loader.wait()
            server.stop()
    print(f"cold start of {args.size} ({model_dir}), fetch through a loader process over NATS")
    print(f"{'tier':>24}  {'to first token s':>16}  {'of which fetch s':>16}  {'loader said':>12}")
    for tier, total, fetch, said in rows:
        print(f"{tier:>24}  {total:>16.2f}  {fetch:>16.2f}  {said:>12}")


async def _push(nats_url: str, model_dir: Path, name: str) -> None:
    nc = await connect(nats_url, NatsSettings(), name="bench-push")
    try:
        await push_model(nc.jetstream(timeout=120), model_dir, name)
    finally:
        await nc.close()


if __name__ == "__main__":
    main()
