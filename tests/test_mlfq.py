"""Unit tests of the skip-join MLFQ policy, with real Sequences and a hand-driven clock.

Prefill estimates are 1 ms per token of the job's prompt (plus generated tokens), so a job's
estimate is chosen by the length of its prompt. Settings: 4 queues, quanta 10/20/40/80 ms,
starvation after 1 s.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from services.scheduler.mlfq import SkipJoinMlfqPolicy
from services.scheduler.policy import ExecutorView, StepOutput
from services.scheduler.sequence import Sequence
from shared.config import MlfqSettings
from shared.messages import AcceptedRequest, TokenChunk
from shared.model.tokenizer import TextTokenizer

MLFQ = MlfqSettings(num_queues=4, base_quantum_s=0.01, starvation_s=1.0)
LAST = MLFQ.num_queues - 1


def prefill_time_s(tokens: int) -> float:
    return tokens / 1000


class FakeClock:
    """time.monotonic stand-in, advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeMessage:
    """Stands in for the JetStream message of a request (never acked here)."""


def make_request(prompt_tokens: int, request_id: str) -> AcceptedRequest:
    return AcceptedRequest(
        request_id=request_id,
        prompt_token_ids=[7] * prompt_tokens,
        max_tokens=1000,
        temperature=0.0,
        top_p=1.0,
        seed=1,
        stop=[],
        stream=True,
        ignore_eos=False,
        reply_subject="_INBOX.test",
        encoding="msgpack",
        accepted_at=0.0,
    )


@dataclass
class Jobs:
    """Makes sequences j1, j2, ... whose estimated prefill is ``prefill_ms``."""

    tokenizer: TextTokenizer
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __call__(self, prefill_ms: int = 1, committed: list[TokenChunk] | None = None) -> Sequence:
        request = make_request(prefill_ms, f"j{next(self.counter)}")
        return Sequence.create(request, cast(Msg, FakeMessage()), self.tokenizer, committed or [])


@pytest.fixture
def jobs(tokenizer: TextTokenizer) -> Jobs:
    return Jobs(tokenizer)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy(clock: FakeClock) -> SkipJoinMlfqPolicy:
    return SkipJoinMlfqPolicy(MLFQ, prefill_time_s, clock)


def add(policy: SkipJoinMlfqPolicy, *sequences: Sequence) -> None:
    for sequence in sequences:
        policy.add_request(sequence)


def finish(sequence: Sequence, eos: frozenset[int]) -> None:
    sequence.append(min(eos), eos)
    assert sequence.finished


def ids_of(sequences: list[Sequence]) -> list[str]:
    return [sequence.request_id for sequence in sequences]


def run(policy: SkipJoinMlfqPolicy, view: ExecutorView, compute_s: float) -> list[Sequence]:
    """One iteration: schedule, then account for it."""
    batch = policy.schedule(view)
    policy.update_from_output(StepOutput(view.instance_id, batch, compute_s))
    return batch


# ---------------------------------------------------------------------------------------------
# Skip-join


def test_skip_join_enters_the_highest_queue_whose_quantum_covers_the_prefill(
    policy: SkipJoinMlfqPolicy, jobs: Jobs
) -> None:
    tiny, at_base, above_base, mid, at_q2, above_q2, huge = (
        jobs(ms) for ms in (1, 10, 11, 30, 40, 41, 10_000)
    )
    add(policy, tiny, at_base, above_base, mid, at_q2, above_q2, huge)
    # A plain MLFQ would put every one of them in Q0.
    assert [policy.queue_of(s) for s in (tiny, at_base, above_base, mid, at_q2, above_q2)] == [
        0,
        0,
        1,
        2,
        2,
        LAST,
    ]
    assert policy.queue_of(huge) == LAST
    assert policy.snapshot() == [["j1", "j2"], ["j3"], ["j4", "j5"], ["j6", "j7"]]
    assert policy.num_unfinished() == 7


