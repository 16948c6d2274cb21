"""Bad input gets a clear nats.micro error reply (code + description), never a crash or a hang."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from shared.client import SpotserveClient
from shared.codec import decode
from shared.messages import ErrorReply
from shared.subjects import GENERATE

JSON_HEADERS = {"Content-Type": "application/json"}


async def ask(nc: Client, data: bytes, headers: dict[str, str] | None = None) -> tuple[str, str]:
    reply = await nc.request(GENERATE, data, timeout=30, headers=headers)
    assert reply.headers is not None, "an error reply carries nats.micro headers"
    code, description = reply.headers[ERROR_CODE_HEADER], reply.headers[ERROR_HEADER]
    encoding = "json" if headers == JSON_HEADERS else "msgpack"
    body = ErrorReply.model_validate(decode(reply.data, encoding))
    assert (body.error.code, body.error.message) == (code, description)
    return code, description


def packed(body: Any) -> bytes:
    return msgpack.packb(body)


BAD_MSGPACK_BODIES = [
    pytest.param(b"\xc1\xff\x00garbage", "400", "not valid msgpack", id="malformed-msgpack"),
    pytest.param(packed([1, 2, 3]), "400", "must be a map", id="not-a-map"),
    pytest.param(packed({"max_tokens": 5}), "400", "exactly one of 'prompt'", id="missing-prompt"),
    pytest.param(
        packed({"prompt": "x", "prompt_token_ids": [1, 2]}),
        "400",
        "exactly one of",
        id="both-prompts",
    ),
    pytest.param(packed({"prompt": 42}), "400", "prompt", id="prompt-wrong-type"),
    pytest.param(
        packed({"prompt": "x", "max_tokens": "10"}), "400", "max_tokens", id="max-tokens-string"
    ),
    pytest.param(
        packed({"prompt": "x", "max_tokens": -3}), "400", "max_tokens", id="negative-max-tokens"
    ),
    pytest.param(
        packed({"prompt": "x", "max_tokens": 10**9}), "400", "max_tokens", id="huge-max-tokens"
    ),
    pytest.param(
        packed({"prompt": "x", "temperature": -0.5}), "400", "temperature", id="negative-temp"
    ),
    pytest.param(packed({"prompt": "x", "top_p": 0}), "400", "top_p", id="zero-top-p"),
    pytest.param(packed({"prompt": "x", "seed": -1}), "400", "seed", id="negative-seed"),
    pytest.param(packed({"prompt": "x", "stream": "yes"}), "400", "stream", id="stream-wrong-type"),
    pytest.param(packed({"prompt": "x", "stop": "END"}), "400", "stop", id="stop-not-a-list"),
    pytest.param(packed({"prompt": "x", "max_tokenz": 5}), "400", "max_tokenz", id="unknown-field"),
    pytest.param(packed({"prompt": ""}), "400", "empty", id="empty-prompt"),
    pytest.param(
        packed({"prompt_token_ids": [1, 10**7]}), "400", "vocabulary", id="token-out-of-vocab"
    ),
    pytest.param(
        packed({"prompt_token_ids": [1, -5]}), "400", "prompt_token_ids", id="negative-token"
    ),
]


@pytest.mark.parametrize(("data", "code", "fragment"), BAD_MSGPACK_BODIES)
async def test_bad_msgpack_request_is_refused(
    cluster: object, nc: Client, data: bytes, code: str, fragment: str
) -> None:
    got_code, description = await ask(nc, data)
    assert got_code == code
    assert fragment in description


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        pytest.param(b"{not json", "not valid JSON", id="malformed-json"),
        pytest.param(b"\xff\xfe", "not valid JSON", id="invalid-utf8"),
        pytest.param(json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens", id="0"),
        pytest.param(json.dumps({"prompt": "x", "extra": 1}).encode(), "extra", id="unknown"),
        pytest.param(json.dumps({"prompt": None}).encode(), "exactly one", id="null-prompt"),
    ],
)
async def test_bad_json_request_is_refused_in_json(
    cluster: object, nc: Client, data: bytes, fragment: str
) -> None:
    code, description = await ask(nc, data, JSON_HEADERS)
    assert code == "400"
    assert fragment in description


async def test_prompt_longer_than_context_is_refused(cluster: object, nc: Client) -> None:
    code, description = await ask(nc, packed({"prompt_token_ids": [5] * 5000}))
    assert code == "413"
    assert "context" in description


async def test_prompt_plus_max_tokens_over_context_names_the_limit(
    cluster: object, nc: Client
) -> None:
    code, description = await ask(nc, packed({"prompt_token_ids": [5] * 1000, "max_tokens": 100}))
    assert code == "400"
    assert "at most 24" in description  # tiny model: context 1024


async def test_oversized_body_is_refused(cluster: object, nc: Client) -> None:
    code, description = await ask(nc, packed({"prompt": "x" * 1_200_000}))
    assert code == "413"
    assert "bytes" in description


async def test_service_still_answers_after_bad_input(client: SpotserveClient) -> None:
    completion = await client.generate("still alive?", max_tokens=4, temperature=0.0)
    assert completion.completion_tokens >= 0
    assert completion.finish_reason in ("stop", "length")
