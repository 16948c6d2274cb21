"""Admission: validates ``spotserve.v1.generate`` requests and persists them durably.

A request is answered here only when it is refused (a nats.micro error). An accepted request is
written to the REQUESTS stream (JetStream acknowledges it: it is durable) and from then on the
scheduler streams the answer to the request's reply subject. ``generate`` is a plain queue
subscription rather than a nats.micro endpoint because the reply subject is what admission
persists, and nats.micro's Request does not expose it; ``result`` and ``mode`` are typed
endpoints of the registered service.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from functools import partial

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.micro.service import DEFAULT_QUEUE_GROUP
from pydantic import ValidationError

from services.admission import metrics
from shared.codec import DecodeError, decode, encode, encoding_from_headers
from shared.messages import (
    AcceptedRecord,
    AcceptedRequest,
    ArrivalRate,
    CancelRecord,
    CancelReply,
    CancelRequest,
    Encoding,
    GenerateRequest,
    ModeReply,
    ModeRequest,
    ResultReply,
    ResultRequest,
    TokenChunk,
)
from shared.model.tokenizer import TextTokenizer
from shared.modelsource import resolve_model
from shared.readers import read_committed_chunks, read_finish_reason, read_serving_mode
from shared.rpc import (
    CANCEL_ENDPOINT,
    GENERATE_ENDPOINT,
    MODE_ENDPOINT,
    RESULT_ENDPOINT,
    BadRequest,
    Conflict,
    Internal,
    NotFound,
    Overloaded,
    RpcError,
    TooLarge,
    Unavailable,
    add_endpoint,
    publish_error,
)
from shared.runtime import ServiceContext
from shared.subjects import (
    ARRIVAL_RATE_KEY,
    MODE_KEY,
    REQUESTS_STREAM,
    REQUESTS_SUBJECT,
    SCHEDULER_CONSUMER,
    admin_bucket,
    cancel_key,
    load_bucket,
    requests_bucket,
)
from shared.waiting import (
    cancel_and_wait,
    sleep_unless_stopped,
    supervised,
    until_stopped,
    wait_event,
)

# Prompts longer than this many characters are tokenized in a worker thread.
INLINE_TOKENIZE_CHARS = 2_000
MAX_CONCURRENT_REQUESTS = 256
# With nothing queued, the queue length is read again this long after the last read at the
# latest (another admission replica may have accepted requests meanwhile).
QUEUE_IDLE_POLL_S = 10.0
# Tries of the durable write of one request (JetStream de-duplicates a repeated one).
PERSIST_ATTEMPTS = 2
# How long a stopping admission waits for the requests it is still accepting.
DRAIN_TIMEOUT_S = 10.0
# The result endpoint's refusals -> the lookups' ``outcome`` label.
LOOKUP_OUTCOME_OF_ERROR: dict[type[RpcError], str] = {
    BadRequest: "bad_request",
    NotFound: "not_found",
    Unavailable: "unavailable",
}


def describe_validation_error(error: ValidationError) -> str:
    """One readable line per problem, e.g. ``max_tokens: Input should be >= 1``."""
    problems = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{location}: {item['msg']}")
    return "invalid request: " + "; ".join(problems)


class ArrivalMeter:
    """Accepted requests per second over a sliding window (bounded: old arrivals drop out)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock  # the simulator passes its virtual clock
        self.started = clock()
        self._arrivals: deque[float] = deque()

    def record(self) -> None:
        self._arrivals.append(self.clock())
        self._trim()

    def rate(self) -> ArrivalRate:
        self._trim()
        # Right after start the window is not full yet: divide by the time actually observed.
        observed = min(self.window_s, max(self.clock() - self.started, 1.0))
        return ArrivalRate(
            requests_per_s=len(self._arrivals) / observed, window_s=observed, at=time.time()
        )

    def _trim(self) -> None:
        horizon = self.clock() - self.window_s
        while self._arrivals and self._arrivals[0] < horizon:
            self._arrivals.popleft()


async def publish_arrival_rate(context: ServiceContext, meter: ArrivalMeter) -> None:
    """Put the arrival rate in the load bucket periodically, until the service stops."""
    interval = context.settings.admission.rate_interval_s
    bucket = None
    while not context.stop.is_set():
        try:
            bucket = bucket or await load_bucket(context.js)
            rate = meter.rate()
            metrics.ARRIVAL_RATE.set(rate.requests_per_s)
            await bucket.put(ARRIVAL_RATE_KEY, encode(rate))
        except (TimeoutError, NatsError, JetStreamError) as exc:
            context.log.warning("arrival_rate.publish_failed", error=repr(exc))
        await sleep_unless_stopped(context.stop, interval)


