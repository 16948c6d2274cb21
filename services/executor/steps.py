"""Decoding iterations: a step on a whole model, or a pipeline's micro-batches through this
instance's stage (the first stage heads the pipeline; later stages take micro-batches from
the stage before them and hand them on)."""

from __future__ import annotations

import asyncio
import time

from nats.errors import Error as NatsError
from nats.micro.request import Request
from pydantic import BaseModel

from services.executor import metrics
from services.executor.host import KV_TRANSFER_TIMEOUT_S, InstancePart
from services.executor.ranks import RankFailedError
from services.executor.stage_link import Placement, StageLink, Tokens
from shared.codec import encoding_from_headers
from shared.messages import (
    ErrorCode,
    ReleaseCommand,
    Released,
    StageCommand,
    StepCommand,
    StepResult,
)
from shared.model.engine import (
    EngineError,
    InvalidStepError,
    SequenceStep,
    StageBatch,
    StageResult,
)
from shared.rpc import (
    STAGE_ENDPOINT,
    BadRequest,
    Internal,
    RpcError,
    Unavailable,
    respond,
    respond_error,
)
from shared.transfer import TransferFailedError


class StepRunner(InstancePart):
    """Serves ``step`` (from the scheduler), ``stage`` (from the previous pipeline stage) and
    ``release`` (through every stage)."""

    def __init__(self, part: InstancePart, placement: Placement, link: StageLink) -> None:
        super().__init__(part.context, part.host, part.inbox, part.instance_id)
        self.placement = placement
        self.link = link
        # Micro-batches this stage has run and is handing on (replies still to come).
        self._handing_on: set[asyncio.Task[None]] = set()
        # The tokens the last step sampled: the inputs of a step that continues it. Steps run
        # one after the other in the order they came (one subscription, one handler at a time).
        self._sampled: dict[str, int] = {}

    async def step(self, command: StepCommand) -> StepResult:
        sampled, self._sampled = self._sampled, {}
        steps = step_inputs(command, sampled)
        result = await self._step(command, steps)
        self._sampled = result.tokens
        return result

    async def _step(self, command: StepCommand, steps: list[SequenceStep]) -> StepResult:
        started = time.perf_counter()
        if not self.host.engine.is_last_stage:
            return await self._run_pipelined(command, steps, started)
        try:
            tokens = await self.host.run(self._run_step, command, steps)
        except RankFailedError as exc:
            self.host.rank_lost(exc)
        except EngineError as exc:
            self.log.warning("step.refused", error=str(exc))
            metrics.STEPS.labels("refused").inc()
            raise BadRequest(str(exc)) from None
        except Exception as exc:
            self.log.exception("step.failed")
            metrics.STEPS.labels("error").inc()
            raise Internal(f"step failed: {exc!r}") from None
        result = StepResult(tokens=tokens, compute_s=time.perf_counter() - started)
        metrics.observe_step(result.compute_s, len(result.tokens))
        if command.prefetch:
            self.host.start_prefetch(command.prefetch)
        return result

    async def release(self, command: ReleaseCommand) -> Released:
        # Through the whole pipeline: every stage holds a part of these caches.
        stage = StageCommand(batch=StageBatch([], []).to_wire(), release=command.request_ids)
        await self.link.forward(stage, await self._compute_stage(stage))
        return Released(released=len(command.request_ids))

    # ---- pipeline stages ----

    async def _run_pipelined(
        self, command: StepCommand, steps: list[SequenceStep], started: float
    ) -> StepResult:
        """First stage of a pipeline: split the batch into micro-batches and run them through
        this stage one after another, each handed on as soon as it is done, so that the later
        stages work on one while this stage computes the next. Answers once the last stage
        has sampled every micro-batch."""
        parts = split_micro_batches(steps, self._micro_batch_count())
        forwards: list[asyncio.Task[Tokens]] = []
        overlapped = 0
        failure: RpcError | None = None
        for index, part in enumerate(parts):
            stage = micro_batch_command(command, part, index == 0, index == len(parts) - 1)
            try:
                outcome = await self._compute_stage(stage)
            except RpcError as exc:
                failure = exc
            # An earlier micro-batch still at the later stages when this one is done here: the
            # stages worked at the same time.
            overlapped += any(not forward.done() for forward in forwards)
            if failure is not None:
                break
            forwards.append(asyncio.create_task(self.link.forward(stage, outcome)))
        tokens, failure = await collect_tokens(forwards, failure)
        self.log.debug(
            "pipeline.step", micro_batches=len(parts), overlapped=overlapped, failed=bool(failure)
        )
        if failure is not None:
            refused = failure.code == str(ErrorCode.BAD_REQUEST)
            metrics.STEPS.labels("refused" if refused else "error").inc()
            raise failure
        result = StepResult(tokens=tokens, compute_s=time.perf_counter() - started)
        metrics.observe_step(result.compute_s, len(result.tokens))
        return result

    def _micro_batch_count(self) -> int:
        return self.context.settings.executor.micro_batches or self.placement.stages

    async def on_stage(self, request: Request) -> None:
        """A later pipeline stage: the previous stage's micro-batch arrives here. Micro-batches
        are computed in the order they arrive (this handler takes the next message once the
        compute is done); handing one on and waiting for its tokens happens beside that."""
        started = time.perf_counter()
        try:
            stage = STAGE_ENDPOINT.parse_request(
                request.data, encoding_from_headers(request.headers)
            )
            await self._receive_hidden(stage)
            outcome = await self._compute_stage(stage)
        except RpcError as exc:
            await answer(request, exc)
            return
        task = asyncio.create_task(self._hand_on(request, stage, outcome, started))
        self._handing_on.add(task)
        task.add_done_callback(self._handing_on.discard)

    async def _receive_hidden(self, stage: StageCommand) -> None:
        """The micro-batch's hidden states, when they came apart from the command."""
        if stage.hidden_transfer is None:
            return
        try:
            received = await self.inbox.receive(stage.hidden_transfer, KV_TRANSFER_TIMEOUT_S)
        except (TransferFailedError, TimeoutError) as exc:
            metrics.transfer_failed("activations", "received")
            raise Unavailable(f"no activations: {exc}") from None
        metrics.observe_transfer("activations", "received", received.nbytes)
        stage.batch["hidden"] = received.tensors.get("hidden")

    async def _hand_on(
        self, request: Request, stage: StageCommand, outcome: StageResult, started: float
    ) -> None:
        reply: StepResult | RpcError
        try:
            tokens = await self.link.forward(stage, outcome)
            reply = StepResult(tokens=tokens, compute_s=time.perf_counter() - started)
        except RpcError as exc:
            reply = exc
        try:
            await answer(request, reply)
        except NatsError as exc:  # the previous stage went away; it recovers on its own
            self.log.warning("stage.reply_failed", error=repr(exc))

    async def _compute_stage(self, stage: StageCommand) -> StageResult:
        """This stage's part of a micro-batch (on the compute thread);
        :class:`shared.rpc.RpcError` when the engine refuses it or fails."""
        try:
            batch = StageBatch.from_wire(stage.batch)
            outcome = await self.host.run(self._run_stage, stage, batch)
        except RankFailedError as exc:
            self.host.rank_lost(exc)
        except EngineError as exc:
            self.log.warning("stage.refused", error=str(exc))
            raise BadRequest(str(exc)) from None
        except Exception as exc:
            self.log.exception("stage.failed")
            raise Internal(f"stage failed: {exc!r}") from None
        if stage.prefetch:
            self.host.start_prefetch(stage.prefetch)
        return outcome

    # ---- on the compute thread ----

    def _run_step(self, command: StepCommand, steps: list[SequenceStep]) -> dict[str, int]:
        self.host.apply_kv_commands(command)
        engine = self.host.engine
        for sequence in command.sequences:
            held = engine.sequence_length(sequence.request_id)
            if sequence.cached_tokens is not None and held != sequence.cached_tokens:
                raise InvalidStepError(
                    f"the KV cache of {sequence.request_id} holds {held} positions here, the"
                    f" scheduler expects {sequence.cached_tokens}: recompute it"
                )
        return engine.step(steps) if steps else {}

    def _run_stage(self, stage: StageCommand, batch: StageBatch) -> StageResult:
        self.host.apply_kv_commands(stage)
        engine = self.host.engine
        if batch.seqs:
            return engine.run_stage(batch)
        if engine.is_last_stage:
            return StageResult(tokens={})
        # Nothing to compute, but the KV commands go on to the later stages all the same.
        return StageResult(next=StageBatch([], []))

    def close(self) -> None:
        for task in self._handing_on:
            task.cancel()


