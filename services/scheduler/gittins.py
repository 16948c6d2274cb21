"""An adaptive policy: the Gittins index of each job's attained service, learned online.

Without knowing output lengths, the order that minimises mean job completion time in a single
queue is the Gittins index policy (Gittins 1989; Scully et al., SIGMETRICS 2020): serve the job
whose index ``G(a)`` at its attained service ``a`` is highest, where, for the distribution of
service lengths ``S``,

    G(a) = max over c > a of  P(S <= c | S > a) / E[min(S, c) - a | S > a].

It becomes what fits the workload by itself: for output lengths with a decreasing hazard rate
(heavy tails: most jobs short, a few very long) ``G`` falls as a job runs and the order is
least-attained-service first; for lengths that vary little ``G`` rises as a job runs and the
order is first come, first served (run what is started to completion). Here the distribution
is the output lengths (tokens) of the last ``window`` requests this policy has seen finish,
never a replayed trace's future; before ``min_samples`` have finished every index is equal
(first come, first served).

A job not started yet must first be prefilled: its index counts that known cost
(``prefill_tokens``: the prefill's time in output tokens of one sequence at full batches), so
a long prompt waits behind jobs that will finish sooner (:func:`entry_index`). One whose
prefill costs at most ``first_iteration_prefill`` tokens runs its first iteration ahead of
the others instead: a short time to first token for little of the others' time.

**Bounded wait.** A job older than the age bound goes ahead of everything, oldest first; its
completion time is then at most that age plus what first come, first served gives among the
jobs aged before it. The bound is

    max_age = max(min_age_s, age_factor * (1 + CV^2) / 2 * mean service time)

over the finished jobs in the window (service time: their seconds in batches; CV: the
coefficient of variation of their output lengths). (1 + CV^2) / 2 is the factor by which
variable service lengths stretch the mean wait of first come, first served (Pollaczek-
Khinchine): where lengths vary little, reordering gains little and the bound stays near a few
service times, close to FCFS for the tail; where they are heavy-tailed, the short jobs that
reordering lets pass are most of the gain, and the bound widens with the variability. In the
simulation (bench.scheduling_sim) a bound of a fixed multiple either gave up most of the mean
gain on azure-code (CV 2.4) or doubled P99 on azure-conv (CV 0.8).

Ties, and jobs beyond every length seen (index 0), go in arrival order.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.scheduler.policy_base import ExecutorView, SchedulerPolicy, StepOutput
from services.scheduler.sequence import Sequence
from shared.config import AdaptiveSettings


def prefill_in_tokens(
    prefill_time_s: Callable[[int], float], decode_time_s: Callable[[int], float], batch: int
) -> Callable[[int], float]:
    """A prefill's time in output tokens of one sequence at full batches of ``batch``, from a
    profile's prefill seconds by prompt length and decode seconds by batch size."""
    per_token_s = decode_time_s(batch) / batch
    return lambda tokens: prefill_time_s(tokens) / per_token_s


def gittins_indices(lengths: list[int], horizon: int) -> np.ndarray:
    """``G(a)`` for attained service ``a`` = 0 .. horizon-1 (tokens), from service lengths
    observed; 0 where no observed length exceeds ``a``."""
    ordered = np.sort(np.asarray(lengths, dtype=np.float64))
    prefix = np.concatenate(([0.0], np.cumsum(ordered)))
    indices = np.zeros(horizon)
    total = len(ordered)
    for attained in range(min(horizon, int(ordered[-1]) if total else 0)):
        start = int(np.searchsorted(ordered, attained, side="right"))
        survivors = ordered[start:]  # the lengths > attained; cut c = survivors[k - 1]
        count = np.arange(1, total - start + 1, dtype=np.float64)
        served_below = prefix[start + 1 :] - prefix[start] - count * attained
        served = served_below + (total - start - count) * (survivors - attained)
        indices[attained] = float(np.max(count / served))
    return indices


