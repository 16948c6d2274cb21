"""The gateway's Prometheus metrics: HTTP requests, and the latency a user sees, measured on
the gateway's own monotonic clock (from publishing a choice's request to its chunks)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from shared.messages import TokenChunk
from shared.metrics import REQUEST_LATENCY_BUCKETS, TOKEN_GAP_BUCKETS

HTTP_REQUESTS = Counter(
    "spotserve_gateway_http_requests_total",
    "HTTP requests answered, by route and status code",
    ["route", "status"],
)
REQUESTS_IN_FLIGHT = Gauge(
    "spotserve_gateway_requests_in_flight",
    "Generation requests (HTTP) the gateway is serving now (bounded by max_concurrent_requests)",
)
CHOICES_IN_FLIGHT = Gauge(
    "spotserve_gateway_choices_in_flight",
    "Choices (one spotserve request each) the gateway is streaming now",
)
CHOICES = Counter(
    "spotserve_gateway_choices_total",
    "Choices that ran to their end, by finish reason",
    ["finish_reason"],
)
CANCELS = Counter(
    "spotserve_gateway_cancels_total",
    "Choices cancelled because their HTTP client went away (or a gateway wait gave up), by what"
    " spotserve answered: cancelling, or finished (it had ended meanwhile).",
    ["state"],
)
PROMPT_TOKENS = Counter(
    "spotserve_gateway_prompt_tokens_total", "Prompt tokens of finished choices"
)
GENERATED_TOKENS = Counter(
    "spotserve_gateway_generated_tokens_total", "Tokens generated for finished choices"
)
TTFT = Histogram(
    "spotserve_gateway_time_to_first_token_seconds",
    "From publishing a choice's request to its first token (gateway clock)",
    buckets=REQUEST_LATENCY_BUCKETS,
)
INTER_TOKEN = Histogram(
    "spotserve_gateway_inter_token_seconds",
    "Between two chunks of tokens of one choice (gateway clock)",
    buckets=TOKEN_GAP_BUCKETS,
)
END_TO_END = Histogram(
    "spotserve_gateway_end_to_end_seconds",
    "From publishing a choice's request to its last chunk (gateway clock)",
    buckets=REQUEST_LATENCY_BUCKETS,
)


class ChoiceTiming:
    """Observes one choice's latencies as its chunks arrive."""

    def __init__(self) -> None:
        self.sent_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_chunk_at: float | None = None
        self.last: TokenChunk | None = None

    def chunk(self, chunk: TokenChunk) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                TTFT.observe(now - self.sent_at)
            elif self.last_chunk_at is not None:
                INTER_TOKEN.observe(now - self.last_chunk_at)
            self.last_chunk_at = now
        self.last = chunk

    def finish(self) -> None:
        END_TO_END.observe(time.monotonic() - self.sent_at)
        if self.last is not None and self.last.finish_reason is not None:
            CHOICES.labels(self.last.finish_reason).inc()
            if self.last.usage is not None:
                PROMPT_TOKENS.inc(self.last.usage.prompt_tokens)
                GENERATED_TOKENS.inc(self.last.usage.completion_tokens)
