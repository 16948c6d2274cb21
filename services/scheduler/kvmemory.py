"""KV-cache memory planning for one executor iteration (FastServe's proactive swapping), in the
executor's paged blocks.

The executor's device cache holds ``kv_blocks`` blocks of ``block_size`` positions; a sequence
holds the blocks its cached tokens need, and an iteration grows each sequence of the batch by
the tokens it feeds. Before an iteration, every sequence of the batch must be resident with
room to grow: when the blocks do not suffice, the caches of the sequences least likely to run
soon (the tail of the policy's priority order) go to host memory (at most ``host_slots``
sequences there) — or, when the host swap is full too, are dropped (the sequence then recomputes
its prefill from its committed tokens). A batch whose own growth does not fit the whole cache
runs its longest-fitting prefix. After the iteration, offloaded caches of the sequences next in
line are uploaded into the blocks left free, so the next batch finds them ready ("proactive"
upload: the executor does it after replying, overlapped with the scheduler's commit and
planning of the next iteration). The executor's engine counts blocks by the same rule
(``shared.model.blocks.blocks_for``), so a plan made here is never refused there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.policy_base import ExecutorView
from services.scheduler.sequence import Sequence
from shared.model.blocks import blocks_for


@dataclass
class MemoryPlan:
    batch: list[Sequence] = field(default_factory=list)  # what runs: the batch, as far as it fits
    offload: list[Sequence] = field(default_factory=list)  # device -> host, before the step
    drop: list[Sequence] = field(default_factory=list)  # freed without a copy (host swap full)
    upload: list[Sequence] = field(default_factory=list)  # host -> device, before the step
    prefetch: list[Sequence] = field(default_factory=list)  # host -> device, after the step

    @property
    def moves_caches(self) -> bool:
        """Whether the executor must move or free a cache for it."""
        return bool(self.offload or self.drop or self.upload or self.prefetch)


def held_blocks(executor: ExecutorView, sequence: Sequence) -> int:
    """Blocks its cache takes on the device (or would, uploaded) once the steps it is in
    have run."""
    return blocks_for(sequence.cached_after_pending, executor.block_size)


def blocks_after_step(executor: ExecutorView, sequence: Sequence) -> int:
    """Blocks its cache takes once this iteration has fed its tokens (all of them, cached)."""
    return blocks_for(sequence.known_tokens + sequence.pending, executor.block_size)


def plan_memory(executor: ExecutorView, batch: list[Sequence], order: list[Sequence]) -> MemoryPlan:
    """What must move so that ``batch`` fits; ``order`` is the policy's priority order."""
    mine = [s for s in order if s.executor == executor.instance_id]
    # A sequence in the step running now is on the device once it is done (a prefill too).
    on_device = [s for s in mine if s.kv_location == "device" or s.pending > 0]
    on_host = [s for s in mine if s.kv_location == "host"]
    runs, used = [], 0
    for sequence in batch:
        needed = blocks_after_step(executor, sequence)
        if used + needed > executor.kv_blocks:
            break
        runs.append(sequence)
        used += needed
    in_batch = set(runs)
    plan = MemoryPlan(batch=runs, upload=[s for s in runs if s.kv_location == "host"])
    others = [s for s in on_device if s not in in_batch]
    free = executor.kv_blocks - used - sum(held_blocks(executor, s) for s in others)
    victims = []
    for sequence in reversed(others):
        if free >= 0:
            break
        victims.append(sequence)
        free += held_blocks(executor, sequence)
    # The executor offloads before it uploads (the uploads need the freed blocks), so the
    # caches about to be uploaded still take host room at that moment.
    host_room = executor.host_slots - len(on_host)
    plan.offload = victims[: max(0, host_room)]
    plan.drop = victims[len(plan.offload) :]
    # Blocks left after this step; fill them with the next in line whose cache is on the host.
    next_in_line = [s for s in mine if s not in in_batch][: executor.max_batch_size]
    for sequence in (s for s in next_in_line if s.kv_location == "host"):
        if held_blocks(executor, sequence) > free:
            break
        plan.prefetch.append(sequence)
        free -= held_blocks(executor, sequence)
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
    """The executor uploads the prefetched caches right after its reply (into blocks this plan
    left free, so they fit); the next step finds them on the device."""
    for sequence in plan.prefetch:
        if sequence.kv_location == "host":
            sequence.cache_on_device()
