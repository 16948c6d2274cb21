"""The ``spotserve`` console script, run as real subprocesses (real nats-server, real services).

Each test gives the CLI its own SPOTSERVE_HOME, so the cluster record written by ``spotserve up``
does not collide with other tests, and a unique marker in the environment, so that processes
left behind can be found in /proc afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cli import DEMO_PROMPTS
from shared.model.checkpoint import MODEL_FILES
from shared.natsserver import free_port

MARKER_VARIABLE = "SPOTSERVE_TEST_MARKER"
SPOTSERVE_SCRIPT = Path(sys.executable).parent / "spotserve"
SPOTSERVE = (
    [str(SPOTSERVE_SCRIPT)] if SPOTSERVE_SCRIPT.exists() else [sys.executable, "-m", "shared.cli"]
)
REPO_ROOT = Path(__file__).resolve().parent.parent
UP_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0
LATENCY_LINE = re.compile(
    r"^  \[(stop|length); (\d+) tokens; first token \d+ ms; total \d+ ms\]$", re.MULTILINE
)


def cli_env(home: Path, marker: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The CLI must find the cluster by itself (its record), not through the environment.
    env.pop("SPOTSERVE_NATS__URL", None)
    env["SPOTSERVE_HOME"] = str(home)
    if marker is not None:
        env[MARKER_VARIABLE] = marker
    env.update(extra)
    return env


def spotserve(
    *args: str, env: dict[str, str], timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SPOTSERVE, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def processes_with_marker(marker: str) -> list[int]:
    """Live processes whose environment carries the marker (unreadable entries skipped)."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def wait_for_no_process(marker: str, timeout_s: float = 30.0) -> list[int]:
    """Give exiting processes a bounded moment; return those still alive after it."""
    deadline = time.monotonic() + timeout_s
    left = processes_with_marker(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_with_marker(marker)
    return left


def describe(pids: list[int]) -> list[str]:
    commands = []
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        command = raw.replace(b"\0", b" ").decode(errors="replace")
        commands.append(f"{pid}: {command}")
    return commands


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique environment marker; whatever still carries it at teardown is killed."""
    value = uuid.uuid4().hex
    yield value
    for pid in processes_with_marker(value):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class LineReader:
    """Collects a process's stdout lines in a thread, so waiting for one is bounded."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, needle: str, timeout_s: float) -> str | None:
        """The first line containing ``needle``; None at EOF or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                return None
            self.lines.append(line)
            if needle in line:
                return line
        return None

    def rest(self, timeout_s: float = 10.0) -> list[str]:
        self._thread.join(timeout_s)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.lines
            if line is not None:
                self.lines.append(line)


# ---------------------------------------------------------------------------------------------
# spotserve model init


def test_model_init_is_deterministic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    a, b, c = tmp_path / "models" / "a", tmp_path / "models" / "b", tmp_path / "models" / "c"
    for directory, seed in ((a, "7"), (b, "7"), (c, "8")):
        done = spotserve("model", "init", str(directory), "--seed", seed, env=env)
        assert done.returncode == 0, done.stderr
        assert f"seed {seed}" in done.stdout and str(directory) in done.stdout

    expected_files = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "tokenizer_config.json",
    }
    assert expected_files <= set(MODEL_FILES)
    assert {path.name for path in a.iterdir()} == set(MODEL_FILES)
    for name in MODEL_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # The seed is really used: another seed, other weights.
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    again = spotserve("model", "init", str(a), "--seed", "8", env=env)
    assert again.returncode != 0
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()

    forced = spotserve("model", "init", str(a), "--seed", "8", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    for name in MODEL_FILES:
        assert (a / name).read_bytes() == (c / name).read_bytes(), name
    # No staging or trash directory is left next to the models.
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["a", "b", "c"]


def test_model_init_unknown_size(tmp_path: Path) -> None:
    target = tmp_path / "bogus-model"
    done = spotserve("model", "init", str(target), "--size", "bogus", env=cli_env(tmp_path))
    assert done.returncode != 0
    assert "bogus" in done.stderr
    assert "tiny" in done.stderr and "small" in done.stderr
    assert "Traceback" not in done.stderr
    assert not target.exists()


# ---------------------------------------------------------------------------------------------
# spotserve up / generate


def test_up_generate_and_ctrl_c(tmp_path: Path, tiny_model_dir: Path, marker: str) -> None:
    home = tmp_path / "home"
    env = cli_env(home, marker)
    stderr_path = tmp_path / "up.stderr"
    gateway_port = free_port()
    with open(stderr_path, "w") as stderr:
        up = subprocess.Popen(
            [
                *SPOTSERVE,
                "up",
                "--instances",
                "1",
                "--model",
                str(tiny_model_dir),
                "--gateway-port",
                str(gateway_port),
                "--metrics-port",
                "0",
            ],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    reader = LineReader(up)
    try:
        ready = reader.wait_for("spotserve is up", UP_TIMEOUT_S)
        assert ready is not None, (
            f"no 'spotserve is up' line; stdout={reader.lines} stderr={stderr_path.read_text()}"
        )
        nats_url = re.search(r"nats://\S+?(?=;|\s|$)", ready)
        assert nats_url is not None, ready
        record = json.loads((home / "cluster.json").read_text())
        assert record["nats_url"] == nats_url.group(0)
        assert record["pid"] == up.pid
        # It prints the gateway's URL and every service's metrics URL, and they answer.
        gateway = reader.wait_for("gateway: ", 30)
        assert gateway is not None and f"http://127.0.0.1:{gateway_port}" in gateway, reader.lines
        models = urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/v1/models", timeout=30)
        assert json.loads(models.read())["data"][0]["id"] == tiny_model_dir.name
        services = ("admission", "executor", "gateway", "loader", "monitor", "planner", "scheduler")
        for service in services:  # printed in this order
            line = reader.wait_for(f"metrics {service}: ", 30)
            assert line is not None, reader.lines
            with urllib.request.urlopen(line.split(": ", 1)[1].strip(), timeout=30) as page:
                assert b"spotserve_" in page.read(), line

        args = ("generate", "Hello", "--max-tokens", "8", "--temperature", "0", "--ignore-eos")
        streamed = spotserve(*args, env=env)
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout.strip()
        assert "[length; " in streamed.stderr and "8 completion tokens" in streamed.stderr

        whole = spotserve(*args, "--no-stream", env=env)
        assert whole.returncode == 0, whole.stderr
        assert whole.stdout == streamed.stdout
        assert "8 completion tokens" in whole.stderr

        invalid = spotserve("generate", "Hello", "--temperature", "-1", env=env)
        assert invalid.returncode != 0
        assert "[400]" in invalid.stderr and "temperature" in invalid.stderr
        assert "Traceback" not in invalid.stderr
        assert invalid.stdout.strip() == ""

        assert up.poll() is None, "up exited while serving"
        # The marker does find the cluster: up, nats-server and the six services.
        serving = processes_with_marker(marker)
        assert up.pid in serving and len(serving) >= 8, describe(serving)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=EXIT_TIMEOUT_S) == 0, stderr_path.read_text()
        lines = reader.rest()
        assert "stopped" in lines, lines
        assert "Traceback" not in stderr_path.read_text()
        # The record of a stopped cluster is gone, so `generate` will not try it again.
        assert not (home / "cluster.json").exists()
        left = wait_for_no_process(marker)
        assert not left, f"processes left behind: {describe(left)}"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_generate_without_a_server_fails_clearly(tmp_path: Path, marker: str) -> None:
    done = spotserve(
        "generate",
        "Hello",
        "--nats-url",
        "nats://127.0.0.1:1",
        env=cli_env(tmp_path, marker),
        timeout=60,
    )
    assert done.returncode != 0
    assert "error:" in done.stderr
    assert "nats://127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.strip() == ""
    assert not wait_for_no_process(marker)


# ---------------------------------------------------------------------------------------------
# spotserve demo


def test_demo(tmp_path: Path, tiny_model_dir: Path, marker: str) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = cli_env(tmp_path / "home", marker, TMPDIR=str(scratch))
    done = spotserve(
        "demo", "--model", str(tiny_model_dir), "--max-tokens", "8", env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    for prompt in DEMO_PROMPTS:
        assert f"> {prompt}" in lines, done.stdout
    latencies = LATENCY_LINE.findall(done.stdout)
    assert len(latencies) == len(DEMO_PROMPTS), done.stdout
    assert all(0 <= int(tokens) <= 8 for _, tokens in latencies)
    # Each prompt is followed by its text and then its own latency line.
    for prompt in DEMO_PROMPTS:
        index = lines.index(f"> {prompt}")
        assert LATENCY_LINE.match(lines[index + 2]), lines[index : index + 3]
    assert lines[-1] == "done"
    left = wait_for_no_process(marker)
    assert not left, f"processes left behind: {describe(left)}"
    # The throwaway cluster's state directory is removed.
    assert not [path for path in scratch.iterdir() if path.name.startswith("spotserve-demo-")]


def test_profile_writes_a_profile_the_scheduler_can_use(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from shared.model.profile import load_parallel_profile, load_profile

    out = tmp_path / "profile.json"
    result = spotserve(
        "profile", "--model", str(tiny_model_dir), "--out", str(out), env=cli_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    profile = load_profile(out)
    assert profile is not None
    assert [n for n, _ in profile.prefill] == sorted(n for n, _ in profile.prefill)
    assert all(seconds > 0 for _, seconds in profile.prefill + profile.decode)
    # Interpolation covers lengths between and beyond the measured points.
    assert profile.prefill_time_s(2000) >= profile.prefill_time_s(100) > 0
    # The planner's cost-model profile of the same model, beside it.
    parallel = load_parallel_profile(tmp_path / "profile-parallel.json")
    assert parallel is not None and parallel.num_layers == 4 and parallel.tensor_degrees() == [1]
    assert parallel.layer_bytes > 0 and parallel.kv_bytes_per_token > 0
    decode = parallel.decode_s[1]
    assert [b for b, _ in decode] == sorted(b for b, _ in decode)
    assert all(seconds > 0 for _, seconds in decode + parallel.prefill_s[1])