class Admission:
    def __init__(self, context: ServiceContext, tokenizer: TextTokenizer) -> None:
        self.context = context
        self.settings = context.settings.admission
        self.tokenizer = tokenizer
        self.log = context.log
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._tasks: set[asyncio.Task[None]] = set()
        self.meter = ArrivalMeter(self.settings.rate_window_s)
        # Accepted requests not finished yet: read from JetStream every
        # queue_poll_s, counted up here in between (so a burst cannot overshoot the bound).
        self.queued = 0
        # Set by every request accepted here: wakes the queue watch from its idle wait.
        self.accepted = asyncio.Event()

    async def on_generate(self, request: Msg) -> None:
        """Subscription handler: hand the request to its own task (bounded) and return."""
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(request))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, request: Msg) -> None:
        received = time.perf_counter()
        encoding = encoding_from_headers(request.headers)
        request_id = uuid.uuid4().hex
        log = self.log.bind(request_id=request_id)
        try:
            self._check_capacity()
            # Counted at once, so that concurrent requests see it; given back if refused.
            self.queued += 1
            self.accepted.set()
            try:
                accepted = await self._accept(request, request_id, encoding)
                request_id = accepted.request_id
                log = log.bind(request_id=request_id)
                await self._claim(request_id)
                try:
                    await self._persist(accepted)
                except RpcError:
                    await self._unclaim(request_id)  # nothing accepted: the id stays free
                    raise
            except BaseException:
                self.queued -= 1
                raise
            self.meter.record()
            metrics.REQUESTS.labels("accepted").inc()
            metrics.PROMPT_TOKENS.inc(len(accepted.prompt_token_ids))
            metrics.ACCEPT_SECONDS.observe(time.perf_counter() - received)
            log.info(
                "generate.accepted",
                prompt_tokens=len(accepted.prompt_token_ids),
                max_tokens=accepted.max_tokens,
                stream=accepted.stream,
            )
        except RpcError as refused:
            log.info("generate.refused", code=refused.code, reason=refused.message)
            metrics.REQUESTS.labels(metrics.OUTCOME_OF_CODE[refused.code]).inc()
            await self._answer_refusal(request, refused, request_id)
        except Exception as exc:  # a bug must not take the service down
            log.exception("generate.internal_error")
            metrics.REQUESTS.labels("internal").inc()
            await self._answer_refusal(request, Internal(f"internal error: {exc!r}"), request_id)

    async def _accept(self, request: Msg, request_id: str, encoding: Encoding) -> AcceptedRequest:
        if len(request.data) > self.settings.max_request_bytes:
            raise TooLarge(
                f"request body is {len(request.data)} bytes; the limit is"
                f" {self.settings.max_request_bytes}"
            )
        if not request.reply:
            raise BadRequest("request has no reply subject")
        body = self._parse(request.data, encoding)
        prompt_token_ids = await self._prompt_tokens(body)
        self._check_context(len(prompt_token_ids), body.max_tokens)
        return AcceptedRequest(
            request_id=body.request_id or request_id,
            prompt_token_ids=prompt_token_ids,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            # A drawn seed is persisted, so a resumed request samples the same tokens.
            seed=body.seed if body.seed is not None else secrets.randbits(63),
            stop=body.stop,
            stream=body.stream,
            ignore_eos=body.ignore_eos,
            reply_subject=request.reply,
            encoding=encoding,
            accepted_at=time.time(),
        )

    @staticmethod
    def _parse(data: bytes, encoding: Encoding) -> GenerateRequest:
        try:
            raw = decode(data, encoding)
        except DecodeError as exc:
            raise BadRequest(str(exc)) from None
        if not isinstance(raw, dict):
            raise BadRequest(f"body must be a map of fields, got {type(raw).__name__}")
        try:
            return GenerateRequest.model_validate(raw)
        except ValidationError as exc:
            raise BadRequest(describe_validation_error(exc)) from None

    async def _prompt_tokens(self, body: GenerateRequest) -> list[int]:
        if body.prompt_token_ids is not None:
            vocab_size = self.tokenizer.vocab_size
            bad = [token for token in body.prompt_token_ids if token >= vocab_size]
            if bad:
                raise BadRequest(
                    f"prompt_token_ids has ids outside the vocabulary (size {vocab_size}):"
                    f" {bad[:5]}"
                )
            return list(body.prompt_token_ids)
        assert body.prompt is not None
        if len(body.prompt) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, body.prompt)
        return self.tokenizer.encode(body.prompt)

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        context = self.tokenizer.context_length
        if prompt_tokens >= context:
            raise TooLarge(
                f"prompt is {prompt_tokens} tokens; the model's context is {context} tokens"
                " (prompt plus max_tokens must fit in it)"
            )
        if prompt_tokens + max_tokens > context:
            raise BadRequest(
                f"max_tokens {max_tokens} is too large: the prompt is {prompt_tokens} tokens and"
                f" the model's context is {context}, so max_tokens can be at most"
                f" {context - prompt_tokens}"
            )

    def _check_capacity(self) -> None:
        limit = self.settings.max_queued_requests
        if self.queued >= limit:
            raise Overloaded(
                f"overloaded: {self.queued} accepted requests are not finished yet (limit"
                f" {limit}); retry later"
            )

    async def watch_queue(self) -> None:
        """Read the backlog (the scheduler's consumer: not yet delivered + delivered and not
        finished) from JetStream every queue_poll_s, until the service stops; while it is
        empty, again when a request is accepted here or after QUEUE_IDLE_POLL_S (the accepts
        of other admission replicas)."""
        while not self.context.stop.is_set():
            self.accepted.clear()  # before the read: an accept during it is not missed
            try:
                info = await self.context.js.consumer_info(REQUESTS_STREAM, SCHEDULER_CONSUMER)
                self.queued = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            except (TimeoutError, NatsError, JetStreamError) as exc:
                # No scheduler consumer yet (nothing queued), or JetStream away: keep counting.
                self.log.debug("queue.unreadable", error=repr(exc))
            if self.queued == 0:
                await until_stopped(wait_event(self.accepted, QUEUE_IDLE_POLL_S), self.context.stop)
            else:
                await sleep_unless_stopped(self.context.stop, self.settings.queue_poll_s)

    async def _claim(self, request_id: str) -> None:
        """Record the id as accepted; a used one (a client's own id given twice) is refused."""
        try:
            bucket = await requests_bucket(self.context.js)
            await bucket.create(request_id, encode(AcceptedRecord(accepted_at=time.time())))
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"request_id {request_id!r} was already used; give a new one (or none)"
            ) from None
        except (TimeoutError, NatsError, JetStreamError) as exc:
            raise Unavailable(f"could not record the request ({exc!r}); retry later") from None

    async def _unclaim(self, request_id: str) -> None:
        try:
            bucket = await requests_bucket(self.context.js)
            await bucket.delete(request_id)
        except (TimeoutError, NatsError, JetStreamError) as exc:
            self.log.debug("generate.unclaim_failed", request_id=request_id, error=repr(exc))

    async def on_result(self, command: ResultRequest) -> ResultReply:
        """``spotserve.v1.result``: what is committed of a request, for a client that missed
        part of its stream (a reconnect, a NATS restart: core NATS does not redeliver)."""
        request_id = command.request_id
        try:
            chunks = await read_committed_chunks(self.context.js, request_id)
            known = bool(chunks) or await self._accepted(request_id)
        except (TimeoutError, NatsError, JetStreamError) as exc:
            raise Unavailable(f"committed tokens unreadable now ({exc!r}); retry") from None
        if not known:
            raise NotFound(
                f"no request {request_id!r} (never accepted, or older than its results are kept)"
            )
        metrics.RESULT_LOOKUPS.labels("found").inc()
        return result_of(request_id, chunks)

    async def on_cancel(self, command: CancelRequest) -> CancelReply:
        """``spotserve.v1.cancel``: leave a cancel marker in the requests bucket (durable: a
        scheduler that takes the request later, or again after a restart, sees it too); the
        schedulers watch the markers and stop the request at its next iteration."""
        request_id = command.request_id
        try:
            committed, finish_reason = await read_finish_reason(self.context.js, request_id)
            if not committed and not await self._accepted(request_id):
                raise NotFound(
                    f"no request {request_id!r} (never accepted, or older than its results"
                    " are kept)"
                )
            if finish_reason is not None:
                return CancelReply(
                    request_id=request_id, state="finished", finish_reason=finish_reason
                )
            bucket = await requests_bucket(self.context.js)
            await bucket.put(cancel_key(request_id), encode(CancelRecord(requested_at=time.time())))
        except (TimeoutError, NatsError, JetStreamError) as exc:
            raise Unavailable(f"the cancel could not be recorded now ({exc!r}); retry") from None
        metrics.CANCELS.inc()
        self.log.info("request.cancel_requested", request_id=request_id)
        return CancelReply(request_id=request_id, state="cancelling")

    async def _accepted(self, request_id: str) -> bool:
        bucket = await requests_bucket(self.context.js)
        try:
            await bucket.get(request_id)
        except NotFoundError:  # never there, or deleted (a request that was not stored)
            return False
        return True

    async def _persist(self, accepted: AcceptedRequest) -> None:
        """Write to the REQUESTS stream; returns only once JetStream has stored it."""
        payload = encode(accepted)
        # The message id makes a retried publish idempotent (JetStream de-duplicates it).
        headers = {"Nats-Msg-Id": accepted.request_id}
        last_error: Exception | None = None
        for _attempt in range(PERSIST_ATTEMPTS):
            try:
                await self.context.js.publish(
                    REQUESTS_SUBJECT,
                    payload,
                    timeout=self.settings.publish_timeout_s,
                    headers=headers,
                )
                return
            except (TimeoutError, NatsError, JetStreamError) as exc:
                last_error = exc
        raise Unavailable(
            f"could not store the request durably ({last_error!r}); nothing was accepted,"
            " retry later"
        )

    async def _answer_refusal(self, request: Msg, error: RpcError, request_id: str) -> None:
        error.request_id = request_id
        try:
            await publish_error(self.context.nc, request, error)
        except NatsError as exc:
            self.log.warning("generate.error_reply_failed", error=repr(exc))

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=DRAIN_TIMEOUT_S)


