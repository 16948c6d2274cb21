"""Scheduling policies behind one small interface (in the spirit of vLLM's SchedulerInterface).

The service owns the NATS side (consuming requests, talking to executors, committing tokens);
a policy only decides which sequences run in the next iteration of each executor. A new
policy is one class implementing :class:`SchedulerPolicy`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from services.scheduler.gittins import GittinsPolicy, prefill_in_tokens
from services.scheduler.mlfq import SkipJoinMlfqPolicy
from services.scheduler.policy_base import ExecutorView, SchedulerPolicy, StepOutput
from services.scheduler.sequence import Sequence
from shared.config import AdaptiveSettings, MlfqSettings

# The interface lives in policy_base; it is named here too, where callers look for policies.
__all__ = [
    "POLICY_NAMES",
    "ExecutorView",
    "FcfsPolicy",
    "SchedulerPolicy",
    "StepOutput",
    "make_policy",
]


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
            sequence.bind_to(executor.instance_id)
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
        sequence.bind_to(instance_id)
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


POLICY_NAMES = ("fcfs", "skip-join-mlfq", "adaptive")


def make_policy(
    name: str,
    mlfq: MlfqSettings | None = None,
    prefill_time_s: Callable[[int], float] | None = None,
    adaptive: AdaptiveSettings | None = None,
    *,
    decode_time_s: Callable[[int], float] | None = None,
    max_batch_size: int = 8,
    clock: Callable[[], float] = time.monotonic,
) -> SchedulerPolicy:
    """The policy called ``name``, on ``clock`` (a simulation passes its own). Skip-join MLFQ
    needs the profiled ``prefill_time_s``; the adaptive policy counts prefills in a new job's
    index when it has both ``prefill_time_s`` and ``decode_time_s`` (by batch size)."""
    if name == "fcfs":
        return FcfsPolicy()
    if name == "adaptive":
        prefill_tokens = None
        if prefill_time_s is not None and decode_time_s is not None:
            prefill_tokens = prefill_in_tokens(prefill_time_s, decode_time_s, max_batch_size)
        return GittinsPolicy(adaptive or AdaptiveSettings(), prefill_tokens, clock)
    if name == "skip-join-mlfq":
        if prefill_time_s is None:
            raise ValueError("skip-join-mlfq needs a prefill-time profile (spotserve profile)")
        return SkipJoinMlfqPolicy(mlfq or MlfqSettings(), prefill_time_s, clock)
    raise ValueError(f"unknown scheduling policy {name!r}; choose from {list(POLICY_NAMES)}")
