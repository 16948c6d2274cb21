"""Executor: owns one instance's model and KV cache; runs one decoding iteration per command.

Endpoints (nats.micro, one group per instance): ``spotserve.v1.executor.<id>.step`` runs a
ragged batch and replies with the sampled token of each sequence; ``….release`` frees KV slots.
The forward pass runs in a dedicated thread so the event loop keeps answering pings.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from nats.errors import Error as NatsError
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from pydantic import ValidationError

from services.executor import metrics
from services.executor.ranks import EngineSpec, RankFailedError, ShardedEngine
from shared.codec import DecodeError, decode, encode
from shared.loading.format import Layers
from shared.loading.hostpool import load_from_host_pool
from shared.messages import (
    ErrorCode,
    HostLease,
    InstanceRecord,
    KvAdoptCommand,
    KvMigrateCommand,
    KvMoveReply,
    Plan,
    ReleaseCommand,
    StageCommand,
    StepCommand,
    StepResult,
    WeightsSendCommand,
)
from shared.model.engine import (
    Engine,
    EngineError,
    InvalidStepError,
    SequenceStep,
    StageBatch,
    StageResult,
)
from shared.model.llama import WeightsSource
from shared.model.profile import device_memory_bytes
from shared.runtime import (
    ServiceContext,
    fetch_model,
    follow_plans,
    node_name,
    parse_request,
    release_host_lease,
    resolve_model,
)
from shared.subjects import (
    executor_adopt_subject,
    executor_migrate_subject,
    executor_release_subject,
    executor_stage_subject,
    executor_step_subject,
    executor_weights_subject,
    instances_bucket,
)
from shared.transfer import (
    TensorInbox,
    TransferError,
    TransferFailedError,
    send_tensors,
)

# A KV cache is at most a few hundred MB: this bounds sending it and waiting for it.
KV_TRANSFER_TIMEOUT_S = 60.0
# Room under the server's max payload for a stage command's headers.
STAGE_HEADER_ROOM = 64 * 1024

# Seconds between checks that every tensor-parallel rank is alive.
RANK_WATCH_S = 1.0
# Exit status of an executor that lost a tensor-parallel rank (the instance cannot serve).
EXIT_RANK_LOST = 70

AnyEngine = Engine | ShardedEngine
Tokens = dict[str, int]  # request_id -> the token sampled for it
ErrorReply = tuple[str, str]  # (error code, message) for the caller


class Executor:
    def __init__(
        self,
        context: ServiceContext,
        engine: AnyEngine,
        instance_id: str,
        compute: ThreadPoolExecutor,
    ) -> None:
        self.context = context
        self.engine = engine
        self.instance_id = instance_id
        self.log = context.log.bind(instance_id=instance_id)
        self._compute = compute
        # KV caches other executors send here (a plan moves their requests to this instance).
        self.inbox = TensorInbox(context.nc, instance_id)
        # Builds this instance's engine for a layer range (None: the whole model).
        self.build: Callable[[Layers | None, WeightsSource | None], AnyEngine] | None = None
        self.next_stage: str | None = None  # the instance serving the next pipeline stage
        self.pipeline_stages = 1  # stages of this instance's replica under the current plan
        self.plan: Plan | None = None  # the last plan this instance took a role from
        # Micro-batches this stage has run and is handing on (replies still to come).
        self._handing_on: set[asyncio.Task[None]] = set()

    async def on_step(self, request: Request) -> None:
        command = await parse_request(request, StepCommand, "step command")
        if command is None:
            return
        # The wire model and the engine's step carry the same fields.
        steps = [
            SequenceStep(**sequence.model_dump(exclude={"cached_tokens"}))
            for sequence in command.sequences
        ]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if not self.engine.is_last_stage:
            await self._run_pipelined(request, command, steps, started)
            return
        try:
            tokens = await loop.run_in_executor(self._compute, self._run_step, command, steps)
        except RankFailedError as exc:
            self.rank_lost(exc)
        except EngineError as exc:
            self.log.warning("step.refused", error=str(exc))
            metrics.STEPS.labels("refused").inc()
            await request.respond_error(str(ErrorCode.BAD_REQUEST), str(exc))
            return
        except Exception as exc:
            self.log.exception("step.failed")
            metrics.STEPS.labels("error").inc()
            await request.respond_error(str(ErrorCode.INTERNAL), f"step failed: {exc!r}")
            return
        result = StepResult(tokens=tokens, compute_s=time.perf_counter() - started)
        observe_step(result)
        await request.respond(encode(result))
        if command.prefetch:
            # After the reply: the uploads overlap the scheduler's commit and planning; the next
            # step, queued behind them on the same thread, finds the caches in place.
            future = loop.run_in_executor(self._compute, self._prefetch, command.prefetch)
            future.add_done_callback(self._prefetch_done)

    # ---- pipeline stages ----

    async def _run_pipelined(
        self, request: Request, command: StepCommand, steps: list[SequenceStep], started: float
    ) -> None:
        """First stage of a pipeline: split the batch into micro-batches and run them through
        this stage one after another, each handed on as soon as it is done, so that the later
        stages work on one while this stage computes the next. Replies once the last stage
        has sampled every micro-batch."""
        parts = split_micro_batches(steps, self._micro_batch_count())
        forwards: list[asyncio.Task[Tokens | ErrorReply]] = []
        overlapped = 0
        failure: ErrorReply | None = None
        for index, part in enumerate(parts):
            first, last = index == 0, index == len(parts) - 1
            stage = StageCommand(
                batch=StageBatch(part).to_wire(),
                # The KV commands ride on the first micro-batch: every stage takes them in order.
                release=command.release if first else [],
                release_all=command.release_all and first,
                offload=command.offload if first else [],
                upload=command.upload if first else [],
                prefetch=command.prefetch if last else [],
            )
            outcome = await self._compute_stage(stage)
            # An earlier micro-batch still at the later stages when this one is done here: the
            # stages worked at the same time.
            overlapped += any(not forward.done() for forward in forwards)
            if isinstance(outcome, tuple):
                failure = outcome
                break
            forwards.append(asyncio.create_task(self._forward(stage, outcome)))
        tokens: Tokens = {}
        for reply in await asyncio.gather(*forwards):
            if isinstance(reply, tuple):
                failure = failure or reply
            else:
                tokens.update(reply)
        self.log.debug(
            "pipeline.step", micro_batches=len(parts), overlapped=overlapped, failed=bool(failure)
        )
        if failure is not None:
            refused = failure[0] == str(ErrorCode.BAD_REQUEST)
            metrics.STEPS.labels("refused" if refused else "error").inc()
            await request.respond_error(*failure)
            return
        result = StepResult(tokens=tokens, compute_s=time.perf_counter() - started)
        observe_step(result)
        await request.respond(encode(result))

    def _micro_batch_count(self) -> int:
        return self.context.settings.executor.micro_batches or self.pipeline_stages

    async def on_stage(self, request: Request) -> None:
        """A later pipeline stage: the previous stage's micro-batch arrives here. Micro-batches
        are computed in the order they arrive (this handler takes the next message once the
        compute is done); handing one on and waiting for its tokens happens beside that."""
        stage = await parse_request(request, StageCommand, "stage command")
        if stage is None:
            return
        started = time.perf_counter()
        if stage.hidden_transfer is not None:
            try:
                received = await self.inbox.receive(stage.hidden_transfer, KV_TRANSFER_TIMEOUT_S)
            except (TransferFailedError, TimeoutError) as exc:
                metrics.TRANSFER_FAILURES.labels("activations", "received").inc()
                await request.respond_error(str(ErrorCode.UNAVAILABLE), f"no activations: {exc}")
                return
            observe_transfer("activations", "received", received.nbytes)
            stage.batch["hidden"] = received.tensors.get("hidden")
        outcome = await self._compute_stage(stage)
        if isinstance(outcome, tuple):
            await request.respond_error(*outcome)
            return
        task = asyncio.create_task(self._forward_and_respond(request, stage, outcome, started))
        self._handing_on.add(task)
        task.add_done_callback(self._handing_on.discard)

    async def _forward_and_respond(
        self, request: Request, stage: StageCommand, outcome: StageResult, started: float
    ) -> None:
        reply = await self._forward(stage, outcome)
        try:
            if isinstance(reply, tuple):
                await request.respond_error(*reply)
                return
            result = StepResult(tokens=reply, compute_s=time.perf_counter() - started)
            await request.respond(encode(result))
        except NatsError as exc:  # the previous stage went away; it recovers on its own
            self.log.warning("stage.reply_failed", error=repr(exc))

    async def _compute_stage(self, stage: StageCommand) -> StageResult | ErrorReply:
        """This stage's part of a micro-batch (on the compute thread), or an error reply."""
        loop = asyncio.get_running_loop()
        try:
            batch = StageBatch.from_wire(stage.batch)
            outcome = await loop.run_in_executor(self._compute, self._run_stage, stage, batch)
        except RankFailedError as exc:
            self.rank_lost(exc)
        except EngineError as exc:
            self.log.warning("stage.refused", error=str(exc))
            return str(ErrorCode.BAD_REQUEST), str(exc)
        except Exception as exc:
            self.log.exception("stage.failed")
            return str(ErrorCode.INTERNAL), f"stage failed: {exc!r}"
        if stage.prefetch:
            future = loop.run_in_executor(self._compute, self._prefetch, stage.prefetch)
            future.add_done_callback(self._prefetch_done)
        return outcome

    async def _forward(self, stage: StageCommand, outcome: StageResult) -> Tokens | ErrorReply:
        """The sampled tokens of a micro-batch this stage has run: its own (the last stage) or
        the next stage's, once it has them."""
        if outcome.tokens is not None:
            return outcome.tokens
        if self.next_stage is None or outcome.next is None:
            return str(ErrorCode.UNAVAILABLE), "no next pipeline stage in the current plan"
        wire = outcome.next.to_wire()
        body = encode(stage.model_copy(update={"batch": wire, "hidden_transfer": None}))
        sending = None
        limit = self.context.settings.executor.stage_message_bytes or (
            self.context.nc.max_payload - STAGE_HEADER_ROOM
        )
        if len(body) > limit:
            # Too large for one message: the hidden states stream through shared.transfer
            # (chunked, flow controlled) while the command itself goes as usual.
            transfer_id = f"act-{uuid.uuid4().hex}"
            hidden = wire.pop("hidden")
            body = encode(stage.model_copy(update={"batch": wire, "hidden_transfer": transfer_id}))
            sending = asyncio.create_task(
                send_tensors(
                    self.context.nc,
                    self.next_stage,
                    {"hidden": hidden},
                    transfer_id=transfer_id,
                    source=self.instance_id,
                    timeout_s=KV_TRANSFER_TIMEOUT_S,
                )
            )
        try:
            reply = await self.context.nc.request(
                executor_stage_subject(self.next_stage),
                body,
                timeout=self.context.settings.scheduler.step_timeout_s,
            )
            if sending is not None:
                observe_transfer("activations", "sent", (await sending).bytes_sent)
        except (TimeoutError, NatsError, TransferError) as exc:
            if sending is not None:
                sending.cancel()
                metrics.TRANSFER_FAILURES.labels("activations", "sent").inc()
            return str(ErrorCode.UNAVAILABLE), f"next stage {self.next_stage}: {exc!r}"
        headers = reply.headers or {}
        if ERROR_CODE_HEADER in headers:
            return headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, "")
        return StepResult.model_validate(decode(reply.data)).tokens

    def _run_stage(self, stage: StageCommand, batch: StageBatch) -> StageResult:
        self._apply_kv_commands(stage)
        if batch.seqs:
            return self.engine.run_stage(batch)
        if self.engine.is_last_stage:
            return StageResult(tokens={})
        # Nothing to compute, but the KV commands go on to the later stages all the same.
        return StageResult(next=StageBatch([], []))

    async def take_role(self, plan: Plan) -> None:
        """Take this instance's role from a new plan: rebuild the engine for its layer range
        when the range changes; remember the next stage."""
        role = next((r for r in plan.roles if r.instance_id == self.instance_id), None)
        if role is None or self.build is None:
            return  # no role: keep serving what is here (e.g. finishing within a grace period)
        following = next(
            (r for r in plan.roles if r.replica == role.replica and r.stage == role.stage + 1),
            None,
        )
        ranks = self.engine.world_size if isinstance(self.engine, ShardedEngine) else 1
        if plan.config.tensor != ranks:
            self.log.error(
                "role.unsupported",
                epoch=plan.epoch,
                plan_tensor=plan.config.tensor,
                reason=f"this instance runs {ranks} tensor-parallel ranks",
            )
            return
        self.next_stage = following.instance_id if following else None
        self.pipeline_stages = len({r.stage for r in plan.roles if r.replica == role.replica})
        wanted = (role.first_layer, role.last_layer)
        previous, self.plan = self.plan, plan
        reload = plan.reloads_everything(previous)
        if wanted == self.engine.layers and not reload:
            return
        last = self.engine.model.args.n_layers - 1
        layers = None if wanted == (0, last) else wanted
        started = time.perf_counter()
        if reload or plan.weights_from_disk:
            state, from_peers = None, {}
        else:
            state, from_peers = await self._gather_weights(plan, wanted, last)
        loop = asyncio.get_running_loop()
        # On the compute thread: steps already queued run first, later ones find the new engine.
        if state is None:
            self.engine = await loop.run_in_executor(self._compute, self.build, layers)
        else:
            self.engine = await loop.run_in_executor(
                self._compute, partial(self.build, layers, lambda _device: state)
            )
        source = "disk" if state is None else ("peer" if from_peers else "local")
        seconds = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.labels("role", source).observe(seconds)
        self.log.info(
            "role.taken",
            epoch=plan.epoch,
            layers=layers,
            next_stage=self.next_stage,
            from_peers=from_peers,
            seconds=round(seconds, 3),
        )

    async def _gather_weights(
        self, plan: Plan, wanted: Layers, last: int
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, list[int]]]:
        """The new stage's tensors: what this engine already holds, plus what the plan says
        peers send (streamed peer to peer). (None, ...) when some layer has to come from the
        loader or a peer failed: the caller then reads the whole stage from the node's disk."""
        needed = set(range(wanted[0], wanted[1] + 1))
        needed |= {-1} if wanted[0] == 0 else set()
        needed |= {last + 1} if wanted[1] == last else set()
        if isinstance(self.engine, ShardedEngine):
            return None, {}  # every rank reads its shard of the stage from the node's disk
        held = held_layers(self.engine, last) & needed
        sources: dict[str, list[int]] = {}
        for transfer in plan.transfers:
            if (
                transfer.kind == "weights"
                and transfer.instance_id == self.instance_id
                and transfer.layer in needed - held
                and transfer.source_instance not in (None, self.instance_id)
            ):
                layers = sources.setdefault(str(transfer.source_instance), [])
                if transfer.layer not in layers:
                    layers.append(transfer.layer)
        if needed - held - {layer for layers in sources.values() for layer in layers}:
            return None, {}
        state = await asyncio.get_running_loop().run_in_executor(
            self._compute, checkpoint_tensors, self.engine, sorted(held), last
        )
        for source, layers in sources.items():
            received = await self._fetch_weights(source, layers)
            if received is None:
                return None, {}
            state.update(received)
        return state, sources

    async def _fetch_weights(
        self, source: str, layers: list[int]
    ) -> dict[str, torch.Tensor] | None:
        transfer_id = f"w-{uuid.uuid4().hex}"
        command = WeightsSendCommand(
            layers=sorted(layers), destination=self.instance_id, transfer_id=transfer_id
        )
        receiving = asyncio.create_task(self.inbox.receive(transfer_id, KV_TRANSFER_TIMEOUT_S))
        try:
            reply = await self.context.nc.request(
                executor_weights_subject(source), encode(command), timeout=KV_TRANSFER_TIMEOUT_S
            )
            if ERROR_CODE_HEADER in (reply.headers or {}):
                raise TransferError((reply.headers or {}).get(ERROR_HEADER, "refused"))
            received = await receiving
        except (TimeoutError, NatsError, TransferError, TransferFailedError) as exc:
            receiving.cancel()
            metrics.TRANSFER_FAILURES.labels("weights", "received").inc()
            self.log.warning("weights.fetch_failed", source=source, error=repr(exc))
            return None
        observe_transfer("weights", "received", received.nbytes)
        return dict(received.tensors)

    async def on_weights(self, request: Request) -> None:
        """Send some of this engine's layers to a peer taking a role that needs them."""
        command = await parse_request(request, WeightsSendCommand, "weights command")
        if command is None:
            return
        if isinstance(self.engine, ShardedEngine):
            await request.respond_error(
                str(ErrorCode.NOT_FOUND), "tensor-parallel shards here: read the layers from disk"
            )
            return
        last = self.engine.model.args.n_layers - 1
        missing = set(command.layers) - held_layers(self.engine, last)
        if missing:
            await request.respond_error(str(ErrorCode.NOT_FOUND), f"not held here: {missing}")
            return
        tensors = await asyncio.get_running_loop().run_in_executor(
            self._compute, checkpoint_tensors, self.engine, command.layers, last
        )
        try:
            stats = await send_tensors(
                self.context.nc,
                command.destination,
                tensors,
                transfer_id=command.transfer_id,
                source=self.instance_id,
                timeout_s=KV_TRANSFER_TIMEOUT_S,
            )
        except (TransferError, TimeoutError) as exc:
            metrics.TRANSFER_FAILURES.labels("weights", "sent").inc()
            await request.respond_error(str(ErrorCode.UNAVAILABLE), f"transfer failed: {exc}")
            return
        observe_transfer("weights", "sent", stats.bytes_sent)
        self.log.info("weights.sent", destination=command.destination, layers=command.layers)
        await request.respond(encode(KvMoveReply(request_id="", nbytes=stats.bytes_sent)))

    async def on_migrate(self, request: Request) -> None:
        """Send one request's KV cache to another executor, peer to peer (shared.transfer);
        freed here once the receiver has it, checked."""
        command = await parse_request(request, KvMigrateCommand, "migrate command")
        if command is None:
            return
        loop = asyncio.get_running_loop()
        try:
            length, tensors = await loop.run_in_executor(
                self._compute, self.engine.export_kv, command.request_id
            )
            tensors["length"] = torch.tensor(length, dtype=torch.int64)
            stats = await send_tensors(
                self.context.nc,
                command.destination,
                tensors,
                transfer_id=command.transfer_id,
                source=self.instance_id,
                timeout_s=KV_TRANSFER_TIMEOUT_S,
            )
        except EngineError as exc:
            await request.respond_error(str(ErrorCode.NOT_FOUND), str(exc))
            return
        except (TransferError, TimeoutError) as exc:
            metrics.TRANSFER_FAILURES.labels("kv", "sent").inc()
            self.log.warning("kv.migrate_failed", request_id=command.request_id, error=str(exc))
            await request.respond_error(str(ErrorCode.UNAVAILABLE), f"transfer failed: {exc}")
            return
        await loop.run_in_executor(self._compute, self.engine.release, [command.request_id])
        observe_transfer("kv", "sent", stats.bytes_sent)
        self.log.info(
            "kv.migrated",
            request_id=command.request_id,
            destination=command.destination,
            nbytes=stats.bytes_sent,
        )
        reply = KvMoveReply(request_id=command.request_id, nbytes=stats.bytes_sent)
        await request.respond(encode(reply))

    async def on_adopt(self, request: Request) -> None:
        """Take a KV cache arriving from another executor into host memory (the scheduler
        uploads it before the request runs here)."""
        command = await parse_request(request, KvAdoptCommand, "adopt command")
        if command is None:
            return
        try:
            received = await self.inbox.receive(command.transfer_id, KV_TRANSFER_TIMEOUT_S)
            tensors = dict(received.tensors)
            length = int(tensors.pop("length"))
            landed = await asyncio.get_running_loop().run_in_executor(
                self._compute, self.engine.import_kv, command.request_id, length, tensors, "host"
            )
        except (TransferFailedError, TimeoutError, KeyError) as exc:
            metrics.TRANSFER_FAILURES.labels("kv", "received").inc()
            await request.respond_error(str(ErrorCode.UNAVAILABLE), f"no KV cache arrived: {exc}")
            return
        except EngineError as exc:
            await request.respond_error(str(ErrorCode.BAD_REQUEST), str(exc))
            return
        observe_transfer("kv", "received", received.nbytes)
        reply = KvMoveReply(request_id=command.request_id, nbytes=received.nbytes, landed=landed)
        await request.respond(encode(reply))

    def _run_step(self, command: StepCommand, steps: list[SequenceStep]) -> dict[str, int]:
        self._apply_kv_commands(command)
        for sequence in command.sequences:
            held = self.engine.sequence_length(sequence.request_id)
            if sequence.cached_tokens is not None and held != sequence.cached_tokens:
                raise InvalidStepError(
                    f"the KV cache of {sequence.request_id} holds {held} positions here, the"
                    f" scheduler expects {sequence.cached_tokens}: recompute it"
                )
        return self.engine.step(steps) if steps else {}

    def _apply_kv_commands(self, command: StepCommand | StageCommand) -> None:
        """Before a step, in this order: release, offload, upload (every stage alike)."""
        if command.release_all:
            self.engine.release(self.engine.sequence_ids())
        elif command.release:
            self.engine.release(command.release)
        if command.offload:
            self.engine.offload(command.offload)
            metrics.KV_SWAPS.labels("offload").inc(len(command.offload))
        if command.upload:
            self.engine.upload(command.upload)
            metrics.KV_SWAPS.labels("upload").inc(len(command.upload))

    def _prefetch(self, request_ids: list[str]) -> list[str]:
        """Upload what is offloaded here, as far as slots are free; returns what was not."""
        held = set(self.engine.offloaded_ids())
        ready = [rid for rid in request_ids if rid in held][: self.engine.num_free_slots]
        if ready:
            self.engine.upload(ready)
            metrics.KV_SWAPS.labels("upload").inc(len(ready))
        return [rid for rid in request_ids if rid not in ready]

    def _prefetch_done(self, future: asyncio.Future[list[str]]) -> None:
        # The scheduler counts on these uploads; if one did not happen its next step is refused
        # and the scheduler recovers (frees everything here and recomputes).
        if future.exception() is not None:
            self.log.error("prefetch.failed", error=repr(future.exception()))
        elif future.result():
            self.log.warning("prefetch.incomplete", not_uploaded=future.result())

    async def on_release(self, request: Request) -> None:
        command = await parse_request(request, ReleaseCommand, "release command")
        if command is None:
            return
        # Through the whole pipeline: every stage holds a part of these caches.
        stage = StageCommand(batch=StageBatch([], []).to_wire(), release=command.request_ids)
        outcome = await self._compute_stage(stage)
        if not isinstance(outcome, tuple):
            outcome = await self._forward(stage, outcome)
        if isinstance(outcome, tuple):
            await request.respond_error(*outcome)
            return
        await request.respond(encode({"released": len(command.request_ids)}))

    async def watch_ranks(self) -> None:
        """An instance that lost a tensor-parallel rank cannot compute (its all-reduces would
        wait for the dead rank): it ends at once, like a preempted instance without grace, and
        its requests resume elsewhere from their committed tokens."""
        while isinstance(self.engine, ShardedEngine):
            dead = self.engine.dead_ranks()
            if dead:
                self.rank_lost(RankFailedError(f"tensor-parallel ranks {dead} died"))
            await asyncio.sleep(RANK_WATCH_S)

    def rank_lost(self, exc: RankFailedError) -> None:
        self.log.critical("executor.rank_lost", error=str(exc))
        # Not a graceful stop: the compute thread may be stuck in a collective with the dead
        # rank, and a clean shutdown would wait for it.
        os._exit(EXIT_RANK_LOST)

    def close(self) -> None:
        for task in self._handing_on:
            task.cancel()
        if isinstance(self.engine, ShardedEngine):
            self._compute.submit(self.engine.close).result()
        self._compute.shutdown(wait=True)


