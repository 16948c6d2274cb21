"""Reconfiguration: acting on the planner's plans. New requests go only to instances with a
role; the just-in-time arrangement says which requests on dying instances move, and after how
many more tokens; a move carries the KV cache peer to peer (executor migrate -> adopt) or
leaves it to be recomputed; the baselines restart requests from scratch.

The decisions are the pure functions of ``reconfigure`` (the fleet simulator takes the same
ones); this module carries them out on the executor pool.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from nats.errors import Error as NatsError

from services.scheduler import metrics, reconfigure
from services.scheduler.executors import ExecutorHandle, ExecutorPool
from services.scheduler.policy_base import SchedulerPolicy
from services.scheduler.reconfigure import BoundRequest, PlannedMove
from services.scheduler.sequence import Sequence
from shared.messages import KvAdoptCommand, KvMigrateCommand, Plan
from shared.rpc import ADOPT_ENDPOINT, MIGRATE_ENDPOINT, NoResponders, RpcError, RpcTimeout, call
from shared.runtime import ServiceContext


@dataclass
class PlanApplier:
    """Applies each new plan to the pool, and the moves it plans between iterations."""

    context: ServiceContext
    policy: SchedulerPolicy
    pool: ExecutorPool
    # The requests the scheduler holds, by request id (the intake's).
    held: Mapping[str, Sequence]

    async def apply_plan(self, plan: Plan) -> None:
        """Plans come through shared.readers.follow_plans: newer epochs only; without a
        planner, none come and every executor serves."""
        previous = self.pool.plan
        self.pool.follow(plan)
        metrics.PLAN_EPOCH.set(plan.epoch)
        executors = self.pool.executors
        restarting = reconfigure.restarts(plan, previous, executors)
        if plan.mode == "restart" and restarting:
            self.context.log.info("plan.restart_everything", epoch=plan.epoch)
        for instance_id in restarting:
            handle = executors[instance_id]
            handle.restart = True
            handle.moves.clear()
            handle.wake.set()
        bound = [
            BoundRequest(s.request_id, s.executor, len(s.generated)) for s in self.held.values()
        ]
        moves = reconfigure.planned_moves(plan, bound)
        for instance_id, group in reconfigure.moves_by_instance(moves, bound).items():
            if instance_id in executors:
                executors[instance_id].moves.update(group)
        moved = sum(1 for d in plan.jit if d.request_id in moves and d.action != "finish")
        self.context.log.info(
            "plan.applied",
            epoch=plan.epoch,
            serving=sorted({role.instance_id for role in plan.roles}),
            moving=moved,
        )
        self.pool.wake_all()

    def restart_on(self, handle: ExecutorHandle) -> None:
        """The restart baseline on ``handle``: drop its caches, its requests start again."""
        handle.restart = False
        handle.release_all = True
        handle.pending_release = []
        restarted = self.policy.requeue_executor(handle.view.instance_id)
        for sequence in restarted:
            sequence.restart_from_scratch()
        metrics.RESTARTS.inc(len(restarted))
        self.context.log.info(
            "requests.restarted",
            instance_id=handle.view.instance_id,
            request_ids=[sequence.request_id for sequence in restarted],
        )
        self.pool.wake_all()

    async def apply_moves(self, handle: ExecutorHandle) -> None:
        """Between two iterations of ``handle``: move off the requests whose time has come,
        with their KV cache when the plan says "migrate", else to be recomputed elsewhere."""
        if not handle.moves:
            return  # the per-iteration path: nothing to do outside reconfigurations
        here = handle.view.instance_id
        now = time.time()  # move_by is the planner's wall clock: same host or NTP-synced
        for request_id, move in list(handle.moves.items()):
            sequence = self.held.get(request_id)
            if sequence is None or sequence.finished or sequence.executor != here:
                del handle.moves[request_id]
                continue
            if not reconfigure.move_due(move, len(sequence.generated), now):
                continue
            del handle.moves[request_id]
            await self._move(handle, sequence, move)

    async def _move(self, handle: ExecutorHandle, sequence: Sequence, move: PlannedMove) -> None:
        here = handle.view.instance_id
        destination = reconfigure.least_loaded(
            self.pool.serving(exclude=here), (s.executor for s in self.held.values())
        )
        carried = False
        if destination is not None and reconfigure.carries_cache(
            move, self.pool.plan, destination, sequence.kv_location != "none"
        ):
            carried = await self._carry_cache(sequence, here, destination)
        if carried and destination is not None:
            self.policy.rebind(sequence, destination)
            sequence.cache_on_host()  # adopted into host memory; uploaded to run
            self.pool.executors[destination].wake.set()
        else:
            self.policy.requeue(sequence)
            handle.pending_release.append(sequence.request_id)
            self.pool.wake_all()
        metrics.MOVES.labels("kv_migration" if carried else "recompute").inc()
        self.context.log.info(
            "request.moved",
            request_id=sequence.request_id,
            source=here,
            destination=destination if carried else None,
            with_cache=carried,
            generated=len(sequence.generated),
        )

    async def _carry_cache(self, sequence: Sequence, source: str, destination: str) -> bool:
        """Move a request's KV cache source -> destination, peer to peer; False if anything
        failed (the request then recomputes its cache instead: nothing is lost)."""
        transfer_id = f"kv-{sequence.request_id}-{uuid.uuid4().hex[:8]}"
        adopt = KvAdoptCommand(request_id=sequence.request_id, transfer_id=transfer_id)
        migrate = KvMigrateCommand(
            request_id=sequence.request_id, destination=destination, transfer_id=transfer_id
        )
        nc, timeout_s = self.context.nc, self.context.settings.scheduler.step_timeout_s
        log = self.context.log.bind(request_id=sequence.request_id)
        adopting = asyncio.create_task(
            call(nc, ADOPT_ENDPOINT, adopt, address=destination, timeout_s=timeout_s)
        )
        try:
            await call(nc, MIGRATE_ENDPOINT, migrate, address=source, timeout_s=timeout_s)
            await adopting
        except (NoResponders, RpcTimeout, NatsError) as exc:
            adopting.cancel()
            log.warning("kv.move_failed", error=repr(exc))
            return False
        except RpcError as exc:
            adopting.cancel()  # nothing is coming: do not wait for the receiver's timeout
            log.warning("kv.move_refused", error=exc.message)
            return False
        return True
