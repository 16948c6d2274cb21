"""What every service process shares: settings, logging, the NATS connection, a nats.micro
registration, signal handling and a clean drain on the way out."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig
from pydantic import BaseModel, ValidationError

from shared import __version__
from shared.bus import NatsUnavailableError, connect, connect_jetstream, resolve_nats_url
from shared.codec import DecodeError, decode, encoding_from_headers
from shared.config import ConfigurationError, ModelSettings, Settings
from shared.logging import configure_logging
from shared.messages import (
    FetchModelReply,
    FetchModelRequest,
    HostLease,
    ModeReply,
    Plan,
    ReleaseLeaseRequest,
    ServingMode,
    TokenChunk,
)
from shared.metrics import METRICS_URL_KEY, start_metrics_server
from shared.rpc import (
    FETCH_ENDPOINT,
    LEASE_RELEASE_ENDPOINT,
    BadRequest,
    NoResponders,
    RpcError,
    RpcTimeout,
    call,
    respond_error,
)
from shared.subjects import (
    MODE_KEY,
    PLANS_STREAM,
    PLANS_SUBJECT,
    TOKENS_STREAM,
    admin_bucket,
    srv_subject,
    tokens_subject,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

# A stopping service's NATS connection: how long its drain may take before it is closed.
DRAIN_TIMEOUT_S = 10.0
# A loader that is still starting (no responders yet) is asked again this often.
LOADER_START_POLL_S = 0.5
# The last try of a model fetch waits at least this long for the loader's answer.
MIN_FETCH_WAIT_S = 0.1
# How often a plan follower looks at the stop signal while no plan arrives.
PLAN_POLL_S = 1.0
# Bound on the wait for each committed chunk while a request's chunks are read back.
CHUNK_READ_TIMEOUT_S = 10.0


@dataclass
class ServiceContext:
    """Handed to a service's body: its settings, connections and the stop signal."""

    name: str
    settings: Settings
    nc: Client
    js: JetStreamContext
    log: structlog.stdlib.BoundLogger
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Where this process serves its Prometheus metrics (None: off).
    metrics_url: str | None = None

    async def add_micro_service(
        self, description: str, metadata: dict[str, str] | None = None
    ) -> Service:
        """Register as a nats.micro service: answers $SRV PING/INFO/STATS (INFO's metadata
        says where the metrics are)."""
        metadata = dict(metadata or {})
        if self.metrics_url is not None:
            metadata[METRICS_URL_KEY] = self.metrics_url
        return await add_service(
            self.nc,
            ServiceConfig(
                name=self.name,
                version=__version__,
                description=description,
                metadata=metadata,
            ),
        )


ServiceBody = Callable[[ServiceContext], Awaitable[None]]


def run_service(
    name: str, body: ServiceBody, settings: Settings | None = None, jetstream: bool = True
) -> None:
    """Entry point of ``python -m services.<name>``: run ``body`` until SIGINT/SIGTERM.
    ``jetstream=False``: a service that uses no stream (its NATS user may have no JetStream
    rights) does not declare them."""
    settings = settings or Settings()
    log = configure_logging(settings.log, name)
    try:
        asyncio.run(_serve(name, body, settings, log, jetstream))
    except NatsUnavailableError as exc:
        log.error("service.nats_unavailable", error=str(exc))
        raise SystemExit(2) from None
    except (FileNotFoundError, ConfigurationError) as exc:
        # A configuration problem: say what to fix instead of a traceback.
        log.error("service.cannot_start", error=str(exc))
        raise SystemExit(3) from None


async def _serve(
    name: str,
    body: ServiceBody,
    settings: Settings,
    log: structlog.stdlib.BoundLogger,
    jetstream: bool = True,
) -> None:
    url = resolve_nats_url(settings.nats)
    nc = await connect(url, settings.nats, name=name)
    timeout_s = settings.nats.request_timeout_s
    js = await connect_jetstream(nc, timeout_s) if jetstream else nc.jetstream(timeout=timeout_s)
    metrics_url = start_metrics_server(settings.metrics, name)
    context = ServiceContext(
        name=name, settings=settings, nc=nc, js=js, log=log, metrics_url=metrics_url
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, context.stop.set)
    log.info("service.started", nats_url=url)
    try:
        await body(context)
    finally:
        log.info("service.stopping")
        try:
            await asyncio.wait_for(nc.drain(), timeout=DRAIN_TIMEOUT_S)
        except Exception as exc:  # timeout or a broken connection: close regardless
            log.warning("service.drain_failed", error=repr(exc))
            await nc.close()
        log.info("service.stopped")


