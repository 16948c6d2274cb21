"""SpotServe's cost model and the parallel-configuration search (docs/design.md, "Parallel
configuration").

For C = (D, P, M, B), with f = ceil(L/P) layers per stage, m1 | B prefill micro-batches and
m2 | B decode micro-batches::

    t1  = prefill[M][B/m1] * f * (P + m1 - 1)/m1 + comm_prefill * (P - 1)/m1
    t2  = decode[M][B/m2]  * f * (P + m2 - 1)    + comm_decode  * (P - 1)/m2
    lat = t1 + S_out * t2 + embed_s * (S_out + 1)       (one embedding/sampling per iteration)
    tpt = D * B / lat

Micro-batch counts: t1 depends on m1 only and t2 on m2 only, so the latency-minimising pair is
the divisor of B minimising t1 and, independently, the divisor minimising t2; for a fixed
(D, P, M, B) that pair also maximises the throughput, so the choice is exact, not a heuristic.
The profile's prefill times (and the prefill send) were measured at ``prefill_tokens`` prompt
tokens; they are scaled linearly to the request's input length (attention's quadratic share is
ignored).

Note on t1: docs/design.md's form (the SpotServe artifact's
elastic-switch/scheduler/parallel/solver.py
computes the same) divides by m1, so with P = 1 and m1 = B it charges one sequence's prefill
for the whole batch: micro-batching looks free. ``gpipe_prefill=True`` drops that division (B/m1
sequences per slot, P + m1 - 1 slots: the GPipe schedule). The default is docs/design.md's form.

Continuous batching (``continuous_batching=True``, what spotserve's scheduler does): requests
join a running batch one at a time, so over its lifetime a request's batch pauses for B
single-sequence prefills (each through all P stages) instead of one batched t1; the latency
charges B * t1(b=1) in place of t1. ``step_seconds`` is the same model per iteration.

Memory, per device of the fullest stage: f * layer_bytes / M, plus the whole embedding on the
first stage (replicated, as the checkpoint layout stores it), plus head_bytes / M on the last
stage, plus the KV cache of B sequences of (input + output) tokens for the stage's layers / M.
It must fit in (1 - memory_reserve_fraction) of the smallest device memory of the fleet (the
reserve stands for the CUDA context, activations and fragmentation).

Search space: M a power of two that the profile has and that fits in one instance (a
tensor-parallel group never spans instances), P from 1 to L with every stage non-empty, B from
1 to max_batch, and D up to the number of M-device groups the instances hold, divided by P.
Latency does not depend on D, so for each (P, M, B) only two D matter: the smallest that
reaches the arrival rate, and the largest that fits. Everything is vectorised over P.

Selection: among the (P, M, B) whose smallest sufficient D fits, take the minimum latency; every
candidate within ``tolerance`` of it is "similar": there the previous configuration wins (no
migration for nothing), else the one that occupies the fewest instances, then devices, then the
lowest latency, with D the smallest sufficient one (the default: the rest of the fleet stays
free). With ``fill_spare=True`` D is every replica that fits (spare replicas lower queueing) and
among similar candidates the highest throughput wins, then the fewest instances. When nothing
reaches the rate, take the maximum throughput (D as large as fits; the previous configuration
while its throughput is within ``tolerance`` of the maximum) and say that on-demand capacity is
needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.planner.layout import valid_pipeline
from shared.config import DEFAULT_MEMORY_RESERVE_FRACTION, DEFAULT_TOLERANCE
from shared.messages import InstanceRecord, ParallelConfig
from shared.model.profile import ParallelProfile


class NoFeasibleConfig(Exception):
    """No configuration fits the memory of the live instances: on-demand capacity (or more
    instances) is needed before anything can be served."""


@dataclass(frozen=True)
class Estimate:
    """The cost model's figures for one (P, M, B)."""

    pipeline: int
    tensor: int
    batch: int
    prefill_micro_batches: int  # m1
    decode_micro_batches: int  # m2
    prefill_s: float  # t1
    decode_step_s: float  # t2: one decode iteration of the batch through the pipeline
    latency_s: float
    memory_bytes: int  # per device of the fullest stage


