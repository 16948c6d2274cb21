"""NATS accounts and permissions (shared/security.py) against a real nats-server: each service's
user publishes and subscribes only where it works, a client only calls the public API and reads
its own inbox, a wrong password is a clear error at once; and a whole cluster whose every
service authenticates as its own user serves a client's request."""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError

from shared.bus import NatsAuthError, NatsUnavailableError, connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.natsserver import EmbeddedNatsServer, find_nats_server, free_port
from shared.security import ALL_USERS, Credentials, inbox_prefix, init_credentials
from shared.subjects import (
    ADMIN_MODE,
    FLEET_ADD,
    FLEET_NOTICE,
    FLEET_STATUS,
    GENERATE,
    PLANS_SUBJECT,
    executor_step_subject,
    fleet_event_subject,
    tokens_subject,
)
from tests.helpers import eventually

USERS = (*ALL_USERS, "client-b")


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return init_credentials(tmp_path_factory.mktemp("secrets") / "credentials", USERS)


@pytest.fixture(scope="module")
def secured_server(
    credentials: Credentials, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedNatsServer]:
    store = tmp_path_factory.mktemp("secured-nats")
    with EmbeddedNatsServer(store, auth_file=credentials.auth_file) as server:
        yield server


class Peer:
    """A raw connection as one user, collecting the server's asynchronous errors."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.errors: list[str] = []
        self.nc: Client | None = None

    async def start(self, url: str, credentials: Credentials) -> Peer:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            url,
            user=self.user,
            password=credentials.password(self.user),
            inbox_prefix=inbox_prefix(self.user),
            error_cb=on_error,
            allow_reconnect=False,
        )
        return self

    async def refused(self, what: str) -> bool:
        """Whether the server refused something matching ``what`` (publish/subscription)."""
        assert self.nc is not None
        await self.nc.flush(timeout=5)
        for _ in range(50):
            if any("permissions violation" in e.lower() and what in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


@pytest.fixture
async def peers(
    secured_server: EmbeddedNatsServer, credentials: Credentials
) -> AsyncIterator[dict[str, Peer]]:
    made = {user: await Peer(user).start(secured_server.url, credentials) for user in USERS}
    yield made
    for peer in made.values():
        assert peer.nc is not None
        await peer.nc.close()


def test_passwords_are_random_private_and_kept(credentials: Credentials) -> None:
    assert len(set(credentials.passwords.values())) == len(USERS)
    for user in USERS:
        mode = stat.S_IMODE(credentials.password_file(user).stat().st_mode)
        assert mode == 0o600, (user, oct(mode))
    assert stat.S_IMODE(credentials.auth_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(credentials.directory.stat().st_mode) == 0o700
    again = init_credentials(credentials.directory, USERS)  # a restart keeps them
    assert again.passwords == credentials.passwords


@pytest.mark.parametrize(
    ("user", "subject"),
    [
        ("client", executor_step_subject("instance-0")),
        ("client", PLANS_SUBJECT),
        ("client", fleet_event_subject("joined")),
        ("client", FLEET_NOTICE),
        ("client", ADMIN_MODE),
        ("client", tokens_subject("someone")),
        ("executor", PLANS_SUBJECT),
        ("scheduler", fleet_event_subject("lost")),
        ("admission", executor_step_subject("instance-0")),
        ("planner", fleet_event_subject("joined")),
        # The HTTP gateway is a client of the public API: no fleet commands, no JetStream.
        ("gateway", FLEET_NOTICE),
        ("gateway", ADMIN_MODE),
        ("gateway", "$JS.API.STREAM.DELETE.SPOTSERVE_REQUESTS"),
        ("gateway", tokens_subject("someone")),
    ],
)
async def test_forbidden_publishes_are_refused_and_never_delivered(
    peers: dict[str, Peer], user: str, subject: str
) -> None:
    # Executor commands: a listener where an executor listens must not get the forged one.
    listener = peers["executor"].nc if ".executor." in subject else None
    subscription = await listener.subscribe(subject) if listener is not None else None
    if listener is not None:
        await listener.flush()
    sender = peers[user]
    assert sender.nc is not None
    await sender.nc.publish(subject, b"forged")
    assert await sender.refused(f'publish to "{subject.lower()}"'), sender.errors
    if subscription is not None:
        with pytest.raises(TimeoutError):
            await subscription.next_msg(timeout=0.3)


async def test_only_the_planner_publishes_plans_and_only_the_monitor_fleet_events(
    peers: dict[str, Peer],
) -> None:
    for user, subject in [("planner", PLANS_SUBJECT), ("monitor", fleet_event_subject("joined"))]:
        peer = peers[user]
        assert peer.nc is not None
        await peer.nc.publish(subject, b"{}")
        await peer.nc.flush()
        assert not any("violation" in e.lower() for e in peer.errors), peer.errors


@pytest.mark.parametrize(
    "subject",
    [
        f"{inbox_prefix('client-b')}.>",  # another client's token streams
        "_INBOX.>",
        tokens_subject("*"),  # the committed tokens
        "$JS.API.>",
        GENERATE,  # listening in on everyone's requests
    ],
)
async def test_a_client_reads_only_its_own_inbox(peers: dict[str, Peer], subject: str) -> None:
    client = peers["client"]
    assert client.nc is not None
    await client.nc.subscribe(subject)
    assert await client.refused(f'subscription to "{subject.lower()}"'), client.errors


async def test_a_client_may_call_the_api_and_get_replies_in_its_inbox(
    peers: dict[str, Peer],
) -> None:
    # Admission's part: serve generate (as the admission user would), answer in the inbox.
    admission = peers["admission"].nc
    client = peers["client"].nc
    assert admission is not None and client is not None

    async def answer(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"served")

    await admission.subscribe(GENERATE, cb=answer)
    await admission.flush()

    async def served() -> nats.aio.msg.Msg | None:
        try:
            return await client.request(GENERATE, b"{}", timeout=5)
        except NoRespondersError:
            return None  # once in a while the first request beat the new interest (seen once)

    reply = await eventually(served, "the admission user's generate subscription", timeout_s=30)
    assert reply.data == b"served"
    assert reply.subject.startswith(inbox_prefix("client") + ".")
    assert peers["client"].errors == []


async def test_a_wrong_password_is_refused_with_a_clear_error(
    secured_server: EmbeddedNatsServer,
) -> None:
    settings = NatsSettings(user="client", password="not-the-password")
    with pytest.raises(NatsAuthError, match="refused user 'client'"):
        await connect(secured_server.url, settings, name="test", deadline_s=30)
    with pytest.raises(NatsAuthError, match="refused user None"):
        await connect(secured_server.url, NatsSettings(), name="test", deadline_s=30)


@pytest.fixture(scope="module")
def secured_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("secured-cluster")
    credentials = init_credentials(state / "credentials")
    with LocalCluster(state, instances=1, model_dir=tiny_model_dir, credentials=credentials) as c:
        yield c


async def test_a_cluster_of_authenticated_services_serves_a_client(
    secured_cluster: LocalCluster,
) -> None:
    settings = secured_cluster.nats_settings("client")
    nc = await connect(secured_cluster.nats_url, settings, name="test-client", deadline_s=10)
    try:
        completion = await SpotserveClient(nc).generate(
            "Secure hello", max_tokens=6, ignore_eos=True
        )
    finally:
        await nc.close()
    assert len(completion.token_ids) == 6
    # No service was refused anything on the way.
    log = (secured_cluster.log_dir / "nats-server.log").read_text()
    assert "Permissions Violation" not in log


async def test_an_added_instance_joins_as_the_executor_user(secured_cluster: LocalCluster) -> None:
    """The monitor starts it with the executor's credentials, not its own."""
    nc = await connect(secured_cluster.nats_url, secured_cluster.nats_settings(), name="test")
    try:
        reply = await nc.request(FLEET_ADD, encode({"count": 1}), timeout=60)
        (added,) = decode(reply.data)["instance_ids"]

        async def joined() -> bool:
            status = decode((await nc.request(FLEET_STATUS, b"{}", timeout=10)).data)
            return added in {i["record"]["instance_id"] for i in status["instances"]}

        await eventually(joined, "the added instance to register", timeout_s=120)
    finally:
        await nc.close()
    log = (secured_cluster.log_dir / "nats-server.log").read_text()
    assert "Permissions Violation" not in log and "Authorization Violation" not in log


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), standing in for a real CA's."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A server made by `security init --tls-cert/--tls-key`: (url, CA, client password file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = make_certificate(tmp_path)
    port = free_port()
    config = tmp_path / "nats-server.conf"
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "security", "init", str(tmp_path / "credentials"),
         "--nats-config", str(config), "--listen", f"127.0.0.1:{port}",
         "--store-dir", str(tmp_path / "js"), "--tls-cert", str(cert), "--tls-key", str(key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    server = subprocess.Popen([str(find_nats_server()), "-c", str(config)])
    try:
        yield f"tls://127.0.0.1:{port}", cert, tmp_path / "credentials" / "client.password"
    finally:
        server.terminate()
        server.wait(10)


async def test_tls_by_config(tls_server: tuple[str, Path, Path]) -> None:
    """A client with the CA connects; one without it gets a clear error, not a hang."""
    url, ca, password_file = tls_server
    settings = NatsSettings(user="client", password_file=password_file, tls_ca_file=ca)
    nc = await connect(url, settings, name="tls-client", deadline_s=30)
    assert nc.is_connected
    await nc.close()
    untrusted = NatsSettings(user="client", password_file=password_file)
    with pytest.raises(NatsUnavailableError, match="certificate verify failed"):
        await connect(url, untrusted, name="tls-untrusted", deadline_s=30)
