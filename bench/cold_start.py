"""Cold start from each checkpoint tier: seconds from an executor asking for a model to its
first generated token.

A real nats-server and a real loader process; the model (`small`) is pushed to the remote store
first. For each tier the executor side (this process) asks the loader for the model the way an
executor does (with a host-memory lease), builds the engine from the loader's shared-memory pool
and runs a first prefill:
- remote store: the node's disk and pool are empty: pull over NATS, read into the pool, copy;
- local disk: on disk only (a fresh loader, an empty pool), evicted from the page cache;
- host memory: in the loader's pool: copy out of shared memory;
- page cache, no pool: for comparison, the engine reads the files (already cached) itself.

    python -m bench.cold_start [--size small]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from functools import partial
from pathlib import Path

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from bench.loading import evict
from shared.bus import connect
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.loading.hostpool import load_from_host_pool
from shared.loading.store import push_model
from shared.messages import FetchModelReply
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.engine import Engine, SequenceStep
from shared.natsserver import EmbeddedNatsServer
from shared.subjects import loader_fetch_subject, loader_release_subject

NODE = "bench-node"


class Loader:
    """The node's loader process, its output in a log file (shown if it dies)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.loader"], env=env, stdout=log, stderr=log
            )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(
                f"the loader exited with {self.process.returncode}; its log ends:\n"
                + "\n".join(tail)
            )

    async def answer(self, request: Awaitable[Msg]) -> Msg:
        """Wait for ``request``, failing at once if the loader dies meanwhile."""
        task = asyncio.ensure_future(request)
        try:
            while not task.done():
                self.check_alive()
                await asyncio.wait({task}, timeout=0.5)
            return task.result()
        finally:
            task.cancel()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


async def first_token(
    nats_url: str, loader: Loader, model: str, lease: bool
) -> tuple[float, float, str]:
    """(seconds to first token, of which fetching, tier) for one executor start."""
    nc = await connect(nats_url, NatsSettings(), name="bench-executor")
    try:
        started = time.perf_counter()
        body = encode({"model": model, "host_lease": lease})
        reply = await loader.answer(nc.request(loader_fetch_subject(NODE), body, timeout=600))
        fetched = FetchModelReply.model_validate(decode(reply.data))
        fetched_at = time.perf_counter()
        weights = partial(load_from_host_pool, fetched.host) if fetched.host else None
        engine = await asyncio.to_thread(Engine, Path(fetched.path), max_slots=1, weights=weights)
        await asyncio.to_thread(engine.step, [SequenceStep("r", [3] * 16, 0.0, 1.0, 0, 0)])
        elapsed = time.perf_counter() - started
        if fetched.host:
            release = encode({"lease_id": fetched.host.lease_id})
            await nc.request(loader_release_subject(NODE), release, timeout=10)
        source = f"{fetched.tier}{' +pool' if fetched.host else ''}"
        return elapsed, fetched_at - started, source
    finally:
        await nc.close()


async def wait_for_loader(nats_url: str, loader: Loader) -> None:
    nc = await connect(nats_url, NatsSettings(), name="bench-wait")
    try:
        for _ in range(600):
            loader.check_alive()
            try:
                await nc.request(loader_fetch_subject(NODE), b"{}", timeout=1)
                return
            except (TimeoutError, NatsError):
                await asyncio.sleep(0.1)
        raise RuntimeError("the loader did not answer within 10 minutes")
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
        log_path = Path(tmp) / "loader.log"
        loader = Loader(env, log_path)
        try:
            asyncio.run(_push(server.url, model_dir, args.size))
            asyncio.run(wait_for_loader(server.url, loader))
            rows = []
            shutil.rmtree(disk, ignore_errors=True)
            remote = asyncio.run(first_token(server.url, loader, args.size, True))
            rows.append(("remote store", *remote))
            loader.stop()  # a fresh loader: its pool is empty, the model is on its disk
            loader = Loader(env, log_path)
            asyncio.run(wait_for_loader(server.url, loader))
            evict(sorted((disk / args.size).glob("part-*.bin")))
            cold = asyncio.run(first_token(server.url, loader, args.size, True))
            rows.append(("local disk (cold cache)", *cold))
            pooled = asyncio.run(first_token(server.url, loader, args.size, True))
            rows.append(("host memory (pool)", *pooled))
            no_pool = asyncio.run(first_token(server.url, loader, args.size, False))
            rows.append(("page cache, no pool", *no_pool))
        finally:
            loader.stop()
            server.stop()
    print(f"cold start of {args.size} ({model_dir}), fetch through a loader process over NATS")
    print(f"{'tier':>24}  {'to first token s':>16}  {'of which fetch s':>16}  {'loader said':>18}")
    for tier, total, fetch, said in rows:
        print(f"{tier:>24}  {total:>16.2f}  {fetch:>16.2f}  {said:>18}")


async def _push(nats_url: str, model_dir: Path, name: str) -> None:
    nc = await connect(nats_url, NatsSettings(), name="bench-push")
    try:
        await push_model(nc, nc.jetstream(timeout=120), model_dir, name)
    finally:
        await nc.close()


if __name__ == "__main__":
    main()
