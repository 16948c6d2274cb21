"""Scheduler: consumes accepted requests, runs iteration-level batches on the executors,
commits every token to JetStream and only then forwards it to the client.

Loops, all bounded:
- consume: pulls from the REQUESTS stream while fewer than ``max_inflight_requests`` are held
  (a request is acked only when it has finished, so a crash loses nothing);
- one loop per executor instance: schedule -> step request -> tokens;
- publish: commits each iteration's chunks (JetStream), then forwards them — overlapped with
  the executor's next iteration;
- keepalive: in-progress acks for the requests held; discovery: finds executors via $SRV.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from pydantic import ValidationError

from services.scheduler import metrics
from services.scheduler.kvmemory import apply_after_step, apply_before_step, plan_memory
from services.scheduler.mlfq import SkipJoinMlfqPolicy
from services.scheduler.policy import ExecutorView, SchedulerPolicy, StepOutput, make_policy
from services.scheduler.reconfigure import (
    BoundRequest,
    PlannedMove,
    carries_cache,
    least_loaded,
    move_due,
    moves_by_instance,
    planned_moves,
    restarts,
    restarts_lost_requests,
    serves,
)
from services.scheduler.sequence import Sequence
from shared.codec import DecodeError, content_type_header, decode, encode
from shared.config import ConfigurationError, SchedulerSettings
from shared.messages import (
    AcceptedRequest,
    ErrorCode,
    ErrorDetail,
    ErrorReply,
    InflightReport,
    KvAdoptCommand,
    KvMigrateCommand,
    Plan,
    ReleaseCommand,
    StepCommand,
    StepResult,
    TokenChunk,
)
from shared.model.profile import find_profile, load_profile
from shared.model.tokenizer import TextTokenizer
from shared.runtime import (
    ServiceContext,
    discover,
    follow_plans,
    read_committed_chunks,
    resolve_model,
)
from shared.subjects import (
    REQUESTS_STREAM,
    REQUESTS_SUBJECT,
    SCHEDULER_CONSUMER,
    SCHEDULER_INFLIGHT,
    SERVICE_EXECUTOR,
    executor_adopt_subject,
    executor_migrate_subject,
    executor_release_subject,
    executor_step_subject,
    scheduler_consumer_config,
    tokens_subject,
)

OUTBOX_ITERATIONS = 4
# An executor missing from this many discoveries in a row is considered gone.
MISSED_DISCOVERIES_LIMIT = 3


class StepFailedError(Exception):
    def __init__(self, message: str, executor_lost: bool) -> None:
        super().__init__(message)
        self.executor_lost = executor_lost


# How often an iteration in flight checks whether NATS reconnected meanwhile.
RECONNECT_POLL_S = 0.5


@dataclass
class ExecutorHandle:
    view: ExecutorView
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending_release: list[str] = field(default_factory=list)
    # The first command to an executor frees whatever an earlier scheduler left there.
    release_all: bool = True
    missed_discoveries: int = 0
    # Set when the executor is considered dead: an in-flight step stops waiting for it.
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # Requests a plan moves off this executor -> when they move (whichever comes first).
    moves: dict[str, PlannedMove] = field(default_factory=dict)
    # The restart baseline: drop everything here before the next iteration.
    restart: bool = False


@dataclass
class IterationOutput:
    chunks: list[tuple[Sequence, TokenChunk]]


class Scheduler:
    def __init__(
        self, context: ServiceContext, tokenizer: TextTokenizer, policy: SchedulerPolicy
    ) -> None:
        self.context = context
        self.settings = context.settings.scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = tokenizer.eos_token_ids
        self.policy = policy
        self.log = context.log
        self.held: dict[str, Sequence] = {}
        self.executors: dict[str, ExecutorHandle] = {}
        self.outbox: asyncio.Queue[IterationOutput] = asyncio.Queue(maxsize=OUTBOX_ITERATIONS)
        self.capacity = asyncio.Event()
        self.plan: Plan | None = None

    # ---- acting on the planner's plans ----

    async def apply_plan(self, plan: Plan) -> None:
        """New requests go only to instances with a role; the just-in-time arrangement says
        which requests on dying instances move, and after how many more tokens. (Plans come
        through shared.runtime.follow_plans: newer epochs only; without a planner, none come
        and every executor serves.)"""
        previous, self.plan = self.plan, plan
        metrics.PLAN_EPOCH.set(plan.epoch)
        for instance_id, handle in self.executors.items():
            handle.view = replace(handle.view, accepts_new=serves(plan, instance_id))
        restarting = restarts(plan, previous, self.executors)
        if plan.mode == "restart" and restarting:
            self.log.info("plan.restart_everything", epoch=plan.epoch)
        for instance_id in restarting:
            handle = self.executors[instance_id]
            handle.restart = True
            handle.moves.clear()
            handle.wake.set()
        bound = [
            BoundRequest(s.request_id, s.executor, len(s.generated)) for s in self.held.values()
        ]
        moves = planned_moves(plan, bound)
        for instance_id, group in moves_by_instance(moves, bound).items():
            if instance_id in self.executors:
                self.executors[instance_id].moves.update(group)
        moved = sum(1 for d in plan.jit if d.request_id in moves and d.action != "finish")
        self.log.info(
            "plan.applied",
            epoch=plan.epoch,
            serving=sorted({role.instance_id for role in plan.roles}),
            moving=moved,
        )
        for handle in self.executors.values():
            handle.wake.set()

    def _restart_on(self, handle: ExecutorHandle) -> None:
        handle.restart = False
        handle.release_all = True
        handle.pending_release = []
        restarted = self.policy.requeue_executor(handle.view.instance_id)
        for sequence in restarted:
            sequence.restart_from_scratch()
        metrics.RESTARTS.inc(len(restarted))
        self.log.info(
            "requests.restarted",
            instance_id=handle.view.instance_id,
            request_ids=[sequence.request_id for sequence in restarted],
        )
        for other in self.executors.values():
            other.wake.set()

    async def _apply_moves(self, handle: ExecutorHandle) -> None:
        """Between two iterations of ``handle``: move off the requests whose time has come,
        with their KV cache when the plan says "migrate", else to be recomputed elsewhere."""
        if not handle.moves:
            return  # the per-iteration path: nothing to do outside reconfigurations
        here = handle.view.instance_id
        now = time.time()  # move_by is the planner's wall clock: same host or NTP-synced
        for request_id, move in list(handle.moves.items()):
            sequence = self.held.get(request_id)
            if sequence is None or sequence.finished or sequence.executor != here:
                del handle.moves[request_id]
                continue
            if not move_due(move, len(sequence.generated), now):
                continue
            del handle.moves[request_id]
            destination = self._least_loaded_server(exclude=here)
            carried = False
            if carries_cache(move, self.plan, destination, sequence.kv_location != "none"):
                assert destination is not None
                carried = await self._carry_cache(sequence, here, destination)
            if carried:
                assert destination is not None
                self.policy.rebind(sequence, destination)
                sequence.kv_location = "host"  # adopted into host memory; uploaded to run
                self.executors[destination].wake.set()
            else:
                self.policy.requeue(sequence)
                handle.pending_release.append(request_id)
                for other in self.executors.values():
                    other.wake.set()
            metrics.MOVES.labels("kv_migration" if carried else "recompute").inc()
            self.log.info(
                "request.moved",
                request_id=request_id,
                source=here,
                destination=destination if carried else None,
                with_cache=carried,
                generated=len(sequence.generated),
            )

    def _least_loaded_server(self, exclude: str) -> str | None:
        serving = [
            instance_id
            for instance_id, handle in self.executors.items()
            if instance_id != exclude and handle.view.accepts_new and not handle.gone.is_set()
        ]
        return least_loaded(serving, (s.executor for s in self.held.values()))

    async def _carry_cache(self, sequence: Sequence, source: str, destination: str) -> bool:
        """Move a request's KV cache source -> destination, peer to peer; False if anything
        failed (the request then recomputes its cache instead: nothing is lost)."""
        transfer_id = f"kv-{sequence.request_id}-{uuid.uuid4().hex[:8]}"
        adopt = KvAdoptCommand(request_id=sequence.request_id, transfer_id=transfer_id)
        migrate = KvMigrateCommand(
            request_id=sequence.request_id, destination=destination, transfer_id=transfer_id
        )
        timeout = self.settings.step_timeout_s
        adopting = asyncio.create_task(
            self.context.nc.request(
                executor_adopt_subject(destination), encode(adopt), timeout=timeout
            )
        )
        try:
            sent = await self.context.nc.request(
                executor_migrate_subject(source), encode(migrate), timeout=timeout
            )
            if ERROR_CODE_HEADER in (sent.headers or {}):
                adopting.cancel()  # nothing is coming: do not wait for the receiver's timeout
                self.log.warning(
                    "kv.move_refused",
                    request_id=sequence.request_id,
                    error=(sent.headers or {}).get(ERROR_HEADER),
                )
                return False
            adopted = await adopting
        except (TimeoutError, NatsError) as exc:
            adopting.cancel()
            self.log.warning("kv.move_failed", request_id=sequence.request_id, error=repr(exc))
            return False
        for reply in (adopted, sent):
            headers = reply.headers or {}
            if ERROR_CODE_HEADER in headers:
                self.log.warning(
                    "kv.move_refused",
                    request_id=sequence.request_id,
                    error=headers.get(ERROR_HEADER),
                )
                return False
        return True

    async def on_inflight(self, request: Request) -> None:
        """nats.micro handler: the requests held now, with where their KV caches are."""
        report = InflightReport(
            sequences=[s.inflight() for s in self.held.values() if not s.finished]
        )
        await request.respond(encode(report))

    # ---- consuming accepted requests ----

    async def consume(self) -> None:
        subscription = await self.context.js.pull_subscribe(
            REQUESTS_SUBJECT,
            durable=SCHEDULER_CONSUMER,
            stream=REQUESTS_STREAM,
            config=scheduler_consumer_config(
                self.settings.ack_wait_s, self.settings.max_inflight_requests
            ),
        )
        try:
            await self._consume_from(subscription)
        finally:
            # A pull subscription nobody reads would hold up the connection's drain.
            await subscription.unsubscribe()

    async def _consume_from(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self.context.stop.is_set():
            room = self.settings.max_inflight_requests - len(self.held)
            if room <= 0:
                self.capacity.clear()
                await wait_event(self.capacity, 1.0)
                continue
            try:
                messages = await subscription.fetch(
                    batch=min(room, 32), timeout=self.settings.fetch_timeout_s
                )
            except TimeoutError:
                continue
            except (NatsError, JetStreamError) as exc:
                self.log.warning("consume.fetch_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            for message in messages:
                await self._take(message)

    async def _take(self, message: Msg) -> None:
        try:
            request = AcceptedRequest.model_validate(decode(message.data))
        except (DecodeError, ValidationError) as exc:
            # Admission validated it; an unreadable record will never become readable.
            self.log.error("consume.bad_record", error=str(exc))
            await message.term()
            return
        if request.request_id in self.held:
            return  # a redelivery of a request we are already running
        redelivered = message.metadata.num_delivered > 1
        metrics.RECEIVED.labels("redelivered" if redelivered else "first").inc()
        committed = []
        if redelivered:
            committed = await self._read_committed(request.request_id)
        sequence = Sequence.create(request, message, self.tokenizer, committed)
        log = self.log.bind(request_id=request.request_id)
        if committed:
            await self._resend_committed(sequence, committed)
        if sequence.finished:
            log.info("request.already_finished")
            await message.ack()
            return
        log.info("request.scheduled", resumed_tokens=len(sequence.generated))
        self.held[request.request_id] = sequence
        self.policy.add_request(sequence)
        for executor in self.executors.values():
            executor.wake.set()

    async def _resend_committed(self, sequence: Sequence, committed: list[TokenChunk]) -> None:
        """The scheduler before us may have died between committing and forwarding: send the
        committed chunks (or the finished result) again; clients drop indices they have seen,
        and a request/reply client only ever reads the first reply."""
        request = sequence.request
        if not request.reply_subject:
            return
        try:
            if request.stream:
                for chunk in committed:
                    await self._send(request.reply_subject, chunk, request.encoding)
            elif sequence.finished:
                await self._send(request.reply_subject, sequence.result(), request.encoding)
        except NatsError as exc:
            self.log.warning("resend.failed", request_id=request.request_id, error=repr(exc))

    async def _read_committed(self, request_id: str) -> list[TokenChunk]:
        """The chunks an earlier scheduler committed for this request, in order."""
        return await read_committed_chunks(
            self.context.js, request_id, timeout_s=self.settings.step_timeout_s
        )

    # ---- executors ----

    async def discover_executors(self) -> None:
        while not self.context.stop.is_set():
            try:
                infos = await discover(self.context.nc, SERVICE_EXECUTOR)
            except NatsError as exc:
                self.log.warning("discovery.failed", error=repr(exc))
                infos = []
            seen = set()
            for info in infos:
                metadata = info.get("metadata") or {}
                instance_id = metadata.get("instance_id")
                if not instance_id:
                    continue
                seen.add(instance_id)
                if instance_id not in self.executors:
                    self._add_executor(instance_id, metadata)
                self.executors[instance_id].missed_discoveries = 0
            for instance_id, handle in list(self.executors.items()):
                if instance_id not in seen:
                    handle.missed_discoveries += 1
                    if handle.missed_discoveries >= MISSED_DISCOVERIES_LIMIT:
                        self._drop_executor(instance_id, "missing from discovery")
            await wait_event(self.context.stop, self.settings.discovery_interval_s)

    def _add_executor(self, instance_id: str, metadata: dict[str, str]) -> None:
        kv_slots = max(1, int(metadata.get("max_slots", 1)))
        view = ExecutorView(
            instance_id=instance_id,
            max_batch_size=min(self.settings.max_batch_size, kv_slots),
            kv_slots=kv_slots,
            host_slots=max(0, int(metadata.get("host_kv_slots", 0))),
            accepts_new=serves(self.plan, instance_id),
        )
        handle = ExecutorHandle(view=view)
        handle.task = asyncio.create_task(self._executor_loop(handle))
        self.executors[instance_id] = handle
        handle.wake.set()
        self.log.info("executor.joined", instance_id=instance_id, max_batch=view.max_batch_size)

    def _drop_executor(self, instance_id: str, reason: str) -> None:
        handle = self.executors.pop(instance_id, None)
        if handle is None:
            return
        handle.gone.set()
        handle.wake.set()
        lost = self.policy.requeue_executor(instance_id)
        if restarts_lost_requests(self.plan):
            for sequence in lost:
                sequence.restart_from_scratch()
            metrics.RESTARTS.inc(len(lost))
        self.log.warning(
            "executor.lost", instance_id=instance_id, reason=reason, requeued=len(lost)
        )
        for other in self.executors.values():
            other.wake.set()

    async def _executor_loop(self, handle: ExecutorHandle) -> None:
        while not handle.gone.is_set() and not self.context.stop.is_set():
            planned = time.perf_counter()
            if handle.restart:
                self._restart_on(handle)
            await self._apply_moves(handle)
            batch = self.policy.schedule(handle.view)
            if not batch:
                if handle.pending_release:
                    await self._release(handle)
                handle.wake.clear()
                await wait_event(handle.wake, 1.0)
                continue
            plan = plan_memory(handle.view, batch, self.policy.priority_order(handle.view))
            command = StepCommand(
                sequences=[sequence.step_input() for sequence in batch],
                release=[*handle.pending_release, *(s.request_id for s in plan.drop)],
                release_all=handle.release_all,
                offload=[sequence.request_id for sequence in plan.offload],
                upload=[sequence.request_id for sequence in plan.upload],
                prefetch=[sequence.request_id for sequence in plan.prefetch],
            )
            handle.pending_release = []
            handle.release_all = False
            apply_before_step(plan)
            metrics.BATCH_SIZE.observe(len(batch))
            for action, moved in (
                ("offload", plan.offload),
                ("upload", plan.upload),
                ("prefetch", plan.prefetch),
                ("drop", plan.drop),
            ):
                if moved:
                    metrics.KV_SWAPS.labels(action).inc(len(moved))
            sent = time.perf_counter()
            try:
                result = await self._step_unless_gone(handle, command)
            except StepFailedError as exc:
                await self._on_step_failed(handle, batch, exc)
                continue
            received = time.perf_counter()
            metrics.ITERATION.observe(received - sent)
            apply_after_step(plan)
            await self._apply(handle, batch, result)
            # The scheduler's own time for this iteration, outside the executor.
            overhead_s = sent - planned + time.perf_counter() - received
            metrics.OVERHEAD.observe(overhead_s)
            self.log.debug(
                "step.done",
                instance_id=handle.view.instance_id,
                batch=len(batch),
                offloaded=len(plan.offload),
                uploaded=len(plan.upload) + len(plan.prefetch),
                dropped=len(plan.drop),
                compute_ms=round(result.compute_s * 1000, 2),
                round_trip_ms=round((received - sent) * 1000, 2),
                scheduler_ms=round(overhead_s * 1000, 3),
            )

    async def _step_unless_gone(self, handle: ExecutorHandle, command: StepCommand) -> StepResult:
        """The step's reply, or StepFailedError as soon as discovery declares the executor dead
        (a request to a killed process would otherwise wait for the whole step timeout)."""
        step = asyncio.create_task(self._step(handle.view.instance_id, command))
        gone = asyncio.create_task(handle.gone.wait())
        reconnects = self.context.nc.stats["reconnects"]
        reconnected = asyncio.create_task(self._reconnect_after(reconnects))
        try:
            await asyncio.wait({step, gone, reconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            reconnected.cancel()
        if not step.done():
            step.cancel()
            if handle.gone.is_set():
                raise StepFailedError("executor gone during the step", executor_lost=True)
            # A reply sent while NATS was away is lost for good (core NATS does not redeliver):
            # recover now (recompute from the committed tokens), not after the step timeout.
            raise StepFailedError("NATS reconnected during the step", executor_lost=False)
        return step.result()

    async def _reconnect_after(self, reconnects: int) -> None:
        """Returns once the NATS connection has reconnected (again) since ``reconnects``."""
        # The counter belongs to nats-py's client (no event to wait on): polled, slowly.
        while self.context.nc.stats["reconnects"] == reconnects:  # noqa: ASYNC110
            await asyncio.sleep(RECONNECT_POLL_S)

    async def _step(self, instance_id: str, command: StepCommand) -> StepResult:
        try:
            reply = await self.context.nc.request(
                executor_step_subject(instance_id),
                encode(command),
                timeout=self.settings.step_timeout_s,
            )
        except NoRespondersError:
            raise StepFailedError("executor has no responders", executor_lost=True) from None
        except TimeoutError:
            raise StepFailedError("step timed out", executor_lost=True) from None
        except NatsError as exc:
            raise StepFailedError(f"step request failed: {exc!r}", executor_lost=False) from None
        headers = reply.headers or {}
        if ERROR_CODE_HEADER in headers:
            raise StepFailedError(
                f"executor error {headers[ERROR_CODE_HEADER]}: {headers.get(ERROR_HEADER)}",
                executor_lost=False,
            )
        try:
            return StepResult.model_validate(decode(reply.data))
        except (DecodeError, ValidationError) as exc:
            raise StepFailedError(f"bad step reply: {exc}", executor_lost=False) from None

    async def _on_step_failed(
        self, handle: ExecutorHandle, batch: list[Sequence], exc: StepFailedError
    ) -> None:
        instance_id = handle.view.instance_id
        self.log.warning("step.failed", instance_id=instance_id, error=str(exc))
        metrics.STEP_FAILURES.labels("true" if exc.executor_lost else "false").inc()
        # Whatever the executor holds is suspect (a swap may have half happened): free all of
        # it and let every sequence bound there recompute from its committed tokens.
        handle.release_all = True
        handle.pending_release = []
        for sequence in batch:
            sequence.failed_steps += 1
            if sequence.failed_steps > self.settings.max_step_retries:
                self.policy.remove(sequence)
                await self._fail(sequence, f"generation failed after repeated errors: {exc}")
        if exc.executor_lost:
            self._drop_executor(instance_id, str(exc))
            return
        for sequence in self.policy.requeue_executor(instance_id):
            sequence.lose_cache()
        await asyncio.sleep(0.2)

    async def _apply(
        self, handle: ExecutorHandle, batch: list[Sequence], result: StepResult
    ) -> None:
        chunks: list[tuple[Sequence, TokenChunk]] = []
        for sequence in batch:
            token_id = result.tokens.get(sequence.request_id)
            if token_id is None:
                self.log.error("step.missing_token", request_id=sequence.request_id)
                continue
            chunk = sequence.append(token_id, self.eos_token_ids)
            if chunk is not None:
                chunks.append((sequence, chunk))
            else:
                metrics.REPLAYED_TOKENS.inc()
            if sequence.finished:
                handle.pending_release.append(sequence.request_id)
        self.policy.update_from_output(
            StepOutput(instance_id=handle.view.instance_id, batch=batch, compute_s=result.compute_s)
        )
        # Bounded: if committing falls behind, the executor loops wait here.
        await self.outbox.put(IterationOutput(chunks=chunks))

    async def _release(self, handle: ExecutorHandle) -> None:
        request_ids, handle.pending_release = handle.pending_release, []
        try:
            await self.context.nc.request(
                executor_release_subject(handle.view.instance_id),
                encode(ReleaseCommand(request_ids=request_ids)),
                timeout=self.settings.step_timeout_s,
            )
        except (NatsError, TimeoutError) as exc:
            self.log.warning("release.failed", error=repr(exc))

    # ---- committing and forwarding ----

    async def publish(self) -> None:
        """Commit each iteration's chunks, then forward them; in iteration order."""
        while True:
            output = await self.outbox.get()
            await self._commit(output)
            for sequence, chunk in output.chunks:
                await self._forward(sequence, chunk)
            self.outbox.task_done()

    async def _commit(self, output: IterationOutput) -> None:
        delay = 0.1
        while True:
            try:
                await asyncio.gather(
                    *(
                        self.context.js.publish(
                            tokens_subject(chunk.request_id),
                            encode(chunk),
                            # Idempotent on retry: JetStream drops the duplicate.
                            headers={"Nats-Msg-Id": f"{chunk.request_id}.{chunk.index}"},
                            timeout=self.context.settings.nats.request_timeout_s,
                        )
                        for _, chunk in output.chunks
                    )
                )
                return
            except (TimeoutError, NatsError, JetStreamError) as exc:
                # Never forward a token that is not durable: wait for JetStream to come back.
                self.log.warning("commit.retry", error=repr(exc), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _forward(self, sequence: Sequence, chunk: TokenChunk) -> None:
        request = sequence.request
        self._observe_forward(sequence, chunk)
        try:
            if request.reply_subject and request.stream:
                await self._send(request.reply_subject, chunk, request.encoding)
            if chunk.finish_reason is not None:
                if request.reply_subject and not request.stream:
                    await self._send(request.reply_subject, sequence.result(), request.encoding)
                await self._finish(sequence)
        except NatsError as exc:
            # The token is committed; a client that missed it can read the TOKENS stream.
            self.log.warning("forward.failed", request_id=request.request_id, error=repr(exc))

    @staticmethod
    def _observe_forward(sequence: Sequence, chunk: TokenChunk) -> None:
        """Metrics of a committed chunk about to be forwarded."""
        now = time.monotonic()
        if chunk.index == 0:
            # Admission's wall clock (accepted_at) to the scheduler's: synchronized clocks.
            latency = time.time() - sequence.request.accepted_at
            metrics.TIME_TO_FIRST_TOKEN.observe(max(0.0, latency))
        elif sequence.forwarded_at is not None:
            metrics.INTER_TOKEN.observe(now - sequence.forwarded_at)
        sequence.forwarded_at = now
        metrics.GENERATED_TOKENS.inc(len(chunk.token_ids))

    async def _send(self, subject: str, body: object, encoding: str) -> None:
        enc = "json" if encoding == "json" else "msgpack"
        await self.context.nc.publish(subject, encode(body, enc), headers=content_type_header(enc))

    async def _finish(self, sequence: Sequence) -> None:
        await sequence.message.ack()
        self.held.pop(sequence.request_id, None)
        self.capacity.set()
        metrics.REQUESTS.labels(sequence.finish_reason or "stop").inc()
        # Admission's wall clock (accepted_at) to the scheduler's: synchronized clocks.
        latency = time.time() - sequence.request.accepted_at
        metrics.END_TO_END.observe(max(0.0, latency))
        self.context.log.info(
            "request.finished",
            request_id=sequence.request_id,
            finish_reason=sequence.finish_reason,
            completion_tokens=len(sequence.generated),
        )

    async def _fail(self, sequence: Sequence, message: str) -> None:
        request = sequence.request
        self.log.error("request.failed", request_id=request.request_id, reason=message)
        if request.reply_subject:
            enc = "json" if request.encoding == "json" else "msgpack"
            body = ErrorReply(
                error=ErrorDetail(
                    code=str(ErrorCode.INTERNAL), message=message, request_id=request.request_id
                )
            )
            headers = content_type_header(enc) | {
                ERROR_CODE_HEADER: str(ErrorCode.INTERNAL),
                ERROR_HEADER: message,
            }
            await self.context.nc.publish(request.reply_subject, encode(body, enc), headers=headers)
        # Terminal: the request will not be retried by JetStream either.
        await sequence.message.term()
        self.held.pop(request.request_id, None)
        self.capacity.set()
        metrics.REQUESTS.labels("error").inc()

    # ---- keeping held requests alive ----

    async def keepalive(self) -> None:
        interval = self.settings.ack_wait_s / 3
        while not self.context.stop.is_set():
            await wait_event(self.context.stop, interval)
            for sequence in list(self.held.values()):
                try:
                    await sequence.message.in_progress()
                except NatsError as exc:
                    self.log.warning("keepalive.failed", error=repr(exc))

    async def release_held(self) -> None:
        """On shutdown: hand unfinished requests back to JetStream for the next scheduler."""
        for sequence in list(self.held.values()):
            try:
                await sequence.message.nak()
            except NatsError:
                pass


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout_s)
    except TimeoutError:
        return False
    return True


