"""Unit tests of the scheduler's pure parts: Sequence (tokens, text, chunks, cache) and the FCFS
policy. No NATS: a Sequence's message is only used to ack, which these tests never do."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from services.scheduler.policy import (
    ExecutorView,
    FcfsPolicy,
    SchedulerPolicy,
    StepOutput,
    make_policy,
)
from services.scheduler.sequence import Sequence
from shared.messages import AcceptedRequest, TokenChunk
from shared.model.tokenizer import TextTokenizer

MULTIBYTE_TEXT = "Le café était très bon: 中文很好 🙂🦀 naïve ß ∑ 龍!"
_request_ids = itertools.count()


class FakeMessage:
    """Stands in for the JetStream message of a request (never acked in these tests)."""


def make_request(
    prompt_token_ids: list[int],
    max_tokens: int = 64,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    request_id: str | None = None,
) -> AcceptedRequest:
    return AcceptedRequest(
        request_id=request_id or f"req-{next(_request_ids)}",
        prompt_token_ids=prompt_token_ids,
        max_tokens=max_tokens,
        temperature=0.5,
        top_p=0.9,
        seed=1234,
        stop=stop or [],
        stream=True,
        ignore_eos=ignore_eos,
        reply_subject="_INBOX.test",
        encoding="msgpack",
        accepted_at=0.0,
    )


def make_sequence(
    tokenizer: TextTokenizer,
    request: AcceptedRequest | None = None,
    committed: list[TokenChunk] | None = None,
) -> Sequence:
    request = request or make_request(tokenizer.encode("Hello"))
    return Sequence.create(request, cast(Msg, FakeMessage()), tokenizer, committed or [])


def feed(sequence: Sequence, token_ids: list[int], eos: frozenset[int]) -> list[TokenChunk]:
    """Append tokens until the sequence finishes (or the tokens run out)."""
    chunks = []
    for token_id in token_ids:
        chunks.append(sequence.append(token_id, eos))
        if sequence.finished:
            break
    return chunks


def assert_chunk_stream(chunks: list[TokenChunk], start: int = 0) -> None:
    """Indices without gaps from ``start``; only the last chunk may (and must) carry usage."""
    assert [chunk.index for chunk in chunks] == list(range(start, start + len(chunks)))
    for chunk in chunks[:-1]:
        assert chunk.finish_reason is None and chunk.usage is None


def text_ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids and not set(ids) & tokenizer.eos_token_ids
    return ids


# ---------------------------------------------------------------------------------------------
# Sequence.append


def test_eos_ends_with_stop_and_is_left_out(tokenizer: TextTokenizer, eos: frozenset[int]) -> None:
    ids = text_ids(tokenizer, "Hello world")
    sequence = make_sequence(tokenizer, make_request(tokenizer.encode("Hi"), max_tokens=50))
    (eos_id,) = sorted(eos)[:1]
    chunks = feed(sequence, [*ids, eos_id, *ids], eos)
    assert len(chunks) == len(ids) + 1
    assert_chunk_stream(chunks)
    last = chunks[-1]
    assert sequence.finished and sequence.finish_reason == "stop"
    assert (last.finish_reason, last.token_ids) == ("stop", [])
    assert sequence.generated == ids
    assert eos_id not in sequence.generated
    assert [t for chunk in chunks for t in chunk.token_ids] == ids
    assert "".join(chunk.text for chunk in chunks) == "Hello world"
    assert last.usage is not None
    assert last.usage.completion_tokens == len(ids)
    assert last.usage.prompt_tokens == len(tokenizer.encode("Hi"))
    result = sequence.result()
    assert (result.token_ids, result.text, result.finish_reason) == (ids, "Hello world", "stop")
    assert result.usage == last.usage


def test_eos_as_first_token(tokenizer: TextTokenizer, eos: frozenset[int]) -> None:
    sequence = make_sequence(tokenizer)
    chunk = sequence.append(min(eos), eos)
    assert (chunk.index, chunk.token_ids, chunk.text, chunk.finish_reason) == (0, [], "", "stop")
    assert chunk.usage is not None and chunk.usage.completion_tokens == 0
    assert sequence.generated == []


def test_ignore_eos_keeps_going(tokenizer: TextTokenizer, eos: frozenset[int]) -> None:
    ids = text_ids(tokenizer, "Hello")
    eos_id = min(eos)
    tokens = [ids[0], eos_id, *ids[1:], eos_id]
    sequence = make_sequence(
        tokenizer, make_request(tokenizer.encode("Hi"), max_tokens=len(tokens), ignore_eos=True)
    )
    chunks = feed(sequence, tokens, eos)
    assert len(chunks) == len(tokens)
    assert_chunk_stream(chunks)
    assert [chunk.token_ids for chunk in chunks] == [[t] for t in tokens]
    assert sequence.generated == tokens
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(tokens)
    # The special token has no text of its own.
    assert "".join(chunk.text for chunk in chunks) == "Hello"


@pytest.mark.parametrize("max_tokens", [1, 3, 7])
def test_max_tokens_ends_with_length(
    tokenizer: TextTokenizer, eos: frozenset[int], max_tokens: int
) -> None:
    ids = text_ids(tokenizer, "The spot instance was preempted, so the planner moved it")
    assert len(ids) > max_tokens
    prompt = tokenizer.encode("Once upon a time")
    sequence = make_sequence(tokenizer, make_request(prompt, max_tokens=max_tokens))
    chunks = feed(sequence, ids, eos)
    assert len(chunks) == max_tokens
    assert_chunk_stream(chunks)
    assert chunks[-1].finish_reason == "length"
    assert sequence.finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == max_tokens
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    assert sequence.generated == ids[:max_tokens]
    # At the end every held-back piece is flushed: the text is the decode of the tokens.
    text = "".join(chunk.text for chunk in chunks)
    assert text == tokenizer.decode(ids[:max_tokens]) == sequence.result().text


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello world, the spot", ["world"], "Hello "),
        ("Hello world, the spot", ["xyz", "o w"], "Hell"),
        (MULTIBYTE_TEXT, ["中文"], "Le café était très bon: "),
        (MULTIBYTE_TEXT, ["🦀"], "Le café était très bon: 中文很好 🙂"),
    ],
    ids=["ascii", "two-stops", "cjk", "emoji"],
)
def test_stop_string_ends_with_stop(
    tokenizer: TextTokenizer, eos: frozenset[int], text: str, stop: list[str], expected: str
) -> None:
    ids = text_ids(tokenizer, text)
    sequence = make_sequence(tokenizer, make_request(tokenizer.encode("Hi"), stop=stop))
    chunks = feed(sequence, ids, eos)
    assert_chunk_stream(chunks)
    assert sequence.finish_reason == chunks[-1].finish_reason == "stop"
    # It stopped at the token that completed the stop string, not later.
    assert len(chunks) < len(ids)
    assert any(s in tokenizer.decode(ids[: len(chunks)]) for s in stop)
    assert not any(s in tokenizer.decode(ids[: len(chunks) - 1]) for s in stop)
    streamed = "".join(chunk.text for chunk in chunks)
    assert streamed == expected == sequence.result().text
    assert not any(s in chunk.text for chunk in chunks for s in stop)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(sequence.generated) == len(chunks)


def test_chunk_texts_are_valid_and_concatenate(
    tokenizer: TextTokenizer, eos: frozenset[int]
) -> None:
    ids = text_ids(tokenizer, MULTIBYTE_TEXT)
    sequence = make_sequence(tokenizer, make_request([1], max_tokens=len(ids)))
    chunks = feed(sequence, ids, eos)
    assert_chunk_stream(chunks)
    # Some characters span tokens, so some chunks must have held their text back.
    assert any(chunk.text == "" for chunk in chunks)
    assert not any("\ufffd" in chunk.text for chunk in chunks)
    assert "".join(chunk.text for chunk in chunks) == MULTIBYTE_TEXT


# ---------------------------------------------------------------------------------------------
# step_input and the KV cache


def test_step_input_prefill_decode_and_recompute(
    tokenizer: TextTokenizer, eos: frozenset[int]
) -> None:
    prompt = tokenizer.encode("The spot instance")
    request = make_request(prompt)
    sequence = make_sequence(tokenizer, request)
    generated = text_ids(tokenizer, "Hello world")[:4]

    first = sequence.step_input()
    assert first.request_id == request.request_id
    assert (first.token_ids, first.sample_index) == (prompt, 0)
    assert (first.temperature, first.top_p, first.seed) == (0.5, 0.9, 1234)

    for count, token_id in enumerate(generated[:3], start=1):
        sequence.append(token_id, eos)
        step = sequence.step_input()
        assert (step.token_ids, step.sample_index) == ([token_id], count)

    sequence.bind_to("instance-0")
    sequence.lose_cache()
    assert sequence.executor is None
    recompute = sequence.step_input()
    assert recompute.token_ids == prompt + generated[:3]
    assert recompute.sample_index == len(sequence.generated) == 3

    sequence.append(generated[3], eos)
    after = sequence.step_input()
    assert (after.token_ids, after.sample_index) == ([generated[3]], 4)


# ---------------------------------------------------------------------------------------------
# Resuming from committed chunks


def run_original(
    tokenizer: TextTokenizer,
    eos: frozenset[int],
    request: AcceptedRequest,
    ids: list[int],
) -> tuple[Sequence, list[TokenChunk]]:
    sequence = make_sequence(tokenizer, request)
    return sequence, feed(sequence, ids, eos)


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        (MULTIBYTE_TEXT, []),
        (MULTIBYTE_TEXT, ["龍!"]),
        ("Hello world, the spot instance was preempted", ["spot instance was"]),
    ],
    ids=["multibyte", "multibyte-stop", "ascii-stop"],
)
def test_resume_from_committed_chunks(
    tokenizer: TextTokenizer, eos: frozenset[int], text: str, stop: list[str]
) -> None:
    ids = text_ids(tokenizer, text)
    request = make_request(tokenizer.encode("Hi"), max_tokens=len(ids), stop=stop)
    original, all_chunks = run_original(tokenizer, eos, request, ids)
    full_text = "".join(chunk.text for chunk in all_chunks)
    assert original.finished

    for split in range(len(all_chunks)):
        committed = all_chunks[:split]
        resumed = make_sequence(tokenizer, request, committed)
        # A fresh original at the same point, to compare state and what follows.
        reference = make_sequence(tokenizer, request)
        assert feed(reference, ids[:split], eos) == committed

        assert not resumed.finished
        assert resumed.generated == reference.generated == ids[:split]
        assert resumed.detokenizer.text == reference.detokenizer.text
        assert resumed.next_chunk_index == split
        assert resumed.cached_tokens == 0
        assert resumed.step_input().token_ids == request.prompt_token_ids + ids[:split]
        assert resumed.step_input().sample_index == split

        rest = feed(resumed, ids[split:], eos)
        assert rest == all_chunks[split:]
        assert "".join(chunk.text for chunk in [*committed, *rest]) == full_text
        assert resumed.result() == original.result()


def test_resume_from_committed_chunks_in_groups(
    tokenizer: TextTokenizer, eos: frozenset[int]
) -> None:
    """Committed chunks are not always one token each (a resend may carry several)."""
    ids = text_ids(tokenizer, MULTIBYTE_TEXT)
    request = make_request([1], max_tokens=len(ids))
    original, all_chunks = run_original(tokenizer, eos, request, ids)
    split = len(ids) // 2
    merged = TokenChunk(
        request_id=request.request_id,
        index=0,
        token_ids=ids[:split],
        text="".join(chunk.text for chunk in all_chunks[:split]),
    )
    resumed = make_sequence(tokenizer, request, [merged])
    assert resumed.generated == ids[:split]
    assert resumed.next_chunk_index == 1
    rest = feed(resumed, ids[split:], eos)
    assert merged.text + "".join(chunk.text for chunk in rest) == MULTIBYTE_TEXT
    assert resumed.result().text == original.result().text == MULTIBYTE_TEXT


def test_resume_from_a_finished_stream_is_finished(
    tokenizer: TextTokenizer, eos: frozenset[int]
) -> None:
    ids = text_ids(tokenizer, "Hello world")
    request = make_request([1], max_tokens=50)
    original, chunks = run_original(tokenizer, eos, request, [*ids, min(eos)])
    resumed = make_sequence(tokenizer, request, chunks)
    assert resumed.finished and resumed.finish_reason == "stop"
    assert resumed.generated == original.generated == ids
    assert resumed.next_chunk_index == len(chunks)
    assert resumed.result() == original.result()


def test_resume_from_a_finished_stream_keeps_the_flushed_text(
    tokenizer: TextTokenizer, eos: frozenset[int]
) -> None:
    ids = text_ids(tokenizer, "ok 🦀")
    request = make_request([1], max_tokens=len(ids) - 1)
    # The last token allowed leaves the crab incomplete: the final chunk flushes its bytes.
    original, chunks = run_original(tokenizer, eos, request, ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].text
    streamed = "".join(chunk.text for chunk in chunks)
    assert original.result().text == streamed
    resumed = make_sequence(tokenizer, request, chunks)
    assert resumed.finished
    assert resumed.result().text == streamed


# ---------------------------------------------------------------------------------------------
# FcfsPolicy


@dataclass
class SequenceFactory:
    tokenizer: TextTokenizer
    count: int = 0
    created: list[Sequence] = field(default_factory=list)

    def __call__(self) -> Sequence:
        self.count += 1
        request = make_request([1, 42 + self.count], request_id=f"s{self.count}")
        sequence = make_sequence(self.tokenizer, request)
        self.created.append(sequence)
        return sequence

    def many(self, n: int) -> list[Sequence]:
        return [self() for _ in range(n)]


@pytest.fixture
def new_sequence(tokenizer: TextTokenizer) -> SequenceFactory:
    return SequenceFactory(tokenizer)


def finish(sequence: Sequence, eos: frozenset[int]) -> None:
    sequence.append(min(eos), eos)
    assert sequence.finished


def ids_of(sequences: list[Sequence]) -> list[str]:
    return [sequence.request_id for sequence in sequences]


def test_fcfs_first_come_and_batch_limit(new_sequence: SequenceFactory) -> None:
    policy = FcfsPolicy()
    sequences = new_sequence.many(5)
    for sequence in sequences:
        policy.add_request(sequence)
    assert policy.num_unfinished() == 5
    batch = policy.schedule(ExecutorView("a", max_batch_size=3))
    assert ids_of(batch) == ["s1", "s2", "s3"]
    assert all(sequence.executor == "a" for sequence in batch)
    assert all(sequence.executor is None for sequence in sequences[3:])
    # The same executor again: the same running batch, still limited.
    assert policy.schedule(ExecutorView("a", max_batch_size=3)) == batch
    assert policy.num_unfinished() == 5


def test_fcfs_running_sequences_stay_on_their_executor(
    new_sequence: SequenceFactory, eos: frozenset[int]
) -> None:
    policy = FcfsPolicy()
    for sequence in new_sequence.many(5):
        policy.add_request(sequence)
    a, b = ExecutorView("a", 2), ExecutorView("b", 2)
    batch_a = policy.schedule(a)
    batch_b = policy.schedule(b)
    assert ids_of(batch_a) == ["s1", "s2"] and ids_of(batch_b) == ["s3", "s4"]
    for _ in range(3):
        again_a, again_b = policy.schedule(a), policy.schedule(b)
        assert again_a == batch_a and again_b == batch_b
        assert not set(map(id, again_a)) & set(map(id, again_b))
        policy.update_from_output(StepOutput("a", again_a, 0.0))
        policy.update_from_output(StepOutput("b", again_b, 0.0))
    # A third executor only gets what is still waiting.
    assert ids_of(policy.schedule(ExecutorView("c", 8))) == ["s5"]
    assert policy.schedule(ExecutorView("d", 8)) == []


def test_fcfs_finished_leave_and_free_places_go_to_the_oldest(
    new_sequence: SequenceFactory, eos: frozenset[int]
) -> None:
    policy = FcfsPolicy()
    sequences = new_sequence.many(6)
    for sequence in sequences:
        policy.add_request(sequence)
    view = ExecutorView("a", 3)
    batch = policy.schedule(view)
    assert ids_of(batch) == ["s1", "s2", "s3"]
    finish(sequences[1], eos)
    policy.update_from_output(StepOutput("a", batch, 0.01))
    assert policy.num_unfinished() == 5
    batch = policy.schedule(view)
    assert ids_of(batch) == ["s1", "s3", "s4"]
    finish(sequences[0], eos)
    finish(sequences[2], eos)
    policy.update_from_output(StepOutput("a", batch, 0.01))
    assert ids_of(policy.schedule(view)) == ["s4", "s5", "s6"]
    assert policy.num_unfinished() == 3
    # An output of another executor does not touch this one's sequences.
    finish(sequences[3], eos)
    policy.update_from_output(StepOutput("other", [sequences[3]], 0.01))
    assert policy.num_unfinished() == 3
    policy.update_from_output(StepOutput("a", [sequences[3]], 0.01))
    assert policy.num_unfinished() == 2


def test_fcfs_requeue_puts_lost_sequences_first_in_order(
    new_sequence: SequenceFactory,
) -> None:
    policy = FcfsPolicy()
    sequences = new_sequence.many(6)
    for sequence in sequences:
        policy.add_request(sequence)
    batch_a = policy.schedule(ExecutorView("a", 3))
    for sequence in batch_a:
        sequence.cached_tokens = len(sequence.request.prompt_token_ids)
    policy.schedule(ExecutorView("b", 1))
    lost = policy.requeue_executor("a")
    assert ids_of(lost) == ["s1", "s2", "s3"]
    for sequence in lost:
        assert sequence.executor is None and sequence.cached_tokens == 0
        assert sequence.step_input().token_ids == sequence.request.prompt_token_ids
    assert ids_of(list(policy.waiting)) == ["s1", "s2", "s3", "s5", "s6"]
    assert ids_of(policy.running["b"]) == ["s4"]
    assert policy.requeue_executor("a") == []
    assert policy.requeue_executor("never-seen") == []
    assert ids_of(policy.schedule(ExecutorView("c", 2))) == ["s1", "s2"]
    assert policy.num_unfinished() == 6


def test_fcfs_remove_waiting_and_running(new_sequence: SequenceFactory) -> None:
    policy = FcfsPolicy()
    sequences = new_sequence.many(4)
    for sequence in sequences:
        policy.add_request(sequence)
    view = ExecutorView("a", 2)
    policy.schedule(view)
    policy.remove(sequences[0])  # running
    policy.remove(sequences[3])  # waiting
    assert policy.num_unfinished() == 2
    assert ids_of(policy.schedule(view)) == ["s2", "s3"]
    policy.remove(sequences[0])  # already gone: nothing happens
    assert policy.num_unfinished() == 2
    assert policy.requeue_executor("a") == [sequences[1], sequences[2]]


def test_make_policy() -> None:
    assert isinstance(make_policy("fcfs"), FcfsPolicy)
    assert make_policy("fcfs") is not make_policy("fcfs")
    with pytest.raises(ValueError, match=r"'nope'.*fcfs"):
        make_policy("nope")


def test_fcfs_requeue_of_two_executors_keeps_arrival_order(
    new_sequence: SequenceFactory,
) -> None:
    policy = FcfsPolicy()
    for sequence in new_sequence.many(5):
        policy.add_request(sequence)
    policy.schedule(ExecutorView("a", 2))
    policy.schedule(ExecutorView("b", 2))
    # Two spot instances are preempted together.
    policy.requeue_executor("a")
    policy.requeue_executor("b")
    assert ids_of(list(policy.waiting)) == ["s1", "s2", "s3", "s4", "s5"]


# ---------------------------------------------------------------------------------------------
# Property: FcfsPolicy loses and duplicates nothing under any interleaving

Operation = tuple[str, int, int]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.just(0), st.just(0)),
        # Schedule, step, finish the sequences picked by the mask, update.
        st.tuples(st.just("step"), st.integers(0, 2), st.integers(0, 15)),
        # Schedule only (an iteration still in flight).
        st.tuples(st.just("schedule"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("requeue"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("remove"), st.integers(0, 50), st.just(0)),
    ),
    max_size=40,
)
batch_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=3)

ARRIVAL_ORDER_COUNTEREXAMPLE: list[Operation] = [
    *[("add", 0, 0)] * 4,
    ("schedule", 0, 0),
    ("schedule", 1, 0),
    ("requeue", 0, 0),
    ("requeue", 1, 0),
]


def check_policy(
    tokenizer: TextTokenizer,
    eos: frozenset[int],
    sizes: list[int],
    ops: list[Operation],
    full_arrival_order: bool,
) -> None:
    policy: SchedulerPolicy = make_policy("fcfs")
    assert isinstance(policy, FcfsPolicy)
    executors = [ExecutorView(f"e{i}", size) for i, size in enumerate(sizes)]
    factory = SequenceFactory(tokenizer)
    arrival: dict[int, int] = {}
    alive: list[Sequence] = []
    ever_scheduled: set[int] = set()

    for op, arg, mask in ops:
        if op == "add":
            sequence = factory()
            arrival[id(sequence)] = len(arrival)
            alive.append(sequence)
            policy.add_request(sequence)
        elif op in ("step", "schedule"):
            view = executors[arg % len(executors)]
            before = list(policy.running.get(view.instance_id, []))
            waiting_before = list(policy.waiting)
            batch = policy.schedule(view)
            assert len(batch) <= view.max_batch_size
            assert all(sequence.executor == view.instance_id for sequence in batch)
            # Continuous batching: what ran keeps running, free places go to the oldest waiting.
            assert batch[: len(before)] == before[: view.max_batch_size]
            added = batch[len(before) :]
            assert added == waiting_before[: len(added)]
            ever_scheduled.update(id(sequence) for sequence in batch)
            if op == "step":
                for index, sequence in enumerate(batch):
                    if mask >> index & 1:
                        finish(sequence, eos)
                        alive.remove(sequence)
                policy.update_from_output(StepOutput(view.instance_id, batch, 0.0))
        elif op == "requeue":
            view = executors[arg % len(executors)]
            lost = policy.requeue_executor(view.instance_id)
            assert all(seq.executor is None and seq.cached_tokens == 0 for seq in lost)
            # Back among the waiting (in arrival order: checked below).
            assert all(sequence in policy.waiting for sequence in lost)
        elif op == "remove" and alive:
            sequence = alive.pop(arg % len(alive))
            policy.remove(sequence)

        # Nothing lost, nothing duplicated, nothing finished left behind.
        waiting = list(policy.waiting)
        running = {name: list(seqs) for name, seqs in policy.running.items()}
        everywhere = waiting + [seq for seqs in running.values() for seq in seqs]
        assert sorted(ids_of(everywhere)) == sorted(ids_of(alive))
        assert len(set(ids_of(everywhere))) == len(everywhere)
        assert policy.num_unfinished() == len(alive)
        assert all(not sequence.finished for sequence in everywhere)
        for name, seqs in running.items():
            assert all(sequence.executor == name for sequence in seqs)
        assert all(sequence.executor is None for sequence in waiting)
        # Sequences that never ran wait behind the others, in arrival order.
        fresh = [seq for seq in waiting if id(seq) not in ever_scheduled]
        assert waiting[len(waiting) - len(fresh) :] == fresh
        assert [arrival[id(seq)] for seq in fresh] == sorted(arrival[id(seq)] for seq in fresh)
        if full_arrival_order:
            order = [arrival[id(seq)] for seq in waiting]
            assert order == sorted(order), f"waiting out of arrival order: {order}"


@settings(max_examples=150, deadline=None)
@given(sizes=batch_sizes, ops=operations)
def test_fcfs_property_nothing_lost_or_duplicated(
    tokenizer: TextTokenizer, eos: frozenset[int], sizes: list[int], ops: list[Operation]
) -> None:
    check_policy(tokenizer, eos, sizes, ops, full_arrival_order=False)


@settings(max_examples=50, deadline=None)
@given(sizes=batch_sizes, ops=operations)
@example(sizes=[2, 2], ops=ARRIVAL_ORDER_COUNTEREXAMPLE)
def test_fcfs_property_waiting_in_arrival_order(
    tokenizer: TextTokenizer, eos: frozenset[int], sizes: list[int], ops: list[Operation]
) -> None:
    check_policy(tokenizer, eos, sizes, ops, full_arrival_order=True)


@pytest.mark.parametrize("name", ["fcfs", "skip-join-mlfq"])
def test_an_instance_without_a_role_takes_no_new_work_and_moved_requests_go_elsewhere(
    tokenizer: TextTokenizer, name: str
) -> None:
    policy = make_policy(name, prefill_time_s=lambda tokens: 0.001 * tokens)
    first, second = (
        make_sequence(tokenizer, make_request(tokenizer.encode(f"r{i}"))) for i in (1, 2)
    )
    policy.add_request(first)
    dying = ExecutorView("dying", max_batch_size=4)
    assert policy.schedule(dying) == [first] and first.executor == "dying"
    policy.update_from_output(StepOutput("dying", [first], 0.001))
    # The plan gives "dying" no role: it keeps what is bound to it, takes nothing new.
    dying = ExecutorView("dying", max_batch_size=4, accepts_new=False)
    policy.add_request(second)
    assert policy.schedule(dying) == [first]
    assert second not in policy.priority_order(dying)
    policy.update_from_output(StepOutput("dying", [first], 0.001))
    # The plan moves "first" off: it runs on the serving instance next, recomputing its cache.
    policy.requeue(first)
    assert first.executor is None and policy.schedule(dying) == []
    serving = ExecutorView("serving", max_batch_size=4)
    assert set(policy.schedule(serving)) == {first, second}
    assert first.executor == "serving" and policy.num_unfinished() == 2


def test_a_restart_from_scratch_regenerates_without_resending(
    tokenizer: TextTokenizer, eos: frozenset[int]
) -> None:
    """The baselines' recovery: every token is generated again from the prompt, the client's
    stream goes on at the next index, nothing is sent twice."""
    prompt = tokenizer.encode("Restart me")
    sequence = make_sequence(tokenizer, make_request(prompt, max_tokens=6, ignore_eos=True))
    first = feed(sequence, [101, 102, 103], eos)
    assert [c.index for c in first] == [0, 1, 2]
    sequence.restart_from_scratch()
    assert sequence.restarts == 1 and sequence.kv_location == "none"
    step = sequence.step_input()
    assert step.token_ids == prompt and step.sample_index == 0  # from the prompt alone
    # Regenerated tokens (even a different draw) keep what the client has: no chunk.
    assert [sequence.append(t, eos) for t in [101, 999]] == [None, None]
    assert sequence.generated == [101, 102]
    assert sequence.step_input().token_ids == [102] and sequence.step_input().sample_index == 2
    assert sequence.append(103, eos) is None
    rest = feed(sequence, [104, 105, 106], eos)
    assert [c.index for c in rest] == [3, 4, 5] and rest[-1].finish_reason == "length"
    assert sequence.generated == [101, 102, 103, 104, 105, 106]
    # A second restart before the replay ended keeps the longest replay.
    again = make_sequence(tokenizer, make_request(prompt, max_tokens=6, ignore_eos=True))
    feed(again, [1, 2, 3, 4], eos)
    again.restart_from_scratch()
    again.append(1, eos)
    again.restart_from_scratch()
    assert again.replay == [1, 2, 3, 4] and again.restarts == 2
