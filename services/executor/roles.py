"""Plans give this instance its role: a pipeline stage (a layer range) of a replica, and the
instance serving the stage after it."""

from __future__ import annotations

import time
from dataclasses import replace

from services.executor import metrics
from services.executor.host import EngineHost
from services.executor.stage_link import Placement
from services.executor.weights import Tensors, WeightsExchange
from shared.loading.format import Layers
from shared.messages import DeviceRole, Plan
from shared.model.llama import WeightsSource


class RoleKeeper:
    def __init__(
        self,
        host: EngineHost,
        weights: WeightsExchange,
        placement: Placement,
        instance_id: str,
    ) -> None:
        self.host = host
        self.weights = weights
        self.placement = placement
        self.instance_id = instance_id
        self.log = host.log
        self.plan: Plan | None = None  # the last plan this instance took a role from

    async def take_role(self, plan: Plan) -> None:
        """Take this instance's role from a new plan: rebuild the engine for its layer range
        when the range changes; remember the next stage."""
        role = next((r for r in plan.roles if r.instance_id == self.instance_id), None)
        if role is None:
            return  # no role: keep serving what is here (e.g. finishing within a grace period)
        if not self._supported(plan):
            return
        self.placement.take(plan, role)
        previous, self.plan = self.plan, plan
        reload = plan.reloads_everything(previous)
        if role_layers(role) == self.host.engine.layers and not reload:
            return
        await self._load_stage(plan, role_layers(role), reload)

    def _supported(self, plan: Plan) -> bool:
        ranks = self.host.engine.world_size
        if plan.config.tensor == ranks:
            return True
        self.log.error(
            "role.unsupported",
            epoch=plan.epoch,
            plan_tensor=plan.config.tensor,
            reason=f"this instance runs {ranks} tensor-parallel ranks",
        )
        return False

    async def _load_stage(self, plan: Plan, wanted: Layers, reload: bool) -> None:
        """Rebuild the engine for ``wanted``: from tensors held here and sent by peers, or
        (a full reload, a plan that says so, a layer no peer sends) from the node's disk."""
        last = self.host.engine.n_layers - 1
        layers = None if wanted == (0, last) else wanted
        started = time.perf_counter()
        state: Tensors | None = None
        from_peers: dict[str, list[int]] = {}
        if not (reload or plan.weights_from_disk):
            state, from_peers = await self.weights.gather(plan, wanted)
        spec = replace(self.host.spec, layers=layers)
        # On the compute thread: steps already queued run first, later ones find the new engine.
        engine = self.host.engine
        self.host.engine = await self.host.run(engine.rebuild, spec, tensors_source(state))
        source = "disk" if state is None else ("peer" if from_peers else "local")
        seconds = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.labels("role", source).observe(seconds)
        self.log.info(
            "role.taken",
            epoch=plan.epoch,
            layers=layers,
            next_stage=self.placement.next_stage,
            from_peers=from_peers,
            seconds=round(seconds, 3),
        )


def role_layers(role: DeviceRole) -> Layers:
    return role.first_layer, role.last_layer


def tensors_source(state: Tensors | None) -> WeightsSource | None:
    """Gathered tensors as the engine's weights source (None: read them from disk)."""
    if state is None:
        return None
    return lambda _device: state
