"""Every NATS subject, JetStream stream, consumer and KV bucket of spotserve, in one place.

The public API is versioned (``spotserve.v1.…``). Declarations are idempotent: every service
calls :func:`ensure_streams` at start, whichever starts first creates them, each with the
configured replica count (``SPOTSERVE_NATS__REPLICAS``: 3 on a clustered JetStream).
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

API_PREFIX = "spotserve.v1"

# Public API (request/reply, served by admission as a nats.micro endpoint).
GENERATE = f"{API_PREFIX}.generate"
RESULT = f"{API_PREFIX}.result"  # ResultRequest -> ResultReply
CANCEL = f"{API_PREFIX}.cancel"  # CancelRequest -> CancelReply
# Accepted request ids (key -> AcceptedRecord), kept as long as their committed tokens.
REQUESTS_BUCKET = "spotserve-requests"
RESULTS_KEPT_S = 24 * 3600.0

# nats.micro service names; `$SRV.PING.<name>` finds them.
SERVICE_ADMISSION = "spotserve-admission"
SERVICE_SCHEDULER = "spotserve-scheduler"
SERVICE_PLANNER = "spotserve-planner"
SERVICE_MONITOR = "spotserve-monitor"
SERVICE_LOADER = "spotserve-loader"
SERVICE_EXECUTOR = "spotserve-executor"
SERVICE_GATEWAY = "spotserve-gateway"
ALL_SERVICES = (
    SERVICE_ADMISSION,
    SERVICE_SCHEDULER,
    SERVICE_PLANNER,
    SERVICE_MONITOR,
    SERVICE_LOADER,
    SERVICE_EXECUTOR,
    SERVICE_GATEWAY,
)

# Accepted requests: admission publishes, the scheduler consumes (work queue).
REQUESTS_STREAM = "SPOTSERVE_REQUESTS"
REQUESTS_SUBJECT = f"{API_PREFIX}.requests.accepted"
SCHEDULER_CONSUMER = "scheduler"

# Committed tokens, written before a token reaches the client. Each iteration's chunks, of all
# its requests, in one record on COMMITS_SUBJECT (one message per iteration); each request's
# chunks also in runs on its own subject (its first chunk, its last, and a run every so many):
# a reader of one request takes its runs, then the iteration records after the last of them.
TOKENS_STREAM = "SPOTSERVE_TOKENS"
TOKENS_SUBJECT_PREFIX = f"{API_PREFIX}.tokens"
COMMITS_SUBJECT = f"{API_PREFIX}.commits"


def tokens_subject(request_id: str) -> str:
    """A request's runs of committed chunks."""
    return f"{TOKENS_SUBJECT_PREFIX}.{request_id}"


def executor_step_subject(instance_id: str) -> str:
    """One decoding iteration for a ragged batch on one executor instance."""
    return f"{API_PREFIX}.executor.{instance_id}.step"


def executor_stage_subject(instance_id: str) -> str:
    """The next pipeline stage's part of a micro-batch (StageCommand -> StepResult)."""
    return f"{API_PREFIX}.executor.{instance_id}.stage"


def executor_weights_subject(instance_id: str) -> str:
    """Send some of this executor's layers to a peer (WeightsSendCommand -> KvMoveReply)."""
    return f"{API_PREFIX}.executor.{instance_id}.weights"


def executor_migrate_subject(instance_id: str) -> str:
    """Send one request's KV cache to another executor (KvMigrateCommand -> KvMoveReply)."""
    return f"{API_PREFIX}.executor.{instance_id}.migrate"


def executor_adopt_subject(instance_id: str) -> str:
    """Take a KV cache another executor sends (KvAdoptCommand -> KvMoveReply)."""
    return f"{API_PREFIX}.executor.{instance_id}.adopt"


def executor_release_subject(instance_id: str) -> str:
    """Free the KV cache of finished or abandoned requests on one executor instance."""
    return f"{API_PREFIX}.executor.{instance_id}.release"


def executor_reconnected_subject(instance_id: str) -> str:
    """An executor's NATS connection came back (core NATS, empty, no reply): a step reply it
    sent while away is lost, so the scheduler recovers that step now, not at its timeout."""
    return f"{API_PREFIX}.executor.{instance_id}.reconnected"


EXECUTOR_RECONNECTED_SUBJECTS = executor_reconnected_subject("*")


