"""NATS accounts and permissions: a user per service, a client user, an operator user.

Each service's user may publish and subscribe only where the service works (its endpoints,
the streams and buckets it writes, the JetStream API, replies to inboxes). Only the planner may
publish plans, only the monitor fleet events, only the scheduler (and executors among
themselves) executor commands. The ``client`` user (and the HTTP ``gateway``) may only call
the public API (``spotserve.v1.generate``, ``spotserve.v1.result``,
``spotserve.v1.fleet.status``), find services through ``$SRV``, and read its own inbox,
``_INBOX.<user>.>`` (every connection of
spotserve uses that inbox prefix, so one client user cannot read another's token streams). The
``operator`` user (``spotserve fleet``, ``model push``, loadgen) may also send fleet commands,
switch the serving mode and upload models.

Passwords never live in an image or a file of the repository: ``spotserve security init DIR``
(and ``spotserve up`` at its first start) draws random ones and writes, with mode 0600,
``DIR/<user>.password`` for each user and ``DIR/nats-auth.conf`` (the ``authorization`` block
that the NATS server config includes; readable only by its owner). Services read theirs from
``SPOTSERVE_NATS__PASSWORD_FILE`` (or ``SPOTSERVE_NATS__PASSWORD``) with
``SPOTSERVE_NATS__USER``.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from shared.subjects import (
    ADMIN_BUCKET,
    ADMIN_MODE,
    API_PREFIX,
    CANCEL,
    COMMITS_SUBJECT,
    EXECUTOR_RECONNECTED_SUBJECTS,
    FLEET_ADD,
    FLEET_NOTICE,
    FLEET_STATUS,
    FLEET_SUBJECT_PREFIX,
    GENERATE,
    INSTANCES_BUCKET,
    INVENTORY_BUCKET,
    LOAD_BUCKET,
    MODELS_BUCKET,
    PLANS_SUBJECT,
    REQUESTS_BUCKET,
    REQUESTS_SUBJECT,
    RESULT,
    TOKENS_SUBJECT_PREFIX,
    TRANSFER_SUBJECT_PREFIX,
)

CLIENT_USER = "client"
OPERATOR_USER = "operator"
GATEWAY_USER = "gateway"
SERVICE_USERS = (
    "admission", "scheduler", "planner", "monitor", "loader", "executor", GATEWAY_USER,
)  # fmt: skip
ALL_USERS = (*SERVICE_USERS, CLIENT_USER, OPERATOR_USER)
AUTH_FILE = "nats-auth.conf"

EXECUTOR_SUBJECTS = f"{API_PREFIX}.executor.>"
LOADER_SUBJECTS = f"{API_PREFIX}.loader.>"
SCHEDULER_SUBJECTS = f"{API_PREFIX}.scheduler.>"
TRANSFER_SUBJECTS = f"{TRANSFER_SUBJECT_PREFIX}.>"


def kv(bucket: str) -> str:
    """The subjects a KV bucket's puts and deletes go to."""
    return f"$KV.{bucket}.>"


def inbox_prefix(user: str | None) -> str:
    """Every connection's inbox prefix: per user, so users cannot read each other's replies."""
    return f"_INBOX.{user}" if user else "_INBOX"


@dataclass(frozen=True)
class Permissions:
    publish: list[str]
    subscribe: list[str]


# What every service does: the JetStream API (streams, consumers, KV and object store reads),
# acks and flow control of its consumers, nats.micro ($SRV), replies to any inbox.
_SERVICE_PUBLISH = ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$SRV.>", "_INBOX.>"]
_SERVICE_SUBSCRIBE = ["$SRV.>", "_INBOX.>"]

_OWN: dict[str, Permissions] = {
    "admission": Permissions(
        publish=[REQUESTS_SUBJECT, kv(LOAD_BUCKET), kv(ADMIN_BUCKET), kv(REQUESTS_BUCKET)],
        subscribe=[GENERATE, RESULT, CANCEL, ADMIN_MODE],
    ),
    "scheduler": Permissions(
        # Commits tokens, drives executors; the token stream itself goes to client inboxes.
        publish=[f"{TOKENS_SUBJECT_PREFIX}.*", COMMITS_SUBJECT, EXECUTOR_SUBJECTS],
        subscribe=[SCHEDULER_SUBJECTS, EXECUTOR_RECONNECTED_SUBJECTS],
    ),
    "planner": Permissions(
        publish=[PLANS_SUBJECT, SCHEDULER_SUBJECTS],
        subscribe=[],
    ),
    "monitor": Permissions(
        publish=[f"{FLEET_SUBJECT_PREFIX}.*", kv(INSTANCES_BUCKET)],
        subscribe=[f"{API_PREFIX}.fleet.*"],
    ),
    "loader": Permissions(
        publish=[kv(INVENTORY_BUCKET)],
        subscribe=[LOADER_SUBJECTS],
    ),
    "executor": Permissions(
        # Stages hand micro-batches on, peers send weights and KV caches, loaders are asked;
        # an executor announces its own preemption (SIGTERM, a preStop hook, metadata agents).
        publish=[
            kv(INSTANCES_BUCKET),
            EXECUTOR_SUBJECTS,
            TRANSFER_SUBJECTS,
            LOADER_SUBJECTS,
            FLEET_NOTICE,
        ],
        subscribe=[EXECUTOR_SUBJECTS, TRANSFER_SUBJECTS],
    ),
}


