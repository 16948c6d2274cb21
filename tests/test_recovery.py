"""Faults with real processes: SIGKILL an executor or the scheduler while requests stream.

Every request must still complete with exactly the tokens it would have had, and the client
must see each chunk index once, in order. This cluster has its own nats-server so its
scheduler does not share work with the session cluster's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.config import NatsSettings
from shared.discovery import discover
from shared.messages import TokenChunk
from shared.subjects import SERVICE_EXECUTOR, SERVICE_SCHEDULER
from tests.helpers import eventually, isolated_cluster

PROMPTS = ("First request", "Second one, a bit longer", "Third", "The fourth and last request")
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def fault_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {
        # Two sequences per executor: four requests spread over both instances.
        "SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": "2",
        "SPOTSERVE_SCHEDULER__DISCOVERY_INTERVAL_S": "0.5",
        # A killed scheduler's requests come back quickly.
        "SPOTSERVE_SCHEDULER__ACK_WAIT_S": "3",
    }
    with isolated_cluster(tmp_path_factory, "fault", tiny_model_dir, 2, env) as cluster:
        yield cluster


@pytest.fixture
async def fault_nc(fault_cluster: LocalCluster) -> AsyncIterator[Client]:
    nc = await connect(fault_cluster.nats_url, NatsSettings(), name="fault-tests", deadline_s=10)
    yield nc
    await nc.close()


async def run_all(client: SpotserveClient) -> list[list[TokenChunk]]:
    async def one(prompt: str) -> list[TokenChunk]:
        return [
            chunk
            async for chunk in client.stream(
                prompt, max_tokens=MAX_TOKENS, temperature=0.8, seed=11, ignore_eos=True
            )
        ]

    return await asyncio.gather(*(one(prompt) for prompt in PROMPTS))


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


async def wait_for_instances(nc: Client, service: str, count: int) -> None:
    async def answering() -> bool:
        return len(await discover(nc, service, verb="PING", window_s=0.2)) >= count

    await eventually(answering, f"{count} {service} answering again", timeout_s=90)


async def run_with_fault(
    client: SpotserveClient,
    cluster: LocalCluster,
    victim: str,
    after_chunks: int,
    restart: bool = False,
) -> list[list[TokenChunk]]:
    """Run the requests; SIGKILL ``victim`` once some request has received ``after_chunks``
    (and start it again at once if ``restart``)."""
    seen = asyncio.Event()

    async def one(prompt: str) -> list[TokenChunk]:
        chunks = []
        async for chunk in client.stream(
            prompt, max_tokens=MAX_TOKENS, temperature=0.8, seed=11, ignore_eos=True
        ):
            chunks.append(chunk)
            if len(chunks) == after_chunks:
                seen.set()
        return chunks

    tasks = [asyncio.create_task(one(prompt)) for prompt in PROMPTS]
    await asyncio.wait_for(seen.wait(), timeout=120)
    cluster.kill(victim)
    if restart:
        cluster.restart(victim)
    return await asyncio.gather(*tasks)


def assert_same_results(expected: list[list[TokenChunk]], got: list[list[TokenChunk]]) -> None:
    for reference, chunks in zip(expected, got, strict=True):
        assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
        assert tokens_of(chunks) == tokens_of(reference)
        assert "".join(c.text for c in chunks) == "".join(c.text for c in reference)
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS


async def test_executor_killed_mid_stream_requests_resume_elsewhere(
    fault_cluster: LocalCluster, fault_nc: Client
) -> None:
    client = SpotserveClient(fault_nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
    expected = await run_all(client)
    got = await run_with_fault(client, fault_cluster, "executor-0", after_chunks=8)
    assert_same_results(expected, got)
    fault_cluster.restart("executor-0")
    await wait_for_instances(fault_nc, SERVICE_EXECUTOR, 2)
    # The restarted instance serves again and results are still the same.
    assert_same_results(expected, await run_all(client))


async def test_scheduler_killed_mid_stream_restarted_scheduler_finishes(
    fault_cluster: LocalCluster, fault_nc: Client
) -> None:
    client = SpotserveClient(fault_nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
    expected = await run_all(client)
    got = await run_with_fault(client, fault_cluster, "scheduler", after_chunks=10, restart=True)
    assert_same_results(expected, got)
    await wait_for_instances(fault_nc, SERVICE_SCHEDULER, 1)
