"""Helpers for tests that need a cluster of their own, or the scheduler's iteration loop alone."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import structlog
from nats.aio.client import Client

from services.scheduler.cancellation import Cancellations
from services.scheduler.executors import ExecutorPool
from services.scheduler.intake import RequestIntake
from services.scheduler.iteration import IterationLoop
from services.scheduler.plans import PlanApplier
from services.scheduler.policy_base import SchedulerPolicy
from services.scheduler.tokens import TokenPublisher
from shared.bus import connect
from shared.cluster import LocalCluster
from shared.config import Settings
from shared.natsserver import EmbeddedNatsServer
from shared.runtime import ServiceContext


@contextlib.contextmanager
def running_nats(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[EmbeddedNatsServer]:
    """A real nats-server on a random loopback port, JetStream in a temp dir."""
    store = tmp_path_factory.mktemp(name)
    server = EmbeddedNatsServer(store, log_file=store / "nats-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def isolated_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    model_dir: Path,
    instances: int,
    env: dict[str, str],
    before_start: Callable[[str], None] | None = None,
) -> Iterator[LocalCluster]:
    """A cluster with its own nats-server: its scheduler shares no work with another's."""
    with running_nats(tmp_path_factory, f"{name}-nats") as server:
        cluster = LocalCluster(
            tmp_path_factory.mktemp(f"{name}-cluster"),
            instances=instances,
            model_dir=model_dir,
            nats_url=server.url,
            env=env,
        )
        try:
            if before_start is not None:
                before_start(server.url)  # e.g. put a model in the remote store first
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail after timeout."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > give_up:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def connected(cluster: LocalCluster) -> AsyncIterator[Client]:
    """A NATS connection to a test cluster, closed on the way out."""
    nc = await connect(cluster.nats_url, cluster.nats_settings(), name="test", deadline_s=10)
    try:
        yield nc
    finally:
        await nc.close()


def bare_iteration_loop(
    policy: SchedulerPolicy,
    *,
    pool: object = None,
    plans: object = None,
    intake: object = None,
    tokens: object = None,
    cancellations: object = None,
) -> IterationLoop:
    """The scheduler's iteration loop with stand-ins (None: never reached) for what it talks to,
    default settings, a logger and a stop event."""
    context = SimpleNamespace(settings=Settings(), log=structlog.get_logger(), stop=asyncio.Event())
    return IterationLoop(
        context=cast(ServiceContext, context),
        policy=policy,
        pool=cast(ExecutorPool, pool),
        plans=cast(PlanApplier, plans),
        intake=cast(RequestIntake, intake),
        tokens=cast(TokenPublisher, tokens),
        cancellations=cast(Cancellations, cancellations),
        eos_token_ids=frozenset(),
    )
