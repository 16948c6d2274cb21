"""Finding the instances of a nats.micro service through ``$SRV`` (PING/INFO/STATS)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client

from shared.subjects import (
    srv_subject,
)


async def discover(
    nc: Client,
    service: str | None,
    verb: str = "INFO",
    window_s: float = 0.3,
    enough: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Ask every instance of a nats.micro service (None: of every service); collect the
    replies for ``window_s`` (or until a reply for which ``enough`` is true, the last one)."""
    replies: list[dict[str, Any]] = []
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish(srv_subject(verb, service), b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + window_s
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                message = await subscription.next_msg(timeout=remaining)
            except TimeoutError:
                break
            try:
                replies.append(json.loads(message.data))
            except ValueError:
                continue
            if enough is not None and enough(replies[-1]):
                break
    finally:
        await subscription.unsubscribe()
    return replies
