"""A clustered JetStream loses a server, with real processes: three nats-servers routed into one
cluster (shared.natsserver.NatsCluster), every stream, KV bucket and the object store with three
replicas (SPOTSERVE_NATS__REPLICAS=3), every service given all three URLs, two executors on the
tiny model.

- A nats-server is SIGKILLed while requests stream: the one the scheduler is connected to, made
  leader of the TOKENS stream first. Every request completes with exactly the tokens of an
  undisturbed run (greedy: seeded sampling may flip a near-tie when the batch differs), each
  chunk committed once, nothing lost; started again, the server rejoins and serves.
- A preempted executor's server is SIGKILLed right after the notice, once the plan that moves
  its request is out: the request completes with exactly the undisturbed (greedy) tokens.
- The planner replanning while the PLANS stream elects a leader: the plan is published once
  one is elected, and the planner lives on.

bench/nats_failover.py runs the first scenario with more requests and times it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from bench.nats_failover import (
    GREEDY,
    REPLICAS,
    STREAMS,
    Received,
    choose_victim,
    failover_env,
    lead_stream_on,
    prepare_streams,
    read_commits,
    reference,
    replica_problems,
    run_batch_with_kill,
    servers_with,
    stream_leader,
    stream_request,
    survivor_client,
)
from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.messages import InflightReport, ModeReply, ModeRequest, Plan
from shared.natsserver import NatsCluster
from shared.rpc import MODE_ENDPOINT, Unavailable, call
from shared.subjects import (
    ADMIN_BUCKET,
    FLEET_NOTICE,
    FLEET_STREAM,
    MODELS_BUCKET,
    PLANS_STREAM,
    PLANS_SUBJECT,
    SCHEDULER_INFLIGHT,
    SERVICE_PLANNER,
    SERVICE_SCHEDULER,
    TOKENS_STREAM,
    transfer_inbox_subject,
)
from tests.helpers import eventually

# Few requests, few tokens: the kill lands while all of them stream (it comes after 8 chunks).
REQUESTS, MAX_TOKENS = 4, 40
# The migration scenario (as tests/test_reparallelization.py's): a request long enough to
# outlast the grace period, which is short enough that it must move (by its move time, a
# good second before the deadline).
MIGRATION_REQUESTS, MIGRATION_TOKENS, GRACE_S = 1, 960, 3.0
MIGRATION_PROMPT = "A request that moves with its KV cache, number"
# Generous: each wait covers a leader election or two on a slow, shared 2-core machine.
WAIT_S = 120.0

ENV = {
    **failover_env(max_batch_size=2),  # R3, the batch spread over both executors
    "SPOTSERVE_PLANNER__DEBOUNCE_S": "0.2",
    "SPOTSERVE_PLANNER__RATE_POLL_S": "0.5",  # a new serving mode is planned for at once
}


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats-cluster"), size=REPLICAS) as nats:
        yield nats


@pytest.fixture(scope="module")
def r3_cluster(
    nats_cluster: NatsCluster, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    # Every stream, bucket and the object store created (R3) before the services start, so
    # that they start at once (each would ask again while seven create them together).
    asyncio.run(prepare_streams(nats_cluster.url))
    cluster = LocalCluster(
        tmp_path_factory.mktemp("r3-cluster"),
        instances=2,
        model_dir=tiny_model_dir,
        nats_url=nats_cluster.url,  # all three servers, comma-separated
        env=ENV,
    )
    with cluster:
        yield cluster


@pytest.fixture(autouse=True)
def servers_back(nats_cluster: NatsCluster) -> Iterator[None]:
    """Whatever a test left killed starts again: the next test begins with three servers."""
    yield
    for index, server in enumerate(nats_cluster.servers):
        if not server.alive:
            nats_cluster.restart(index, WAIT_S)


@pytest.fixture
async def probe(nats_cluster: NatsCluster, r3_cluster: LocalCluster) -> AsyncIterator[Client]:
    """A connection to the whole cluster (for stream info, notices and step-downs)."""
    nc = await connect(nats_cluster.url, NatsSettings(), name="r3-probe", deadline_s=10)
    yield nc
    await nc.close()


async def fully_replicated(probe: Client) -> None:
    js = probe.jetstream(timeout=5)

    async def no_problems() -> bool:
        return not await replica_problems(js, [*STREAMS, f"OBJ_{MODELS_BUCKET}"])

    await eventually(no_problems, "every stream with 3 current replicas", timeout_s=WAIT_S)


def assert_exact(runs: list[Received], expected: list[list[int]]) -> None:
    """Each client got the undisturbed tokens: its stream ended, no chunk index twice or
    backwards, no token missing, none repeated."""
    for run, want in zip(runs, expected, strict=True):
        assert run.error is None, run.error
        assert run.finished and run.chunks[-1].finish_reason == "length"
        assert not run.repeated, run.indices
        assert run.tokens == want


async def assert_committed_once(probe: Client, runs: list[Received]) -> None:
    """The TOKENS stream's iteration records hold each chunk exactly once, in order, with the
    client's tokens."""
    js = probe.jetstream(timeout=10)
    commits = await read_commits(js)
    for run in runs:
        committed = commits[run.request_id]
        assert committed.indices == list(range(len(committed.indices))), committed.indices
        assert committed.tokens == run.tokens