def test_skip_join_of_a_resumed_job_counts_its_generated_tokens(
    policy: SkipJoinMlfqPolicy, jobs: Jobs, tokenizer: TextTokenizer
) -> None:
    ids = tokenizer.encode("Hello world, once more", add_special_tokens=False)
    generated = (ids * 40)[:30]
    committed = [TokenChunk(request_id="resumed", index=0, token_ids=generated, text="")]
    fresh, resumed = jobs(5), jobs(5, committed)
    assert len(resumed.generated) == 30
    add(policy, fresh, resumed)
    # 5 + 30 tokens to recompute: 35 ms, the 40 ms quantum of Q2.
    assert (policy.queue_of(fresh), policy.queue_of(resumed)) == (0, 2)


def test_arrival_order_within_a_queue(policy: SkipJoinMlfqPolicy, jobs: Jobs) -> None:
    sequences = [jobs(ms) for ms in (15, 1, 15, 1, 15)]
    add(policy, *sequences)
    assert policy.snapshot()[:2] == [["j2", "j4"], ["j1", "j3", "j5"]]
    assert ids_of(policy.schedule(ExecutorView("a", 4))) == ["j2", "j4", "j1", "j3"]


# ---------------------------------------------------------------------------------------------
# Iteration-level preemption, demotion


def test_short_job_overtakes_demoted_long_jobs_at_the_next_iteration(
    policy: SkipJoinMlfqPolicy, jobs: Jobs, eos: frozenset[int]
) -> None:
    a, b = ExecutorView("a", 2), ExecutorView("b", 2)
    long1, long2 = jobs(5), jobs(5)
    add(policy, long1, long2)
    assert run(policy, a, 0.01) == [long1, long2]  # used up Q0's quantum: both demoted
    assert run(policy, a, 0.005) == [long1, long2]
    assert (policy.queue_of(long1), policy.queue_of(long2)) == (1, 1)

    short = jobs(1)
    policy.add_request(short)
    # FCFS would keep running long1 and long2; here the batch changes between iterations.
    batch = policy.schedule(a)
    assert batch == [short, long1]
    assert short.executor == "a"
    # long2 is preempted, not dropped: still bound to "a" (its KV is there), still in Q1.
    assert long2.executor == "a" and policy.queue_of(long2) == 1
    assert policy.snapshot()[1] == ["j1", "j2"]
    # Another executor with free places must not take it.
    assert policy.schedule(b) == []
    finish(short, eos)
    policy.update_from_output(StepOutput("a", batch, 0.005))
    assert policy.schedule(a) == [long1, long2]


def test_demotion_exactly_when_the_quantum_is_used_up_to_the_front(
    policy: SkipJoinMlfqPolicy, jobs: Jobs
) -> None:
    view = ExecutorView("a", 1)
    job, waiting1, waiting2 = jobs(1), jobs(15), jobs(15)
    add(policy, job, waiting1, waiting2)
    assert run(policy, view, 0.006) == [job]
    assert run(policy, view, 0.003) == [job]
    assert policy.queue_of(job) == 0  # 9 of 10 ms
    assert run(policy, view, 0.001) == [job]
    # Used up: one level down, at the front, ahead of the jobs already waiting there.
    assert policy.snapshot()[:2] == [[], ["j1", "j2", "j3"]]
    # Its used time starts again from 0 in Q1 (20 ms).
    assert run(policy, view, 0.019) == [job]
    assert policy.queue_of(job) == 1
    assert run(policy, view, 0.001) == [job]
    assert policy.snapshot()[1:3] == [["j2", "j3"], ["j1"]]


def test_jobs_demoted_together_keep_their_relative_order(
    policy: SkipJoinMlfqPolicy, jobs: Jobs
) -> None:
    p, q, r, waiting = jobs(1), jobs(1), jobs(1), jobs(15)
    add(policy, p, q, r, waiting)
    batch = policy.schedule(ExecutorView("a", 3))
    assert batch == [p, q, r]
    # The output lists them in another order: their order in the queue is what counts.
    policy.update_from_output(StepOutput("a", [r, p, q], 0.01))
    assert policy.snapshot()[:2] == [[], ["j1", "j2", "j3", "j4"]]


def test_jobs_of_two_levels_demoted_in_one_iteration_move_one_level_each(
    policy: SkipJoinMlfqPolicy, jobs: Jobs
) -> None:
    upper, lower = jobs(1), jobs(15)
    add(policy, upper, lower)
    assert run(policy, ExecutorView("a", 2), 0.02) == [upper, lower]
    assert (policy.queue_of(upper), policy.queue_of(lower)) == (1, 2)


