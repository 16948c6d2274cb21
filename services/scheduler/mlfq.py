"""Skip-join multi-level feedback queue (FastServe, Wu et al. 2023).

Preemptive, iteration-level scheduling that approximates shortest-remaining-time-first without
knowing output lengths. Queues Q0 (most urgent) .. Q{k-1}; a job may use quantum(i) =
base_quantum_s * 2**i of iteration time in Qi before it is demoted one level. A new job skips
the queues whose quantum is shorter than its first (prefill) iteration: it would be demoted from
them right away, after delaying the short jobs there. A job that has waited too long is promoted
back to Q0, so a stream of short jobs cannot starve the long ones.

The batch is rebuilt every iteration, so a job not chosen is preempted at the iteration boundary;
it keeps its executor binding (its KV cache stays there) and its place in its queue.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from services.scheduler.policy_base import ExecutorView, SchedulerPolicy, StepOutput
from services.scheduler.sequence import Sequence
from shared.config import MlfqSettings

# Sums of measured iteration times are inexact; a quantum counts as used up within this slack.
_QUANTUM_SLACK_S = 1e-9


@dataclass
class _Job:
    """The policy's bookkeeping of one sequence (kept here, not on Sequence)."""

    queue: int
    # Clock time it was last in a batch (or arrived): starvation is measured from there.
    last_ran: float
    # Iteration time used in its current queue.
    used_s: float = 0.0
    # In the batch of an iteration still running: not waiting, so never starving.
    in_batch: bool = False


