"""Weights between instances, peer to peer: a new stage's layers gathered from what this
engine holds and what peers send, and this engine's layers sent to a peer that needs them."""

from __future__ import annotations

import asyncio
import uuid

import torch
from nats.errors import Error as NatsError

from services.executor import metrics
from services.executor.host import KV_TRANSFER_TIMEOUT_S, InstancePart
from shared.loading.format import Layers
from shared.messages import Plan, WeightsSendCommand, WeightsSent
from shared.rpc import WEIGHTS_ENDPOINT, NotFound, RpcError, Unavailable, call
from shared.transfer import TransferError, TransferFailedError

Tensors = dict[str, torch.Tensor]
Sources = dict[str, list[int]]  # peer instance -> the layers it sends


def stage_layers(wanted: Layers, n_layers: int) -> set[int]:
    """A stage's layers, with -1 for the embeddings and ``n_layers`` for the norm and head."""
    needed = set(range(wanted[0], wanted[1] + 1))
    needed |= {-1} if wanted[0] == 0 else set()
    needed |= {n_layers} if wanted[1] == n_layers - 1 else set()
    return needed


def peer_sources(plan: Plan, instance_id: str, missing: set[int]) -> Sources:
    """The peers the plan says send this instance which of the ``missing`` layers."""
    sources: Sources = {}
    for transfer in plan.transfers:
        if (
            transfer.kind == "weights"
            and transfer.instance_id == instance_id
            and transfer.layer in missing
            and transfer.source_instance not in (None, instance_id)
        ):
            layers = sources.setdefault(str(transfer.source_instance), [])
            if transfer.layer not in layers:
                layers.append(transfer.layer)
    return sources


class WeightsExchange(InstancePart):
    async def send(self, command: WeightsSendCommand) -> WeightsSent:
        """Send some of this engine's layers to a peer taking a role that needs them."""
        engine = self.host.engine
        if not engine.can_send_weights:
            raise NotFound("tensor-parallel shards here: read the layers from disk")
        missing = set(command.layers) - engine.held_layers()
        if missing:
            raise NotFound(f"not held here: {missing}")
        tensors = await self.host.run(engine.checkpoint_tensors, command.layers)
        try:
            stats = await self.send_to_peer(command.destination, tensors, command.transfer_id)
        except (TransferError, TimeoutError) as exc:
            metrics.transfer_failed("weights", "sent")
            raise Unavailable(f"transfer failed: {exc}") from None
        metrics.observe_transfer("weights", "sent", stats.bytes_sent)
        self.log.info("weights.sent", destination=command.destination, layers=command.layers)
        return WeightsSent(nbytes=stats.bytes_sent)

    async def gather(self, plan: Plan, wanted: Layers) -> tuple[Tensors | None, Sources]:
        """The new stage's tensors: what this engine already holds, plus what the plan says
        peers send (streamed peer to peer). (None, ...) when some layer has to come from the
        loader or a peer failed: the caller then reads the whole stage from the node's disk."""
        engine = self.host.engine
        if not engine.can_send_weights:
            return None, {}  # every rank reads its shard of the stage from the node's disk
        needed = stage_layers(wanted, engine.n_layers)
        held = engine.held_layers() & needed
        sources = peer_sources(plan, self.instance_id, needed - held)
        if needed - held - {layer for layers in sources.values() for layer in layers}:
            return None, {}
        state = await self.host.run(engine.checkpoint_tensors, sorted(held))
        for source, layers in sources.items():
            received = await self._fetch(source, layers)
            if received is None:
                return None, {}
            state.update(received)
        return state, sources

    async def _fetch(self, source: str, layers: list[int]) -> Tensors | None:
        transfer_id = f"w-{uuid.uuid4().hex}"
        command = WeightsSendCommand(
            layers=sorted(layers), destination=self.instance_id, transfer_id=transfer_id
        )
        receiving = asyncio.create_task(self.inbox.receive(transfer_id, KV_TRANSFER_TIMEOUT_S))
        try:
            await call(
                self.context.nc,
                WEIGHTS_ENDPOINT,
                command,
                address=source,
                timeout_s=KV_TRANSFER_TIMEOUT_S,
            )
            received = await receiving
        except (RpcError, TimeoutError, NatsError, TransferError, TransferFailedError) as exc:
            receiving.cancel()
            metrics.transfer_failed("weights", "received")
            self.log.warning("weights.fetch_failed", source=source, error=repr(exc))
            return None
        metrics.observe_transfer("weights", "received", received.nbytes)
        return dict(received.tensors)
