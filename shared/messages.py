"""Every message spotserve sends, as versioned pydantic models (the service boundary).

Public API models forbid unknown fields and use strict types, so a typo or a wrong type is a
clear 400 instead of a silently ignored option.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class ErrorCode(StrEnum):
    """nats.micro error codes (the error-code header shared.rpc writes), HTTP-like on purpose."""

    BAD_REQUEST = "400"
    NOT_FOUND = "404"
    CONFLICT = "409"
    TOO_LARGE = "413"
    OVERLOADED = "429"
    INTERNAL = "500"
    UNAVAILABLE = "503"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InternalModel(BaseModel):
    # Between our own services: unknown fields are ignored so a newer sender does not break
    # an older receiver during a rolling upgrade.
    model_config = ConfigDict(extra="ignore", frozen=True)


TokenId = Annotated[int, Field(ge=0, lt=2**31)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
# A request id is part of NATS subjects (its committed tokens): subject-safe characters only.
RequestId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class GenerateRequest(StrictModel):
    """Body of a request to ``spotserve.v1.generate`` (msgpack, or JSON with the header)."""

    prompt: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    # Generate exactly max_tokens (benchmarks, trace replay with forced output lengths).
    ignore_eos: bool = False
    # The client's own id for the request (unique: a used one is refused), so that it can ask
    # for the committed result (spotserve.v1.result) even before any chunk reached it.
    request_id: RequestId | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'prompt_token_ids'")
        if self.prompt is not None and not self.prompt:
            raise ValueError("'prompt' is empty")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("'prompt_token_ids' is empty")
        return self


Encoding = Literal["msgpack", "json"]


class AcceptedRequest(InternalModel):
    """A validated request as persisted in the REQUESTS stream (admission -> scheduler)."""

    v: int = SCHEMA_VERSION
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    ignore_eos: bool
    reply_subject: str | None
    encoding: Encoding
    accepted_at: float


class Usage(InternalModel):
    prompt_tokens: int
    completion_tokens: int


# "cancelled": the client asked to stop it (``spotserve.v1.cancel``, or the gateway's HTTP
# client went away); the chunk that says so carries no new tokens.
FinishReason = Literal["stop", "length", "cancelled"]


class TokenChunk(InternalModel):
    """One piece of a token stream; also what the TOKENS stream's records hold.

    ``index`` counts chunks from 0 so a client can see a gap. ``token_ids`` are the new tokens;
    the EOS that ends a "stop" is left out, as it is from ``text``.
    """

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class ChunkRecord(InternalModel):
    """A record of the TOKENS stream: committed chunks, each a TokenChunk in msgpack as it was
    forwarded. On ``commits``: one iteration's chunks, one per request. On a request's own
    subject: a run of its chunks, in index order; ``closed``: the request has ended (finished,
    or failed), no chunk of it follows."""

    chunks: list[bytes]
    closed: bool = False


class GenerateResult(InternalModel):
    """The single reply of a request with ``stream: false``."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage


class CancelRequest(StrictModel):
    """Body of ``spotserve.v1.cancel``: stop a request, by id."""

    request_id: RequestId


class CancelReply(InternalModel):
    """``cancelling``: the scheduler stops it at its next iteration (its stream then ends with
    a chunk whose ``finish_reason`` is ``"cancelled"``, as does its result); ``finished``: it had
    already ended, with ``finish_reason``."""

    request_id: str
    state: Literal["cancelling", "finished"]
    finish_reason: FinishReason | None = None


class CancelRecord(InternalModel):
    """The marker a cancel leaves in the requests bucket (key: ``cancel_key(request_id)``)."""

    requested_at: float


class ResultRequest(StrictModel):
    """Body of ``spotserve.v1.result``: the committed result of a request, by id."""

    request_id: RequestId


class ResultReply(InternalModel):
    """What is committed of a request: every token so far, its text, and ``finish_reason`` and
    ``usage`` once it has finished (null while it runs). ``chunks``: the committed chunk count
    (a streaming client has seen indices 0..chunks-1 when it has everything)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    usage: Usage | None
    chunks: int


class AcceptedRecord(InternalModel):
    """An accepted request's entry in the requests bucket (ids are unique while it is kept)."""

    accepted_at: float


