"""The loader's Prometheus metrics (served by shared.metrics; names ``spotserve_loader_…``).

Times are measured on the loader's own clock.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.messages import Tier
from shared.metrics import DURATION_BUCKETS, with_labels

TIERS: tuple[Tier, ...] = ("host-memory", "local-disk", "remote")

FETCHES = with_labels(
    Counter(
        "spotserve_loader_fetches_total",
        "Model fetches answered, by the tier the model was served from: host-memory (leased"
        " from the shared-memory pool), local-disk (already on this node's disk) or remote"
        " (pulled from the remote store first).",
        ["tier"],
    ),
    TIERS,
)
FETCH_SECONDS = with_labels(
    Histogram(
        "spotserve_loader_fetch_seconds",
        "Time to answer a model fetch, by the tier it was served from (a pull from the remote store"
        " or a read into the host pool included).",
        ["tier"],
        buckets=DURATION_BUCKETS,
    ),
    TIERS,
)

FETCH_ERRORS = with_labels(
    Counter(
        "spotserve_loader_fetch_errors_total",
        "Model fetches refused, by reason: bad_request, not_found (no such model, or a corrupt"
        " one), unavailable (the remote store did not deliver) or internal.",
        ["reason"],
    ),
    ("bad_request", "not_found", "unavailable", "internal"),
)

LOADED_TIERS = ("host-memory", "local-disk")
LOAD_SECONDS = Histogram(
    "spotserve_loader_load_seconds",
    "Time to bring a model into a tier: local-disk (pulled from the remote store, checked) or"
    " host-memory (read from disk into the shared-memory pool).",
    ["tier"],
    buckets=DURATION_BUCKETS,
)
LOADED_BYTES = with_labels(
    Counter(
        "spotserve_loader_loaded_bytes_total",
        "Bytes brought into a tier: local-disk (pulled from the remote store) or host-memory (read"
        " into the shared-memory pool).",
        ["tier"],
    ),
    LOADED_TIERS,
)
with_labels(LOAD_SECONDS, LOADED_TIERS)

HOST_LEASES = Counter(
    "spotserve_loader_host_leases_total",
    "Host-pool leases granted (an executor copies its weights from shared memory).",
)
HOST_POOL_CAPACITY = Gauge(
    "spotserve_loader_host_pool_capacity_bytes",
    "Size of the host-memory pool (0: no pool).",
)
HOST_POOL_USED = Gauge(
    "spotserve_loader_host_pool_used_bytes",
    "Bytes of the host-memory pool in chunks holding models.",
)
BANDWIDTH = Gauge(
    "spotserve_loader_bandwidth_bytes_per_second",
    "Measured read bandwidth of each tier (remote: pulls; local-disk and host-memory: probes at"
    " start), as published in the inventory for the planner.",
    ["tier"],
)
