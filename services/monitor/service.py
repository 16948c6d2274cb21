"""Monitor: the instance registry, leases, preemption notices and the fleet events.

Registry: executors put an :class:`InstanceRecord` under their instance id in the KV bucket
``spotserve-instances`` when they serve, re-put it every ``monitor.heartbeat_s`` and delete it
on a clean stop. The monitor watches the bucket and keeps each instance's lease on its own
clock (the time it last saw an update), so the instances' clocks do not matter. A lease that
ran out is confirmed over NATS first: an executor that still answers ``$SRV.INFO`` (its
heartbeats were not stored, e.g. while a clustered JetStream elected the bucket's leader)
keeps it.

Fleet events (stream ``SPOTSERVE_FLEET``, subject ``spotserve.v1.fleet.events.<kind>``), one per
change, in the order the monitor decided them:

- ``joined``: a new incarnation (instance id + its ``started_at``) appeared in the registry.
- ``preempt-notice``: a notice was accepted; ``deadline`` is when the instance will be gone
  (monitor clock). Repeats are folded: a later notice for the same incarnation publishes an
  updated event only when it moves the deadline earlier (by more than
  ``monitor.deadline_update_min_s``); otherwise the reply is the event already published.
- ``left``: an instance went away as announced: a clean delete of its key, or, after a
  preemption notice, its end by any means (SIGKILL at the deadline by the local provider, a
  lease that ran out, a delete).
- ``lost``: an instance went away without notice: its lease ran out (its key is deleted), or a
  new incarnation took its id without the old one deleting its key.

Exactly once: every event carries ``Nats-Msg-Id`` = its incarnation and change, so a retried
publish is dropped by the stream; a restarted monitor first rebuilds its state from the stream's
events and the bucket, then publishes only what changed while it was away. An incarnation that
has ended stays ended: its late heartbeats are removed from the bucket (an executor whose key
was removed registers again as a new incarnation, which is a new ``joined``).

Local provider (``monitor.local_provider``, the embedded cluster): ``fleet add`` starts new
executor processes as children of the monitor (same environment, PR_SET_PDEATHSIG, own log),
and a preemption notice ends in SIGKILL of the instance's process at the deadline when the
instance runs on this node (pid from its record, checked against /proc), followed by ``left``.
Merge rule: a notice for an instance that was added but has not joined yet cancels it: its
process is killed and no event is ever published for it (the planner never sees it). An add
followed by a notice for an instance that has joined gives joined + preempt-notice + left; the
planner merges those inside one grace period. Children still running when the monitor stops
are terminated.

Kubernetes (``monitor.kubernetes``): the monitor also watches the API server's nodes and
executor pods, and a spot reclaim it sees there becomes a notice for each registered executor
on the node (``services.monitor.kubernetes``); a rollout publishes nothing.

Parts: ``fleet`` (the state and its events, ``events`` the stream), ``registry`` (the bucket
and the leases), ``notices``, ``processes`` (the local provider), ``kubernetes`` and
``endpoints``.
"""

from __future__ import annotations

from functools import partial

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from services.monitor.endpoints import Endpoints, observe_instances
from services.monitor.fleet import Fleet
from services.monitor.kubernetes import KubernetesWatcher, resolve_config
from services.monitor.notices import Notices
from services.monitor.processes import LocalProcesses
from services.monitor.registry import Registry
from shared.discovery import discover
from shared.modelsource import node_name
from shared.rpc import (
    ADD_ENDPOINT,
    NOTICE_ENDPOINT,
    STATUS_ENDPOINT,
    add_endpoint,
    add_raw_endpoint,
)
from shared.runtime import ServiceContext
from shared.subjects import SERVICE_EXECUTOR, instances_bucket

# How long a lease check waits for executors' $SRV answers.
ANSWER_WINDOW_S = 0.5


async def answering(nc: Client) -> set[str]:
    """The instance ids of the executors that answer ``$SRV.INFO`` now (none without NATS)."""
    try:
        infos = await discover(nc, SERVICE_EXECUTOR, verb="INFO", window_s=ANSWER_WINDOW_S)
    except NatsError:
        return set()
    return {str((info.get("metadata") or {}).get("instance_id")) for info in infos}


class Monitor:
    """The monitor's parts on one node, wired together."""

    def __init__(self, context: ServiceContext, kv: KeyValue) -> None:
        self.settings = context.settings.monitor
        self.node = node_name(context.settings)
        self.log = context.log.bind(node=self.node)
        self.fleet = Fleet(context, kv, self.log)
        self.processes = LocalProcesses(context, self.fleet, self.node, self.log)
        self.notices = Notices(self.settings, self.fleet, self.processes, self.log)
        self.registry = Registry(
            self.settings, kv, self.fleet, self.notices, self.log, partial(answering, context.nc)
        )
        self.endpoints = Endpoints(self.settings, self.fleet, self.notices, self.processes)
        self.kubernetes: KubernetesWatcher | None = None
        if self.settings.kubernetes:  # a configuration problem stops the start here
            self.kubernetes = KubernetesWatcher(
                self.settings,
                resolve_config(self.settings),
                self.notices.apply,
                self._incarnation_of,
                self.log,
            )

    def _incarnation_of(self, instance_id: str) -> str | None:
        tracked = self.fleet.instances.get(instance_id)
        return None if tracked is None else tracked.incarnation

    async def start(self) -> None:
        await self.registry.start()
        if self.kubernetes is not None:  # after the rebuild: notices find the instances
            await self.kubernetes.start()

    async def stop(self) -> None:
        if self.kubernetes is not None:
            await self.kubernetes.stop()
        await self.registry.stop()
        await self.notices.stop()
        await self.processes.stop_all()


async def serve(context: ServiceContext) -> None:
    settings = context.settings.monitor
    if settings.lease_s <= settings.heartbeat_s:
        context.log.warning(
            "monitor.lease_too_short", lease_s=settings.lease_s, heartbeat_s=settings.heartbeat_s
        )
    monitor = Monitor(context, await instances_bucket(context.js))
    observe_instances(monitor.fleet)
    # Rebuild before answering anything: a notice must find the instances already known.
    await monitor.start()
    endpoints = monitor.endpoints
    service = await context.add_micro_service(
        "Watches the fleet: instance registry with leases, preemption notices, fleet events",
        metadata={
            "node": monitor.node,
            "lease_s": str(settings.lease_s),
            "local_provider": str(settings.local_provider).lower(),
            "kubernetes": str(settings.kubernetes).lower(),
        },
    )
    await add_raw_endpoint(service, NOTICE_ENDPOINT, endpoints.on_notice)
    await add_endpoint(service, ADD_ENDPOINT, endpoints.on_add, logger=monitor.log)
    await add_endpoint(service, STATUS_ENDPOINT, endpoints.on_status, logger=monitor.log)
    monitor.log.info("monitor.ready", instances=sorted(monitor.fleet.instances))
    try:
        await context.stop.wait()
        await service.stop()
    finally:
        await monitor.stop()
