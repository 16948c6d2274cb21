"""The monitor's Kubernetes watch (services.monitor.kubernetes): the classifier of node and pod
objects (pure), the list/watch client against a local fake API server that speaks the real
protocol (tests/fakes_kubernetes.py), and the monitor service itself (its own process, a real
nats-server) turning a tainted node or a disrupted pod into preempt-notice fleet events.

Executor-like instances are registered by putting their records in the instances bucket (as
executors do); their lease is long, so no heartbeats are needed. Conditions are waited for with
bounded timeouts; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from nats.aio.client import Client
from nats.js.kv import KeyValue
from structlog.testing import capture_logs

from services.monitor import kubernetes
from services.monitor.kubernetes import (
    JsonObject,
    KubernetesApi,
    Reflector,
    Signal,
    decide,
    kubernetes_notice,
    name_of,
    node_signals,
    pod_signals,
    resolve_config,
    spot_cloud,
)
from shared.bus import connect
from shared.cluster import LocalCluster
from shared.codec import encode
from shared.config import ConfigurationError, MonitorSettings, NatsSettings
from shared.discovery import discover
from shared.messages import InstanceRecord
from shared.natsserver import EmbeddedNatsServer
from shared.subjects import SERVICE_MONITOR
from tests.fakes_kubernetes import (
    FakeKubernetesApi,
    disruption,
    make_node,
    make_pod,
    rfc3339,
    taint,
)
from tests.helpers import eventually
from tests.test_monitor import EventLog, Seen, _bucket

GKE_SPOT = {"cloud.google.com/gke-spot": "true"}
EKS_SPOT = {"eks.amazonaws.com/capacityType": "SPOT"}
AKS_SPOT = {"kubernetes.azure.com/scalesetpriority": "spot"}
KARPENTER_SPOT = {"karpenter.sh/capacity-type": "spot"}


def pod(name: str = "exec-1", node: str = "n1", **status: Any) -> dict[str, Any]:
    obj = make_pod(name, node, "spot")
    obj["status"].update(status)
    return obj


def first_seen_at(at: float) -> Any:
    return lambda _signal: at


# -- the classifier ----------------------------------------------------------------------------


def test_gke_termination_taint_is_a_preemption_on_any_node() -> None:
    added = 1_700_000_000.0
    node = make_node("n1", GKE_SPOT, [taint(kubernetes.GKE_TERMINATION_TAINT, added_at=added)])
    (signal,) = node_signals(node)
    assert signal == Signal("preemption", "impending-node-termination", 30.0, added, "gcp")
    # Also on a regular node (GKE's maintenance handler): the node goes all the same.
    plain = make_node("n2", {}, [taint(kubernetes.GKE_TERMINATION_TAINT)])
    assert [s.reason for s in node_signals(plain)] == ["impending-node-termination"]
    assert node_signals(plain)[0].since is None  # from when the monitor saw it


def test_aws_nth_spot_itn_counts_rebalance_asg_and_maintenance_do_not() -> None:
    itn = make_node("n1", EKS_SPOT, [taint(kubernetes.NTH_SPOT_ITN_TAINT)])
    (signal,) = node_signals(itn)
    assert (signal.outcome, signal.reason, signal.grace_s) == ("preemption", "spot-itn", 120.0)
    for key in kubernetes.NTH_OTHER_TAINTS:
        assert node_signals(make_node("n1", EKS_SPOT, [taint(key)])) == [], key
        # NTH cordons with them (enableRebalanceMonitoring): still not a reclaim.
        cordoned = make_node("n1", EKS_SPOT, [taint(key)], unschedulable=True)
        assert node_signals(cordoned) == [], key
        both = make_node("n1", EKS_SPOT, [taint(key), taint(kubernetes.NTH_SPOT_ITN_TAINT)])
        assert [s.reason for s in node_signals(both)] == ["spot-itn"]


def test_aks_remediator_taint_counts_on_spot_nodes_only() -> None:
    for key in kubernetes.AKS_REMEDIATOR_TAINTS:
        spot = make_node("n1", AKS_SPOT, [taint(key)])
        assert [(s.reason, s.grace_s, s.cloud) for s in node_signals(spot)] == [
            ("aks-spot-eviction", 30.0, "azure")
        ]
        # AKS also drains regular nodes on Redeploy/Terminate events: maintenance.
        assert node_signals(make_node("n1", {}, [taint(key)])) == []


def test_cordon_counts_on_spot_nodes_with_the_clouds_grace() -> None:
    cases = [
        (GKE_SPOT, None, 30.0),
        ({"cloud.google.com/gke-preemptible": "true"}, None, 30.0),
        (EKS_SPOT, None, 120.0),
        (AKS_SPOT, None, 30.0),
        (KARPENTER_SPOT, "aws:///us-east-1a/i-0abc", 120.0),
        (KARPENTER_SPOT, None, 42.0),  # unknown cloud: the monitor's default grace
    ]
    for labels, provider_id, grace_s in cases:
        cordoned = make_node("n1", labels, unschedulable=True, provider_id=provider_id)
        (signal,) = node_signals(cordoned, default_grace_s=42.0)
        assert (signal.reason, signal.grace_s) == ("spot-cordon", grace_s), labels
        tainted = make_node("n1", labels, [taint(kubernetes.UNSCHEDULABLE_TAINT)])
        assert [s.reason for s in node_signals(tainted)] == ["spot-cordon"]
    # An on-demand node cordoned for maintenance: not a preemption.
    assert node_signals(make_node("n1", {}, unschedulable=True), 42.0) == []
    assert spot_cloud(make_node("n1", {"eks.amazonaws.com/capacityType": "ON_DEMAND"})) == (
        False,
        None,
    )


def test_out_of_service_and_deletion_of_a_spot_node() -> None:
    spot = make_node("n1", GKE_SPOT, [taint(kubernetes.OUT_OF_SERVICE_TAINT, "NoExecute")])
    assert [(s.reason, s.grace_s) for s in node_signals(spot)] == [("out-of-service", 0.0)]
    assert [s.reason for s in node_signals(make_node("n1", AKS_SPOT), deleted=True)] == [
        "node-deleted"
    ]
    assert node_signals(make_node("n1", {}), deleted=True) == []
    assert node_signals(make_node("n1", {}, [taint(kubernetes.OUT_OF_SERVICE_TAINT)])) == []


def test_pod_disruption_targets() -> None:
    at = 1_700_000_000.0
    kubelet = pod(conditions=[disruption("TerminationByKubelet", at)])
    (signal,) = pod_signals(kubelet, make_node("n1"))
    assert (signal.outcome, signal.reason, signal.grace_s, signal.since) == (
        "preemption",
        "TerminationByKubelet",
        15.0,
        at,
    )
    taint_manager = pod(conditions=[disruption("DeletionByTaintManager", at)])
    taint_manager["spec"]["terminationGracePeriodSeconds"] = 45
    (signal,) = pod_signals(taint_manager, None)
    assert (signal.reason, signal.grace_s) == ("DeletionByTaintManager", 45.0)
    for reason in ("EvictionByEvictionAPI", "PreemptionByScheduler", "DeletionByPodGC"):
        evicted = pod(conditions=[disruption(reason, at)])
        assert [(s.outcome, s.reason) for s in pod_signals(evicted, make_node("n1"))] == [
            ("rollout", reason)
        ]
    strange = pod(conditions=[disruption("SomethingNew", at)])
    assert [(s.outcome, s.reason) for s in pod_signals(strange, None)] == [("rollout", "other")]
    # A condition that is not True (the disruption controller resets it): nothing.
    reset = pod(conditions=[{**disruption("TerminationByKubelet", at), "status": "False"}])
    assert pod_signals(reset, make_node("n1")) == []


def test_terminating_pod_deadline_is_its_deletion_timestamp() -> None:
    at = 1_700_000_000.0
    terminating = pod(conditions=[disruption("TerminationByKubelet", at)])
    terminating["metadata"]["deletionTimestamp"] = rfc3339(at + 8)
    terminating["metadata"]["deletionGracePeriodSeconds"] = 8
    decision = decide(pod_signals(terminating, None), first_seen_at(at))
    assert decision is not None
    assert (decision.outcome, decision.reason, decision.deadline) == (
        "preemption",
        "TerminationByKubelet",
        at + 8,
    )
    # On a node with an earlier deadline, the earlier one wins.
    node = make_node("n1", EKS_SPOT, [taint(kubernetes.NTH_SPOT_ITN_TAINT, added_at=at - 200)])
    decision = decide(pod_signals(terminating, node), first_seen_at(at))
    assert decision is not None and (decision.reason, decision.deadline) == ("spot-itn", at - 80)


def test_rollouts_and_quiet_pods() -> None:
    at = 1_700_000_000.0
    running = pod()
    assert pod_signals(running, make_node("n1")) == []
    assert decide([], first_seen_at(at)) is None
    # ReplicaSet scale-down: a deletion, no disruption condition.
    scaled_down = pod()
    scaled_down["metadata"]["deletionTimestamp"] = rfc3339(at + 30)
    decision = decide(pod_signals(scaled_down, make_node("n1", GKE_SPOT)), first_seen_at(at))
    assert decision is not None and (decision.outcome, decision.reason) == ("rollout", "deleted")
    decision = decide(pod_signals(running, None, pod_deleted=True), first_seen_at(at))
    assert decision is not None and decision.outcome == "rollout"
    # A drain's eviction on a spot node that is being reclaimed is that reclaim.
    evicted = pod(conditions=[disruption("EvictionByEvictionAPI", at)])
    evicted["metadata"]["deletionTimestamp"] = rfc3339(at + 5)
    node = make_node("n1", AKS_SPOT, [taint(kubernetes.AKS_REMEDIATOR_TAINTS[0])])
    decision = decide(pod_signals(evicted, node), first_seen_at(at))
    assert decision is not None
    assert (decision.outcome, decision.reason, decision.deadline) == (
        "preemption",
        "aks-spot-eviction",
        at + 5,
    )
    # The same eviction on an on-demand node (a drain for maintenance): a rollout.
    decision = decide(pod_signals(evicted, make_node("n1")), first_seen_at(at))
    assert decision is not None and decision.outcome == "rollout"


def test_graceful_node_shutdown_without_disruption_conditions() -> None:
    shut = pod(
        phase="Failed",
        reason="Terminated",
        message="Pod was terminated in response to imminent node shutdown.",
    )
    assert [(s.outcome, s.reason) for s in pod_signals(shut, None)] == [
        ("preemption", "node-shutdown")
    ]
    evicted = pod(phase="Failed", reason="Evicted", message="The node was low on memory.")
    assert pod_signals(evicted, None) == []


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"metadata": None, "spec": "x", "status": 7},
        {"metadata": {"name": 5, "labels": ["a"], "deletionTimestamp": "yesterday"}},
        {"spec": {"taints": "all", "unschedulable": "yes"}, "status": {"conditions": {"a": 1}}},
        {"spec": {"taints": [None, 3, {"key": 4}, {"effect": "NoSchedule"}]}},
        {"status": {"conditions": [None, {"type": "DisruptionTarget", "status": "True"}]}},
    ],
)
def test_malformed_objects_do_not_raise(obj: dict[str, Any]) -> None:
    assert node_signals(obj, deleted=True) == []
    signals = pod_signals(obj, obj, pod_deleted=True, node_deleted=True)
    assert all(signal.outcome in ("preemption", "rollout") for signal in signals)
    assert decide(signals, first_seen_at(0.0)) is not None  # deleted: at least a rollout
    assert name_of(obj) is None


def test_every_reason_has_its_metric_series() -> None:
    from services.monitor import metrics

    series = set(metrics.KUBERNETES_DISRUPTIONS._metrics)
    for reason in kubernetes.PREEMPTION_REASONS:
        assert ("preemption", reason) in series, reason
    for reason in kubernetes.ROLLOUT_REASONS:
        assert ("rollout", reason) in series, reason
    assert ("kubernetes", "new") in set(metrics.PREEMPT_NOTICES._metrics)


def test_kubernetes_notice_source_and_bounds() -> None:
    notice = kubernetes_notice("exec-1", 99999.0, "spot-itn")
    assert notice.source == "kubernetes:spot-itn"
    assert notice.grace_s == 3600.0
    assert kubernetes_notice("exec-1", -5.0, "x").grace_s == 0.0


# -- configuration -----------------------------------------------------------------------------


def test_in_cluster_configuration(tmp_path: Path) -> None:
    (tmp_path / "namespace").write_text("serving\n")
    settings = MonitorSettings(kubernetes=True)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    config = resolve_config(settings, env, tmp_path)
    assert (config.scheme, config.host, config.port, config.namespace) == (
        "https",
        "10.96.0.1",
        443,
        "serving",
    )
    assert config.token_file == settings.kubernetes_token_file
    assert config.ca_file == settings.kubernetes_ca_file
    ipv6 = resolve_config(settings, {"KUBERNETES_SERVICE_HOST": "fd00::1"}, tmp_path)
    assert (ipv6.host, ipv6.port, ipv6.url) == ("fd00::1", 443, "https://[fd00::1]:443")
    explicit = MonitorSettings(
        kubernetes_api_url="http://127.0.0.1:8001/k8s/", kubernetes_namespace="other"
    )
    config = resolve_config(explicit, {}, tmp_path / "nowhere")
    assert (config.port, config.base_path, config.namespace, config.ca_file) == (
        8001,
        "/k8s",
        "other",
        None,
    )


def test_configuration_errors_say_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="KUBERNETES_API_URL"):
        resolve_config(MonitorSettings(kubernetes=True), {}, tmp_path)
    with pytest.raises(ConfigurationError, match="KUBERNETES_NAMESPACE"):
        resolve_config(
            MonitorSettings(kubernetes_api_url="https://api:6443"), {}, tmp_path / "nowhere"
        )
    with pytest.raises(ConfigurationError, match="not an http"):
        resolve_config(
            MonitorSettings(kubernetes_api_url="ftp://api", kubernetes_namespace="x"), {}
        )


def test_the_monitor_refuses_to_start_without_an_api_server(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path, log_file=tmp_path / "nats-server.log")
    server.start()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KUBERNETES_")}
    env.update(SPOTSERVE_NATS__URL=server.url, SPOTSERVE_MONITOR__KUBERNETES="true")
    env["SPOTSERVE_METRICS__PORT"] = "0"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "services.monitor"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    assert done.returncode == 3  # a configuration problem, said plainly
    assert "SPOTSERVE_MONITOR__KUBERNETES_API_URL" in done.stdout + done.stderr


# -- the list/watch client against the fake API server ---------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubernetesApi]:
    server = await FakeKubernetesApi(token="rotated-token").start()
    yield server
    await server.stop()


async def test_reflector_pages_rotated_token_watch_and_relist(
    fake: FakeKubernetesApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("n1", "n2", "n3"):
        fake.put("nodes", make_node(name))
    monkeypatch.setattr(kubernetes, "LIST_PAGE_SIZE", 2)
    token_file = tmp_path / "token"
    token_file.write_text("old-token")
    settings = MonitorSettings(
        kubernetes_api_url=fake.url, kubernetes_namespace="spot", kubernetes_token_file=token_file
    )
    seen: list[tuple[str, str | None]] = []

    async def handler(kind: str, obj: dict[str, Any]) -> None:
        seen.append((kind, name_of(obj)))
        if name_of(obj) == "n3":
            raise RuntimeError("a bug in the handler")  # logged; the watch goes on

    with capture_logs() as logs:
        log = structlog.get_logger()
        api = KubernetesApi(resolve_config(settings), 5.0, log)
        reflector = Reflector(api, "nodes", "/api/v1/nodes", None, handler, 300.0, log)
        task = asyncio.create_task(reflector.run())
        try:
            await eventually(lambda: fake.unauthorized >= 1, "a refused request")
            token_file.write_text("rotated-token\n")  # the kubelet rotates the token file
            await eventually(reflector.synced.is_set, "the first list")
            assert sorted(seen) == [("ADDED", "n1"), ("ADDED", "n2"), ("ADDED", "n3")]
            pages = [r for r in fake.requests if r.authorized and not r.watch]
            assert [r.query.get("continue") for r in pages] == [None, "2"]
            await eventually(lambda: fake.watching("nodes"), "the watch")
            watch = fake.watch_requests("nodes")[-1].query
            assert watch["resourceVersion"] == str(fake.version)
            assert watch["allowWatchBookmarks"] == "true"

            fake.put("nodes", make_node("n4"))
            await eventually(lambda: ("ADDED", "n4") in seen, "n4 through the watch")

            # While the watch is cut off, n1 goes and n2 changes; then the version is gone.
            fake.pause("nodes")
            fake.delete("nodes", "n1")
            fake.update("nodes", "n2", lambda obj: obj["metadata"]["labels"].update(x="y"))
            fake.expire("nodes")
            fake.resume("nodes")
            await eventually(
                lambda: ("DELETED", "n1") in seen and ("MODIFIED", "n2") in seen,
                "the re-list's changes",
            )
            assert sorted(reflector.store) == ["n2", "n3", "n4"]
            assert ("MODIFIED", "n3") not in seen and ("MODIFIED", "n4") not in seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    events = [entry["event"] for entry in logs]
    assert "kubernetes.watch_failed" in events  # the 401, with backoff
    assert "kubernetes.relist" in events
    assert "kubernetes.handler_failed" in events
    first_good = next(i for i, r in enumerate(fake.requests) if r.authorized)
    assert all(r.authorized for r in fake.requests[first_good:])


async def test_reflector_survives_garbage_errors_and_drops(
    fake: FakeKubernetesApi, tmp_path: Path
) -> None:
    fake.split_chunks = True
    fake.token = None  # as behind `kubectl proxy`: no token file, no Authorization
    fake.put("pods", make_pod("exec-1", "n1", "spot"))
    fake.put("pods", make_pod("web-1", "n1", "spot", labels={"app": "web"}))
    settings = MonitorSettings(
        kubernetes_api_url=fake.url,
        kubernetes_namespace="spot",
        kubernetes_token_file=tmp_path / "no-token",
    )
    seen: list[tuple[str, str | None]] = []

    async def handler(kind: str, obj: dict[str, Any]) -> None:
        seen.append((kind, name_of(obj)))

    path = "/api/v1/namespaces/spot/pods"
    selector = settings.kubernetes_executor_selector
    with capture_logs() as logs:
        log = structlog.get_logger()
        api = KubernetesApi(resolve_config(settings), 5.0, log)
        reflector = Reflector(api, "pods", path, selector, handler, 300.0, log)
        task = asyncio.create_task(reflector.run())
        try:
            await eventually(lambda: fake.watching("pods"), "the watch")
            assert seen == [("ADDED", "exec-1")]  # the selector keeps to executors
            for line in (b"{not json", b'{"type": "MODIFIED", "object": 7}', b'{"type": 1}'):
                fake.garbage("pods", line)
            fake.put("pods", make_pod("exec-2", "n1", "spot"))
            await eventually(lambda: ("ADDED", "exec-2") in seen, "exec-2 after the garbage")

            version = fake.last_event_version["pods"]
            watches = len(fake.watch_requests("pods"))
            fake.drop("pods")
            fake.put("pods", make_pod("exec-3", "n1", "spot"))  # lost with the connection
            await eventually(lambda: ("ADDED", "exec-3") in seen, "exec-3 after the drop")
            resumed = fake.watch_requests("pods")[watches]
            assert resumed.query["resourceVersion"] == str(version)
            assert fake.lists("pods") == 1  # resumed, not listed again

            # An ERROR other than 410: watched again from the same version, after a backoff.
            watches = len(fake.watch_requests("pods"))
            status = {"kind": "Status", "code": 500, "message": "etcd hiccup"}
            fake.garbage("pods", json.dumps({"type": "ERROR", "object": status}).encode())
            fake.put("pods", make_pod("exec-4", "n1", "spot"))
            await eventually(lambda: ("ADDED", "exec-4") in seen, "exec-4 after the error")
            assert fake.lists("pods") == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    malformed = [entry for entry in logs if entry["event"] == "kubernetes.malformed_event"]
    assert len(malformed) == 3
    assert any("etcd hiccup" in entry.get("error", "") for entry in logs)
    assert [entry["event"] for entry in logs].count("kubernetes.no_token") == 1


@pytest.fixture
def api_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), standing in for the cluster's CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "apiserver.crt", tmp_path / "apiserver.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_https_with_the_service_account_ca(
    tmp_path: Path, api_certificate: tuple[Path, Path]
) -> None:
    cert, key = api_certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    fake = await FakeKubernetesApi(token="tls-token").start(tls)
    try:
        fake.put("nodes", make_node("n1", GKE_SPOT))
        (tmp_path / "token").write_text("tls-token")

        async def lists(ca_file: Path) -> JsonObject:
            settings = MonitorSettings(
                kubernetes_api_url=fake.url,
                kubernetes_namespace="spot",
                kubernetes_token_file=tmp_path / "token",
                kubernetes_ca_file=ca_file,
            )
            api = KubernetesApi(resolve_config(settings), 5.0, structlog.get_logger())
            return await api.get("/api/v1/nodes", {"limit": "500"})

        assert fake.url.startswith("https://")
        listed = await lists(cert)
        assert [name_of(item) for item in listed["items"]] == ["n1"]
        # Without the cluster's CA the server is not trusted.
        with pytest.raises(kubernetes.UnreachableError):
            await lists(tmp_path / "no-ca.crt")
    finally:
        await fake.stop()


# -- the monitor service, end to end --------------------------------------------------------------

NAMESPACE = "spot"
TOKEN = "monitor-sa-token"
# node -> (labels, provider id)
NODES: dict[str, dict[str, str]] = {
    "gke-spot-a": GKE_SPOT,
    "eks-spot-b": EKS_SPOT,
    "ondemand-c": {},
    "aks-spot-e": AKS_SPOT,
    "gke-spot-f": GKE_SPOT,
    "gke-spot-g": GKE_SPOT,
    "karp-spot-h": KARPENTER_SPOT,
    "eks-spot-i": EKS_SPOT,
    "eks-spot-j": EKS_SPOT,
}
# pod -> node; every one registers, but exec-i1 (later).
PODS = {
    "exec-a1": "gke-spot-a",
    "exec-a2": "gke-spot-a",
    "exec-b1": "eks-spot-b",
    "exec-c1": "ondemand-c",
    "exec-c2": "ondemand-c",
    "exec-c3": "ondemand-c",
    "exec-c4": "ondemand-c",
    "exec-e1": "aks-spot-e",
    "exec-f1": "gke-spot-f",
    "exec-g1": "gke-spot-g",
    "exec-h1": "karp-spot-h",
    "exec-i1": "eks-spot-i",
    "exec-j1": "eks-spot-j",
    "exec-m1": "ondemand-c",
}
ENV = {
    "SPOTSERVE_MONITOR__LOCAL_PROVIDER": "false",
    "SPOTSERVE_MONITOR__LEASE_S": "3600",
    "SPOTSERVE_MONITOR__CHECK_INTERVAL_S": "0.1",
    "SPOTSERVE_MONITOR__KUBERNETES": "true",
    "SPOTSERVE_MONITOR__KUBERNETES_NAMESPACE": NAMESPACE,
}


@dataclass
class KubeRig:
    fake: FakeKubernetesApi
    cluster: LocalCluster
    nc: Client
    kv: KeyValue
    events: EventLog

    async def register(self, instance_id: str) -> None:
        now = time.time()
        record = InstanceRecord(
            instance_id=instance_id,
            node=PODS.get(instance_id, "gke-spot-a"),
            devices=1,
            device_kind="cpu",
            device_memory_bytes=0,
            started_at=now,
            heartbeat_at=now,
        )
        await self.kv.put(instance_id, encode(record))
        await self.events.wait(instance_id, "joined")

    async def notice(self, instance_id: str, index: int = 0) -> Seen:
        def found() -> list[Seen]:
            notices = self.events.of(instance_id, "preempt-notice")
            return notices if len(notices) > index else []

        return (await eventually(found, f"preempt-notice {index} of {instance_id}"))[index]

    def noticed(self) -> set[str]:
        return {
            seen.event.instance.instance_id
            for seen in self.events.items
            if seen.event.kind == "preempt-notice"
        }

    def log(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        path = self.cluster.log_dir / "monitor.log"
        entries = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                entries.append(entry)
        return entries

    def update_node(self, name: str, change: Any) -> None:
        self.fake.update("nodes", name, change)

    def update_pod(self, name: str, change: Any) -> None:
        self.fake.update("pods", name, change)


@pytest.fixture(scope="module")
async def kube(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KubeRig]:
    store = tmp_path_factory.mktemp("kube-nats")
    server = EmbeddedNatsServer(store, log_file=store / "nats-server.log")
    server.start()
    fake = await FakeKubernetesApi(token=TOKEN, namespace=NAMESPACE).start()
    fake.split_chunks = True  # events arrive split across chunks
    for name, labels in NODES.items():
        fake.put("nodes", make_node(name, labels, provider_id=f"fake://{name}"))
    fake.put("nodes", make_node("karp-spot-h", KARPENTER_SPOT, provider_id="aws:///a/i-1"))
    for name, node in PODS.items():
        fake.put("pods", make_pod(name, node, NAMESPACE))
    fake.put("pods", make_pod("web-a", "gke-spot-a", NAMESPACE, labels={"app": "web"}))
    token_file = store / "token"
    token_file.write_text(TOKEN)
    cluster = LocalCluster(
        tmp_path_factory.mktemp("kube-cluster"),
        nats_url=server.url,
        env={
            **ENV,
            "SPOTSERVE_MONITOR__KUBERNETES_API_URL": fake.url,
            "SPOTSERVE_MONITOR__KUBERNETES_TOKEN_FILE": str(token_file),
        },
    )
    nc = await connect(server.url, NatsSettings(), name="kube-tests", deadline_s=10)
    events = EventLog()
    try:
        cluster._spawn(SERVICE_MONITOR, "services.monitor", {})
        await events.start(nc)
        kv = await eventually(lambda: _bucket(nc.jetstream()), "the registry bucket")
        rig = KubeRig(fake, cluster, nc, kv, events)
        await eventually(
            lambda: discover(nc, SERVICE_MONITOR, verb="PING", window_s=0.2),
            "the monitor to answer $SRV PING",
        )
        await eventually(lambda: fake.watching("nodes") and fake.watching("pods"), "watches")
        for name in [*PODS, "web-a"]:
            if name != "exec-i1":
                await rig.register(name)
        yield rig
    finally:
        await events.stop()
        await nc.close()
        await asyncio.to_thread(cluster.stop)
        await fake.stop()
        server.stop()


async def test_node_taints_notice_exactly_the_instances_on_the_node(kube: KubeRig) -> None:
    kube.update_node("eks-spot-b", lambda n: n["spec"].update(taints=[taint(
        kubernetes.NTH_SPOT_ITN_TAINT)]))  # fmt: skip
    b1 = await kube.notice("exec-b1")
    assert b1.event.source == "kubernetes:spot-itn"
    assert b1.event.deadline is not None
    assert b1.event.deadline - b1.event.at == pytest.approx(120.0, abs=2.0)  # AWS' 2 minutes

    added = float(int(time.time()) - 5)
    kube.update_node("gke-spot-a", lambda n: n["spec"].update(taints=[taint(
        kubernetes.GKE_TERMINATION_TAINT, added_at=added)]))  # fmt: skip
    a1, a2 = await kube.notice("exec-a1"), await kube.notice("exec-a2")
    for seen in (a1, a2):
        assert seen.event.source == "kubernetes:impending-node-termination"
        # 30 s from the taint's timeAdded, not from when the monitor saw it.
        assert seen.event.deadline == pytest.approx(added + 30.0, abs=0.5)
    # The node's other pod is no executor (the label selector), the other nodes are untouched.
    assert kube.noticed() == {"exec-b1", "exec-a1", "exec-a2"}

    # The same node changing again (a label): folded, nothing new.
    kube.update_node("gke-spot-a", lambda n: n["metadata"]["labels"].update(seen="again"))
    kube.update_node("eks-spot-b", lambda n: n["metadata"]["labels"].update(seen="again"))
    # A barrier on the same stream: a later node change that does publish.
    kube.update_node("eks-spot-j", lambda n: n["spec"].update(taints=[taint(
        kubernetes.NTH_SPOT_ITN_TAINT)]))  # fmt: skip
    await kube.notice("exec-j1")
    for name in ("exec-a1", "exec-a2", "exec-b1"):
        assert len(kube.events.of(name, "preempt-notice")) == 1, name


async def test_pod_disruption_target_uses_the_deletion_deadline(kube: KubeRig) -> None:
    now = time.time()
    deadline = float(int(now) + 20)

    def shutting_down(pod: dict[str, Any]) -> None:
        pod["status"]["conditions"].append(disruption("TerminationByKubelet", now))
        pod["metadata"]["deletionTimestamp"] = rfc3339(deadline)
        pod["metadata"]["deletionGracePeriodSeconds"] = 20

    kube.update_pod("exec-c1", shutting_down)
    c1 = await kube.notice("exec-c1")
    assert c1.event.source == "kubernetes:TerminationByKubelet"
    assert c1.event.deadline == pytest.approx(deadline, abs=0.5)


async def test_rollouts_publish_no_notice(kube: KubeRig) -> None:
    now = time.time()
    # A ReplicaSet scale-down: the pod is deleted (terminating, then gone).
    kube.update_pod(
        "exec-c2", lambda pod: pod["metadata"].update(deletionTimestamp=rfc3339(now + 30))
    )
    kube.fake.delete("pods", "exec-c2")

    # A drain of the on-demand node: an eviction.
    def evicted(pod: dict[str, Any]) -> None:
        pod["status"]["conditions"].append(disruption("EvictionByEvictionAPI", now))
        pod["metadata"]["deletionTimestamp"] = rfc3339(now + 30)

    kube.update_pod("exec-c3", evicted)
    # A barrier on the same stream: the taint manager deletes c4 (30 s grace by its spec).
    lt = float(int(now))
    kube.update_pod(
        "exec-c4",
        lambda pod: pod["status"]["conditions"].append(disruption("DeletionByTaintManager", lt)),
    )
    c4 = await kube.notice("exec-c4")
    assert c4.event.source == "kubernetes:DeletionByTaintManager"
    assert c4.event.deadline == pytest.approx(lt + 30.0, abs=0.5)
    assert kube.events.of("exec-c2", "preempt-notice") == []
    assert kube.events.of("exec-c3", "preempt-notice") == []
    await eventually(lambda: kube.log("kubernetes.rollout", pod="exec-c2"), "c2's rollout log")
    (c2,) = kube.log("kubernetes.rollout", pod="exec-c2")
    (c3,) = kube.log("kubernetes.rollout", pod="exec-c3")
    assert (c2["reason"], c3["reason"]) == ("deleted", "EvictionByEvictionAPI")


async def test_aks_drain_of_a_spot_node_and_an_earlier_deadline(kube: KubeRig) -> None:
    def auto_drain(node: dict[str, Any]) -> None:
        node["spec"]["unschedulable"] = True
        node["spec"]["taints"] = [
            taint(kubernetes.UNSCHEDULABLE_TAINT),
            taint("remediator.kubernetes.azure.com/unschedulable"),
        ]

    kube.update_node("aks-spot-e", auto_drain)
    first = await kube.notice("exec-e1")
    assert first.event.source == "kubernetes:aks-spot-eviction"
    assert first.event.deadline is not None
    assert first.event.deadline - first.event.at == pytest.approx(30.0, abs=2.0)
    # Then the drain evicts the pod with 8 s: an earlier deadline updates the notice.
    evicted_at = time.time()
    sooner = float(int(evicted_at) + 8)

    def evicted(pod: dict[str, Any]) -> None:
        pod["status"]["conditions"].append(disruption("EvictionByEvictionAPI", evicted_at))
        pod["metadata"]["deletionTimestamp"] = rfc3339(sooner)

    kube.update_pod("exec-e1", evicted)
    second = await kube.notice("exec-e1", index=1)
    assert second.event.deadline == pytest.approx(sooner, abs=0.5)
    assert second.event.deadline < first.event.deadline


async def test_a_410_mid_stream_lists_again(kube: KubeRig) -> None:
    lists = kube.fake.lists("nodes")
    kube.fake.expire("nodes")
    # Changed while the watch is gone: only the new list can tell.
    kube.update_node("gke-spot-f", lambda n: n["spec"].update(unschedulable=True))
    f1 = await kube.notice("exec-f1")
    assert f1.event.source == "kubernetes:spot-cordon"
    assert f1.event.deadline is not None
    assert f1.event.deadline - f1.event.at == pytest.approx(30.0, abs=2.0)  # GCP's 30 s
    assert kube.fake.lists("nodes") == lists + 1
    assert kube.log("kubernetes.relist", resource="nodes")


async def test_a_dropped_connection_resumes_from_the_last_version(kube: KubeRig) -> None:
    lists = kube.fake.lists("pods")
    version = kube.fake.last_event_version["pods"]
    watches = len(kube.fake.watch_requests("pods"))
    kube.fake.drop("pods")
    lt = float(int(time.time()))
    kube.update_pod(
        "exec-g1",
        lambda pod: pod["status"]["conditions"].append(disruption("TerminationByKubelet", lt)),
    )
    g1 = await kube.notice("exec-g1")
    assert g1.event.deadline == pytest.approx(lt + 15.0, abs=0.5)
    assert kube.fake.watch_requests("pods")[watches].query["resourceVersion"] == str(version)
    assert kube.fake.lists("pods") == lists


async def test_a_watch_that_ends_resumes_from_the_bookmark(kube: KubeRig) -> None:
    await eventually(lambda: kube.fake.watching("nodes"), "the nodes watch")
    lists = kube.fake.lists("nodes")

    # A rebalance recommendation, and NTH's cordon with it: no notice (not a reclaim).
    def rebalance(node: dict[str, Any]) -> None:
        node["spec"]["unschedulable"] = True
        node["spec"]["taints"] = [taint("aws-node-termination-handler/rebalance-recommendation")]

    kube.update_node("karp-spot-h", rebalance)
    # Versions move on elsewhere (a pod that is no executor).
    kube.fake.put("pods", make_pod("unrelated", "elsewhere", NAMESPACE, labels={"app": "x"}))
    bookmark = kube.fake.bookmark("nodes")
    watches = len(kube.fake.watch_requests("nodes"))
    kube.fake.end_watches("nodes")  # as at timeoutSeconds
    await eventually(lambda: len(kube.fake.watch_requests("nodes")) > watches, "a new watch")
    assert kube.fake.watch_requests("nodes")[watches].query["resourceVersion"] == bookmark
    assert kube.fake.lists("nodes") == lists
    # Then the interruption itself, on the Karpenter spot node.
    kube.update_node(
        "karp-spot-h", lambda n: n["spec"]["taints"].append(taint(kubernetes.NTH_SPOT_ITN_TAINT))
    )
    h1 = await kube.notice("exec-h1")
    assert h1.event.source == "kubernetes:spot-itn"
    assert h1.event.deadline is not None
    assert h1.event.deadline - h1.event.at == pytest.approx(120.0, abs=2.0)
    assert len(kube.events.of("exec-h1", "preempt-notice")) == 1


async def test_malformed_events_are_skipped(kube: KubeRig) -> None:
    lists = kube.fake.lists("pods")
    await eventually(lambda: kube.fake.watching("pods"), "the pods watch")
    kube.fake.garbage("pods", b"{not json")
    kube.fake.garbage("pods", b'{"type": "MODIFIED", "object": {"metadata": {"name": 3}}}')
    # A node the watch knows nothing about, and an executor pod with a broken status.
    kube.fake.put("pods", {**make_pod("exec-x", "nowhere", NAMESPACE), "status": "broken"})
    kube.update_pod("exec-a1", lambda pod: pod["metadata"].update(deletionTimestamp="not a time"))
    now = time.time()

    def shutting_down(pod: dict[str, Any]) -> None:
        pod["status"]["conditions"].append(disruption("TerminationByKubelet", now))
        pod["metadata"]["deletionTimestamp"] = rfc3339(now + 9)

    kube.update_pod("exec-m1", shutting_down)
    m1 = await kube.notice("exec-m1")
    assert m1.event.deadline == pytest.approx(float(int(now + 9)), abs=0.5)
    assert kube.fake.lists("pods") == lists
    assert len(kube.log("kubernetes.malformed_event", resource="pods")) == 2


async def test_an_instance_registered_after_the_taint_gets_its_notice(kube: KubeRig) -> None:
    added = float(int(time.time()) - 3)
    kube.update_node("eks-spot-i", lambda n: n["spec"].update(taints=[taint(
        kubernetes.NTH_SPOT_ITN_TAINT, added_at=added)]))  # fmt: skip
    await eventually(lambda: kube.log("kubernetes.preemption", pod="exec-i1"), "the taint seen")
    assert kube.events.of("exec-i1") == []
    await kube.register("exec-i1")
    i1 = await kube.notice("exec-i1")
    assert i1.event.deadline == pytest.approx(added + 120.0, abs=0.5)


async def test_every_request_carried_the_token_and_the_monitor_stops_cleanly(
    kube: KubeRig,
) -> None:
    assert kube.fake.requests and kube.fake.unauthorized == 0
    assert {(r.resource, r.watch) for r in kube.fake.requests} == {
        ("nodes", False),
        ("nodes", True),
        ("pods", False),
        ("pods", True),
    }
    pod_queries = [r.query for r in kube.fake.requests if r.resource == "pods"]
    assert all(q["labelSelector"] == "app.kubernetes.io/component=executor" for q in pod_queries)
    # Every executor noticed once, but those whose deadline moved earlier.
    for name in PODS:
        expected = 2 if name == "exec-e1" else 1
        if name in ("exec-c2", "exec-c3"):
            expected = 0
        assert len(kube.events.of(name, "preempt-notice")) == expected, name
    assert kube.events.of("web-a", "preempt-notice") == []
    monitor = kube.cluster.find("monitor")
    monitor.terminate()
    await asyncio.to_thread(monitor.wait, 60)
    assert monitor.process is not None and monitor.process.returncode == 0
    assert kube.log("service.stopped")
    for bad in ("task.died", "kubernetes.handler_failed", "kubernetes.watch_crashed"):
        assert kube.log(bad) == [], bad
