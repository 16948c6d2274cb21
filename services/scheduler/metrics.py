"""The scheduler's Prometheus metrics (served by shared.metrics; names ``spotserve_scheduler_…``).

Clocks: the time to first token and the end-to-end time start at the request's ``accepted_at``,
admission's wall clock carried in the request, and end on the scheduler's wall clock (the two
machines' clocks are assumed synchronized, e.g. by NTP). Every other interval is measured on the
scheduler's own monotonic clock.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import DURATION_BUCKETS, REQUEST_LATENCY_BUCKETS, TOKEN_GAP_BUCKETS, with_labels

REQUESTS = with_labels(
    Counter(
        "spotserve_scheduler_requests_total",
        "Requests the scheduler ended, by outcome: the finish reason (stop, length, cancelled)"
        " or error (failed after repeated step errors, or longer than an executor's context).",
        ["outcome"],
    ),
    ("stop", "length", "cancelled", "error"),
)

RECEIVED = with_labels(
    Counter(
        "spotserve_scheduler_requests_received_total",
        "Requests taken from the REQUESTS stream, by delivery: first, or redelivered (after a"
        " scheduler restart or an ack timeout; it continues from its committed tokens).",
        ["delivery"],
    ),
    ("first", "redelivered"),
)

GENERATED_TOKENS = Counter(
    "spotserve_scheduler_generated_tokens_total",
    "Output tokens committed to the TOKENS stream and forwarded to clients (tokens regenerated"
    " after a restart from scratch are not counted again).",
)
REPLAYED_TOKENS = Counter(
    "spotserve_scheduler_replayed_tokens_total",
    "Tokens generated again after a request restarted from scratch (the reroute and restart"
    " baselines' recovery): computed, but the client already had them.",
)

TIME_TO_FIRST_TOKEN = Histogram(
    "spotserve_scheduler_time_to_first_token_seconds",
    "Time to first token: the scheduler's wall clock when it forwards a request's first chunk"
    " (committed) minus admission's wall clock at acceptance (accepted_at, carried in the"
    " request); subtracts two processes' wall clocks, assumed synchronized (a negative"
    " difference, clock skew, counts as 0).",
    buckets=REQUEST_LATENCY_BUCKETS,
)
END_TO_END = Histogram(
    "spotserve_scheduler_end_to_end_seconds",
    "End-to-end time of a finished request: the scheduler's wall clock when it forwards the"
    " final chunk minus admission's wall clock at acceptance (accepted_at, carried in the"
    " request); subtracts two processes' wall clocks, assumed synchronized (a negative"
    " difference, clock skew, counts as 0).",
    buckets=REQUEST_LATENCY_BUCKETS,
)
INTER_TOKEN = Histogram(
    "spotserve_scheduler_inter_token_seconds",
    "Gap between two consecutive chunks of a request as the scheduler forwards them, on the"
    " scheduler's monotonic clock (an iteration, or a pause such as a migration).",
    buckets=TOKEN_GAP_BUCKETS,
)
ITERATION = Histogram(
    "spotserve_scheduler_iteration_seconds",
    "Wall time one iteration adds to its executor's busy time line: from the reply of the"
    " iteration before (or, after an idle wait, from when the scheduler began planning it) to"
    " its own reply; compute, KV swaps, messaging and the scheduler's time that did not overlap"
    " the executor's compute (a step is sent while the one before runs). Monotonic clock.",
    buckets=DURATION_BUCKETS,
)
OVERHEAD = Histogram(
    "spotserve_scheduler_overhead_seconds",
    "The scheduler's own time per iteration (planning the batch and the KV moves, applying the"
    " tokens, waiting for room in the commit queue), much of it overlapping the executor's"
    " compute of the next step; monotonic clock.",
    buckets=DURATION_BUCKETS,
)
STEPS_SENT = with_labels(
    Counter(
        "spotserve_scheduler_steps_sent_total",
        "Step commands sent to executors, by when: while_running (while the executor ran the"
        " step before, so it finds the next one waiting) or after_reply (the executor was idle,"
        " or the step before had to be applied first: a KV swap, a move, a cancel).",
        ["sent"],
    ),
    ("while_running", "after_reply"),
)
BATCH_SIZE = Histogram(
    "spotserve_scheduler_batch_size",
    "Sequences in one iteration's batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

KV_SWAPS = with_labels(
    Counter(
        "spotserve_scheduler_kv_swaps_total",
        "KV caches the scheduler's memory plan moved on executors, by action: offload (device to"
        " host before a step), upload (host to device before a step), prefetch (host to device"
        " after a step), drop (freed without a copy: the host swap was full; recomputed later).",
        ["action"],
    ),
    ("offload", "upload", "prefetch", "drop"),
)

MOVES = with_labels(
    Counter(
        "spotserve_scheduler_request_moves_total",
        "Requests a plan moved off an instance, by method: kv_migration (its KV cache streamed to"
        " the new holder) or recompute (its cache rebuilt from the committed tokens elsewhere).",
        ["method"],
    ),
    ("kv_migration", "recompute"),
)

RESTARTS = Counter(
    "spotserve_scheduler_request_restarts_total",
    "Requests restarted from their prompt (the reroute and restart baselines' recovery).",
)
STEP_FAILURES = with_labels(
    Counter(
        "spotserve_scheduler_step_failures_total",
        "Failed step commands, by whether the executor was declared lost (its requests recompute"
        " elsewhere) or not (the executor frees everything and the batch recomputes).",
        ["executor_lost"],
    ),
    ("true", "false"),
)

HELD = Gauge(
    "spotserve_scheduler_requests_held",
    "Requests taken from the REQUESTS stream and not finished yet.",
)
WAITING = Gauge(
    "spotserve_scheduler_requests_waiting",
    "Held requests bound to no executor (waiting for a batch place).",
)
RUNNING = Gauge(
    "spotserve_scheduler_requests_running",
    "Held requests bound to an executor (their KV cache lives there, on the device or offloaded).",
)
MLFQ_QUEUE = Gauge(
    "spotserve_scheduler_mlfq_queue_length",
    "Requests in each queue of the skip-join MLFQ policy (queue 0 the most urgent).",
    ["queue"],
)
EXECUTORS = Gauge(
    "spotserve_scheduler_executors",
    "Executor instances the scheduler knows (found by discovery and not declared lost).",
)
PLAN_EPOCH = Gauge(
    "spotserve_scheduler_plan_epoch",
    "Epoch of the last plan the scheduler applied (0: none yet).",
)
