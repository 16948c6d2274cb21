"""The monitor's Prometheus metrics (served by shared.metrics; names ``spotserve_monitor_…``),
those of its Kubernetes watch (``spotserve_monitor_kubernetes_…``) and those of the per-node
cloud agent (``spotserve_monitor_agent_…``, its own process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.messages import FleetEventKind, NoticeSource
from shared.metrics import with_labels

# The notice senders, and the monitor's own Kubernetes watch (services.monitor.kubernetes).
NOTICE_SOURCES: tuple[NoticeSource | str, ...] = (
    "aws",
    "gcp",
    "azure",
    "cli",
    "trace",
    "local",
    "kubernetes",
)
NOTICE_OUTCOMES = ("new", "updated", "duplicate", "cancelled", "rejected")
EVENT_KINDS: tuple[FleetEventKind, ...] = ("joined", "preempt-notice", "lost", "left")

PREEMPT_NOTICES = Counter(
    "spotserve_monitor_preempt_notices_total",
    "Preemption notices the monitor answered, by source (aws, gcp, azure, cli, trace, local,"
    " kubernetes: its own watch of the API server; unknown for an unreadable one) and outcome:"
    " new, updated (moves the deadline earlier), duplicate (folded into the notice already"
    " published), cancelled (an added instance that had not joined: stopped, no event) or"
    " rejected (unreadable, unknown instance, or not stored).",
    ["source", "outcome"],
)
with_labels(PREEMPT_NOTICES, NOTICE_SOURCES, NOTICE_OUTCOMES)

FLEET_EVENTS = with_labels(
    Counter(
        "spotserve_monitor_fleet_events_total",
        "Fleet events this monitor published to the FLEET stream, by kind (joined, preempt-notice,"
        " lost, left).",
        ["kind"],
    ),
    EVENT_KINDS,
)

LEASE_EXPIRATIONS = Counter(
    "spotserve_monitor_lease_expirations_total",
    "Instances whose lease ran out (no heartbeat within monitor.lease_s, the monitor's clock).",
)
INSTANCES_ADDED = Counter(
    "spotserve_monitor_instances_added_total",
    "Executor processes the local provider started (`spotserve fleet add`).",
)
LOCAL_KILLS = Counter(
    "spotserve_monitor_local_kills_total",
    "Instances the local provider killed (SIGKILL) at the deadline of their preemption notice.",
)
INSTANCES = Gauge(
    "spotserve_monitor_instances",
    "Instances the monitor tracks, by state: running, preempting (a notice was published) or"
    " pending (added by the local provider, not joined yet).",
    ["state"],
)

AGENT_NOTICES = with_labels(
    Counter(
        "spotserve_monitor_agent_notices_total",
        "Cloud notices the agent forwarded to the monitor, by outcome: accepted, unknown_instance"
        " (not registered yet: tried again), refused, or undelivered (no answer).",
        ["outcome"],
    ),
    ("accepted", "unknown_instance", "refused", "undelivered"),
)

AGENT_POLL_ERRORS = with_labels(
    Counter(
        "spotserve_monitor_agent_poll_errors_total",
        "Polls of the cloud's metadata endpoint that failed, by reason (unreachable, malformed).",
        ["reason"],
    ),
    ("unreachable", "malformed"),
)

KUBERNETES_DISRUPTIONS = Counter(
    "spotserve_monitor_kubernetes_disruptions_total",
    "Executor pods the Kubernetes watch saw going away (once each), by outcome: preemption (a"
    " spot reclaim: preempt notices for the instances) or rollout (no notice: the executor"
    " announces its own departure), and the signal's reason.",
    ["outcome", "reason"],
)
for _reason in (
    "impending-node-termination",
    "spot-itn",
    "aks-spot-eviction",
    "spot-cordon",
    "out-of-service",
    "node-deleted",
    "TerminationByKubelet",
    "DeletionByTaintManager",
    "node-shutdown",
    "other",
):
    KUBERNETES_DISRUPTIONS.labels("preemption", _reason)
for _reason in ("EvictionByEvictionAPI", "PreemptionByScheduler", "DeletionByPodGC", "deleted"):
    KUBERNETES_DISRUPTIONS.labels("rollout", _reason)
KUBERNETES_DISRUPTIONS.labels("rollout", "other")

KUBERNETES_WATCH_ERRORS = with_labels(
    Counter(
        "spotserve_monitor_kubernetes_watch_errors_total",
        "Failed lists and watches of the Kubernetes API and the events skipped, by resource"
        " (nodes, pods) and reason: unreachable, http (an error answer), malformed (an event or"
        " object skipped), gone (410: listed again).",
        ["resource", "reason"],
    ),
    ("nodes", "pods"),
    ("unreachable", "http", "malformed", "gone"),
)
