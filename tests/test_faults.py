"""Reliability: SIGKILL each service in turn (admission, scheduler, planner, monitor, loader,
an executor) and the nats-server itself while a batch of requests streams, then start it again
as the supervisor would (bench/faults.py has the scenarios). Every request that admission
acknowledged completes with exactly the output of an uninterrupted run or gets an explicit
error; none is lost; and new requests are served again afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from bench.faults import FAULTS, fault_env, injector, reference, run_fault
from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.config import NatsSettings

REQUESTS, MAX_TOKENS = 4, 60


@pytest.fixture(scope="module")
def faulty_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    # Its own embedded nats-server: the nats fault restarts it.
    state = tmp_path_factory.mktemp("faults")
    with LocalCluster(state, instances=2, model_dir=tiny_model_dir, env=fault_env()) as cluster:
        yield cluster


@pytest.fixture(scope="module")
async def fault_nc(faulty_cluster: LocalCluster) -> AsyncIterator[Client]:
    nc = await connect(faulty_cluster.nats_url, NatsSettings(), name="faults", deadline_s=10)
    yield nc
    await nc.close()


@pytest.fixture(scope="module")
async def expected(fault_nc: Client) -> list[list[int]]:
    return await reference(SpotserveClient(fault_nc), REQUESTS, MAX_TOKENS)


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_killed_component_loses_no_request(
    faulty_cluster: LocalCluster, fault_nc: Client, expected: list[list[int]], fault: str
) -> None:
    outcome = await run_fault(
        fault_nc, fault, injector(faulty_cluster, fault), expected, MAX_TOKENS
    )
    assert outcome.lost == 0 and outcome.wrong == 0, outcome
    assert outcome.completed + outcome.errored == outcome.in_flight == REQUESTS, outcome
    # Accepted requests are not errored by any of these faults: they complete.
    assert outcome.completed == REQUESTS, outcome
    assert outcome.recovery_s is not None
    assert not faulty_cluster.dead_services()


async def test_the_supervisor_starts_a_killed_service_again(
    faulty_cluster: LocalCluster, fault_nc: Client, expected: list[list[int]]
) -> None:
    """What `spotserve up` does every half second: a killed service is started again (not an
    executor: a dead instance is the monitor's business) and serves from JetStream."""
    faulty_cluster.kill("scheduler")
    restarted = faulty_cluster.supervise()
    assert [service.name for service in restarted] == ["spotserve-scheduler"]
    assert not faulty_cluster.dead_services()
    client = SpotserveClient(fault_nc, first_chunk_timeout_s=120)
    again = await reference(client, 1, MAX_TOKENS)
    assert again[0] == expected[0]