@dataclass(frozen=True)
class SearchResult:
    config: ParallelConfig
    needs_on_demand: bool
    estimate: Estimate
    instances: int  # instances the configuration occupies
    candidates: int  # (P, M, B) triples that fit in memory


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_degrees(profile: ParallelProfile, max_devices: int) -> list[int]:
    """Powers of two the profile has that fit in one instance."""
    return [m for m in profile.tensor_degrees() if m <= max_devices and m & (m - 1) == 0]


def _times(
    profile: ParallelProfile,
    tensor: int,
    batch: int,
    pipelines: np.ndarray,
    input_tokens: int,
    output_tokens: int,
    gpipe_prefill: bool = False,
    continuous_batching: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """t1, t2, latency, m1, m2 for every P in ``pipelines`` at (M, B)."""
    layers = profile.num_layers
    f = -(-layers // pipelines)
    scale = input_tokens / profile.prefill_tokens
    micro = np.array(divisors(batch))[:, None]
    prefill = np.array([profile.prefill_layer_s(tensor, batch // m) for m in micro[:, 0]])
    decode = np.array([profile.decode_layer_s(tensor, batch // m) for m in micro[:, 0]])
    slots = (pipelines + micro - 1) / (1 if gpipe_prefill else micro)
    t1_all = prefill[:, None] * scale * f * slots
    t1_all = t1_all + profile.comm_prefill_s * scale * (pipelines - 1) / micro
    t2_all = decode[:, None] * f * (pipelines + micro - 1)
    t2_all = t2_all + profile.comm_decode_s * (pipelines - 1) / micro
    i1, i2 = t1_all.argmin(axis=0), t2_all.argmin(axis=0)
    cols = np.arange(len(pipelines))
    factor = profile.latency_factor
    t1, t2 = t1_all[i1, cols] * factor, t2_all[i2, cols] * factor
    if continuous_batching:
        # Requests join a running batch one by one: over its lifetime a request's batch stops
        # for B single-sequence prefills (its own and one per slot that turns over), each
        # through every stage.
        single = profile.prefill_layer_s(tensor, 1) * scale * f * pipelines
        single = (single + profile.comm_prefill_s * scale * (pipelines - 1)) * factor
        prefills = batch * single
    else:
        prefills = t1
    latency = prefills + output_tokens * t2 + profile.embed_s * (output_tokens + 1)
    latency = latency + 2 * profile.request_embed_time_s(batch) * factor
    return t1, t2, latency, micro[i1, 0], micro[i2, 0]


def allowed_pipeline(profile: ParallelProfile, pipeline: int, tensor: int) -> bool:
    """Whether (P, M) is a replica shape the profile's model may take: no empty stage, P
    dividing the padded layer count where the profile has one, and at least the profile's
    minimum devices per replica."""
    if not valid_pipeline(profile.num_layers, pipeline):
        return False
    if profile.padded_layers is not None and profile.padded_layers % pipeline:
        return False
    return pipeline * tensor >= profile.min_devices_per_replica


def step_seconds(
    profile: ParallelProfile,
    pipeline: int,
    tensor: int,
    prefill_batch: int,
    prefill_tokens: int,
    decode_batch: int,
) -> float:
    """One iteration of a replica: the prefill of ``prefill_batch`` new sequences of
    ``prefill_tokens`` tokens each (t1 at that batch) and one decode step of ``decode_batch``
    running ones (t2), each with its best micro-batching, as ``estimate`` charges them. The
    simulator runs its replicas on this."""
    ps = np.array([pipeline])
    seconds = 0.0
    if prefill_batch > 0:
        t1, *_ = _times(profile, tensor, prefill_batch, ps, max(1, prefill_tokens), 1)
        embed = 2 * profile.request_embed_time_s(prefill_batch) * profile.latency_factor
        seconds += float(t1[0]) + embed + profile.embed_s
    if decode_batch > 0:
        _, t2, *_ = _times(profile, tensor, decode_batch, ps, profile.prefill_tokens, 1)
        seconds += float(t2[0]) + profile.embed_s
    return seconds


def _memory(
    profile: ParallelProfile,
    tensor: int,
    batch: int,
    pipelines: np.ndarray,
    input_tokens: int,
    output_tokens: int,
) -> np.ndarray:
    """Bytes per device of the fullest stage, for every P."""
    layers = profile.num_layers
    f = -(-layers // pipelines)
    last = layers - (pipelines - 1) * f
    kv_per_layer = batch * (input_tokens + output_tokens) * profile.kv_bytes_per_token / layers
    per_layer = (profile.layer_bytes + kv_per_layer) / tensor
    head = profile.head_bytes / tensor
    first_stage = f * per_layer + profile.embed_bytes + np.where(pipelines == 1, head, 0.0)
    last_stage = last * per_layer + head
    fullest: np.ndarray = np.maximum(first_stage, last_stage)
    return fullest


def estimate(
    profile: ParallelProfile,
    pipeline: int,
    tensor: int,
    batch: int,
    input_tokens: int,
    output_tokens: int,
    *,
    gpipe_prefill: bool = False,
    continuous_batching: bool = False,
) -> Estimate:
    """The cost model at one (P, M, B), with its best micro-batch counts."""
    ps = np.array([pipeline])
    t1, t2, lat, m1, m2 = _times(
        profile, tensor, batch, ps, input_tokens, output_tokens, gpipe_prefill,
        continuous_batching,
    )  # fmt: skip
    mem = _memory(profile, tensor, batch, ps, input_tokens, output_tokens)
    return Estimate(
        pipeline, tensor, batch, int(m1[0]), int(m2[0]),
        float(t1[0]), float(t2[0]), float(lat[0]), int(mem[0]),
    )  # fmt: skip


def instances_needed(capacities: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Fewest instances that hold ``groups`` tensor-parallel groups, given each instance's
    capacity in groups sorted in decreasing order (largest instances first)."""
    cumulative = np.cumsum(capacities)
    return np.searchsorted(cumulative, groups, side="left") + 1


def usable_memory(
    profile: ParallelProfile, instances: Sequence[InstanceRecord], reserve_fraction: float
) -> float:
    known = [i.device_memory_bytes for i in instances if i.device_memory_bytes > 0]
    memory = min(known) if known else profile.device_memory_bytes
    return memory * (1.0 - reserve_fraction)


def search(
    profile: ParallelProfile,
    instances: Sequence[InstanceRecord],
    arrival_rate_rps: float,
    input_tokens: int,
    output_tokens: int,
    max_batch: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    memory_reserve_fraction: float = DEFAULT_MEMORY_RESERVE_FRACTION,
    prefer: ParallelConfig | None = None,
    fill_spare: bool = False,
    gpipe_prefill: bool = False,
    max_pipeline: int | None = None,
    whole_instance_groups: bool = False,
    fixed: tuple[int, int] | None = None,
    continuous_batching: bool = False,
) -> SearchResult:
    """The configuration for these (surviving) instances and this arrival rate; ``max_pipeline``
    caps P. ``whole_instance_groups``: an instance holds one tensor-parallel group of all its
    devices (M = its devices) or nothing, as spotserve's executors serve. ``fixed`` (P, M):
    only that pipeline and tensor degree (the rerouting baseline keeps them)."""
    if not instances:
        raise NoFeasibleConfig("no live instances")
    memory = usable_memory(profile, instances, memory_reserve_fraction)
    devices = np.array(sorted((i.devices for i in instances), reverse=True))
    rows: list[np.ndarray] = []
    for tensor in tensor_degrees(profile, int(devices.max())):
        if fixed is not None and tensor != fixed[1]:
            continue
        capacities = (devices == tensor).astype(int) if whole_instance_groups else devices // tensor
        groups = int(capacities.sum())
        pipelines = np.array(
            [p for p in range(1, min(profile.num_layers, groups, max_pipeline or groups) + 1)
             if allowed_pipeline(profile, p, tensor) and (fixed is None or p == fixed[0])]
        )  # fmt: skip
        for batch in range(1, max_batch + 1):
            mem = _memory(profile, tensor, batch, pipelines, input_tokens, output_tokens)
            fits = mem <= memory
            if not fits.any():
                continue
            ps = pipelines[fits]
            t1, t2, lat, m1, m2 = _times(
                profile, tensor, batch, ps, input_tokens, output_tokens, gpipe_prefill,
                continuous_batching,
            )  # fmt: skip
            d_max = groups // ps
            d_min = np.maximum(1, np.ceil(arrival_rate_rps * lat / batch - 1e-9)).astype(int)
            n = len(ps)
            rows.append(
                np.stack([
                    ps, np.full(n, tensor), np.full(n, batch), m1, m2, t1, t2, lat,
                    d_min, d_max, mem[fits],
                    instances_needed(capacities, np.minimum(d_min, d_max) * ps),
                    instances_needed(capacities, d_max * ps),
                ]).T
            )  # fmt: skip
    if not rows:
        raise NoFeasibleConfig(
            f"{profile.model} fits no configuration of {len(instances)} instances"
            f" ({int(devices.sum())} devices of {memory / 2**30:.1f} GiB usable)"
        )
    table = np.concatenate(rows)
    return _select(table, arrival_rate_rps, tolerance, prefer, fill_spare)


# Columns of the candidate table.
_P, _M, _B, _M1, _M2, _T1, _T2, _LAT, _DMIN, _DMAX, _MEM, _INST_MIN, _INST_MAX = range(13)


def _select(
    table: np.ndarray,
    arrival_rate_rps: float,
    tolerance: float,
    prefer: ParallelConfig | None,
    fill_spare: bool,
) -> SearchResult:
    meets = table[:, _DMIN] <= table[:, _DMAX]
    if meets.any():
        ok = table[meets]
        best = ok[:, _LAT].min()
        similar = ok[ok[:, _LAT] <= best * (1 + tolerance)]
        index = _preferred(similar, prefer)
        if index is None and fill_spare:
            throughput = similar[:, _DMAX] * similar[:, _B] / similar[:, _LAT]
            # np.lexsort: the last key is the primary one.
            index = int(np.lexsort((similar[:, _LAT], similar[:, _INST_MAX], -throughput))[0])
        elif index is None:
            devices = similar[:, _DMIN] * similar[:, _P] * similar[:, _M]
            index = int(np.lexsort((similar[:, _LAT], devices, similar[:, _INST_MIN]))[0])
        row = similar[index]
        data = int(row[_DMAX] if fill_spare else row[_DMIN])
        instances = int(row[_INST_MAX] if fill_spare else row[_INST_MIN])
        needs_on_demand = False
    else:
        throughput = table[:, _DMAX] * table[:, _B] / table[:, _LAT]
        # As above: within tolerance of the best throughput the previous configuration stays
        # (a reconfiguration for a few percent moves weights and recomputes caches).
        similar = table[throughput >= throughput.max() * (1 - tolerance)]
        index = _preferred(similar, prefer)
        if index is None:
            similar_tpt = similar[:, _DMAX] * similar[:, _B] / similar[:, _LAT]
            index = int(np.lexsort((similar[:, _LAT], -similar_tpt))[0])
        row = similar[index]
        data, instances = int(row[_DMAX]), int(row[_INST_MAX])
        needs_on_demand = arrival_rate_rps > 0
    pipeline, tensor, batch = int(row[_P]), int(row[_M]), int(row[_B])
    latency = float(row[_LAT])
    config = ParallelConfig(
        data=data, pipeline=pipeline, tensor=tensor, batch=batch,
        latency_s=latency, throughput_rps=data * batch / latency,
    )  # fmt: skip
    est = Estimate(
        pipeline, tensor, batch, int(row[_M1]), int(row[_M2]),
        float(row[_T1]), float(row[_T2]), latency, int(row[_MEM]),
    )  # fmt: skip
    return SearchResult(config, needs_on_demand, est, instances, len(table))


def _preferred(similar: np.ndarray, prefer: ParallelConfig | None) -> int | None:
    if prefer is None:
        return None
    match = np.nonzero(
        (similar[:, _P] == prefer.pipeline)
        & (similar[:, _M] == prefer.tensor)
        & (similar[:, _B] == prefer.batch)
    )[0]
    return int(match[0]) if len(match) else None