class Empty(InternalModel):
    """The body of a request that carries nothing (an empty body or ``{}`` both parse)."""


class ErrorDetail(InternalModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorReply(InternalModel):
    """Body of an error reply; the same code and message are in the nats.micro headers."""

    error: ErrorDetail


class StepSequence(InternalModel):
    """One sequence of a ragged batch: its new input tokens and how to sample its next one."""

    request_id: str
    token_ids: list[int]
    temperature: float
    top_p: float
    seed: int
    sample_index: int
    # Positions of its KV cache the scheduler expects the executor to hold (None: unchecked):
    # an executor that holds another number (e.g. it reloaded meanwhile) refuses the step
    # instead of silently starting a new sequence from these tokens alone.
    cached_tokens: int | None = None
    # Feed the token this executor sampled for it in the step before (``token_ids`` empty): the
    # scheduler sent this step before that one's reply came back.
    continues: bool = False


class StepCommand(InternalModel):
    """scheduler -> executor: run one decoding iteration."""

    v: int = SCHEMA_VERSION
    sequences: list[StepSequence]
    # Sequences to free before this step (finished or moved elsewhere).
    release: list[str] = Field(default_factory=list)
    # Free every slot first: a scheduler meeting this executor for the first time does not
    # know what an earlier scheduler left in its cache.
    release_all: bool = False
    # KV swapping (in this order: release, offload, upload, the step, prefetch).
    offload: list[str] = Field(default_factory=list)
    upload: list[str] = Field(default_factory=list)
    # Uploads of the sequences next in line, after the step, as far as free slots allow.
    prefetch: list[str] = Field(default_factory=list)


class StageCommand(InternalModel):
    """pipeline stage k -> stage k+1: the micro-batch (``StageBatch.to_wire()``: the steps,
    positions, hidden states) and the KV-cache commands every stage applies the same way."""

    batch: dict[str, Any]
    # Hidden states too large for one message come separately through shared.transfer.
    hidden_transfer: str | None = None
    release: list[str] = Field(default_factory=list)
    release_all: bool = False
    offload: list[str] = Field(default_factory=list)
    upload: list[str] = Field(default_factory=list)
    prefetch: list[str] = Field(default_factory=list)


class StepResult(InternalModel):
    """executor -> scheduler: the sampled token of each sequence."""

    tokens: dict[str, int]
    compute_s: float


Tier = Literal["host-memory", "local-disk", "remote"]


class FetchModelRequest(StrictModel):
    """Ask a node's loader to bring a model to its local disk (from the remote store) and,
    with ``host_lease``, into its host-memory pool, leased to the caller while it copies."""

    model: str = Field(min_length=1, max_length=128)
    host_lease: bool = False


class HostLease(InternalModel):
    """Where a model lies in the loader's shared-memory pool; valid until released."""

    lease_id: str
    pool_path: str
    chunk_bytes: int
    # The k-th chunk of the model's chunk plan (shared.loading.hostpool.chunk_plan) is here.
    chunks: list[int]
    model_dir: str


class FetchModelReply(InternalModel):
    model: str
    path: str
    # Where the model was found: in host memory, on local disk, or pulled from the remote store.
    tier: Tier
    seconds: float
    # Present when a host lease was asked for and the model fits in the pool.
    host: HostLease | None = None


class ReleaseLeaseRequest(StrictModel):
    lease_id: str = Field(min_length=1, max_length=64)


class LeaseReleased(InternalModel):
    """A loader's answer to a lease release: False when it held no such lease."""

    released: bool


class HeldModel(InternalModel):
    # The fastest tier holding it (a pooled model is on local disk too).
    tier: Literal["host-memory", "local-disk"]
    nbytes: int


class LoaderInventory(InternalModel):
    """What one node's loader holds, and how fast it can bring more (for the planner)."""

    node: str
    models: dict[str, HeldModel]
    # Measured bytes/s per tier ("remote": pulls from the store); absent until measured.
    bandwidth_bps: dict[str, float]
    # Work already queued at this loader, in seconds.
    queue_s: float
    updated_at: float

    def estimate_load_s(self, model: str, nbytes: int) -> float | None:
        """q + n/b from the fastest tier that has the model, or None if nothing is measured."""
        held = self.models.get(model)
        tier = held.tier if held is not None else "remote"
        bandwidth = self.bandwidth_bps.get(tier)
        return None if not bandwidth else self.queue_s + nbytes / bandwidth


class KvMigrateCommand(InternalModel):
    """scheduler -> the executor holding a request's KV cache: send it to ``destination``."""

    request_id: str = Field(min_length=1, max_length=128)
    destination: str = Field(min_length=1, max_length=128)
    transfer_id: str = Field(min_length=1, max_length=128)


class KvAdoptCommand(InternalModel):
    """scheduler -> the new holder: take the KV cache arriving as ``transfer_id``."""

    request_id: str = Field(min_length=1, max_length=128)
    transfer_id: str = Field(min_length=1, max_length=128)


class WeightsSendCommand(InternalModel):
    """new holder -> a peer named by the plan: send me these layers' weights (HF names;
    -1 the embeddings, L the final norm and head)."""

    layers: list[int]
    destination: str = Field(min_length=1, max_length=128)
    transfer_id: str = Field(min_length=1, max_length=128)


class KvMoveReply(InternalModel):
    request_id: str
    nbytes: int = 0
    landed: str | None = None  # adopt: "host" (the scheduler uploads it before it runs)


class WeightsSent(InternalModel):
    """A peer's answer to :class:`WeightsSendCommand`: the bytes it streamed."""

    nbytes: int = 0


class ReleaseCommand(InternalModel):
    request_ids: list[str]


class Released(InternalModel):
    """An executor's answer to :class:`ReleaseCommand`: how many caches it freed."""

    released: int


# -- fleet (monitor) -----------------------------------------------------------------------------

PriceClass = Literal["spot", "on-demand"]
FleetEventKind = Literal["joined", "preempt-notice", "lost", "left"]
NoticeSource = Literal["aws", "gcp", "azure", "cli", "trace", "local", "sigterm"]
InstanceId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]


