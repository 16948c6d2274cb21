"""SIGTERM as a preemption notice.

On Kubernetes a spot reclaim (or a node drain) reaches the executor's pod as SIGTERM,
``terminationGracePeriodSeconds`` before SIGKILL. With ``executor.termination_grace_s`` set
to that grace period, the first SIGTERM makes the executor announce its own preemption to the
monitor (``NOTICE_ENDPOINT``, source ``sigterm``, grace = grace - margin), exactly as a cloud
notice would; it leaves the draining marker its readiness check reads
(:func:`shared.health.draining_marker`), keeps serving while the planner moves its requests
away, and stops at the deadline. A second SIGTERM, SIGINT, or a grace within the margin stops
it at once (a clean stop: its registration goes, the monitor sees it leave).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.errors import Error as NatsError

from services.executor import metrics
from shared.health import draining_marker
from shared.messages import PreemptNotice
from shared.rpc import NOTICE_ENDPOINT, RpcError, call
from shared.runtime import ServiceContext
from shared.waiting import sleep_unless_stopped

# Bound on the monitor's answer to the notice (it is the grace period's start that matters:
# the monitor dates the deadline from its receipt).
NOTICE_TIMEOUT_S = 5.0


def notice_grace_s(grace_s: float | None, margin_s: float) -> float:
    """The grace period announced for a SIGTERM: 0 means stop at once (no notice)."""
    return 0.0 if grace_s is None else max(grace_s - margin_s, 0.0)


class Termination:
    """The executor's SIGTERM handler (``ServiceContext.on_sigterm``)."""

    def __init__(self, context: ServiceContext, instance_id: str) -> None:
        self.context = context
        self.instance_id = instance_id
        settings = context.settings.executor
        self.grace_s = notice_grace_s(settings.termination_grace_s, settings.termination_margin_s)
        self.log = context.log.bind(instance_id=instance_id)
        self.task: asyncio.Task[None] | None = None

    def on_sigterm(self) -> None:
        if self.task is not None or self.grace_s <= 0:
            self.log.info("executor.sigterm_stop", draining=self.task is not None)
            self.context.stop.set()
            return
        self.task = asyncio.create_task(self.drain(), name="termination")

    async def drain(self) -> None:
        deadline = time.monotonic() + self.grace_s
        metrics.TERMINATIONS.inc()
        self.log.warning("executor.terminating", grace_s=self.grace_s)
        await asyncio.to_thread(self._mark_draining)
        await self.announce()
        await sleep_unless_stopped(self.context.stop, max(deadline - time.monotonic(), 0.0))
        self.log.info("executor.grace_over")
        self.context.stop.set()

    async def announce(self) -> None:
        notice = PreemptNotice(instance_id=self.instance_id, grace_s=self.grace_s, source="sigterm")
        timeout_s = min(NOTICE_TIMEOUT_S, self.grace_s)
        try:
            event = await call(self.context.nc, NOTICE_ENDPOINT, notice, timeout_s=timeout_s)
        except (RpcError, NatsError, TimeoutError) as exc:
            # Serving on regardless: the monitor learns of the exit from the lease or the
            # registration's removal, and the scheduler recovers from committed tokens.
            self.log.error("executor.notice_failed", error=repr(exc))
            return
        self.log.info("executor.notice_sent", deadline=event.deadline)

    def _mark_draining(self) -> None:
        marker = draining_marker(self.instance_id)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{time.time() + self.grace_s:.3f}\n", encoding="utf-8")

    def clear(self) -> None:
        """Remove the draining marker (a restarted container with the same id is ready)."""
        with contextlib.suppress(OSError):
            draining_marker(self.instance_id).unlink()
