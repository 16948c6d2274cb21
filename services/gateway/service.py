"""The gateway service: the FastAPI app served by uvicorn in the service's own event loop,
beside its NATS connection; registered as a nats.micro service whose metadata has its URL."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import uvicorn

from services.gateway import metrics
from services.gateway.app import GatewayState, create_app
from services.gateway.backend import Backend
from services.gateway.chat import ChatTemplate
from shared.config import ConfigurationError, Settings
from shared.metrics import HTTP_URL_KEY, url_host
from shared.model.tokenizer import TextTokenizer
from shared.modelsource import resolve_model
from shared.runtime import ServiceContext

SHUTDOWN_TIMEOUT_S = 15.0


def model_id_of(settings: Settings, model_dir: Path) -> str:
    """The name clients give as ``model``: configured, the remote store's name, the model
    directory's name, or ``spotserve-<size>`` for the embedded default."""
    if settings.gateway.model_id:
        return settings.gateway.model_id
    if settings.model.name:
        return settings.model.name
    if settings.model.path is not None:
        return model_dir.name
    return f"spotserve-{settings.model.size}"


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so port 0 gives a known free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"the gateway cannot listen on {host}:{port} ({exc.strerror}); set another port"
            " with SPOTSERVE_GATEWAY__PORT"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(context: ServiceContext) -> None:
    settings = context.settings
    model_dir = await resolve_model(context)
    tokenizer = await asyncio.to_thread(TextTokenizer.from_model_dir, model_dir)
    template = await asyncio.to_thread(ChatTemplate.from_model_dir, model_dir)
    state = GatewayState(
        settings=settings.gateway,
        backend=Backend(context.nc, settings.gateway),
        tokenizer=tokenizer,
        template=template,
        model_id=model_id_of(settings, model_dir),
        model_created=int((model_dir / "config.json").stat().st_mtime),
        max_body_bytes=settings.admission.max_request_bytes,
        api_key=settings.gateway.resolved_api_key(),
    )
    metrics.REQUESTS_IN_FLIGHT.set_function(lambda: state.backend.active_requests)
    sock = bind_socket(settings.gateway.host, settings.gateway.port)
    port = sock.getsockname()[1]
    http_url = f"http://{url_host(settings.gateway.host)}:{port}"
    config = uvicorn.Config(
        create_app(state), log_config=None, access_log=False, lifespan="off", workers=1
    )
    server = uvicorn.Server(config)
    # Server._serve, not serve(): serve() replaces the process's signal handlers, and here the
    # service runtime owns SIGTERM/SIGINT (a clean stop drains NATS too).
    http = asyncio.create_task(server._serve(sockets=[sock]), name="http")
    service = await context.add_micro_service(
        "OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)",
        metadata={HTTP_URL_KEY: http_url, "model": state.model_id},
    )
    context.log.info(
        "gateway.ready",
        url=http_url,
        model=state.model_id,
        chat_template="default" if template.is_default else "model",
    )
    stop = asyncio.create_task(context.stop.wait())
    await asyncio.wait({http, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    server.should_exit = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(http), SHUTDOWN_TIMEOUT_S)
    if http.done() and http.exception() is not None:
        context.log.error("gateway.http_failed", error=repr(http.exception()))
    await service.stop()
    sock.close()
