"""An executor's Prometheus metrics (served by shared.metrics; names ``spotserve_executor_…``).

Every interval is measured on the executor's own monotonic clock. Labels are low-cardinality
(never a request or instance id: each executor process serves its own metrics).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import DURATION_BUCKETS, with_labels

STEPS = with_labels(
    Counter(
        "spotserve_executor_steps_total",
        "Step commands this executor answered, by outcome: ok, refused (the engine refused the"
        " batch, e.g. a KV cache it does not hold) or error.",
        ["outcome"],
    ),
    ("ok", "refused", "error"),
)

STEP_SECONDS = Histogram(
    "spotserve_executor_step_seconds",
    "Time to answer one step command: its KV commands and the forward pass (of every pipeline"
    " stage, when this instance heads a pipeline).",
    buckets=DURATION_BUCKETS,
)
SAMPLED_TOKENS = Counter(
    "spotserve_executor_sampled_tokens_total",
    "Tokens sampled in the step replies of this executor (a pipeline's tokens are counted by"
    " the instance heading it).",
)

KV_BLOCKS = Gauge(
    "spotserve_executor_kv_blocks",
    "KV cache blocks on the device (executor.kv_block_size positions each).",
)
KV_BLOCKS_USED = Gauge(
    "spotserve_executor_kv_blocks_used",
    "KV cache blocks on the device holding a sequence's positions.",
)
KV_HOST_SLOTS = Gauge(
    "spotserve_executor_kv_host_slots",
    "Offloaded KV caches host memory can hold (the FastServe swap).",
)
KV_OFFLOADED = Gauge(
    "spotserve_executor_kv_offloaded_sequences",
    "KV caches offloaded to host memory now.",
)
KV_SWAPS = with_labels(
    Counter(
        "spotserve_executor_kv_swaps_total",
        "KV caches moved between the device and host memory, by direction: offload (device to"
        " host) or upload (host to device, before a step or prefetched after one).",
        ["direction"],
    ),
    ("offload", "upload"),
)

TRANSFER_KINDS = ("kv", "weights", "activations")
DIRECTIONS = ("sent", "received")
TRANSFERS = Counter(
    "spotserve_executor_transfers_total",
    "Peer-to-peer tensor transfers completed, by kind (kv: a request's KV cache migrating;"
    " weights: layers for a new role; activations: a pipeline stage's hidden states too large"
    " for one message) and direction (sent, received).",
    ["kind", "direction"],
)
TRANSFER_BYTES = Counter(
    "spotserve_executor_transfer_bytes_total",
    "Bytes of the completed peer-to-peer tensor transfers, by kind and direction.",
    ["kind", "direction"],
)
TRANSFER_FAILURES = Counter(
    "spotserve_executor_transfer_failures_total",
    "Peer-to-peer tensor transfers that failed, by kind and direction.",
    ["kind", "direction"],
)
for _metric in (TRANSFERS, TRANSFER_BYTES, TRANSFER_FAILURES):
    with_labels(_metric, TRANSFER_KINDS, DIRECTIONS)

MODEL_LOAD_SECONDS = Histogram(
    "spotserve_executor_model_load_seconds",
    "Time to build this instance's engine, by phase (start: the first load, warm-up included;"
    " role: a new role from a plan, gathering the tensors included) and source of the weights"
    " (disk: the node's disk copy; host-pool: the loader's shared-memory pool; peer: layers"
    " streamed from peers plus those held here; local: only layers already held here).",
    ["phase", "source"],
    buckets=DURATION_BUCKETS,
)

TERMINATIONS = Counter(
    "spotserve_executor_terminations_total",
    "SIGTERMs taken as a preemption notice (executor.termination_grace_s set): the executor"
    " announced its own preemption and drained until the grace period's end.",
)


def observe_engine_memory(
    kv_blocks: int, host_slots: int, free_blocks: Callable[[], int], offloaded: Callable[[], int]
) -> None:
    """The KV cache gauges: the configured sizes, and what is in use read when scraped (from the
    metrics server's thread: single reads of the engine's bookkeeping; a read that fails while
    the engine is being replaced reports NaN instead of failing the scrape)."""
    KV_BLOCKS.set(kv_blocks)
    KV_HOST_SLOTS.set(host_slots)
    KV_BLOCKS_USED.set_function(_or_nan(lambda: kv_blocks - free_blocks()))
    KV_OFFLOADED.set_function(_or_nan(offloaded))


def _or_nan(read: Callable[[], float]) -> Callable[[], float]:
    def guarded() -> float:
        try:
            return float(read())
        except Exception:
            return math.nan

    return guarded


def observe_step(compute_s: float, tokens: int) -> None:
    """A step answered: its time and the tokens it sampled."""
    STEPS.labels("ok").inc()
    STEP_SECONDS.observe(compute_s)
    SAMPLED_TOKENS.inc(tokens)


def observe_transfer(kind: str, direction: str, nbytes: int) -> None:
    TRANSFERS.labels(kind, direction).inc()
    TRANSFER_BYTES.labels(kind, direction).inc(nbytes)


def transfer_failed(kind: str, direction: str) -> None:
    TRANSFER_FAILURES.labels(kind, direction).inc()
