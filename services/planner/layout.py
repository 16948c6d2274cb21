"""What a device holds under a role: the shared vocabulary of the planner's algorithms.

A role (replica r, stage s, tensor rank i of M) holds, of every layer in its stage's range,
the tensor-parallel slice [i/M, (i+1)/M) (norms are replicated inside each slice, as in the
project's checkpoint layout, shared/loading/format.py). The first stage also holds the whole
embedding (replicated across the ranks); the last stage holds slice i of the final norm and head
(the head is column-parallel). Stage s of P covers layers [s*f, min((s+1)*f, L)) with
f = ceil(L/P); a P whose last stage would be empty is not a valid pipeline degree.

Slices are integer intervals [lo, hi) over a common denominator ``den`` (the lcm of the tensor
degrees involved), so overlaps are exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from shared.messages import DeviceRole, ParallelConfig
from shared.model.profile import ParallelProfile

EMBED = -1  # the weights "layer" of the embeddings; the head is layer L (num_layers)

Interval = tuple[int, int]  # [lo, hi) over a denominator


def layers_per_stage(num_layers: int, pipeline: int) -> int:
    return -(-num_layers // pipeline)


def valid_pipeline(num_layers: int, pipeline: int) -> bool:
    """Every stage gets at least one layer with f = ceil(L/P)."""
    if not 1 <= pipeline <= num_layers:
        return False
    f = layers_per_stage(num_layers, pipeline)
    return (pipeline - 1) * f < num_layers


def stage_layers(num_layers: int, pipeline: int, stage: int) -> tuple[int, int]:
    """(first, last) layer of a stage, inclusive."""
    f = layers_per_stage(num_layers, pipeline)
    return stage * f, min((stage + 1) * f, num_layers) - 1


@dataclass(frozen=True)
class Group:
    """One tensor-parallel group of a configuration: M devices inside one instance."""

    replica: int
    stage: int
    first_layer: int
    last_layer: int
    tensor: int


def groups_of(config: ParallelConfig, num_layers: int) -> list[Group]:
    """The groups of a configuration, replica-major then stage."""
    result = []
    for replica in range(config.data):
        for stage in range(config.pipeline):
            first, last = stage_layers(num_layers, config.pipeline, stage)
            result.append(Group(replica, stage, first, last, config.tensor))
    return result


def group_sizes(roles: Iterable[DeviceRole]) -> dict[tuple[int, int], int]:
    """Tensor degree of each (replica, stage) group of a role list (its largest rank + 1)."""
    sizes: dict[tuple[int, int], int] = {}
    for role in roles:
        key = (role.replica, role.stage)
        sizes[key] = max(sizes.get(key, 0), role.tp_rank + 1)
    return sizes


def common_den(*degrees: Iterable[int]) -> int:
    den = 1
    for values in degrees:
        for value in values:
            den = math.lcm(den, value)
    return den


def rank_interval(tp_rank: int, tensor: int, den: int) -> Interval:
    step = den // tensor
    return tp_rank * step, (tp_rank + 1) * step


def weight_keys(first: int, last: int, num_layers: int) -> Iterator[int]:
    """Weight "layers" a stage holds, in progressive order: embeddings, layers, head."""
    if first == 0:
        yield EMBED
    yield from range(first, last + 1)
    if last == num_layers - 1:
        yield num_layers


def weight_interval(layer: int, tp_rank: int, tensor: int, den: int) -> Interval:
    """The embeddings are replicated: every first-stage device holds them whole."""
    if layer == EMBED:
        return 0, den
    return rank_interval(tp_rank, tensor, den)


def weight_bytes(profile: ParallelProfile, layer: int) -> int:
    """Bytes of a whole weights "layer" (all slices together)."""
    if layer == EMBED:
        return profile.embed_bytes
    if layer == profile.num_layers:
        return profile.head_bytes
    return profile.layer_bytes


def overlap(a: Interval, b: Interval) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def subtract(a: Interval, b: Interval) -> list[Interval]:
    """a minus b: at most two intervals."""
    if overlap(a, b) == 0:
        return [a]
    parts = []
    if a[0] < b[0]:
        parts.append((a[0], b[0]))
    if b[1] < a[1]:
        parts.append((b[1], a[1]))
    return parts


def role_device(role: DeviceRole) -> tuple[str, int]:
    return role.instance_id, role.device


def target_replica(old_replica: int, data: int) -> int:
    """Where requests of an old replica continue under a configuration with ``data``
    replicas: the same replica when it still exists (mapping and migration both assume it)."""
    return old_replica if old_replica < data else old_replica % data
