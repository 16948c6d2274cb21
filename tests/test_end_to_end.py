"""The whole request path with real processes: client -> admission -> JetStream -> scheduler
-> executors -> client, checked against transformers' own generate()."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.scheduler.tokens import RUN_CHUNKS
from shared.client import SpotserveClient
from shared.codec import decode, encode
from shared.messages import ChunkRecord, GenerateResult, TokenChunk
from shared.model.tokenizer import TextTokenizer
from shared.readers import chunks_of, read_committed_chunks
from shared.subjects import COMMITS_SUBJECT, GENERATE, TOKENS_STREAM, tokens_subject

PROMPTS = (
    "Hi",
    "The spot instance was preempted, so the planner",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen",
    "Serving large language models on cheap preemptible GPUs needs care: " * 4,
)


async def read_records(js: JetStreamContext, subject: str) -> list[list[TokenChunk]]:
    """Every TOKENS record on ``subject`` so far, as its chunks."""
    stream_end = (await js.get_last_msg(TOKENS_STREAM, subject)).seq
    subscription = await js.subscribe(subject, stream=TOKENS_STREAM, ordered_consumer=True)
    records = []
    try:
        while True:
            message = await subscription.next_msg(timeout=10)
            records.append(chunks_of(ChunkRecord.model_validate(decode(message.data))))
            if message.metadata.sequence.stream >= stream_end:
                return records
    finally:
        await subscription.unsubscribe()


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
    return output[0, len(prompt_ids) :].tolist()


async def test_greedy_matches_transformers_batched(
    client: SpotserveClient, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    max_tokens = 24
    completions = await asyncio.gather(
        *(
            client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            for prompt in PROMPTS
        )
    )
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        expected = hf_greedy(tiny_model_dir, tokenizer.encode(prompt), max_tokens)
        assert completion.token_ids == expected, prompt
        assert completion.finish_reason == "length"
        assert completion.completion_tokens == max_tokens
        assert completion.prompt_tokens == len(tokenizer.encode(prompt))


async def test_stream_chunks_concatenate_to_final_text(
    client: SpotserveClient, tokenizer: TextTokenizer
) -> None:
    chunks = [
        chunk
        async for chunk in client.stream(
            "Once upon a time", max_tokens=40, temperature=1.0, seed=7, ignore_eos=True
        )
    ]
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    assert chunks[-1].finish_reason == "length"
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    token_ids = [token for chunk in chunks for token in chunk.token_ids]
    text = "".join(chunk.text for chunk in chunks)
    # Sampled bytes of a random model may be invalid UTF-8; the stream then shows exactly the
    # replacement characters a full decode shows, never extra ones from a split character.
    assert text == tokenizer.decode(token_ids)


async def test_seeded_sampling_is_reproducible(client: SpotserveClient) -> None:
    options = {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first, second = await asyncio.gather(
        client.generate("Reproducible", **options), client.generate("Reproducible", **options)
    )
    third = await client.generate("Reproducible", **options)
    assert first.token_ids == second.token_ids == third.token_ids
    other = await client.generate("Reproducible", **(options | {"seed": 99}))
    assert other.token_ids != first.token_ids


async def test_non_streaming_reply_equals_streamed_result(client: SpotserveClient) -> None:
    options = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    streamed = await client.generate("Compare me", **options)
    result = await client.complete("Compare me", **options)
    assert result.token_ids == streamed.token_ids
    assert result.text == streamed.text
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 12


async def test_json_request_gets_json_chunks(cluster: object, nc: Client) -> None:
    import json

    body = {"prompt": "JSON please", "max_tokens": 5, "temperature": 0, "stream": False}
    reply = await nc.request(
        GENERATE,
        json.dumps(body).encode(),
        timeout=120,
        headers={"Content-Type": "application/json"},
    )
    assert reply.headers and reply.headers.get("Content-Type") == "application/json"
    result = GenerateResult.model_validate(json.loads(reply.data))
    assert result.usage.prompt_tokens > 0


async def test_prompt_token_ids_are_accepted(
    client: SpotserveClient, tokenizer: TextTokenizer
) -> None:
    ids = tokenizer.encode("same prompt, given as ids")
    by_ids = await client.generate(ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    by_text = await client.generate(
        "same prompt, given as ids", max_tokens=8, temperature=0.0, ignore_eos=True
    )
    assert by_ids.token_ids == by_text.token_ids


async def test_stop_string_ends_generation_and_is_left_out(
    client: SpotserveClient, tokenizer: TextTokenizer
) -> None:
    reference = await client.generate(
        "Stop somewhere", max_tokens=30, temperature=0.0, ignore_eos=True
    )
    # Pick a stop string from the middle of the greedy text, so it must appear.
    text = reference.text
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = await client.generate(
        "Stop somewhere", max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]
    )
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert stopped.text == text[: text.index(stop)]


async def test_tokens_are_committed_to_jetstream(cluster: object, nc: Client) -> None:
    client = SpotserveClient(nc)
    tokens = RUN_CHUNKS + 6
    completion = await client.generate(
        "commit me", max_tokens=tokens, temperature=0.0, ignore_eos=True
    )
    js = nc.jetstream()
    # The request's runs on its own subject: its first chunk, then RUN_CHUNKS at most each.
    runs = await read_records(js, tokens_subject(completion.request_id))
    assert [[c.index for c in record] for record in runs] == [
        [0],
        list(range(1, RUN_CHUNKS + 1)),
        list(range(RUN_CHUNKS + 1, tokens)),
    ]
    assert runs[-1][-1].finish_reason == "length"
    last_run = await js.get_last_msg(TOKENS_STREAM, tokens_subject(completion.request_id))
    assert ChunkRecord.model_validate(decode(last_run.data)).closed  # nothing follows it
    # Every chunk is in an iteration record too, once, and no record has two of a request.
    iterations = await read_records(js, COMMITS_SUBJECT)
    indices = [
        [c.index for c in record if c.request_id == completion.request_id] for record in iterations
    ]
    assert [index for record in indices for index in record] == list(range(tokens))
    assert all(len(record) <= 1 for record in indices)
    committed = await read_committed_chunks(js, completion.request_id)
    assert [token for chunk in committed for token in chunk.token_ids] == completion.token_ids
    assert encode(committed[-1])  # round-trips through the codec
