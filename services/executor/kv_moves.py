"""KV caches moving between instances, peer to peer (shared.transfer): this instance sends
one (``migrate``) or takes one in (``adopt``)."""

from __future__ import annotations

import torch

from services.executor import metrics
from services.executor.host import KV_TRANSFER_TIMEOUT_S, InstancePart
from shared.messages import KvAdoptCommand, KvMigrateCommand, KvMoveReply
from shared.model.engine import EngineError
from shared.rpc import BadRequest, NotFound, Unavailable
from shared.transfer import TransferError, TransferFailedError

# The cache's length travels beside its tensors, as one more tensor.
LENGTH_TENSOR = "length"


class KvMoves(InstancePart):
    async def migrate(self, command: KvMigrateCommand) -> KvMoveReply:
        """Send one request's KV cache to another executor; freed here once the receiver has
        it, checked."""
        try:
            length, tensors = await self.host.run(self.host.engine.export_kv, command.request_id)
            tensors[LENGTH_TENSOR] = torch.tensor(length, dtype=torch.int64)
            stats = await self.send_to_peer(command.destination, tensors, command.transfer_id)
        except EngineError as exc:
            raise NotFound(str(exc)) from None
        except (TransferError, TimeoutError) as exc:
            metrics.transfer_failed("kv", "sent")
            self.log.warning("kv.migrate_failed", request_id=command.request_id, error=str(exc))
            raise Unavailable(f"transfer failed: {exc}") from None
        await self.host.run(self.host.engine.release, [command.request_id])
        metrics.observe_transfer("kv", "sent", stats.bytes_sent)
        self.log.info(
            "kv.migrated",
            request_id=command.request_id,
            destination=command.destination,
            nbytes=stats.bytes_sent,
        )
        return KvMoveReply(request_id=command.request_id, nbytes=stats.bytes_sent)

    async def adopt(self, command: KvAdoptCommand) -> KvMoveReply:
        """Take a KV cache arriving from another executor into host memory (the scheduler
        uploads it before the request runs here)."""
        try:
            received = await self.inbox.receive(command.transfer_id, KV_TRANSFER_TIMEOUT_S)
            tensors = dict(received.tensors)
            length = int(tensors.pop(LENGTH_TENSOR))
            landed = await self.host.run(
                self.host.engine.import_kv, command.request_id, length, tensors, "host"
            )
        except (TransferFailedError, TimeoutError, KeyError) as exc:
            metrics.transfer_failed("kv", "received")
            raise Unavailable(f"no KV cache arrived: {exc}") from None
        except EngineError as exc:
            raise BadRequest(str(exc)) from None
        metrics.observe_transfer("kv", "received", received.nbytes)
        return KvMoveReply(request_id=command.request_id, nbytes=received.nbytes, landed=landed)
