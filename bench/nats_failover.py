"""Losing a NATS server of a clustered JetStream: three nats-servers routed into one cluster,
every stream, KV bucket and the object store with three replicas (SPOTSERVE_NATS__REPLICAS=3),
every service given all three URLs. While a batch of streaming requests runs, SIGKILL the
server the scheduler is connected to, after making it the leader of the TOKENS stream (every
token is committed there before a client sees it), then start it again and wait until it has
rejoined.

Reported: the requests in flight at the kill, how many completed with exactly the tokens of an
undisturbed run (the same batch run first on the same cluster; greedy), how many were
lost (must be 0) or wrong (must be 0), the recovery time from the SIGKILL to the first token
committed (the TOKENS stream's own timestamp) and received (by a client) after it, and to the
end of the last request, and how long the restarted server took to rejoin.

    python -m bench.nats_failover [--requests 16] [--max-tokens 80]

``tests/test_nats_cluster.py`` runs the same scenario (and a KV-cache migration under a server
loss) and asserts the outcomes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError

from bench.faults import committed_result
from shared.bus import connect
from shared.client import GenerateError, SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode
from shared.config import NatsSettings
from shared.messages import ChunkRecord, TokenChunk
from shared.natsserver import NatsCluster
from shared.readers import chunks_of
from shared.subjects import (
    ADMIN_BUCKET,
    COMMITS_SUBJECT,
    FLEET_STREAM,
    INSTANCES_BUCKET,
    LOAD_BUCKET,
    MODELS_BUCKET,
    PLANS_STREAM,
    REQUESTS_BUCKET,
    REQUESTS_STREAM,
    SERVICE_SCHEDULER,
    TOKENS_STREAM,
    ensure_streams,
    fleet_event_subject,
    transfer_inbox_subject,
)

REPLICAS = 3
# Greedy: seeded sampling at a near tie can draw another token when a batch's make-up differs
# (float32 sums in another order), which a kill changes.
GREEDY: dict[str, object] = {"temperature": 0.0, "ignore_eos": True}
PROMPT = "Clustered JetStream request number"
# Kill once a request has received this many chunks (the batch is well under way).
KILL_AFTER_CHUNKS = 8
# Every stream behind spotserve's state (KV buckets are streams named KV_<bucket>).
STREAMS = (
    REQUESTS_STREAM,
    TOKENS_STREAM,
    FLEET_STREAM,
    PLANS_STREAM,
    *(f"KV_{bucket}" for bucket in (REQUESTS_BUCKET, INSTANCES_BUCKET, LOAD_BUCKET, ADMIN_BUCKET)),
)
FINISH_WAIT_S = 240.0


def failover_env(max_batch_size: int = 2) -> dict[str, str]:
    """The services' settings: three replicas of everything; the rest as shipped, except what
    makes a small run quick (executor discovery, one torch thread per executor)."""
    return {
        "SPOTSERVE_NATS__REPLICAS": str(REPLICAS),
        "SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": str(max_batch_size),
        "SPOTSERVE_SCHEDULER__DISCOVERY_INTERVAL_S": "0.5",
        "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
    }


# ---- one streaming request, as a client sees it ----------------------------------------------


@dataclass
class Received:
    """What one client received: its chunks and when each arrived (monotonic clock)."""

    index: int
    request_id: str
    sent_at: float
    chunks: list[TokenChunk] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tokens(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.token_ids]

    @property
    def finished(self) -> bool:
        return bool(self.chunks) and self.chunks[-1].finish_reason is not None

    @property
    def finished_at(self) -> float | None:
        return self.times[-1] if self.finished else None

    @property
    def indices(self) -> list[int]:
        return [chunk.index for chunk in self.chunks]

    @property
    def caught_up(self) -> bool:
        """The client library read a gap back from the committed result (core NATS lost a
        forwarded chunk): the indices jump, the tokens do not."""
        return any(b - a > 1 for a, b in zip(self.indices, self.indices[1:], strict=False))

    @property
    def repeated(self) -> bool:
        return any(b <= a for a, b in zip(self.indices, self.indices[1:], strict=False))


async def stream_request(
    client: SpotserveClient,
    index: int,
    max_tokens: int,
    on_chunk: Callable[[Received], None] | None = None,
    prompt: str = PROMPT,
    sampling: dict[str, object] | None = None,
) -> Received:
    """Stream one request to its end; every chunk is recorded (a failure ends it with
    ``error`` set, and the committed result decides later whether anything was lost)."""
    received = Received(index, f"failover-{uuid.uuid4().hex[:12]}", time.monotonic())
    try:
        async for chunk in client.stream(
            f"{prompt} {index}",
            max_tokens=max_tokens,
            request_id=received.request_id,
            **(GREEDY if sampling is None else sampling),
        ):
            received.chunks.append(chunk)
            received.times.append(time.monotonic())
            if on_chunk is not None:
                on_chunk(received)
    except (GenerateError, TimeoutError, NatsError) as exc:
        received.error = repr(exc)
    return received


async def reference(
    client: SpotserveClient,
    count: int,
    max_tokens: int,
    prompt: str = PROMPT,
    sampling: dict[str, object] | None = None,
) -> tuple[list[list[int]], float]:
    """The undisturbed outputs of the batch, and how long the batch took."""
    started = time.monotonic()
    runs = await asyncio.gather(
        *(
            stream_request(client, i, max_tokens, prompt=prompt, sampling=sampling)
            for i in range(count)
        )
    )
    for run in runs:
        if not run.finished:
            raise RuntimeError(f"the reference run of request {run.index} failed: {run.error}")
    return [run.tokens for run in runs], time.monotonic() - started


# ---- the NATS side ------------------------------------------------------------------------


def servers_with(nats: NatsCluster, client_name: str) -> list[int]:
    """The servers a connection named ``client_name`` (e.g. spotserve-scheduler) is on."""
    return [
        index
        for index, server in enumerate(nats.servers)
        if server.alive and client_name in nats.client_names(index)
    ]


async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
    try:
        info = await js.stream_info(stream)
    except (NatsError, JetStreamError, TimeoutError):
        return None
    return info.cluster.leader if info.cluster is not None else None


async def lead_stream_on(
    nc: Client, js: JetStreamContext, stream: str, server_name: str, timeout_s: float = 30.0
) -> bool:
    """Make ``server_name`` the leader of ``stream`` (a leader step-down with that server as
    the preferred one); False if it did not happen in time."""
    body = json.dumps({"placement": {"preferred": server_name}}).encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader = await stream_leader(js, stream)
        if leader == server_name:
            return True
        if leader is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=5)
        await asyncio.sleep(0.5)
    return False


async def replica_problems(js: JetStreamContext, streams: Iterable[str]) -> list[str]:
    """What keeps ``streams`` from being fully replicated right now ([] when every one has a
    leader and every replica is current)."""
    problems = []
    for stream in streams:
        try:
            info = await js.stream_info(stream)
        except (NatsError, JetStreamError, TimeoutError) as exc:
            problems.append(f"{stream}: {exc!r}")
            continue
        cluster = info.cluster
        if cluster is None or not cluster.leader:
            problems.append(f"{stream}: no leader")
            continue
        replicas = cluster.replicas or []
        if info.config.num_replicas != REPLICAS or len(replicas) != REPLICAS - 1:
            problems.append(f"{stream}: {info.config.num_replicas} replicas, {len(replicas)} peers")
        problems += [
            f"{stream}: replica {peer.name} not current (lag {peer.lag})"
            for peer in replicas
            if not peer.current or peer.offline
        ]
    return problems


async def wait_replicated(
    js: JetStreamContext, streams: Iterable[str] = STREAMS, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    problems = ["not checked"]
    while time.monotonic() < deadline:
        problems = await replica_problems(js, streams)
        if not problems:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"streams not fully replicated within {timeout_s:.0f} s: {problems}")


async def prepare_streams(url: str, timeout_s: float = 120.0) -> None:
    """Create every stream, bucket and the object store with three replicas before the
    services start, and wait until they are fully replicated. (Each service creates them too,
    at its start, asking again while JetStream is slow to answer: seven services creating
    some thirty R3 assets at once on a small machine can make one call time out.)"""
    nc = await connect(url, NatsSettings(), name="failover-setup", deadline_s=30)
    try:
        js = nc.jetstream(timeout=10)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await ensure_streams(js, REPLICAS)
                break
            except (NatsError, JetStreamError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        await wait_replicated(js, [*STREAMS, f"OBJ_{MODELS_BUCKET}"], timeout_s)
    finally:
        await nc.close()


async def roles_of(nats: NatsCluster, js: JetStreamContext, index: int) -> list[str]:
    """What server ``index`` is to spotserve: meta leader, stream leader, services' server."""
    name = nats.names[index]
    roles = ["meta leader"] if nats.meta_leader() == name else []
    for stream in STREAMS:
        if await stream_leader(js, stream) == name:
            roles.append(f"{stream} leader")
    services = sorted({n for n in nats.client_names(index) if n.startswith("spotserve-")})
    roles += [f"server of {n.removeprefix('spotserve-')}" for n in services]
    return roles


