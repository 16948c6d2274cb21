"""A pipeline stage's link to the next one: hands a micro-batch on and waits for the tokens
the last stage samples for it."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import torch
from nats.errors import Error as NatsError

from services.executor import metrics
from services.executor.host import InstancePart
from shared.codec import encode
from shared.messages import DeviceRole, Plan, StageCommand
from shared.model.engine import StageBatch, StageResult
from shared.rpc import (
    STAGE_ENDPOINT,
    NoResponders,
    RpcTimeout,
    Unavailable,
    raise_for_error,
    request_raw,
)
from shared.transfer import TransferError

# Room under the server's max payload for a stage command's headers.
STAGE_HEADER_ROOM = 64 * 1024

Tokens = dict[str, int]  # request_id -> the token sampled for it


@dataclass
class Placement:
    """Where this instance sits in its replica's pipeline under the current plan."""

    next_stage: str | None = None  # the instance serving the next pipeline stage
    stages: int = 1  # stages of this instance's replica

    def take(self, plan: Plan, role: DeviceRole) -> None:
        following = next(
            (r for r in plan.roles if r.replica == role.replica and r.stage == role.stage + 1),
            None,
        )
        self.next_stage = following.instance_id if following else None
        self.stages = len({r.stage for r in plan.roles if r.replica == role.replica})


class StageLink:
    def __init__(self, part: InstancePart, placement: Placement) -> None:
        self.part = part
        self.context = part.context
        self.placement = placement

    async def forward(self, stage: StageCommand, outcome: StageResult) -> Tokens:
        """The sampled tokens of a micro-batch this stage has run: its own (the last stage) or
        the next stage's, once it has them; :class:`shared.rpc.RpcError` when there are none."""
        if outcome.tokens is not None:
            return outcome.tokens
        next_stage = self.placement.next_stage
        if next_stage is None or outcome.next is None:
            raise Unavailable("no next pipeline stage in the current plan")
        body, hidden = self._command(stage, outcome.next)
        sending = None
        if hidden is not None:
            transfer_id, tensor = hidden
            sending = asyncio.create_task(
                self.part.send_to_peer(next_stage, {"hidden": tensor}, transfer_id)
            )
        try:
            reply = await request_raw(
                self.context.nc,
                STAGE_ENDPOINT.subject_for(next_stage),
                body,
                self.context.settings.scheduler.step_timeout_s,
            )
            if sending is not None:
                metrics.observe_transfer("activations", "sent", (await sending).bytes_sent)
        except (NoResponders, RpcTimeout, TimeoutError, NatsError, TransferError) as exc:
            if sending is not None:
                sending.cancel()
                metrics.transfer_failed("activations", "sent")
            raise Unavailable(f"next stage {next_stage}: {exc!r}") from None
        # The next stage's own error answer goes back as it is.
        raise_for_error(reply)
        return STAGE_ENDPOINT.parse_reply(reply.data).tokens

    def _command(
        self, stage: StageCommand, batch: StageBatch
    ) -> tuple[bytes, tuple[str, torch.Tensor] | None]:
        """The next stage's command, and (transfer id, hidden states) when the hidden states
        are too large for one message: they then stream through shared.transfer (chunked,
        flow controlled) while the command itself goes as usual."""
        wire = batch.to_wire()
        body = encode(stage.model_copy(update={"batch": wire, "hidden_transfer": None}))
        limit = self.context.settings.executor.stage_message_bytes or (
            self.context.nc.max_payload - STAGE_HEADER_ROOM
        )
        if len(body) <= limit:
            return body, None
        transfer_id = f"act-{uuid.uuid4().hex}"
        hidden: torch.Tensor = wire.pop("hidden")
        body = encode(stage.model_copy(update={"batch": wire, "hidden_transfer": transfer_id}))
        return body, (transfer_id, hidden)
