"""``spotserve health SERVICE``: a container health check over NATS.

It connects with the process's own settings (``SPOTSERVE_NATS__URL``, ``__USER``,
``__PASSWORD_FILE``: inside a service's container, the service's own user, which may use
``$SRV`` discovery) and asks ``$SRV.INFO.spotserve-<SERVICE>`` who answers. With
``--this-node`` only instances on this host count: a loader or monitor whose ``node`` metadata
is this node, or an executor whose ``instance_id`` is this process's configured one or starts
with this host's name (the default id is ``<hostname>-<random>``), so each executor container
checks its own executor rather than any replica.

Exit status: 0 healthy, 1 nothing (on this node) answered within the timeout, 2 NATS
unreachable or refused us, 3 an executor on this node answers but is draining (it took SIGTERM
as its preemption notice and leaves the draining marker of :func:`draining_marker`): not
ready, yet alive.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from shared.config import Settings, spotserve_home
from shared.subjects import ALL_SERVICES

HEALTHY, UNHEALTHY, NO_NATS, DRAINING = 0, 1, 2, 3


def draining_marker(instance_id: str) -> Path:
    """The file a terminating executor leaves for its own container's readiness check."""
    return spotserve_home() / "draining" / instance_id


def service_name(name: str) -> str:
    """``admission`` or ``spotserve-admission`` -> ``spotserve-admission``."""
    full = name if name.startswith("spotserve-") else f"spotserve-{name}"
    if full not in ALL_SERVICES:
        known = ", ".join(service.removeprefix("spotserve-") for service in ALL_SERVICES)
        raise ValueError(f"unknown service {name!r}; known: {known}")
    return full


def on_this_node(info: dict[str, Any], settings: Settings) -> bool:
    """Whether a ``$SRV.INFO`` reply comes from an instance on this host."""
    from shared.modelsource import node_name

    metadata = info.get("metadata") or {}
    if metadata.get("node") == node_name(settings):
        return True
    instance_id = metadata.get("instance_id")
    if not instance_id:
        return False
    if settings.executor.instance_id is not None:
        return bool(instance_id == settings.executor.instance_id)
    return bool(instance_id.startswith(f"{socket.gethostname().split('.')[0]}-"))


async def probe(
    service: str, settings: Settings, this_node: bool = False, timeout_s: float = 5.0
) -> dict[str, Any] | None:
    """The first ``$SRV.INFO`` reply of ``service`` (from this node with ``this_node``), or
    None when none came within ``timeout_s``."""
    from shared.bus import connect, resolve_nats_url
    from shared.discovery import discover

    def wanted(info: dict[str, Any]) -> bool:
        return not this_node or on_this_node(info, settings)

    url = resolve_nats_url(settings.nats)
    nc = await connect(url, settings.nats, name="spotserve-health", deadline_s=timeout_s)
    try:
        replies = await discover(nc, service, window_s=timeout_s, enough=wanted)
    finally:
        await nc.close()
    return next((info for info in replies if wanted(info)), None)


def check(name: str, this_node: bool = False, timeout_s: float = 5.0) -> tuple[int, str]:
    """(exit status, message) of one health check."""
    from shared.bus import NatsUnavailableError

    service = service_name(name)
    settings = Settings()
    try:
        info = asyncio.run(probe(service, settings, this_node, timeout_s))
    except NatsUnavailableError as exc:
        return NO_NATS, f"{service}: {exc}"
    where = " on this node" if this_node else ""
    if info is None:
        return UNHEALTHY, f"{service}: no instance{where} answered within {timeout_s:g} s"
    instance_id = (info.get("metadata") or {}).get("instance_id")
    if this_node and instance_id and draining_marker(instance_id).exists():
        return DRAINING, f"{service}: {instance_id} is draining (it took SIGTERM as a notice)"
    return HEALTHY, f"{service}: {info.get('id', '?')}{where} answered"