def entry_index(lengths: np.ndarray, prefix: np.ndarray, prefill: float) -> float:
    """``G`` of a job not started yet whose prefill costs ``prefill`` (in tokens of decode
    time): it must be served that much before its first output token.

        G = max over c of  P(S <= c) / (prefill + E[min(S, c)])
    """
    total = len(lengths)
    count = np.arange(1, total + 1, dtype=np.float64)
    served = total * prefill + prefix[1:] + (total - count) * lengths
    return float(np.max(count / served))


class ServiceHistory:
    """The output lengths and service seconds of the last ``window`` finished jobs, and the
    index table computed from them (again after every ``recompute_every`` new ones)."""

    def __init__(self, settings: AdaptiveSettings) -> None:
        self.settings = settings
        self.lengths: deque[int] = deque(maxlen=settings.window)
        self.service_s: deque[float] = deque(maxlen=settings.window)
        self._table: np.ndarray | None = None
        self._since_table = 0
        self._sorted = np.zeros(0)
        self._prefix = np.zeros(1)
        self._max_age_s: float | None = None  # changes only when a job finishes

    def add(self, length: int, service_s: float) -> None:
        self.lengths.append(length)
        self.service_s.append(service_s)
        self._since_table += 1
        self._max_age_s = None

    @property
    def ready(self) -> bool:
        """Enough jobs have finished to order by index."""
        return len(self.lengths) >= self.settings.min_samples

    def index(self, attained: int) -> float:
        """``G(attained)`` of a started job; the same for every job until ready."""
        if not self.ready:
            return 0.0
        table = self._current_table()
        return float(table[attained]) if attained < len(table) else 0.0

    def entry(self, prefill: float) -> float:
        """``G`` of a job not started yet (:func:`entry_index`); equal for all until ready."""
        if not self.ready:
            return 0.0
        self._current_table()
        return entry_index(self._sorted, self._prefix, prefill)

    def _current_table(self) -> np.ndarray:
        if self._table is None or self._since_table >= self.settings.recompute_every:
            self._table = gittins_indices(list(self.lengths), max(self.lengths) + 1)
            self._sorted = np.sort(np.asarray(self.lengths, dtype=np.float64))
            self._prefix = np.concatenate(([0.0], np.cumsum(self._sorted)))
            self._since_table = 0
        return self._table

    def max_age_s(self) -> float:
        """How old a job may get before it goes ahead of everything (the module docstring)."""
        if not self.service_s:
            return float("inf") if self.settings.min_age_s <= 0 else self.settings.min_age_s
        if self._max_age_s is None:
            self._max_age_s = self._age_bound_s()
        return self._max_age_s

    def _age_bound_s(self) -> float:
        mean_service_s = sum(self.service_s) / len(self.service_s)
        lengths = np.asarray(self.lengths, dtype=np.float64)
        squared_cv = float(lengths.var() / lengths.mean() ** 2) if lengths.mean() > 0 else 0.0
        stretch = (1.0 + squared_cv) / 2.0
        return max(self.settings.min_age_s, self.settings.age_factor * stretch * mean_service_s)


@dataclass
class _Job:
    arrival: int  # arrival order
    arrived_at: float  # policy clock
    service_s: float = 0.0  # seconds of the iterations it was in
    started: bool = False  # has been in a batch


