"""bench.decode_throughput's bare NATS floor against a real nats-server: every message of the
paced publisher process arrives, and each side's CPU per message is counted."""

from __future__ import annotations

import asyncio

from bench.decode_throughput import nats_floor
from shared.natsserver import EmbeddedNatsServer


async def test_the_floor_counts_every_sides_cpu_per_message(
    nats_server: EmbeddedNatsServer,
) -> None:
    assert nats_server.process is not None
    floor = await asyncio.to_thread(
        nats_floor, nats_server.url, nats_server.process.pid, 4, 20, 0.01
    )
    # The publisher and this process each publish or receive 80 messages: some CPU each;
    # nats-server's /proc reading may round to 0 over so short a run.
    assert floor.publisher_s > 0 and floor.subscriber_s > 0 and floor.server_s >= 0
    assert floor.total_s == floor.publisher_s + floor.server_s + floor.subscriber_s
