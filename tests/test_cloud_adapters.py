"""The cloud metadata adapters and the notice agent, against a local HTTP server that imitates
AWS IMDSv2, GCP's metadata server and Azure Scheduled Events (their documented requests,
headers and answers), and a stand-in monitor on a real nats-server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from structlog.testing import capture_logs

from services.monitor.agent import NoticeAgent
from services.monitor.cloud import (
    AwsImds,
    AzureScheduledEvents,
    GcpMetadata,
    MetadataError,
    MetadataUnreachableError,
    make_adapter,
)
from shared.bus import connect
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.messages import NOTICE_OUTCOME_HEADER, FleetEvent, InstanceRecord, PreemptNotice
from shared.natsserver import EmbeddedNatsServer, free_port
from shared.subjects import FLEET_NOTICE
from tests.helpers import running_nats

AWS_ACTION = "/latest/meta-data/spot/instance-action"
AWS_TOKEN = "/latest/api/token"
GCP_PREEMPTED = "/computeMetadata/v1/instance/preempted"
AZURE_EVENTS = "/metadata/scheduledevents"


class FakeMetadataServer:
    """One HTTP server answering like the three clouds' metadata endpoints.

    ``aws``: None (no notice: 404) or the instance-action object; ``gcp``: the text of
    ``instance/preempted``; ``azure``: the Scheduled Events document. ``raw[path]`` =
    (status, body) overrides any of them (malformed answers)."""

    def __init__(self) -> None:
        self.aws: dict[str, Any] | None = None
        self.gcp = "FALSE"
        self.azure: dict[str, Any] = {"DocumentIncarnation": 0, "Events": []}
        self.raw: dict[str, tuple[int, bytes]] = {}
        self.tokens: set[str] = set()
        self.hits: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                fake._hit("PUT", self.path)
                if self.path != AWS_TOKEN:
                    return self._send(404, b"Not Found")
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._send(400, b"")
                token = f"token-{len(fake.tokens)}"
                fake.tokens.add(token)
                return self._send(
                    200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
                )

            def do_GET(self) -> None:
                fake._hit("GET", self.path)
                path = self.path.split("?")[0]
                if path == AWS_ACTION:
                    if self.headers.get("X-aws-ec2-metadata-token") not in fake.tokens:
                        return self._send(401, b"")
                    if path in fake.raw:
                        return self._send(*fake.raw[path])
                    if fake.aws is None:
                        return self._send(404, b"<?xml version='1.0'?><title>404 - Not Found")
                    return self._send(200, json.dumps(fake.aws).encode())
                if path == GCP_PREEMPTED:
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403, b"Missing Metadata-Flavor:Google header.")
                    if path in fake.raw:
                        return self._send(*fake.raw[path])
                    return self._send(200, fake.gcp.encode(), {"Metadata-Flavor": "Google"})
                if path == AZURE_EVENTS:
                    if self.headers.get("Metadata") != "true":
                        body = b'{"error":"Bad request. Required metadata header not specified"}'
                        return self._send(400, body)
                    if "api-version=2020-07-01" not in self.path:
                        return self._send(400, b'{"error":"Bad request. api-version is invalid"}')
                    if path in fake.raw:
                        return self._send(*fake.raw[path])
                    return self._send(200, json.dumps(fake.azure).encode())
                return self._send(404, b"Not Found")

            def _send(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _hit(self, method: str, path: str) -> None:
        with self._lock:
            self.hits.append((method, path.split("?")[0]))

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self.hits.count((method, path))

    def start(self) -> FakeMetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeMetadataServer]:
    server = FakeMetadataServer().start()
    yield server
    server.stop()


def aws_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def azure_event(event_id: str, not_before: str, event_type: str = "Preempt", **extra: Any) -> dict:
    return {
        "EventId": event_id,
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": ["vm-a"],
        "EventStatus": "Scheduled",
        "NotBefore": not_before,
        "Description": "",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
        **extra,
    }


# -- AWS -----------------------------------------------------------------------------------------


def test_aws_no_notice_is_none(fake: FakeMetadataServer) -> None:
    adapter = AwsImds(fake.url, timeout_s=2)
    assert adapter.poll() is None
    assert adapter.poll() is None
    # IMDSv2: one token, reused.
    assert fake.count("PUT", AWS_TOKEN) == 1
    assert fake.count("GET", AWS_ACTION) == 2


def test_aws_notice_has_the_cloud_deadline(fake: FakeMetadataServer) -> None:
    fake.aws = {"action": "terminate", "time": "2017-09-18T08:22:00Z"}
    notice = AwsImds(fake.url).poll()
    assert notice is not None
    assert notice.action == "terminate"
    assert notice.deadline == datetime(2017, 9, 18, 8, 22, tzinfo=UTC).timestamp()
    assert notice.key == "aws:terminate:2017-09-18T08:22:00Z"
    fake.aws = {"action": "stop", "time": "2017-09-18T08:22:00Z"}
    assert AwsImds(fake.url).poll().action == "stop"  # type: ignore[union-attr]


def test_aws_expired_token_is_renewed(fake: FakeMetadataServer) -> None:
    adapter = AwsImds(fake.url)
    assert adapter.poll() is None
    fake.tokens.clear()  # IMDS forgot it (restart): 401, then a new token
    assert adapter.poll() is None
    assert fake.count("PUT", AWS_TOKEN) == 2


@pytest.mark.parametrize(
    "status, body",
    [
        (200, b"not json"),
        (200, b'{"action": "terminate"}'),
        (200, b'{"action": "terminate", "time": "tomorrow"}'),
        (200, b'{"action": "explode", "time": "2017-09-18T08:22:00Z"}'),
        (200, b'["terminate"]'),
        (500, b"Internal Server Error"),
    ],
)
def test_aws_malformed_answers_raise_metadata_error(
    fake: FakeMetadataServer, status: int, body: bytes
) -> None:
    fake.raw[AWS_ACTION] = (status, body)
    with pytest.raises(MetadataError) as caught:
        AwsImds(fake.url).poll()
    assert not isinstance(caught.value, MetadataUnreachableError)


def test_unreachable_endpoint() -> None:
    with pytest.raises(MetadataUnreachableError):
        AwsImds(f"http://127.0.0.1:{free_port()}", timeout_s=1).poll()


# -- GCP -----------------------------------------------------------------------------------------


def test_gcp_false_then_true_with_a_fixed_30s_deadline(fake: FakeMetadataServer) -> None:
    now = [1000.0]
    adapter = GcpMetadata(fake.url, clock=lambda: now[0])
    assert adapter.poll() is None
    fake.gcp = "TRUE"
    first = adapter.poll()
    now[0] += 5
    second = adapter.poll()
    assert first is not None and second is not None
    assert first.deadline == second.deadline == 1030.0
    assert first.key == second.key


@pytest.mark.parametrize("status, body", [(200, b"MAYBE"), (200, b""), (503, b"busy")])
def test_gcp_malformed_answers_raise_metadata_error(
    fake: FakeMetadataServer, status: int, body: bytes
) -> None:
    fake.raw[GCP_PREEMPTED] = (status, body)
    with pytest.raises(MetadataError):
        GcpMetadata(fake.url).poll()


def test_gcp_without_the_flavor_header_is_refused(fake: FakeMetadataServer) -> None:
    # The imitation refuses requests without Metadata-Flavor as GCP does; ours always send it.
    from services.monitor.cloud import http_call

    assert http_call("GET", fake.url + GCP_PREEMPTED, {}, 2).status == 403
    assert GcpMetadata(fake.url).poll() is None


# -- Azure ---------------------------------------------------------------------------------------


def test_azure_no_events_is_none(fake: FakeMetadataServer) -> None:
    assert AzureScheduledEvents(fake.url).poll() is None


def test_azure_preempt_event_deadline_is_not_before(fake: FakeMetadataServer) -> None:
    when = datetime(2016, 9, 19, 18, 29, 47, tzinfo=UTC)
    fake.azure = {
        "DocumentIncarnation": 2,
        "Events": [
            azure_event(
                "602d9444-d2cd-49c7-8624-8643e7171297",
                "Mon, 19 Sep 2016 18:39:47 GMT",
                event_type="Freeze",
            ),
            azure_event("5DD55B64-45AD-49D3-BBC9-F57D4EA97BD7", format_datetime(when, usegmt=True)),
        ],
    }
    notice = AzureScheduledEvents(fake.url, vm_name="vm-a").poll()
    assert notice is not None
    assert notice.deadline == when.timestamp()
    assert notice.key == "azure:5DD55B64-45AD-49D3-BBC9-F57D4EA97BD7"
    # An event for another VM is not ours.
    assert AzureScheduledEvents(fake.url, vm_name="vm-b").poll() is None


def test_azure_started_event_without_not_before_is_now(fake: FakeMetadataServer) -> None:
    fake.azure = {
        "DocumentIncarnation": 3,
        "Events": [azure_event("e1", "", EventStatus="Started")],
    }
    notice = AzureScheduledEvents(fake.url, clock=lambda: 42.0).poll()
    assert notice is not None and notice.deadline == 42.0


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        b'{"DocumentIncarnation": 1}',
        b'{"Events": "none"}',
        b'{"Events": [{"EventType": "Preempt", "Resources": ["vm-a"], "NotBefore": "soon",'
        b' "EventId": "x"}]}',
        b'{"Events": [{"EventType": "Preempt"}]}',
        b'{"Events": [42]}',
    ],
)
def test_azure_malformed_answers_raise_metadata_error(
    fake: FakeMetadataServer, body: bytes
) -> None:
    fake.raw[AZURE_EVENTS] = (200, body)
    with pytest.raises(MetadataError):
        AzureScheduledEvents(fake.url).poll()


def test_make_adapter_refuses_unknown_provider() -> None:
    with pytest.raises(ValueError, match="unknown cloud provider"):
        make_adapter("oracle")


# -- the agent, against a stand-in monitor on a real nats-server ---------------------------------


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    # Its own server: the session cluster's monitor must not answer these notices.
    with running_nats(tmp_path_factory, "agent-nats") as server:
        yield server


class StandInMonitor:
    """Answers notices like the monitor: 404 for unknown instances, else an event."""

    def __init__(self, nc: Client, known: set[str]) -> None:
        self.nc = nc
        self.known = known
        self.notices: list[PreemptNotice] = []

    async def handle(self, msg: Msg) -> None:
        notice = PreemptNotice.model_validate(decode(msg.data))
        self.notices.append(notice)
        if notice.instance_id not in self.known:
            headers = {ERROR_CODE_HEADER: "404", ERROR_HEADER: "unknown"}
            await self.nc.publish(msg.reply, b"", headers=headers)
            return
        record = InstanceRecord(
            instance_id=notice.instance_id,
            node="n",
            devices=1,
            device_kind="cpu",
            device_memory_bytes=0,
            started_at=0.0,
            heartbeat_at=0.0,
        )
        event = FleetEvent(
            kind="preempt-notice",
            instance=record,
            at=time.time(),
            deadline=time.time() + (notice.grace_s or 30.0),
            source=notice.source,
        )
        await self.nc.publish(msg.reply, encode(event), headers={NOTICE_OUTCOME_HEADER: "new"})


@pytest.fixture
async def agent_nc(own_nats: EmbeddedNatsServer) -> AsyncIterator[Client]:
    client = await connect(own_nats.url, NatsSettings(), name="agent-test", deadline_s=10)
    yield client
    await client.close()


async def test_agent_sends_each_notice_once(fake: FakeMetadataServer, agent_nc: Client) -> None:
    monitor = StandInMonitor(agent_nc, {"vm-a"})
    subscription = await agent_nc.subscribe(FLEET_NOTICE, cb=monitor.handle)
    try:
        agent = NoticeAgent(agent_nc, AwsImds(fake.url), "vm-a", 5.0, structlog.get_logger())
        assert await agent.poll_once() is None
        deadline = time.time() + 20
        fake.aws = {"action": "terminate", "time": aws_time(deadline)}
        for _ in range(3):
            assert await agent.poll_once() is not None
        assert len(monitor.notices) == 1
        sent = monitor.notices[0]
        assert sent.instance_id == "vm-a" and sent.source == "aws"
        # The grace is the time left until the cloud's deadline (whole seconds on AWS).
        assert sent.grace_s is not None and 0 < sent.grace_s <= 20
        # A new notice (another time) is a new notice: forwarded once more.
        fake.aws = {"action": "terminate", "time": aws_time(deadline - 10)}
        await agent.poll_once()
        await agent.poll_once()
        assert len(monitor.notices) == 2
    finally:
        await subscription.unsubscribe()


async def test_agent_retries_until_the_monitor_takes_it(
    fake: FakeMetadataServer, agent_nc: Client
) -> None:
    monitor = StandInMonitor(agent_nc, set())  # the instance has not registered yet: 404
    subscription = await agent_nc.subscribe(FLEET_NOTICE, cb=monitor.handle)
    try:
        agent = NoticeAgent(agent_nc, GcpMetadata(fake.url), "vm-g", 5.0, structlog.get_logger())
        fake.gcp = "TRUE"
        await agent.poll_once()
        await agent.poll_once()
        assert len(monitor.notices) == 2 and not agent.sent
        monitor.known.add("vm-g")
        await agent.poll_once()
        await agent.poll_once()
        assert len(monitor.notices) == 3 and len(agent.sent) == 1
        assert monitor.notices[-1].source == "gcp"
        assert 0 < (monitor.notices[-1].grace_s or 0) <= 30
    finally:
        await subscription.unsubscribe()


async def test_agent_survives_malformed_and_unreachable_endpoints(
    fake: FakeMetadataServer, agent_nc: Client
) -> None:
    monitor = StandInMonitor(agent_nc, {"vm-z"})
    subscription = await agent_nc.subscribe(FLEET_NOTICE, cb=monitor.handle)
    try:
        with capture_logs() as logs:
            log = structlog.get_logger()
            agent = NoticeAgent(agent_nc, AzureScheduledEvents(fake.url), "vm-z", 5.0, log)
            fake.raw[AZURE_EVENTS] = (200, b"{not json")
            assert await agent.poll_once() is None
            assert await agent.poll_once() is None  # said once, not at every poll
            down = NoticeAgent(
                agent_nc,
                AwsImds(f"http://127.0.0.1:{free_port()}", timeout_s=1),
                "vm-z",
                5.0,
                log,
            )
            assert await down.poll_once() is None
            # Then a good answer: the agent carries on.
            del fake.raw[AZURE_EVENTS]
            fake.azure = {
                "DocumentIncarnation": 1,
                "Events": [azure_event("e7", format_datetime(datetime.now(UTC), usegmt=True))],
            }
            assert await agent.poll_once() is not None
        malformed = [entry for entry in logs if entry["event"] == "agent.malformed_response"]
        # Said once as a warning, then (the same problem at every poll) at debug.
        assert [entry["log_level"] for entry in malformed] == ["warning", "debug"]
        assert "Scheduled Events" in malformed[0]["error"]
        assert any(entry["event"] == "agent.metadata_unreachable" for entry in logs)
        assert len(monitor.notices) == 1 and monitor.notices[0].source == "azure"
    finally:
        await subscription.unsubscribe()


async def test_agent_without_monitor_does_not_crash(
    fake: FakeMetadataServer, agent_nc: Client
) -> None:
    fake.aws = {"action": "terminate", "time": aws_time(time.time() + 30)}
    with capture_logs() as logs:
        agent = NoticeAgent(agent_nc, AwsImds(fake.url), "vm-x", 1.0, structlog.get_logger())
        assert await agent.poll_once() is not None
    assert not agent.sent
    assert any(entry["event"] == "agent.notice_not_delivered" for entry in logs)


def test_agent_command_needs_a_provider(tmp_path: Path, own_nats: EmbeddedNatsServer) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, SPOTSERVE_NATS__URL=own_nats.url)
    env.pop("SPOTSERVE_MONITOR__AGENT_PROVIDER", None)
    done = subprocess.run(
        [sys.executable, "-m", "services.monitor", "agent", "--instance", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "--provider" in done.stderr
