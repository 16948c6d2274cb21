"""Text <-> token ids with the ``tokenizers`` library (no transformers import: fast startup), and
streaming detokenization that never emits half a character or part of a stop string."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class TextTokenizer:
    """The tokenizer of an HF Llama-family model directory (its ``tokenizer.json``)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token_id: int | None,
        eos_token_ids: frozenset[int],
        context_length: int,
    ) -> None:
        self._tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TextTokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path))
        config = read_json_object(model_dir / "config.json")
        tokenizer_config = read_json_object(model_dir / "tokenizer_config.json")
        bos = _token_id(tokenizer, tokenizer_config.get("bos_token"))
        if bos is None and isinstance(config.get("bos_token_id"), int):
            bos = config["bos_token_id"]
        return cls(
            tokenizer,
            bos_token_id=bos,
            eos_token_ids=read_eos_token_ids(model_dir, tokenizer),
            context_length=int(config.get("max_position_embeddings", 2048)),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; the post-processor of tokenizer.json adds BOS as configured."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def read_eos_token_ids(model_dir: Path, tokenizer: Tokenizer | None = None) -> frozenset[int]:
    """EOS ids from generation_config.json and config.json (int or list), plus the
    tokenizer_config.json ``eos_token`` when a tokenizer is given to map it to an id."""
    model_dir = Path(model_dir)
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        ids.update(_as_id_list(read_json_object(model_dir / name).get("eos_token_id")))
    if tokenizer is not None:
        tokenizer_config = read_json_object(model_dir / "tokenizer_config.json")
        eos = _token_id(tokenizer, tokenizer_config.get("eos_token"))
        if eos is not None:
            ids.add(eos)
    return frozenset(ids)


def read_json_object(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    payload = json.loads(path.read_text(encoding="utf-8"))
    return payload if isinstance(payload, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _token_id(tokenizer: Tokenizer, token: Any) -> int | None:
    # tokenizer_config.json holds either the token string or an AddedToken dict.
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text pieces that are safe to emit.

    Decoding uses a sliding window (vLLM/TGI style): the text of ids[prefix:read] is subtracted
    from that of ids[prefix:], so tokenizers that strip a leading space still produce the right
    delta, and each step decodes only a few tokens. A delta ending in U+FFFD (an incomplete UTF-8
    character) is held back until the character completes. Text that could be the start of a
    stop string is held back too; once a stop string appears, the text is cut before it.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Iterable[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop or () if s)  # an empty stop string would match at once
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: decoding from here is on a character boundary
        self._read_offset = 0  # ids before this are decoded into text already
        self._pending = ""  # decoded text not emitted yet (may start a stop string)
        self._text = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    def add(self, token_ids: Iterable[int]) -> str:
        """Feed new token ids; return the new text that is safe to emit now."""
        if self.stopped:
            return ""
        for token_id in token_ids:
            self._ids.append(token_id)
            self._pending += self._decode_new(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: emit whatever is held (an incomplete character as is)."""
        if self.stopped:
            return ""
        self._pending += self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(window)
        # A shorter or equal text (special tokens skipped) or a dangling partial character:
        # wait for more tokens, unless nothing more will come.
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, final: bool) -> str:
        text, cut = self._pending, _find_stop(self._pending, self._stop)
        if cut is not None:
            self.stopped = True
            piece, self._pending = text[:cut], ""
        else:
            keep = 0 if final else _stop_prefix_length(text, self._stop)
            piece, self._pending = text[: len(text) - keep], text[len(text) - keep :]
        self._text += piece
        return piece


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string occurrence in ``text``."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
