"""A local cluster: an embedded nats-server (unless one is given) and every service as its own
process. Used by ``spotserve up``, the demo, the benchmarks and the end-to-end tests."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shared.bus import connect
from shared.config import ModelSettings, NatsSettings, SchedulerSettings
from shared.discovery import discover
from shared.metrics import HTTP_URL_KEY, METRICS_URL_KEY
from shared.natsserver import EmbeddedNatsServer
from shared.security import OPERATOR_USER, Credentials
from shared.subjects import (
    SERVICE_ADMISSION,
    SERVICE_EXECUTOR,
    SERVICE_GATEWAY,
    SERVICE_LOADER,
    SERVICE_MONITOR,
    SERVICE_PLANNER,
    SERVICE_SCHEDULER,
)

log = structlog.get_logger()

# Module of each service, in start order (executors last: they take longest to be ready).
SERVICE_MODULES = {
    SERVICE_PLANNER: "services.planner",
    SERVICE_MONITOR: "services.monitor",
    SERVICE_LOADER: "services.loader",
    SERVICE_ADMISSION: "services.admission",
    SERVICE_SCHEDULER: "services.scheduler",
    SERVICE_GATEWAY: "services.gateway",
}
# Stop order: stop taking requests first, then the scheduler (it hands back what it holds).
STOP_ORDER = (SERVICE_GATEWAY, SERVICE_ADMISSION, SERVICE_SCHEDULER, SERVICE_EXECUTOR)
PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    pass


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a service's log, for an error that must say why it stopped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def die_with_parent() -> None:
    """In the child: get SIGTERM when the supervisor dies, so no service outlives it (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class ClusterUrls:
    """The HTTP gateway's URLs and each service's metrics URLs (service name -> sorted)."""

    gateway: list[str]
    metrics: dict[str, list[str]]

    @classmethod
    def of(cls, infos: list[dict[str, Any]]) -> ClusterUrls:
        gateway: list[str] = []
        metrics: dict[str, list[str]] = {}
        for info in infos:
            metadata = info.get("metadata") or {}
            name = str(info.get("name", "?")).removeprefix("spotserve-")
            if HTTP_URL_KEY in metadata:
                gateway.append(metadata[HTTP_URL_KEY])
            if METRICS_URL_KEY in metadata:
                metrics.setdefault(name, []).append(metadata[METRICS_URL_KEY])
        return cls(sorted(gateway), {name: sorted(urls) for name, urls in sorted(metrics.items())})


@dataclass
class ServiceProcess:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C reaches the supervisor only, which stops us in order.
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.terminate()

    def wait(self, timeout_s: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("cluster.kill", service=self.name, pid=self.process.pid)
            self.process.kill()
            self.process.wait()


class LocalCluster:
    def __init__(
        self,
        state_dir: Path,
        instances: int = 1,
        model_dir: Path | None = None,
        nats_url: str | None = None,
        env: dict[str, str] | None = None,
        credentials: Credentials | None = None,
        metrics_port: int = 0,
        gateway_port: int = 0,
    ) -> None:
        if instances < 1:
            raise ValueError("a cluster needs at least one executor instance")
        self.state_dir = state_dir
        self.instances = instances
        self.model_dir = model_dir
        self.external_nats_url = nats_url
        self.extra_env = env or {}
        # With credentials: the embedded server authenticates, every service as its own user.
        self.credentials = credentials
        # Ports of this machine: metrics from metrics_port up, one per service in start order
        # (0: every service takes any free port); the HTTP gateway on gateway_port. The URLs
        # are advertised in $SRV INFO metadata (see urls()).
        self.metrics_port = metrics_port
        self.gateway_port = gateway_port
        self.nats: EmbeddedNatsServer | None = None
        self.services: list[ServiceProcess] = []

    @property
    def nats_url(self) -> str:
        if self.external_nats_url:
            return self.external_nats_url
        assert self.nats is not None, "cluster not started"
        return self.nats.url

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def start(self, ready_timeout_s: float = 180.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.external_nats_url:
            self.nats = EmbeddedNatsServer(
                self.state_dir / "jetstream",
                log_file=self.log_dir / "nats-server.log",
                auth_file=self.credentials.auth_file if self.credentials else None,
            )
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.nats.start()
        self._ensure_profile()
        for name, module in SERVICE_MODULES.items():
            extra = {"SPOTSERVE_GATEWAY__PORT": str(self.gateway_port)}
            self._spawn(name, module, extra if name == SERVICE_GATEWAY else {})
        for index in range(self.instances):
            self._spawn(
                SERVICE_EXECUTOR,
                "services.executor",
                {"SPOTSERVE_EXECUTOR__INSTANCE_ID": f"instance-{index}"},
                log_name=f"executor-{index}",
            )
        try:
            asyncio.run(self._wait_ready(ready_timeout_s))
        except BaseException:
            self.stop()
            raise

    def _ensure_profile(self) -> None:
        """Skip-join MLFQ needs a timing profile of the model, and the adaptive policy counts
        prefills with one: measure one if there is none."""
        env = self._service_env({})
        policy = env.get("SPOTSERVE_SCHEDULER__POLICY", SchedulerSettings().policy)
        if policy not in ("skip-join-mlfq", "adaptive"):
            return
        if env.get("SPOTSERVE_SCHEDULER__PROFILE_PATH"):
            return
        from shared.model.profile import (
            default_profile_path,
            find_profile,
            measure_profile,
            save_profile,
        )
        from shared.modelsource import resolve_model_dir

        model_dir = resolve_model_dir(ModelSettings(path=self.model_dir))
        if find_profile(model_dir) is None:
            log.info("cluster.profiling", model=str(model_dir))
            measured = measure_profile(model_dir, device=env.get("SPOTSERVE_EXECUTOR__DEVICE"))
            save_profile(measured, default_profile_path(model_dir, measured.device))

    def nats_settings(self, user: str = OPERATOR_USER) -> NatsSettings:
        """How a client of this cluster connects (as ``user`` when it authenticates)."""
        if self.credentials is None:
            return NatsSettings(url=self.nats_url)
        return NatsSettings(
            url=self.nats_url, user=user, password_file=self.credentials.password_file(user)
        )

    def _service_env(self, extra: dict[str, str], user: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["SPOTSERVE_NATS__URL"] = self.nats_url
        if self.credentials is not None and user is not None:
            env.pop("SPOTSERVE_NATS__PASSWORD", None)
            env["SPOTSERVE_NATS__USER"] = user
            env["SPOTSERVE_NATS__PASSWORD_FILE"] = str(self.credentials.password_file(user))
            if user == "monitor":  # for the executors it starts
                env["SPOTSERVE_MONITOR__EXECUTOR_NATS_USER"] = "executor"
                password_file = self.credentials.password_file("executor")
                env["SPOTSERVE_MONITOR__EXECUTOR_NATS_PASSWORD_FILE"] = str(password_file)
        if self.model_dir is not None:
            env["SPOTSERVE_MODEL__PATH"] = str(self.model_dir)
        if "SPOTSERVE_EXECUTOR__TORCH_THREADS" not in env:
            # Executors share the machine's cores instead of each claiming all of them.
            threads = max(1, (os.cpu_count() or 1) // self.instances)
            env["SPOTSERVE_EXECUTOR__TORCH_THREADS"] = str(threads)
        env.setdefault("SPOTSERVE_LOG__JSON_OUTPUT", "true")
        # Executors the monitor starts (`spotserve fleet add`) log beside the others.
        env.setdefault("SPOTSERVE_MONITOR__LOG_DIR", str(self.log_dir))
        env.update(self.extra_env)
        env.update(extra)
        return env

    def _spawn(self, name: str, module: str, extra: dict[str, str], log_name: str = "") -> None:
        extra = dict(extra)
        port = self.metrics_port + len(self.services) if self.metrics_port else 0
        extra.setdefault("SPOTSERVE_METRICS__PORT", str(port))
        service = ServiceProcess(
            name=name,
            command=[sys.executable, "-m", module],
            env=self._service_env(extra, user=name.removeprefix("spotserve-")),
            log_path=self.log_dir / f"{log_name or name.removeprefix('spotserve-')}.log",
        )
        service.start()
        self.services.append(service)

    def expected_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SERVICE_MODULES, 1)
        counts[SERVICE_EXECUTOR] = self.instances
        return counts

    async def _wait_ready(self, timeout_s: float) -> None:
        """Until every service answers a $SRV ping (executors once their model is loaded)."""
        nc = await connect(self.nats_url, self.nats_settings(), name="spotserve-supervisor")
        deadline = time.monotonic() + timeout_s
        try:
            missing: dict[str, int] = {}
            while time.monotonic() < deadline:
                self._check_alive()
                missing = {}
                for name, expected in self.expected_counts().items():
                    found = len(await discover(nc, name, verb="PING", window_s=0.2))
                    if found < expected:
                        missing[name] = expected - found
                if not missing:
                    return
                await asyncio.sleep(0.3)
            raise ClusterError(
                f"services not ready after {timeout_s:.0f} s: {missing}; logs in {self.log_dir}"
            )
        finally:
            await nc.close()

    async def urls(self, timeout_s: float = 1.0) -> ClusterUrls:
        """Every running service's advertised URLs ($SRV INFO metadata), executors added
        later included."""
        nc = await connect(self.nats_url, self.nats_settings(), name="spotserve-supervisor")
        try:
            return ClusterUrls.of(await discover(nc, None, verb="INFO", window_s=timeout_s))
        finally:
            await nc.close()

    def _check_alive(self) -> None:
        for service in self.services:
            if not service.alive:
                code = service.process.returncode if service.process else None
                raise ClusterError(
                    f"{service.name} exited with code {code} during start; see "
                    f"{service.log_path}, which ends:\n{log_tail(service.log_path)}"
                )

    def find(self, log_name: str) -> ServiceProcess:
        """A service by its log name: ``scheduler``, ``admission``, ``executor-0`` …"""
        for service in self.services:
            if service.log_path.stem == log_name:
                return service
        raise KeyError(f"no service {log_name!r} in this cluster")

    def kill(self, log_name: str) -> None:
        """SIGKILL one service (fault injection): no chance to clean up."""
        service = self.find(log_name)
        if service.alive:
            assert service.process is not None
            service.process.kill()
            service.process.wait()

    def restart(self, log_name: str) -> None:
        """Start a stopped or killed service again with the same command and environment."""
        service = self.find(log_name)
        if service.alive:
            raise ClusterError(f"{log_name} is still running")
        service.start()

    def supervise(self) -> list[ServiceProcess]:
        """Start again every service that died (not executors: a dead instance is the
        monitor's business, as on spot capacity); returns the restarted ones. Their state is
        in JetStream, so they carry on from there."""
        restarted = self.dead_services()
        for service in restarted:
            code = service.process.returncode if service.process else None
            log.warning("cluster.restart", service=service.name, exit_code=code)
            service.start()
        return restarted

    def restart_nats(self, kill: bool = True) -> None:
        """Stop (SIGKILL by default) and start the embedded server again on the same port and
        store directory (fault injection; clients and services reconnect)."""
        if self.nats is None:
            raise ClusterError("this cluster's NATS server is not embedded")
        process = self.nats.process
        if kill and process is not None and process.poll() is None:
            process.kill()
            process.wait()
        else:
            self.nats.stop()
        self.nats.start()

    def dead_services(self) -> list[ServiceProcess]:
        """Services that exited. Executors are left out: on spot capacity they come and go
        (a preemption kills one), and the monitor reports that as a fleet event."""
        return [
            service
            for service in self.services
            if not service.alive and service.name != SERVICE_EXECUTOR
        ]

    def stop(self, timeout_s: float = 20.0) -> None:
        for name in STOP_ORDER:
            group = [service for service in self.services if service.name == name]
            for service in group:
                service.terminate()
            for service in group:
                service.wait(timeout_s)
        for service in self.services:
            service.terminate()
        for service in self.services:
            service.wait(timeout_s)
        if self.nats is not None:
            self.nats.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
