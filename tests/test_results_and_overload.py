"""The committed result of a request (``spotserve.v1.result``) and the overload bound, against a
running cluster: a client that missed its stream reads every committed token (and sees that a
running request has not finished yet); a client's own request id is unique; more requests than
the queue bound get "overloaded, retry later" at once, and every accepted one completes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from shared.client import Completion, GenerateError, SpotserveClient
from shared.cluster import LocalCluster
from shared.messages import TokenChunk
from tests.helpers import connected, eventually, isolated_cluster

QUEUE_BOUND = 3


@pytest.fixture(scope="module")
def bounded_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {
        "SPOTSERVE_ADMISSION__MAX_QUEUED_REQUESTS": str(QUEUE_BOUND),
        # The scheduler takes one request at a time: the rest wait in the stream.
        "SPOTSERVE_SCHEDULER__MAX_INFLIGHT_REQUESTS": "1",
        "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
    }
    with isolated_cluster(tmp_path_factory, "bounded", tiny_model_dir, 1, env) as cluster:
        yield cluster


@pytest.fixture
async def bnc(bounded_cluster: LocalCluster) -> AsyncIterator[Client]:
    async with connected(bounded_cluster) as nc:
        yield nc


async def test_the_committed_result_equals_the_stream(bnc: Client) -> None:
    client = SpotserveClient(bnc)
    chunks = [c async for c in client.stream("Result please", max_tokens=24, request_id="mine-1")]
    result = await client.result("mine-1")
    assert result.request_id == "mine-1" == chunks[0].request_id
    assert result.token_ids == [t for c in chunks for t in c.token_ids]
    assert result.text == "".join(c.text for c in chunks)
    assert result.finish_reason == chunks[-1].finish_reason is not None
    assert result.usage == chunks[-1].usage and result.chunks == len(chunks)


async def test_a_running_request_reports_what_is_committed_so_far(bnc: Client) -> None:
    client = SpotserveClient(bnc)
    stream = client.stream(
        "Still running", max_tokens=600, ignore_eos=True, temperature=0.0, request_id="long-1"
    )
    seen: list[TokenChunk] = [await anext(stream) for _ in range(5)]
    partial = await client.result("long-1")
    assert partial.finish_reason is None and partial.usage is None
    assert len(partial.token_ids) >= 5
    assert partial.token_ids[:5] == [t for c in seen for t in c.token_ids]
    async for chunk in stream:
        seen.append(chunk)
    final = await client.result("long-1")
    assert final.token_ids == [t for c in seen for t in c.token_ids]
    assert final.finish_reason == "length" and len(final.token_ids) == 600


async def test_request_ids_are_unique_and_checked(bnc: Client) -> None:
    client = SpotserveClient(bnc)
    await client.complete("First use", max_tokens=2, request_id="once-1")
    with pytest.raises(GenerateError) as used:
        await client.complete("Second use", max_tokens=2, request_id="once-1")
    assert used.value.code == "409" and "already used" in used.value.message
    with pytest.raises(GenerateError) as bad:
        await client.complete("Bad id", max_tokens=2, request_id="not a subject!")
    assert bad.value.code == "400" and "request_id" in bad.value.message
    with pytest.raises(GenerateError) as unknown:
        await client.result("never-sent")
    assert unknown.value.code == "404"
    with pytest.raises(GenerateError) as malformed:
        await client.result("")
    assert malformed.value.code == "400"


async def test_more_requests_than_the_bound_are_refused_at_once_and_none_is_lost(
    bnc: Client,
) -> None:
    client = SpotserveClient(bnc, first_chunk_timeout_s=240)

    async def one(index: int) -> str:
        try:
            completion = await client.generate(
                f"Flood {index}", max_tokens=120, ignore_eos=True, temperature=0.0
            )
        except GenerateError as exc:
            assert exc.code == "429" and "overloaded" in exc.message, exc
            return "overloaded"
        assert len(completion.token_ids) == 120
        return "completed"

    outcomes = await asyncio.gather(*(one(i) for i in range(10)))
    assert outcomes.count("overloaded") >= 1
    assert outcomes.count("completed") >= 1  # and each one either completed or was refused
    # Once the queue has drained, a new request is accepted again (as soon as admission's next
    # read of the backlog from JetStream sees it drained).

    async def accepted() -> Completion | None:
        try:
            return await client.generate("After the flood", max_tokens=4, ignore_eos=True)
        except GenerateError as exc:
            assert exc.code == "429", exc
            return None

    after = await eventually(accepted, "a request accepted after the flood")
    assert len(after.token_ids) == 4
