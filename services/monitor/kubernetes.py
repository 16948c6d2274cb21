"""Preemption notices from the Kubernetes API (``monitor.kubernetes``).

The monitor lists and then watches the cluster's nodes (``GET /api/v1/nodes``, then
``?watch=1&resourceVersion=RV&allowWatchBookmarks=true``) and the executor pods of its
namespace (``monitor.kubernetes_executor_selector``, ``app.kubernetes.io/component=executor``
by default). An executor's instance id is its pod's name (the Helm chart sets
``SPOTSERVE_EXECUTOR__INSTANCE_ID`` from ``metadata.name``) and a node's pods are those whose
``spec.nodeName`` names it. A watch is the API server's chunked response of newline-delimited
``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": …}``: an ``ERROR`` whose Status has
code 410 (the resourceVersion is too old) makes the watcher list again, a watch the server ends
(after ``timeoutSeconds``) or a dropped connection is resumed from the last resourceVersion seen
(bookmarks included), with backoff after failures. A malformed event is logged, counted and
skipped; nothing the API server says stops the monitor.

Every change of an executor pod, or of the node it runs on, is classified (:func:`pod_signals`,
a pure function of the objects) and decided (:func:`decide`):

Signal -> outcome (grace when the object gives no deadline):

- node taint ``cloud.google.com/impending-node-termination`` (GKE) -> preemption, 30 s
- node taint ``aws-node-termination-handler/spot-itn`` (AWS NTH) -> preemption, 120 s
- node taint ``remediator.kubernetes.azure.com/unschedulable`` (older AKS:
  ``remediator.aks.microsoft.com/unschedulable``) on a spot node -> preemption, 30 s
- cordon (``spec.unschedulable`` or taint ``node.kubernetes.io/unschedulable``) of a spot node
  -> preemption, the cloud's grace (120 s AWS, 30 s GCP and Azure, else ``monitor.grace_s``)
- taint ``node.kubernetes.io/out-of-service`` on a spot node -> preemption, 0 (already down)
- a spot node deleted -> preemption, 0 (already gone)
- pod condition ``DisruptionTarget`` reason ``TerminationByKubelet`` -> preemption, 15 s
- pod condition ``DisruptionTarget`` reason ``DeletionByTaintManager`` -> preemption, the pod's
  ``terminationGracePeriodSeconds`` (30 s when unset)
- pod ``status.reason`` Terminated/Shutdown with the node-shutdown message (clusters without
  disruption conditions) -> preemption, 0 (already stopped)
- NTH taints ``rebalance-recommendation``, ``asg-lifecycle-termination``,
  ``scheduled-maintenance`` -> nothing (no notice, not counted), the cordon NTH adds with them
  included
- pod condition ``DisruptionTarget`` reason ``EvictionByEvictionAPI`` (a drain),
  ``PreemptionByScheduler``, ``DeletionByPodGC`` or another -> rollout
- pod deleted or terminating without any signal above (ReplicaSet scale-down, ``kubectl
  delete``, a drain of an on-demand node) -> rollout

A spot node carries ``cloud.google.com/gke-spot=true`` or ``cloud.google.com/gke-preemptible=
true`` (GKE), ``eks.amazonaws.com/capacityType=SPOT`` (EKS), ``kubernetes.azure.com/
scalesetpriority=spot`` (AKS) or ``karpenter.sh/capacity-type=spot`` (Karpenter: the cloud is
read from ``spec.providerID``). A node's signal applies to every executor pod on it. When a pod
is already terminating, its ``deletionTimestamp`` (deletion time + ``deletionGracePeriodSeconds``)
is its deadline in place of the per-signal defaults; otherwise a signal's grace runs from the
time the object gives (a taint's ``timeAdded``, a condition's ``lastTransitionTime``) or from
when the monitor first saw it. The earliest deadline of all the pod's signals wins (a node that
goes before the pod's deletionTimestamp takes the pod with it).

Sources, briefly: GKE Spot/preemptible VMs get a 30 s termination notice and graceful node
shutdown gives non-system pods 15 s (cloud.google.com/kubernetes-engine/docs/concepts/spot-vms);
GKE's taint key is the one its termination/maintenance handlers set (also on GPU VMs before host
maintenance, which is why it counts on any node). The AWS Node Termination Handler taints
``aws-node-termination-handler/{spot-itn, scheduled-maintenance, asg-lifecycle-termination,
rebalance-recommendation}`` (its TAINT_NODE option); only ``spot-itn`` is the 2-minute spot
interruption. A rebalance recommendation only says the risk is higher (the instance may run for
hours), and an ASG lifecycle termination or scheduled maintenance ends the instance on the
group's or EC2's own schedule, through a drain: the executor's SIGTERM handler announces itself.
AKS has no spot taint of its own: on a Scheduled Events ``Preempt`` for a spot VM, AKS node
auto-drain cordons and drains the node and taints it ``remediator.kubernetes.azure.com/
unschedulable`` (learn.microsoft.com/azure/aks/node-auto-drain); a spot VM evicted without that
goes NotReady and its node object is deleted, which the lease (``lost``) or the node deletion
covers. Pod disruption conditions (kubernetes.io/docs/concepts/workloads/pods/disruptions):
``TerminationByKubelet`` (graceful node shutdown, and also node-pressure eviction, which is
just as involuntary), ``DeletionByTaintManager`` (a NoExecute taint), ``EvictionByEvictionAPI``
(a drain), ``PreemptionByScheduler``, ``DeletionByPodGC``; graceful node shutdown leaves
``status.reason`` "Terminated" and "Pod was terminated in response to imminent node shutdown."
A cordon of a spot node is taken as the reclaim's first step (NTH, AKS and most drains cordon
first); an operator who cordons a spot node for maintenance gets a notice too.

A preemption applies a :class:`PreemptNotice` for each registered executor instance through the
monitor's own notice path (``Notices.apply``: repeats fold, an earlier deadline updates), with
source ``kubernetes:<reason>``; an executor that registers later on a node already marked is
noticed at the next check. A rollout publishes nothing (the executor announces its departure
itself); it is logged (``kubernetes.rollout``) and counted. Clocks: deadlines the API server
gives are its clock's; they are used as they are (keep the nodes' clocks in sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import ValidationError

from services.monitor import metrics
from shared.config import ConfigurationError, MonitorSettings
from shared.messages import FleetEvent, PreemptNotice
from shared.rpc import NotFound, RpcError
from shared.waiting import backoff_delays, cancel_and_wait, supervised

Outcome = Literal["preemption", "rollout"]
Cloud = Literal["aws", "gcp", "azure"]
JsonObject = dict[str, Any]

# -- the signals ---------------------------------------------------------------------------------

GKE_TERMINATION_TAINT = "cloud.google.com/impending-node-termination"
NTH_SPOT_ITN_TAINT = "aws-node-termination-handler/spot-itn"
# Not preemptions (see the module docstring): no notice.
NTH_OTHER_TAINTS = (
    "aws-node-termination-handler/rebalance-recommendation",
    "aws-node-termination-handler/asg-lifecycle-termination",
    "aws-node-termination-handler/scheduled-maintenance",
)
AKS_REMEDIATOR_TAINTS = (
    "remediator.kubernetes.azure.com/unschedulable",
    "remediator.aks.microsoft.com/unschedulable",  # the key of older AKS releases
)
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"

# Label -> (value that marks a spot node, its cloud; None: read it from spec.providerID).
SPOT_LABELS: dict[str, tuple[str, Cloud | None]] = {
    "cloud.google.com/gke-spot": ("true", "gcp"),
    "cloud.google.com/gke-preemptible": ("true", "gcp"),
    "eks.amazonaws.com/capacityType": ("spot", "aws"),
    "kubernetes.azure.com/scalesetpriority": ("spot", "azure"),
    "karpenter.sh/capacity-type": ("spot", None),
}
PROVIDER_ID_PREFIXES: dict[str, Cloud] = {"aws://": "aws", "gce://": "gcp", "azure://": "azure"}
# How long a spot VM lives after its cloud's notice: EC2's 2-minute interruption notice, GCE's
# 30 s preemption notice, Azure's Preempt scheduled event (at least 30 s).
CLOUD_GRACE_S: dict[Cloud, float] = {"aws": 120.0, "gcp": 30.0, "azure": 30.0}
# Graceful node shutdown: GKE gives non-system pods 15 s (the pod's share of the VM's 30 s).
KUBELET_SHUTDOWN_GRACE_S = 15.0
# A pod's terminationGracePeriodSeconds when it gives none (Kubernetes' default).
DEFAULT_TERMINATION_GRACE_S = 30.0

DISRUPTION_TARGET = "DisruptionTarget"
TERMINATION_BY_KUBELET = "TerminationByKubelet"
DELETION_BY_TAINT_MANAGER = "DeletionByTaintManager"
NODE_SHUTDOWN_REASONS = ("Terminated", "Shutdown")
NODE_SHUTDOWN_MESSAGE = "node shutdown"

# The reasons the metrics know (label values); another DisruptionTarget reason counts as other.
PREEMPTION_REASONS = (
    "impending-node-termination",
    "spot-itn",
    "aks-spot-eviction",
    "spot-cordon",
    "out-of-service",
    "node-deleted",
    TERMINATION_BY_KUBELET,
    DELETION_BY_TAINT_MANAGER,
    "node-shutdown",
)
ROLLOUT_REASONS = (
    "EvictionByEvictionAPI",
    "PreemptionByScheduler",
    "DeletionByPodGC",
    "deleted",
    "other",
)
MAX_GRACE_S = 3600.0  # PreemptNotice.grace_s's bound


@dataclass(frozen=True)
class Signal:
    """One reason an executor pod is going away. Its deadline is ``since + grace_s``; ``since``
    None: from when the monitor first saw the signal."""

    outcome: Outcome
    reason: str
    grace_s: float = 0.0
    since: float | None = None
    cloud: Cloud | None = None

    def deadline(self, seen_at: float) -> float:
        return (self.since if self.since is not None else seen_at) + self.grace_s


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str
    deadline: float | None = None  # a preemption's


def _dict(value: Any) -> JsonObject:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_time(value: Any) -> float | None:
    """Unix seconds of an RFC 3339 time (Kubernetes' Time and MicroTime); None if not one."""
    text = _str(value)
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def name_of(obj: Mapping[str, Any]) -> str | None:
    return _str(_dict(obj.get("metadata")).get("name")) or None


def spot_cloud(node: Mapping[str, Any]) -> tuple[bool, Cloud | None]:
    """(is this a spot node, its cloud if known)."""
    labels = _dict(_dict(node.get("metadata")).get("labels"))
    provider_id = _str(_dict(node.get("spec")).get("providerID")) or ""
    from_id = next(
        (cloud for prefix, cloud in PROVIDER_ID_PREFIXES.items() if provider_id.startswith(prefix)),
        None,
    )
    for label, (value, cloud) in SPOT_LABELS.items():
        found = _str(labels.get(label))
        if found is not None and found.lower() == value:
            return True, cloud or from_id
    return False, from_id


def _taints(node: Mapping[str, Any]) -> dict[str, JsonObject]:
    taints: dict[str, JsonObject] = {}
    for taint in _list(_dict(node.get("spec")).get("taints")):
        key = _str(_dict(taint).get("key"))
        if key:
            taints[key] = taint
    return taints


def node_signals(
    node: Mapping[str, Any], default_grace_s: float = 30.0, deleted: bool = False
) -> list[Signal]:
    """The preemption signals of a node (``deleted``: its object was just deleted)."""
    taints = _taints(node)
    spot, cloud = spot_cloud(node)
    cloud_grace_s = CLOUD_GRACE_S[cloud] if cloud is not None else default_grace_s

    def since(key: str) -> float | None:
        return parse_time(taints[key].get("timeAdded"))

    signals: list[Signal] = []
    if GKE_TERMINATION_TAINT in taints:
        grace_s = CLOUD_GRACE_S["gcp"]
        since_at = since(GKE_TERMINATION_TAINT)
        signals.append(Signal("preemption", "impending-node-termination", grace_s, since_at, "gcp"))
    if NTH_SPOT_ITN_TAINT in taints:
        since_at = since(NTH_SPOT_ITN_TAINT)
        signals.append(Signal("preemption", "spot-itn", CLOUD_GRACE_S["aws"], since_at, "aws"))
    if not spot:
        return signals
    for key in AKS_REMEDIATOR_TAINTS:
        if key in taints:
            grace_s = CLOUD_GRACE_S["azure"]
            signals.append(Signal("preemption", "aks-spot-eviction", grace_s, since(key), "azure"))
            break
    cordoned = _dict(node.get("spec")).get("unschedulable") is True or UNSCHEDULABLE_TAINT in taints
    # NTH cordons for a rebalance recommendation, an ASG termination or maintenance too: then
    # the cordon is theirs, not a reclaim's.
    if cordoned and not any(key in taints for key in NTH_OTHER_TAINTS):
        since_at = since(UNSCHEDULABLE_TAINT) if UNSCHEDULABLE_TAINT in taints else None
        signals.append(Signal("preemption", "spot-cordon", cloud_grace_s, since_at, cloud))
    if OUT_OF_SERVICE_TAINT in taints:
        signals.append(Signal("preemption", "out-of-service", 0.0, since(OUT_OF_SERVICE_TAINT)))
    if deleted:
        signals.append(Signal("preemption", "node-deleted", 0.0, None, cloud))
    return signals


def pod_signals(
    pod: Mapping[str, Any],
    node: Mapping[str, Any] | None,
    default_grace_s: float = 30.0,
    pod_deleted: bool = False,
    node_deleted: bool = False,
) -> list[Signal]:
    """Every signal about an executor pod: its node's preemption signals and its own
    (preemptions, and a rollout when it is terminating for another reason)."""
    metadata = _dict(pod.get("metadata"))
    status = _dict(pod.get("status"))
    from_node = node_signals(node, default_grace_s, node_deleted) if node is not None else []
    own: list[Signal] = []
    rollouts: list[Signal] = []
    termination_grace_s = _number(_dict(pod.get("spec")).get("terminationGracePeriodSeconds"))
    if termination_grace_s is None:
        termination_grace_s = DEFAULT_TERMINATION_GRACE_S
    for condition in _list(status.get("conditions")):
        condition = _dict(condition)
        if condition.get("type") != DISRUPTION_TARGET or condition.get("status") != "True":
            continue
        reason = _str(condition.get("reason")) or "other"
        since_at = parse_time(condition.get("lastTransitionTime"))
        if reason == TERMINATION_BY_KUBELET:
            own.append(Signal("preemption", reason, KUBELET_SHUTDOWN_GRACE_S, since_at))
        elif reason == DELETION_BY_TAINT_MANAGER:
            own.append(Signal("preemption", reason, max(0.0, termination_grace_s), since_at))
        else:
            rollouts.append(Signal("rollout", reason if reason in ROLLOUT_REASONS else "other"))
    message = _str(status.get("message")) or ""
    if status.get("reason") in NODE_SHUTDOWN_REASONS and NODE_SHUTDOWN_MESSAGE in message:
        own.append(Signal("preemption", "node-shutdown", 0.0))
    # Terminating already: the kubelet kills the pod at its deletionTimestamp (the deletion's
    # time + deletionGracePeriodSeconds). That replaces its own signals' default grace, and
    # ends it before a node signal's later deadline; a node's earlier deadline still wins.
    deletion_at = parse_time(metadata.get("deletionTimestamp"))
    deletion_grace_s = _number(metadata.get("deletionGracePeriodSeconds"))
    if deletion_at is not None or deletion_grace_s is not None:
        if deletion_at is not None:
            grace_s, since_at = 0.0, deletion_at
        else:
            grace_s, since_at = max(0.0, deletion_grace_s or 0.0), None
        own = [Signal("preemption", signal.reason, grace_s, since_at) for signal in own]
        if from_node and not own:
            own = [Signal("preemption", from_node[0].reason, grace_s, since_at)]
    if from_node or own:
        return from_node + own
    if not rollouts and (pod_deleted or deletion_at is not None or deletion_grace_s is not None):
        rollouts.append(Signal("rollout", "deleted"))
    return rollouts


def decide(signals: Iterable[Signal], seen_at: Callable[[Signal], float]) -> Decision | None:
    """The outcome of a pod's signals: a preemption (the earliest deadline, ``seen_at`` giving
    when a signal without a time of its own was first seen), else a rollout, else None."""
    signals = list(signals)
    preemptions = [signal for signal in signals if signal.outcome == "preemption"]
    if preemptions:
        deadlines = [(signal.deadline(seen_at(signal)), signal) for signal in preemptions]
        deadline, signal = min(deadlines, key=lambda item: item[0])
        return Decision("preemption", signal.reason, deadline)
    if signals:
        return Decision("rollout", signals[0].reason)
    return None


def kubernetes_notice(instance_id: str, grace_s: float, reason: str) -> PreemptNotice:
    """The notice of a preemption the API server shows. Its source, ``kubernetes:<reason>``, is
    not one a remote sender may give (``NoticeSource``): this notice never crosses the wire, it
    is applied in the monitor, and the event's source is free text."""
    checked = PreemptNotice(instance_id=instance_id, grace_s=min(max(grace_s, 0.0), MAX_GRACE_S))
    return checked.model_copy(update={"source": f"kubernetes:{reason}"})


# -- the API server: list and watch --------------------------------------------------------------

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
LIST_PAGE_SIZE = 500
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_EVENT_BYTES = 16 * 1024 * 1024
# A watch that ends this quickly without an event is a failure (backoff), not a timeout.
MIN_WATCH_S = 1.0
MAX_BACKOFF_S = 30.0
# A list (one page) may take this many kubernetes_timeout_s in all; headers per response.
LIST_TIMEOUTS = 6
MAX_HEADERS = 200


class ApiError(Exception):
    """The API server could not be reached, or answered an error."""

    reason = "http"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class UnreachableError(ApiError):
    reason = "unreachable"


class MalformedError(ApiError):
    reason = "malformed"


class GoneError(ApiError):
    """410: the resourceVersion is too old; list again."""

    reason = "gone"


@dataclass(frozen=True)
class ApiConfig:
    scheme: str
    host: str
    port: int
    base_path: str
    namespace: str
    token_file: Path | None
    ca_file: Path | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


def resolve_config(
    settings: MonitorSettings,
    env: Mapping[str, str] | None = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> ApiConfig:
    """Where the API server is and which namespace the executors are in (in-cluster defaults:
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service account's namespace file)."""
    env = os.environ if env is None else env
    url = settings.kubernetes_api_url
    if url is None:
        host = env.get("KUBERNETES_SERVICE_HOST")
        service_port = env.get("KUBERNETES_SERVICE_PORT") or "443"
        if not host:
            raise ConfigurationError(
                "monitor.kubernetes is on but no API server is known: run the monitor in a pod"
                " (KUBERNETES_SERVICE_HOST) or set SPOTSERVE_MONITOR__KUBERNETES_API_URL"
            )
        url = f"https://{f'[{host}]' if ':' in host else host}:{service_port}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"monitor.kubernetes_api_url {url!r} is not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigurationError(f"monitor.kubernetes_api_url {url!r} has a bad port") from None
    namespace = settings.kubernetes_namespace
    if namespace is None:
        try:
            namespace = (service_account_dir / "namespace").read_text().strip()
        except OSError:
            namespace = ""
        if not namespace:
            raise ConfigurationError(
                "monitor.kubernetes: the executors' namespace is not known: set"
                " SPOTSERVE_MONITOR__KUBERNETES_NAMESPACE (or run the monitor in a pod)"
            )
    return ApiConfig(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        namespace=namespace,
        token_file=settings.kubernetes_token_file,
        ca_file=settings.kubernetes_ca_file if parts.scheme == "https" else None,
    )


def _ssl_context(config: ApiConfig) -> ssl.SSLContext | None:
    if config.scheme != "https":
        return None
    if config.ca_file is not None and config.ca_file.is_file():
        return ssl.create_default_context(cafile=str(config.ca_file))
    return ssl.create_default_context()  # the system's trust store


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class KubernetesApi:
    """A minimal HTTP/1.1 client of the API server (GET only, one connection per request, every
    wait bounded): JSON lists and streamed watches."""

    def __init__(
        self, config: ApiConfig, timeout_s: float, log: structlog.stdlib.BoundLogger
    ) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self.log = log
        self._ssl = _ssl_context(config)
        self._warned_no_token = False

    async def _token(self) -> str | None:
        """Read at each request: a projected service account token is rotated on disk."""
        path = self.config.token_file
        if path is None:
            return None
        try:
            token = (await asyncio.to_thread(path.read_text)).strip()
        except OSError:
            token = ""
        if not token and not self._warned_no_token:
            self._warned_no_token = True
            self.log.warning("kubernetes.no_token", token_file=str(path))
        return token or None

    def path(self, path: str, query: Mapping[str, str]) -> str:
        return f"{self.config.base_path}{path}?{urllib.parse.urlencode(query)}"

    async def _open(self, path: str, query: Mapping[str, str]) -> Response:
        config = self.config
        token = await self._token()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    config.host,
                    config.port,
                    ssl=self._ssl,
                    server_hostname=config.host if self._ssl is not None else None,
                    limit=MAX_HEADER_BYTES,
                ),
                timeout=self.timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise UnreachableError(f"cannot connect to {config.url}: {exc!r}") from None
        try:
            host = f"[{config.host}]" if ":" in config.host else config.host
            lines = [
                f"GET {self.path(path, query)} HTTP/1.1",
                f"Host: {host}:{config.port}",
                "Accept: application/json",
                "User-Agent: spotserve-monitor",
                "Connection: close",
            ]
            if token is not None:
                lines.append(f"Authorization: Bearer {token}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await asyncio.wait_for(writer.drain(), timeout=self.timeout_s)
            status, headers = await self._read_head(reader)
        except BaseException:
            writer.close()
            raise
        return Response(status, headers, reader, writer)

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        status_line = await self._readline(reader)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise MalformedError(f"not an HTTP response: {status_line[:100]!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS):
            line = await self._readline(reader)
            if line in (b"\r\n", b"\n"):
                return int(parts[1]), headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raise MalformedError("too many headers in the API server's answer")

    async def _readline(
        self, reader: asyncio.StreamReader, timeout_s: float | None = None
    ) -> bytes:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=timeout_s or self.timeout_s)
        except TimeoutError:
            raise UnreachableError("the API server stopped answering") from None
        except (ValueError, asyncio.LimitOverrunError):
            raise MalformedError("an over-long line from the API server") from None
        except OSError as exc:
            raise UnreachableError(f"connection lost: {exc!r}") from None
        if not line.endswith(b"\n"):
            raise UnreachableError("connection closed by the API server")
        return line

    async def _read(self, reader: asyncio.StreamReader, size: int, timeout_s: float) -> bytes:
        try:
            return await asyncio.wait_for(reader.readexactly(size), timeout=timeout_s)
        except TimeoutError:
            raise UnreachableError("the API server stopped answering") from None
        except asyncio.IncompleteReadError:
            raise UnreachableError("connection closed by the API server") from None
        except OSError as exc:
            raise UnreachableError(f"connection lost: {exc!r}") from None

    async def _body(self, response: Response, timeout_s: float) -> AsyncIterator[bytes]:
        """The body's bytes as they come (chunked, Content-Length or until the end)."""
        reader = response.reader
        if "chunked" in response.headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await self._readline(reader, timeout_s)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise MalformedError(f"bad chunk size {size_line[:40]!r}") from None
                if size > MAX_BODY_BYTES:
                    raise MalformedError(f"an over-long chunk ({size} bytes)")
                if size == 0:
                    while (await self._readline(reader, timeout_s)) not in (b"\r\n", b"\n"):
                        pass  # trailers
                    return
                data = await self._read(reader, size, timeout_s)
                await self._read(reader, 2, timeout_s)  # CRLF
                yield data
        length = response.headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                raise MalformedError(f"bad Content-Length {length!r}")
            if int(length):
                yield await self._read(reader, int(length), timeout_s)
            return
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout=timeout_s)
            except TimeoutError:
                raise UnreachableError("the API server stopped answering") from None
            except OSError as exc:
                raise UnreachableError(f"connection lost: {exc!r}") from None
            if not data:
                return
            yield data

    async def _read_all(self, response: Response) -> bytes:
        body = bytearray()
        async for data in self._body(response, self.timeout_s):
            body += data
            if len(body) > MAX_BODY_BYTES:
                raise MalformedError("an over-long response from the API server")
        return bytes(body)

    async def _error(self, response: Response) -> ApiError:
        """The error an answer other than 200 stands for (its Status message when readable)."""
        message = ""
        with contextlib.suppress(ApiError, ValueError):
            status = json.loads(await self._read_all(response))
            message = _str(_dict(status).get("message")) or ""
        text = f"HTTP {response.status}" + (f": {message}" if message else "")
        if response.status == 410:
            return GoneError(text, 410)
        if response.status in (401, 403):
            text += " (the monitor's service account needs get/list/watch on nodes and pods)"
        return ApiError(text, response.status)

    async def get(self, path: str, query: Mapping[str, str]) -> JsonObject:
        """A JSON object (a list)."""
        response = await self._open(path, query)
        try:
            if response.status != 200:
                raise await self._error(response)
            try:
                body = json.loads(await self._read_all(response))
            except ValueError as exc:
                raise MalformedError(f"the list is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise MalformedError("the list is not a JSON object")
            return body
        finally:
            response.writer.close()

    @contextlib.asynccontextmanager
    async def watch(
        self, path: str, query: Mapping[str, str], idle_timeout_s: float
    ) -> AsyncIterator[AsyncGenerator[bytes, None]]:
        """A watch's lines (one JSON event each) as they come; the iterator ends when the server
        ends the watch."""
        response = await self._open(path, query)
        try:
            if response.status != 200:
                raise await self._error(response)
            yield self._lines(response, idle_timeout_s)
        finally:
            response.writer.close()

    async def _lines(
        self, response: Response, idle_timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        pending = bytearray()
        async for data in self._body(response, idle_timeout_s):
            pending += data
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end]).strip()
                del pending[: end + 1]
                if line:
                    yield line
            if len(pending) > MAX_EVENT_BYTES:
                raise MalformedError("an over-long watch event")
        if pending.strip():
            yield bytes(pending).strip()


Handler = Callable[[str, JsonObject], Awaitable[None]]


class Reflector:
    """One resource's objects as the API server has them, kept by list then watch; every change
    goes to ``handler(type, object)`` (ADDED, MODIFIED or DELETED; a re-list reports what changed
    meanwhile, objects gone as DELETED)."""

    def __init__(
        self,
        api: KubernetesApi,
        resource: Literal["nodes", "pods"],
        path: str,
        selector: str | None,
        handler: Handler,
        watch_s: float,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.api = api
        self.resource = resource
        self.path = path
        self.selector = selector
        self.handler = handler
        self.watch_s = watch_s
        self.log = log.bind(resource=resource)
        self.store: dict[str, JsonObject] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()

    def _query(self, **extra: str) -> dict[str, str]:
        query = {"labelSelector": self.selector} if self.selector else {}
        return {**query, **extra}

    async def run(self) -> None:
        """List, then watch and watch again, for ever: nothing the server says ends it."""
        delays = backoff_delays(max_s=MAX_BACKOFF_S)
        gone_before = False
        while True:
            problem: ApiError
            try:
                if self.resource_version is None:
                    await self._list()
                if await self._watch():
                    delays = backoff_delays(max_s=MAX_BACKOFF_S)
                    gone_before = False
                    continue
                problem = UnreachableError("the watch ended at once, with no event")
            except GoneError as exc:
                self.log.info("kubernetes.relist", error=str(exc))
                self.resource_version = None
                if not gone_before:  # list again at once (but not in a loop)
                    gone_before = True
                    metrics.KUBERNETES_WATCH_ERRORS.labels(self.resource, exc.reason).inc()
                    continue
                problem = exc
            except ApiError as exc:
                problem = exc
            except Exception as exc:  # a bug: logged, and the watch goes on
                self.log.exception("kubernetes.watch_crashed")
                problem = ApiError(repr(exc))
            metrics.KUBERNETES_WATCH_ERRORS.labels(self.resource, problem.reason).inc()
            delay = next(delays)
            self.log.warning(
                "kubernetes.watch_failed", error=str(problem), retry_in_s=round(delay, 3)
            )
            await asyncio.sleep(delay)

    async def _list(self) -> None:
        items: dict[str, JsonObject] = {}
        query = self._query(limit=str(LIST_PAGE_SIZE))
        while True:
            try:
                page = await asyncio.wait_for(
                    self.api.get(self.path, query), timeout=self.api.timeout_s * LIST_TIMEOUTS
                )
            except TimeoutError:
                raise UnreachableError(f"the {self.resource} list took too long") from None
            metadata = _dict(page.get("metadata"))
            for item in _list(page.get("items")):
                name = name_of(_dict(item))
                if name is None:
                    metrics.KUBERNETES_WATCH_ERRORS.labels(self.resource, "malformed").inc()
                    self.log.warning("kubernetes.malformed_object", object=repr(item)[:200])
                    continue
                items[name] = item
            more = _str(metadata.get("continue"))
            if not more:
                break
            query = self._query(limit=str(LIST_PAGE_SIZE), **{"continue": more})
        version = _str(metadata.get("resourceVersion"))
        if not version:
            raise MalformedError(f"the {self.resource} list has no resourceVersion")
        previous, self.store = self.store, items
        self.resource_version = version
        self.log.info("kubernetes.listed", count=len(items), resource_version=version)
        for name, obj in previous.items():
            if name not in items:
                await self._handle("DELETED", obj)
        for name, obj in items.items():
            old = previous.get(name)
            if old is None:
                await self._handle("ADDED", obj)
            elif _version(old) != _version(obj):
                await self._handle("MODIFIED", obj)
        self.synced.set()

    async def _watch(self) -> bool:
        """One watch, until the server ends it; whether it was a useful one (an event, or it
        lasted)."""
        assert self.resource_version is not None
        query = self._query(
            watch="1",
            resourceVersion=self.resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(max(1, round(self.watch_s))),
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = 0
        idle_timeout_s = self.watch_s + self.api.timeout_s
        async with (
            self.api.watch(self.path, query, idle_timeout_s) as lines,
            contextlib.aclosing(lines),
        ):
            async for line in lines:
                events += 1
                await self._on_line(line)
        return events > 0 or loop.time() - started >= MIN_WATCH_S

    async def _on_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        event = _dict(event)
        kind, obj = _str(event.get("type")), event.get("object")
        if kind is None or not isinstance(obj, dict):
            self._malformed(line)
            return
        if kind == "ERROR":
            code = _number(obj.get("code"))
            message = _str(obj.get("message")) or _str(obj.get("reason")) or "error"
            if code == 410:
                raise GoneError(f"watch ERROR 410: {message}", 410)
            raise ApiError(f"watch ERROR {code}: {message}", None if code is None else int(code))
        version = _version(obj)
        if kind == "BOOKMARK":
            if version:
                self.resource_version = version
            return
        name = name_of(obj)
        if kind not in ("ADDED", "MODIFIED", "DELETED") or name is None:
            self._malformed(line)
            return
        if version:
            self.resource_version = version
        if kind == "DELETED":
            self.store.pop(name, None)
        else:
            self.store[name] = obj
        await self._handle(kind, obj)

    def _malformed(self, line: bytes) -> None:
        metrics.KUBERNETES_WATCH_ERRORS.labels(self.resource, "malformed").inc()
        self.log.warning("kubernetes.malformed_event", line=line[:200].decode("utf-8", "replace"))

    async def _handle(self, kind: str, obj: JsonObject) -> None:
        try:
            await self.handler(kind, obj)
        except Exception:  # a bug must not stop the watch
            self.log.exception("kubernetes.handler_failed", type=kind, name=name_of(obj))


def _version(obj: Mapping[str, Any]) -> str | None:
    return _str(_dict(obj.get("metadata")).get("resourceVersion"))


# -- the provider --------------------------------------------------------------------------------

NoticeSink = Callable[[PreemptNotice], Awaitable[tuple[str, FleetEvent]]]
# The incarnation of a registered instance (None: not registered).
IncarnationOf = Callable[[str], str | None]


@dataclass
class KubernetesWatcher:
    """Watches nodes and executor pods; a preemption becomes a notice for each registered
    executor instance it concerns, a rollout is logged and counted."""

    settings: MonitorSettings
    config: ApiConfig
    apply: NoticeSink
    incarnation_of: IncarnationOf
    log: structlog.stdlib.BoundLogger
    # When each (pod uid, reason) signal without a time of its own was first seen.
    _first_seen: dict[tuple[str, str], float] = field(default_factory=dict, init=False)
    # Deadline announced per incarnation.
    _announced: dict[str, float] = field(default_factory=dict, init=False)
    # Pods (uid) whose disruption is counted, by outcome.
    _counted: dict[str, set[Outcome]] = field(default_factory=dict, init=False)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.log = self.log.bind(component="kubernetes")
        self.api = KubernetesApi(self.config, self.settings.kubernetes_timeout_s, self.log)
        watch_s = self.settings.kubernetes_watch_s
        self.nodes = Reflector(
            self.api, "nodes", "/api/v1/nodes", None, self.on_node, watch_s, self.log
        )
        self.pods = Reflector(
            self.api,
            "pods",
            f"/api/v1/namespaces/{urllib.parse.quote(self.config.namespace)}/pods",
            self.settings.kubernetes_executor_selector or None,
            self.on_pod,
            watch_s,
            self.log,
        )

    async def start(self) -> None:
        self.log.info(
            "kubernetes.watching",
            api=self.config.url,
            namespace=self.config.namespace,
            selector=self.settings.kubernetes_executor_selector,
        )
        self._tasks = [
            supervised(self.nodes.run(), "kubernetes-nodes", self.log),
            supervised(self.pods.run(), "kubernetes-pods", self.log),
            supervised(self._check(), "kubernetes-check", self.log),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    # -- events ----------------------------------------------------------------------------

    async def on_node(self, kind: str, node: JsonObject) -> None:
        name = name_of(node)
        deleted = kind == "DELETED"
        for pod in self._pods_on(name):
            await self._evaluate(pod, node=node, node_deleted=deleted)

    async def on_pod(self, kind: str, pod: JsonObject) -> None:
        await self._evaluate(pod, pod_deleted=kind == "DELETED")
        if kind == "DELETED":
            uid = self._uid(pod)
            self._counted.pop(uid, None)
            self._first_seen = {k: v for k, v in self._first_seen.items() if k[0] != uid}

    def _pods_on(self, node: str | None) -> list[JsonObject]:
        return [
            pod
            for pod in list(self.pods.store.values())
            if node is not None and _dict(pod.get("spec")).get("nodeName") == node
        ]

    @staticmethod
    def _uid(pod: Mapping[str, Any]) -> str:
        metadata = _dict(pod.get("metadata"))
        return _str(metadata.get("uid")) or _str(metadata.get("name")) or ""

    async def _evaluate(
        self,
        pod: JsonObject,
        node: JsonObject | None = None,
        pod_deleted: bool = False,
        node_deleted: bool = False,
    ) -> None:
        name = name_of(pod)
        if name is None:
            return
        node_name = _str(_dict(pod.get("spec")).get("nodeName"))
        if node is None and node_name:
            node = self.nodes.store.get(node_name)
        signals = pod_signals(pod, node, self.settings.grace_s, pod_deleted, node_deleted)
        uid = self._uid(pod)
        now = time.time()
        decision = decide(signals, lambda s: self._first_seen.setdefault((uid, s.reason), now))
        if decision is None:
            return
        counted = self._counted.setdefault(uid, set())
        # Once each; a rollout after the preemption of the same pod is its end, not news.
        if decision.outcome not in counted and "preemption" not in counted:
            counted.add(decision.outcome)
            known = PREEMPTION_REASONS if decision.outcome == "preemption" else ROLLOUT_REASONS
            label = decision.reason if decision.reason in known else "other"
            metrics.KUBERNETES_DISRUPTIONS.labels(decision.outcome, label).inc()
            log = self.log.bind(pod=name, kube_node=node_name, reason=decision.reason)
            if decision.outcome == "rollout":
                log.info("kubernetes.rollout")
            else:
                log.info("kubernetes.preemption", deadline=decision.deadline)
        if decision.outcome == "preemption":
            assert decision.deadline is not None
            await self._announce(name, node_name, decision.reason, decision.deadline)

    async def _announce(
        self, instance_id: str, node: str | None, reason: str, deadline: float
    ) -> None:
        """A notice for ``instance_id`` unless it is not registered (yet: the check tries again)
        or a notice with this deadline (or an earlier one) was already applied."""
        incarnation = self.incarnation_of(instance_id)
        if incarnation is None:
            return
        previous = self._announced.get(incarnation)
        if previous is not None and deadline >= previous - self.settings.deadline_update_min_s:
            return
        log = self.log.bind(instance_id=instance_id, kube_node=node, reason=reason)
        try:
            notice = kubernetes_notice(instance_id, deadline - time.time(), reason)
        except ValidationError as exc:
            # Not an instance id a notice can name: say so once.
            self._announced[incarnation] = float("-inf")
            log.error("kubernetes.bad_instance_id", error=str(exc))
            return
        try:
            outcome, event = await self.apply(notice)
        except NotFound:
            return  # gone meanwhile
        except RpcError as exc:  # busy: tried again at the next check
            metrics.PREEMPT_NOTICES.labels("kubernetes", "rejected").inc()
            log.warning("kubernetes.notice_failed", error=exc.message)
            return
        except Exception:
            metrics.PREEMPT_NOTICES.labels("kubernetes", "rejected").inc()
            log.exception("kubernetes.notice_failed")
            return
        metrics.PREEMPT_NOTICES.labels("kubernetes", outcome).inc()
        self._announced[incarnation] = deadline if event.deadline is None else event.deadline
        log.info("fleet.notice", source=notice.source, outcome=outcome, deadline=event.deadline)

    async def _check(self) -> None:
        """Every check interval, the registered executors' pods again: one that registered
        since its pod's preemption was seen gets its notice, a notice that failed (the monitor
        was busy) is tried again; incarnations no longer registered are forgotten."""
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            for pod in list(self.pods.store.values()):
                name = name_of(pod)
                if name is not None and self.incarnation_of(name) is not None:
                    await self._evaluate(pod)
            live = {self.incarnation_of(name) for name in list(self.pods.store)}
            self._announced = {k: v for k, v in self._announced.items() if k in live}