def observe_step(result: StepResult) -> None:
    metrics.STEPS.labels("ok").inc()
    metrics.STEP_SECONDS.observe(result.compute_s)
    metrics.SAMPLED_TOKENS.inc(len(result.tokens))


def observe_transfer(kind: str, direction: str, nbytes: int) -> None:
    metrics.TRANSFERS.labels(kind, direction).inc()
    metrics.TRANSFER_BYTES.labels(kind, direction).inc(nbytes)


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


def held_layers(engine: AnyEngine, last: int) -> set[int]:
    """Layers an engine holds, with -1 for the embeddings and last+1 for the norm and head."""
    first, final = engine.layers
    held = set(range(first, final + 1))
    held |= {-1} if engine.is_first_stage else set()
    held |= {last + 1} if engine.is_last_stage else set()
    return held


def checkpoint_tensors(engine: Engine, layers: list[int], last: int) -> dict[str, torch.Tensor]:
    """An engine's weights for these layers under their checkpoint (HF) names."""
    model = engine.model
    tensors = {}
    for name, parameter in model.named_parameters():
        if name.startswith("layers."):
            index, rest = name.removeprefix("layers.").split(".", 1)
            layer = model.first_layer + int(index)
            if layer in layers:
                tensors[f"model.layers.{layer}.{rest}"] = parameter.detach()
        elif name.startswith("embed_tokens."):
            if -1 in layers:
                tensors[f"model.{name}"] = parameter.detach()
        elif last + 1 in layers:
            tensors[name if name.startswith("lm_head.") else f"model.{name}"] = parameter.detach()
    return tensors


