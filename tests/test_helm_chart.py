"""The Helm chart (deploy/helm/spotserve) and the NATS values (deploy/nats/values.yaml), offline.

1. The chart is rendered with Helm's own engine (``helm_python``: Helm's Go SDK, no cluster)
   for its default values and for ``examples/gpu-spot.yaml``; every rendered manifest is
   validated with ``kubernetes_validate`` in strict mode (unknown fields fail) against
   Kubernetes ``KUBE_VERSION``. The one custom resource, the ServiceMonitor, has no schema
   there: it is checked against the small schema below instead.
2. Behaviour: the expected objects exist; executor pods carry the executor label, take their
   instance id from the pod name and their SIGTERM grace from terminationGracePeriodSeconds;
   every SPOTSERVE_ variable the chart sets is a real setting of shared/config.py and parses;
   no container runs as root; probes run ``spotserve health``; each container mounts its own
   NATS password.
3. Wrong values fail the render with a message that names the value (values.schema.json, or
   the chart's own checks for rules across fields), and ``helm lint --strict`` finds nothing.
4. deploy/nats/values.yaml (for the official ``nats`` chart, not rendered here): its users and
   permissions are exactly shared/security.py's, and the nats.conf the official chart builds
   from it (reproduced here: its config.yaml skeleton for these values, the ``config.merge``
   block merged over it, written as JSON with ``<< ... >>`` unquoted, as the chart's
   ``nats.formatConfig`` does) passes ``nats-server -t``; one server started from it (less
   its cluster block) lets every service user in with the password file `spotserve security
   init` wrote, the server having read the same passwords, quoted, from its environment.

``python -m tests.test_helm_chart`` prints the rendered objects per kind for both value sets.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from shared.bus import NatsAuthError, connect
from shared.config import NatsSettings, Settings
from shared.health import service_name
from shared.natsserver import MAX_PAYLOAD_BYTES, EmbeddedNatsServer, find_nats_server
from shared.security import ALL_USERS, SERVICE_USERS, init_credentials, permissions

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "spotserve"
GPU_SPOT = CHART / "examples" / "gpu-spot.yaml"
NATS_VALUES = ROOT / "deploy" / "nats" / "values.yaml"
KUBE_VERSION = "1.33.0"
RELEASE = "spotserve"
NAMESPACE = "spotserve"

CONTROL_PLANE = ("admission", "scheduler", "planner", "monitor", "gateway")
# Containers without probes, and why.
NO_PROBES = {
    "agent": "the metadata agent outlives every metadata or NATS error and serves no $SRV"
    " endpoint of its own",
}
# Custom resources kubernetes_validate has no schema for: checked against these instead.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    },
}
CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}

VALUE_SETS = {"default": None, "gpu-spot": GPU_SPOT}


# --- rendering ----------------------------------------------------------------------------


def chart_defaults() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return values


def values_of(name: str) -> dict[str, Any]:
    """The values a value set renders with: the chart's defaults, overridden by its file."""
    path = VALUE_SETS[name]
    override = yaml.safe_load(path.read_text(encoding="utf-8")) if path else {}
    return merged(chart_defaults(), override)


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values: maps merge key by key, anything else is replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(CHART)
    try:
        rendered = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE)
    finally:
        chart.close()
    documents = []
    for path in sorted(rendered):
        for document in yaml.safe_load_all(rendered[path]):
            if document:
                documents.append(document)
    return documents


@functools.cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    path = VALUE_SETS[name]
    values = yaml.safe_load(path.read_text(encoding="utf-8")) if path else None
    return tuple(render(values))


def kind_counts(name: str) -> dict[str, int]:
    return dict(sorted(Counter(document["kind"] for document in rendered(name)).items()))


def objects(name: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in rendered(name) if d["kind"] == kind}