def observe_gauges(scheduler: Scheduler) -> None:
    """Gauges read when scraped (from the metrics server's thread: single reads only, and
    copies of the dicts the event loop changes)."""

    def held() -> list[Sequence]:
        return [s for s in list(scheduler.held.values()) if not s.finished]

    metrics.HELD.set_function(lambda: len(held()))
    metrics.WAITING.set_function(lambda: sum(1 for s in held() if s.executor is None))
    metrics.RUNNING.set_function(lambda: sum(1 for s in held() if s.executor is not None))
    metrics.EXECUTORS.set_function(lambda: len(scheduler.executors))
    policy = scheduler.policy
    if isinstance(policy, SkipJoinMlfqPolicy):
        for level in range(policy.settings.num_queues):
            metrics.MLFQ_QUEUE.labels(str(level)).set_function(partial(policy.queue_length, level))


def build_policy(settings: SchedulerSettings, model_dir: Path) -> SchedulerPolicy:
    if settings.policy != "skip-join-mlfq":
        return make_policy(settings.policy)
    path = settings.profile_path or find_profile(model_dir)
    profile = load_profile(path) if path else None
    if profile is None:
        raise ConfigurationError(
            f"policy skip-join-mlfq needs a timing profile of {model_dir}: run `spotserve profile"
            f" --model {model_dir}` (or set SPOTSERVE_SCHEDULER__PROFILE_PATH)"
        )
    return make_policy(settings.policy, settings.mlfq, profile.prefill_time_s)


