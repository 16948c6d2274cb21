"""Replaying a workload and a spot-availability trace against a running cluster, over NATS only.

One run = one serving mode (``policy``): the replayer sets it through the admin endpoint
(``spotserve.v1.admin.mode``) and waits for a plan made under it, brings the fleet to the trace's
first nodes (asking the monitor for more instances, retiring extra ones), then plays, on the
compressed clock (``time_scale``):

- requests: each arrival becomes a streaming generate request with a synthetic prompt of its
  token count and a forced output length (``ignore_eos``); every token's arrival time is kept;
- fleet events: a trace ``add`` asks the monitor for a new instance (``spotserve.v1.fleet.add``,
  the ``fleet add`` path) and maps the trace's node onto it for the rest of the run; a ``remove``
  at t becomes a preemption notice at t - grace (``spotserve.v1.fleet.notice``, the path a cloud
  notice takes); at the deadline the monitor SIGKILLs the instance's process (its local
  provider). The ``ondemand`` policy plays no fleet events and prices every instance on-demand.

The result is a :class:`loadgen.report.RunRecord`; ``loadgen.report`` turns it into report.json.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from pydantic import ValidationError

from loadgen.report import InstanceSpan, RequestRecord, RunRecord
from loadgen.traces import Arrival, FleetTrace, TraceEvent, arrivals_from_spec, scale_lengths
from shared.client import CHUNK_TIMEOUT_S, GenerateError, SpotserveClient
from shared.codec import decode
from shared.discovery import discover
from shared.messages import (
    AddInstancesRequest,
    Empty,
    FleetStatus,
    ModeRequest,
    Plan,
    PreemptNotice,
    ServingMode,
)
from shared.rpc import (
    ADD_ENDPOINT,
    MODE_ENDPOINT,
    NOTICE_ENDPOINT,
    STATUS_ENDPOINT,
    Endpoint,
    NoResponders,
    ReplyT,
    RequestT,
    RpcError,
    RpcTimeout,
    call,
)
from shared.subjects import PLANS_STREAM, PLANS_SUBJECT, SERVICE_ADMISSION
from shared.waiting import wait_until

# Fleet requests wait for the monitor; an added instance may take a while to load its model.
FLEET_REQUEST_TIMEOUT_S = 60.0
# The mode and the fleet's status: quick answers, with room for a busy cluster.
ADMIN_REQUEST_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 300.0
PLAN_TIMEOUT_S = 120.0
# How often a wait for the fleet or for a plan looks again.
POLL_S = 0.5
PROGRESS_INTERVAL_S = 1.0
# What a replay expects of the cluster before any instance is known: the model's context.
DEFAULT_CONTEXT_LENGTH = 2048
# Synthetic prompts draw token ids from here (below any model's vocabulary we ship, above the
# special tokens at the start).
PROMPT_TOKEN_RANGE = (16, 250)
PROGRESS_WIDTH = 30


class ReplayError(RuntimeError):
    """The cluster cannot run this replay (no admission, no planner, a refused fleet request)."""


@dataclass(frozen=True)
class ReplayOptions:
    arrivals: str
    policy: ServingMode = "spotserve"
    fleet: FleetTrace | None = None
    fleet_name: str | None = None
    time_scale: float = 1.0
    duration_s: float | None = None  # trace seconds; None: the fleet trace's, else required
    max_requests: int | None = None
    input_tokens: int = 512
    output_tokens: int = 128
    fit_context: bool = True  # scale request lengths down to the model's context
    grace_s: float = 30.0  # trace seconds between a notice and the instance's end
    seed: int = 0
    # Wall seconds a request may take before it counts as unfinished.
    request_timeout_s: float = 600.0
    # Before the measured run: this many wall seconds of the trace's first arrivals, not
    # recorded, so that every policy starts from a cluster that has seen the load (the
    # planner sizes the fleet from the arrival rate admission measures).
    warmup_s: float = 20.0


@dataclass
class FleetTracker:
    """Trace nodes -> instances, and each instance's span (for the cost)."""

    price_class: str
    node_instance: dict[str, str] = field(default_factory=dict)
    spans: dict[str, InstanceSpan] = field(default_factory=dict)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    preemptions: int = 0

    def up(self, node: str, instance_id: str, at_s: float) -> None:
        self.node_instance[node] = instance_id
        price: Any = self.price_class
        self.spans[instance_id] = InstanceSpan(instance_id, price, start_s=at_s)

    def ends(self, instance_id: str, at_s: float) -> None:
        span = self.spans.get(instance_id)
        if span is not None and span.end_s is None:
            span.end_s = at_s


