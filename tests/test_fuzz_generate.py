"""Fuzzing ``spotserve.v1.generate`` on a running cluster (hypothesis): thousands of random and
malformed payloads, msgpack and JSON (random bytes, wrong types, huge numbers, deep nesting,
invalid UTF-8, oversized bodies). Every one gets an error reply or a valid answer, never a
silence; admission never crashes; and a well-formed request right after still succeeds."""

from __future__ import annotations

import json
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER

from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode
from shared.messages import GenerateResult
from shared.subjects import GENERATE

JSON_HEADERS = {"Content-Type": "application/json"}
FIELDS = ["prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "ignore_eos", "request_id", "max_tokenz"]  # fmt: skip
# Small outputs: the valid requests among the random ones finish quickly.
ANSWER_TIMEOUT_S = 60.0

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # msgpack's range
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
# Plausible requests, so that the fuzzing also reaches the validation of each field's value.
plausible = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30)},
    optional={
        "max_tokens": st.integers(min_value=-5, max_value=4),
        "temperature": st.floats(min_value=-1, max_value=2, allow_nan=False),
        "top_p": st.floats(min_value=-0.5, max_value=1.5, allow_nan=False),
        "stream": st.booleans(),
        "stop": st.lists(st.text(max_size=5), max_size=3),
    },
)


def msgpacked(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def jsoned(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def deep(levels: int) -> bytes:
    return b"\x91" * levels + b"\xc0"  # [[[...[nil]...]]] in msgpack


payloads = st.one_of(
    st.tuples(st.binary(max_size=300), st.booleans()),
    st.tuples(bodies.map(msgpacked), st.just(False)),
    st.tuples(bodies.map(jsoned), st.just(True)),
    st.tuples(plausible.map(msgpacked), st.just(False)),
    st.tuples(plausible.map(jsoned), st.just(True)),
    st.tuples(st.binary(min_size=1, max_size=50).map(lambda b: b"\xff" + b), st.just(True)),
    st.tuples(st.integers(min_value=10, max_value=5000).map(deep), st.just(False)),
)


async def answer_of(nc: Client, data: bytes, as_json: bool) -> None:
    """One request: an error reply (with its code) or a valid answer must come back."""
    headers = JSON_HEADERS if as_json else None
    reply = await nc.request(GENERATE, data, timeout=ANSWER_TIMEOUT_S, headers=headers)
    code = (reply.headers or {}).get(ERROR_CODE_HEADER)
    if code is not None:
        assert code in {"400", "409", "413", "429"}, (code, reply.headers, data[:200])
        return
    # Accepted: the first answer is a chunk (stream) or the whole result.
    answer = decode(reply.data, "json" if as_json else "msgpack")
    assert isinstance(answer, dict) and answer.get("request_id"), answer
    if "finish_reason" in answer and "usage" in answer and "index" not in answer:
        GenerateResult.model_validate(answer)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=payloads)
async def test_random_payloads_always_get_an_answer(
    cluster: LocalCluster, nc: Client, payload: tuple[bytes, bool]
) -> None:
    data, as_json = payload
    await answer_of(nc, data, as_json)


async def test_oversized_bodies_are_refused_then_service_goes_on(
    cluster: LocalCluster, nc: Client, client: SpotserveClient
) -> None:
    for size in (1_000_001, 3_000_000, 7_000_000):
        reply = await nc.request(GENERATE, b"\x81\xa6prompt\xda" + b"x" * size, timeout=30)
        assert (reply.headers or {}).get(ERROR_CODE_HEADER) == "413"
    assert not cluster.dead_services()
    completion = await client.generate(
        "Still standing after the fuzzing", max_tokens=5, ignore_eos=True
    )
    assert len(completion.token_ids) == 5