class SkipJoinMlfqPolicy(SchedulerPolicy):
    """Skip-join MLFQ with starvation promotion; see the module docstring."""

    def __init__(
        self,
        settings: MlfqSettings,
        prefill_time_s: Callable[[int], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._prefill_time_s = prefill_time_s
        self._clock = clock
        # Each queue is an insertion-ordered dict used as an ordered set: O(1) append and
        # removal; a push to the front rebuilds it (O(queue), at most once per iteration).
        self._queues: list[dict[Sequence, None]] = [{} for _ in range(settings.num_queues)]
        self._jobs: dict[Sequence, _Job] = {}
        # The last batch handed to each executor, until its iteration is accounted for.
        self._batches: dict[str, list[Sequence]] = {}

    # ---- SchedulerPolicy ----

    def add_request(self, sequence: Sequence) -> None:
        if sequence in self._jobs:
            return  # already waiting or running: it keeps its place
        # A resumed job recomputes its committed tokens too: that is its first iteration.
        tokens = len(sequence.request.prompt_token_ids) + len(sequence.generated)
        level = self.entry_queue(self._prefill_time_s(tokens))
        self._jobs[sequence] = _Job(queue=level, last_ran=self._clock())
        self._queues[level][sequence] = None

    def schedule(self, executor: ExecutorView) -> list[Sequence]:
        now = self._clock()
        # A batch of this executor never accounted for (its step failed) is over anyway.
        self._end_iteration(executor.instance_id)
        self._promote_starved(now)
        eligible = self._eligible(executor)
        batch = list(itertools.islice(eligible, executor.max_batch_size))
        for sequence in batch:
            if sequence.executor is None:
                sequence.bind_to(executor.instance_id)  # its KV cache will live there
            job = self._jobs[sequence]
            job.in_batch = True
            job.last_ran = now
        self._batches[executor.instance_id] = batch
        return list(batch)

    def priority_order(self, executor: ExecutorView) -> list[Sequence]:
        return list(self._eligible(executor))

    def update_from_output(self, output: StepOutput) -> None:
        now = self._clock()
        self._end_iteration(output.instance_id)
        demoted: list[Sequence] = []
        for sequence in output.batch:
            job = self._jobs.get(sequence)
            if job is None:
                continue  # removed while its iteration ran
            job.in_batch = False
            job.last_ran = now
            if sequence.finished:
                self.remove(sequence)
            elif self._charge(job, output.compute_s):
                demoted.append(sequence)
        self._demote(demoted)

    def requeue_executor(self, instance_id: str) -> list[Sequence]:
        self._end_iteration(instance_id)
        lost = [sequence for sequence in self._in_order() if sequence.executor == instance_id]
        for sequence in lost:
            sequence.lose_cache()  # unbound: any executor may recompute it; its place is kept
        return lost

    def requeue(self, sequence: Sequence) -> None:
        # Called between its executor's iterations: unbound, its place in its queue is kept.
        if sequence in self._jobs:
            sequence.lose_cache()

    def rebind(self, sequence: Sequence, instance_id: str) -> None:
        if sequence in self._jobs:
            sequence.bind_to(instance_id)  # the binding is all there is; its place is kept

    def remove(self, sequence: Sequence) -> None:
        job = self._jobs.pop(sequence, None)
        if job is not None:
            del self._queues[job.queue][sequence]

    def num_unfinished(self) -> int:
        return len(self._jobs)

    # ---- inspection (tests, metrics, debugging) ----

    def quantum_s(self, level: int) -> float:
        """Iteration time a job may use in queue ``level`` before it is demoted."""
        return self.settings.base_quantum_s * 2.0**level

    def entry_queue(self, prefill_s: float) -> int:
        """Skip-join: the highest queue whose quantum covers the first iteration, else the last."""
        for level in range(self.settings.num_queues):
            if self.quantum_s(level) >= prefill_s:
                return level
        return self.settings.num_queues - 1

    def queue_of(self, sequence: Sequence) -> int:
        """The queue of a sequence the policy holds (KeyError otherwise)."""
        return self._jobs[sequence].queue

    def queue_length(self, level: int) -> int:
        """Jobs in queue ``level`` (safe to call from another thread: one len())."""
        return len(self._queues[level])

    def snapshot(self) -> list[list[str]]:
        """Request ids per queue, Q0 first, each in its queue's order."""
        return [[sequence.request_id for sequence in queue] for queue in self._queues]

    # ---- internals ----

    def _in_order(self) -> Iterator[Sequence]:
        """Every job, the most urgent first."""
        for queue in self._queues:
            yield from queue

    def _eligible(self, executor: ExecutorView) -> Iterator[Sequence]:
        """Jobs that may run on ``executor`` (bound to it, or unbound if it takes new ones),
        most urgent first."""
        allowed = (None, executor.instance_id) if executor.accepts_new else (executor.instance_id,)
        for sequence in self._in_order():
            if not sequence.finished and sequence.executor in allowed:
                yield sequence

    def _end_iteration(self, instance_id: str) -> None:
        for sequence in self._batches.pop(instance_id, []):
            job = self._jobs.get(sequence)
            if job is not None:
                job.in_batch = False

    def _promote_starved(self, now: float) -> None:
        """Jobs that have waited longer than starvation_s go to the tail of Q0."""
        limit = self.settings.starvation_s
        starved = [
            sequence
            for queue in self._queues[1:]  # those in Q0 already keep their place there
            for sequence in queue
            if not self._jobs[sequence].in_batch and now - self._jobs[sequence].last_ran > limit
        ]
        # The longest waiting first (stable: ties keep queue order).
        starved.sort(key=lambda sequence: self._jobs[sequence].last_ran)
        for sequence in starved:
            job = self._jobs[sequence]
            del self._queues[job.queue][sequence]
            job.queue, job.used_s = 0, 0.0
            self._queues[0][sequence] = None

    def _charge(self, job: _Job, compute_s: float) -> bool:
        """Charge one iteration; whether the job has used up its queue's quantum."""
        if job.queue == self.settings.num_queues - 1:
            return False  # nowhere lower to go
        job.used_s += compute_s
        return job.used_s + _QUANTUM_SLACK_S >= self.quantum_s(job.queue)

    def _demote(self, demoted: list[Sequence]) -> None:
        """Move each job one queue down, to the front, in the order they had in their queue."""
        if not demoted:
            return
        moving = set(demoted)
        levels = sorted({self._jobs[sequence].queue for sequence in demoted}, reverse=True)
        # The deepest first: jobs pushed into a queue are then never scanned (and moved) again.
        for level in levels:
            leaving = [sequence for sequence in self._queues[level] if sequence in moving]
            for sequence in leaving:
                del self._queues[level][sequence]
                job = self._jobs[sequence]
                job.queue, job.used_s = level + 1, 0.0
            self._queues[level + 1] = {**dict.fromkeys(leaving), **self._queues[level + 1]}
