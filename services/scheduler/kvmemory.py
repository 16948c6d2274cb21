"""KV-cache memory planning for one executor iteration (FastServe's proactive swapping).

The executor holds at most ``kv_slots`` caches on the device and ``host_slots`` offloaded ones.
Before an iteration, every sequence of the batch must be resident: when the slots do not
suffice, the caches of the sequences least likely to run soon (the tail of the policy's priority
order) go to host memory — or, when the host swap is full too, are dropped (the sequence then
recomputes its prefill from its committed tokens). After the iteration, offloaded caches of the
sequences next in line are uploaded into the slots left free, so the next batch finds them
ready ("proactive" upload: the executor does it after replying, overlapped with the
scheduler's commit and planning of the next iteration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.policy_base import ExecutorView
from services.scheduler.sequence import Sequence


@dataclass
class MemoryPlan:
    offload: list[Sequence] = field(default_factory=list)  # device -> host, before the step
    drop: list[Sequence] = field(default_factory=list)  # freed without a copy (host swap full)
    upload: list[Sequence] = field(default_factory=list)  # host -> device, before the step
    prefetch: list[Sequence] = field(default_factory=list)  # host -> device, after the step


def plan_memory(executor: ExecutorView, batch: list[Sequence], order: list[Sequence]) -> MemoryPlan:
    """What must move so that ``batch`` fits; ``order`` is the policy's priority order."""
    mine = [s for s in order if s.executor == executor.instance_id]
    on_device = [s for s in mine if s.kv_location == "device"]
    on_host = [s for s in mine if s.kv_location == "host"]
    in_batch = set(batch)
    plan = MemoryPlan(upload=[s for s in batch if s.kv_location == "host"])
    needed = sum(1 for s in batch if s.kv_location != "device")
    shortfall = needed - (executor.kv_slots - len(on_device))
    if shortfall > 0:
        victims = [s for s in reversed(on_device) if s not in in_batch][:shortfall]
        # The executor offloads before it uploads (the uploads need the freed slots), so the
        # caches about to be uploaded still take host room at that moment.
        host_room = executor.host_slots - len(on_host)
        plan.offload = victims[: max(0, host_room)]
        plan.drop = victims[len(plan.offload) :]
    # Slots left after this step; fill them with the next in line whose cache is on the host.
    free_after = executor.kv_slots - (len(on_device) - len(plan.offload) - len(plan.drop) + needed)
    next_in_line = [s for s in mine if s not in in_batch][: executor.max_batch_size]
    candidates = [s for s in next_in_line if s.kv_location == "host"]
    plan.prefetch = candidates[: max(0, free_after)]
    return plan


def apply_before_step(plan: MemoryPlan) -> None:
    """Record where caches are once the executor has carried out the plan's first half."""
    for sequence in plan.offload:
        sequence.cache_on_host()
    for sequence in plan.drop:
        sequence.lose_cache()
    for sequence in plan.upload:
        sequence.cache_on_device()


def apply_after_step(plan: MemoryPlan) -> None:
    """The executor uploads the prefetched caches right after its reply (into slots this plan
    left free, so they fit); the next step finds them on the device."""
    for sequence in plan.prefetch:
        if sequence.kv_location == "host":
            sequence.cache_on_device()
