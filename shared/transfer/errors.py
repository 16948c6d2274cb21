"""The transfer protocol's errors, on either side."""

from __future__ import annotations


class TransferError(RuntimeError):
    """A send did not complete: the receiver refused, failed it, vanished or timed out."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransferTimeoutError(TransferError):
    """The whole transfer did not complete within ``timeout_s``."""


class TransferFailedError(RuntimeError):
    """Receiver side: the transfer was given up (its sender went silent, a checksum kept
    failing, the sender aborted, the inbox stopped). Another offer of the id may follow."""

    def __init__(self, transfer_id: str, reason: str) -> None:
        super().__init__(f"transfer {transfer_id} failed: {reason}")
        self.transfer_id = transfer_id
        self.reason = reason
