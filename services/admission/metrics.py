"""Admission's Prometheus metrics (served by shared.metrics; names ``spotserve_admission_…``).

Intervals are measured on admission's own clock.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.messages import ErrorCode
from shared.metrics import DURATION_BUCKETS, with_labels

# A refusal's error code -> the ``outcome`` label.
OUTCOME_OF_CODE: dict[str, str] = {
    ErrorCode.BAD_REQUEST: "bad_request",
    ErrorCode.NOT_FOUND: "not_found",
    ErrorCode.CONFLICT: "conflict",
    ErrorCode.TOO_LARGE: "too_large",
    ErrorCode.OVERLOADED: "overloaded",
    ErrorCode.INTERNAL: "internal",
    ErrorCode.UNAVAILABLE: "unavailable",
}
OUTCOMES = (
    "accepted", "bad_request", "too_large", "conflict", "overloaded", "unavailable", "internal",
)  # fmt: skip

REQUESTS = with_labels(
    Counter(
        "spotserve_admission_requests_total",
        "Generate requests answered by admission, by outcome: accepted (stored durably in the"
        " REQUESTS stream) or the reason it was refused.",
        ["outcome"],
    ),
    OUTCOMES,
)

PROMPT_TOKENS = Counter(
    "spotserve_admission_prompt_tokens_total",
    "Prompt tokens of the accepted requests.",
)
ACCEPT_SECONDS = Histogram(
    "spotserve_admission_accept_seconds",
    "Time from a generate request's arrival to its durable acceptance (JetStream's ack),"
    " admission's clock.",
    buckets=DURATION_BUCKETS,
)
QUEUED = Gauge(
    "spotserve_admission_queued_requests",
    "Accepted requests not finished yet: the scheduler's backlog read from JetStream every"
    " admission.queue_poll_s, counted up by admission in between (the overload bound).",
)
ARRIVAL_RATE = Gauge(
    "spotserve_admission_arrival_rate_requests_per_second",
    "Accepted requests per second over admission's sliding window, as last published to the"
    " planner.",
)
RESULT_LOOKUPS = with_labels(
    Counter(
        "spotserve_admission_result_lookups_total",
        "spotserve.v1.result lookups, by outcome (found, not_found, unavailable, bad_request).",
        ["outcome"],
    ),
    ("found", "not_found", "unavailable", "bad_request"),
)
CANCELS = Counter(
    "spotserve_admission_cancels_total",
    "spotserve.v1.cancel calls that recorded a cancel marker (of a request not finished yet).",
)
