"""The monitor with real processes: a nats-server, the monitor and executor processes started
the way the local cluster starts them, the CLI as a subprocess.

The destructive tests (SIGKILL, preemption, monitor restarts) run against a cluster of their
own: its own nats-server and monitor, and only the executors each test starts (no scheduler,
admission, loader or planner: the monitor needs none of them). Leases are short (heartbeat
0.25 s, lease 3 s) so that an instance lost without notice shows up quickly. Conditions are
waited for with bounded timeouts; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from nats.micro.service import ServiceConfig

from shared.bus import connect
from shared.cluster import LocalCluster, ServiceProcess
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.discovery import discover
from shared.messages import (
    NOTICE_OUTCOME_HEADER,
    AddInstancesReply,
    FleetEvent,
    FleetStatus,
    InstanceRecord,
)
from shared.natsserver import EmbeddedNatsServer
from shared.subjects import (
    FLEET_ADD,
    FLEET_NOTICE,
    FLEET_STATUS,
    FLEET_STREAM,
    FLEET_SUBJECT_PREFIX,
    INSTANCES_BUCKET,
    SERVICE_EXECUTOR,
    SERVICE_MONITOR,
    ensure_streams,
)
from tests.helpers import eventually
from tests.test_cloud_adapters import FakeMetadataServer, aws_time

LEASE_S = 3.0
ENV = {
    "SPOTSERVE_MONITOR__HEARTBEAT_S": "0.25",
    "SPOTSERVE_MONITOR__LEASE_S": str(LEASE_S),
    "SPOTSERVE_MONITOR__CHECK_INTERVAL_S": "0.1",
    # Small executors: one thread, few KV slots.
    "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
    "SPOTSERVE_EXECUTOR__MAX_SLOTS": "2",
    "SPOTSERVE_EXECUTOR__HOST_KV_SLOTS": "0",
}
JOIN_TIMEOUT_S = 180.0  # an executor imports torch and loads its model first


@dataclass
class Seen:
    seq: int
    subject: str
    event: FleetEvent


@dataclass
class EventLog:
    """Every fleet event in the stream, in order (an ordered consumer from the start)."""

    items: list[Seen] = field(default_factory=list)

    async def start(self, nc: Client) -> None:
        js = nc.jetstream()
        await ensure_streams(js)
        self._subscription = await js.subscribe(
            f"{FLEET_SUBJECT_PREFIX}.*",
            stream=FLEET_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )

    async def _on_message(self, msg: Msg) -> None:
        event = FleetEvent.model_validate(decode(msg.data))
        self.items.append(Seen(msg.metadata.sequence.stream, msg.subject, event))

    async def stop(self) -> None:
        await self._subscription.unsubscribe()

    def of(self, instance_id: str, kind: str | None = None) -> list[Seen]:
        return [
            seen
            for seen in self.items
            if seen.event.instance.instance_id == instance_id
            and (kind is None or seen.event.kind == kind)
        ]

    def kinds(self, instance_id: str) -> list[str]:
        return [seen.event.kind for seen in self.of(instance_id)]

    async def wait(self, instance_id: str, kind: str, timeout_s: float = 60.0) -> Seen:
        found = await eventually(
            lambda: self.of(instance_id, kind), f"a {kind!r} event of {instance_id}", timeout_s
        )
        return found[0]


@dataclass
class Rig:
    server: EmbeddedNatsServer
    cluster: LocalCluster
    nc: Client
    kv: KeyValue
    events: EventLog

    @property
    def url(self) -> str:
        return self.server.url

    def start_executor(self, instance_id: str) -> ServiceProcess:
        self.cluster._spawn(
            SERVICE_EXECUTOR,
            "services.executor",
            {"SPOTSERVE_EXECUTOR__INSTANCE_ID": instance_id},
            log_name=f"executor-{instance_id}",
        )
        return self.cluster.find(f"executor-{instance_id}")

    async def joined(self, instance_id: str) -> Seen:
        return await self.events.wait(instance_id, "joined", JOIN_TIMEOUT_S)

    async def monitor_ready(self) -> None:
        await eventually(
            lambda: discover(self.nc, SERVICE_MONITOR, verb="PING", window_s=0.2),
            "the monitor to answer $SRV PING",
        )

    async def request(self, subject: str, body: Any, json_body: bool = False) -> Msg:
        if json_body:
            data = json.dumps(body).encode()
            headers = {"Content-Type": "application/json"}
            return await self.nc.request(subject, data, timeout=30, headers=headers)
        data = body if isinstance(body, bytes) else encode(body)
        return await self.nc.request(subject, data, timeout=30)

    async def notice(self, instance_id: str, grace_s: float | None) -> tuple[str, FleetEvent]:
        body: dict[str, Any] = {"instance_id": instance_id}
        if grace_s is not None:
            body["grace_s"] = float(grace_s)
        reply = await self.request(FLEET_NOTICE, body)
        headers = reply.headers or {}
        assert ERROR_CODE_HEADER not in headers, headers
        return headers[NOTICE_OUTCOME_HEADER], FleetEvent.model_validate(decode(reply.data))

    async def status(self) -> FleetStatus:
        return FleetStatus.model_validate(decode((await self.request(FLEET_STATUS, {})).data))

    async def record(self, instance_id: str) -> InstanceRecord | None:
        try:
            entry = await self.kv.get(instance_id)
        except NotFoundError:
            return None
        return InstanceRecord.model_validate(decode(entry.value or b""))

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shared.cli", *args, "--nats-url", self.url],
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> AsyncIterator[Rig]:
    store = tmp_path_factory.mktemp("monitor-nats")
    server = EmbeddedNatsServer(store, log_file=store / "nats-server.log")
    server.start()
    cluster = LocalCluster(
        tmp_path_factory.mktemp("monitor-cluster"),
        instances=1,
        model_dir=tiny_model_dir,
        nats_url=server.url,
        env=ENV,
    )
    nc = await connect(server.url, NatsSettings(), name="monitor-tests", deadline_s=10)
    events = EventLog()
    try:
        cluster._spawn(SERVICE_MONITOR, "services.monitor", {})
        await events.start(nc)
        js = nc.jetstream()
        kv = await eventually(lambda: _bucket(js), "the registry bucket")
        rig = Rig(server, cluster, nc, kv, events)
        await rig.monitor_ready()
        yield rig
    finally:
        await events.stop()
        await nc.close()
        await asyncio.to_thread(cluster.stop)
        server.stop()


async def _bucket(js: Any) -> KeyValue | None:
    try:
        return await js.key_value(INSTANCES_BUCKET)
    except NotFoundError:
        return None


def _alive(pid: int) -> bool:
    """Running (a zombie, killed and not yet reaped by its parent, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


# -- registry --------------------------------------------------------------------------------------


async def test_registration_heartbeat_and_clean_stop(rig: Rig) -> None:
    executor = rig.start_executor("reg-a")
    joined = await rig.joined("reg-a")
    record = await rig.record("reg-a")
    assert record is not None and executor.process is not None
    assert record.pid == executor.process.pid
    assert record.devices == 1 and record.device_kind == "cpu"
    assert record.device_memory_bytes > 0
    assert record.price_class == "spot"
    assert record.node == joined.event.instance.node
    assert joined.subject == f"{FLEET_SUBJECT_PREFIX}.joined"
    # Heartbeats re-put the same incarnation with a later heartbeat time.
    first = record

    async def beaten() -> bool:
        later = await rig.record("reg-a")
        return later is not None and later.heartbeat_at > first.heartbeat_at

    await eventually(beaten, "a heartbeat")
    assert (await rig.record("reg-a")).started_at == first.started_at  # type: ignore[union-attr]

    executor.terminate()  # a clean stop deletes the key: "left"
    await asyncio.to_thread(executor.wait, 60)
    left = await rig.events.wait("reg-a", "left")
    assert left.event.deadline is None
    assert await rig.record("reg-a") is None
    assert rig.events.kinds("reg-a") == ["joined", "left"]


async def test_sigkill_without_notice_is_lost_after_the_lease(rig: Rig) -> None:
    rig.start_executor("lost-a")
    await rig.joined("lost-a")
    rig.cluster.kill("executor-lost-a")
    lost = await rig.events.wait("lost-a", "lost", timeout_s=LEASE_S * 10)
    assert lost.event.deadline is None and lost.event.source == "monitor"
    assert await rig.record("lost-a") is None  # the monitor removed the stale record
    assert rig.events.kinds("lost-a") == ["joined", "lost"]


async def test_an_executor_that_answers_keeps_its_lease_without_heartbeats(rig: Rig) -> None:
    """Heartbeats JetStream did not store (a clustered JetStream electing the bucket's leader)
    are no death: a lease that ran out is confirmed over NATS, and only silence ends it."""
    now = time.time()
    record = InstanceRecord(
        instance_id="quiet-a",
        node="elsewhere",
        devices=1,
        device_kind="cpu",
        device_memory_bytes=1 << 30,
        started_at=now,
        heartbeat_at=now,
    )
    metadata = {"instance_id": "quiet-a"}
    config = ServiceConfig(name=SERVICE_EXECUTOR, version="0.0.0", metadata=metadata)
    answering = await add_service(rig.nc, config)  # answers $SRV as the executor would
    await rig.kv.put("quiet-a", encode(record))  # registered once, never again
    await rig.joined("quiet-a")
    monitor_log = rig.cluster.log_dir / "monitor.log"

    def kept() -> bool:
        text = monitor_log.read_text(encoding="utf-8")
        return '"registry.lease_late_but_answering"' in text and '"quiet-a"' in text

    await eventually(kept, "the monitor to keep the answering executor's lease", LEASE_S * 10)
    assert rig.events.kinds("quiet-a") == ["joined"]
    await answering.stop()
    lost = await rig.events.wait("quiet-a", "lost", timeout_s=LEASE_S * 10)
    assert lost.event.source == "monitor"


# -- the local provider: add and preempt ---------------------------------------------------------


async def test_fleet_add_joins_and_preempt_kills_at_the_deadline(rig: Rig) -> None:
    added = await rig.cli("fleet", "add", "--json")
    assert added.returncode == 0, added.stderr
    (instance_id,) = json.loads(added.stdout)["instance_ids"]
    joined = await rig.joined(instance_id)
    pid = joined.event.instance.pid
    assert pid is not None
    monitor = rig.cluster.find("monitor").process
    assert monitor is not None and _parent_pid(pid) == monitor.pid  # the monitor's child

    preempt = await rig.cli("fleet", "preempt", instance_id, "--grace", "1", "--json")
    assert preempt.returncode == 0, preempt.stderr
    answer = json.loads(preempt.stdout)
    assert answer["outcome"] == "new"
    deadline = answer["event"]["deadline"]
    assert deadline - answer["event"]["at"] == pytest.approx(1.0)

    left = await rig.events.wait(instance_id, "left")
    (notice,) = rig.events.of(instance_id, "preempt-notice")
    assert notice.event.deadline == deadline and notice.event.source == "cli"
    assert notice.subject == f"{FLEET_SUBJECT_PREFIX}.preempt-notice"
    assert joined.seq < notice.seq < left.seq
    # Killed by the local provider at (not before) the deadline.
    assert left.event.source == "local" and left.event.at >= deadline
    await eventually(lambda: not _alive(pid), f"process {pid} to be gone")
    log = (rig.cluster.log_dir / f"executor-{instance_id}.log").read_text()
    assert "executor.ready" in log and "service.stopping" not in log  # SIGKILL: no clean-up
    assert await rig.record(instance_id) is None
    assert rig.events.kinds(instance_id) == ["joined", "preempt-notice", "left"]


async def test_duplicate_notices_give_one_event_an_earlier_deadline_updates(rig: Rig) -> None:
    executor = rig.start_executor("dup-a")  # started by the cluster, not the monitor
    await rig.joined("dup-a")
    outcome, first = await rig.notice("dup-a", 60)
    assert outcome == "new"
    again = [await rig.notice("dup-a", 60), await rig.notice("dup-a", 120)]
    assert [outcome for outcome, _ in again] == ["duplicate", "duplicate"]
    assert all(event.deadline == first.deadline for _, event in again)
    assert len(rig.events.of("dup-a", "preempt-notice")) == 1
    status = {item.record.instance_id: item for item in (await rig.status()).instances}
    assert status["dup-a"].state == "preempting" and status["dup-a"].deadline == first.deadline

    outcome, sooner = await rig.notice("dup-a", 1)
    assert outcome == "updated"
    assert first.deadline is not None and sooner.deadline is not None
    assert sooner.deadline < first.deadline
    await rig.events.wait("dup-a", "left")
    assert executor.process is not None
    assert await asyncio.to_thread(executor.process.wait, 60) == -signal.SIGKILL
    notices = rig.events.of("dup-a", "preempt-notice")
    assert [seen.event.deadline for seen in notices] == [first.deadline, sooner.deadline]
    assert rig.events.kinds("dup-a") == ["joined", "preempt-notice", "preempt-notice", "left"]


async def test_notice_cancels_an_added_instance_that_has_not_joined(rig: Rig) -> None:
    reply = await rig.request(FLEET_ADD, {"count": 2})
    cancelled, kept = AddInstancesReply.model_validate(decode(reply.data)).instance_ids
    # Right away: the new process is still importing torch, it has not registered.
    outcome, event = await rig.notice(cancelled, 30)
    assert outcome == "cancelled"
    pid = event.instance.pid
    assert pid is not None
    status = await rig.status()
    assert cancelled not in status.pending
    await eventually(lambda: not _alive(pid), "the cancelled process to be gone")
    # The other one joins; by then anything about the cancelled one would be in the stream.
    await rig.joined(kept)
    assert rig.events.of(cancelled) == []
    assert await rig.record(cancelled) is None
    # Clean-up, and a zero grace period: killed at once.
    outcome, _ = await rig.notice(kept, 0)
    assert outcome == "new"
    await rig.events.wait(kept, "left")


async def test_bad_notices_are_400_unknown_instances_404(rig: Rig) -> None:
    bad_bodies: list[Any] = [
        b"\xc1",  # not msgpack
        {"grace_s": 1.0},  # no instance
        {"instance_id": "two words"},
        {"instance_id": "a", "grace_s": -1.0},
        {"instance_id": "a", "grace_s": 1e9},
        {"instance_id": "a", "source": "moon"},
        {"instance_id": "a", "deadline": 5},  # unknown field
    ]
    for body in bad_bodies:
        reply = await rig.request(FLEET_NOTICE, body)
        assert (reply.headers or {}).get(ERROR_CODE_HEADER) == "400", body
        assert "bad preempt notice" in reply.headers[ERROR_HEADER]  # type: ignore[index]
    reply = await rig.request(FLEET_NOTICE, {"instance_id": 7}, json_body=True)
    assert reply.headers[ERROR_CODE_HEADER] == "400"  # type: ignore[index]
    assert json.loads(reply.data)["error"]["code"] == "400"

    reply = await rig.request(FLEET_NOTICE, {"instance_id": "nobody"})
    assert reply.headers[ERROR_CODE_HEADER] == "404"  # type: ignore[index]
    assert "nobody" in reply.headers[ERROR_HEADER]  # type: ignore[index]
    reply = await rig.request(FLEET_ADD, {"count": 0})
    assert reply.headers[ERROR_CODE_HEADER] == "400"  # type: ignore[index]

    done = await rig.cli("fleet", "preempt", "nobody", "--grace", "1")
    assert done.returncode == 1
    assert "unknown instance 'nobody'" in done.stderr
    done = await rig.cli("fleet", "preempt", "nobody", "--json")
    assert done.returncode == 1 and done.stdout == ""


async def test_cli_fleet_status_json(rig: Rig) -> None:
    rig.start_executor("st-a")
    await rig.joined("st-a")
    done = await rig.cli("fleet", "status", "--json")
    assert done.returncode == 0, done.stderr
    status = FleetStatus.model_validate(json.loads(done.stdout))
    item = next(item for item in status.instances if item.record.instance_id == "st-a")
    assert item.state == "running" and item.deadline is None
    assert 0 < item.lease_left_s <= LEASE_S
    table = await rig.cli("fleet", "status")
    assert table.returncode == 0 and "st-a" in table.stdout and "running" in table.stdout
    rig.cluster.find("executor-st-a").terminate()
    await rig.events.wait("st-a", "left")


async def test_cli_without_a_monitor_fails_clearly(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path, log_file=tmp_path / "nats-server.log")
    server.start()
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shared.cli", "fleet", "status", "--nats-url", server.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    assert done.returncode == 2
    assert "no monitor answers" in done.stderr


# -- restarts ------------------------------------------------------------------------------------


async def test_monitor_restart_does_not_duplicate_events(rig: Rig) -> None:
    executors = {name: rig.start_executor(name) for name in ("rs-a", "rs-b", "rs-c", "rs-d")}
    for name in executors:
        await rig.joined(name)
    _, noticed = await rig.notice("rs-b", 600)

    rig.cluster.kill("monitor")  # SIGKILL: no goodbye
    # While no monitor watches: rs-c stops cleanly, rs-d dies without a word.
    executors["rs-c"].terminate()
    await asyncio.to_thread(executors["rs-c"].wait, 60)
    rig.cluster.kill("executor-rs-d")
    rig.cluster.restart("monitor")
    await rig.monitor_ready()

    await rig.events.wait("rs-c", "left")
    await rig.events.wait("rs-d", "lost", timeout_s=LEASE_S * 10)
    status = {item.record.instance_id: item for item in (await rig.status()).instances}
    assert status["rs-a"].state == "running"
    assert status["rs-b"].state == "preempting"
    assert status["rs-b"].deadline == noticed.deadline  # the deadline survived the restart
    assert "rs-c" not in status and "rs-d" not in status
    assert rig.events.kinds("rs-a") == ["joined"]
    assert rig.events.kinds("rs-b") == ["joined", "preempt-notice"]
    assert rig.events.kinds("rs-c") == ["joined", "left"]
    assert rig.events.kinds("rs-d") == ["joined", "lost"]

    # Once more, cleanly this time, with nothing changed meanwhile: nothing is published.
    before = len(rig.events.items)
    monitor = rig.cluster.find("monitor")
    monitor.terminate()
    await asyncio.to_thread(monitor.wait, 60)
    rig.cluster.restart("monitor")
    await rig.monitor_ready()
    outcome, again = await rig.notice("rs-b", 600)
    assert outcome == "duplicate" and again.deadline == noticed.deadline
    # A change after the restart is the barrier: everything before it has arrived.
    await rig.notice("rs-a", 0)
    await rig.events.wait("rs-a", "left")
    after = [(seen.event.instance.instance_id, seen.event.kind) for seen in rig.events.items]
    assert after[before:] == [("rs-a", "preempt-notice"), ("rs-a", "left")]
    await rig.notice("rs-b", 0)
    await rig.events.wait("rs-b", "left")


# -- the cloud agent, end to end -----------------------------------------------------------------


async def test_agent_notice_reaches_the_fleet_stream(rig: Rig) -> None:
    rig.start_executor("agent-a")
    await rig.joined("agent-a")
    fake = FakeMetadataServer().start()
    requests: list[Msg] = []

    async def count(msg: Msg) -> None:
        requests.append(msg)

    # A plain subscriber sees every notice sent to the monitor, without answering.
    spy = await rig.nc.subscribe(FLEET_NOTICE, cb=count)
    log = await asyncio.to_thread(open, rig.cluster.log_dir / "agent.log", "wb")
    with log:
        agent = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "services.monitor", "agent", "--provider", "aws"),
            *("--instance", "agent-a", "--url", fake.url, "--poll-s", "0.2"),
            env=rig.cluster._service_env({}),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        # The agent polls "no notice" first, then the cloud announces the end.
        await eventually(
            lambda: fake.count("GET", "/latest/meta-data/spot/instance-action") >= 2,
            "the agent to poll",
        )
        cloud_deadline = float(int(time.time()) + 4)
        fake.aws = {"action": "terminate", "time": aws_time(cloud_deadline)}
        notice = await rig.events.wait("agent-a", "preempt-notice")
        assert notice.event.source == "aws"
        assert notice.event.deadline is not None
        assert abs(notice.event.deadline - cloud_deadline) < 5.0  # the cloud's, not a default
        left = await rig.events.wait("agent-a", "left", timeout_s=60)
        assert left.event.source == "local"
        # The agent keeps polling the same notice and does not send it again.
        polled = fake.count("GET", "/latest/meta-data/spot/instance-action")
        await eventually(
            lambda: fake.count("GET", "/latest/meta-data/spot/instance-action") >= polled + 5,
            "five more polls",
        )
        assert len(requests) == 1
        assert rig.events.kinds("agent-a") == ["joined", "preempt-notice", "left"]
    finally:
        agent.terminate()
        await asyncio.wait_for(agent.wait(), 30)
        await spy.unsubscribe()
        fake.stop()
    assert agent.returncode == 0


# -- the embedded cluster (session fixture: read-only) -------------------------------------------


async def test_session_cluster_executors_register(cluster: LocalCluster, nc: Client) -> None:
    kv = await nc.jetstream().key_value(INSTANCES_BUCKET)
    for index in range(cluster.instances):
        process = cluster.find(f"executor-{index}").process
        assert process is not None

        async def registered(index: int = index, pid: int = process.pid) -> bool:
            try:
                entry = await kv.get(f"instance-{index}")
            except NotFoundError:
                return False
            return InstanceRecord.model_validate(decode(entry.value or b"")).pid == pid

        await eventually(registered, f"instance-{index} in the registry")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shared.cli", "fleet", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SPOTSERVE_NATS__URL": cluster.nats_url},
    )
    assert done.returncode == 0, done.stderr
    status = FleetStatus.model_validate(json.loads(done.stdout))
    states = {item.record.instance_id: item.state for item in status.instances}
    assert states.get("instance-0") == "running" and states.get("instance-1") == "running"
