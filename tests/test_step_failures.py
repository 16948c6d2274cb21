"""How the scheduler's iteration loop counts a request's failed steps: failures in a row (no
token between them) end the request with an error past SPOTSERVE_SCHEDULER__MAX_STEP_RETRIES;
failures separated by progress do not add up (the restart baseline's every reconfiguration
rebuilds the executors' engines and costs the steps in flight one failure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.scheduler import iteration
from services.scheduler.executors import ExecutorHandle, StepFailedError
from services.scheduler.iteration import IterationLoop, IterationOutput
from services.scheduler.policy import FcfsPolicy
from services.scheduler.policy_base import ExecutorView
from services.scheduler.sequence import Sequence
from shared.config import Settings
from shared.messages import StepResult
from shared.model.tokenizer import TextTokenizer
from tests.helpers import bare_iteration_loop
from tests.test_units_scheduler import make_request, make_sequence

FAILURE = StepFailedError("executor error [400] the KV cache of r holds 0 positions here, the"
                          " scheduler expects 24: recompute it", executor_lost=False)  # fmt: skip


class Recorder:
    """The intake's failures and the publisher's outputs, as the loop hands them on."""

    def __init__(self) -> None:
        self.failed: list[tuple[Sequence, str]] = []
        self.outputs: list[IterationOutput] = []

    async def fail(self, sequence: Sequence, message: str, error_type: object = None) -> None:
        self.failed.append((sequence, message))

    async def put(self, output: IterationOutput) -> None:
        self.outputs.append(output)


@dataclass
class Failing:
    """One request on one executor, and a loop whose failures and outputs are recorded."""

    policy: FcfsPolicy
    recorder: Recorder
    loop: IterationLoop
    handle: ExecutorHandle
    sequence: Sequence


@pytest.fixture
def failing(tokenizer: TextTokenizer) -> Failing:
    policy, recorder = FcfsPolicy(), Recorder()
    loop = bare_iteration_loop(policy, intake=recorder, tokens=recorder)
    handle = ExecutorHandle(view=ExecutorView(instance_id="exec-x", max_batch_size=4))
    sequence = make_sequence(tokenizer, make_request([5, 6], max_tokens=32))
    policy.add_request(sequence)
    return Failing(policy, recorder, loop, handle, sequence)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iteration, "STEP_FAILURE_BACKOFF_S", 0.0)


async def test_failures_between_tokens_do_not_add_up(failing: Failing) -> None:
    policy, recorder, loop = failing.policy, failing.recorder, failing.loop
    handle, sequence = failing.handle, failing.sequence
    retries = Settings().scheduler.max_step_retries
    for _ in range(retries + 3):
        assert policy.schedule(handle.view) == [sequence]
        await loop._on_step_failed(handle, [sequence], FAILURE)
        assert policy.schedule(handle.view) == [sequence]  # recomputed, then it progresses
        await loop._apply(
            handle, [sequence], StepResult(tokens={sequence.request_id: 7}, compute_s=0.01)
        )
    assert recorder.failed == [] and not sequence.finished
    assert len(sequence.generated) == retries + 3


async def test_failures_in_a_row_end_the_request_with_an_error(failing: Failing) -> None:
    policy, recorder, loop = failing.policy, failing.recorder, failing.loop
    handle, sequence = failing.handle, failing.sequence
    retries = Settings().scheduler.max_step_retries
    for attempt in range(retries + 1):
        assert policy.schedule(handle.view) == [sequence]
        await loop._on_step_failed(handle, [sequence], FAILURE)
        assert len(recorder.failed) == (1 if attempt == retries else 0)
    [(failed, message)] = recorder.failed
    assert failed is sequence and "generation failed after repeated errors" in message
    assert policy.schedule(handle.view) == []  # no longer the policy's
    assert [output.failed for output in recorder.outputs] == [[sequence]]  # its closing run
