"""The scheduler's state of one request: its tokens, its text, where its KV cache lives.

Placement (the instance holding the cache, and where that instance keeps it) is written only
through the named transitions of :class:`Sequence` (``bind_to``, ``cache_on_device``,
``cache_on_host``, ``lose_cache``), so every change of it reads as one of those events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nats.aio.msg import Msg

from shared.codec import encode
from shared.messages import (
    AcceptedRequest,
    FinishReason,
    GenerateResult,
    InflightSequence,
    StepSequence,
    TokenChunk,
    Usage,
)
from shared.model.tokenizer import IncrementalDetokenizer, TextTokenizer

KvLocation = Literal["none", "device", "host"]


@dataclass(eq=False)
class Sequence:
    request: AcceptedRequest
    message: Msg
    detokenizer: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    # How many of its tokens the cache of its executor holds.
    cached_tokens: int = 0
    next_chunk_index: int = 0
    finish_reason: FinishReason | None = None
    # Steps of it that failed since its last token: a request that progresses between
    # failures (each reconfiguration of the restart baseline costs one) is not stuck.
    failed_steps: int = 0
    # Tokens the client already has that a restart from scratch generates again (baselines).
    replay: list[int] = field(default_factory=list)
    restarts: int = 0
    # When the scheduler last forwarded a chunk of it (its monotonic clock; metrics).
    forwarded_at: float | None = None
    # The client asked to stop it: it ends at its executor's next iteration boundary.
    cancel_requested: bool = False
    # Its committed chunks (msgpack) that no run on its own subject holds yet (tokens.py).
    unrun: list[bytes] = field(default_factory=list)
    # Steps it is in that its executor has not answered yet (0 or 1): the next step is sent
    # while the current one runs, and its token then comes from the executor.
    pending: int = 0
    # Instance whose KV cache holds this sequence (read: ``executor``).
    _executor: str | None = field(default=None, init=False, repr=False)
    # Where that executor keeps the cache: on the device (ready to run) or offloaded to host.
    _kv_location: KvLocation = field(default="none", init=False, repr=False)

    @classmethod
    def create(
        cls,
        request: AcceptedRequest,
        message: Msg,
        tokenizer: TextTokenizer,
        committed: list[TokenChunk],
        in_runs: int = 0,
    ) -> Sequence:
        """A new sequence, or one resumed from the chunks an earlier scheduler committed (the
        first ``in_runs`` of them in runs on its own subject: the next run holds the others)."""
        sequence = cls(request, message, IncrementalDetokenizer(tokenizer, request.stop))
        sequence.unrun = [encode(chunk) for chunk in committed[in_runs:]]
        for chunk in committed:
            sequence.generated.extend(chunk.token_ids)
            # Re-feeding the committed tokens rebuilds the same held-back text state.
            sequence.detokenizer.add(chunk.token_ids)
            sequence.next_chunk_index = chunk.index + 1
            sequence.finish_reason = chunk.finish_reason
        if sequence.finished and not sequence.detokenizer.stopped:
            # The final chunk carried the flushed text too; rebuild it the same way.
            sequence.detokenizer.flush()
        return sequence

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def executor(self) -> str | None:
        """The instance whose KV cache holds it (None: unbound, any instance may run it)."""
        return self._executor

    @property
    def kv_location(self) -> KvLocation:
        return self._kv_location

    # ---- placement transitions (the only writers of executor and kv_location) ----

    def bind_to(self, instance_id: str) -> None:
        """It runs on ``instance_id`` from its next iteration: a policy batched it there, or its
        cache was carried there. Where that instance keeps the cache is set separately."""
        self._executor = instance_id

    def cache_on_device(self) -> None:
        """Its executor holds the cache on the device (computed there, or uploaded)."""
        self._kv_location = "device"

    def cache_on_host(self) -> None:
        """Its executor holds the cache in host memory (offloaded, or adopted from a peer)."""
        self._kv_location = "host"

    @property
    def known_tokens(self) -> int:
        """Prompt and generated tokens the scheduler has."""
        return len(self.request.prompt_token_ids) + len(self.generated)

    @property
    def most_positions(self) -> int:
        """Positions its cache reaches if it runs to max_tokens."""
        return len(self.request.prompt_token_ids) + self.request.max_tokens

    @property
    def cached_after_pending(self) -> int:
        """Positions its executor's cache holds once the steps it is in have run."""
        return self.known_tokens if self.pending else self.cached_tokens

    @property
    def can_continue(self) -> bool:
        """Whether it may go into the next step while its current one runs: the executor feeds
        the token it samples now. Not when that token ends it by length, nor while a restarted
        sequence regenerates tokens the client has (those are fed as committed, not sampled),
        nor when its cache went to host memory. (A cache the running step builds, a prefill,
        is on the device once that step is done.)"""
        return (
            self.pending > 0
            and self.kv_location != "host"
            and len(self.generated) + self.pending < self.request.max_tokens
            and len(self.generated) >= len(self.replay)
        )

    def step_input(self) -> StepSequence:
        """What the executor must feed: everything not yet in its cache (prompt on a prefill,
        prompt + committed tokens on a recompute, the last sampled token on a decode; the token
        the executor samples in the step it runs now, when this one is sent before that ends)."""
        return StepSequence(
            request_id=self.request_id,
            token_ids=[] if self.pending else self._uncached_tokens(),
            temperature=self.request.temperature,
            top_p=self.request.top_p,
            seed=self.request.seed,
            sample_index=len(self.generated) + self.pending,
            cached_tokens=self.cached_after_pending,
            continues=self.pending > 0,
        )

    def _uncached_tokens(self) -> list[int]:
        """Prompt and generated tokens from ``cached_tokens`` on (without copying the whole
        sequence on every decode step)."""
        prompt = self.request.prompt_token_ids
        if self.cached_tokens >= len(prompt):
            return self.generated[self.cached_tokens - len(prompt) :]
        return prompt[self.cached_tokens :] + self.generated

    def inflight(self) -> InflightSequence:
        """Where it runs, for the planner's just-in-time arrangement."""
        return InflightSequence(
            request_id=self.request_id,
            instance_id=self.executor,
            context_tokens=self.cached_tokens,
            generated_tokens=len(self.generated),
            max_tokens=self.request.max_tokens,
        )

    def lose_cache(self) -> None:
        """Its executor is gone or failed: the next step recomputes the prefill elsewhere."""
        self._executor = None
        self.cached_tokens = 0
        self.pending = 0
        self._kv_location = "none"

    def restart_from_scratch(self) -> None:
        """The baselines' recovery (reroute, restart): the cache is gone and every generated
        token is generated again from the prompt. The client has them already: they are not
        committed or sent twice (see ``append``), and the stream goes on where it stopped."""
        if len(self.generated) > len(self.replay):
            self.replay = list(self.generated)
        self.generated = []
        self.restarts += 1
        self.lose_cache()

    def append(self, token_id: int, eos_token_ids: frozenset[int]) -> TokenChunk | None:
        """Take one sampled token; returns the chunk to commit and forward (None while a
        restarted sequence regenerates what the client has)."""
        self.cached_tokens = len(self.request.prompt_token_ids) + len(self.generated)
        self.cache_on_device()
        self.failed_steps = 0
        if len(self.generated) < len(self.replay):
            # The committed token stands (greedy and seeded sampling draw it again; the cache
            # is built on it either way).
            self.generated.append(self.replay[len(self.generated)])
            return None
        if token_id in eos_token_ids and not self.request.ignore_eos:
            # The EOS itself is not part of the output (neither token_ids nor text).
            return self._chunk([], self.detokenizer.flush(), "stop")
        self.generated.append(token_id)
        text = self.detokenizer.add([token_id])
        if self.detokenizer.stopped:
            return self._chunk([token_id], text, "stop")
        if len(self.generated) >= self.request.max_tokens:
            return self._chunk([token_id], text + self.detokenizer.flush(), "length")
        return self._chunk([token_id], text, None)

    def cancel(self) -> TokenChunk:
        """Its last chunk, as the client asked it to stop: no new tokens, the text the
        detokenizer still held back. A restarted sequence still regenerating what the client
        has counts those tokens (the client has them)."""
        if len(self.replay) > len(self.generated):
            self.generated = list(self.replay)
        return self._chunk([], self.detokenizer.flush(), "cancelled")

    def _chunk(self, token_ids: list[int], text: str, finish: FinishReason | None) -> TokenChunk:
        self.finish_reason = finish
        chunk = TokenChunk(
            request_id=self.request_id,
            index=self.next_chunk_index,
            token_ids=token_ids,
            text=text,
            finish_reason=finish,
            usage=self.usage() if finish else None,
        )
        self.next_chunk_index += 1
        return chunk

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=len(self.generated),
        )

    def result(self) -> GenerateResult:
        assert self.finish_reason is not None
        return GenerateResult(
            request_id=self.request_id,
            token_ids=list(self.generated),
            text=self.detokenizer.text,
            finish_reason=self.finish_reason,
            usage=self.usage(),
        )