# Converted models, chunked in a JetStream Object Store: a new node gets a model over NATS alone.
MODELS_BUCKET = "spotserve-models"
# Each node's loader inventory (key = node): what it holds where, and its measured bandwidths.
INVENTORY_BUCKET = "spotserve-loader-inventory"


def loader_fetch_subject(node: str) -> str:
    """Ask one node's loader to bring a model to its local disk (from the remote store)."""
    return f"{API_PREFIX}.loader.{node}.fetch"


def loader_release_subject(node: str) -> str:
    """Give a host-memory lease back to one node's loader (the model may be evicted again)."""
    return f"{API_PREFIX}.loader.{node}.release"


# The scheduler's requests in flight ({} -> InflightReport), for the planner's JIT arrangement.
SCHEDULER_INFLIGHT = f"{API_PREFIX}.scheduler.inflight"

# -- fleet (monitor) --------------------------------------------------------------------------
# Instance registry: key = instance id -> InstanceRecord, re-put by each executor as heartbeat.
INSTANCES_BUCKET = "spotserve-instances"
# Fleet events (joined, preempt-notice, lost, left), in order, written only by the monitor.
FLEET_STREAM = "SPOTSERVE_FLEET"
FLEET_SUBJECT_PREFIX = f"{API_PREFIX}.fleet.events"
# Requests to the monitor (nats.micro endpoints of its "fleet" group).
FLEET_NOTICE = f"{API_PREFIX}.fleet.notice"  # PreemptNotice -> FleetEvent
FLEET_ADD = f"{API_PREFIX}.fleet.add"  # AddInstancesRequest -> AddInstancesReply
FLEET_STATUS = f"{API_PREFIX}.fleet.status"  # {} -> FleetStatus

# -- plans (planner) ---------------------------------------------------------------------------
# Epoch-numbered plans, written only by the planner; the last one is the current one.
PLANS_STREAM = "SPOTSERVE_PLANS"
PLANS_SUBJECT = f"{API_PREFIX}.plans"
# Cluster load figures (key "arrival-rate" -> ArrivalRate, put by admission).
LOAD_BUCKET = "spotserve-load"
ARRIVAL_RATE_KEY = "arrival-rate"


# Serving mode: the SpotServe comparison's baselines are modes of the same system. Admission
# answers ADMIN_MODE (ModeRequest -> ModeReply) and keeps the mode in ADMIN_BUCKET; the planner
# reads it and stamps it on every plan, which the scheduler and executors follow.
ADMIN_MODE = f"{API_PREFIX}.admin.mode"
ADMIN_BUCKET = "spotserve-admin"
MODE_KEY = "mode"


def cancel_key(request_id: str) -> str:
    """The requests bucket's key of a request's cancel marker (request ids hold no dots)."""
    return f"{request_id}.cancel"


# The subject every cancel marker is put on (a wildcard over request ids).
CANCEL_MARKERS_SUBJECT = f"$KV.{REQUESTS_BUCKET}.*.cancel"