async def test_losing_the_tokens_leader_loses_no_token(
    nats_cluster: NatsCluster, r3_cluster: LocalCluster, probe: Client
) -> None:
    js = probe.jetstream(timeout=5)
    # Every stream, bucket and the object store really has three replicas, all current.
    await fully_replicated(probe)
    for stream in STREAMS:
        info = await js.stream_info(stream)
        assert info.config.num_replicas == REPLICAS
        assert info.cluster is not None and len(info.cluster.replicas or []) == REPLICAS - 1

    # The victim: the scheduler's server, made the TOKENS stream's leader. The PLANS stream
    # is led from another server (losing its leader is the last test's case).
    victim = await choose_victim(nats_cluster, probe, js, SERVICE_SCHEDULER, [TOKENS_STREAM])
    victim_name = nats_cluster.names[victim]
    assert await stream_leader(js, TOKENS_STREAM) == victim_name
    survivor = nats_cluster.names[(victim + 1) % REPLICAS]
    assert await lead_stream_on(probe, js, PLANS_STREAM, survivor)
    nc = await survivor_client(nats_cluster, victim, "r3-client")
    try:
        client = SpotserveClient(nc, first_chunk_timeout_s=WAIT_S, chunk_timeout_s=WAIT_S / 2)
        expected, _ = await reference(client, REQUESTS, MAX_TOKENS, sampling=GREEDY)

        async def kill() -> None:
            nats_cluster.kill(victim)

        runs, _, _, in_flight = await run_batch_with_kill(
            client, REQUESTS, MAX_TOKENS, kill, sampling=GREEDY
        )
        assert in_flight >= 2
        assert_exact(runs, expected)
        await assert_committed_once(probe, runs)
        # The scheduler carried on from another server; TOKENS has a new leader.
        assert victim not in servers_with(nats_cluster, SERVICE_SCHEDULER)
        assert await stream_leader(js, TOKENS_STREAM) not in (None, victim_name)

        # Started again, the server rejoins: routed to both others, JetStream current, and
        # it is a current replica of every stream again.
        await asyncio.to_thread(nats_cluster.restart, victim, WAIT_S)
        assert nats_cluster.routed_to(victim) == set(nats_cluster.names) - {victim_name}
        await fully_replicated(probe)
        # Every service lived through it (checked this late: a service that fails on the
        # loss may take a request timeout or two to end).
        assert all(service.alive for service in r3_cluster.services)
        # A client of the restarted server alone is served.
        only = await connect(nats_cluster.servers[victim].url, NatsSettings(), "r3-rejoined", 10)
        try:
            again = SpotserveClient(only, first_chunk_timeout_s=WAIT_S)
            rerun = await stream_request(again, 0, MAX_TOKENS, sampling=GREEDY)
            assert rerun.error is None and rerun.finished
            assert rerun.tokens == expected[0]
        finally:
            await only.close()
    finally:
        await nc.close()


async def inflight(nc: Client) -> InflightReport:
    reply = await nc.request(SCHEDULER_INFLIGHT, b"", timeout=10)
    return InflightReport.model_validate(decode(reply.data))