def step_inputs(command: StepCommand, sampled: dict[str, int]) -> list[SequenceStep]:
    """The engine's inputs of a step command; a sequence that continues the step before it
    is fed the token that step sampled (``sampled``). BadRequest when there is none."""
    steps = []
    for sequence in command.sequences:
        token_ids = sequence.token_ids
        if sequence.continues:
            if sequence.request_id not in sampled:
                raise BadRequest(
                    f"{sequence.request_id} continues the step before, which sampled no token"
                    " for it here: send its tokens"
                )
            token_ids = [sampled[sequence.request_id]]
        steps.append(
            SequenceStep(
                request_id=sequence.request_id,
                token_ids=token_ids,
                temperature=sequence.temperature,
                top_p=sequence.top_p,
                seed=sequence.seed,
                sample_index=sequence.sample_index,
            )
        )
    return steps


async def answer(request: Request, reply: BaseModel | RpcError) -> None:
    """Answer a raw request with its reply or its error."""
    if isinstance(reply, RpcError):
        await respond_error(request, reply)
    else:
        await respond(request, reply)


async def collect_tokens(
    forwards: list[asyncio.Task[Tokens]], failure: RpcError | None
) -> tuple[Tokens, RpcError | None]:
    """Every micro-batch's tokens, and the first failure (``failure``, this stage's own,
    before those of the later stages)."""
    tokens: Tokens = {}
    for reply in await asyncio.gather(*forwards, return_exceptions=True):
        if isinstance(reply, RpcError):
            failure = failure or reply
        elif isinstance(reply, BaseException):
            raise reply
        else:
            tokens.update(reply)
    return tokens, failure


def micro_batch_command(
    command: StepCommand, part: list[SequenceStep], first: bool, last: bool
) -> StageCommand:
    """The stage command of one micro-batch of a step. The KV commands ride on the first
    micro-batch (every stage takes them in order); the prefetch follows the last."""
    return StageCommand(
        batch=StageBatch(part).to_wire(),
        release=command.release if first else [],
        release_all=command.release_all and first,
        offload=command.offload if first else [],
        upload=command.upload if first else [],
        prefetch=command.prefetch if last else [],
    )


def split_micro_batches(steps: list[SequenceStep], count: int) -> list[list[SequenceStep]]:
    """At most ``count`` contiguous micro-batches of near-equal size (one, maybe empty, when
    there is nothing to split)."""
    count = max(1, min(count, len(steps)))
    size, extra = divmod(len(steps), count)
    parts, start = [], 0
    for index in range(count):
        end = start + size + (index < extra)
        parts.append(steps[start:end])
        start = end
    return parts