def permissions(user: str) -> Permissions:
    if user in _OWN:
        own = _OWN[user]
        return Permissions(
            publish=[*_SERVICE_PUBLISH, *own.publish],
            subscribe=[*_SERVICE_SUBSCRIBE, *own.subscribe],
        )
    if user == GATEWAY_USER:
        # A client of the public API that is also a nats.micro service (answers $SRV pings):
        # no JetStream, no fleet commands.
        return Permissions(
            publish=[GENERATE, RESULT, CANCEL, FLEET_STATUS, "$SRV.>", "_INBOX.>"],
            subscribe=["$SRV.>", f"{inbox_prefix(user)}.>"],
        )
    if user == CLIENT_USER or user.startswith(f"{CLIENT_USER}-"):
        return Permissions(
            publish=[GENERATE, RESULT, CANCEL, FLEET_STATUS, "$SRV.>"],
            subscribe=[f"{inbox_prefix(user)}.>"],
        )
    if user == OPERATOR_USER:
        return Permissions(
            publish=[
                GENERATE,
                RESULT,
                CANCEL,
                FLEET_STATUS,
                FLEET_NOTICE,
                FLEET_ADD,
                ADMIN_MODE,
                "$SRV.>",
                # `model push` (an object store put) and reading plans and the fleet.
                "$JS.API.>",
                f"$O.{MODELS_BUCKET}.>",
            ],
            subscribe=[f"{inbox_prefix(user)}.>"],
        )
    raise ValueError(f"unknown NATS user {user!r}; known: {', '.join(ALL_USERS)}")


@dataclass
class Credentials:
    """User -> password, as written by :func:`init_credentials`."""

    directory: Path
    passwords: dict[str, str] = field(default_factory=dict)

    def password(self, user: str) -> str:
        return self.passwords[user]

    def password_file(self, user: str) -> Path:
        return self.directory / f"{user}.password"

    @property
    def auth_file(self) -> Path:
        return self.directory / AUTH_FILE


def init_credentials(directory: Path, users: tuple[str, ...] = ALL_USERS) -> Credentials:
    """Random passwords for every user, written once (0600) and reused on later starts; a user
    added later gets one of its own. The directory is 0700."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    credentials = Credentials(directory)
    for user in users:
        path = credentials.password_file(user)
        if path.exists():
            credentials.passwords[user] = path.read_text(encoding="utf-8").strip()
            continue
        password = secrets.token_urlsafe(24)
        _write_private(path, password + "\n")
        credentials.passwords[user] = password
    _write_private(credentials.auth_file, authorization_block(credentials.passwords))
    return credentials


def authorization_block(passwords: dict[str, str]) -> str:
    """The nats-server config ``authorization`` block for these users."""
    lines = ["authorization {", "  users = ["]
    for user, password in passwords.items():
        allowed = permissions(user)
        lines.append(
            f"    {{user: {json.dumps(user)}, password: {json.dumps(password)},"
            f" permissions: {{publish: {{allow: {json.dumps(allowed.publish)}}},"
            f" subscribe: {{allow: {json.dumps(allowed.subscribe)}}}}}}}"
        )
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, never briefly readable by others."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def server_config(
    credentials: Credentials,
    listen: str,
    store_dir: Path,
    max_payload: int,
    http: str | None,
    tls: tuple[Path, Path] | None = None,
) -> str:
    """A whole nats-server config: JetStream, the users of ``credentials``, optional
    monitoring (``http``: host:port for /healthz) and TLS (``tls``: certificate and key)."""
    lines = [
        f"listen: {listen}",
        f"max_payload: {max_payload}",
        f"jetstream {{\n  store_dir: {json.dumps(str(store_dir))}\n}}",
    ]
    if http:
        lines.append(f"http: {http}")
    if tls is not None:
        cert, key = tls
        lines.append(
            f"tls {{\n  cert_file: {json.dumps(str(cert))}\n  key_file: {json.dumps(str(key))}\n}}"
        )
    return "\n".join(lines) + "\n" + authorization_block(credentials.passwords)


def write_server_config(path: Path, text: str) -> None:
    _write_private(path, text)
