"""The local provider's executor processes (``monitor.local_provider``): ``fleet add`` starts
them as children of the monitor (same environment, PR_SET_PDEATHSIG, own log); a deadline ends
an instance on this node by SIGKILL (its pid checked against /proc, so a reused pid is never
hit); children still running when the monitor stops are terminated."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from services.monitor import metrics
from services.monitor.fleet import Fleet, Pending
from shared.bus import resolve_nats_url
from shared.cluster import die_with_parent
from shared.config import spotserve_home
from shared.messages import AddInstancesRequest, InstanceRecord
from shared.rpc import Unavailable
from shared.runtime import ServiceContext
from shared.waiting import wait_until

# A SIGKILLed process that is not our child: how long to watch for its end, and how often.
KILL_WAIT_S = 10.0
KILL_POLL_S = 0.02
# How long a stopped or killed child process may take to exit before it is killed.
STOP_PROCESS_TIMEOUT_S = 20.0
# Children still running when the monitor stops: terminated, then killed after this long.
SHUTDOWN_PROCESS_TIMEOUT_S = 10.0

ON_LINUX = sys.platform.startswith("linux")


def proc_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in unix seconds) of a process from /proc; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/stat") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    start_ticks = float(fields[19])
    return fields[0], boot + start_ticks / os.sysconf("SC_CLK_TCK")


def is_executor_process(pid: int, started_at: float) -> bool:
    """Is ``pid`` still the executor that registered at ``started_at`` (not a reused pid)?"""
    if not ON_LINUX:
        return True
    state = proc_state(pid)
    if state is None or state[0] == "Z":
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # The process began before it registered (2 s of slack for the clock tick rounding).
    return b"services.executor" in cmdline and state[1] <= started_at + 2.0


async def stop_process(
    process: asyncio.subprocess.Process,
    kill: bool,
    timeout_s: float = STOP_PROCESS_TIMEOUT_S,
) -> None:
    """SIGKILL (``kill``) or SIGTERM a child and wait for its exit; SIGKILL after ``timeout_s``."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill() if kill else process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout=timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


class LocalProcesses:
    def __init__(
        self,
        context: ServiceContext,
        fleet: Fleet,
        node: str,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.settings = context.settings.monitor
        self.nats = context.settings.nats
        self.fleet = fleet
        self.node = node
        self.log = log
        # Every process this monitor started, by instance id (terminated when it stops).
        self.children: dict[str, asyncio.subprocess.Process] = {}

    def can_kill(self, record: InstanceRecord) -> bool:
        return self.settings.local_provider and record.node == self.node and record.pid is not None

    # -- adding instances ----------------------------------------------------------------------

    async def add(self, request: AddInstancesRequest) -> list[str]:
        if not self.settings.local_provider:
            raise Unavailable(
                "this monitor has no local provider (monitor.local_provider is off):"
                " add instances through your cloud"
            )
        added = []
        async with self.fleet.locked_for_request():
            for _ in range(request.count):
                instance_id = f"{self.node}-{uuid.uuid4().hex[:8]}"
                self.fleet.pending[instance_id] = await self._spawn(
                    instance_id, request.price_class
                )
                added.append(instance_id)
        return added

    def _log_dir(self) -> Path:
        return self.settings.log_dir or spotserve_home() / "cluster" / "logs"

    def _executor_env(self, instance_id: str, price_class: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SPOTSERVE_NATS__URL"] = resolve_nats_url(self.nats)
        env["SPOTSERVE_EXECUTOR__INSTANCE_ID"] = instance_id
        env["SPOTSERVE_MONITOR__PRICE_CLASS"] = price_class
        # Any free port: one the monitor's environment names is taken (by the monitor itself).
        env["SPOTSERVE_METRICS__PORT"] = "0"
        if self.settings.executor_nats_user is not None:  # the executor's own NATS user
            env["SPOTSERVE_NATS__USER"] = self.settings.executor_nats_user
            env.pop("SPOTSERVE_NATS__PASSWORD", None)
            password_file = self.settings.executor_nats_password_file
            env["SPOTSERVE_NATS__PASSWORD_FILE"] = str(password_file or "")
        return env

    async def _spawn(self, instance_id: str, price_class: str) -> Pending:
        env = self._executor_env(instance_id, price_class)
        log_path = self._log_dir() / f"executor-{instance_id}.log"
        await asyncio.to_thread(log_path.parent.mkdir, parents=True, exist_ok=True)
        log_file = await asyncio.to_thread(open, log_path, "ab")
        with log_file:
            # From the event loop's thread: PDEATHSIG fires when the spawning thread ends.
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.executor",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if ON_LINUX else None,
            )
        self.children[instance_id] = process
        metrics.INSTANCES_ADDED.inc()
        self.log.info("fleet.added", instance_id=instance_id, pid=process.pid, log=str(log_path))
        return Pending(process, self.fleet.loop.time(), time.time(), price_class, log_path)

    # -- ending instances ----------------------------------------------------------------------

    async def kill(self, record: InstanceRecord) -> None:
        """SIGKILL the instance's process and wait until it is dead."""
        assert record.pid is not None
        child = self.children.get(record.instance_id)
        log = self.log.bind(instance_id=record.instance_id, pid=record.pid)
        if child is not None and child.pid == record.pid:
            log.info("local.sigkill")
            await stop_process(child, kill=True)
            return
        if not is_executor_process(record.pid, record.started_at):
            log.info("local.already_gone")
            return
        log.info("local.sigkill")
        try:
            os.kill(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if not await wait_until(_dead_check(record.pid), KILL_WAIT_S, KILL_POLL_S):
            log.error("local.sigkill_not_dead")

    async def stop_all(self) -> None:
        """Terminate the children still running (killed if they take too long)."""
        running = [p for p in self.children.values() if p.returncode is None]
        if running:
            self.log.info("fleet.stopping_children", count=len(running))
        await asyncio.gather(
            *(stop_process(p, kill=False, timeout_s=SHUTDOWN_PROCESS_TIMEOUT_S) for p in running)
        )


def _dead_check(pid: int) -> Callable[[], Awaitable[bool]]:
    """Is a process that is not our child gone? Its parent reaps it: dead or a zombie is enough."""

    async def dead() -> bool:
        state = proc_state(pid) if ON_LINUX else None
        return state is None or state[0] in ("Z", "X")

    return dead
