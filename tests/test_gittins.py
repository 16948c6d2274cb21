"""The adaptive policy (services.scheduler.gittins): the Gittins index it learns from finished
jobs orders like first come, first served where lengths vary little, like least attained
service where they are heavy-tailed, counts a new job's prefill, and bounds every wait."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
from nats.aio.msg import Msg

from services.scheduler.gittins import GittinsPolicy, ServiceHistory, entry_index, gittins_indices
from services.scheduler.policy import ExecutorView, StepOutput
from services.scheduler.sequence import Sequence
from shared.config import AdaptiveSettings
from shared.model.tokenizer import TextTokenizer
from tests.test_mlfq import FakeClock, FakeMessage, Jobs, ids_of, make_request

SETTINGS = AdaptiveSettings(
    min_samples=10, recompute_every=1, age_factor=4.0, min_age_s=0.0, first_iteration_prefill=0
)
VIEW = ExecutorView("e1", max_batch_size=1)


def test_steady_lengths_favour_the_job_that_has_run_longest() -> None:
    indices = gittins_indices([100] * 50, 100)
    assert np.all(np.diff(indices) > 0)  # first come, first served: finish what is started


def test_heavy_tailed_lengths_favour_the_job_that_has_run_least() -> None:
    lengths = [1] * 90 + [1000] * 10
    indices = gittins_indices(lengths, 1000)
    # A job that outlived the many short ones is probably one of the long ones.
    assert indices[0] > indices[1] > 0
    assert indices[999] > indices[1]  # near its end a long job is worth finishing
    assert gittins_indices(lengths, 2000)[1500] == 0  # beyond every length seen


def test_a_longer_prefill_lowers_a_new_jobs_index() -> None:
    ordered = np.sort(np.asarray([10.0] * 20 + [200.0] * 5))
    prefix = np.concatenate(([0.0], np.cumsum(ordered)))
    assert entry_index(ordered, prefix, 0.0) > entry_index(ordered, prefix, 50.0) > 0


def run(policy: GittinsPolicy, clock: FakeClock, compute_s: float = 1.0) -> list[Sequence]:
    batch = policy.schedule(VIEW)
    clock.advance(compute_s)
    for sequence in batch:
        sequence.append(5, frozenset())
    policy.update_from_output(StepOutput("e1", batch, compute_s))
    return batch


def job(jobs: Jobs, length: int, prompt: int = 1) -> Sequence:
    """A job of exactly ``length`` output tokens."""
    request = make_request(prompt, f"g{next(jobs.counter)}")
    request = request.model_copy(update={"max_tokens": length})
    return Sequence.create(request, cast(Msg, FakeMessage()), jobs.tokenizer, [])


def teach(
    policy: GittinsPolicy, jobs: Jobs, clock: FakeClock, length: int, count: int, prompt: int = 1
) -> None:
    """Let ``count`` jobs of ``length`` tokens run to their end, one after the other."""
    for _ in range(count):
        sequence = job(jobs, length, prompt)
        policy.add_request(sequence)
        while not sequence.finished:
            run(policy, clock, compute_s=0.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def jobs(tokenizer: TextTokenizer) -> Jobs:
    return Jobs(tokenizer)


def test_first_come_first_served_until_enough_jobs_have_finished(
    jobs: Jobs, clock: FakeClock
) -> None:
    policy = GittinsPolicy(SETTINGS, clock=clock)
    first, second = jobs(), jobs()
    for sequence in (first, second):
        policy.add_request(sequence)
    assert ids_of(policy.priority_order(VIEW)) == [first.request_id, second.request_id]


def test_steady_lengths_run_the_started_job_to_its_end(jobs: Jobs, clock: FakeClock) -> None:
    policy = GittinsPolicy(SETTINGS, clock=clock)
    teach(policy, jobs, clock, length=20, count=10)
    started = job(jobs, 20)
    policy.add_request(started)
    run(policy, clock, compute_s=0.0)
    newcomer = jobs()
    policy.add_request(newcomer)
    assert ids_of(policy.priority_order(VIEW))[0] == started.request_id


def test_heavy_tails_let_a_newcomer_pass_a_job_that_has_run(jobs: Jobs, clock: FakeClock) -> None:
    policy = GittinsPolicy(SETTINGS, clock=clock)
    teach(policy, jobs, clock, length=1, count=18)
    teach(policy, jobs, clock, length=40, count=2)
    survivor = job(jobs, 40)
    policy.add_request(survivor)
    for _ in range(3):
        run(policy, clock, compute_s=0.0)
    newcomer = jobs()
    policy.add_request(newcomer)
    assert ids_of(policy.priority_order(VIEW))[0] == newcomer.request_id


def test_a_job_older_than_the_age_bound_goes_first(jobs: Jobs, clock: FakeClock) -> None:
    policy = GittinsPolicy(SETTINGS, clock=clock)
    teach(policy, jobs, clock, length=1, count=18)
    teach(policy, jobs, clock, length=40, count=2)
    old = job(jobs, 40)
    policy.add_request(old)
    run(policy, clock, compute_s=0.0)
    # Mean service so far is 0 s: the bound is min_age_s (0), so any age counts.
    clock.advance(1.0)
    policy.add_request(jobs())
    assert ids_of(policy.priority_order(VIEW))[0] == old.request_id


def test_lengths_are_learned_per_prompt_length_class(jobs: Jobs, clock: FakeClock) -> None:
    policy = GittinsPolicy(SETTINGS, clock=clock)
    # Short prompts asked for 1 token, long ones for 40 (alternating: the pooled distribution
    # is half and half).
    for _ in range(10):
        teach(policy, jobs, clock, length=1, count=1, prompt=2)
        teach(policy, jobs, clock, length=40, count=1, prompt=100)
    long_prompt, short_prompt = job(jobs, 40, prompt=100), job(jobs, 1, prompt=2)
    policy.add_request(long_prompt)
    policy.add_request(short_prompt)
    # Pooled, both would rank alike (arrival order); by class the short one is expected short.
    assert ids_of(policy.priority_order(VIEW)) == [
        short_prompt.request_id,
        long_prompt.request_id,
    ]
    # A class with too few finished jobs falls back to all of them: arrival order.
    first, second = job(jobs, 5, prompt=20), job(jobs, 5, prompt=40)
    fresh = GittinsPolicy(SETTINGS, clock=clock)
    teach(fresh, jobs, clock, length=5, count=10, prompt=2)
    fresh.add_request(first)
    fresh.add_request(second)
    assert ids_of(fresh.priority_order(VIEW)) == [first.request_id, second.request_id]


def test_the_age_bound_widens_with_the_variability_of_lengths() -> None:
    settings = SETTINGS.model_copy(update={"min_age_s": 1.0})
    steady, heavy = ServiceHistory(settings), ServiceHistory(settings)
    for _ in range(10):
        steady.add(10, 2.0)  # CV 0: 4 x 1/2 x 2 s
    for length in [1] * 9 + [91]:
        heavy.add(length, 2.0)  # mean 10, CV^2 = 7.29: 4 x 4.145 x 2 s
    assert steady.max_age_s() == pytest.approx(4.0)
    assert heavy.max_age_s() == pytest.approx(4 * (1 + 7.29) / 2 * 2.0)
    assert ServiceHistory(settings).max_age_s() == 1.0  # nothing finished yet: min_age_s
    quick = ServiceHistory(settings)
    quick.add(10, 0.1)
    assert quick.max_age_s() == 1.0  # never below min_age_s


def test_a_short_prefill_runs_its_first_iteration_first(jobs: Jobs, clock: FakeClock) -> None:
    settings = SETTINGS.model_copy(update={"first_iteration_prefill": 16.0})
    policy = GittinsPolicy(settings, prefill_tokens=float, clock=clock)  # a token costs one
    teach(policy, jobs, clock, length=20, count=10)
    started = job(jobs, 20)
    policy.add_request(started)
    run(policy, clock, compute_s=0.0)
    long_prompt, short_prompt = job(jobs, 20, prompt=100), job(jobs, 20, prompt=4)
    policy.add_request(long_prompt)
    policy.add_request(short_prompt)
    order = ids_of(policy.priority_order(VIEW))
    assert order == [short_prompt.request_id, started.request_id, long_prompt.request_id]