async def discover(
    nc: Client,
    service: str | None,
    verb: str = "INFO",
    window_s: float = 0.3,
    enough: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Ask every instance of a nats.micro service (None: of every service); collect the
    replies for ``window_s`` (or until a reply for which ``enough`` is true, the last one)."""
    replies: list[dict[str, Any]] = []
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish(srv_subject(verb, service), b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + window_s
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                message = await subscription.next_msg(timeout=remaining)
            except TimeoutError:
                break
            try:
                replies.append(json.loads(message.data))
            except ValueError:
                continue
            if enough is not None and enough(replies[-1]):
                break
    finally:
        await subscription.unsubscribe()
    return replies


async def resolve_model(context: ServiceContext) -> Path:
    """The model directory this service uses: fetched through this node's loader when
    ``model.name`` is set, else the configured directory or the embedded default."""
    if context.settings.model.name is None:
        return await asyncio.to_thread(resolve_model_dir, context.settings.model)
    return Path((await fetch_model(context)).path)


def node_name(settings: Settings) -> str:
    return settings.loader.node or socket.gethostname().split(".")[0]


async def fetch_model(context: ServiceContext, host_lease: bool = False) -> FetchModelReply:
    """Ask this node's loader for ``model.name`` (waiting for a loader that is still starting)."""
    settings = context.settings.model
    assert settings.name is not None
    node = node_name(context.settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.fetch_timeout_s
    body = FetchModelRequest(model=settings.name, host_lease=host_lease)
    while True:
        remaining = deadline - loop.time()
        try:
            fetched = await call(
                context.nc,
                FETCH_ENDPOINT,
                body,
                address=node,
                timeout_s=max(remaining, MIN_FETCH_WAIT_S),
            )
            break
        except NoResponders:
            if remaining <= 0:
                raise ConfigurationError(f"no loader answers on node {node!r}") from None
            await asyncio.sleep(LOADER_START_POLL_S)
        except RpcTimeout:
            raise ConfigurationError(
                f"the loader of node {node!r} did not deliver {settings.name!r} within"
                f" {settings.fetch_timeout_s:.0f} s"
            ) from None
        except RpcError as exc:
            raise ConfigurationError(f"cannot get model {settings.name!r}: {exc.message}") from None
    context.log.info("model.fetched", model=settings.name, tier=fetched.tier, path=fetched.path)
    return fetched


async def release_host_lease(context: ServiceContext, lease: HostLease) -> None:
    """Give a host-pool lease back; if this fails the lease simply expires."""
    node = node_name(context.settings)
    body = ReleaseLeaseRequest(lease_id=lease.lease_id)
    try:
        await call(context.nc, LEASE_RELEASE_ENDPOINT, body, address=node)
    except RpcError as exc:
        context.log.warning("lease.release_failed", lease_id=lease.lease_id, error=repr(exc))


def resolve_model_dir(settings: ModelSettings) -> Path:
    """The configured model directory, or the embedded default (created if missing)."""
    from shared.model.checkpoint import default_model_dir, ensure_model

    if settings.path is not None:
        if not (settings.path / "config.json").exists():
            raise FileNotFoundError(
                f"model directory {settings.path} has no config.json: give an HF Llama-family"
                " directory, or create one with `spotserve model init DIR`"
            )
        return settings.path
    return ensure_model(default_model_dir(settings.size), settings.size, seed=settings.seed)


def registration_only(description: str) -> ServiceBody:
    """A body that registers the service and waits for the stop signal (no endpoints yet)."""

    async def body(context: ServiceContext) -> None:
        await context.add_micro_service(description)
        await context.stop.wait()

    return body


async def parse_request(request: Request, model: type[ModelT], what: str) -> ModelT | None:
    """A raw handler's request body as ``model``, read in the request's encoding; None after
    answering 400 (through shared.rpc) when it is not one. Typed handlers get their body
    parsed by their endpoint instead (shared.rpc.add_endpoint)."""
    try:
        return model.model_validate(decode(request.data, encoding_from_headers(request.headers)))
    except (DecodeError, ValidationError) as exc:
        await respond_error(request, BadRequest(f"bad {what}: {exc}"))
        return None


async def follow_plans(context: ServiceContext, on_plan: Callable[[Plan], Awaitable[None]]) -> None:
    """Hand each new plan to ``on_plan``, from the current one on, until the service stops. A
    plan whose epoch is not newer than the last one handed over is stale and never acted on."""
    subscription = await context.js.subscribe(
        PLANS_SUBJECT, stream=PLANS_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.LAST
    )
    epoch = 0
    try:
        while not context.stop.is_set():
            try:
                message = await subscription.next_msg(timeout=PLAN_POLL_S)
            except TimeoutError:
                continue
            try:
                plan = Plan.model_validate(decode(message.data))
            except (DecodeError, ValidationError) as exc:
                context.log.error("plan.unreadable", error=str(exc))
                continue
            if plan.epoch <= epoch:
                context.log.warning("plan.stale", epoch=plan.epoch, current=epoch)
                continue
            epoch = plan.epoch
            await on_plan(plan)
    finally:
        await subscription.unsubscribe()


async def read_serving_mode(context: ServiceContext) -> ServingMode | None:
    """The serving mode admission keeps (``spotserve`` when never set); None when it cannot
    be read right now (the caller keeps what it has)."""
    try:
        bucket = await admin_bucket(context.js)
        entry = await bucket.get(MODE_KEY)
        return ModeReply.model_validate(decode(entry.value or b"")).mode
    except NotFoundError:
        return "spotserve"
    except (NatsError, JetStreamError, TimeoutError, DecodeError, ValidationError) as exc:
        context.log.warning("mode.unreadable", error=repr(exc))
        return None


async def read_committed_chunks(
    js: JetStreamContext, request_id: str, timeout_s: float = CHUNK_READ_TIMEOUT_S
) -> list[TokenChunk]:
    """A request's committed chunks (the TOKENS stream), in index order; [] when none."""
    subject = tokens_subject(request_id)
    try:
        last = await js.get_last_msg(TOKENS_STREAM, subject)
    except NotFoundError:
        return []
    count = TokenChunk.model_validate(decode(last.data or b"")).index + 1
    subscription = await js.subscribe(
        subject, ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    chunks: list[TokenChunk] = []
    try:
        while len(chunks) < count:
            message = await subscription.next_msg(timeout=timeout_s)
            chunk = TokenChunk.model_validate(decode(message.data))
            if chunk.index == len(chunks):
                chunks.append(chunk)
    finally:
        await subscription.unsubscribe()
    return chunks
