"""The fleet as the monitor sees it: the instances it tracks (one incarnation each), the
additions that have not joined yet, the incarnations that have ended, and the ``joined`` and
end (``left``/``lost``) events that change it. One lock guards it all: every change publishes
its event while holding it, so the events keep the order the monitor decided them in."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from nats.errors import Error as NatsError
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.monitor.events import FleetStream
from shared.messages import FleetEvent, FleetEventKind, FleetStatus, InstanceRecord, InstanceStatus
from shared.rpc import Unavailable
from shared.runtime import ServiceContext


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

    @property
    def end_kind(self) -> FleetEventKind:
        """How this incarnation's end is announced: ``left`` after a notice, else ``lost``."""
        return "left" if self.notice is not None else "lost"


@dataclass
class Pending:
    """An instance `fleet add` started that has not registered yet."""

    process: asyncio.subprocess.Process
    requested_at: float  # monotonic
    requested_wall: float
    price_class: str = "spot"
    log_path: Path = field(default_factory=Path)


class Fleet:
    def __init__(
        self, context: ServiceContext, kv: KeyValue, log: structlog.stdlib.BoundLogger
    ) -> None:
        self.kv = kv
        self.log = log
        self.request_timeout_s = context.settings.nats.request_timeout_s
        self.stream = FleetStream(context, log)
        self.loop = asyncio.get_running_loop()
        self.instances: dict[str, Tracked] = {}
        # Incarnations with a lost/left event: they never come back under the same name.
        self.ended: set[str] = set()
        self.pending: dict[str, Pending] = {}
        # Added instances cancelled by a notice before they joined: never an event for them.
        self.cancelled: set[str] = set()
        self.lock = asyncio.Lock()

    async def join(self, record: InstanceRecord, revision: int) -> None:
        event = FleetEvent(kind="joined", instance=record, at=time.time())
        await self.stream.publish("joined", f"{incarnation(record)}:joined", event, retry=True)
        self.instances[record.instance_id] = Tracked(record, revision, self.loop.time())
        self.pending.pop(record.instance_id, None)

    async def end(
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
        await self.stream.publish(kind, f"{tracked.incarnation}:end", event, retry=True)
        self.ended.add(tracked.incarnation)
        if self.instances.get(tracked.record.instance_id) is tracked:
            del self.instances[tracked.record.instance_id]
        if delete_key:
            await self.delete_key(tracked.record.instance_id, tracked.revision)

    async def delete_key(self, key: str, revision: int) -> None:
        """Remove a record that is no longer alive (unless it has been re-put since)."""
        try:
            await self.kv.delete(key, last=revision)
        except KeyWrongLastSequenceError:
            pass  # a newer put: the watcher handles it
        except (NatsError, TimeoutError) as exc:
            self.log.warning("registry.delete_failed", instance_id=key, error=repr(exc))

    @contextlib.asynccontextmanager
    async def locked_for_request(self) -> AsyncIterator[None]:
        """The lock for a request handler: a bounded wait (the lock may be held by a publish
        that waits for JetStream), then 503 instead of a silent timeout."""
        try:
            await asyncio.wait_for(self.lock.acquire(), timeout=self.request_timeout_s)
        except TimeoutError:
            raise Unavailable("the monitor is busy (is JetStream reachable?); retry") from None
        try:
            yield
        finally:
            self.lock.release()

    def killers(self) -> list[asyncio.Task[None]]:
        """The deadline kills scheduled for the tracked instances."""
        return [t.killer for t in self.instances.values() if t.killer is not None]

    def status(self, lease_s: float) -> FleetStatus:
        now = self.loop.time()
        return FleetStatus(
            instances=[
                InstanceStatus(
                    record=tracked.record,
                    state="preempting" if tracked.notice is not None else "running",
                    deadline=tracked.deadline,
                    lease_left_s=max(0.0, lease_s - (now - tracked.last_seen)),
                )
                for _, tracked in sorted(self.instances.items())
            ],
            pending=sorted(self.pending),
        )
