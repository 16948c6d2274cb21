"""The planner's Prometheus metrics (served by shared.metrics; names ``spotserve_planner_…``).

Decision times are measured on the planner's own clock.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import DURATION_BUCKETS, with_labels

# What made the planner plan again (see Planner.trigger).
TRIGGERS = ("initial", "fleet", "mode", "arrival_rate")

PLAN_EPOCH = Gauge(
    "spotserve_planner_plan_epoch",
    "Epoch of the current plan (the last one published or found in the PLANS stream; 0: none).",
)
PLANS = with_labels(
    Counter(
        "spotserve_planner_plans_total",
        "Plans this planner published, by trigger: initial (no plan yet), fleet (new fleet events:"
        " joins, preemption notices, losses), mode (the serving mode changed) or arrival_rate.",
        ["trigger"],
    ),
    TRIGGERS,
)

PLAN_FAILURES = with_labels(
    Counter(
        "spotserve_planner_plan_failures_total",
        "Planning attempts that published nothing, by reason: infeasible (no configuration fits the"
        " live instances) or publish_failed (another planner published first, or JetStream away).",
        ["reason"],
    ),
    ("infeasible", "publish_failed"),
)

DECISION_SECONDS = Histogram(
    "spotserve_planner_decision_seconds",
    "Time the policy took to make a published plan (configuration, device mapping, migration"
    " plan, just-in-time arrangement), the planner's clock.",
    buckets=DURATION_BUCKETS,
)
TRANSFER_BYTES = Counter(
    "spotserve_planner_transfer_bytes_total",
    "Bytes the transfers of the published plans list, by kind (weights, kv) and source (peer: a"
    " surviving instance; loader: the node's checkpoint tiers). Planned, not measured: an"
    " executor skips layers it already holds (the executors count what they move).",
    ["kind", "source"],
)
with_labels(TRANSFER_BYTES, ("weights", "kv"), ("peer", "loader"))

JIT_DECISIONS = with_labels(
    Counter(
        "spotserve_planner_jit_decisions_total",
        "Just-in-time decisions for the requests of dying instances in the published plans, by"
        " action: finish (in place), migrate (decode on, then move the KV cache) or recompute.",
        ["action"],
    ),
    ("finish", "migrate", "recompute"),
)

PARALLEL_DEGREE = Gauge(
    "spotserve_planner_parallel_degree",
    "The current plan's parallel configuration, by dimension: data (replicas), pipeline"
    " (stages), tensor (ranks per stage).",
    ["dimension"],
)
NEEDS_ON_DEMAND = Gauge(
    "spotserve_planner_needs_on_demand",
    "1 when the current plan cannot meet the arrival rate with the live instances (on-demand"
    " capacity is needed), else 0.",
)