class Replayer:
    def __init__(
        self,
        nc: Client,
        options: ReplayOptions,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.nc = nc
        self.options = options
        self.client = SpotserveClient(
            nc, first_chunk_timeout_s=options.request_timeout_s, chunk_timeout_s=CHUNK_TIMEOUT_S
        )
        self.progress = progress or (lambda _line: None)
        self._start = 0.0

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> RunRecord:
        options = self.options
        context_length = await self._context_length()
        arrivals = self._arrivals(context_length)
        await self.set_mode(options.policy)
        fleet = FleetTracker("on-demand" if options.policy == "ondemand" else "spot")
        await self._prepare_fleet(fleet)
        await self._warm_up(arrivals)
        plans_before = await self._plan_seq()
        self._start = time.monotonic()
        for span in fleet.spans.values():
            span.start_s = 0.0
        records = [RequestRecord(f"r{i}", a.at_s * options.time_scale, a.input_tokens,
                                 a.output_tokens) for i, a in enumerate(arrivals)]  # fmt: skip
        rng = random.Random(options.seed)
        prompts = [[rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(a.input_tokens)]
                   for a in arrivals]  # fmt: skip
        fleet_task = asyncio.create_task(self._play_fleet(fleet))
        requests = [
            asyncio.create_task(self._play_request(record, prompt))
            for record, prompt in zip(records, prompts, strict=True)
        ]
        watcher = asyncio.create_task(self._report_progress(records))
        try:
            await asyncio.gather(*requests)
        finally:
            watcher.cancel()
            fleet_task.cancel()
            await asyncio.gather(fleet_task, watcher, return_exceptions=True)
        duration = time.monotonic() - self._start
        for span in fleet.spans.values():
            if span.end_s is not None:
                span.end_s = min(span.end_s, duration)
        reconfigurations, migrations = await self._plans_since(plans_before)
        return RunRecord(
            policy=options.policy,
            arrivals=options.arrivals,
            fleet_trace=options.fleet_name,
            time_scale=options.time_scale,
            duration_s=duration,
            requests=records,
            instances=list(fleet.spans.values()),
            preemptions=fleet.preemptions,
            migrations=migrations,
            fleet_events=fleet.events,
            reconfigurations=reconfigurations,
        )

    async def _warm_up(self, arrivals: list[Arrival]) -> None:
        """The first ``warmup_s`` wall seconds of arrivals, played and awaited, not recorded."""
        scale = self.options.time_scale
        early = [a for a in arrivals if a.at_s * scale < self.options.warmup_s]
        if not early:
            return
        self.progress(f"{self.options.policy}: warming up with {len(early)} requests")
        self._start = time.monotonic()
        rng = random.Random(self.options.seed + 1)
        records = [RequestRecord(f"w{i}", a.at_s * scale, a.input_tokens, a.output_tokens)
                   for i, a in enumerate(early)]  # fmt: skip
        await asyncio.gather(*(
            self._play_request(record, [rng.randrange(*PROMPT_TOKEN_RANGE)
                                        for _ in range(record.input_tokens)])
            for record in records
        ))  # fmt: skip

    def now(self) -> float:
        return time.monotonic() - self._start

    def _arrivals(self, context_length: int) -> list[Arrival]:
        options = self.options
        duration = options.duration_s
        if duration is None and options.fleet is not None:
            duration = options.fleet.duration_s
        arrivals = arrivals_from_spec(
            options.arrivals,
            duration_s=duration,
            max_requests=options.max_requests,
            input_tokens=options.input_tokens,
            output_tokens=options.output_tokens,
            seed=options.seed,
        )
        if options.fit_context:
            arrivals = scale_lengths(arrivals, context_tokens=context_length - 1)
        if not arrivals:
            raise ReplayError(f"no requests in {options.arrivals!r} within the replay's duration")
        return arrivals

    # -- requests -------------------------------------------------------------------------------

    async def _play_request(self, record: RequestRecord, prompt: list[int]) -> None:
        await self._sleep_until(record.sent_s)
        record.sent_s = self.now()
        try:
            stream = self.client.stream(
                prompt, max_tokens=record.output_tokens, ignore_eos=True, temperature=0.0
            )
            async for chunk in stream:
                at = self.now()
                record.token_s.extend([at] * len(chunk.token_ids))
                if chunk.finish_reason is not None:
                    record.finish_reason = chunk.finish_reason
        except GenerateError as exc:
            record.error = f"{exc.code}: {exc.message}"
        except (TimeoutError, NatsError) as exc:
            record.error = f"unfinished: {exc!r}"

    async def _report_progress(self, records: list[RequestRecord]) -> None:
        while True:
            done = sum(r.finish_reason is not None or r.error is not None for r in records)
            failed = sum(r.error is not None for r in records)
            filled = PROGRESS_WIDTH * done // max(1, len(records))
            bar = "#" * filled + "-" * (PROGRESS_WIDTH - filled)
            self.progress(
                f"{self.options.policy:>9} [{bar}] {done}/{len(records)} requests"
                f" ({failed} failed) {self.now():.0f} s"
            )
            await asyncio.sleep(PROGRESS_INTERVAL_S)

    async def _sleep_until(self, at_s: float) -> None:
        delay = at_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- fleet ----------------------------------------------------------------------------------

    async def _prepare_fleet(self, fleet: FleetTracker) -> None:
        """The trace's first nodes onto running instances (more asked for when too few); extra
        instances are retired, so that every policy starts from the same fleet."""
        trace = self.options.fleet
        status = await self.fleet_status()
        running = [i.record.instance_id for i in status.instances if i.state == "running"]
        if trace is None:
            for index, instance_id in enumerate(running):
                fleet.up(f"instance-{index}", instance_id, 0.0)
            return
        nodes = trace.initial_nodes
        if len(running) < len(nodes):
            running += await self.add_instances(len(nodes) - len(running), fleet.price_class)
        for node, instance_id in zip(nodes, running, strict=False):
            fleet.up(node, instance_id, 0.0)
        for extra in running[len(nodes) :]:
            await self.notice(extra, 0.0)
        if running[len(nodes) :]:
            await self._wait_fleet(lambda s: not set(running[len(nodes) :]) & _ids(s))

    async def _play_fleet(self, fleet: FleetTracker) -> None:
        trace = self.options.fleet
        if trace is None or self.options.policy == "ondemand":
            return
        scale = self.options.time_scale
        grace = self.options.grace_s
        first = trace.events[0].at_s
        steps: list[tuple[float, TraceEvent]] = []
        for event in trace.events:
            if event.at_s <= first and event.kind == "add":
                continue  # the initial nodes: already mapped
            at = event.at_s - grace if event.kind == "remove" else event.at_s
            steps.append((max(0.0, at - first) * scale, event))
        steps.sort(key=lambda step: step[0])
        adding: list[asyncio.Task[None]] = []  # beside the other events: a request takes a while
        try:
            for at, event in steps:
                await self._sleep_until(at)
                if event.kind == "add":
                    adding.append(asyncio.create_task(self._add_node(fleet, event.node)))
                    continue
                await self._remove_node(fleet, event)
            await asyncio.gather(*adding)
        finally:
            for task in adding:
                task.cancel()

    async def _remove_node(self, fleet: FleetTracker, event: TraceEvent) -> None:
        """The notice for a trace ``remove``: at its time less the grace period (already so)."""
        first = self.options.fleet.events[0].at_s if self.options.fleet else 0.0
        instance_id = fleet.node_instance.get(event.node)
        if instance_id is None:
            return  # its add is still pending or failed: nothing to preempt
        end = (event.at_s - first) * self.options.time_scale
        grace_s = max(0.0, end - self.now())
        await self.notice(instance_id, grace_s)
        fleet.preemptions += 1
        fleet.events.append((self.now(), "notice", instance_id))
        fleet.events.append((self.now() + grace_s, "kill", instance_id))
        fleet.ends(instance_id, self.now() + grace_s)

    async def _add_node(self, fleet: FleetTracker, node: str) -> None:
        try:
            (instance_id,) = await self.add_instances(1, fleet.price_class, wait=False)
        except ReplayError as exc:
            self.progress(f"add {node} failed: {exc}")
            return
        # Paid from the request on, like a cloud instance; it serves once it has joined.
        fleet.up(node, instance_id, self.now())
        fleet.events.append((self.now(), "add", instance_id))

    # -- the cluster's API ----------------------------------------------------------------------

    async def _context_length(self) -> int:
        infos = await discover(self.nc, SERVICE_ADMISSION, window_s=1.0)
        if not infos:
            raise ReplayError("no admission service answers: is the cluster running?")
        metadata = infos[0].get("metadata", {})
        return int(metadata.get("context_length", DEFAULT_CONTEXT_LENGTH))

    async def set_mode(self, mode: ServingMode) -> None:
        """Switch the cluster's serving mode and wait for a plan made under it."""
        body = _request_body(ModeRequest, mode=mode)
        await self._call(MODE_ENDPOINT, body, ADMIN_REQUEST_TIMEOUT_S)

        async def planned_under_mode() -> bool:
            plan = await self.current_plan()
            return plan is not None and plan.mode == mode

        if not await wait_until(planned_under_mode, PLAN_TIMEOUT_S, POLL_S):
            raise ReplayError(f"no plan under mode {mode!r} within {PLAN_TIMEOUT_S:.0f} s")

    async def current_plan(self) -> Plan | None:
        try:
            message = await self.nc.jetstream().get_last_msg(PLANS_STREAM, PLANS_SUBJECT)
        except (NatsError, JetStreamError, TimeoutError):
            return None
        return Plan.model_validate(decode(message.data or b""))

    async def fleet_status(self) -> FleetStatus:
        return await self._call(STATUS_ENDPOINT, Empty(), ADMIN_REQUEST_TIMEOUT_S)

    async def add_instances(self, count: int, price_class: str, wait: bool = True) -> list[str]:
        """New instances from the monitor (``wait``: until they have joined)."""
        body = _request_body(AddInstancesRequest, count=count, price_class=price_class)
        reply = await self._call(ADD_ENDPOINT, body, FLEET_REQUEST_TIMEOUT_S)
        wanted = set(reply.instance_ids)
        if wait:
            await self._wait_fleet(lambda s: wanted <= _ids(s, running_only=True))
        return reply.instance_ids

    async def notice(self, instance_id: str, grace_s: float) -> None:
        body = _request_body(
            PreemptNotice, instance_id=instance_id, grace_s=grace_s, source="trace"
        )
        await self._call(NOTICE_ENDPOINT, body, FLEET_REQUEST_TIMEOUT_S)

    async def _wait_fleet(self, done: Callable[[FleetStatus], bool]) -> None:
        async def reached() -> bool:
            return done(await self.fleet_status())

        if not await wait_until(reached, JOIN_TIMEOUT_S, POLL_S):
            raise ReplayError(f"the fleet did not reach the wanted state in {JOIN_TIMEOUT_S:.0f} s")

    async def _call(
        self, endpoint: Endpoint[RequestT, ReplyT], body: RequestT, timeout_s: float
    ) -> ReplyT:
        subject = endpoint.subject_for()
        try:
            return await call(self.nc, endpoint, body, timeout_s=timeout_s)
        except (NoResponders, RpcTimeout) as exc:  # nobody answered: not a refusal
            raise ReplayError(f"{subject}: {exc!r}") from None
        except RpcError as exc:
            raise ReplayError(f"{subject} refused: [{exc.code}] {exc.message}") from None
        except NatsError as exc:
            raise ReplayError(f"{subject}: {exc!r}") from None

    async def _plan_seq(self) -> int:
        try:
            info = await self.nc.jetstream().stream_info(PLANS_STREAM)
        except (NatsError, JetStreamError, TimeoutError):
            return 0
        return int(info.state.last_seq)

    async def _plans_since(self, seq: int) -> tuple[int, int]:
        """(plans published after stream sequence ``seq``, KV caches those plans migrated)."""
        js = self.nc.jetstream()
        last = await self._plan_seq()
        plans = migrations = 0
        for number in range(seq + 1, last + 1):
            try:
                message = await js.get_msg(PLANS_STREAM, number)
            except (NatsError, JetStreamError, TimeoutError):
                continue
            plan = Plan.model_validate(decode(message.data or b""))
            plans += 1
            migrations += sum(1 for decision in plan.jit if decision.action == "migrate")
        return plans, migrations


def _request_body(model: type[RequestT], **fields: Any) -> RequestT:
    """A request to the cluster; fields it would refuse are the replay's error at once."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ReplayError(f"bad {model.__name__}: {exc}") from None


def _ids(status: FleetStatus, running_only: bool = False) -> set[str]:
    return {
        i.record.instance_id for i in status.instances if not running_only or i.state == "running"
    }


def stderr_progress(line: str) -> None:
    """One progress line, rewritten in place on a terminal (loadgen is a command-line tool)."""
    end = "\r" if sys.stderr.isatty() else "\n"
    sys.stderr.write(line.ljust(78) + end)
    sys.stderr.flush()


def default_out_dir() -> Path:
    return Path("loadgen-out") / time.strftime("%Y%m%d-%H%M%S")
