"""Scheduling policies behind one small interface (in the spirit of vLLM's SchedulerInterface).

The service owns the NATS side (consuming requests, talking to executors, committing tokens);
a policy only decides which sequences run in the next iteration of each executor. A new
policy is one class implementing :class:`SchedulerPolicy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.scheduler.sequence import Sequence
from shared.config import MlfqSettings


@dataclass(frozen=True)
class ExecutorView:
    """What a policy may know of one executor instance."""

    instance_id: str
    # Never more than the executor's device KV slots: every sequence in a batch is resident.
    max_batch_size: int
    # KV caches the executor holds on the device, and offloaded in host memory.
    kv_slots: int = 1 << 30
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


class FcfsPolicy(SchedulerPolicy):
    """First come, first served with continuous batching (Orca-style): running sequences stay
    in the batch until they finish; free batch places go to the oldest waiting requests."""

    def __init__(self) -> None:
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, list[Sequence]] = {}
        self._arrival: dict[Sequence, int] = {}
        self._arrivals = 0

    def add_request(self, sequence: Sequence) -> None:
        self._arrival[sequence] = self._arrivals
        self._arrivals += 1
        self.waiting.append(sequence)

    def schedule(self, executor: ExecutorView) -> list[Sequence]:
        running = self.running.setdefault(executor.instance_id, [])
        while executor.accepts_new and len(running) < executor.max_batch_size and self.waiting:
            sequence = self.waiting.popleft()
            sequence.executor = executor.instance_id
            running.append(sequence)
        return list(running[: executor.max_batch_size])

    def priority_order(self, executor: ExecutorView) -> list[Sequence]:
        waiting = list(self.waiting) if executor.accepts_new else []
        return [*self.running.get(executor.instance_id, []), *waiting]

    def update_from_output(self, output: StepOutput) -> None:
        running = self.running.get(output.instance_id, [])
        for sequence in running:
            if sequence.finished:
                self._arrival.pop(sequence, None)
        running[:] = [sequence for sequence in running if not sequence.finished]

    def requeue_executor(self, instance_id: str) -> list[Sequence]:
        lost = self.running.pop(instance_id, [])
        for sequence in lost:
            sequence.lose_cache()
        self._wait_again(lost)
        return lost

    def requeue(self, sequence: Sequence) -> None:
        running = self.running.get(sequence.executor or "", [])
        if sequence in running:
            running.remove(sequence)
            sequence.lose_cache()
            self._wait_again([sequence])

    def rebind(self, sequence: Sequence, instance_id: str) -> None:
        running = self.running.get(sequence.executor or "", [])
        if sequence in running:
            running.remove(sequence)
        sequence.executor = instance_id
        self.running.setdefault(instance_id, []).append(sequence)

    def _wait_again(self, sequences: list[Sequence]) -> None:
        # They arrived before (most of) the waiting ones: merge back in arrival order.
        self.waiting = deque(sorted([*self.waiting, *sequences], key=self._arrival.__getitem__))

    def remove(self, sequence: Sequence) -> None:
        self._arrival.pop(sequence, None)
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        for running in self.running.values():
            if sequence in running:
                running.remove(sequence)

    def num_unfinished(self) -> int:
        return len(self.waiting) + sum(len(running) for running in self.running.values())


POLICY_NAMES = ("fcfs", "skip-join-mlfq")


def make_policy(
    name: str,
    mlfq: MlfqSettings | None = None,
    prefill_time_s: Callable[[int], float] | None = None,
) -> SchedulerPolicy:
    """The policy called ``name``; skip-join MLFQ needs the profiled prefill time."""
    if name == "fcfs":
        return FcfsPolicy()
    if name == "skip-join-mlfq":
        # Imported here: mlfq builds on this module.
        from services.scheduler.mlfq import SkipJoinMlfqPolicy

        if prefill_time_s is None:
            raise ValueError("skip-join-mlfq needs a prefill-time profile (spotserve profile)")
        return SkipJoinMlfqPolicy(mlfq or MlfqSettings(), prefill_time_s)
    raise ValueError(f"unknown scheduling policy {name!r}; choose from {list(POLICY_NAMES)}")