def pod_templates(name: str) -> dict[str, dict[str, Any]]:
    """Workload name -> its pod template."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in rendered(name)
        if d["kind"] in ("Deployment", "DaemonSet")
    }


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """Name -> value, or the fieldRef path of a value taken from the pod."""
    result: dict[str, Any] = {}
    for item in container.get("env", []):
        if "value" in item:
            result[item["name"]] = item["value"]
        else:
            result[item["name"]] = {"fieldRef": item["valueFrom"]["fieldRef"]["fieldPath"]}
    return result


def container(template: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in template["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def volume(template: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in template["spec"]["volumes"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def find_mount(container_spec: dict[str, Any], name: str) -> dict[str, Any] | None:
    found = [m for m in container_spec.get("volumeMounts", []) if m["name"] == name]
    return found[0] if found else None


def mount(container_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = find_mount(container_spec, name)
    assert found is not None, (container_spec["name"], name)
    return found


def executor_templates(name: str) -> dict[str, dict[str, Any]]:
    """Pool name -> the pod template of its executor Deployment."""
    return {
        d["spec"]["template"]["metadata"]["labels"]["spotserve.io/pool"]: d["spec"]["template"]
        for d in rendered(name)
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "executor"
    }


# --- 1. validation against the Kubernetes API schemas --------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_validates_strictly(value_set: str) -> None:
    checked: Counter[str] = Counter()
    for document in rendered(value_set):
        custom = CUSTOM_SCHEMAS.get((document["apiVersion"], document["kind"]))
        if custom is not None:
            jsonschema.Draft7Validator(custom).validate(document)
        else:
            kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
        checked[document["kind"]] += 1
    assert sum(checked.values()) == len(rendered(value_set)) > 0


def test_custom_resource_schema_catches_mistakes() -> None:
    (monitor,) = objects("gpu-spot", "ServiceMonitor").values()
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["prot"] = "metrics"
    with pytest.raises(jsonschema.ValidationError, match="prot"):
        jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA).validate(broken)


def test_expected_objects_exist() -> None:
    deployments = {f"{RELEASE}-{c}" for c in CONTROL_PLANE}
    assert set(objects("default", "Deployment")) == deployments | {
        f"{RELEASE}-executor-spot",
        f"{RELEASE}-executor-on-demand",
    }
    assert set(objects("gpu-spot", "Deployment")) == deployments | {
        f"{RELEASE}-executor-gpu-spot",
        f"{RELEASE}-executor-gpu-on-demand",
    }
    # The loader: sidecars by default, a DaemonSet in the example.
    assert objects("default", "DaemonSet") == {}
    assert set(objects("gpu-spot", "DaemonSet")) == {f"{RELEASE}-loader"}
    # Control-plane PDBs, plus the on-demand pool's; none for the spot pools.
    control_pdbs = {f"{RELEASE}-{c}" for c in CONTROL_PLANE}
    assert set(objects("default", "PodDisruptionBudget")) == control_pdbs | {
        f"{RELEASE}-executor-on-demand"
    }
    assert set(objects("gpu-spot", "PodDisruptionBudget")) == control_pdbs | {
        f"{RELEASE}-executor-gpu-on-demand"
    }
    # Metrics: annotations by default, a ServiceMonitor on request.
    assert objects("default", "ServiceMonitor") == {}
    assert set(objects("gpu-spot", "ServiceMonitor")) == {RELEASE}
    assert set(objects("gpu-spot", "Service")) == {f"{RELEASE}-gateway", f"{RELEASE}-metrics"}


def test_gateway_service_and_shutdown() -> None:
    service = objects("default", "Service")[f"{RELEASE}-gateway"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    template = pod_templates("default")[f"{RELEASE}-gateway"]
    gateway = container(template, "gateway")
    assert {"name": "http", "containerPort": 8000} in gateway["ports"]
    assert gateway["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    # preStop sleep + the gateway's own 15 s wait for open streams fit in the grace period.
    assert template["spec"]["terminationGracePeriodSeconds"] >= 5 + 15
    env = env_of(gateway)
    assert env["SPOTSERVE_GATEWAY__HOST"] == "0.0.0.0"
    assert env["SPOTSERVE_GATEWAY__PORT"] == "8000"
    # The example requires an API key from a Secret.
    example = container(pod_templates("gpu-spot")[f"{RELEASE}-gateway"], "gateway")
    assert env_of(example)["SPOTSERVE_GATEWAY__API_KEY_FILE"] == (
        "/var/run/spotserve/gateway/api-key"
    )


# --- 2. behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_executor_pools(value_set: str) -> None:
    values = values_of(value_set)
    executors = values["executors"]
    margin = executors["terminationMarginSeconds"]
    templates = executor_templates(value_set)
    assert set(templates) == {pool["name"] for pool in executors["pools"]}
    deployments = objects(value_set, "Deployment")
    for pool in executors["pools"]:
        template = templates[pool["name"]]
        deployment = deployments[f"{RELEASE}-executor-{pool['name']}"]
        assert deployment["spec"]["replicas"] == pool["replicas"]
        labels = template["metadata"]["labels"]
        # The monitor's Kubernetes watch selects executor pods by this label.
        assert labels["app.kubernetes.io/component"] == "executor"
        assert labels["spotserve.io/pool"] == pool["name"]
        spec = template["spec"]
        grace = pool["terminationGracePeriodSeconds"]
        assert spec["terminationGracePeriodSeconds"] == grace
        for key in ("nodeSelector", "tolerations", "affinity"):
            assert spec.get(key) == (pool.get(key) or None), (pool["name"], key)
        executor = container(template, "executor")
        assert executor["resources"] == pool.get("resources", {})
        env = env_of(executor)
        assert env["SPOTSERVE_EXECUTOR__INSTANCE_ID"] == {"fieldRef": "metadata.name"}
        assert float(env["SPOTSERVE_EXECUTOR__TERMINATION_GRACE_S"]) == grace
        assert float(env["SPOTSERVE_EXECUTOR__TERMINATION_MARGIN_S"]) == margin
        assert env["SPOTSERVE_MONITOR__PRICE_CLASS"] == pool["priceClass"]
        for name, value in pool.get("env", {}).items():
            assert env[name] == value
        # The preStop notice: the same instance, the same deadline, bounded in time.
        command = executor["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        words = command[2].split()
        assert words[words.index("preempt") + 1] == '"$SPOTSERVE_EXECUTOR__INSTANCE_ID"'
        assert float(words[words.index("--grace") + 1]) == grace - margin
        assert float(words[words.index("--timeout") + 1]) < margin
        # /dev/shm in memory; the model read-only.
        assert volume(template, "dshm")["emptyDir"]["medium"] == "Memory"
        assert mount(executor, "dshm") == {"name": "dshm", "mountPath": "/dev/shm"}
        assert mount(executor, "model")["readOnly"] is True
        # The metadata agent rides along in spot pools only, when enabled.
        names = {c["name"] for c in spec["containers"]}
        expect_agent = values["agents"]["enabled"] and pool["priceClass"] == "spot"
        assert ("agent" in names) == expect_agent
        if expect_agent:
            agent = container(template, "agent")
            assert agent["command"][:5] == [
                "python",
                "-m",
                "services.monitor",
                "agent",
                "--provider",
            ]
            assert agent["command"][5] == values["agents"]["provider"]
            assert env_of(agent)["SPOTSERVE_EXECUTOR__INSTANCE_ID"] == {"fieldRef": "metadata.name"}


def test_a_pool_needs_only_its_required_fields() -> None:
    minimal = {"name": "small", "priceClass": "spot", "replicas": 0}
    minimal["terminationGracePeriodSeconds"] = 15
    documents = render({"executors": {"pools": [minimal]}})
    (deployment,) = [d for d in documents if d["metadata"]["name"] == f"{RELEASE}-executor-small"]
    for document in documents:
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
    executor = container(deployment["spec"]["template"], "executor")
    assert env_of(executor)["SPOTSERVE_EXECUTOR__TERMINATION_GRACE_S"] == "15"


def test_gpu_example_requests_gpus() -> None:
    for pool, template in executor_templates("gpu-spot").items():
        executor = container(template, "executor")
        assert executor["resources"]["limits"]["nvidia.com/gpu"] == 1, pool
        assert env_of(executor)["SPOTSERVE_EXECUTOR__DEVICE"] == "cuda"


def test_loader_sidecar_and_daemonset() -> None:
    # Sidecar (default): the loader shares the pod's model volume and /dev/shm, and both
    # containers name the loader after the pod (two executor pods may share a node).
    for template in executor_templates("default").values():
        loader = container(template, "loader")
        executor = container(template, "executor")
        assert env_of(loader)["SPOTSERVE_LOADER__NODE"] == {"fieldRef": "metadata.name"}
        assert env_of(executor)["SPOTSERVE_LOADER__NODE"] == {"fieldRef": "metadata.name"}
        assert int(env_of(loader)["SPOTSERVE_LOADER__HOST_POOL_BYTES"]) == 1073741824
        assert mount(loader, "model")["readOnly"] is False
        assert mount(loader, "dshm")["mountPath"] == "/dev/shm"
    # DaemonSet: one loader per executor node, named after the node, as the executors ask it.
    values = values_of("gpu-spot")
    (daemonset,) = objects("gpu-spot", "DaemonSet").values()
    template = daemonset["spec"]["template"]
    assert template["spec"]["nodeSelector"] == values["loader"]["nodeSelector"]
    assert template["spec"]["tolerations"] == values["loader"]["tolerations"]
    loader = container(template, "loader")
    env = env_of(loader)
    assert env["SPOTSERVE_LOADER__NODE"] == {"fieldRef": "spec.nodeName"}
    assert env["SPOTSERVE_LOADER__HOST_POOL_BYTES"] == "0"
    assert env["SPOTSERVE_LOADER__MODELS_DIR"] == mount(loader, "model")["mountPath"]
    for executor_template in executor_templates("gpu-spot").values():
        assert {c["name"] for c in executor_template["spec"]["containers"]} >= {"executor"}
        assert "loader" not in {c["name"] for c in executor_template["spec"]["containers"]}
        executor_env = env_of(container(executor_template, "executor"))
        assert executor_env["SPOTSERVE_LOADER__NODE"] == {"fieldRef": "spec.nodeName"}


def test_model_volume() -> None:
    # Default: the embedded model in each pod's SPOTSERVE_HOME; control-plane pods mount no
    # model volume.
    for component in CONTROL_PLANE:
        template = pod_templates("default")[f"{RELEASE}-{component}"]
        assert "model" not in {v["name"] for v in template["spec"]["volumes"]}
    # The example: a claim, read-only everywhere but in the loader, at
    # $SPOTSERVE_HOME/checkpoints; the monitor reads no model.
    values = values_of("gpu-spot")
    for workload, template in pod_templates("gpu-spot").items():
        if workload == f"{RELEASE}-monitor":
            assert "model" not in {v["name"] for v in template["spec"]["volumes"]}
            continue
        claim = volume(template, "model")["persistentVolumeClaim"]["claimName"]
        assert claim == values["model"]["volume"]["claimName"]
        for spec in template["spec"]["containers"]:
            found = find_mount(spec, "model")
            if found is None:
                assert spec["name"] == "agent", workload
                continue
            assert found["mountPath"] == "/var/lib/spotserve/checkpoints"
            assert found["readOnly"] is (spec["name"] != "loader"), workload
            if spec["name"] in ("admission", "scheduler", "planner", "gateway", "executor"):
                assert env_of(spec)["SPOTSERVE_MODEL__PATH"] == (
                    f"/var/lib/spotserve/checkpoints/{values['model']['path']}"
                )


def test_monitor_watches_kubernetes_with_read_only_rbac() -> None:
    template = pod_templates("default")[f"{RELEASE}-monitor"]
    env = env_of(container(template, "monitor"))
    assert env["SPOTSERVE_MONITOR__LOCAL_PROVIDER"] == "false"
    assert env["SPOTSERVE_MONITOR__KUBERNETES"] == "true"
    assert "app.kubernetes.io/component=executor" in env[
        "SPOTSERVE_MONITOR__KUBERNETES_EXECUTOR_SELECTOR"
    ].split(",")
    account = f"{RELEASE}-monitor"
    assert template["spec"]["serviceAccountName"] == account
    assert template["spec"]["automountServiceAccountToken"] is True
    assert set(objects("default", "ServiceAccount")) == {account}
    (cluster_role,) = objects("default", "ClusterRole").values()
    (role,) = objects("default", "Role").values()
    read = ["get", "list", "watch"]
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": read}]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": read}]
    (cluster_binding,) = objects("default", "ClusterRoleBinding").values()
    (binding,) = objects("default", "RoleBinding").values()
    for bound, granted in ((cluster_binding, cluster_role), (binding, role)):
        assert bound["roleRef"]["kind"] == granted["kind"]
        assert bound["roleRef"]["name"] == granted["metadata"]["name"]
        assert bound["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
    # Every other pod runs without a Kubernetes API token.
    for workload, other in pod_templates("gpu-spot").items():
        if workload != f"{RELEASE}-monitor":
            assert other["spec"]["automountServiceAccountToken"] is False, workload


def setting_exists(name: str) -> bool:
    """Whether SPOTSERVE_A__B names a field of shared.config.Settings (SPOTSERVE_HOME is read
    by shared.config.spotserve_home)."""
    if name == "SPOTSERVE_HOME":
        return True
    model: type[BaseModel] = Settings
    parts = name.removeprefix("SPOTSERVE_").lower().split("__")
    for index, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if index < len(parts) - 1:
            annotation = field.annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_spotserve_environment_is_real_settings(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod_values = {"metadata.name": "spotserve-executor-spot-7d9f8-abcde", "spec.nodeName": "n1"}
    for workload, template in pod_templates(value_set).items():
        for spec in template["spec"]["containers"]:
            env = env_of(spec)
            unknown = [n for n in env if n.startswith("SPOTSERVE_") and not setting_exists(n)]
            assert not unknown, (workload, spec["name"], unknown)
            with monkeypatch.context() as patch:
                for name in list(os.environ):
                    if name.startswith("SPOTSERVE_"):
                        patch.delenv(name)
                for name, value in env.items():
                    if isinstance(value, dict):
                        value = pod_values[value["fieldRef"]]
                    patch.setenv(name, value)
                settings = Settings()  # raises on a value that does not parse
            assert settings.nats.user == env["SPOTSERVE_NATS__USER"]
            assert settings.nats.replicas == values_of(value_set)["nats"]["replicas"]
            assert settings.metrics.host == "0.0.0.0"
            if spec["name"] == "executor":
                assert settings.executor.instance_id == pod_values["metadata.name"]
                assert (
                    settings.executor.termination_grace_s
                    == (template["spec"]["terminationGracePeriodSeconds"])
                )


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_commands_name_real_services(value_set: str) -> None:
    for template in pod_templates(value_set).values():
        for spec in template["spec"]["containers"]:
            command = spec["command"]
            assert command[:2] == ["python", "-m"], spec["name"]
            assert importlib.util.find_spec(command[2]) is not None, command


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_container_runs_as_root(value_set: str) -> None:
    for workload, template in pod_templates(value_set).items():
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True, workload
        assert pod.get("runAsUser", 1) != 0, workload
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        for spec in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            context = spec["securityContext"]
            assert context.get("runAsUser", 1) != 0, (workload, spec["name"])
            assert context.get("runAsNonRoot", True) is True, (workload, spec["name"])
            assert context["allowPrivilegeEscalation"] is False, (workload, spec["name"])
            assert context.get("privileged", False) is False, (workload, spec["name"])
            assert context["readOnlyRootFilesystem"] is True, (workload, spec["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (workload, spec["name"])
            # A read-only root: /tmp and SPOTSERVE_HOME are emptyDir volumes.
            assert mount(spec, "tmp")["mountPath"] == "/tmp"
            assert mount(spec, "home")["mountPath"] == "/var/lib/spotserve"
            assert "emptyDir" in volume(template, "tmp")
            assert "emptyDir" in volume(template, "home")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_probes_run_spotserve_health(value_set: str) -> None:
    for workload, template in pod_templates(value_set).items():
        for spec in template["spec"]["containers"]:
            name = spec["name"]
            if name in NO_PROBES:
                assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(spec)
                continue
            service = service_name(name).removeprefix("spotserve-")  # a known service
            expected = f"spotserve health {service}"
            if name in ("executor", "loader"):
                expected += " --this-node"
            for probe in ("startupProbe", "livenessProbe"):
                command = spec[probe]["exec"]["command"]
                assert command[:2] == ["sh", "-c"], (workload, name, probe)
                assert command[2].startswith(expected), (workload, name, probe)
            # Liveness ignores an unreachable NATS (exit 2): only "no answer" restarts.
            assert spec["livenessProbe"]["exec"]["command"][2] == f"{expected}; test $? -ne 1"
            readiness = spec["readinessProbe"]
            if name == "gateway":
                assert readiness["tcpSocket"] == {"port": "http"}
            else:
                assert readiness["exec"]["command"] == ["sh", "-c", expected]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_each_container_mounts_its_own_nats_password(value_set: str) -> None:
    values = values_of(value_set)
    for workload, template in pod_templates(value_set).items():
        secret = volume(template, "nats-credentials")["secret"]
        assert secret["secretName"] == values["nats"]["credentialsSecret"]
        keys = {item["key"] for item in secret["items"]}
        assert keys <= set(ALL_USERS), workload
        users = set()
        for spec in template["spec"]["containers"]:
            env = env_of(spec)
            user = env["SPOTSERVE_NATS__USER"]
            users.add(user)
            assert user in SERVICE_USERS, (workload, spec["name"])
            assert env["SPOTSERVE_NATS__URL"] == values["nats"]["url"]
            directory = mount(spec, "nats-credentials")
            assert directory["readOnly"] is True
            assert env["SPOTSERVE_NATS__PASSWORD_FILE"] == f"{directory['mountPath']}/{user}"
        # Only the keys its containers use (plus the notice user's, for the preStop hook).
        assert keys - users <= {values["executors"]["noticeNatsUser"]}, workload


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_metrics_annotations_match_ports(value_set: str) -> None:
    for workload, template in pod_templates(value_set).items():
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        ports = {
            port["name"]: port["containerPort"]
            for spec in template["spec"]["containers"]
            for port in spec.get("ports", [])
        }
        assert ports["metrics"] == int(annotations["prometheus.io/port"]), workload
        # Containers of one pod never share a metrics port.
        assert len(set(ports.values())) == len(ports), workload


# --- 3. wrong values, lint -------------------------------------------------------------------


def pools_with(**changes: Any) -> dict[str, Any]:
    executors = chart_defaults()["executors"]
    executors["pools"][0].update(changes)
    return {"executors": executors}


WRONG_VALUES = {
    "unknown price class": (
        pools_with(priceClass="preemptible"),
        r"/executors/pools/0/priceClass.*one of 'spot', 'on-demand'",
    ),
    "negative replicas": (pools_with(replicas=-1), r"/executors/pools/0/replicas.*minimum"),
    "grace not above the margin": (
        pools_with(terminationGracePeriodSeconds=2),
        r"terminationGracePeriodSeconds \(2\) must be greater than "
        r"executors.terminationMarginSeconds \(2\)",
    ),
    "numeric image tag": ({"image": {"tag": 1.2}}, r"/image/tag.*want string"),
    "misspelled key": ({"gatway": {"replicas": 2}}, r"additional properties 'gatway'"),
    "pod pool name": (pools_with(name="Spot_Pool"), r"/executors/pools/0/name"),
    "preStop longer than the margin": (
        {"executors": {"preStop": {"timeoutSeconds": 5}}},
        r"preStop.timeoutSeconds \(5\) must be less than",
    ),
    "daemonset loader on an emptyDir": (
        {"loader": {"mode": "daemonset"}},
        r"loader.mode daemonset needs model.volume.type hostPath or persistentVolumeClaim",
    ),
    "model path on an emptyDir": ({"model": {"path": "llama"}}, r"model.path names a directory"),
    "claim without a name": (
        {"model": {"volume": {"type": "persistentVolumeClaim"}}},
        r"/model/volume/claimName",
    ),
    "not a NATS URL": ({"nats": {"url": "http://nats:4222"}}, r"/nats/url"),
    "root allowed": ({"podSecurityContext": {"runAsNonRoot": False}}, r"runAsNonRoot"),
    "unknown cloud": ({"agents": {"provider": "ibm"}}, r"/agents/provider"),
}


@pytest.mark.parametrize("case", WRONG_VALUES)
def test_wrong_values_fail_with_a_clear_message(case: str) -> None:
    values, message = WRONG_VALUES[case]
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)


def test_duplicate_pool_names_fail() -> None:
    executors = chart_defaults()["executors"]
    executors["pools"][1]["name"] = executors["pools"][0]["name"]
    with pytest.raises(helm_python.HelmError, match=r'pool name "spot" is used twice'):
        render({"executors": executors})


def test_schema_accepts_the_shipped_values() -> None:
    chart = helm_python.Chart.load(CHART)
    try:
        for name in VALUE_SETS:
            chart.validate_schema(values_of(name))
        with pytest.raises(helm_python.HelmValuesError, match="priceClass"):
            chart.validate_schema(merged(chart_defaults(), pools_with(priceClass="spot ")))
    finally:
        chart.close()


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict(value_set: str) -> None:
    values = values_of(value_set) if VALUE_SETS[value_set] else None
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- 4. the NATS release's values --------------------------------------------------------------


def nats_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(NATS_VALUES.read_text(encoding="utf-8"))
    return values


def password_variable(user: str) -> str:
    return "PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user.upper())


def test_nats_users_are_those_of_shared_security() -> None:
    users = nats_values()["config"]["merge"]["authorization"]["users"]
    assert [entry["user"] for entry in users] == list(ALL_USERS)
    for entry in users:
        allowed = permissions(entry["user"])
        assert entry["permissions"] == {
            "publish": {"allow": allowed.publish},
            "subscribe": {"allow": allowed.subscribe},
        }, entry["user"]
        assert set(entry) == {"user", "password", "permissions"}
        assert entry["password"] == f"<< ${password_variable(entry['user'])} >>"


def test_nats_release_shape() -> None:
    values = nats_values()
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    jetstream = config["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    assert config["merge"]["max_payload"] == MAX_PAYLOAD_BYTES
    # Every password comes from one Secret, one key per user.
    env = values["container"]["env"]
    assert set(env) == {password_variable(user) for user in ALL_USERS}
    secrets = {item["valueFrom"]["secretKeyRef"]["name"] for item in env.values()}
    assert len(secrets) == 1
    for user in ALL_USERS:
        assert env[password_variable(user)]["valueFrom"]["secretKeyRef"]["key"] == user
    # Off spot nodes, spread over nodes.
    pod = values["podTemplate"]
    assert pod["topologySpreadConstraints"]["kubernetes.io/hostname"]["maxSkew"] == 1
    terms = pod["merge"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms and all(
        expression["operator"] in ("NotIn", "DoesNotExist")
        for term in terms
        for expression in term["matchExpressions"]
    )
    assert values["natsBox"]["enabled"] is False


def official_chart_document(values: dict[str, Any], release: str = "nats") -> dict[str, Any]:
    """The config the official chart builds for these values (the parts they use): its
    files/config/config.yaml, cluster.yaml and jetstream.yaml for this release name, then
    ``config.merge`` merged over them."""
    config = values["config"]
    cluster = config["cluster"]
    store = config["jetstream"]["fileStore"]
    base: dict[str, Any] = {
        "server_name": "<< $SERVER_NAME >>",
        "lame_duck_grace_period": "10s",
        "lame_duck_duration": "30s",
        "pid_file": "/var/run/nats/nats.pid",
        "port": 4222,
        "cluster": {
            "name": release,
            "port": 6222,
            "no_advertise": True,
            "routes": [
                f"nats://{release}-{index}.{release}-headless:6222"
                for index in range(cluster["replicas"])
            ],
        },
        "http_port": 8222,
        "jetstream": {
            "max_memory_store": 0,
            "store_dir": store["dir"],
            "max_file_store": f"<< {store['pvc']['size']} >>",
        },
    }
    return merged(base, config["merge"])


def format_config(document: dict[str, Any]) -> str:
    """``nats.formatConfig``: JSON, with the strings ``<< x >>`` written as ``x``."""
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)
    return re.sub(r'"<<\s+(.*?)\s+>>"', r"\1", text)


def official_chart_config(values: dict[str, Any]) -> str:
    """The nats.conf the official chart writes for these values."""
    return format_config(official_chart_document(values))


def nats_test(config: Path, passwords: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {"SERVER_NAME": "nats-0", "PATH": "/usr/bin:/bin"}
    env |= {password_variable(user): value for user, value in passwords.items()}
    return subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Passwords as `spotserve security init` draws them (secrets.token_urlsafe): some start with
# "-" or with digits and a "-", which nats-server does not parse as a string unquoted.
AWKWARD_PASSWORDS = ["-x3Qe_9Zk", "9-5fTq2w", "0123456789", "true", "plain_Password-1"]


def test_nats_config_passes_nats_server_test(tmp_path: Path) -> None:
    config = tmp_path / "nats.conf"
    config.write_text(official_chart_config(nats_values()), encoding="utf-8")
    passwords = {
        user: json.dumps(AWKWARD_PASSWORDS[index % len(AWKWARD_PASSWORDS)])  # quoted
        for index, user in enumerate(ALL_USERS)
    }
    result = nats_test(config, passwords)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr
    # The reason the Secret for the server holds quoted passwords: unquoted, these fail.
    unquoted = {user: json.loads(value) for user, value in passwords.items()}
    result = nats_test(config, unquoted)
    assert "is valid" not in result.stdout + result.stderr


class ChartConfiguredServer(EmbeddedNatsServer):
    """One server of the NATS release, run here: the official chart's config for our values
    without the cluster block (its peers' host names do not resolve here), on a free
    loopback port, its store and pid file in a temp directory."""

    def config_text(self) -> str:
        document = official_chart_document(nats_values())
        del document["cluster"], document["http_port"]
        document |= {"host": "127.0.0.1", "port": self.port}
        document["pid_file"] = str(self.store_dir / "nats.pid")
        # A small store: this machine's disk need not hold the release's PVC size.
        document["jetstream"] |= {
            "store_dir": str(self.store_dir / "jetstream"),
            "max_file_store": "<< 1Gi >>",
        }
        return format_config(document)


async def test_services_authenticate_with_the_secrets_as_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The credentials path of docs/kubernetes.md end to end: `spotserve security init`
    passwords; the server's Secret holds them quoted (its env variables), the pods' Secret
    as written (their password files); every service user connects as a pod would."""
    credentials = init_credentials(tmp_path / "secrets")
    monkeypatch.setenv("SERVER_NAME", "nats-0")
    for user in ALL_USERS:
        monkeypatch.setenv(password_variable(user), json.dumps(credentials.password(user)))
    server = ChartConfiguredServer(tmp_path / "nats")
    server.start()
    try:
        for user in SERVICE_USERS:
            settings = NatsSettings(user=user, password_file=credentials.password_file(user))
            nc = await connect(server.url, settings, name=f"test-{user}", deadline_s=30)
            await nc.close()
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-the-password\n", encoding="utf-8")
        settings = NatsSettings(user="executor", password_file=wrong)
        with pytest.raises(NatsAuthError):
            await connect(server.url, settings, name="test-wrong", deadline_s=30)
    finally:
        server.stop()


def test_nats_config_keeps_every_permission() -> None:
    """The JSON written for nats-server still holds every user's subjects, unescaped."""
    text = official_chart_config(nats_values())
    for user in ALL_USERS:
        allowed = permissions(user)
        for subject in allowed.publish + allowed.subscribe:
            assert json.dumps(subject) in text, (user, subject)
    assert f"${password_variable('operator')}," in text


if __name__ == "__main__":
    for value_set in VALUE_SETS:
        counts = kind_counts(value_set)
        sys.stdout.write(f"{value_set}: {sum(counts.values())} objects\n")
        for kind, count in counts.items():
            sys.stdout.write(f"  {kind}: {count}\n")