def count_lookup_refusal(error: RpcError) -> None:
    """The result lookups' metric for a refused lookup (an internal error has no label)."""
    outcome = LOOKUP_OUTCOME_OF_ERROR.get(type(error))
    if outcome is not None:
        metrics.RESULT_LOOKUPS.labels(outcome).inc()


def result_of(request_id: str, chunks: list[TokenChunk]) -> ResultReply:
    last = chunks[-1] if chunks else None
    return ResultReply(
        request_id=request_id,
        token_ids=[token for chunk in chunks for token in chunk.token_ids],
        text="".join(chunk.text for chunk in chunks),
        finish_reason=last.finish_reason if last else None,
        usage=last.usage if last else None,
        chunks=len(chunks),
    )


async def on_mode(context: ServiceContext, command: ModeRequest) -> ModeReply:
    """The serving mode: read it, or set it (the planner's next plan is made under it)."""
    previous = await read_serving_mode(context)
    if previous is None:
        raise Unavailable("the mode store is unavailable")
    reply = ModeReply(mode=command.mode or previous, previous=previous)
    if command.mode is not None:
        try:
            bucket = await admin_bucket(context.js)
            await bucket.put(MODE_KEY, encode(reply))
        except (NatsError, JetStreamError, TimeoutError) as exc:
            raise Unavailable(f"mode not stored: {exc!r}") from None
        context.log.info("admin.mode", mode=reply.mode, previous=previous)
    return reply