def test_no_demotion_below_the_last_queue(policy: SkipJoinMlfqPolicy, jobs: Jobs) -> None:
    view = ExecutorView("a", 1)
    huge, later = jobs(10_000), jobs(10_000)
    add(policy, huge, later)
    for _ in range(5):
        assert run(policy, view, 1.0) == [huge]
    assert policy.snapshot() == [[], [], [], ["j1", "j2"]]


def test_a_single_queue_never_demotes(clock: FakeClock, jobs: Jobs) -> None:
    policy = SkipJoinMlfqPolicy(MlfqSettings(num_queues=1), prefill_time_s, clock)
    first, second = jobs(10_000), jobs(1)
    add(policy, first, second)
    for _ in range(3):
        assert run(policy, ExecutorView("a", 1), 1.0) == [first]
    assert policy.snapshot() == [["j1", "j2"]]


# ---------------------------------------------------------------------------------------------
# Starvation


def test_a_starving_job_is_promoted_to_q0_and_runs_next(
    policy: SkipJoinMlfqPolicy, jobs: Jobs, clock: FakeClock
) -> None:
    view = ExecutorView("a", 1)
    long = jobs(30)
    policy.add_request(long)
    assert run(policy, view, 0.03) == [long]  # 30 of its 40 ms in Q2 used, at t=0
    busy = jobs(15)
    policy.add_request(busy)  # Q1, and never demoted (its iterations are charged 0)
    for _ in range(4):
        clock.advance(0.25)
        assert run(policy, view, 0.0) == [busy]
    # t=1.0: waited exactly starvation_s, not longer: no promotion yet.
    assert clock() == 1.0 and policy.queue_of(long) == 2
    clock.advance(0.25)
    batch = policy.schedule(view)
    assert batch == [long] and policy.queue_of(long) == 0
    assert busy.executor == "a" and policy.queue_of(busy) == 1  # preempted, kept
    # Promotion reset its used time: 9 ms in Q0 do not demote it (30 + 9 would).
    policy.update_from_output(StepOutput("a", batch, 0.009))
    assert policy.queue_of(long) == 0
    assert run(policy, view, 0.001) == [long]
    assert policy.queue_of(long) == 1


def test_promoted_jobs_join_the_tail_of_q0_longest_waiting_first(
    policy: SkipJoinMlfqPolicy, jobs: Jobs, clock: FakeClock
) -> None:
    old_low, new_high = jobs(100), jobs(15)
    add(policy, old_low)
    clock.advance(0.5)
    add(policy, new_high)
    fresh = jobs(1)
    clock.advance(0.75)
    policy.add_request(fresh)
    clock.advance(0.5)
    # t=1.75: both waited > 1 s; old_low longer, despite its lower queue.
    assert ids_of(policy.schedule(ExecutorView("a", 2))) == ["j3", "j1"]
    assert policy.snapshot() == [["j3", "j1", "j2"], [], [], []]


def test_a_job_in_a_running_iteration_is_not_starving(
    policy: SkipJoinMlfqPolicy, jobs: Jobs, clock: FakeClock
) -> None:
    slow = jobs(15)
    policy.add_request(slow)
    batch = policy.schedule(ExecutorView("a", 1))
    clock.advance(5.0)  # a very long iteration on "a"; meanwhile "b" schedules
    assert policy.schedule(ExecutorView("b", 1)) == []
    assert policy.queue_of(slow) == 1
    policy.update_from_output(StepOutput("a", batch, 0.0))
    clock.advance(0.75)
    assert policy.schedule(ExecutorView("b", 1)) == []
    # Waiting is counted from the end of its last iteration (t=5), not its start.
    assert policy.queue_of(slow) == 1


# ---------------------------------------------------------------------------------------------
# Executors, finishing, requeue, remove, priority order


