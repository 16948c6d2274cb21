"""Asynchronous scheduling, piece by piece: a sequence in the step that runs goes into the next
one as "continue with the token you sample now" (its expected cache and sample index one
ahead), never when that token ends it by length, while it regenerates tokens the client has,
or when its cache went to host memory; the memory plan counts the token in flight; the
executor feeds a continuing sequence the token its previous step sampled and refuses one it
sampled nothing for. The whole system's tokens through this path are checked against
transformers by tests/test_end_to_end.py and counted by tests/test_metrics.py."""

from __future__ import annotations

import pytest

from services.executor.steps import step_inputs
from services.scheduler.kvmemory import blocks_after_step, held_blocks, plan_memory
from services.scheduler.policy_base import ExecutorView
from services.scheduler.sequence import Sequence
from shared.messages import StepCommand, StepSequence
from shared.model.tokenizer import TextTokenizer
from shared.rpc import BadRequest
from tests.test_units_scheduler import make_request, make_sequence

PROMPT = [5, 6, 7]


def running_sequence(tokenizer: TextTokenizer, max_tokens: int = 64) -> Sequence:
    """A sequence that has generated two tokens on instance-0 and is in the step running now."""
    sequence = make_sequence(tokenizer, make_request(PROMPT, max_tokens=max_tokens))
    sequence.bind_to("instance-0")
    for token_id in (11, 12):
        sequence.append(token_id, frozenset())
    sequence.pending = 1
    return sequence


def test_a_sequence_in_the_running_step_continues_with_the_token_sampled_there(
    tokenizer: TextTokenizer,
) -> None:
    sequence = running_sequence(tokenizer)
    step = sequence.step_input()
    assert step.continues and step.token_ids == []
    # The running step feeds token 12: the cache then holds prompt + both generated tokens.
    assert step.cached_tokens == len(PROMPT) + 2 == sequence.cached_after_pending
    assert step.sample_index == 3  # the running step samples index 2
    assert sequence.can_continue

    sequence.pending = 0
    plain = sequence.step_input()
    assert not plain.continues and plain.token_ids == [12] and plain.sample_index == 2


def test_no_continuation_past_the_length_limit_or_while_replaying_or_off_the_device(
    tokenizer: TextTokenizer,
) -> None:
    assert not running_sequence(tokenizer, max_tokens=3).can_continue  # step 3 ends it
    assert running_sequence(tokenizer, max_tokens=4).can_continue

    replaying = running_sequence(tokenizer)
    replaying.replay = [11, 12, 13]  # a restart regenerates what the client has
    assert not replaying.can_continue

    offloaded = running_sequence(tokenizer)
    offloaded.cache_on_host()
    assert not offloaded.can_continue

    lost = running_sequence(tokenizer)
    lost.lose_cache()
    assert lost.pending == 0 and not lost.can_continue

    # Its prefill is the step running now: the cache is on the device once that step is done.
    prefilling = make_sequence(tokenizer, make_request(PROMPT))
    prefilling.bind_to("instance-0")
    prefilling.pending = 1
    assert prefilling.kv_location == "none" and prefilling.can_continue
    step = prefilling.step_input()
    assert step.continues and step.cached_tokens == len(PROMPT) and step.sample_index == 1


def test_the_memory_plan_counts_the_token_in_flight(tokenizer: TextTokenizer) -> None:
    # Blocks of 4. Prompt 3 + 2 generated: the running step feeds the second generated token
    # (5 positions held after it), the next step feeds the token sampled now (6).
    view = ExecutorView("instance-0", max_batch_size=4, kv_blocks=2, block_size=4)
    sequence = running_sequence(tokenizer)
    assert held_blocks(view, sequence) == 2
    assert blocks_after_step(view, sequence) == 2
    for token_id in (13, 14):  # each step's token comes back while the next one runs
        sequence.append(token_id, frozenset())
        sequence.pending = 1
    assert blocks_after_step(view, sequence) == 2  # 8 positions after the next step
    sequence.append(15, frozenset())
    sequence.pending = 1
    assert blocks_after_step(view, sequence) == 3  # 9: a third block
    plan = plan_memory(view, [sequence], [sequence])
    assert plan.batch == []  # it does not fit two blocks: the step waits for room


def command(*sequences: StepSequence) -> StepCommand:
    return StepCommand(sequences=list(sequences))


# Greedy, the fifth token, four positions cached.
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "seed": 0, "sample_index": 4, "cached_tokens": 4}


def sequence_step(request_id: str, token_ids: list[int], continues: bool) -> StepSequence:
    return StepSequence.model_validate(
        {"request_id": request_id, "token_ids": token_ids, "continues": continues, **SAMPLING}
    )


def test_the_executor_feeds_a_continuing_sequence_its_last_sampled_token() -> None:
    steps = step_inputs(
        command(sequence_step("a", [], True), sequence_step("b", [1, 2, 3], False)),
        sampled={"a": 42, "c": 7},
    )
    assert [(s.request_id, s.token_ids, s.sample_index) for s in steps] == [
        ("a", [42], 4),
        ("b", [1, 2, 3], 4),
    ]
    with pytest.raises(BadRequest, match="sampled no token for it"):
        step_inputs(command(sequence_step("c", [], True)), sampled={})


def test_a_prefill_in_flight_holds_its_blocks_in_the_next_plan(tokenizer: TextTokenizer) -> None:
    view = ExecutorView("instance-0", max_batch_size=4, kv_blocks=2, block_size=4)
    prefilling = make_sequence(tokenizer, make_request([5] * 7))  # 2 blocks once prefilled
    prefilling.bind_to("instance-0")
    prefilling.pending = 1
    newcomer = make_sequence(tokenizer, make_request(PROMPT))  # 1 block
    newcomer.bind_to("instance-0")
    plan = plan_memory(view, [newcomer], [newcomer, prefilling])
    # Both do not fit: the plan frees the prefill's blocks, which a step sent ahead may not do
    # (the loop then waits for the running step).
    assert plan.drop == [prefilling] and plan.moves_caches
