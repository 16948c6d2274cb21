"""The interface every scheduling policy implements, and what a policy sees of the fleet.

Kept apart from the policies themselves (``policy``, ``mlfq``) so that each policy module
builds on it and ``policy.make_policy`` can name every policy without an import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from services.scheduler.sequence import Sequence


@dataclass(frozen=True)
class ExecutorView:
    """What a policy may know of one executor instance."""

    instance_id: str
    # Sequences per iteration; the memory plan may run fewer when their KV blocks do not fit.
    max_batch_size: int
    # The executor's paged device KV cache: blocks of block_size positions.
    kv_blocks: int = 1 << 30
    block_size: int = 16
    # Most positions (prompt plus generated tokens) one sequence may take there.
    max_seq_len: int = 1 << 30
    # Offloaded KV caches it keeps in host memory (sequences).
    host_slots: int = 0
    # False while the current plan gives the instance no role (e.g. it is being preempted):
    # it finishes the sequences bound to it but takes no new ones.
    accepts_new: bool = True


@dataclass(frozen=True)
class StepOutput:
    """What one iteration produced, for the policy's accounting."""

    instance_id: str
    batch: list[Sequence]
    compute_s: float


class SchedulerPolicy(ABC):
    @abstractmethod
    def add_request(self, sequence: Sequence) -> None:
        """A new (or resumed) request is waiting to run."""

    @abstractmethod
    def schedule(self, executor: ExecutorView) -> list[Sequence]:
        """The batch of the next iteration on ``executor``.

        Sequences without an executor that are put in the batch are bound to it (their KV
        cache will live there); a sequence bound elsewhere must never be returned.
        """

    @abstractmethod
    def priority_order(self, executor: ExecutorView) -> list[Sequence]:
        """Every unfinished sequence that may run on ``executor`` (bound to it, or not bound
        yet), the most urgent first. KV memory planning uses it: caches of the tail are offloaded
        first, offloaded caches of the head are uploaded ahead of time."""

    @abstractmethod
    def update_from_output(self, output: StepOutput) -> None:
        """Account for a finished iteration; finished sequences leave the policy."""

    @abstractmethod
    def requeue_executor(self, instance_id: str) -> list[Sequence]:
        """The executor is gone: its sequences wait again (they will recompute their cache)."""

    @abstractmethod
    def requeue(self, sequence: Sequence) -> None:
        """Move one sequence off its executor (a plan moves it): it waits again, unbound, and
        keeps its place; its cache is recomputed wherever it runs next."""

    @abstractmethod
    def rebind(self, sequence: Sequence, instance_id: str) -> None:
        """Its KV cache moved to another executor (a plan migrated it): it runs there next,
        keeping its place."""

    @abstractmethod
    def remove(self, sequence: Sequence) -> None:
        """Drop a sequence (failed or aborted) wherever it is."""

    @abstractmethod
    def num_unfinished(self) -> int:
        """Sequences waiting or running."""
