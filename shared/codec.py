"""The wire codec: msgpack by default, JSON on request, tensors as msgpack ext type.

A tensor travels as ``(dtype, shape, raw bytes)`` (ext type 1) and is rebuilt with
``torch.frombuffer`` without another copy. torch is imported lazily so that services which
never see a tensor (admission) start fast.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any

import msgpack
from pydantic import BaseModel

from shared.messages import Encoding

if TYPE_CHECKING:
    import torch

TENSOR_EXT_TYPE = 1
JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = "application/msgpack"


class DecodeError(ValueError):
    """The bytes are not a valid message in the given encoding."""


def encoding_from_headers(headers: dict[str, str] | None) -> Encoding:
    content_type = (headers or {}).get("Content-Type", "")
    return "json" if content_type.split(";")[0].strip().lower() == JSON_CONTENT_TYPE else "msgpack"


def content_type_header(encoding: Encoding) -> dict[str, str]:
    return {"Content-Type": JSON_CONTENT_TYPE if encoding == "json" else MSGPACK_CONTENT_TYPE}


def _to_plain(obj: Any) -> Any:
    return obj.model_dump(mode="python", exclude_none=False) if isinstance(obj, BaseModel) else obj


def encode(obj: Any, encoding: Encoding = "msgpack") -> bytes:
    plain = _to_plain(obj)
    if encoding == "json":
        return json.dumps(plain, ensure_ascii=False, separators=(",", ":")).encode()
    packed: bytes = msgpack.packb(plain, default=_pack_ext, use_bin_type=True)
    return packed


def decode(data: bytes, encoding: Encoding = "msgpack") -> Any:
    """Decode bytes; raise :class:`DecodeError` with a readable reason on malformed input."""
    if encoding == "json":
        try:
            return json.loads(data.decode("utf-8"))
        # ValueError covers integers longer than Python's int-parsing limit.
        except (ValueError, RecursionError) as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from None
    try:
        return msgpack.unpackb(
            data, raw=False, ext_hook=_unpack_ext, strict_map_key=True, use_list=True
        )
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException) as exc:
        # Some msgpack errors have no message; the class name still says what went wrong.
        reason = str(exc).strip() or type(exc).__name__
        raise DecodeError(f"body is not valid msgpack: {reason}") from None


def _pack_ext(obj: Any) -> msgpack.ExtType:
    torch_module = _torch_if_tensor(obj)
    if torch_module is None:
        raise TypeError(f"cannot encode object of type {type(obj).__name__}")
    return msgpack.ExtType(TENSOR_EXT_TYPE, pack_tensor(obj))


def _torch_if_tensor(obj: Any) -> Any:
    module = type(obj).__module__
    if not module.startswith("torch"):
        return None
    import torch

    return torch if isinstance(obj, torch.Tensor) else None


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == TENSOR_EXT_TYPE:
        return unpack_tensor(data)
    return msgpack.ExtType(code, data)


def pack_tensor(tensor: torch.Tensor) -> bytes:
    """Serialise a tensor as msgpack ``[dtype, shape, bytes]`` (one copy to host if needed)."""
    import torch

    host = tensor.detach().contiguous().cpu()
    # Viewing as bytes first also covers dtypes numpy lacks (bfloat16).
    raw = host.view(-1).view(torch.uint8).numpy().tobytes() if host.numel() else b""
    packed: bytes = msgpack.packb([str(host.dtype).removeprefix("torch."), list(host.shape), raw])
    return packed


def unpack_tensor(data: bytes) -> torch.Tensor:
    import torch

    try:
        dtype_name, shape, raw = msgpack.unpackb(data, raw=False)
        dtype = getattr(torch, dtype_name)
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"malformed tensor payload: {exc}") from None
    if not isinstance(dtype, torch.dtype):
        raise DecodeError(f"unknown tensor dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise DecodeError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(raw, bytes):
        raise DecodeError("tensor data must be bytes")
    expected = dtype.itemsize
    for dim in shape:
        expected *= dim
    if expected != len(raw):
        raise DecodeError(f"tensor payload has {len(raw)} bytes, shape {shape} needs {expected}")
    if not raw:
        return torch.empty(shape, dtype=dtype)
    # No copy: the tensor shares the received bytes, so treat it as read-only (move or clone it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
        flat = torch.frombuffer(raw, dtype=torch.uint8)
    return flat.view(dtype).view(shape)