async def subscribe_generate(context: ServiceContext, admission: Admission) -> Subscription:
    """``generate`` as a queue subscription in nats.micro's queue group: instances share the
    requests as endpoints do, and each handler sees the request's reply subject."""
    return await context.nc.subscribe(
        GENERATE_ENDPOINT.subject_for(), queue=DEFAULT_QUEUE_GROUP, cb=admission.on_generate
    )


async def serve(context: ServiceContext) -> None:
    model_dir = await resolve_model(context)
    tokenizer = await asyncio.to_thread(TextTokenizer.from_model_dir, model_dir)
    admission = Admission(context, tokenizer)
    # Read when scraped (an int attribute: no locking needed).
    metrics.QUEUED.set_function(lambda: admission.queued)
    service = await context.add_micro_service(
        "Validates generate requests and persists them to JetStream",
        metadata={"model": str(model_dir), "context_length": str(tokenizer.context_length)},
    )
    generate = await subscribe_generate(context, admission)
    await add_endpoint(
        service,
        RESULT_ENDPOINT,
        admission.on_result,
        logger=context.log,
        on_error=count_lookup_refusal,
    )
    await add_endpoint(service, CANCEL_ENDPOINT, admission.on_cancel, logger=context.log)
    queue = supervised(admission.watch_queue(), "queue", context.log)
    await add_endpoint(service, MODE_ENDPOINT, partial(on_mode, context), logger=context.log)
    context.log.info("admission.ready", subject=generate.subject, model=str(model_dir))
    await publish_arrival_rate(context, admission.meter)
    await cancel_and_wait([queue])
    await generate.unsubscribe()
    await service.stop()
    await admission.drain()
