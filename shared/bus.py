"""NATS connection handling: resolve the URL, connect with retry, drain on the way out."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import nats
import structlog
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.js import JetStreamContext

from shared.config import NatsSettings, spotserve_home
from shared.subjects import ensure_streams

log = structlog.get_logger()

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class NatsUnavailableError(RuntimeError):
    pass


def cluster_record_path() -> Path:
    """Where a running ``spotserve up`` records its NATS URL for the other CLI commands."""
    return spotserve_home() / "cluster.json"


def write_cluster_record(nats_url: str) -> None:
    path = cluster_record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"nats_url": nats_url, "pid": os.getpid(), "at": time.time()}))
    tmp.replace(path)


def clear_cluster_record() -> None:
    path = cluster_record_path()
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def recorded_nats_url() -> str | None:
    """The URL of a live ``spotserve up`` on this machine, if one recorded itself."""
    try:
        record = json.loads(cluster_record_path().read_text())
        os.kill(int(record["pid"]), 0)
        return str(record["nats_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_nats_url(settings: NatsSettings, override: str | None = None) -> str:
    """--nats-url, else SPOTSERVE_NATS__URL, else the running `spotserve up`, else localhost."""
    return override or settings.url or recorded_nats_url() or DEFAULT_NATS_URL


async def connect(
    url: str,
    settings: NatsSettings,
    name: str,
    deadline_s: float | None = None,
) -> Client:
    """Connect, retrying until ``deadline_s`` (a service may start before the server)."""
    budget = settings.connect_deadline_s if deadline_s is None else deadline_s
    # nats-py retries an initial connect forever when reconnects are unlimited: bound it here.
    try:
        return await asyncio.wait_for(
            nats.connect(
                servers=[url],
                name=name,
                user=settings.user,
                password=settings.password,
                connect_timeout=settings.connect_timeout_s,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=_log_error,
                disconnected_cb=_log_event("nats.disconnected"),
                reconnected_cb=_log_event("nats.reconnected"),
            ),
            timeout=budget,
        )
    except (TimeoutError, NoServersError, OSError) as exc:
        raise NatsUnavailableError(
            f"cannot reach NATS at {url} within {budget:.0f} s: {exc!r}"
        ) from None


async def connect_jetstream(nc: Client, timeout_s: float = 10.0) -> JetStreamContext:
    js = nc.jetstream(timeout=timeout_s)
    await ensure_streams(js)
    return js


async def _log_error(exc: Exception) -> None:
    # Connection refusals repeat every retry while a server is down: keep them at debug.
    level = log.debug if isinstance(exc, ConnectionRefusedError) else log.warning
    level("nats.error", error=repr(exc))


def _log_event(event: str):
    async def callback() -> None:
        log.info(event)

    return callback
