"""This instance's record in the registry (the monitor's view of the fleet)."""

from __future__ import annotations

import asyncio
import time

from nats.errors import Error as NatsError
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shared.codec import DecodeError, decode, encode
from shared.messages import InstanceRecord
from shared.runtime import ServiceContext
from shared.subjects import instances_bucket


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