async def test_losing_a_server_while_kv_caches_migrate(
    nats_cluster: NatsCluster, r3_cluster: LocalCluster, probe: Client
) -> None:
    js = probe.jetstream(timeout=5)
    await fully_replicated(probe)  # the previous test's server is back and current
    # The client's server hosts no executor (with 3 servers and 2 executors one never does);
    # the victim will be the preempted executor's server. The plan and the commits go through
    # the client's server (their streams led from there) so that the plan comes within the
    # short grace period and the caches move while the victim's clients reconnect.
    executor_servers = {
        index
        for instance in ("instance-0", "instance-1")
        for index in nats_cluster.subscribed(transfer_inbox_subject(instance))
    }
    client_server = min(set(range(REPLICAS)) - executor_servers)
    for stream in (TOKENS_STREAM, PLANS_STREAM, FLEET_STREAM):
        assert await lead_stream_on(probe, js, stream, nats_cluster.names[client_server])
    nc = await connect(nats_cluster.servers[client_server].url, NatsSettings(), "r3-client", 10)
    victim: int | None = None
    try:
        client = SpotserveClient(nc, first_chunk_timeout_s=WAIT_S, chunk_timeout_s=WAIT_S / 2)
        expected, _ = await reference(
            client, MIGRATION_REQUESTS, MIGRATION_TOKENS, MIGRATION_PROMPT, GREEDY
        )
        started = asyncio.Event()

        def on_chunk(run: Received) -> None:
            if len(run.chunks) >= 4:
                started.set()

        tasks = [
            asyncio.create_task(
                stream_request(
                    client, i, MIGRATION_TOKENS, on_chunk, MIGRATION_PROMPT, sampling=GREEDY
                )
            )
            for i in range(MIGRATION_REQUESTS)
        ]
        await asyncio.wait_for(started.wait(), WAIT_S)
        report = await inflight(probe)
        placed = [s.instance_id for s in report.sequences if s.instance_id is not None]
        holder = max(sorted(set(placed)), key=placed.count)
        on_holder = {s.request_id for s in report.sequences if s.instance_id == holder}
        victim = nats_cluster.subscribed(transfer_inbox_subject(holder))[0]
        assert victim != client_server

        scheduler_log = r3_cluster.log_dir / "scheduler.log"
        applied_before = len(plans_applied(scheduler_log))
        body = encode({"instance_id": holder, "grace_s": GRACE_S})
        reply = await probe.request(FLEET_NOTICE, body, timeout=30)
        assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.headers

        # Right after the notice, as soon as the plan that moves the holder's requests is in
        # the scheduler's hands (a fraction of a second; the caches move by their move time,
        # about two seconds later): kill the holder's server. Waiting for the plan first keeps
        # the test about the migration: a plan follower whose consumer lived on the killed
        # server sees the next plan only after its missed-heartbeat reset (2-3 s,
        # shared.readers.FOLLOW_HEARTBEAT_S, about the grace period here).
        def moving_plan() -> bool:
            return any(
                holder not in record.get("serving", [holder])  # type: ignore[operator]
                for record in plans_applied(scheduler_log)[applied_before:]
            )

        await eventually(moving_plan, "a plan without the holder", GRACE_S)
        nats_cluster.kill(victim)
        runs = await asyncio.wait_for(asyncio.gather(*tasks), 4 * WAIT_S)
        assert_exact(runs, expected)
        await assert_committed_once(probe, runs)

        # The request outlived the holder (SIGKILLed at its deadline): it left the holder,
        # moved by the plan (its KV cache streamed peer to peer) or resumed elsewhere from its
        # committed tokens (a step in flight to the holder when its server died is given up
        # once the holder announces its reconnect).
        async def holder_killed() -> str | None:
            return next(
                (
                    str(record["timestamp"])
                    for record in log_records(r3_cluster.log_dir / "monitor.log")
                    if record.get("event") == "local.sigkill"
                    and record.get("instance_id") == holder
                ),
                None,
            )

        killed_at = await eventually(holder_killed, "the holder's end", WAIT_S)
        finished_at = [
            str(record["timestamp"])
            for record in log_records(scheduler_log)
            if record.get("event") == "request.finished" and record.get("request_id") in on_holder
        ]
        assert len(finished_at) == len(on_holder)
        assert all(at > killed_at for at in finished_at), (killed_at, finished_at)
        assert not r3_cluster.dead_services()
    finally:
        await nc.close()
        if victim is not None and not nats_cluster.servers[victim].alive:
            await asyncio.to_thread(nats_cluster.restart, victim, WAIT_S)


async def test_the_planner_survives_losing_the_plans_leader(
    nats_cluster: NatsCluster, r3_cluster: LocalCluster, probe: Client
) -> None:
    """A replan while the PLANS stream has no leader: the plan is published once one is
    elected, and the planner lives on."""
    js = probe.jetstream(timeout=5)
    await fully_replicated(probe)
    planner_server = servers_with(nats_cluster, SERVICE_PLANNER)[0]
    others = [i for i in range(REPLICAS) if i != planner_server]
    victim, keeper = others[0], others[1]  # the planner's own connection stays up
    assert await lead_stream_on(probe, js, PLANS_STREAM, nats_cluster.names[victim])
    # The serving mode is kept in the admin bucket, and the fleet stream: both stay readable.
    for stream in (f"KV_{ADMIN_BUCKET}", FLEET_STREAM):
        assert await lead_stream_on(probe, js, stream, nats_cluster.names[keeper])
    nc = await connect(nats_cluster.servers[keeper].url, NatsSettings(), "r3-operator", 10)
    try:
        nats_cluster.kill(victim)

        # A new serving mode makes the planner plan again (it polls the mode every 0.5 s here).
        # Admission may have been connected to the victim: asked again until it is back.
        async def set_mode() -> ModeReply | None:
            try:
                return await call(nc, MODE_ENDPOINT, ModeRequest(mode="reroute"), timeout_s=30)
            except Unavailable:
                return None

        changed = await eventually(set_mode, "admission to take the new mode", WAIT_S)
        assert changed.mode == "reroute"

        async def rerouting() -> bool:
            assert not r3_cluster.dead_services(), "a service died"
            try:
                last = await nc.jetstream(timeout=5).get_last_msg(PLANS_STREAM, PLANS_SUBJECT)
            except (NatsError, JetStreamError, TimeoutError):
                return False
            return Plan.model_validate(decode(last.data or b"")).mode == "reroute"

        await eventually(rerouting, "a plan in the new mode", timeout_s=WAIT_S)
    finally:
        await nc.close()
        await asyncio.to_thread(nats_cluster.restart, victim, WAIT_S)


def plans_applied(scheduler_log: Path) -> list[dict[str, object]]:
    return [r for r in log_records(scheduler_log) if r.get("event") == "plan.applied"]


def log_records(path: Path) -> list[dict[str, object]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