class InstanceRecord(InternalModel):
    """One executor instance, as it registers (and re-puts as heartbeat) in the registry."""

    instance_id: str
    node: str
    devices: int = Field(ge=1)
    device_kind: str  # "cpu" or "cuda"
    device_memory_bytes: int = Field(ge=0)
    price_class: PriceClass = "spot"
    price_per_hour: float = Field(default=0.0, ge=0)
    pid: int | None = None
    started_at: float
    heartbeat_at: float  # the instance's clock: informational; leases use the monitor's


class PreemptNotice(StrictModel):
    """The cloud (or an operator, or a trace) says an instance will be taken away."""

    instance_id: InstanceId
    # Seconds until the instance is gone; None: the monitor's default grace period.
    grace_s: float | None = Field(default=None, ge=0, le=3600)
    source: NoticeSource = "cli"


# Header of a reply to a notice: new | updated | duplicate | cancelled (an added instance that
# had not joined yet: stopped, no event published).
NOTICE_OUTCOME_HEADER = "Spotserve-Notice-Outcome"


class FleetEvent(InternalModel):
    kind: FleetEventKind
    instance: InstanceRecord
    at: float  # monitor clock (unix seconds)
    # preempt-notice: when the instance will be gone (monitor clock).
    deadline: float | None = None
    source: str = "monitor"


class AddInstancesRequest(StrictModel):
    count: int = Field(default=1, ge=1, le=64)
    price_class: PriceClass = "spot"


class AddInstancesReply(InternalModel):
    instance_ids: list[str]


class InstanceStatus(InternalModel):
    record: InstanceRecord
    state: Literal["running", "preempting"]
    deadline: float | None = None
    lease_left_s: float


class FleetStatus(InternalModel):
    instances: list[InstanceStatus]
    # Instances `fleet add` started that have not registered yet.
    pending: list[str] = Field(default_factory=list)


# -- plans (planner) -----------------------------------------------------------------------------


class ArrivalRate(InternalModel):
    """Accepted requests per second over a recent window (admission's clock)."""

    requests_per_s: float = Field(ge=0)
    window_s: float = Field(gt=0)
    at: float


