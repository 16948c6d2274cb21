"""Where a service gets its model: this node's loader (``model.name``), a configured
directory or the embedded default."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from shared.config import ConfigurationError, ModelSettings, Settings
from shared.messages import (
    FetchModelReply,
    FetchModelRequest,
    HostLease,
    ReleaseLeaseRequest,
)
from shared.rpc import (
    FETCH_ENDPOINT,
    LEASE_RELEASE_ENDPOINT,
    NoResponders,
    RpcError,
    RpcTimeout,
    call,
)
from shared.runtime import ServiceContext

# A loader that is still starting (no responders yet) is asked again this often.
LOADER_START_POLL_S = 0.5
# The last try of a model fetch waits at least this long for the loader's answer.
MIN_FETCH_WAIT_S = 0.1


async def resolve_model(context: ServiceContext) -> Path:
    """The model directory this service uses: fetched through this node's loader when
    ``model.name`` is set, else the configured directory or the embedded default."""
    if context.settings.model.name is None:
        return await asyncio.to_thread(resolve_model_dir, context.settings.model)
    return Path((await fetch_model(context)).path)


def node_name(settings: Settings) -> str:
    return settings.loader.node or socket.gethostname().split(".")[0]


async def fetch_model(context: ServiceContext, host_lease: bool = False) -> FetchModelReply:
    """Ask this node's loader for ``model.name`` (waiting for a loader that is still starting)."""
    settings = context.settings.model
    assert settings.name is not None
    node = node_name(context.settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.fetch_timeout_s
    body = FetchModelRequest(model=settings.name, host_lease=host_lease)
    while True:
        remaining = deadline - loop.time()
        try:
            fetched = await call(
                context.nc,
                FETCH_ENDPOINT,
                body,
                address=node,
                timeout_s=max(remaining, MIN_FETCH_WAIT_S),
            )
            break
        except NoResponders:
            if remaining <= 0:
                raise ConfigurationError(f"no loader answers on node {node!r}") from None
            await asyncio.sleep(LOADER_START_POLL_S)
        except RpcTimeout:
            raise ConfigurationError(
                f"the loader of node {node!r} did not deliver {settings.name!r} within"
                f" {settings.fetch_timeout_s:.0f} s"
            ) from None
        except RpcError as exc:
            raise ConfigurationError(f"cannot get model {settings.name!r}: {exc.message}") from None
    context.log.info("model.fetched", model=settings.name, tier=fetched.tier, path=fetched.path)
    return fetched


async def release_host_lease(context: ServiceContext, lease: HostLease) -> None:
    """Give a host-pool lease back; if this fails the lease simply expires."""
    node = node_name(context.settings)
    body = ReleaseLeaseRequest(lease_id=lease.lease_id)
    try:
        await call(context.nc, LEASE_RELEASE_ENDPOINT, body, address=node)
    except RpcError as exc:
        context.log.warning("lease.release_failed", lease_id=lease.lease_id, error=repr(exc))


def resolve_model_dir(settings: ModelSettings) -> Path:
    """The configured model directory, or the embedded default (created if missing)."""
    from shared.model.checkpoint import default_model_dir, ensure_model

    if settings.path is not None:
        if not (settings.path / "config.json").exists():
            raise FileNotFoundError(
                f"model directory {settings.path} has no config.json: give an HF Llama-family"
                " directory, or create one with `spotserve model init DIR`"
            )
        return settings.path
    return ensure_model(default_model_dir(settings.size), settings.size, seed=settings.seed)
