"""Preemption notices. A notice for a tracked instance publishes ``preempt-notice`` with its
deadline; repeats are folded (a later notice publishes an updated event only when it moves the
deadline earlier by more than ``monitor.deadline_update_min_s``). On the local provider the
instance's process is SIGKILLed at the deadline, followed by ``left``. Merge rule: a notice for
an added instance that has not joined yet cancels it, and no event is ever published for it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from services.monitor import metrics
from services.monitor.fleet import Fleet, Pending, Tracked
from services.monitor.processes import LocalProcesses, stop_process
from shared.config import MonitorSettings
from shared.messages import FleetEvent, InstanceRecord, PreemptNotice
from shared.rpc import NotFound
from shared.waiting import cancel_and_wait, supervised


@dataclass
class Notices:
    settings: MonitorSettings
    fleet: Fleet
    processes: LocalProcesses
    log: structlog.stdlib.BoundLogger

    async def apply(self, notice: PreemptNotice) -> tuple[str, FleetEvent]:
        """Apply a notice: (outcome, the event that stands for it)."""
        grace_s = self.settings.grace_s if notice.grace_s is None else notice.grace_s
        async with self.fleet.locked_for_request():
            now = time.time()
            pending = self.fleet.pending.pop(notice.instance_id, None)
            if pending is not None:
                return "cancelled", await self._cancel(notice, pending, now)
            tracked = self._tracked(notice.instance_id)
            return await self._announce(tracked, notice.source, now, now + grace_s)

    def _tracked(self, instance_id: str) -> Tracked:
        tracked = self.fleet.instances.get(instance_id)
        if tracked is None:
            known = ", ".join(sorted(self.fleet.instances)) or "none"
            raise NotFound(f"unknown instance {instance_id!r} (registered: {known})")
        return tracked

    async def _announce(
        self, tracked: Tracked, source: str, now: float, deadline: float
    ) -> tuple[str, FleetEvent]:
        """Publish the notice unless one with this deadline (or an earlier one) stands."""
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
            kind="preempt-notice", instance=tracked.record, at=now, deadline=deadline, source=source
        )
        tracked.notice = await self.fleet.stream.publish(
            "preempt-notice", msg_id, event, retry=False
        )
        self.schedule_kill(tracked)
        return outcome, tracked.notice

    async def _cancel(self, notice: PreemptNotice, pending: Pending, now: float) -> FleetEvent:
        """Merge rule: an added instance that has not joined is stopped, nothing is published."""
        instance_id = notice.instance_id
        self.fleet.cancelled.add(instance_id)
        self.log.info("fleet.add_cancelled", instance_id=instance_id, source=notice.source)
        await stop_process(pending.process, kill=True)
        record = InstanceRecord(
            instance_id=instance_id,
            node=self.processes.node,
            devices=1,
            device_kind="pending",
            device_memory_bytes=0,
            price_class="on-demand" if pending.price_class == "on-demand" else "spot",
            pid=pending.process.pid,
            started_at=pending.requested_wall,
            heartbeat_at=pending.requested_wall,
        )
        return FleetEvent(kind="left", instance=record, at=now, deadline=now, source=notice.source)

    def schedule_kill(self, tracked: Tracked) -> None:
        """On the local provider: the instance's SIGKILL at its deadline (replaces an earlier
        one)."""
        if not self.processes.can_kill(tracked.record):
            return
        if tracked.killer is not None:
            tracked.killer.cancel()
        name = f"kill-{tracked.record.instance_id}"
        tracked.killer = supervised(self._kill_at_deadline(tracked), name, self.log)

    async def _kill_at_deadline(self, tracked: Tracked) -> None:
        assert tracked.deadline is not None
        await asyncio.sleep(max(0.0, tracked.deadline - time.time()))
        async with self.fleet.lock:
            if self.fleet.instances.get(tracked.record.instance_id) is not tracked:
                return  # gone meanwhile
            await self.processes.kill(tracked.record)
            metrics.LOCAL_KILLS.inc()
            await self.fleet.end(tracked, "left", source="local", delete_key=True)

    async def stop(self) -> None:
        """Cancel the scheduled kills and wait until they have ended."""
        await cancel_and_wait(self.fleet.killers())