class ParallelConfig(InternalModel):
    """C = (D, P, M, B) with the cost model's estimates for it."""

    data: int = Field(ge=1)
    pipeline: int = Field(ge=1)
    tensor: int = Field(ge=1)
    batch: int = Field(ge=1)
    latency_s: float = Field(ge=0)
    throughput_rps: float = Field(ge=0)

    @property
    def devices(self) -> int:
        return self.data * self.pipeline * self.tensor


class DeviceRole(InternalModel):
    """What one device does under a plan: a tensor shard of a layer range of one replica."""

    instance_id: str
    device: int = Field(ge=0)
    replica: int = Field(ge=0)
    stage: int = Field(ge=0)
    tp_rank: int = Field(ge=0)
    first_layer: int = Field(ge=0)
    last_layer: int = Field(ge=0)  # inclusive


class Transfer(InternalModel):
    """Bytes one device must receive: a slice of a layer's tensors (weights) or a request's KV
    cache, from a surviving peer or (source_instance None) from its node's loader.

    The slice is the fraction [lo/den, hi/den) of every tensor-parallel-split dimension of the
    layer's tensors (replicated tensors travel whole with the slice starting at 0)."""

    kind: Literal["weights", "kv"]
    instance_id: str
    device: int = Field(ge=0)
    # weights: -1 embeddings, 0..L-1 layers, L the final norm and head.
    layer: int = Field(ge=-1)
    den: int = Field(default=1, ge=1)
    lo: int = Field(default=0, ge=0)
    hi: int = Field(default=1, ge=1)
    request_id: str | None = None  # kv transfers
    source_instance: str | None = None
    source_device: int | None = None
    nbytes: int = Field(ge=0)
    # Progressive order: embeddings, layers 0..L-1, head; off dying instances first.
    order: int = Field(ge=0)


class InflightSequence(InternalModel):
    """A request the scheduler is serving: where its KV cache is and how far it has come."""

    request_id: str
    instance_id: str | None  # the executor holding its KV cache (None: none yet)
    context_tokens: int = Field(ge=0)  # prompt + generated: positions its cache holds
    generated_tokens: int = Field(ge=0)
    max_tokens: int = Field(ge=1)


class InflightReport(InternalModel):
    sequences: list[InflightSequence]


class JitDecision(InternalModel):
    """Just-in-time arrangement of one request on a dying instance."""

    request_id: str
    instance_id: str
    action: Literal["finish", "migrate", "recompute"]
    # Iterations it may still decode in place before its KV cache must move.
    decode_steps: int = Field(ge=0)
    # Wall-clock time (the planner's clock) by which it must have left the instance, whatever
    # the step count says: the deadline less the time its cache needs to move.
    move_by: float | None = None


# spotserve: the full system (adaptive configuration, KV caches migrate within the grace period,
# requests resume from committed tokens). reroute: fixed P and M, no use of the grace period; the
# requests of a lost instance restart from scratch elsewhere. restart: every reconfiguration
# stops everything, reloads every instance's weights and restarts every request from scratch.
# ondemand: served like spotserve (loadgen injects no preemptions and prices on-demand).
ServingMode = Literal["spotserve", "reroute", "restart", "ondemand"]


class ModeRequest(StrictModel):
    """Set the serving mode (None: only read it)."""

    mode: ServingMode | None = None


class ModeReply(InternalModel):
    mode: ServingMode
    previous: ServingMode