def warm_up(engine: AnyEngine) -> None:
    """One prefill and one decode before serving: the first real request should not pay for
    the kernels' first-call setup."""
    first = engine.step([SequenceStep("warm-up", [0] * 16, 0.0, 1.0, 0, 0)])
    engine.step([SequenceStep("warm-up", [first["warm-up"]], 0.0, 1.0, 0, 1)])
    engine.release(["warm-up"])


def default_instance_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:8]}"


class Registration:
    """This instance's record in the registry: put once it serves, re-put every heartbeat (the
    monitor's lease runs on its own clock), deleted on a clean stop. A heartbeat that finds its
    key gone (the monitor declared the instance lost) registers again as a new incarnation."""

    def __init__(self, context: ServiceContext, record: InstanceRecord) -> None:
        self.context = context
        self.record = record
        self.log = context.log.bind(instance_id=record.instance_id)
        self._kv: KeyValue | None = None
        self._revision = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._kv = await instances_bucket(self.context.js)
        self._revision = await self._kv.put(self.record.instance_id, encode(self.record))
        self._task = asyncio.create_task(self._beat())
        self.log.info("registry.registered", started_at=self.record.started_at)

    async def _beat(self) -> None:
        assert self._kv is not None
        key = self.record.instance_id
        while True:
            await asyncio.sleep(self.context.settings.monitor.heartbeat_s)
            now = time.time()
            self.record = self.record.model_copy(update={"heartbeat_at": now})
            try:
                try:
                    self._revision = await self._kv.update(
                        key, encode(self.record), last=self._revision
                    )
                except KeyWrongLastSequenceError:
                    if not await self._still_ours(key):
                        self.record = self.record.model_copy(update={"started_at": now})
                        self.log.warning("registry.rejoined", started_at=now)
                        self._revision = await self._kv.put(key, encode(self.record))
            except (NatsError, TimeoutError) as exc:
                self.log.warning("registry.heartbeat_failed", error=repr(exc))

    async def _still_ours(self, key: str) -> bool:
        """After a heartbeat whose ack was lost: is the key still this incarnation's?"""
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
            current = InstanceRecord.model_validate(decode(entry.value or b""))
        except (NotFoundError, DecodeError, ValidationError):
            return False
        if current.started_at != self.record.started_at or current.pid != self.record.pid:
            return False
        self._revision = entry.revision or 0
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._kv is not None:
            try:
                await self._kv.delete(self.record.instance_id)
            except (NatsError, TimeoutError) as exc:  # the lease then expires on its own
                self.log.warning("registry.delete_failed", error=repr(exc))


