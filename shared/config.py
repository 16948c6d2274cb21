"""Settings for every spotserve process: pydantic-settings, env prefix ``SPOTSERVE_``.

Nested fields use ``__``: ``SPOTSERVE_NATS__URL=nats://host:4222``,
``SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE=16``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigurationError(RuntimeError):
    """A setting or a file a service needs is missing or wrong; the message says what to do."""


def spotserve_home() -> Path:
    """Where spotserve keeps models and local state (``$SPOTSERVE_HOME``, ~/.cache/spotserve)."""
    return Path(os.environ.get("SPOTSERVE_HOME", Path.home() / ".cache" / "spotserve"))


class NatsSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description=(
            "NATS server URL, or several separated by commas (the servers of a NATS cluster);"
            " None means: the cluster recorded by `spotserve up`."
        ),
    )
    # JetStream replicas of every stream, KV bucket and object store spotserve creates: 1 on a
    # single server, 3 on a clustered JetStream (a server may then die without losing data).
    replicas: int = Field(default=1, ge=1, le=5)
    connect_timeout_s: float = 5.0
    # How long a service keeps retrying the first connection before giving up.
    connect_deadline_s: float = 60.0
    # Default timeout of request/reply calls between services.
    request_timeout_s: float = 10.0
    # This connection's NATS user (one per service, `client`, `operator`; see shared.security).
    user: str | None = None
    password: str | None = None
    # The password read from this file (e.g. a secret mounted by compose); wins over password.
    password_file: Path | None = None
    # TLS: the CA that signed the server's certificate (and a client certificate, if the
    # server asks for one). A tls:// URL, or any of these, turns TLS on.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # `spotserve up`'s embedded server authenticates (a user per service, see shared.security)
    # with passwords kept in credentials_dir (None: $SPOTSERVE_HOME/credentials).
    auth: bool = True
    credentials_dir: Path | None = None

    def resolved_password(self) -> str | None:
        if self.password_file is None:
            return self.password
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the NATS password file {self.password_file}: {exc}"
            ) from None


class ModelSettings(BaseModel):
    path: Path | None = Field(
        default=None, description="HF Llama-family directory; None: the embedded default model."
    )
    # A model in the remote store (`spotserve model push`): fetched through this node's loader.
    name: str | None = None
    fetch_timeout_s: float = Field(default=600.0, gt=0)
    size: Literal["tiny", "small"] = "tiny"
    seed: int = 0


class AdmissionSettings(BaseModel):
    # Max bytes of a request body; larger bodies are refused before parsing.
    max_request_bytes: int = 1_000_000
    publish_timeout_s: float = 5.0
    # The arrival rate (the planner's alpha): accepted requests over this window, put in the
    # load bucket every rate_interval_s.
    rate_window_s: float = Field(default=60.0, gt=0)
    rate_interval_s: float = Field(default=5.0, gt=0)
    # Overload: accepted requests not finished yet (queued or running), at most; beyond it a
    # new request is refused at once ("overloaded, retry later") instead of queueing unbounded.
    max_queued_requests: int = Field(default=1000, ge=1)
    # How often the queue length is read from JetStream (between reads it is counted here).
    queue_poll_s: float = Field(default=0.5, gt=0)


class MlfqSettings(BaseModel):
    """Skip-join MLFQ (FastServe): quantum of queue i = base_quantum_s * 2**i of iteration time."""

    num_queues: int = Field(default=8, ge=1, le=32)
    base_quantum_s: float = Field(default=0.01, gt=0)
    # A job waiting longer than this (not in any batch) is promoted back to Q0.
    starvation_s: float = Field(default=10.0, gt=0)


class AdaptiveSettings(BaseModel):
    """The adaptive policy (services.scheduler.gittins): Gittins index of attained service."""

    # Finished requests whose output lengths make the distribution (the most recent ones).
    window: int = Field(default=1000, ge=1)
    # Below this many finished requests every index is equal: first come, first served.
    min_samples: int = Field(default=20, ge=1)
    # The index table is computed again after this many more have finished.
    recompute_every: int = Field(default=32, ge=1)
    # A request older than age_factor x (1 + CV^2) / 2 x the mean service time of finished ones
    # (CV: of their output lengths), and than min_age_s, goes ahead of everything, oldest
    # first: its wait is bounded.
    age_factor: float = Field(default=4.0, gt=0)
    # A new request whose prefill costs at most this many output tokens' time runs its first
    # iteration before the others (time to first token; more costs the others mean JCT).
    first_iteration_prefill: float = Field(default=16.0, ge=0)
    min_age_s: float = Field(default=5.0, ge=0)


class SchedulerSettings(BaseModel):
    policy: Literal["fcfs", "skip-join-mlfq", "adaptive"] = "adaptive"
    mlfq: MlfqSettings = MlfqSettings()
    adaptive: AdaptiveSettings = AdaptiveSettings()
    # The prefill-time profile (`spotserve profile`); None: the default location for the model.
    profile_path: Path | None = None
    max_batch_size: int = Field(default=8, ge=1)
    # Requests held by the scheduler at once (un-acked JetStream messages); the rest wait durably.
    max_inflight_requests: int = Field(default=64, ge=1)
    step_timeout_s: float = Field(default=120.0, gt=0)
    # JetStream ack wait for accepted requests; running ones are kept alive with in-progress acks.
    ack_wait_s: float = Field(default=60.0, gt=0)
    # A pull waiting for requests expires after this: the consumer then looks at the stop signal,
    # and sends again a pull that a NATS server took with it when it went away.
    fetch_timeout_s: float = Field(default=2.0, gt=0)
    # How often the scheduler re-discovers executors through $SRV.
    discovery_interval_s: float = Field(default=2.0, gt=0)
    # A request's steps fail over this many times in a row (no token between) before it gets
    # an error reply.
    max_step_retries: int = Field(default=3, ge=0)


class ExecutorSettings(BaseModel):
    instance_id: str | None = None
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1; None: auto.")
    # Device KV budget, in sequences of the full context length (max_seq_len): the paged cache
    # holds max_slots x ceil(max_seq_len / kv_block_size) blocks, shared by sequences of any
    # length, unless kv_blocks sets the number of blocks.
    max_slots: int = Field(default=16, ge=1)
    kv_block_size: int = Field(default=16, ge=1)
    kv_blocks: int | None = Field(default=None, ge=1)
    # Host swap: offloaded KV caches kept in host memory (pinned on CUDA).
    host_kv_slots: int = Field(default=64, ge=0)
    max_seq_len: int | None = None
    torch_threads: int | None = Field(default=None, ge=1)
    # Device memory this instance registers for the planner; None: what the device has.
    device_memory_bytes: int | None = Field(default=None, ge=0)
    # Largest pipeline-stage message sent inline; larger hidden states stream through
    # shared.transfer. None: the NATS server's max payload (less room for headers).
    stage_message_bytes: int | None = Field(default=None, ge=1024)
    # A pipeline's first stage splits each iteration's batch into this many micro-batches, so
    # the stages work on different ones at once. None: one per pipeline stage.
    micro_batches: int | None = Field(default=None, ge=1)
    # Tensor-parallel degree M: this instance's local devices, one rank (process) each, all
    # holding a shard of the same layers. The planner gives such an instance roles of M = its
    # devices (set the planner's tensor_degrees to include it).
    tensor_parallel: int = Field(default=1, ge=1)
    # SIGTERM as a preemption notice (Kubernetes: the pod's terminationGracePeriodSeconds, which
    # a spot reclaim shortens to the cloud's notice): the executor announces that it is gone in
    # this many seconds less termination_margin_s, keeps serving while the planner moves its
    # requests, and exits at that deadline. None: SIGTERM is a clean stop.
    termination_grace_s: float | None = Field(default=None, ge=0, le=3600)
    # Kept back from the grace period for the exit itself (flushes, the NATS drain).
    termination_margin_s: float = Field(default=2.0, ge=0)


class LoaderSettings(BaseModel):
    # This node's name (one loader per node); None: the host name.
    node: str | None = None
    # The local-disk tier: converted models, one directory each; None: $SPOTSERVE_HOME/checkpoints.
    models_dir: Path | None = None
    # The host-memory tier: a shared-memory pool of reusable chunks (0 turns it off). Sparse:
    # memory is taken only by chunks in use. In containers, give /dev/shm room (shm_size).
    host_pool_bytes: int = Field(default=4 * 1024**3, ge=0)
    host_pool_chunk_bytes: int = Field(default=64 * 1024**2, ge=4096)
    # None: /dev/shm when writable, else $SPOTSERVE_HOME/shm.
    host_pool_dir: Path | None = None
    # A lease not given back within this time expires (an executor that died while copying).
    host_lease_s: float = Field(default=120.0, gt=0)
    # Check every partition's CRC32 when reading a model into host memory.
    verify: bool = True
    # Read uncached files into the pool with O_DIRECT (bypassing the page cache). Off by
    # default: into the pool's reused shared-memory chunks buffered reads were as fast or
    # faster on the disks we measured (bench.loading prints both).
    direct_io: bool = False


class MonitorSettings(BaseModel):
    """Fleet monitoring: the instance registry's leases, preemption notices, the local provider
    and the per-node cloud agent (``python -m services.monitor agent``)."""

    # Executors re-put their registry record this often; the monitor declares an instance lost
    # when it has seen no update for lease_s (on the monitor's own clock).
    heartbeat_s: float = Field(default=1.0, gt=0)
    lease_s: float = Field(default=5.0, gt=0)
    # How often the monitor checks leases and deadlines.
    check_interval_s: float = Field(default=0.5, gt=0)
    # Default grace period of a preemption notice that gives none (AWS and GCP: 30 s).
    grace_s: float = Field(default=30.0, ge=0, le=3600)
    # A repeated notice that moves the deadline earlier by more than this publishes an updated
    # preempt-notice; smaller moves and later deadlines are duplicates.
    deadline_update_min_s: float = Field(default=1.0, ge=0)
    # What this executor instance registers as (a child of `fleet add` gets the asked class).
    price_class: Literal["spot", "on-demand"] = "spot"
    # $/h of one instance by price class (0: unknown).
    spot_price_per_hour: float = Field(default=0.0, ge=0)
    on_demand_price_per_hour: float = Field(default=0.0, ge=0)
    # The local provider plays the cloud on this node: `fleet add` starts executor processes and
    # a preemption notice ends in SIGKILL of the instance's process at its deadline. Turn it off
    # where a real cloud takes the instances away.
    local_provider: bool = True
    # The NATS user and password file of the executors `fleet add` starts (None: the monitor's
    # own connection settings are inherited, as without authentication).
    executor_nats_user: str | None = None
    executor_nats_password_file: Path | None = None
    # Logs of the executors the monitor starts; None: $SPOTSERVE_HOME/cluster/logs.
    log_dir: Path | None = None
    # An added instance that has not registered within this time is stopped.
    join_timeout_s: float = Field(default=600.0, gt=0)
    # The per-node agent: which cloud's metadata endpoint to poll, and where it is (None: the
    # provider's link-local default). agent_instance_id None: executor.instance_id.
    agent_provider: Literal["aws", "gcp", "azure"] | None = None
    agent_url: str | None = None
    agent_instance_id: str | None = None
    # Azure: only events naming this VM (None: any Preempt event for this node's VM).
    agent_vm_name: str | None = None
    agent_poll_s: float = Field(default=2.0, gt=0)
    agent_timeout_s: float = Field(default=2.0, gt=0)
    # Watch the Kubernetes API for spot reclaims (services.monitor.kubernetes): node taints and
    # cordons, pod DisruptionTarget conditions. kubernetes_api_url None: in-cluster (the
    # service account's token and CA, KUBERNETES_SERVICE_HOST/PORT).
    kubernetes: bool = False
    kubernetes_api_url: str | None = None
    # The namespace of the executor pods (None: the monitor pod's own namespace).
    kubernetes_namespace: str | None = None
    kubernetes_executor_selector: str = "app.kubernetes.io/component=executor"
    kubernetes_token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubernetes_ca_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    # Each watch asks the API server to end it after this long (timeoutSeconds; it is then
    # resumed from the last resourceVersion); a watch silent for this long plus
    # kubernetes_timeout_s is dropped and opened again. kubernetes_timeout_s also bounds the
    # connection, a list and each read.
    kubernetes_watch_s: float = Field(default=300.0, gt=0)
    kubernetes_timeout_s: float = Field(default=10.0, gt=0)


# Dollars per instance-hour of the SpotServe paper's instance (g4dn.12xlarge): what reports
# charge for spot and on-demand time unless told other prices.
SPOT_PRICE_PER_HOUR = 1.9046
ON_DEMAND_PRICE_PER_HOUR = 3.912

# The cost model's defaults (services.planner.costmodel.search): configurations within this
# fraction of the best count as similar, and this fraction of device memory stays free.
DEFAULT_TOLERANCE = 0.05
DEFAULT_MEMORY_RESERVE_FRACTION = 0.1


class PlannerSettings(BaseModel):
    """The planner's settings: the service's configuration and the policy's (the simulator and
    the benches build their own)."""

    # The cost model's profile (`spotserve profile`); None: the default location for the model,
    # measured at start when missing.
    profile_path: Path | None = None
    # The request shape the configuration is chosen for (the SpotServe paper's 512 in / 128 out).
    input_tokens: int = Field(default=512, ge=1)
    output_tokens: int = Field(default=128, ge=1)
    max_batch: int = Field(default=4, ge=1)
    # Use every replica that fits (more throughput) instead of the fewest that meet the rate.
    fill_spare: bool = False
    # Largest pipeline degree P the planner may choose; None: any that fits. 1 by default
    # because the executors each hold the whole model, and P = 1 needs no inter-stage hops
    # over NATS (the README documents 1). Runs that replay the SpotServe paper's search over
    # every P (the simulator, the benches) ask for None explicitly.
    max_pipeline: int | None = Field(default=1, ge=1)
    # Tensor-parallel degrees the profile measures (1 always). An executor serves one group of
    # M = its tensor_parallel ranks, so an instance of M devices takes roles of that M only.
    tensor_degrees: list[int] = Field(default_factory=lambda: [1])
    # Capacity planned per request/s measured: below 1/rate_margin utilisation, queues stay
    # short (at a utilisation near 1 they grow without bound). The SpotServe artifact plans
    # for a required throughput 1.0-1.33x its arrival rates (scripts_ae/aws_e2e.sh).
    rate_margin: float = Field(default=1.2, ge=1.0)
    # Events arriving within this window become one reconfiguration.
    debounce_s: float = Field(default=0.5, gt=0)
    # Re-plan when the arrival rate moves by more than this fraction.
    rate_change: float = Field(default=0.25, gt=0)
    rate_poll_s: float = Field(default=5.0, gt=0)
    # The cost model's search (services.planner.costmodel.search).
    tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=0)
    memory_reserve_fraction: float = Field(default=DEFAULT_MEMORY_RESERVE_FRACTION, ge=0, lt=1)
    gpipe_prefill: bool = False  # t1 without the / m1 of docs/design.md's form
    # Requests join running batches one by one (spotserve's scheduler), so a request's latency
    # holds B single-sequence prefills; False: one batched prefill (the SpotServe artifact's
    # static batches).
    continuous_batching: bool = True
    keep_previous: bool = True  # keep the previous (P, M, B) while its latency is similar
    # An instance takes one tensor-parallel group of all its devices, or no role (the service
    # always plans so: that is what its executors serve).
    whole_instance_groups: bool = False
    kv_bandwidth_bytes_s: float = Field(default=1e9, gt=0)  # KV caches off a dying instance
    kv_overhead_s: float = Field(default=0.5, ge=0)  # set-up and ack of a cache hand-over

    def target_rate(self, measured_rps: float) -> float:
        """The throughput a configuration must reach for this measured arrival rate."""
        return measured_rps * self.rate_margin


class MetricsSettings(BaseModel):
    """Each service serves its Prometheus metrics (``/metrics``) on its own port."""

    enabled: bool = True
    # 127.0.0.1: scraped from this machine only; containers set 0.0.0.0 (compose.yaml).
    host: str = "127.0.0.1"
    # 0: any free port. A port already taken falls back to a free one (logged, and advertised
    # in the service's $SRV INFO metadata as ``metrics_url``), so metrics never stop a service.
    port: int = Field(default=9464, ge=0, le=65535)


class GatewaySettings(BaseModel):
    """The OpenAI-compatible HTTP gateway (``python -m services.gateway``)."""

    host: str = "127.0.0.1"
    # 0: any free port (advertised in $SRV INFO metadata as ``http_url``).
    port: int = Field(default=8000, ge=0, le=65535)
    # The model name /v1/models lists and requests must give; None: model.name, else the
    # model directory's name (the embedded default: ``spotserve-tiny``).
    model_id: str | None = Field(default=None, min_length=1, max_length=256)
    # Waits on the NATS side: the first chunk waits for the queue and the prefill.
    first_token_timeout_s: float = Field(default=300.0, gt=0)
    token_timeout_s: float = Field(default=120.0, gt=0)
    # Prompts x n of one HTTP request (each becomes one spotserve request).
    max_choices: int = Field(default=16, ge=1, le=128)
    # Generation requests served at once (each holds a connection and NATS subscriptions);
    # beyond it: 429 at once. Admission's overload bound applies cluster-wide as well.
    max_concurrent_requests: int = Field(default=1024, ge=1)
    # The fleet's status is asked at most this often (no running instance: 503 at once).
    capacity_check_s: float = Field(default=1.0, gt=0)
    # Require ``Authorization: Bearer <key>`` on /v1/* (None: open, as on 127.0.0.1 by
    # default). The key is read from api_key_file when given (e.g. a mounted secret).
    api_key: SecretStr | None = None
    api_key_file: Path | None = None

    def resolved_api_key(self) -> str | None:
        if self.api_key_file is None:
            return self.api_key.get_secret_value() if self.api_key else None
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the gateway's API key file {self.api_key_file}: {exc}"
            ) from None
        if not key:
            raise ConfigurationError(f"the gateway's API key file {self.api_key_file} is empty")
        return key


class LogSettings(BaseModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_output: bool | None = Field(default=None, description="None: JSON when not a TTY.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPOTSERVE_", env_nested_delimiter="__", extra="ignore"
    )

    nats: NatsSettings = NatsSettings()
    model: ModelSettings = ModelSettings()
    admission: AdmissionSettings = AdmissionSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    executor: ExecutorSettings = ExecutorSettings()
    loader: LoaderSettings = LoaderSettings()
    monitor: MonitorSettings = MonitorSettings()
    planner: PlannerSettings = PlannerSettings()
    gateway: GatewaySettings = GatewaySettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