class Plan(InternalModel):
    epoch: int = Field(ge=1)
    created_at: float
    reason: str
    # The last fleet event (stream sequence) this plan takes into account.
    fleet_seq: int = Field(ge=0)
    config: ParallelConfig
    roles: list[DeviceRole]
    transfers: list[Transfer]
    jit: list[JitDecision] = []
    # The arrival rate cannot be met with the live instances: on-demand capacity is needed.
    needs_on_demand: bool = False
    decision_s: float = Field(ge=0)
    # The arrival rate the configuration was chosen for (req/s).
    arrival_rate_rps: float = Field(default=0.0, ge=0)
    # The serving mode the plan was made under (admission's admin endpoint sets it).
    mode: ServingMode = "spotserve"

    def same_roles(self, other: Plan) -> bool:
        """Whether both plans give every instance the same role (none taken away or added)."""

        def roles(plan: Plan) -> set[tuple[str, int, int, int, int, int]]:
            return {
                (r.instance_id, r.replica, r.stage, r.tp_rank, r.first_layer, r.last_layer)
                for r in plan.roles
            }

        return roles(self) == roles(other)

    def reloads_everything(self, previous: Plan | None) -> bool:
        """The restart-and-reload baseline (the artifact's Reparallelization): a new
        configuration restarts every engine, which reloads from its node's disk, and every
        request starts again from its prompt."""
        return self.mode == "restart" and previous is not None and not previous.same_roles(self)

    @property
    def weights_from_disk(self) -> bool:
        """Whether an instance taking a new role reads its weights from its node's disk
        instead of from peers: the baselines (the artifact's Rerouting loads new pipelines
        from disk, its Reparallelization reloads everything)."""
        return self.mode in ("reroute", "restart")


# -- tensor transfer (shared.transfer) -----------------------------------------------------------
# Peer-to-peer tensor streaming: offer (request/reply) -> chunks against credits -> acks.
# Chunk sequence numbers run over the tensors in offer order; tensor i owns the chunks
# [first_seq(i), first_seq(i) + ceil(nbytes_i / chunk_bytes)). Ranges are [start, end).

TransferId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
SeqRange = tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]
MAX_TRANSFER_TENSORS = 100_000


class TensorSpec(InternalModel):
    name: str = Field(min_length=1, max_length=512)
    dtype: str = Field(min_length=1, max_length=32)  # torch dtype name, e.g. "bfloat16"
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=32)
    nbytes: int = Field(ge=0)
    # CRC32 of the tensor's bytes when the sender knows it up front; otherwise it travels in a
    # header of the tensor's last chunk.
    crc32: int | None = Field(default=None, ge=0, lt=2**32)


class TransferOffer(InternalModel):
    v: int = SCHEMA_VERSION
    transfer_id: TransferId
    source: str = Field(min_length=1, max_length=128)
    tensors: list[TensorSpec] = Field(max_length=MAX_TRANSFER_TENSORS)
    total_bytes: int = Field(ge=0)
    chunk_bytes: int = Field(ge=1)
    window: int = Field(ge=1, le=4096)  # chunks the sender would like in flight
    ack_subject: str = Field(min_length=1, max_length=256)

    @model_validator(mode="after")
    def _consistent(self) -> TransferOffer:
        names = [spec.name for spec in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensor names must be unique")
        if sum(spec.nbytes for spec in self.tensors) != self.total_bytes:
            raise ValueError("total_bytes is not the sum of the tensors' nbytes")
        return self


class TransferAccept(InternalModel):
    transfer_id: str
    # accepted: new; resumed: the receiver already holds part of it (send only `missing`);
    # complete: it already arrived whole (nothing to send).
    state: Literal["accepted", "resumed", "complete"]
    session: int = Field(ge=0)
    window: int = Field(ge=1)  # granted: never more than this many chunks unacknowledged
    missing: list[SeqRange] = Field(default_factory=list)


class TransferAck(InternalModel):
    """receiver -> sender's ack subject: credit, resend requests, the end (or a failure)."""

    transfer_id: str
    session: int
    # Cumulative: the sender may have sent at most this many chunks in this session.
    granted: int = Field(ge=0)
    resend: list[SeqRange] = Field(default_factory=list)
    done: bool = False
    error: str | None = None


class TransferStatusRequest(InternalModel):
    transfer_id: TransferId
    session: int = Field(ge=0)
    sent: int = Field(ge=0)  # chunks published in this session, resends included
    next_seq: int = Field(ge=0)  # every sequence number below this was sent at least once


class TransferStatusReply(InternalModel):
    transfer_id: str
    state: Literal["active", "complete", "failed", "unknown", "superseded"]
    granted: int = Field(default=0, ge=0)
    missing: list[SeqRange] = Field(default_factory=list)
    error: str | None = None


class TransferAbort(InternalModel):
    transfer_id: TransferId
    session: int = Field(ge=0)
    reason: str = Field(default="", max_length=1024)
