"""Loader: one per node; owns the node's checkpoint tiers.

In this version: the remote store (JetStream Object Store ``spotserve-models``) and the local
disk. ``spotserve.v1.loader.<node>.fetch`` brings a converted model to local disk (pulled and
checked against its index when missing) and replies with its path; readers then load it with
``shared.loading.reader`` (the page cache serves as the host-memory tier).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from nats.micro.request import Request
from pydantic import ValidationError

from shared.codec import DecodeError, decode, encode
from shared.config import spotserve_home
from shared.loading.format import CheckpointError, is_converted
from shared.loading.store import check_model_name, pull_model
from shared.messages import ErrorCode, FetchModelReply, FetchModelRequest
from shared.runtime import ServiceContext
from shared.subjects import loader_fetch_subject


class Loader:
    def __init__(self, context: ServiceContext, node: str, models_dir: Path) -> None:
        self.context = context
        self.node = node
        self.models_dir = models_dir
        self.log = context.log.bind(node=node)
        # One pull per model at a time; concurrent fetches of it wait for that pull.
        self._locks: dict[str, asyncio.Lock] = {}

    async def on_fetch(self, request: Request) -> None:
        try:
            body = FetchModelRequest.model_validate(decode(request.data))
            name = check_model_name(body.model)
        except (DecodeError, ValidationError, ValueError) as exc:
            await request.respond_error(str(ErrorCode.BAD_REQUEST), f"bad fetch request: {exc}")
            return
        started = time.perf_counter()
        try:
            path, tier = await self._ensure_local(name)
        except CheckpointError as exc:
            self.log.warning("fetch.failed", model=name, error=str(exc))
            await request.respond_error(str(ErrorCode.NOT_FOUND), str(exc))
            return
        except Exception as exc:
            self.log.exception("fetch.error", model=name)
            await request.respond_error(str(ErrorCode.INTERNAL), f"fetch failed: {exc!r}")
            return
        seconds = time.perf_counter() - started
        self.log.info("fetch.done", model=name, tier=tier, seconds=round(seconds, 3))
        reply = FetchModelReply(model=name, path=str(path), tier=tier, seconds=seconds)
        await request.respond(encode(reply))

    async def _ensure_local(self, name: str) -> tuple[Path, str]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            path = self.models_dir / name
            if await asyncio.to_thread(is_converted, path):
                return path, "local-disk"
            await pull_model(self.context.js, name, path)
            return path, "remote"


async def serve(context: ServiceContext) -> None:
    settings = context.settings.loader
    node = settings.node or socket.gethostname().split(".")[0]
    models_dir = settings.models_dir or spotserve_home() / "checkpoints"
    loader = Loader(context, node, models_dir)
    service = await context.add_micro_service(
        "Brings converted models from the remote store to this node's disk",
        metadata={"node": node, "models_dir": str(models_dir)},
    )
    await service.add_endpoint(
        name="fetch", subject=loader_fetch_subject(node), handler=loader.on_fetch
    )
    loader.log.info("loader.ready", models_dir=str(models_dir))
    await context.stop.wait()
    await service.stop()