async def serve(context: ServiceContext) -> None:
    settings = context.settings.executor
    instance_id = settings.instance_id or default_instance_id()
    ranks = settings.tensor_parallel
    lease: HostLease | None = None
    if context.settings.model.name is None:
        model_dir = await resolve_model(context)
    else:
        # Through this node's loader: from its host-memory pool when the model fits there (one
        # rank; tensor-parallel ranks read their shards from the node's disk copy).
        fetched = await fetch_model(context, host_lease=ranks == 1)
        model_dir, lease = Path(fetched.path), fetched.host
    # One thread does all torch work, loading included: the engine and its KV cache are not
    # thread-safe, steps are ordered, and CPU (OpenMP) kernels run ~40% slower when a second
    # thread's team of workers exists beside the one that computes.
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
    spec = EngineSpec(
        model_dir=model_dir,
        device=settings.device,
        max_slots=settings.max_slots,
        max_seq_len=settings.max_seq_len,
        host_slots=settings.host_kv_slots,
        torch_threads=settings.torch_threads,
    )

    def build(layers: Layers | None, weights: WeightsSource | None = None) -> AnyEngine:
        """An engine for a layer range (a pipeline stage) or the whole model: from ``weights``
        (tensors gathered from peers) or read from the node's disk copy (only the stage's byte
        ranges; with tensor parallelism, every rank its shard)."""
        if isinstance(executor.engine, ShardedEngine):
            executor.engine.rebuild(replace(spec, layers=layers))
            return executor.engine
        return Engine(
            model_dir,
            device=settings.device,
            max_slots=settings.max_slots,
            max_seq_len=settings.max_seq_len,
            host_slots=settings.host_kv_slots,
            weights=weights,
            layers=layers,
        )

    def load() -> AnyEngine:
        engine: AnyEngine
        if ranks > 1:
            engine = ShardedEngine(spec, ranks)
        else:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            engine = Engine(
                model_dir,
                device=settings.device,
                max_slots=settings.max_slots,
                max_seq_len=settings.max_seq_len,
                host_slots=settings.host_kv_slots,
                weights=partial(load_from_host_pool, lease) if lease else None,
            )
        warm_up(engine)
        return engine

    started = time.perf_counter()
    try:
        engine = await asyncio.get_running_loop().run_in_executor(compute, load)
    finally:
        if lease is not None:
            await release_host_lease(context, lease)
    seconds = time.perf_counter() - started
    source = "host-pool" if lease else "disk"
    metrics.MODEL_LOAD_SECONDS.labels("start", source).observe(seconds)
    context.log.info(
        "model.loaded", source=source, tensor_parallel=ranks, seconds=round(seconds, 3)
    )
    executor = Executor(context, engine, instance_id, compute)
    executor.build = build
    metrics.observe_engine_memory(
        settings.max_slots,
        settings.host_kv_slots,
        free_slots=lambda: executor.engine.num_free_slots,
        offloaded=lambda: len(executor.engine.offloaded_ids()),
    )
    service = await context.add_micro_service(
        "Runs decoding iterations of one instance's model",
        metadata={
            "instance_id": instance_id,
            "max_slots": str(settings.max_slots),
            "host_kv_slots": str(settings.host_kv_slots),
            "device": str(engine.device),
            "tensor_parallel": str(ranks),
            "model": str(model_dir),
        },
    )
    # Each instance has its own subjects (the scheduler addresses the instance holding the KV).
    endpoints = [
        ("step", executor_step_subject, executor.on_step),
        ("release", executor_release_subject, executor.on_release),
        ("migrate", executor_migrate_subject, executor.on_migrate),
        ("adopt", executor_adopt_subject, executor.on_adopt),
        ("stage", executor_stage_subject, executor.on_stage),
        ("weights", executor_weights_subject, executor.on_weights),
    ]
    for name, subject, handler in endpoints:
        await service.add_endpoint(name=name, subject=subject(instance_id), handler=handler)
    await executor.inbox.start()
    plans = asyncio.create_task(follow_plans(context, executor.take_role), name="plans")
    watch = asyncio.create_task(executor.watch_ranks(), name="ranks")
    price_class = context.settings.monitor.price_class
    registration = Registration(
        context,
        InstanceRecord(
            instance_id=instance_id,
            node=node_name(context.settings),
            devices=ranks,
            device_kind=engine.device.type,
            device_memory_bytes=settings.device_memory_bytes
            if settings.device_memory_bytes is not None
            else device_memory_bytes(engine.device),
            price_class=price_class,
            price_per_hour=context.settings.monitor.spot_price_per_hour
            if price_class == "spot"
            else context.settings.monitor.on_demand_price_per_hour,
            pid=os.getpid(),
            started_at=time.time(),
            heartbeat_at=time.time(),
        ),
    )
    await registration.start()
    executor.log.info("executor.ready", device=str(engine.device), model=str(model_dir))
    await context.stop.wait()
    plans.cancel()
    watch.cancel()
    await registration.stop()
    await service.stop()
    await executor.inbox.stop()
    executor.close()
