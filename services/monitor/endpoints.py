"""The monitor's endpoints (notice, add, status) and its instances gauge."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from nats.micro.request import Request
from pydantic import ValidationError

from services.monitor import metrics
from services.monitor.fleet import Fleet
from services.monitor.notices import Notices
from services.monitor.processes import LocalProcesses
from shared.codec import DecodeError, content_type_header, decode, encode, encoding_from_headers
from shared.config import MonitorSettings
from shared.messages import (
    NOTICE_OUTCOME_HEADER,
    AddInstancesReply,
    AddInstancesRequest,
    Empty,
    Encoding,
    FleetEvent,
    FleetStatus,
    PreemptNotice,
)
from shared.rpc import BadRequest, Internal, RpcError, respond_error


def parse_notice(data: bytes, encoding: Encoding) -> PreemptNotice:
    try:
        return PreemptNotice.model_validate(decode(data, encoding))
    except (DecodeError, ValidationError) as exc:
        raise BadRequest(f"bad preempt notice: {exc}") from None


@dataclass
class Endpoints:
    settings: MonitorSettings
    fleet: Fleet
    notices: Notices
    processes: LocalProcesses

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        return self.fleet.log

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
            return await self.notices.apply(notice)
        except RpcError:
            raise
        except Exception as exc:  # a bug must not take the monitor down
            self.log.exception("fleet.notice_failed")
            raise Internal(f"notice failed: {exc!r}") from None

    async def on_add(self, request: AddInstancesRequest) -> AddInstancesReply:
        return AddInstancesReply(instance_ids=await self.processes.add(request))

    async def on_status(self, _request: Empty) -> FleetStatus:
        return self.fleet.status(self.settings.lease_s)


def observe_instances(fleet: Fleet) -> None:
    """The instances gauge, read when scraped (from the metrics server's thread: copies of the
    dicts the event loop changes)."""

    def count(preempting: bool) -> int:
        tracked = list(fleet.instances.values())
        return sum(1 for t in tracked if (t.notice is not None) == preempting)

    metrics.INSTANCES.labels("running").set_function(lambda: count(preempting=False))
    metrics.INSTANCES.labels("preempting").set_function(lambda: count(preempting=True))
    metrics.INSTANCES.labels("pending").set_function(lambda: len(fleet.pending))