async def serve(context: ServiceContext) -> None:
    model_dir = await resolve_model(context)
    tokenizer = await asyncio.to_thread(TextTokenizer.from_model_dir, model_dir)
    policy = await asyncio.to_thread(build_policy, context.settings.scheduler, model_dir)
    scheduler = Scheduler(context, tokenizer, policy)
    observe_gauges(scheduler)
    service = await context.add_micro_service(
        "Batches accepted requests at iteration level and streams their tokens",
        metadata={"policy": context.settings.scheduler.policy},
    )
    await service.add_endpoint(
        name="inflight", subject=SCHEDULER_INFLIGHT, handler=scheduler.on_inflight
    )
    loops = [
        asyncio.create_task(scheduler.consume(), name="consume"),
        asyncio.create_task(scheduler.discover_executors(), name="discover"),
        asyncio.create_task(scheduler.keepalive(), name="keepalive"),
        asyncio.create_task(follow_plans(context, scheduler.apply_plan), name="plans"),
    ]
    publisher = asyncio.create_task(scheduler.publish(), name="publish")
    context.log.info("scheduler.ready", policy=context.settings.scheduler.policy)
    started = time.monotonic()
    await context.stop.wait()
    context.log.info("scheduler.stopping", uptime_s=round(time.monotonic() - started, 1))
    for handle in scheduler.executors.values():
        handle.wake.set()
    executor_tasks = [h.task for h in scheduler.executors.values() if h.task is not None]
    await asyncio.wait(loops + executor_tasks, timeout=10.0)
    # Commit and forward what was computed before letting go of the requests.
    try:
        await asyncio.wait_for(scheduler.outbox.join(), timeout=10.0)
    except TimeoutError:
        context.log.warning("scheduler.outbox_not_drained")
    publisher.cancel()
    for task in loops + executor_tasks:
        task.cancel()
    await scheduler.release_held()
    await service.stop()
