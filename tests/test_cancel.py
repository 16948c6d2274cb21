"""Cancellation (``spotserve.v1.cancel``): over NATS, through the gateway when the HTTP client
hangs up (streaming or not), and racing a preemption. Real services, real NATS, authentication
on (the client and gateway users may cancel)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from nats.aio.client import Client

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.messages import Empty, InflightReport, PreemptNotice, TokenChunk
from shared.rpc import INFLIGHT_ENDPOINT, NOTICE_ENDPOINT, BadRequest, NotFound, call
from shared.security import CLIENT_USER, init_credentials
from tests.helpers import eventually

PROMPT = "The spot instance"
# Long enough that a cancel after a few chunks lands mid-generation (tiny model: 1024 context).
LONG = 900
MODEL = "tiny"


@pytest.fixture(scope="module")
def cancel_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("cancel-cluster")
    cluster = LocalCluster(
        state,
        instances=2,
        model_dir=tiny_model_dir,
        credentials=init_credentials(state / "credentials"),
        env={"SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": "4"},
    )
    with cluster:
        yield cluster


@contextlib.asynccontextmanager
async def client_of(cluster: LocalCluster, user: str = CLIENT_USER) -> AsyncIterator[Client]:
    nc = await connect(cluster.nats_url, cluster.nats_settings(user), name="test", deadline_s=10)
    try:
        yield nc
    finally:
        await nc.close()


async def inflight(cluster: LocalCluster) -> InflightReport:
    # The planner's user may ask the scheduler (a client's may not).
    async with client_of(cluster, user="planner") as nc:
        return await call(nc, INFLIGHT_ENDPOINT, Empty())


async def held_ids(cluster: LocalCluster) -> set[str]:
    return {sequence.request_id for sequence in (await inflight(cluster)).sequences}


async def reference(client: SpotserveClient, count: int) -> list[int]:
    """What an uninterrupted greedy run generates first (the cancelled run's tokens)."""
    result = await client.complete(PROMPT, max_tokens=count, ignore_eos=True, temperature=0.0)
    return result.token_ids


async def stream_until_cancelled(
    client: SpotserveClient, request_id: str, cancel_after: int
) -> list[TokenChunk]:
    chunks: list[TokenChunk] = []
    async for chunk in client.stream(
        PROMPT, request_id=request_id, max_tokens=LONG, ignore_eos=True, temperature=0.0
    ):
        chunks.append(chunk)
        if len(chunks) == cancel_after:
            reply = await client.cancel(request_id)
            assert reply.state == "cancelling"
    return chunks


async def test_cancel_over_nats_ends_the_stream_with_the_tokens_so_far(
    cancel_cluster: LocalCluster,
) -> None:
    async with client_of(cancel_cluster) as nc:
        client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
        chunks = await stream_until_cancelled(client, "cancel-nats-1", cancel_after=3)
        assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
        assert chunks[-1].finish_reason == "cancelled"
        assert chunks[-1].token_ids == []
        assert all(chunk.finish_reason is None for chunk in chunks[:-1])
        tokens = [token for chunk in chunks for token in chunk.token_ids]
        assert 3 <= len(tokens) < LONG
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(tokens)
        # The tokens it got are the uninterrupted run's.
        assert tokens == await reference(client, len(tokens))
        result = await client.result("cancel-nats-1")
        assert result.finish_reason == "cancelled"
        assert result.token_ids == tokens
        # Its batch slot is free: the scheduler holds it no more.
        assert "cancel-nats-1" not in await held_ids(cancel_cluster)
        # A second cancel says it had finished.
        again = await client.cancel("cancel-nats-1")
        assert (again.state, again.finish_reason) == ("finished", "cancelled")


async def test_cancel_of_a_finished_or_unknown_request(cancel_cluster: LocalCluster) -> None:
    async with client_of(cancel_cluster) as nc:
        client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
        done = await client.complete(PROMPT, request_id="cancel-done-1", max_tokens=4)
        reply = await client.cancel("cancel-done-1")
        assert (reply.state, reply.finish_reason) == ("finished", done.finish_reason)
        assert (await client.result("cancel-done-1")).finish_reason == done.finish_reason
        with pytest.raises(NotFound, match="no request 'never-seen'"):
            await client.cancel("never-seen")
        with pytest.raises(BadRequest):
            await client.cancel("not a valid id!")


async def test_gateway_stream_whose_client_hangs_up_is_cancelled(
    cancel_cluster: LocalCluster,
) -> None:
    base_url = (await cancel_cluster.urls()).gateway[0]
    api = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    stream = await api.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=LONG,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = 0
    async for part in stream:
        received += len(part.choices[0].text) > 0
        if received >= 3:
            break
    (request_id,) = await held_ids(cancel_cluster)
    await stream.close()  # the official client's hang-up
    await eventually(
        lambda: _not_held(cancel_cluster, request_id), "the hung-up request's slot to be free"
    )
    async with client_of(cancel_cluster) as nc:
        result = await SpotserveClient(nc).result(request_id)
    assert result.finish_reason == "cancelled"
    assert 3 <= len(result.token_ids) < LONG
    await api.close()


async def test_gateway_request_whose_client_hangs_up_before_the_answer_is_cancelled(
    cancel_cluster: LocalCluster,
) -> None:
    base_url = (await cancel_cluster.urls()).gateway[0]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=base_url) as http:
        post = asyncio.create_task(http.post("/v1/completions", json=body, timeout=120))
        (request_id,) = await eventually(
            lambda: held_ids(cancel_cluster), "the request to be running"
        )
        post.cancel()  # closes the connection before any answer
        with contextlib.suppress(asyncio.CancelledError):
            await post
    await eventually(
        lambda: _not_held(cancel_cluster, request_id), "the hung-up request's slot to be free"
    )
    async with client_of(cancel_cluster) as nc:
        assert (await SpotserveClient(nc).result(request_id)).finish_reason == "cancelled"


