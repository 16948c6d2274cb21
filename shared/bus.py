"""NATS connection handling: resolve the URL, connect with retry, drain on the way out."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import structlog
from nats.aio.client import Client
from nats.errors import AuthorizationError, NoServersError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from shared.config import NatsSettings, spotserve_home
from shared.security import inbox_prefix
from shared.subjects import ensure_streams

log = structlog.get_logger()

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# Between reconnect attempts to a server that went away (nats-py's own default is 2 s).
RECONNECT_WAIT_S = 0.5
# How often a first connection that is still being tried looks for a refusal or the deadline.
CONNECT_CHECK_S = 0.1
# Bound on each JetStream API call of a context made by connect_jetstream.
JETSTREAM_TIMEOUT_S = 10.0
# How long a starting service keeps asking JetStream to create its streams.
JETSTREAM_READY_S = 60.0


class NatsUnavailableError(RuntimeError):
    pass


class NatsAuthError(NatsUnavailableError):
    """The server refused this connection's user or password."""


def cluster_record_path() -> Path:
    """Where a running ``spotserve up`` records its NATS URL for the other CLI commands."""
    return spotserve_home() / "cluster.json"


def write_cluster_record(nats_url: str, credentials_dir: Path | None = None) -> None:
    path = cluster_record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    record = {
        "nats_url": nats_url,
        "pid": os.getpid(),
        "at": time.time(),
        "credentials_dir": str(credentials_dir) if credentials_dir else None,
    }
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def clear_cluster_record() -> None:
    path = cluster_record_path()
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def recorded_credentials_dir() -> Path | None:
    """The credentials directory of a live ``spotserve up`` on this machine, if it has one."""
    try:
        record = json.loads(cluster_record_path().read_text())
        os.kill(int(record["pid"]), 0)
        return Path(record["credentials_dir"]) if record.get("credentials_dir") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_nats_url() -> str | None:
    """The URL of a live ``spotserve up`` on this machine, if one recorded itself."""
    try:
        record = json.loads(cluster_record_path().read_text())
        os.kill(int(record["pid"]), 0)
        return str(record["nats_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def server_urls(url: str) -> list[str]:
    """The servers of a URL setting: one URL, or several separated by commas (a cluster)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise NatsUnavailableError(f"no NATS server URL in {url!r}")
    return urls


def resolve_nats_url(settings: NatsSettings, override: str | None = None) -> str:
    """--nats-url, else SPOTSERVE_NATS__URL, else the running `spotserve up`, else localhost."""
    return override or settings.url or recorded_nats_url() or DEFAULT_NATS_URL


async def connect(
    url: str,
    settings: NatsSettings,
    name: str,
    deadline_s: float | None = None,
    default_user: str | None = None,
) -> Client:
    """Connect, retrying until ``deadline_s`` (a service may start before the server).

    Credentials: ``settings.user`` with its password (or password file); else, for a cluster
    that ``spotserve up`` recorded with credentials, ``default_user``'s from there. A refused
    user or password is an error at once, not a retry."""
    budget = settings.connect_deadline_s if deadline_s is None else deadline_s
    user, password = credentials_for(settings, default_user)
    refused: list[Exception] = []
    untrusted: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        if _is_auth_error(exc):
            refused.append(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            untrusted.append(exc)
        await _log_error(exc)

    attempt = asyncio.ensure_future(
        nats.connect(
            servers=server_urls(url),
            name=name,
            user=user,
            password=password,
            inbox_prefix=inbox_prefix(user),
            tls=tls_context(settings, url),
            connect_timeout=settings.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_S,
            error_cb=on_error,
            disconnected_cb=_log_event("nats.disconnected"),
            reconnected_cb=_log_event("nats.reconnected"),
        )
    )
    # nats-py retries an initial connect forever when reconnects are unlimited: bound it here,
    # and stop at the first authorization refusal (retrying cannot fix a wrong password).
    deadline = asyncio.get_running_loop().time() + budget
    try:
        while not attempt.done():
            if untrusted:  # retrying cannot make the certificate trusted either
                raise NatsUnavailableError(
                    f"NATS at {url}: TLS {untrusted[0]}; set SPOTSERVE_NATS__TLS_CA_FILE to the"
                    " CA that signed the server's certificate"
                )
            if refused:
                raise NatsAuthError(
                    f"NATS at {url} refused user {user!r}: {refused[0]}; check"
                    " SPOTSERVE_NATS__USER and SPOTSERVE_NATS__PASSWORD(_FILE)"
                )
            if asyncio.get_running_loop().time() > deadline:
                raise NatsUnavailableError(f"cannot reach NATS at {url} within {budget:.0f} s")
            await asyncio.wait({attempt}, timeout=CONNECT_CHECK_S)
        return attempt.result()
    except (NoServersError, OSError) as exc:
        raise NatsUnavailableError(f"cannot reach NATS at {url}: {exc!r}") from None
    except NatsError as exc:
        if _is_auth_error(exc):
            raise NatsAuthError(f"NATS at {url} refused user {user!r}: {exc}") from None
        raise NatsUnavailableError(f"cannot connect to NATS at {url}: {exc!r}") from None
    finally:
        if not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)


def credentials_for(
    settings: NatsSettings, default_user: str | None
) -> tuple[str | None, str | None]:
    """(user, password) for a connection: the configured ones, else those of the cluster
    ``spotserve up`` recorded (``default_user``: e.g. ``client`` for the CLI)."""
    if settings.user is not None:
        return settings.user, settings.resolved_password()
    directory = recorded_credentials_dir()
    if default_user is None or directory is None:
        return None, None
    path = directory / f"{default_user}.password"
    try:
        return default_user, path.read_text(encoding="utf-8").strip()
    except OSError:
        return None, None


def tls_context(settings: NatsSettings, url: str) -> ssl.SSLContext | None:
    """A client TLS context when the URL is tls:// or any TLS file is configured."""
    files = (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
    tls_url = any(server.startswith("tls://") for server in server_urls(url))
    if not tls_url and not any(files):
        return None
    context = ssl.create_default_context(cafile=str(settings.tls_ca_file or "") or None)
    if settings.tls_cert_file is not None:
        context.load_cert_chain(str(settings.tls_cert_file), settings.tls_key_file)
    return context


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, AuthorizationError) or "authorization violation" in text


async def connect_jetstream(
    nc: Client,
    timeout_s: float = JETSTREAM_TIMEOUT_S,
    replicas: int = 1,
    ready_s: float = JETSTREAM_READY_S,
) -> JetStreamContext:
    """A JetStream context whose streams, buckets and object store exist (``replicas`` each
    when this call creates them). A JetStream that does not answer in time (a cluster electing
    leaders, or creating the same replicated streams for every other starting service) is
    asked again for ``ready_s``; then :class:`NatsUnavailableError`."""
    js = nc.jetstream(timeout=timeout_s)
    deadline = time.monotonic() + ready_s
    delay_s = 0.5
    while True:
        try:
            await ensure_streams(js, replicas)
            return js
        except (NatsError, TimeoutError) as exc:
            if time.monotonic() + delay_s > deadline:
                raise NatsUnavailableError(
                    f"JetStream did not create spotserve's streams within {ready_s:g} s"
                    f" (last error: {exc!r}); is JetStream enabled, and may this user use it?"
                ) from exc
            log.warning("jetstream.not_ready", error=repr(exc), retry_in_s=delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)


async def reconnected_since(nc: Client, reconnects: int, poll_s: float = 0.2) -> None:
    """Return once ``nc`` has reconnected (again) since its count was ``reconnects``."""
    # The counter belongs to nats-py's client (no event to wait on): polled.
    while nc.stats["reconnects"] == reconnects:  # noqa: ASYNC110
        await asyncio.sleep(poll_s)


async def _log_error(exc: Exception) -> None:
    # Connection refusals repeat every retry while a server is down: keep them at debug.
    level = log.debug if isinstance(exc, ConnectionRefusedError) else log.warning
    level("nats.error", error=repr(exc))


def _log_event(event: str) -> Callable[[], Awaitable[None]]:
    async def callback() -> None:
        log.info(event)

    return callback
