"""What the scheduler's token publisher commits for an iteration (no NATS: the records it
builds): one record of all its chunks, runs on a request's own subject at its first chunk,
every RUN_CHUNKS and its last (closed), a closed run for a request that failed, and a resumed
request's next run covering the chunks its earlier runs left out."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import structlog

from services.scheduler.intake import RequestIntake
from services.scheduler.sequence import Sequence
from services.scheduler.tokens import RUN_CHUNKS, IterationOutput, Record, TokenPublisher
from shared.codec import decode, encode
from shared.messages import ChunkRecord, TokenChunk
from shared.model.tokenizer import TextTokenizer
from shared.runtime import ServiceContext
from shared.subjects import COMMITS_SUBJECT, tokens_subject
from tests.test_units_scheduler import make_request, make_sequence


def publisher() -> TokenPublisher:
    context = cast(ServiceContext, SimpleNamespace(log=structlog.get_logger()))
    return TokenPublisher(context, cast(RequestIntake, None))


def commit(tokens: TokenPublisher, *outputs: list[tuple[Sequence, TokenChunk]]) -> list[Record]:
    """The records of one iteration whose chunks are ``outputs``."""
    chunks = [pair for output in outputs for pair in output]
    return tokens._records(IterationOutput(chunks), [encode(c) for _, c in chunks])


def decoded(record: Record) -> ChunkRecord:
    return ChunkRecord.model_validate(decode(record.body))


def step(sequence: Sequence, token_id: int = 7) -> list[tuple[Sequence, TokenChunk]]:
    chunk = sequence.append(token_id, frozenset())
    assert chunk is not None
    return [(sequence, chunk)]


def test_runs_at_the_first_chunk_every_run_chunks_and_the_last(tokenizer: TextTokenizer) -> None:
    tokens = publisher()
    total = RUN_CHUNKS + 3
    sequence = make_sequence(tokenizer, make_request(tokenizer.encode("Hi"), max_tokens=total))
    runs = []
    for _ in range(total):
        records = commit(tokens, step(sequence))
        assert records[0].subject == COMMITS_SUBJECT
        assert len(decoded(records[0]).chunks) == 1
        own = tokens_subject(sequence.request_id)
        runs += [decoded(r) for r in records[1:] if r.subject == own]
    assert [len(run.chunks) for run in runs] == [1, RUN_CHUNKS, 2]
    assert [run.closed for run in runs] == [False, False, True]


def test_one_record_for_the_whole_batch(tokenizer: TextTokenizer) -> None:
    tokens = publisher()
    batch = [make_sequence(tokenizer) for _ in range(8)]
    for sequence in batch:
        commit(tokens, step(sequence))  # their first chunks (and first runs)
    records = commit(tokens, *(step(sequence) for sequence in batch))
    assert [r.subject for r in records] == [COMMITS_SUBJECT]
    assert len(decoded(records[0]).chunks) == 8


def test_a_failed_request_gets_a_closed_run_of_what_no_run_holds(tokenizer: TextTokenizer) -> None:
    tokens = publisher()
    sequence = make_sequence(tokenizer)
    for _ in range(3):
        commit(tokens, step(sequence))
    records = tokens._records(IterationOutput([], failed=[sequence]), [])
    assert [r.subject for r in records] == [tokens_subject(sequence.request_id)]
    closing = decoded(records[0])
    assert closing.closed
    assert [decode(body)["index"] for body in closing.chunks] == [1, 2]
    # One that committed nothing leaves nothing to read back.
    assert tokens._records(IterationOutput([], failed=[make_sequence(tokenizer)]), []) == []


def test_a_resumed_request_runs_what_its_earlier_runs_left_out(tokenizer: TextTokenizer) -> None:
    """A scheduler died after committing chunks 1-2 in iteration records only: the next one's
    first run of the request holds them again, so its runs leave no gap from then on."""
    request = make_request(tokenizer.encode("Hi"), max_tokens=4 * RUN_CHUNKS)
    first = make_sequence(tokenizer, request)
    committed = [chunk for _ in range(3) for _, chunk in step(first)]
    resumed = Sequence.create(first.request, first.message, tokenizer, committed, in_runs=1)
    tokens = publisher()
    for _ in range(RUN_CHUNKS - 2):
        records = commit(tokens, step(resumed))
    run = decoded(records[-1])
    assert [decode(body)["index"] for body in run.chunks] == list(range(1, RUN_CHUNKS + 1))