async def test_cancel_racing_a_preemption(cancel_cluster: LocalCluster) -> None:
    """A notice moves the victim's requests while one of them is cancelled: the cancelled one
    ends "cancelled" with the uninterrupted tokens so far, the others complete unchanged."""
    async with client_of(cancel_cluster) as nc, client_of(cancel_cluster, "operator") as ops:
        client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
        count = 120
        expected = await reference(client, count)
        ids = [f"race-{i}" for i in range(4)]
        runs = [
            asyncio.create_task(
                client.generate(
                    PROMPT,
                    request_id=request_id,
                    max_tokens=count,
                    ignore_eos=True,
                    temperature=0.0,
                )
            )
            for request_id in ids
        ]
        report = await eventually(
            lambda: _all_bound(cancel_cluster, ids), "every request to be running"
        )
        victim = report.sequences[0].instance_id
        on_victim = [s.request_id for s in report.sequences if s.instance_id == victim]
        cancelled = on_victim[0]
        notice = call(
            ops, NOTICE_ENDPOINT, PreemptNotice(instance_id=victim, grace_s=5.0, source="cli")
        )
        cancel = client.cancel(cancelled)
        await asyncio.gather(notice, cancel)
        results = await asyncio.gather(*runs, return_exceptions=True)
        for request_id, result in zip(ids, results, strict=True):
            assert not isinstance(result, BaseException), (request_id, result)
            if request_id == cancelled:
                if result.finish_reason == "cancelled":
                    assert result.token_ids == expected[: len(result.token_ids)]
                    continue
            assert result.finish_reason == "length", request_id
            assert result.token_ids == expected, request_id
        assert not (await held_ids(cancel_cluster)) & set(ids)


async def _not_held(cluster: LocalCluster, request_id: str) -> bool:
    return request_id not in await held_ids(cluster)


async def _all_bound(cluster: LocalCluster, ids: list[str]) -> InflightReport | None:
    report = await inflight(cluster)
    bound = {s.request_id for s in report.sequences if s.instance_id is not None}
    return report if set(ids) <= bound else None