class GittinsPolicy(SchedulerPolicy):
    """Adaptive order by learned Gittins index; see the module docstring."""

    def __init__(
        self,
        settings: AdaptiveSettings,
        prefill_tokens: Callable[[int], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.history = ServiceHistory(settings)
        # The same, per prompt-length class (by powers of two): a prompt's length tells much
        # about its output's (a long code context asks for a short completion).
        self._by_prompt: dict[int, ServiceHistory] = {}
        # A prefill of n tokens costs as much as this many output tokens (None: unknown, not
        # counted, and no first iteration goes first).
        self._prefill_tokens = prefill_tokens or (lambda _tokens: 0.0)
        self._first_iteration_prefill = (
            settings.first_iteration_prefill if prefill_tokens is not None else -1.0
        )
        self._clock = clock
        self._jobs: dict[Sequence, _Job] = {}
        self._arrivals = itertools.count()
        self._batches: dict[str, list[Sequence]] = {}

    # ---- SchedulerPolicy ----

    def add_request(self, sequence: Sequence) -> None:
        if sequence not in self._jobs:
            self._jobs[sequence] = _Job(next(self._arrivals), self._clock())

    def schedule(self, executor: ExecutorView) -> list[Sequence]:
        batch = self.priority_order(executor)[: executor.max_batch_size]
        for sequence in batch:
            if sequence.executor is None:
                sequence.bind_to(executor.instance_id)  # its KV cache will live there
            self._jobs[sequence].started = True
        self._batches[executor.instance_id] = batch
        return list(batch)

    def priority_order(self, executor: ExecutorView) -> list[Sequence]:
        allowed = (None, executor.instance_id) if executor.accepts_new else (executor.instance_id,)
        eligible = [s for s in self._jobs if not s.finished and s.executor in allowed]
        now, max_age_s = self._clock(), self.history.max_age_s()
        return sorted(eligible, key=lambda sequence: self._rank(sequence, now, max_age_s))

    def update_from_output(self, output: StepOutput) -> None:
        self._batches.pop(output.instance_id, None)
        for sequence in output.batch:
            job = self._jobs.get(sequence)
            if job is None:
                continue  # removed while its iteration ran
            job.service_s += output.compute_s
            if sequence.finished:
                self.history.add(len(sequence.generated), job.service_s)
                self._class_history(sequence).add(len(sequence.generated), job.service_s)
                del self._jobs[sequence]

    def requeue_executor(self, instance_id: str) -> list[Sequence]:
        self._batches.pop(instance_id, None)
        lost = [sequence for sequence in self._jobs if sequence.executor == instance_id]
        for sequence in lost:
            sequence.lose_cache()  # any executor may recompute it; its place is kept
        return lost

    def requeue(self, sequence: Sequence) -> None:
        if sequence in self._jobs:
            sequence.lose_cache()

    def rebind(self, sequence: Sequence, instance_id: str) -> None:
        if sequence in self._jobs:
            sequence.bind_to(instance_id)

    def remove(self, sequence: Sequence) -> None:
        self._jobs.pop(sequence, None)

    def num_unfinished(self) -> int:
        return len(self._jobs)

    # ---- internals ----

    def _rank(self, sequence: Sequence, now: float, max_age_s: float) -> tuple[int, float, int]:
        """Smaller first: aged jobs (oldest first), new jobs with a short prefill, then by
        index, highest first."""
        job = self._jobs[sequence]
        if now - job.arrived_at > max_age_s:
            return (0, 0.0, job.arrival)
        if not job.started:
            tokens = len(sequence.request.prompt_token_ids) + len(sequence.generated)
            prefill = self._prefill_tokens(tokens)
            if prefill <= self._first_iteration_prefill:
                return (1, 0.0, job.arrival)
            return (2, -self._lengths_of(sequence).entry(prefill), job.arrival)
        return (2, -self._lengths_of(sequence).index(len(sequence.generated)), job.arrival)

    def _class_history(self, sequence: Sequence) -> ServiceHistory:
        prompt_class = len(sequence.request.prompt_token_ids).bit_length()
        if prompt_class not in self._by_prompt:
            self._by_prompt[prompt_class] = ServiceHistory(self.settings)
        return self._by_prompt[prompt_class]

    def _lengths_of(self, sequence: Sequence) -> ServiceHistory:
        """The finished jobs whose lengths predict this one's: those of its prompt-length
        class once enough of them finished, else all."""
        by_class = self._class_history(sequence)
        return by_class if by_class.ready else self.history