def test_batches_respect_bindings_and_the_size_limit(
    policy: SkipJoinMlfqPolicy, jobs: Jobs
) -> None:
    sequences = [jobs(1) for _ in range(5)]
    add(policy, *sequences)
    a, b = ExecutorView("a", 2), ExecutorView("b", 2)
    batch_a, batch_b = policy.schedule(a), policy.schedule(b)
    assert ids_of(batch_a) == ["j1", "j2"] and ids_of(batch_b) == ["j3", "j4"]
    assert all(s.executor == "a" for s in batch_a) and all(s.executor == "b" for s in batch_b)
    assert sequences[4].executor is None
    policy.update_from_output(StepOutput("a", batch_a, 0.01))  # j1, j2 down to Q1
    # j3, j4 now rank above j1, j2, but they are bound to "b".
    assert ids_of(policy.schedule(ExecutorView("a", 8))) == ["j5", "j1", "j2"]
    assert ids_of(policy.schedule(ExecutorView("c", 8))) == []


def test_finished_jobs_leave(policy: SkipJoinMlfqPolicy, jobs: Jobs, eos: frozenset[int]) -> None:
    view = ExecutorView("a", 2)
    sequences = [jobs(1) for _ in range(3)]
    add(policy, *sequences)
    batch = policy.schedule(view)
    finish(sequences[0], eos)
    policy.update_from_output(StepOutput("a", batch, 0.001))
    assert policy.num_unfinished() == 2
    assert policy.snapshot()[0] == ["j2", "j3"]
    with pytest.raises(KeyError):
        policy.queue_of(sequences[0])
    assert policy.schedule(view) == sequences[1:]


def test_requeue_executor_unbinds_its_jobs_in_place(policy: SkipJoinMlfqPolicy, jobs: Jobs) -> None:
    sequences = [jobs(ms) for ms in (1, 15, 1, 15)]
    add(policy, *sequences)
    batch = policy.schedule(ExecutorView("a", 3))
    assert ids_of(batch) == ["j1", "j3", "j2"]
    for sequence in batch:
        sequence.cached_tokens = len(sequence.request.prompt_token_ids)
        sequence.cache_on_device()
    before = policy.snapshot()
    lost = policy.requeue_executor("a")
    assert ids_of(lost) == ["j1", "j3", "j2"]  # most urgent first
    for sequence in lost:
        assert sequence.executor is None and sequence.cached_tokens == 0
        assert sequence.kv_location == "none"
    assert policy.snapshot() == before and policy.num_unfinished() == 4
    assert policy.requeue_executor("a") == [] and policy.requeue_executor("nope") == []
    assert ids_of(policy.schedule(ExecutorView("b", 2))) == ["j1", "j3"]


def test_remove_waiting_and_running(policy: SkipJoinMlfqPolicy, jobs: Jobs) -> None:
    sequences = [jobs(1) for _ in range(4)]
    add(policy, *sequences)
    batch = policy.schedule(ExecutorView("a", 2))
    policy.remove(sequences[0])  # in the running batch
    policy.remove(sequences[3])  # waiting
    policy.remove(sequences[3])  # gone already: nothing happens
    assert policy.num_unfinished() == 2
    # Its iteration's output still lists the removed one: it is not brought back.
    policy.update_from_output(StepOutput("a", batch, 0.001))
    assert policy.snapshot()[0] == ["j2", "j3"] and policy.num_unfinished() == 2


def test_priority_order_is_queue_order_without_jobs_bound_elsewhere(
    policy: SkipJoinMlfqPolicy, jobs: Jobs, eos: frozenset[int]
) -> None:
    sequences = [jobs(ms) for ms in (100, 15, 1, 30, 1)]
    add(policy, *sequences)
    a, b = ExecutorView("a", 1), ExecutorView("b", 1)
    assert ids_of(policy.priority_order(a)) == ["j3", "j5", "j2", "j4", "j1"]
    policy.schedule(a)  # binds j3 to a
    policy.schedule(b)  # binds j5 to b
    assert ids_of(policy.priority_order(a)) == ["j3", "j2", "j4", "j1"]
    assert ids_of(policy.priority_order(b)) == ["j5", "j2", "j4", "j1"]
    finish(sequences[1], eos)  # finished, its output not accounted yet
    assert ids_of(policy.priority_order(b)) == ["j5", "j4", "j1"]


