"""Monitor: the instance registry, leases, preemption notices and the fleet events.

Registry: executors put an :class:`InstanceRecord` under their instance id in the KV bucket
``spotserve-instances`` when they serve, re-put it every ``monitor.heartbeat_s`` and delete it
on a clean stop. The monitor watches the bucket and keeps each instance's lease on its own
clock (the time it last saw an update), so the instances' clocks do not matter.

Fleet events (stream ``SPOTSERVE_FLEET``, subject ``spotserve.v1.fleet.events.<kind>``), one per
change, in the order the monitor decided them:

- ``joined``: a new incarnation (instance id + its ``started_at``) appeared in the registry.
- ``preempt-notice``: a notice was accepted; ``deadline`` is when the instance will be gone
  (monitor clock). Repeats are folded: a later notice for the same incarnation publishes an
  updated event only when it moves the deadline earlier (by more than
  ``monitor.deadline_update_min_s``); otherwise the reply is the event already published.
- ``left``: an instance went away as announced: a clean delete of its key, or, after a
  preemption notice, its end by any means (SIGKILL at the deadline by the local provider, a
  lease that ran out, a delete).
- ``lost``: an instance went away without notice: its lease ran out (its key is deleted), or a
  new incarnation took its id without the old one deleting its key.

Exactly once: every event carries ``Nats-Msg-Id`` = its incarnation and change, so a retried
publish is dropped by the stream; a restarted monitor first rebuilds its state from the stream's
events and the bucket, then publishes only what changed while it was away. An incarnation that
has ended stays ended: its late heartbeats are removed from the bucket (an executor whose key
was removed registers again as a new incarnation, which is a new ``joined``).

Local provider (``monitor.local_provider``, the embedded cluster): ``fleet add`` starts new
executor processes as children of the monitor (same environment, PR_SET_PDEATHSIG, own log),
and a preemption notice ends in SIGKILL of the instance's process at the deadline when the
instance runs on this node (pid from its record, checked against /proc), followed by ``left``.
Merge rule: a notice for an instance that was added but has not joined yet cancels it: its
process is killed and no event is ever published for it (the planner never sees it). An add
followed by a notice for an instance that has joined gives joined + preempt-notice + left; the
planner merges those inside one grace period. Children still running when the monitor stops
are terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from nats.js.errors import (
    KeyWrongLastSequenceError,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from nats.micro.request import Request
from pydantic import ValidationError

from services.monitor import metrics
from shared.bus import resolve_nats_url
from shared.cluster import die_with_parent
from shared.codec import DecodeError, content_type_header, decode, encode, encoding_from_headers
from shared.config import spotserve_home
from shared.messages import (
    NOTICE_OUTCOME_HEADER,
    AddInstancesReply,
    AddInstancesRequest,
    Empty,
    Encoding,
    FleetEvent,
    FleetEventKind,
    FleetStatus,
    InstanceRecord,
    InstanceStatus,
    PreemptNotice,
)
from shared.modelsource import node_name
from shared.rpc import (
    ADD_ENDPOINT,
    NOTICE_ENDPOINT,
    STATUS_ENDPOINT,
    BadRequest,
    Internal,
    NotFound,
    RpcError,
    Unavailable,
    add_endpoint,
    add_raw_endpoint,
    respond_error,
)
from shared.runtime import ServiceContext
from shared.subjects import (
    FLEET_STREAM,
    FLEET_SUBJECT_PREFIX,
    fleet_event_subject,
    instances_bucket,
)
from shared.waiting import backoff_delays, cancel_and_wait, supervised, wait_until

MSG_ID_HEADER = "Nats-Msg-Id"
# Bound on the wait for each stored event while the monitor rebuilds its state at start.
REBUILD_EVENT_TIMEOUT_S = 10.0
# A SIGKILLed process that is not our child: how long to watch for its end, and how often.
KILL_WAIT_S = 10.0
KILL_POLL_S = 0.02
# How long a stopped or killed child process may take to exit before it is killed.
STOP_PROCESS_TIMEOUT_S = 20.0
# Children still running when the monitor stops: terminated, then killed after this long.
SHUTDOWN_PROCESS_TIMEOUT_S = 10.0


def incarnation(record: InstanceRecord) -> str:
    """One life of an instance: its id and when that process began serving."""
    return f"{record.instance_id}@{record.started_at:.6f}"


@dataclass
class Tracked:
    record: InstanceRecord
    revision: int
    last_seen: float  # monitor's monotonic clock
    notice: FleetEvent | None = None  # the preempt-notice published for this incarnation
    killer: asyncio.Task[None] | None = None

    @property
    def incarnation(self) -> str:
        return incarnation(self.record)

    @property
    def deadline(self) -> float | None:
        return None if self.notice is None else self.notice.deadline


@dataclass
class Pending:
    """An instance `fleet add` started that has not registered yet."""

    process: asyncio.subprocess.Process
    requested_at: float  # monotonic
    requested_wall: float
    price_class: str = "spot"
    log_path: Path = field(default_factory=Path)


def _proc_state(pid: int) -> tuple[str, float] | None:
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


def _is_executor_process(pid: int, started_at: float) -> bool:
    """Is ``pid`` still the executor that registered at ``started_at`` (not a reused pid)?"""
    if not sys.platform.startswith("linux"):
        return True
    state = _proc_state(pid)
    if state is None or state[0] == "Z":
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # The process began before it registered (2 s of slack for the clock tick rounding).
    return b"services.executor" in cmdline and state[1] <= started_at + 2.0


class Monitor:
    def __init__(self, context: ServiceContext, kv: KeyValue) -> None:
        self.context = context
        self.settings = context.settings.monitor
        self.kv = kv
        self.node = node_name(context.settings)
        self.log = context.log.bind(node=self.node)
        self.loop = asyncio.get_running_loop()
        self.instances: dict[str, Tracked] = {}
        # Incarnations with a lost/left event: they never come back under the same name.
        self.ended: set[str] = set()
        self.pending: dict[str, Pending] = {}
        # Added instances cancelled by a notice before they joined: never an event for them.
        self.cancelled: set[str] = set()
        # Every process this monitor started, by instance id (terminated when it stops).
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self._lock = asyncio.Lock()
        self._entries: asyncio.Queue[KeyValue.Entry] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher: KeyValue.KeyWatcher | None = None

    # -- publishing ------------------------------------------------------------------------

    async def _publish(
        self, kind: FleetEventKind, msg_id: str, event: FleetEvent, retry: bool
    ) -> FleetEvent:
        """Publish one event (deduplicated by ``msg_id``); returns the event the stream holds.

        ``retry``: keep trying until it is stored (the change must not be lost); else one try,
        and the caller answers 503."""
        delays = backoff_delays()
        while True:
            try:
                ack = await self.context.js.publish(
                    fleet_event_subject(kind),
                    encode(event),
                    headers={MSG_ID_HEADER: msg_id},
                    timeout=self.context.settings.nats.request_timeout_s,
                )
                break
            except (NatsError, TimeoutError) as exc:
                if not retry:
                    raise Unavailable(f"JetStream did not take the event: {exc!r}") from None
                self.log.warning("fleet.publish_retry", kind=kind, msg_id=msg_id, error=repr(exc))
                await asyncio.sleep(next(delays))
        metrics.FLEET_EVENTS.labels(kind).inc()
        if ack.duplicate:
            # An earlier try was stored after all: that stored event is the truth.
            stored = await self.context.js.get_msg(FLEET_STREAM, ack.seq)
            event = FleetEvent.model_validate(decode(stored.data or b""))
        self.log.info(
            "fleet.event",
            kind=kind,
            instance_id=event.instance.instance_id,
            deadline=event.deadline,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
        )
        return event

    async def _join(self, record: InstanceRecord, revision: int) -> None:
        event = FleetEvent(kind="joined", instance=record, at=time.time())
        await self._publish("joined", f"{incarnation(record)}:joined", event, retry=True)
        self.instances[record.instance_id] = Tracked(record, revision, self.loop.time())
        self.pending.pop(record.instance_id, None)

    async def _end(
        self, tracked: Tracked, kind: FleetEventKind, source: str, delete_key: bool
    ) -> None:
        if tracked.killer is not None and tracked.killer is not asyncio.current_task():
            tracked.killer.cancel()
        event = FleetEvent(
            kind=kind,
            instance=tracked.record,
            at=time.time(),
            deadline=tracked.deadline,
            source=source,
        )
        await self._publish(kind, f"{tracked.incarnation}:end", event, retry=True)
        self.ended.add(tracked.incarnation)
        if self.instances.get(tracked.record.instance_id) is tracked:
            del self.instances[tracked.record.instance_id]
        if delete_key:
            await self._delete_key(tracked.record.instance_id, tracked.revision)

    async def _delete_key(self, key: str, revision: int) -> None:
        """Remove a record that is no longer alive (unless it has been re-put since)."""
        try:
            await self.kv.delete(key, last=revision)
        except KeyWrongLastSequenceError:
            pass  # a newer put: the watcher handles it
        except (NatsError, TimeoutError) as exc:
            self.log.warning("registry.delete_failed", instance_id=key, error=repr(exc))

    # -- start: rebuild from the stream and the bucket -----------------------------------------

    async def _read_events(self) -> list[FleetEvent]:
        info = await self.context.js.stream_info(FLEET_STREAM)
        last = info.state.last_seq
        if not info.state.messages:
            return []
        events: list[FleetEvent] = []
        subscription = await self.context.js.subscribe(
            f"{FLEET_SUBJECT_PREFIX}.*",
            stream=FLEET_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            while True:
                message = await subscription.next_msg(timeout=REBUILD_EVENT_TIMEOUT_S)
                try:
                    events.append(FleetEvent.model_validate(decode(message.data)))
                except (DecodeError, ValidationError) as exc:
                    self.log.warning("fleet.bad_event_in_stream", error=str(exc))
                if message.metadata.sequence.stream >= last:
                    break
        finally:
            await subscription.unsubscribe()
        return events

    async def start(self) -> None:
        """Rebuild the state, then follow the bucket. Publishes only what changed meanwhile."""
        events = await self._read_events()
        open_events: dict[str, FleetEvent] = {}  # instance id -> last event of a live incarnation
        for event in events:
            key = incarnation(event.instance)
            if event.kind in ("lost", "left"):
                self.ended.add(key)
                current = open_events.get(event.instance.instance_id)
                if current is not None and incarnation(current.instance) == key:
                    del open_events[event.instance.instance_id]
            else:
                open_events[event.instance.instance_id] = event
        self._watcher = await self.kv.watchall()
        latest: dict[str, KeyValue.Entry] = {}
        async for entry in self._watcher:
            if entry is None:
                break
            latest[entry.key] = entry
        async with self._lock:
            now = self.loop.time()
            for instance_id, event in open_events.items():
                tracked = Tracked(event.instance, 0, now)
                if event.kind == "preempt-notice":
                    tracked.notice = event
                entry = latest.get(instance_id)
                record = self._record(entry) if entry is not None else None
                if record is not None and incarnation(record) == tracked.incarnation:
                    tracked.record, tracked.revision = record, entry.revision or 0  # type: ignore[union-attr]
                    self.instances[instance_id] = tracked
                    if tracked.notice is not None:
                        self._schedule_kill(tracked)
                    continue
                # Gone while no monitor watched: cleanly (a delete marker) or not.
                clean = entry is not None and entry.operation in (KV_DEL, KV_PURGE)
                kind: FleetEventKind = "left" if clean or tracked.notice is not None else "lost"
                await self._end(tracked, kind, source="monitor", delete_key=False)
            for entry in latest.values():
                if entry.operation not in (KV_DEL, KV_PURGE):
                    await self._on_entry(entry)
        self.log.info(
            "monitor.rebuilt",
            events=len(events),
            instances=sorted(self.instances),
            preempting=sorted(k for k, t in self.instances.items() if t.notice is not None),
        )
        self._tasks = [
            supervised(self._pump(), "registry-pump", self.log),
            supervised(self._registry_loop(), "registry-loop", self.log),
        ]

    def _record(self, entry: KeyValue.Entry) -> InstanceRecord | None:
        if entry.operation in (KV_DEL, KV_PURGE):
            return None
        try:
            record = InstanceRecord.model_validate(decode(entry.value or b""))
        except (DecodeError, ValidationError) as exc:
            self.log.warning("registry.bad_record", key=entry.key, error=str(exc))
            return None
        if record.instance_id != entry.key:
            self.log.warning("registry.key_mismatch", key=entry.key, record=record.instance_id)
            return None
        return record

    # -- following the bucket and the leases ---------------------------------------------------

    async def _pump(self) -> None:
        assert self._watcher is not None
        async for entry in self._watcher:
            if entry is not None:
                self._entries.put_nowait(entry)

    async def _registry_loop(self) -> None:
        interval = self.settings.check_interval_s
        next_check = self.loop.time() + interval
        while True:
            try:
                entry = await asyncio.wait_for(
                    self._entries.get(), timeout=max(0.0, next_check - self.loop.time())
                )
            except TimeoutError:
                entry = None
            async with self._lock:
                if entry is not None:
                    await self._on_entry(entry)
                now = self.loop.time()
                if now >= next_check:
                    # Updates that already arrived count before a lease is judged.
                    while not self._entries.empty():
                        await self._on_entry(self._entries.get_nowait())
                    late = now - next_check
                    if late > self.settings.lease_s / 2:
                        # This loop itself was held up (not the instances): do not count that.
                        self.log.warning("monitor.stalled", seconds=round(late, 3))
                        for tracked in self.instances.values():
                            tracked.last_seen += late
                    await self._check(now)
                    next_check = self.loop.time() + interval

    async def _on_entry(self, entry: KeyValue.Entry) -> None:
        key = entry.key
        revision = entry.revision or 0
        tracked = self.instances.get(key)
        if entry.operation in (KV_DEL, KV_PURGE):
            if tracked is not None and revision > tracked.revision:
                await self._end(tracked, "left", source="monitor", delete_key=False)
            return
        record = self._record(entry)
        if record is None:
            return
        if key in self.cancelled or incarnation(record) in self.ended:
            # A cancelled addition, or an incarnation already declared gone: not alive for us.
            self.log.info("registry.stale_record_removed", instance_id=key)
            await self._delete_key(key, revision)
            return
        if tracked is not None and tracked.incarnation == incarnation(record):
            if revision > tracked.revision:
                tracked.record, tracked.revision = record, revision
                tracked.last_seen = self.loop.time()
            return
        if tracked is not None:
            # A new incarnation under the same id: the old one did not say goodbye.
            kind: FleetEventKind = "left" if tracked.notice is not None else "lost"
            await self._end(tracked, kind, source="monitor", delete_key=False)
        await self._join(record, revision)

    async def _check(self, now: float) -> None:
        for tracked in list(self.instances.values()):
            if now - tracked.last_seen > self.settings.lease_s:
                kind: FleetEventKind = "left" if tracked.notice is not None else "lost"
                metrics.LEASE_EXPIRATIONS.inc()
                self.log.warning(
                    "registry.lease_expired",
                    instance_id=tracked.record.instance_id,
                    silent_s=round(now - tracked.last_seen, 3),
                )
                await self._end(tracked, kind, source="monitor", delete_key=True)
        for instance_id, pending in list(self.pending.items()):
            code = pending.process.returncode
            if code is not None:
                del self.pending[instance_id]
                self.log.error(
                    "fleet.add_failed",
                    instance_id=instance_id,
                    exit_code=code,
                    log=str(pending.log_path),
                )
            elif now - pending.requested_at > self.settings.join_timeout_s:
                del self.pending[instance_id]
                self.cancelled.add(instance_id)
                self.log.error("fleet.add_timed_out", instance_id=instance_id)
                await self._stop_process(pending.process, kill=True)

    @contextlib.asynccontextmanager
    async def _locked_for_request(self) -> AsyncIterator[None]:
        """The state lock for a request handler: a bounded wait (the lock may be held by a
        publish that waits for JetStream), then 503 instead of a silent timeout."""
        try:
            await asyncio.wait_for(
                self._lock.acquire(), timeout=self.context.settings.nats.request_timeout_s
            )
        except TimeoutError:
            raise Unavailable("the monitor is busy (is JetStream reachable?); retry") from None
        try:
            yield
        finally:
            self._lock.release()

    # -- preemption --------------------------------------------------------------------------

    async def notice(self, notice: PreemptNotice) -> tuple[str, FleetEvent]:
        """Apply a notice: (outcome, the event that stands for it)."""
        grace_s = self.settings.grace_s if notice.grace_s is None else notice.grace_s
        async with self._locked_for_request():
            now = time.time()
            deadline = now + grace_s
            pending = self.pending.pop(notice.instance_id, None)
            if pending is not None:
                return "cancelled", await self._cancel(notice, pending, now)
            tracked = self.instances.get(notice.instance_id)
            if tracked is None:
                known = ", ".join(sorted(self.instances)) or "none"
                raise NotFound(f"unknown instance {notice.instance_id!r} (registered: {known})")
            previous = tracked.notice
            if previous is not None and previous.deadline is not None:
                if deadline >= previous.deadline - self.settings.deadline_update_min_s:
                    return "duplicate", previous
                msg_id = f"{tracked.incarnation}:notice:{deadline:.3f}"
                outcome = "updated"
            else:
                msg_id = f"{tracked.incarnation}:notice"
                outcome = "new"
            event = FleetEvent(
                kind="preempt-notice",
                instance=tracked.record,
                at=now,
                deadline=deadline,
                source=notice.source,
            )
            tracked.notice = await self._publish("preempt-notice", msg_id, event, retry=False)
            self._schedule_kill(tracked)
            return outcome, tracked.notice

    async def _cancel(self, notice: PreemptNotice, pending: Pending, now: float) -> FleetEvent:
        """Merge rule: an added instance that has not joined is stopped, nothing is published."""
        instance_id = notice.instance_id
        self.cancelled.add(instance_id)
        self.log.info("fleet.add_cancelled", instance_id=instance_id, source=notice.source)
        await self._stop_process(pending.process, kill=True)
        record = InstanceRecord(
            instance_id=instance_id,
            node=self.node,
            devices=1,
            device_kind="pending",
            device_memory_bytes=0,
            price_class="on-demand" if pending.price_class == "on-demand" else "spot",
            pid=pending.process.pid,
            started_at=pending.requested_wall,
            heartbeat_at=pending.requested_wall,
        )
        return FleetEvent(kind="left", instance=record, at=now, deadline=now, source=notice.source)

    def _schedule_kill(self, tracked: Tracked) -> None:
        if not self._can_kill(tracked.record):
            return
        if tracked.killer is not None:
            tracked.killer.cancel()
        tracked.killer = asyncio.create_task(self._kill_at_deadline(tracked))

    def _can_kill(self, record: InstanceRecord) -> bool:
        return self.settings.local_provider and record.node == self.node and record.pid is not None

    async def _kill_at_deadline(self, tracked: Tracked) -> None:
        assert tracked.deadline is not None
        await asyncio.sleep(max(0.0, tracked.deadline - time.time()))
        async with self._lock:
            if self.instances.get(tracked.record.instance_id) is not tracked:
                return  # gone meanwhile
            await self._kill(tracked.record)
            metrics.LOCAL_KILLS.inc()
            await self._end(tracked, "left", source="local", delete_key=True)

    async def _kill(self, record: InstanceRecord) -> None:
        """SIGKILL the instance's process and wait until it is dead."""
        assert record.pid is not None
        child = self.children.get(record.instance_id)
        log = self.log.bind(instance_id=record.instance_id, pid=record.pid)
        if child is not None and child.pid == record.pid:
            log.info("local.sigkill")
            await self._stop_process(child, kill=True)
            return
        if not _is_executor_process(record.pid, record.started_at):
            log.info("local.already_gone")
            return
        log.info("local.sigkill")
        try:
            os.kill(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # Not our child: its parent reaps it; dead (or a zombie) is enough.
        pid = record.pid

        async def dead() -> bool:
            state = _proc_state(pid) if sys.platform.startswith("linux") else None
            return state is None or state[0] in ("Z", "X")

        if not await wait_until(dead, KILL_WAIT_S, KILL_POLL_S):
            log.error("local.sigkill_not_dead")

    # -- local provider: adding instances ------------------------------------------------------

    def _log_dir(self) -> Path:
        return self.settings.log_dir or spotserve_home() / "cluster" / "logs"

    async def add(self, request: AddInstancesRequest) -> list[str]:
        if not self.settings.local_provider:
            raise Unavailable(
                "this monitor has no local provider (monitor.local_provider is off):"
                " add instances through your cloud"
            )
        added = []
        async with self._locked_for_request():
            for _ in range(request.count):
                instance_id = f"{self.node}-{uuid.uuid4().hex[:8]}"
                pending = await self._spawn(instance_id, request.price_class)
                self.pending[instance_id] = pending
                added.append(instance_id)
        return added

    async def _spawn(self, instance_id: str, price_class: str) -> Pending:
        env = dict(os.environ)
        env["SPOTSERVE_NATS__URL"] = resolve_nats_url(self.context.settings.nats)
        env["SPOTSERVE_EXECUTOR__INSTANCE_ID"] = instance_id
        env["SPOTSERVE_MONITOR__PRICE_CLASS"] = price_class
        # Any free port: one the monitor's environment names is taken (by the monitor itself).
        env["SPOTSERVE_METRICS__PORT"] = "0"
        settings = self.context.settings.monitor
        if settings.executor_nats_user is not None:  # the executor's own NATS user
            env["SPOTSERVE_NATS__USER"] = settings.executor_nats_user
            env.pop("SPOTSERVE_NATS__PASSWORD", None)
            env["SPOTSERVE_NATS__PASSWORD_FILE"] = str(settings.executor_nats_password_file or "")
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
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        self.children[instance_id] = process
        metrics.INSTANCES_ADDED.inc()
        self.log.info("fleet.added", instance_id=instance_id, pid=process.pid, log=str(log_path))
        return Pending(process, self.loop.time(), time.time(), price_class, log_path)

    async def _stop_process(
        self,
        process: asyncio.subprocess.Process,
        kill: bool,
        timeout_s: float = STOP_PROCESS_TIMEOUT_S,
    ) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill() if kill else process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    # -- status and stop -----------------------------------------------------------------------

    def status(self) -> FleetStatus:
        now = self.loop.time()
        return FleetStatus(
            instances=[
                InstanceStatus(
                    record=tracked.record,
                    state="preempting" if tracked.notice is not None else "running",
                    deadline=tracked.deadline,
                    lease_left_s=max(0.0, self.settings.lease_s - (now - tracked.last_seen)),
                )
                for _, tracked in sorted(self.instances.items())
            ],
            pending=sorted(self.pending),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for tracked in self.instances.values():
            if tracked.killer is not None:
                tracked.killer.cancel()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                # nats-py leaves KeyWatcher.stop unannotated.
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        running = [p for p in self.children.values() if p.returncode is None]
        if running:
            self.log.info("fleet.stopping_children", count=len(running))
        await asyncio.gather(
            *(
                self._stop_process(p, kill=False, timeout_s=SHUTDOWN_PROCESS_TIMEOUT_S)
                for p in running
            )
        )
        await cancel_and_wait(self._tasks)


# -- endpoints ---------------------------------------------------------------------------------


def parse_notice(data: bytes, encoding: Encoding) -> PreemptNotice:
    try:
        return PreemptNotice.model_validate(decode(data, encoding))
    except (DecodeError, ValidationError) as exc:
        raise BadRequest(f"bad preempt notice: {exc}") from None


class Endpoints:
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.log = monitor.log

    async def on_notice(self, request: Request) -> None:
        """A raw endpoint: its reply carries the outcome in a header besides the event."""
        encoding = encoding_from_headers(request.headers)
        source = "unknown"
        try:
            notice = parse_notice(request.data, encoding)
            source = notice.source
            outcome, event = await self._apply(notice)
        except RpcError as exc:
            metrics.PREEMPT_NOTICES.labels(source, "rejected").inc()
            await respond_error(request, exc)
            return
        metrics.PREEMPT_NOTICES.labels(source, outcome).inc()
        self.log.info(
            "fleet.notice",
            instance_id=notice.instance_id,
            source=source,
            outcome=outcome,
            deadline=event.deadline,
        )
        headers = {NOTICE_OUTCOME_HEADER: outcome, **content_type_header(encoding)}
        await request.respond(encode(event, encoding), headers=headers)

    async def _apply(self, notice: PreemptNotice) -> tuple[str, FleetEvent]:
        try:
            return await self.monitor.notice(notice)
        except RpcError:
            raise
        except Exception as exc:  # a bug must not take the monitor down
            self.log.exception("fleet.notice_failed")
            raise Internal(f"notice failed: {exc!r}") from None

    async def on_add(self, request: AddInstancesRequest) -> AddInstancesReply:
        return AddInstancesReply(instance_ids=await self.monitor.add(request))

    async def on_status(self, _request: Empty) -> FleetStatus:
        return self.monitor.status()


def observe_instances(monitor: Monitor) -> None:
    """The instances gauge, read when scraped (from the metrics server's thread: copies of the
    dicts the event loop changes)."""

    def count(preempting: bool) -> int:
        tracked = list(monitor.instances.values())
        return sum(1 for t in tracked if (t.notice is not None) == preempting)

    metrics.INSTANCES.labels("running").set_function(lambda: count(preempting=False))
    metrics.INSTANCES.labels("preempting").set_function(lambda: count(preempting=True))
    metrics.INSTANCES.labels("pending").set_function(lambda: len(monitor.pending))


async def serve(context: ServiceContext) -> None:
    settings = context.settings.monitor
    if settings.lease_s <= settings.heartbeat_s:
        context.log.warning(
            "monitor.lease_too_short", lease_s=settings.lease_s, heartbeat_s=settings.heartbeat_s
        )
    monitor = Monitor(context, await instances_bucket(context.js))
    observe_instances(monitor)
    # Rebuild before answering anything: a notice must find the instances already known.
    await monitor.start()
    endpoints = Endpoints(monitor)
    service = await context.add_micro_service(
        "Watches the fleet: instance registry with leases, preemption notices, fleet events",
        metadata={
            "node": monitor.node,
            "lease_s": str(settings.lease_s),
            "local_provider": str(settings.local_provider).lower(),
        },
    )
    await add_raw_endpoint(service, NOTICE_ENDPOINT, endpoints.on_notice)
    await add_endpoint(service, ADD_ENDPOINT, endpoints.on_add, logger=monitor.log)
    await add_endpoint(service, STATUS_ENDPOINT, endpoints.on_status, logger=monitor.log)
    monitor.log.info("monitor.ready", instances=sorted(monitor.instances))
    try:
        await context.stop.wait()
        await service.stop()
    finally:
        await monitor.stop()
