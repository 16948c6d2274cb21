"""compose.yaml, checked without a Docker engine.

1. ``docker-compose -f compose.yaml config -q`` (Debian's docker-compose validates offline;
   ``.ci/ensure-docker-compose`` installs it): skipped when missing, failed under ``CI=true``.
2. The file itself: restart policies, health checks, users and password files, the GPU profile,
   nothing secret in it or in the image.
3. For real: every service of the default profile is started as a local process with the
   command and environment compose gives it (the Dockerfile's ``ENV`` first, then the service's
   ``environment``), in ``depends_on`` order:

   - each named volume becomes a temp directory, and every path under a volume's mount point
     (``/secrets/...``, ``/data/...``, ``/var/lib/spotserve/...``) in a command or an
     environment value is rewritten into it (so the embedded model is created by the services
     themselves, racing on the shared "volume", as in compose);
   - ``spotserve`` is the venv's console script, ``python`` this interpreter, and the ``nats``
     image's arguments go to the venv's ``nats-server`` (its entrypoint prepends
     ``nats-server`` to flags);
   - the host ``nats`` with its container ports (4222 clients, 8222 monitoring) becomes
     127.0.0.1 with free ports: the config ``init`` generated is copied with its ``listen`` and
     ``http`` addresses rewritten (store dir, users and passwords untouched).

   Then every service must answer a ``$SRV`` ping (as the ``operator`` user), every health
   check command must pass (run locally with its service's environment), a ``client`` user's
   request must complete (and one through the ``cli`` service's entrypoint), and the server
   must have logged no permissions violation.

What this cannot check: the image build itself, the ``nats`` image's entrypoint and wget, volume
ownership and modes inside containers, container host names (all processes share this host),
``shm_size``, ``--scale`` and the GPU reservation (only their shape is checked).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import die_with_parent
from shared.config import NatsSettings
from shared.discovery import discover
from shared.natsserver import find_nats_server, free_port
from shared.security import SERVICE_USERS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
NATS_CLIENT_PORT, NATS_HTTP_PORT = 4222, 8222
READY_TIMEOUT_S = 240.0

pytestmark = pytest.mark.timeout(600)


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``KEY=VALUE`` list form)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def image_environment() -> dict[str, str]:
    """The ``ENV`` of the Dockerfile's last stage, less the container's own PATH and venv."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.upper().startswith("FROM "):
            env = {}
        elif line.upper().startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return {k: v for k, v in env.items() if k not in ("PATH", "VIRTUAL_ENV")}


def default_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a plain ``docker compose up`` starts (services without profiles)."""
    return {name: spec for name, spec in compose["services"].items() if not spec.get("profiles")}


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name in order:
            return
        for dependency in services[name].get("depends_on") or {}:
            visit(dependency, (*path, name))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(volume, mount point, read-only) of a service's ``name:/path[:ro]`` volumes."""
    mounts = []
    for entry in service.get("volumes") or []:
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        source, target, *mode = entry.split(":")
        mounts.append((source, target, mode == ["ro"]))
    return mounts


