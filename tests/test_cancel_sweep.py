"""The scheduler's cancel sweep against a real nats-server: a marker its consumer never saw
(put before the consumer started, as across a scheduler restart) is found among the held
requests, and only for the requests that have one."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import cast

import pytest
import structlog
from nats.aio.client import Client

from services.scheduler import cancellation
from services.scheduler.cancellation import Cancellations
from services.scheduler.executors import ExecutorPool
from services.scheduler.policy_base import SchedulerPolicy
from services.scheduler.tokens import TokenPublisher
from shared.bus import connect_jetstream
from shared.codec import encode
from shared.messages import CancelRecord
from shared.model.tokenizer import TextTokenizer
from shared.runtime import ServiceContext
from shared.subjects import cancel_key, requests_bucket
from tests.test_units_scheduler import make_request, make_sequence


async def test_the_sweep_finds_markers_the_consumer_missed(
    nc: Client, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cancellation, "SWEEP_INTERVAL_S", 0.05)
    js = await connect_jetstream(nc)
    held = {
        s.request_id: s
        for s in (make_sequence(tokenizer, make_request([5, 6], max_tokens=8)) for _ in range(3))
    }
    cancelled = sorted(held)[:2]
    bucket = await requests_bucket(js)
    for request_id in cancelled:
        await bucket.put(cancel_key(request_id), encode(CancelRecord(requested_at=time.time())))
    context = cast(
        ServiceContext, SimpleNamespace(js=js, log=structlog.get_logger(), stop=asyncio.Event())
    )
    cancellations = Cancellations(
        context,
        cast(SchedulerPolicy, None),
        cast(ExecutorPool, None),
        held,
        cast(TokenPublisher, None),
    )
    sweep = asyncio.create_task(cancellations.sweep())
    try:
        found = [await asyncio.wait_for(cancellations.pending.get(), timeout=10) for _ in cancelled]
    finally:
        context.stop.set()
        await asyncio.wait_for(sweep, timeout=10)
    assert sorted(found) == cancelled
    # A later sweep saw only the same two again: the third request has no marker.
    while not cancellations.pending.empty():
        assert cancellations.pending.get_nowait() in cancelled
