"""Following the instance registry (KV bucket ``spotserve-instances``) and its leases.

At start the fleet is rebuilt from the stream's events and the bucket, and only what changed
while no monitor watched is published. Then every update of the bucket is applied as it comes
(a new incarnation joins, a delete ends one) and every ``monitor.check_interval_s`` the leases
are judged on the monitor's own clock, and additions that failed or never joined are dropped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from services.monitor import metrics
from services.monitor.fleet import Fleet, Tracked, incarnation
from services.monitor.notices import Notices
from services.monitor.processes import stop_process
from shared.codec import DecodeError, decode
from shared.config import MonitorSettings
from shared.messages import FleetEvent, FleetEventKind, InstanceRecord
from shared.waiting import cancel_and_wait, supervised

DELETED = (KV_DEL, KV_PURGE)


def replay(events: list[FleetEvent]) -> tuple[dict[str, FleetEvent], set[str]]:
    """From the stored events: the last event of each live incarnation by instance id, and the
    incarnations that have ended."""
    live: dict[str, FleetEvent] = {}
    ended: set[str] = set()
    for event in events:
        key = incarnation(event.instance)
        if event.kind in ("lost", "left"):
            ended.add(key)
            current = live.get(event.instance.instance_id)
            if current is not None and incarnation(current.instance) == key:
                del live[event.instance.instance_id]
        else:
            live[event.instance.instance_id] = event
    return live, ended


@dataclass
class Registry:
    settings: MonitorSettings
    kv: KeyValue
    fleet: Fleet
    notices: Notices
    log: structlog.stdlib.BoundLogger
    # The instance ids whose executors answer over NATS right now (None: leases alone judge).
    answering: Callable[[], Awaitable[set[str]]] | None = None
    _entries: asyncio.Queue[KeyValue.Entry] = field(default_factory=asyncio.Queue, init=False)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list, init=False)
    _watcher: KeyValue.KeyWatcher | None = field(default=None, init=False)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.fleet.loop

    # -- start: rebuild from the stream and the bucket -----------------------------------------

    async def start(self) -> None:
        """Rebuild the state, then follow the bucket. Publishes only what changed meanwhile."""
        events = await self.fleet.stream.read_all()
        live, ended = replay(events)
        self.fleet.ended |= ended
        latest = await self._watch()
        async with self.fleet.lock:
            await self._resume(live, latest)
            for entry in latest.values():
                if entry.operation not in DELETED:
                    await self._on_entry(entry)
        instances = self.fleet.instances
        self.log.info(
            "monitor.rebuilt",
            events=len(events),
            instances=sorted(instances),
            preempting=sorted(k for k, t in instances.items() if t.notice is not None),
        )
        self._tasks = [
            supervised(self._pump(), "registry-pump", self.log),
            supervised(self._follow(), "registry-loop", self.log),
        ]

    async def _watch(self) -> dict[str, KeyValue.Entry]:
        """Start watching the bucket: the latest entry of each key it holds now."""
        self._watcher = await self.kv.watchall()
        latest: dict[str, KeyValue.Entry] = {}
        async for entry in self._watcher:
            if entry is None:
                break
            latest[entry.key] = entry
        return latest

    async def _resume(self, live: dict[str, FleetEvent], latest: dict[str, KeyValue.Entry]) -> None:
        """Track the live incarnations again; end those that went away meanwhile."""
        now = self.loop.time()
        for instance_id, event in live.items():
            tracked = Tracked(event.instance, 0, now)
            if event.kind == "preempt-notice":
                tracked.notice = event
            entry = latest.get(instance_id)
            if entry is not None and self._resume_one(tracked, entry):
                continue
            # Gone while no monitor watched: cleanly (a delete marker) or not.
            clean = entry is not None and entry.operation in DELETED
            kind: FleetEventKind = "left" if clean else tracked.end_kind
            await self.fleet.end(tracked, kind, source="monitor", delete_key=False)

    def _resume_one(self, tracked: Tracked, entry: KeyValue.Entry) -> bool:
        """Track ``tracked`` again if ``entry`` is its record; whether it is."""
        record = self._record(entry)
        if record is None or incarnation(record) != tracked.incarnation:
            return False
        tracked.record, tracked.revision = record, entry.revision or 0
        self.fleet.instances[entry.key] = tracked
        if tracked.notice is not None:
            self.notices.schedule_kill(tracked)
        return True

    def _record(self, entry: KeyValue.Entry) -> InstanceRecord | None:
        if entry.operation in DELETED:
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

    async def _follow(self) -> None:
        """Apply the bucket's updates as they come; judge the leases every check interval."""
        interval = self.settings.check_interval_s
        next_check = self.loop.time() + interval
        while True:
            entry = await self._next_entry(next_check)
            async with self.fleet.lock:
                if entry is not None:
                    await self._on_entry(entry)
                now = self.loop.time()
                if now >= next_check:
                    await self._check(now, late=now - next_check)
                    next_check = self.loop.time() + interval

    async def _next_entry(self, until: float) -> KeyValue.Entry | None:
        """The next update of the bucket, or None when none came by ``until``."""
        try:
            return await asyncio.wait_for(
                self._entries.get(), timeout=max(0.0, until - self.loop.time())
            )
        except TimeoutError:
            return None

    async def _on_entry(self, entry: KeyValue.Entry) -> None:
        key = entry.key
        revision = entry.revision or 0
        tracked = self.fleet.instances.get(key)
        if entry.operation in DELETED:
            if tracked is not None and revision > tracked.revision:
                await self.fleet.end(tracked, "left", source="monitor", delete_key=False)
            return
        record = self._record(entry)
        if record is None:
            return
        if key in self.fleet.cancelled or incarnation(record) in self.fleet.ended:
            # A cancelled addition, or an incarnation already declared gone: not alive for us.
            self.log.info("registry.stale_record_removed", instance_id=key)
            await self.fleet.delete_key(key, revision)
            return
        if tracked is not None and tracked.incarnation == incarnation(record):
            if revision > tracked.revision:
                tracked.record, tracked.revision = record, revision
                tracked.last_seen = self.loop.time()
            return
        if tracked is not None:
            # A new incarnation under the same id: the old one did not say goodbye.
            await self.fleet.end(tracked, tracked.end_kind, source="monitor", delete_key=False)
        await self.fleet.join(record, revision)

    async def _check(self, now: float, late: float) -> None:
        """The periodic check, ``late`` seconds after it was due."""
        # Updates that already arrived count before a lease is judged.
        while not self._entries.empty():
            await self._on_entry(self._entries.get_nowait())
        if late > self.settings.lease_s / 2:
            # This loop itself was held up (not the instances): do not count that.
            self.log.warning("monitor.stalled", seconds=round(late, 3))
            for tracked in self.fleet.instances.values():
                tracked.last_seen += late
        await self._check_leases(now)
        await self._check_pending(now)

    async def _check_leases(self, now: float) -> None:
        expired = [
            tracked
            for tracked in self.fleet.instances.values()
            if now - tracked.last_seen > self.settings.lease_s
        ]
        if not expired:
            return
        # A heartbeat JetStream could not store (a clustered JetStream electing the bucket's
        # leader) is no death: an executor that still answers keeps its lease.
        answering = await self.answering() if self.answering is not None else set()
        for tracked in expired:
            instance_id = tracked.record.instance_id
            silent_s = round(now - tracked.last_seen, 3)
            if instance_id in answering:
                self.log.warning("registry.lease_late_but_answering", instance_id=instance_id)
                tracked.last_seen = now
                continue
            metrics.LEASE_EXPIRATIONS.inc()
            self.log.warning("registry.lease_expired", instance_id=instance_id, silent_s=silent_s)
            await self.fleet.end(tracked, tracked.end_kind, source="monitor", delete_key=True)

    async def _check_pending(self, now: float) -> None:
        """Additions whose process exited, or that did not join in time, are given up."""
        pending_by_id = self.fleet.pending
        for instance_id, pending in list(pending_by_id.items()):
            code = pending.process.returncode
            if code is not None:
                del pending_by_id[instance_id]
                self.log.error(
                    "fleet.add_failed",
                    instance_id=instance_id,
                    exit_code=code,
                    log=str(pending.log_path),
                )
            elif now - pending.requested_at > self.settings.join_timeout_s:
                del pending_by_id[instance_id]
                self.fleet.cancelled.add(instance_id)
                self.log.error("fleet.add_timed_out", instance_id=instance_id)
                await stop_process(pending.process, kill=True)

    async def stop(self) -> None:
        """Stop following the bucket."""
        for task in self._tasks:
            task.cancel()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                # nats-py leaves KeyWatcher.stop unannotated.
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        await cancel_and_wait(self._tasks)