# ---------------------------------------------------------------------------------------------
# Property: nothing lost or duplicated, and bounded waits under any interleaving

# A shorter threshold than the unit tests': a few clock advances make a job starve.
PROPERTY_MLFQ = MLFQ.model_copy(update={"starvation_s": 0.5})
STARVATION_S = PROPERTY_MLFQ.starvation_s
# (op, a, b, c); unused fields are 0.
Operation = tuple[str, int, int, int]

OPERATION_ARGS: dict[str, st.SearchStrategy[tuple[int, int, int]]] = {
    # A job with an estimated prefill of a ms (up to the last queue and beyond).
    "add": st.tuples(st.integers(1, 120), st.just(0), st.just(0)),
    # One iteration on executor a: finish the batch members in mask b (mostly none), charge
    # c * 5 ms.
    "step": st.tuples(
        st.integers(0, 1), st.sampled_from([0, 0, 0, 0, 1, 2, 4, 7]), st.integers(0, 8)
    ),
    # The clock moves a/8 s; then one iteration on every executor, charged b * 5 ms.
    "advance": st.tuples(st.integers(0, 3), st.integers(0, 8), st.just(0)),
    "requeue": st.tuples(st.integers(0, 1), st.just(0), st.just(0)),
    "remove": st.tuples(st.integers(0, 50), st.just(0), st.just(0)),
}
# Weighted so that jobs pile up and wait long enough to starve (one_of would not weigh them).
OPERATION_KINDS = ["add"] * 3 + ["step"] * 2 + ["advance"] * 2 + ["requeue", "remove"]


def operation(kind: str) -> st.SearchStrategy[Operation]:
    return OPERATION_ARGS[kind].map(lambda args: (kind, *args))


operations = st.lists(st.sampled_from(OPERATION_KINDS).flatmap(operation), min_size=20, max_size=80)


