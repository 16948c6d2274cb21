"""What every service process shares: settings, logging, the NATS connection, a nats.micro
registration, signal handling and a clean drain on the way out."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.micro import add_service
from nats.micro.service import Service, ServiceConfig

from shared import __version__
from shared.bus import NatsUnavailableError, connect, connect_jetstream, resolve_nats_url
from shared.config import ConfigurationError, Settings
from shared.logging import configure_logging
from shared.metrics import METRICS_URL_KEY, start_metrics_server

# A stopping service's NATS connection: how long its drain may take before it is closed.
DRAIN_TIMEOUT_S = 10.0


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
    # What SIGTERM does; None: stop (SIGINT always stops). The executor drains first.
    on_sigterm: Callable[[], None] | None = None

    def sigterm(self) -> None:
        (self.on_sigterm or self.stop.set)()

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
    if jetstream:
        js = await connect_jetstream(nc, timeout_s, settings.nats.replicas)
    else:
        js = nc.jetstream(timeout=timeout_s)
    metrics_url = start_metrics_server(settings.metrics, name)
    context = ServiceContext(
        name=name, settings=settings, nc=nc, js=js, log=log, metrics_url=metrics_url
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, context.stop.set)
    loop.add_signal_handler(signal.SIGTERM, context.sigterm)
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
