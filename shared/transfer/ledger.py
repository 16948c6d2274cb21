"""The receiver's record of finished transfers and of who waits for them."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import structlog

from shared.transfer.errors import TransferFailedError
from shared.transfer.inbound import ReceivedTransfer

# Finished transfers remembered (a late offer of a complete one is not sent again; a status
# probe learns how one ended).
FINISHED_KEPT = 4096
# Recent failures kept for operators and tests.
FAILURES_KEPT = 1024

OnComplete = Callable[[ReceivedTransfer], "Awaitable[None] | None"]
OnFailed = Callable[[str, str], "Awaitable[None] | None"]
FinishedState = tuple[Literal["complete", "failed"], str | None]  # and the failure's reason


class TransferLedger:
    """Hands finished transfers to ``on_complete`` and to whoever awaits :meth:`receive`
    (with neither, a transfer waits in memory until :meth:`receive` claims it), and reports
    failures to ``on_failed`` and to the waiters."""

    def __init__(
        self,
        on_complete: OnComplete | None,
        on_failed: OnFailed | None,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.on_complete = on_complete
        self.on_failed = on_failed
        self.log = log
        self._finished: OrderedDict[str, FinishedState] = OrderedDict()
        self._results: dict[str, ReceivedTransfer] = {}
        self._waiters: dict[str, list[asyncio.Future[ReceivedTransfer]]] = {}
        # Recent failures (transfer id -> reason).
        self.failures: OrderedDict[str, str] = OrderedDict()

    def state(self, transfer_id: str) -> FinishedState | None:
        return self._finished.get(transfer_id)

    def restart(self, transfer_id: str) -> None:
        """A new offer of a failed earlier attempt starts it afresh."""
        self._finished.pop(transfer_id, None)

    async def receive(self, transfer_id: str, timeout_s: float) -> ReceivedTransfer:
        """The transfer once complete; :class:`TransferFailedError` if it is given up while
        waited for (a re-sourced retry may follow: wait again), TimeoutError after timeout_s."""
        if transfer_id in self._results:
            return self._results.pop(transfer_id)
        future: asyncio.Future[ReceivedTransfer] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(transfer_id, [])
        waiters.append(future)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise TimeoutError(
                f"transfer {transfer_id} did not arrive within {timeout_s:.1f} s"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(transfer_id, None)

    async def completed(self, result: ReceivedTransfer) -> None:
        tid = result.transfer_id
        self._remember(tid, ("complete", None))
        waiters = self._waiters.get(tid, [])
        for future in waiters:
            if not future.done():
                future.set_result(result)
        if self.on_complete is not None:
            await self._call(self.on_complete, result)
        elif not waiters:
            self._results[tid] = result

    async def failed(self, transfer_id: str, reason: str) -> None:
        self._remember(transfer_id, ("failed", reason))
        self.failures[transfer_id] = reason
        while len(self.failures) > FAILURES_KEPT:
            self.failures.popitem(last=False)
        for future in self._waiters.get(transfer_id, []):
            if not future.done():
                future.set_exception(TransferFailedError(transfer_id, reason))
        if self.on_failed is not None:
            await self._call(self.on_failed, transfer_id, reason)

    async def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.log.exception("transfer.callback_error")

    def _remember(self, transfer_id: str, state: FinishedState) -> None:
        self._finished[transfer_id] = state
        self._finished.move_to_end(transfer_id)
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