@dataclass
class Model:
    """What the test itself knows of the jobs, independently of the policy."""

    policy: SkipJoinMlfqPolicy
    clock: FakeClock
    eos: frozenset[int]
    alive: list[Sequence] = field(default_factory=list)
    # Clock time each alive job was last in a batch, or arrived.
    waiting_since: dict[Sequence, float] = field(default_factory=dict)
    # Jobs kept out of every batch of a round while starving because Q0 alone filled them.
    excused: set[Sequence] = field(default_factory=set)
    # Jobs kept out of some batch of the current round that way.
    skipped: list[Sequence] = field(default_factory=list)
    largest_advance: float = 0.0

    def add(self, sequence: Sequence) -> None:
        self.policy.add_request(sequence)
        self.alive.append(sequence)
        self.waiting_since[sequence] = self.clock()

    def forget(self, sequence: Sequence) -> None:
        self.alive.remove(sequence)
        del self.waiting_since[sequence]
        self.excused.discard(sequence)

    def step(self, view: ExecutorView, mask: int, compute_s: float, after_advance: bool) -> None:
        now = self.clock()
        eligible = [s for s in self.alive if s.executor in (None, view.instance_id)]
        batch = self.policy.schedule(view)
        self.check_batch(view, batch, eligible)
        if after_advance:
            self.check_starving(view, batch, eligible)
        for sequence in batch:
            if sequence not in self.excused:
                assert now - self.waiting_since[sequence] <= STARVATION_S + self.largest_advance
            self.waiting_since[sequence] = now
            self.excused.discard(sequence)
        for index, sequence in enumerate(batch):
            if mask >> index & 1:
                sequence.append(min(self.eos), self.eos)
                self.forget(sequence)
        self.policy.update_from_output(StepOutput(view.instance_id, batch, compute_s))

    def check_batch(
        self, view: ExecutorView, batch: list[Sequence], eligible: list[Sequence]
    ) -> None:
        assert len(batch) <= view.max_batch_size
        assert len({id(s) for s in batch}) == len(batch)
        assert all(any(s is e for e in eligible) for s in batch), "bound elsewhere"
        assert all(s.executor == view.instance_id for s in batch)
        # The most urgent jobs that may run here, whatever ran before (preemption).
        assert batch == self.policy.priority_order(view)[: view.max_batch_size]

    def check_starving(
        self, view: ExecutorView, batch: list[Sequence], eligible: list[Sequence]
    ) -> None:
        """A job that may run here and has waited longer than starvation_s is in Q0 now, and in
        the batch unless the batch is full of Q0 jobs ahead of it."""
        now = self.clock()
        for sequence in eligible:
            if now - self.waiting_since[sequence] <= STARVATION_S:
                continue
            assert self.policy.queue_of(sequence) == 0
            if not any(sequence is s for s in batch):
                assert len(batch) == view.max_batch_size
                assert all(self.policy.queue_of(s) == 0 for s in batch)
                self.skipped.append(sequence)

    def advance(self, seconds: float, compute_s: float, views: list[ExecutorView]) -> None:
        """The clock moves, then every executor runs one iteration (a round)."""
        self.clock.advance(seconds)
        self.largest_advance = max(self.largest_advance, seconds)
        for view in views:
            self.step(view, 0, compute_s, after_advance=True)
        now = self.clock()
        # Excused only if no executor of the round took it (then its wait was checked).
        self.excused.update(
            s for s in self.skipped if s in self.waiting_since and self.waiting_since[s] < now
        )
        self.skipped.clear()

    def check_conservation(self, views: list[ExecutorView]) -> None:
        snapshot = self.policy.snapshot()
        flat = [request_id for queue in snapshot for request_id in queue]
        assert len(set(flat)) == len(flat)
        assert sorted(flat) == sorted(ids_of(self.alive))
        assert self.policy.num_unfinished() == len(self.alive)
        by_id = {s.request_id: s for s in self.alive}
        for level, queue in enumerate(snapshot):
            assert all(self.policy.queue_of(by_id[request_id]) == level for request_id in queue)
        for view in views:
            may_run = [by_id[r] for r in flat if by_id[r].executor in (None, view.instance_id)]
            assert self.policy.priority_order(view) == may_run


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 2), min_size=1, max_size=2), ops=operations)
def test_property_no_job_lost_duplicated_or_starved(
    tokenizer: TextTokenizer, eos: frozenset[int], sizes: list[int], ops: list[Operation]
) -> None:
    """Under any interleaving of adds (random prefill estimates), iterations on 1-2 executors
    (random charges, random batch members finishing), clock advances, requeues and removals:

    * every added, unfinished, unremoved job is in exactly one queue (snapshot, queue_of,
      num_unfinished and priority_order agree with the test's own list);
    * every batch is within the size limit, holds no job bound to another executor and is the
      head of priority_order (so it may preempt what ran before);
    * at the iteration that follows a clock advance (every executor runs one), a job that may
      run there and has waited (not been in any batch) longer than starvation_s is in Q0, and
      in the batch unless that batch is entirely Q0 jobs ahead of it (more Q0 jobs than
      places: no policy can then run them all);
    * hence, except for a job kept out that way, a job gets into a batch after a wait of at
      most starvation_s + the largest single clock advance so far (asserted at every batch).
    """
    clock = FakeClock()
    policy = SkipJoinMlfqPolicy(PROPERTY_MLFQ, prefill_time_s, clock)
    views = [ExecutorView(f"e{i}", size) for i, size in enumerate(sizes)]
    model = Model(policy, clock, eos)
    jobs = Jobs(tokenizer)

    for op, a, b, c in ops:
        if op == "add":
            model.add(jobs(a))
        elif op == "step":
            model.step(views[a % len(views)], b, c * 0.005, after_advance=False)
        elif op == "advance":
            model.advance(a / 8, b * 0.005, views)
        elif op == "requeue":
            instance_id = views[a % len(views)].instance_id
            bound = [s for s in model.alive if s.executor == instance_id]
            before = policy.snapshot()
            lost = policy.requeue_executor(instance_id)
            assert {id(s) for s in lost} == {id(s) for s in bound}
            assert all(s.executor is None and s.cached_tokens == 0 for s in lost)
            assert policy.snapshot() == before
        elif op == "remove" and model.alive:
            sequence = model.alive[a % len(model.alive)]
            policy.remove(sequence)
            model.forget(sequence)
        model.check_conservation(views)