@dataclass
class LocalCompose:
    """compose.yaml's services as local processes (see the module docstring)."""

    compose: dict[str, Any]
    root: Path
    nats_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    volumes: dict[str, Path] = field(default_factory=dict)
    mount_points: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.compose.get("volumes") or {}:
            self.volumes[name] = self.root / "volumes" / name
            self.volumes[name].mkdir(parents=True)
        for service_name, service in self.compose["services"].items():
            for volume, target, _ in volume_mounts(service):
                assert volume in self.volumes, f"{service_name}: {volume} is not a named volume"
                known = self.mount_points.setdefault(target, self.volumes[volume])
                assert known == self.volumes[volume], f"{target} holds two volumes"
        (self.root / "logs").mkdir()

    # -- translation ------------------------------------------------------------------------

    def localize(self, value: str) -> str:
        """Volume paths into their temp directories, ``nats:<port>`` onto this host."""
        for target in sorted(self.mount_points, key=len, reverse=True):
            if value == target or value.startswith(f"{target}/"):
                value = str(self.mount_points[target]) + value[len(target) :]
                break
        ports = {NATS_CLIENT_PORT: self.nats_port, NATS_HTTP_PORT: self.http_port}
        return re.sub(
            r"(?<=://)(nats|localhost|127\.0\.0\.1):(\d+)",
            lambda match: f"127.0.0.1:{ports.get(int(match[2]), match[2])}",
            value,
        )

    def argv(self, name: str, args: list[str] | None = None) -> list[str]:
        service = self.compose["services"][name]
        command = [*(service.get("entrypoint") or []), *(args or service.get("command") or [])]
        if service["image"].startswith("nats:") and (not command or command[0].startswith("-")):
            command = ["nats-server", *command]  # the nats image's entrypoint
        executables = {
            "spotserve": str(BIN / "spotserve"),
            "python": sys.executable,
            "python3": sys.executable,
            "nats-server": str(find_nats_server()),
        }
        assert command[0] in executables, f"{name}: cannot run {command[0]!r} locally"
        return [executables[command[0]], *(self.localize(str(arg)) for arg in command[1:])]

    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        home = self.root / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home)}
        env.update({"LANG": "C.UTF-8", "TMPDIR": os.environ.get("TMPDIR", "/tmp")})
        spec = self.compose["services"][name]
        if not spec["image"].startswith("nats:"):
            env.update({key: self.localize(value) for key, value in image_environment().items()})
        env.update({k: self.localize(v) for k, v in environment_of(spec).items()})
        # Every container has its own ports; here the processes share this host's.
        if "SPOTSERVE_GATEWAY__PORT" in env:
            env["SPOTSERVE_GATEWAY__PORT"] = str(self.gateway_port)
        env["SPOTSERVE_METRICS__PORT"] = "0"
        for key in ("SPOTSERVE_GATEWAY__HOST", "SPOTSERVE_METRICS__HOST"):
            if env.get(key) == "0.0.0.0":
                env[key] = "127.0.0.1"
        env.update(extra or {})
        return env

    def healthcheck_argv(self, name: str) -> list[str]:
        test = self.compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: write the health check as an exec form ['CMD', ...]"
        if test[1] == "spotserve":
            return [str(BIN / "spotserve"), *(self.localize(arg) for arg in test[2:])]
        return [self.localize(arg) for arg in test[1:]]

    def run_healthcheck(
        self, name: str, extra_env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()
    ) -> tuple[int, str]:
        """(exit status, output) of a service's health check command, run here."""
        argv = [*self.healthcheck_argv(name), *extra_args]
        if argv[0] == "wget" and not shutil.which("wget"):  # the nats image has busybox wget
            url = next(arg for arg in argv if arg.startswith("http"))
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return (0 if response.status == 200 else 1), str(response.status)
            except OSError as exc:
                return 1, repr(exc)
        result = subprocess.run(
            argv,
            env=self.env(name, extra_env),
            cwd=self.root / "home" / name,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return result.returncode, result.stdout + result.stderr

    # -- processes --------------------------------------------------------------------------

    def run_once(self, name: str, args: list[str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(name, args),
            env=self.env(name),
            cwd=self.root / "home" / name,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def start(self, name: str) -> None:
        argv = self.argv(name)
        if argv[0] == str(find_nats_server()):
            argv = self.local_nats_argv(argv)
        with open(self.log_path(name), "ab") as log:
            self.processes[name] = subprocess.Popen(
                argv,
                env=self.env(name),
                cwd=self.root / "home" / name,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def local_nats_argv(self, argv: list[str]) -> list[str]:
        """The generated server config, listening on this host's free ports instead."""
        flag = next(i for i, arg in enumerate(argv) if arg in ("-c", "--config"))
        generated = Path(argv[flag + 1])
        assert generated.is_file(), f"nats: {generated} was not written by init"
        text = generated.read_text(encoding="utf-8")
        text, listens = re.subn(r"(?m)^listen:.*$", f"listen: 127.0.0.1:{self.nats_port}", text)
        text, https = re.subn(r"(?m)^http:.*$", f"http: 127.0.0.1:{self.http_port}", text)
        assert listens == 1 and https == 1, "the generated config needs listen and http lines"
        local = self.root / "nats-server.local.conf"
        descriptor = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        return [*argv[:flag], argv[flag], str(local), *argv[flag + 2 :]]

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = self.log_path(name).read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(
                    f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}"
                )

    def operator_settings(self, user: str = "operator") -> NatsSettings:
        return NatsSettings(
            url=f"nats://127.0.0.1:{self.nats_port}",
            user=user,
            password_file=self.mount_points["/secrets"] / f"{user}.password",
        )

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
        for process in reversed(list(self.processes.values())):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_until_serving(local: LocalCompose, services: list[str]) -> None:
    """Until each service answers a ``$SRV`` ping (executors once their model is loaded)."""
    settings = local.operator_settings()
    nc = await connect(settings.url or "", settings, name="test-compose", deadline_s=30)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        missing = services
        while missing:
            local.check_alive()
            assert time.monotonic() < deadline, f"not serving after {READY_TIMEOUT_S} s: {missing}"
            missing = [
                name
                for name in services
                if not await discover(nc, f"spotserve-{name}", verb="PING", window_s=0.2)
            ]
            await asyncio.sleep(0.3)
    finally:
        await nc.close()


def wait_healthy(local: LocalCompose, name: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while local.run_healthcheck(name)[0] != 0:
        local.check_alive()
        assert time.monotonic() < deadline, f"{name} not healthy:\n{local.log_tail(name)}"
        time.sleep(0.2)


@dataclass
class Started:
    local: LocalCompose
    seconds: float
    config_before: str


@pytest.fixture(scope="module")
def compose_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    began = time.monotonic()
    compose = load_compose()
    services = default_services(compose)
    local = LocalCompose(compose, tmp_path_factory.mktemp("compose"))
    try:
        for name in start_order(services):
            spec = services[name]
            if spec.get("restart") in ("no", False) and "healthcheck" not in spec:
                result = local.run_once(name)  # a one-shot (init)
                assert result.returncode == 0, f"{name} failed:\n{result.stdout}{result.stderr}"
                continue
            local.start(name)
            if spec["image"].startswith("nats:"):
                wait_healthy(local, name)
        spotserve = [name for name in services if name in SERVICE_USERS]
        asyncio.run(wait_until_serving(local, spotserve))
        config = local.mount_points["/secrets"] / "nats-server.conf"
        yield Started(local, time.monotonic() - began, config.read_text(encoding="utf-8"))
    finally:
        local.stop()


# -- 1. validation --------------------------------------------------------------------------


def test_docker_compose_validates_the_file() -> None:
    executable = shutil.which("docker-compose")
    if executable is None:
        message = "docker-compose is not installed (.ci/ensure-docker-compose installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "COMPOSE_PROJECT_NAME": "spotserve-test"}
    for profiles in ([], ["--profile", "gpu", "--profile", "cli"]):
        result = subprocess.run(
            [executable, "-f", str(COMPOSE_FILE), *profiles, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"docker-compose config:\n{result.stdout}{result.stderr}"


# -- 2. the file itself ---------------------------------------------------------------------


def test_every_service_is_there_with_restarts_and_health_checks() -> None:
    compose = load_compose()
    services = default_services(compose)
    assert set(services) == {"init", "nats", *SERVICE_USERS}
    assert services["init"].get("restart") == "no"
    for name in ("nats", *SERVICE_USERS):
        assert services[name].get("restart") in ("always", "unless-stopped", "on-failure"), name
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: no health check"
    assert {"secrets", "nats-data", "models"} <= set(compose["volumes"])
    nats = services["nats"]
    assert ("nats-data", "/data", False) in volume_mounts(nats)
    assert nats["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "-c" in nats["command"] or "--config" in nats["command"]


def test_every_spotserve_service_is_its_own_nats_user() -> None:
    compose = load_compose()
    for name in SERVICE_USERS:
        service = compose["services"][name]
        env = environment_of(service)
        assert env["SPOTSERVE_NATS__URL"] == f"nats://nats:{NATS_CLIENT_PORT}", name
        assert env["SPOTSERVE_NATS__USER"] == name
        assert env["SPOTSERVE_NATS__PASSWORD_FILE"] == f"/secrets/{name}.password"
        assert "SPOTSERVE_NATS__PASSWORD" not in env, f"{name}: a password in compose.yaml"
        assert ("secrets", "/secrets", True) in volume_mounts(service), name
        assert service["depends_on"]["init"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
    assert environment_of(compose["services"]["monitor"])["SPOTSERVE_MONITOR__LOCAL_PROVIDER"] in (
        "false",
        "False",
    )
    executor = compose["services"]["executor"]
    # Scalable: no fixed name, port or instance id; each replica picks its own id.
    assert "container_name" not in executor and "ports" not in executor
    assert "SPOTSERVE_EXECUTOR__INSTANCE_ID" not in environment_of(executor)
    # Executors read the model from the shared volume: none waits for a loader of its node.
    assert "SPOTSERVE_MODEL__NAME" not in environment_of(executor)


def test_the_gpu_profile_reserves_nvidia_devices_for_executors() -> None:
    services = load_compose()["services"]
    gpu, executor = services["executor-gpu"], services["executor"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["command"] == executor["command"]
    assert environment_of(executor).items() <= environment_of(gpu).items()
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["healthcheck"] == executor["healthcheck"]


def test_no_credentials_in_the_image() -> None:
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"PASSWORD\w*\s*=|\.password\b", dockerfile, re.IGNORECASE)
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", "**/*.password"} <= set(ignored)
    assert "pip install" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile


# -- 3. for real ----------------------------------------------------------------------------


def test_the_services_start_as_compose_starts_them(compose_cluster: Started) -> None:
    local = compose_cluster.local
    store = local.mount_points["/data"]
    assert f'store_dir: "{store}/jetstream"' in compose_cluster.config_before
    model = local.mount_points["/var/lib/spotserve"] / "models" / "tiny" / "config.json"
    assert model.is_file(), "the services created the embedded default model on the volume"
    print(f"compose cluster serving after {compose_cluster.seconds:.1f} s")


def test_every_health_check_passes(compose_cluster: Started) -> None:
    local = compose_cluster.local
    for name in ("nats", *SERVICE_USERS):
        status, output = local.run_healthcheck(name)
        assert status == 0, f"{name}: health check failed: {output}"


def test_the_executor_health_check_counts_only_its_own_instance(compose_cluster: Started) -> None:
    elsewhere = {"SPOTSERVE_EXECUTOR__INSTANCE_ID": "an-executor-on-another-node"}
    local = compose_cluster.local
    status, output = local.run_healthcheck("executor", elsewhere, extra_args=("--timeout", "1"))
    assert status == 1, output


async def test_a_client_user_gets_a_completion(compose_cluster: Started) -> None:
    local = compose_cluster.local
    settings = local.operator_settings("client")
    nc = await connect(settings.url or "", settings, name="test-compose-client", deadline_s=10)
    try:
        completion = await SpotserveClient(nc, first_chunk_timeout_s=120).generate(
            "Hello from compose", max_tokens=6, ignore_eos=True, temperature=0
        )
    finally:
        await nc.close()
    assert completion.completion_tokens == 6 and completion.finish_reason == "length"


def test_the_gateway_answers_openai_requests(compose_cluster: Started) -> None:
    gateway = load_compose()["services"]["gateway"]
    assert gateway["ports"] == ["127.0.0.1:${SPOTSERVE_GATEWAY_PORT:-8000}:8000"]
    assert environment_of(gateway)["SPOTSERVE_GATEWAY__PORT"] == "8000"
    url = f"http://127.0.0.1:{compose_cluster.local.gateway_port}/v1/completions"
    body = {"model": "spotserve-tiny", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["choices"][0]["finish_reason"] == "length"


def test_the_cli_service_sends_a_request_as_the_operator(compose_cluster: Started) -> None:
    args = ["generate", "Hello", "--max-tokens", "4", "--ignore-eos", "--timeout", "120"]
    result = compose_cluster.local.run_once("cli", args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 completion tokens" in result.stderr


def test_init_again_keeps_the_passwords(compose_cluster: Started) -> None:
    local = compose_cluster.local
    secrets = local.mount_points["/secrets"]
    before = {path.name: path.read_text() for path in secrets.glob("*.password")}
    result = local.run_once("init")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {path.name: path.read_text() for path in secrets.glob("*.password")} == before
    assert (secrets / "nats-server.conf").read_text() == compose_cluster.config_before
    assert {f"{user}.password" for user in (*SERVICE_USERS, "client", "operator")} <= set(before)


def test_no_permissions_violation_and_every_service_still_runs(compose_cluster: Started) -> None:
    local = compose_cluster.local
    local.check_alive()
    log = local.log_path("nats").read_text(encoding="utf-8", errors="replace")
    assert "Permissions Violation" not in log, log[-4000:]
    assert "Authorization Violation" not in log, log[-4000:]