async def fleet_events(js: JetStreamContext, kind: str) -> int:
    """How many fleet events of ``kind`` (joined, preempt-notice, lost, left) are stored."""
    subject = fleet_event_subject(kind)
    for _ in range(50):
        try:
            info = await js.stream_info(FLEET_STREAM, subjects_filter=subject)
        except (NatsError, JetStreamError, TimeoutError):
            await asyncio.sleep(0.2)
            continue
        return int((info.state.subjects or {}).get(subject, 0))
    raise TimeoutError(f"cannot read {FLEET_STREAM}")


@dataclass
class Committed:
    """A request's chunks as the TOKENS stream holds them, with their store times."""

    indices: list[int]
    tokens: list[int]
    stored_at: list[float]  # wall clock, seconds (the stream leader's timestamp)

    @property
    def duplicates(self) -> int:
        return len(self.indices) - len(set(self.indices))


async def read_commits(js: JetStreamContext, timeout_s: float = 60.0) -> dict[str, Committed]:
    """Every request's chunks in the iteration records, duplicates included, in stream order.

    Read with direct gets (next record on the subject after a sequence) from the stream's
    leader: no consumer is created, so no meta leader is needed; a get refused while the
    stream elects a leader is tried again until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    by_request: dict[str, Committed] = {}
    seq = 1
    while True:
        try:
            message = await js.get_msg(TOKENS_STREAM, seq=seq, subject=COMMITS_SUBJECT, next=True)
        except NotFoundError:
            return by_request  # nothing more on the subject
        except (NatsError, JetStreamError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        stored_at = message.time.timestamp() if message.time else 0.0
        for chunk in chunks_of(ChunkRecord.model_validate(decode(message.data or b""))):
            committed = by_request.setdefault(chunk.request_id, Committed([], [], []))
            committed.indices.append(chunk.index)
            committed.tokens.extend(chunk.token_ids)
            committed.stored_at.append(stored_at)
        seq = (message.seq or seq) + 1


# ---- the scenario ---------------------------------------------------------------------------


@dataclass
class FailoverOutcome:
    victim: str
    victim_roles: list[str]
    requests: int
    in_flight: int  # sent, not finished at the kill
    completed: int  # with exactly the undisturbed tokens, indices strictly increasing
    lost: int  # no complete result, from the stream or from the committed tokens
    wrong: int  # finished with other tokens, a repeated index, or a duplicate commit
    caught_up: int  # streams whose client read a gap back from the committed result
    duplicate_commits: int
    commit_after_s: float | None  # SIGKILL -> first token committed after it
    token_after_s: float | None  # SIGKILL -> first token a client received after it
    last_end_s: float  # SIGKILL -> the last request's end
    reference_s: float  # the undisturbed batch, first request sent -> last one finished
    disturbed_s: float  # the same for the batch with the kill
    rejoin_s: float | None  # restart -> the server routed, current, every replica current
    # Executors the monitor declared lost although none was (their heartbeats could not be
    # stored while the instances bucket elected a leader; see docs/operations.md).
    spurious_losses: int = 0
    # Requests whose two undisturbed runs already differ (their tokens are not compared).
    unjudged: int = 0
    errors: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        return [
            f"killed {self.victim}: {', '.join(self.victim_roles) or 'no role'}",
            f"requests {self.requests}, in flight at the kill {self.in_flight}",
            f"completed {self.completed}, lost {self.lost}, wrong {self.wrong}"
            f" (streams caught up from the committed result: {self.caught_up},"
            f" duplicate commits: {self.duplicate_commits})",
            f"requests not compared token by token (two undisturbed runs differ): {self.unjudged}",
            f"SIGKILL -> first token committed after it: {seconds(self.commit_after_s)}",
            f"SIGKILL -> first token received after it: {seconds(self.token_after_s)}",
            f"SIGKILL -> end of the last request: {seconds(self.last_end_s)}",
            f"batch: undisturbed {seconds(self.reference_s)}, with the kill"
            f" {seconds(self.disturbed_s)}",
            f"restart -> rejoined (routed, healthy, every replica current):"
            f" {seconds(self.rejoin_s)}",
            f"executors the monitor declared lost meanwhile (none was): {self.spurious_losses}",
        ]

    def summary(self) -> str:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        return (
            f"summary: requests={self.requests} in_flight={self.in_flight}"
            f" completed={self.completed} lost={self.lost} wrong={self.wrong}"
            f" commit_after_s={seconds(self.commit_after_s)}"
            f" token_after_s={seconds(self.token_after_s)}"
            f" last_end_s={seconds(self.last_end_s)} rejoin_s={seconds(self.rejoin_s)}"
            f" spurious_losses={self.spurious_losses} unjudged={self.unjudged}"
        )


async def run_batch_with_kill(
    client: SpotserveClient,
    count: int,
    max_tokens: int,
    kill: Callable[[], Awaitable[None]],
    kill_after_chunks: int = KILL_AFTER_CHUNKS,
    prompt: str = PROMPT,
    sampling: dict[str, object] | None = None,
) -> tuple[list[Received], float, float, int]:
    """Stream ``count`` requests; once one has ``kill_after_chunks`` chunks, ``kill``.
    Returns the runs, the kill's monotonic and wall-clock times (taken once the server is
    dead) and the requests in flight at that moment."""
    progress = asyncio.Event()
    seen: dict[int, Received] = {}  # the runs that received something, by request

    def on_chunk(received: Received) -> None:
        seen[received.index] = received
        if len(received.chunks) >= kill_after_chunks:
            progress.set()

    tasks = [
        asyncio.create_task(
            stream_request(client, i, max_tokens, on_chunk, prompt=prompt, sampling=sampling)
        )
        for i in range(count)
    ]
    await asyncio.wait_for(progress.wait(), 180)
    await kill()
    killed_mono, killed_wall = time.monotonic(), time.time()
    # Requests with no chunk yet are in flight too (accepted, or on their way).
    in_flight = count - sum(run.finished for run in seen.values())
    runs = await asyncio.wait_for(asyncio.gather(*tasks), FINISH_WAIT_S)
    return list(runs), killed_mono, killed_wall, in_flight


def first_difference(got: list[int], want: list[int]) -> int | None:
    """The first position where ``got`` and ``want`` differ (None: equal)."""
    for position, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return position
    return None if len(got) == len(want) else min(len(got), len(want))


async def account(
    client: SpotserveClient,
    js: JetStreamContext,
    runs: list[Received],
    expected: list[list[int]],
    killed_mono: float,
    killed_wall: float,
    unstable: Iterable[int] = (),
) -> dict[str, object]:
    """Compare every run to the undisturbed tokens; a stream that broke is judged by the
    committed result once the request has finished (``bench.faults.committed_result``: lost
    only if it never finishes); read the committed stream for duplicate chunks and the first
    commit after the kill."""
    completed = lost = wrong = caught_up = duplicates = 0
    commits_after: list[float] = []
    ends: list[float] = []
    problems = []
    outputs: list[list[int] | None] = []
    for run in runs:
        caught_up += run.caught_up
        tokens: list[int] | None = run.tokens if run.finished else None
        if run.finished_at is not None:
            ends.append(run.finished_at)
        if run.error is not None:
            problems.append(f"request {run.index} ({run.request_id}): stream broke: {run.error}")
        if tokens is None:
            try:
                result = await committed_result(client, run.request_id)
            except TimeoutError:
                result = None
            if result is not None:
                tokens = result.token_ids
                ends.append(time.monotonic())
        outputs.append(tokens)
    commits = await read_commits(js)
    for run, want, tokens in zip(runs, expected, outputs, strict=True):
        committed = commits.get(run.request_id, Committed([], [], []))
        duplicates += committed.duplicates
        commits_after += [t - killed_wall for t in committed.stored_at if t > killed_wall]
        if tokens is None:
            lost += 1
            problems.append(f"request {run.index} ({run.request_id}): lost")
            continue
        reasons = []
        difference = first_difference(tokens, want)
        if difference is not None and run.index in set(unstable):
            difference = None  # undisturbed runs disagree too: not judged on its tokens
        if difference is not None:
            reasons.append(
                f"tokens differ from the undisturbed run at token {difference}"
                f" ({len(tokens)} tokens, {len(want)} expected)"
            )
        if run.repeated:
            reasons.append(f"chunk indices not increasing: {run.indices}")
        if committed.duplicates:
            reasons.append(f"{committed.duplicates} chunks committed twice")
        if reasons:
            wrong += 1
            problems.append(f"request {run.index} ({run.request_id}): " + "; ".join(reasons))
        else:
            completed += 1
    received_after = [
        t - killed_mono
        for run in runs
        for t, chunk in zip(run.times, run.chunks, strict=True)
        if t > killed_mono and chunk.token_ids
    ]
    return {
        "completed": completed,
        "lost": lost,
        "wrong": wrong,
        "caught_up": caught_up,
        "duplicate_commits": duplicates,
        "commit_after_s": min(commits_after, default=None),
        "token_after_s": min(received_after, default=None),
        "last_end_s": (max(ends) - killed_mono) if ends else float("nan"),
        "errors": problems,
        "unjudged": len(set(unstable)),
    }


async def choose_victim(
    nats: NatsCluster, nc: Client, js: JetStreamContext, service: str, lead: Iterable[str]
) -> int:
    """The server ``service`` is connected to, made leader of the ``lead`` streams."""
    found = servers_with(nats, service)
    if not found:
        raise RuntimeError(f"no server has a connection named {service}")
    victim = found[0]
    for stream in lead:
        await lead_stream_on(nc, js, stream, nats.names[victim])
    return victim


def executor_server(nats: NatsCluster, instances: int, avoid: Iterable[int] = ()) -> int:
    """The server an executor is connected to, one of ``avoid`` only when no other has one."""
    found = [
        index
        for instance in range(instances)
        for index in nats.subscribed(transfer_inbox_subject(f"instance-{instance}"))
    ]
    if not found:
        raise RuntimeError("no server has an executor connected")
    preferred = [index for index in found if index not in set(avoid)]
    return (preferred or found)[0]


async def survivor_client(nats: NatsCluster, victim: int, name: str) -> Client:
    """A client connection to one server that is not the victim."""
    survivor = next(i for i in range(len(nats.servers)) if i != victim)
    return await connect(nats.servers[survivor].url, NatsSettings(), name=name, deadline_s=10)


async def run_failover(
    nats: NatsCluster,
    requests: int,
    max_tokens: int,
    restart: bool = True,
    victim_kind: str = "scheduler",
    instances: int = 2,
) -> FailoverOutcome:
    """The scenario on a started NATS cluster and a started LocalCluster on it. The victim:
    ``scheduler``: the scheduler's server, made the TOKENS leader; ``executor``: an executor's
    server other than the scheduler's (where there is one), the request, token, plan and fleet
    streams led from another server (the kill costs connections, not those elections)."""
    probe = await connect(nats.url, NatsSettings(), name="failover-probe", deadline_s=10)
    try:
        js = probe.jetstream(timeout=5)
        await wait_replicated(js)
        if victim_kind == "scheduler":
            victim = await choose_victim(nats, probe, js, SERVICE_SCHEDULER, [TOKENS_STREAM])
        else:
            victim = executor_server(nats, instances, servers_with(nats, SERVICE_SCHEDULER))
            keeper = nats.names[next(i for i in range(len(nats.servers)) if i != victim)]
            for stream in (TOKENS_STREAM, REQUESTS_STREAM, PLANS_STREAM, FLEET_STREAM):
                await lead_stream_on(probe, js, stream, keeper)
    finally:
        await probe.close()
    nc = await survivor_client(nats, victim, "failover-client")
    try:
        js = nc.jetstream(timeout=5)
        client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
        expected, reference_s = await reference(client, requests, max_tokens)
        # Twice: float32 results depend a little on a batch's make-up, and at a near tie
        # even greedy decoding can pick another token (no fault needed). Requests whose two
        # undisturbed runs disagree cannot be judged; the rest must be exact.
        again, _ = await reference(client, requests, max_tokens)
        unstable = [i for i, (a, b) in enumerate(zip(expected, again, strict=True)) if a != b]
        roles = await roles_of(nats, js, victim)
        lost_before = await fleet_events(js, "lost")

        async def kill() -> None:
            nats.kill(victim)

        started = time.monotonic()
        runs, killed_mono, killed_wall, in_flight = await run_batch_with_kill(
            client, requests, max_tokens, kill
        )
        disturbed_s = max(run.times[-1] for run in runs if run.times) - started
        figures = await account(client, js, runs, expected, killed_mono, killed_wall, unstable)
        rejoin_s = None
        if restart:
            restarted = time.monotonic()
            await asyncio.to_thread(nats.restart, victim)
            await wait_replicated(js)
            rejoin_s = time.monotonic() - restarted
        spurious_losses = await fleet_events(js, "lost") - lost_before
        return FailoverOutcome(
            victim=nats.names[victim],
            victim_roles=roles,
            requests=requests,
            in_flight=in_flight,
            reference_s=reference_s,
            disturbed_s=disturbed_s,
            rejoin_s=rejoin_s,
            spurious_losses=spurious_losses,
            **figures,  # type: ignore[arg-type]
        )
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="sequences per executor iteration"
    )
    parser.add_argument(
        "--victim",
        choices=("scheduler", "executor"),
        default="scheduler",
        help="kill the scheduler's server (made the TOKENS stream's leader first) or an"
        " executor's server",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more setting for every service (repeatable), e.g. SPOTSERVE_MONITOR__LEASE_S=15",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="keep the servers' stores and every log here (default: a temporary directory)",
    )
    args = parser.parse_args()
    from shared.model.checkpoint import default_model_dir, ensure_model

    model_dir = ensure_model(default_model_dir("tiny"), "tiny")
    with contextlib.ExitStack() as stack:
        if args.state_dir is None:
            temporary = tempfile.TemporaryDirectory(prefix="spotserve-nats-failover-")
            base = Path(stack.enter_context(temporary))
        else:
            base = args.state_dir
            base.mkdir(parents=True, exist_ok=True)
        with NatsCluster(base / "nats", size=REPLICAS) as nats:
            asyncio.run(prepare_streams(nats.url))
            cluster = LocalCluster(
                base / "cluster",
                instances=args.instances,
                model_dir=model_dir,
                nats_url=nats.url,
                env={
                    **failover_env(args.max_batch_size),
                    **dict(e.split("=", 1) for e in args.env),
                },
            )
            with cluster:
                outcome = asyncio.run(
                    run_failover(
                        nats,
                        args.requests,
                        args.max_tokens,
                        victim_kind=args.victim,
                        instances=args.instances,
                    )
                )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{stamp}: tiny model, {args.instances} executor instances, {REPLICAS} nats-servers"
        f" (R{REPLICAS}), {args.requests} requests of {args.max_tokens} tokens each"
    )
    for line in outcome.lines():
        print(line)
    for error in outcome.errors:
        print(f"problem: {error}")
    print(outcome.summary())


if __name__ == "__main__":
    main()
