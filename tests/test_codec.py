"""The wire codec (shared/codec.py): messages, tensors and malformed input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import torch
from pydantic import BaseModel

from shared.codec import (
    TENSOR_EXT_TYPE,
    DecodeError,
    content_type_header,
    decode,
    encode,
    encoding_from_headers,
    pack_tensor,
    unpack_tensor,
)
from shared.messages import (
    AcceptedRequest,
    Encoding,
    ErrorDetail,
    ErrorReply,
    GenerateRequest,
    GenerateResult,
    ReleaseCommand,
    StepCommand,
    StepResult,
    StepSequence,
    TokenChunk,
    Usage,
)

ENCODINGS: tuple[Encoding, ...] = ("msgpack", "json")
UNICODE_TEXT = 'café 中文 🙂🦀 naïve\n\t"quoted" \\ back\x00nul'

MESSAGES: list[BaseModel] = [
    GenerateRequest(prompt=UNICODE_TEXT),
    GenerateRequest(
        prompt_token_ids=[1, 42, 2**31 - 1],
        max_tokens=7,
        temperature=0.25,
        top_p=0.5,
        seed=2**63 - 1,
        stop=["\n\n", "🦀"],
        stream=True,
        ignore_eos=True,
    ),
    AcceptedRequest(
        request_id="req-1",
        prompt_token_ids=[1, 2, 3],
        max_tokens=16,
        temperature=0.0,
        top_p=1.0,
        seed=12345678901234,
        stop=["end"],
        stream=False,
        ignore_eos=False,
        reply_subject=None,
        encoding="json",
        accepted_at=1_700_000_000.123456,
    ),
    TokenChunk(request_id="req-1", index=0, token_ids=[5, 6], text=UNICODE_TEXT),
    TokenChunk(
        request_id="req-1",
        index=3,
        token_ids=[],
        text="",
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=9),
    ),
    GenerateResult(
        request_id="req-2",
        token_ids=[7, 8, 9],
        text=UNICODE_TEXT,
        finish_reason="length",
        usage=Usage(prompt_tokens=1, completion_tokens=3),
    ),
    ErrorReply(error=ErrorDetail(code="400", message="bad ✗", request_id=None)),
    StepCommand(
        sequences=[
            StepSequence(
                request_id="a",
                token_ids=[1, 2],
                temperature=0.7,
                top_p=0.9,
                seed=3,
                sample_index=0,
            ),
            StepSequence(
                request_id="b", token_ids=[9], temperature=0.0, top_p=1.0, seed=0, sample_index=4
            ),
        ],
        release=["c", "d"],
    ),
    StepResult(tokens={"a": 17, "b": 0}, compute_s=0.0123),
    ReleaseCommand(request_ids=["x", "y"]),
    Usage(prompt_tokens=0, completion_tokens=0),
]


# ---------------------------------------------------------------------------------------------
# Messages


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message: BaseModel, encoding: Encoding) -> None:
    data = encode(message, encoding)
    assert isinstance(data, bytes)
    plain = decode(data, encoding)
    assert plain == message.model_dump(mode="python")
    assert type(message).model_validate(plain) == message


def test_json_is_utf8_text_and_msgpack_is_not_json() -> None:
    chunk = TokenChunk(request_id="r", index=0, token_ids=[1], text="🦀")
    as_json = encode(chunk, "json")
    # Non-ASCII travels as UTF-8, not as \u escapes.
    assert "🦀".encode() in as_json
    assert as_json.decode("utf-8").startswith("{")
    as_msgpack = encode(chunk, "msgpack")
    assert as_msgpack != as_json
    assert msgpack.unpackb(as_msgpack, raw=False)["text"] == "🦀"


def test_plain_objects_round_trip() -> None:
    value: dict[str, Any] = {"a": [1, -2, 3.5, None, True], "b": {"c": "ü"}, "d": []}
    for encoding in ENCODINGS:
        assert decode(encode(value, encoding), encoding) == value


def test_unencodable_object_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="object"):
        encode({"x": object()})


# ---------------------------------------------------------------------------------------------
# Tensors

TENSOR_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]
TENSOR_SHAPES: list[tuple[int, ...]] = [(), (0,), (2, 0, 3), (5,), (2, 3, 4)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits (NaN payloads, infinities, subnormals, -0.0 included for floats)."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).to(torch.bool)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def bits(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_bit_exact(got: Any, expected: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == expected.dtype
    assert tuple(got.shape) == tuple(expected.shape)
    assert bits(got) == bits(expected)


@pytest.mark.parametrize("shape", TENSOR_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
def test_tensor_round_trips_bit_exactly(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = random_tensor(dtype, shape)
    assert_bit_exact(decode(encode(tensor)), tensor)
    assert_bit_exact(unpack_tensor(pack_tensor(tensor)), tensor)


def test_special_float_values_round_trip() -> None:
    values = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, 65504.0, 3.0e38]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        tensor = torch.tensor(values, dtype=dtype)
        assert_bit_exact(decode(encode(tensor)), tensor)
    # -0.0 keeps its sign bit (torch.equal alone would not see the difference).
    negative_zero = decode(encode(torch.tensor([-0.0], dtype=torch.bfloat16)))
    assert bits(negative_zero) != bits(torch.tensor([0.0], dtype=torch.bfloat16))


def test_tensors_inside_messages() -> None:
    a = random_tensor(torch.bfloat16, (2, 3, 4), seed=1)
    b = random_tensor(torch.int64, (3,), seed=2)
    body = {"kv": [a, b], "meta": {"request_id": "r", "layers": 2}}
    decoded = decode(encode(body))
    assert decoded["meta"] == body["meta"]
    assert_bit_exact(decoded["kv"][0], a)
    assert_bit_exact(decoded["kv"][1], b)


def test_non_contiguous_and_grad_tensors() -> None:
    base = random_tensor(torch.float32, (3, 5), seed=3)
    transposed = base.t()
    assert not transposed.is_contiguous()
    assert_bit_exact(decode(encode(transposed)), transposed.contiguous())
    sliced = base[:, 1::2]
    assert_bit_exact(decode(encode(sliced)), sliced.contiguous())
    with_grad = torch.ones(4, requires_grad=True)
    decoded = decode(encode(with_grad))
    assert not decoded.requires_grad
    assert torch.equal(decoded, torch.ones(4))


def _tensor_message(payload: list[Any]) -> bytes:
    return msgpack.packb(msgpack.ExtType(TENSOR_EXT_TYPE, msgpack.packb(payload)))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(["float32", [2, 2], b"\x00" * 15], id="one-byte-short"),
        pytest.param(["float32", [2, 2], b"\x00" * 17], id="one-byte-long"),
        pytest.param(["bfloat16", [3], b"\x00" * 3], id="bfloat16-odd"),
        pytest.param(["int64", [], b""], id="scalar-without-bytes"),
        pytest.param(["float16", [0], b"\x00\x00"], id="empty-with-bytes"),
        pytest.param(["uint8", [2, 3], b"\x00" * 5], id="uint8-short"),
    ],
)
def test_tensor_byte_count_mismatch_is_a_decode_error(payload: list[Any]) -> None:
    with pytest.raises(DecodeError, match="bytes"):
        unpack_tensor(msgpack.packb(payload))
    with pytest.raises(DecodeError, match="bytes"):
        decode(_tensor_message(payload))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(["not_a_dtype", [1], b"\x00"], id="unknown-dtype"),
        pytest.param(["Tensor", [1], b"\x00"], id="torch-attribute-not-a-dtype"),
        pytest.param([7, [1], b"\x00"], id="dtype-not-a-string"),
        pytest.param(["float32", [1]], id="two-fields"),
        pytest.param(["float32", 4, b"\x00" * 16], id="shape-not-a-list"),
        pytest.param("float32", id="not-a-list"),
    ],
)
def test_malformed_tensor_payload_is_a_decode_error(payload: Any) -> None:
    with pytest.raises(DecodeError):
        decode(_tensor_message(payload))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(["float32", [-2, -2], b"\x00" * 16], id="negative-dims-product-matches"),
        pytest.param(["uint8", [-1, -1], b"\x00"], id="two-inferred-dims"),
        pytest.param(["float32", [0, -3], b""], id="empty-negative-dim"),
    ],
)
def test_negative_tensor_dimensions_are_a_decode_error(payload: list[Any]) -> None:
    with pytest.raises(DecodeError):
        decode(_tensor_message(payload))


def test_unknown_ext_type_is_passed_through() -> None:
    data = msgpack.packb({"x": msgpack.ExtType(42, b"abc")})
    assert decode(data) == {"x": msgpack.ExtType(42, b"abc")}


# ---------------------------------------------------------------------------------------------
# Malformed input: always DecodeError, never another exception

DEEP = 100_000


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\xc1\xff\x00garbage", id="garbage"),
        pytest.param(encode({"prompt": "hello world", "max_tokens": 5})[:-3], id="truncated"),
        pytest.param(encode(MESSAGES[1])[:7], id="truncated-message"),
        pytest.param(encode({"a": 1}) + b"\x00", id="trailing-bytes"),
        pytest.param(b"\xa2\xff\xfe", id="invalid-utf8-str"),
        pytest.param(msgpack.packb({1: "int key"}), id="int-map-key"),
        pytest.param(b"\x91" * DEEP + b"\xc0", id="deeply-nested"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="huge-str-length"),
    ],
)
def test_malformed_msgpack_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match=r"not valid msgpack: .+"):
        decode(data, "msgpack")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"prompt": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b'{"prompt": "x"', id="truncated"),
        pytest.param(b'{"prompt": "x"} {}', id="trailing-data"),
        pytest.param(b"[" * DEEP + b"]" * DEEP, id="deeply-nested-arrays"),
        pytest.param(b'{"a":' * DEEP + b"1" + b"}" * DEEP, id="deeply-nested-objects"),
        pytest.param(b"{'single': 'quotes'}", id="not-json"),
    ],
)
def test_malformed_json_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode(data, "json")


def test_json_integer_too_long_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode(b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "json")


# ---------------------------------------------------------------------------------------------
# Headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, "msgpack"),
        ({}, "msgpack"),
        ({"Other": "x"}, "msgpack"),
        ({"Content-Type": ""}, "msgpack"),
        ({"Content-Type": "application/json"}, "json"),
        ({"Content-Type": "application/json; charset=utf-8"}, "json"),
        ({"Content-Type": "  Application/JSON ;charset=UTF-8"}, "json"),
        ({"Content-Type": "application/msgpack"}, "msgpack"),
        ({"Content-Type": "text/plain"}, "msgpack"),
        ({"Content-Type": "application/jsonl"}, "msgpack"),
    ],
)
def test_encoding_from_headers(headers: dict[str, str] | None, expected: Encoding) -> None:
    assert encoding_from_headers(headers) == expected


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_content_type_header_round_trip(encoding: Encoding) -> None:
    headers = content_type_header(encoding)
    assert set(headers) == {"Content-Type"}
    assert encoding_from_headers(headers) == encoding