def requests_bucket_config(replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(bucket=REQUESTS_BUCKET, history=1, ttl=RESULTS_KEPT_S, replicas=replicas)


def admin_bucket_config(replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(bucket=ADMIN_BUCKET, history=1, replicas=replicas)


def load_bucket_config(replicas: int = 1) -> KeyValueConfig:
    # Only the latest figures matter; they go stale on their own (admission re-puts them).
    return KeyValueConfig(bucket=LOAD_BUCKET, history=1, ttl=300.0, replicas=replicas)


def instances_bucket_config(replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(bucket=INSTANCES_BUCKET, history=1, replicas=replicas)


def inventory_bucket_config(replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(bucket=INVENTORY_BUCKET, history=1, replicas=replicas)


def models_store_config(replicas: int = 1) -> ObjectStoreConfig:
    return ObjectStoreConfig(bucket=MODELS_BUCKET, storage=StorageType.FILE, replicas=replicas)


async def key_value_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Bind to a KV bucket, creating it with ``config`` when it does not exist yet."""
    try:
        return await js.key_value(config.bucket)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(config)


async def load_bucket(js: JetStreamContext) -> KeyValue:
    return await key_value_bucket(js, load_bucket_config())


async def instances_bucket(js: JetStreamContext) -> KeyValue:
    return await key_value_bucket(js, instances_bucket_config())


async def requests_bucket(js: JetStreamContext) -> KeyValue:
    return await key_value_bucket(js, requests_bucket_config())


async def admin_bucket(js: JetStreamContext) -> KeyValue:
    return await key_value_bucket(js, admin_bucket_config())


def fleet_event_subject(kind: str) -> str:
    return f"{FLEET_SUBJECT_PREFIX}.{kind}"


def srv_subject(verb: str, service: str | None = None) -> str:
    """nats.micro discovery subject, e.g. ``$SRV.PING.spotserve-executor``."""
    return f"$SRV.{verb}" if service is None else f"$SRV.{verb}.{service}"


def requests_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=REQUESTS_STREAM,
        subjects=[REQUESTS_SUBJECT],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        # Refuse new work rather than silently dropping accepted requests when full.
        discard=DiscardPolicy.NEW,
        max_msgs=1_000_000,
        max_msg_size=2 * 1024 * 1024,
        duplicate_window=120.0,
    )


def tokens_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=TOKENS_STREAM,
        subjects=[f"{TOKENS_SUBJECT_PREFIX}.*", COMMITS_SUBJECT],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        # Results stay retrievable for a day; a client that lost its stream can re-read them.
        max_age=RESULTS_KEPT_S,
        discard=DiscardPolicy.OLD,
    )


def scheduler_consumer_config(ack_wait_s: float, max_ack_pending: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=SCHEDULER_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        # Bounds how many accepted requests the scheduler holds at once.
        max_ack_pending=max_ack_pending,
        max_deliver=-1,
        filter_subject=REQUESTS_SUBJECT,
    )


def fleet_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=FLEET_STREAM,
        subjects=[f"{FLEET_SUBJECT_PREFIX}.*"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * 24 * 3600.0,
        # The monitor sets Nats-Msg-Id per change: a retried publish is not a second event.
        duplicate_window=600.0,
    )


def plans_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=PLANS_STREAM,
        subjects=[PLANS_SUBJECT],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs=1000,
        max_msg_size=8 * 1024 * 1024,
        discard=DiscardPolicy.OLD,
        duplicate_window=600.0,
    )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create or update every stream spotserve uses, and create the KV buckets and the object
    store that do not exist yet, all with ``replicas`` (idempotent, safe to race)."""
    for config in (
        requests_stream_config(replicas),
        tokens_stream_config(replicas),
        fleet_stream_config(replicas),
        plans_stream_config(replicas),
    ):
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Exists with other settings (an older version, another replica count): bring it
            # to ours (JetStream moves a stream between replica counts in place).
            await js.update_stream(config)
    for bucket in (
        requests_bucket_config(replicas),
        admin_bucket_config(replicas),
        load_bucket_config(replicas),
        instances_bucket_config(replicas),
        inventory_bucket_config(replicas),
    ):
        await key_value_bucket(js, bucket)
    store = models_store_config(replicas)
    try:
        await js.object_store(MODELS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(MODELS_BUCKET, config=store)


# -- tensor transfer (shared.transfer: executor to executor, peer to peer) ----------------------
# A receiver (TensorInbox) subscribes to ``spotserve.v1.transfer.<instance>.>``: offers and
# status probes are requests; chunks are published to ``….data.<transfer_id>`` against credits
# the receiver grants on the sender's own ack subject (an inbox named in the offer).
TRANSFER_SUBJECT_PREFIX = f"{API_PREFIX}.transfer"


def transfer_inbox_subject(instance_id: str) -> str:
    """Everything addressed to one instance's tensor inbox (a wildcard subscription)."""
    return f"{TRANSFER_SUBJECT_PREFIX}.{instance_id}.>"


def transfer_offer_subject(instance_id: str) -> str:
    """TransferOffer -> TransferAccept (or an error reply)."""
    return f"{TRANSFER_SUBJECT_PREFIX}.{instance_id}.offer"


def transfer_status_subject(instance_id: str) -> str:
    """TransferStatusRequest -> TransferStatusReply (a sender that heard nothing for a while)."""
    return f"{TRANSFER_SUBJECT_PREFIX}.{instance_id}.status"


def transfer_abort_subject(instance_id: str) -> str:
    """TransferAbort (no reply): the sender gives up; the receiver frees the transfer."""
    return f"{TRANSFER_SUBJECT_PREFIX}.{instance_id}.abort"


def transfer_data_subject(instance_id: str, transfer_id: str) -> str:
    """Raw chunk bytes of one transfer; sequence number etc. in the message headers."""
    return f"{TRANSFER_SUBJECT_PREFIX}.{instance_id}.data.{transfer_id}"
