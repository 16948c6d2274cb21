"""Cloud metadata adapters: does the cloud say this VM is about to be taken away?

Each adapter polls its cloud's instance-metadata endpoint (the base URL is configurable so
that tests, and odd networks, can point it elsewhere) and answers a :class:`CloudNotice` or
None. Calls are blocking (``urllib``, no proxy, with a timeout): run them in a thread.

- AWS IMDSv2: ``PUT /latest/api/token`` (header ``X-aws-ec2-metadata-token-ttl-seconds``), then
  ``GET /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token``: 404 means no
  notice; 200 is ``{"action": "terminate"|"stop"|"hibernate", "time": "2017-09-18T08:22:00Z"}``.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google`` answers
  ``TRUE`` or ``FALSE``; the VM is gone 30 s after it turns ``TRUE`` (counted from the first
  poll that saw it).
- Azure Scheduled Events: ``GET /metadata/scheduledevents?api-version=2020-07-01`` with
  ``Metadata: true``: a ``Preempt`` event (for this VM when a name is given) whose
  ``NotBefore`` (RFC 1123) is the deadline. Events are never acknowledged here: that would
  only hasten the eviction.

A response that does not have the documented shape raises :class:`MetadataError` (the agent
logs it and polls again); an unreachable endpoint raises :class:`MetadataUnreachableError`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

Provider = Literal["aws", "gcp", "azure"]
PROVIDERS: tuple[Provider, ...] = ("aws", "gcp", "azure")

AWS_DEFAULT_URL = "http://169.254.169.254"
GCP_DEFAULT_URL = "http://metadata.google.internal"
AZURE_DEFAULT_URL = "http://169.254.169.254"
GCP_GRACE_S = 30.0
AWS_TOKEN_TTL_S = 21600
AZURE_API_VERSION = "2020-07-01"
MAX_BODY_BYTES = 64 * 1024


class MetadataError(Exception):
    """The metadata endpoint answered something that is not what its cloud documents."""


class MetadataUnreachableError(MetadataError):
    """The metadata endpoint could not be reached (or did not answer in time)."""


@dataclass(frozen=True)
class CloudNotice:
    """A preemption the cloud announced."""

    # Identity of the notice: the agent forwards each key once.
    key: str
    # Unix seconds when the VM will be gone.
    deadline: float
    action: str
    detail: dict[str, Any] = field(default_factory=dict)


class CloudAdapter(Protocol):
    provider: Provider

    def poll(self) -> CloudNotice | None: ...


# No proxy: the metadata endpoints are link-local, an http_proxy in the environment must not
# see (or break) these calls.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def http_call(
    method: str, url: str, headers: dict[str, str], timeout_s: float, data: bytes | None = None
) -> HttpReply:
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return HttpReply(response.status, dict(response.headers), response.read(MAX_BODY_BYTES))
    except urllib.error.HTTPError as exc:  # a status the caller judges (404 is an answer)
        body = exc.read(MAX_BODY_BYTES) if exc.fp is not None else b""
        return HttpReply(exc.code, dict(exc.headers or {}), body)
    except (urllib.error.URLError, OSError) as exc:  # refused, unresolvable, timed out
        raise MetadataUnreachableError(f"{method} {url}: {exc}") from None


def _excerpt(reply: HttpReply) -> str:
    text = reply.text().strip().replace("\n", " ")
    return text[:200] + ("…" if len(text) > 200 else "")


class AwsImds:
    """AWS IMDSv2 spot instance-action."""

    provider: Provider = "aws"

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = (base_url or AWS_DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.clock = clock
        self._token: str | None = None
        self._token_expires = 0.0

    def _get_token(self) -> str:
        if self._token is not None and self.clock() < self._token_expires:
            return self._token
        reply = http_call(
            "PUT",
            f"{self.base_url}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)},
            self.timeout_s,
            data=b"",
        )
        token = reply.text().strip()
        if reply.status != 200 or not token:
            raise MetadataError(
                f"IMDSv2 token request answered HTTP {reply.status}: {_excerpt(reply)!r}"
            )
        self._token = token
        # Renew well before the server forgets it.
        self._token_expires = self.clock() + AWS_TOKEN_TTL_S / 2
        return token

    def poll(self) -> CloudNotice | None:
        url = f"{self.base_url}/latest/meta-data/spot/instance-action"
        reply = http_call(
            "GET", url, {"X-aws-ec2-metadata-token": self._get_token()}, self.timeout_s
        )
        if reply.status == 401:  # the token expired early (e.g. IMDS restarted): once more
            self._token = None
            reply = http_call(
                "GET", url, {"X-aws-ec2-metadata-token": self._get_token()}, self.timeout_s
            )
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise MetadataError(f"spot/instance-action answered HTTP {reply.status}")
        try:
            body = json.loads(reply.body)
            action = body["action"]
            when = body["time"]
            if not isinstance(action, str) or not isinstance(when, str):
                raise TypeError("action and time must be strings")
            deadline = datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(
                f"spot/instance-action is not {{action, time}}: {exc!r}; body {_excerpt(reply)!r}"
            ) from None
        if action not in ("terminate", "stop", "hibernate"):
            raise MetadataError(f"spot/instance-action has an unknown action {action!r}")
        return CloudNotice(
            key=f"aws:{action}:{when}",
            deadline=deadline.timestamp(),
            action=action,
            detail={"action": action, "time": when},
        )


class GcpMetadata:
    """GCP ``instance/preempted``; the deadline is 30 s after the first poll that saw TRUE."""

    provider: Provider = "gcp"

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        grace_s: float = GCP_GRACE_S,
    ) -> None:
        self.base_url = (base_url or GCP_DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.clock = clock
        self.grace_s = grace_s
        self._seen_at: float | None = None

    def poll(self) -> CloudNotice | None:
        reply = http_call(
            "GET",
            f"{self.base_url}/computeMetadata/v1/instance/preempted",
            {"Metadata-Flavor": "Google"},
            self.timeout_s,
        )
        if reply.status != 200:
            raise MetadataError(
                f"instance/preempted answered HTTP {reply.status}: {_excerpt(reply)!r}"
            )
        value = reply.text().strip().upper()
        if value == "FALSE":
            self._seen_at = None
            return None
        if value != "TRUE":
            raise MetadataError(f"instance/preempted is not TRUE/FALSE: {_excerpt(reply)!r}")
        if self._seen_at is None:
            self._seen_at = self.clock()
        return CloudNotice(
            key=f"gcp:preempted:{self._seen_at:.3f}",
            deadline=self._seen_at + self.grace_s,
            action="preempt",
            detail={"preempted": True},
        )


class AzureScheduledEvents:
    """Azure Scheduled Events: the earliest ``Preempt`` event for this VM."""

    provider: Provider = "azure"

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: float = 2.0,
        vm_name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = (base_url or AZURE_DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.vm_name = vm_name
        self.clock = clock

    def poll(self) -> CloudNotice | None:
        reply = http_call(
            "GET",
            f"{self.base_url}/metadata/scheduledevents?api-version={AZURE_API_VERSION}",
            {"Metadata": "true"},
            self.timeout_s,
        )
        if reply.status != 200:
            raise MetadataError(
                f"scheduledevents answered HTTP {reply.status}: {_excerpt(reply)!r}"
            )
        try:
            document = json.loads(reply.body)
            events = document["Events"]
            if not isinstance(events, list):
                raise TypeError("Events is not a list")
            notices = [self._notice(event) for event in events]
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(
                f"scheduledevents is not a Scheduled Events document: {exc!r};"
                f" body {_excerpt(reply)!r}"
            ) from None
        found = [notice for notice in notices if notice is not None]
        return min(found, key=lambda notice: notice.deadline) if found else None

    def _notice(self, event: Any) -> CloudNotice | None:
        if not isinstance(event, dict):
            raise TypeError("an event is not an object")
        if event["EventType"] != "Preempt":
            return None
        resources = event.get("Resources") or []
        if not isinstance(resources, list):
            raise TypeError("Resources is not a list")
        if self.vm_name is not None and self.vm_name not in resources:
            return None
        if event.get("EventStatus", "Scheduled") not in ("Scheduled", "Started"):
            return None
        event_id = event["EventId"]
        if not isinstance(event_id, str) or not event_id:
            raise TypeError("EventId is not a string")
        not_before = event.get("NotBefore") or ""
        # Empty once the event has started: the VM goes now.
        deadline = self.clock()
        if not_before:
            when = parsedate_to_datetime(not_before)
            deadline = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        return CloudNotice(
            key=f"azure:{event_id}",
            deadline=deadline,
            action="preempt",
            detail={"EventId": event_id, "NotBefore": not_before, "Resources": resources},
        )


def make_adapter(
    provider: str,
    base_url: str | None = None,
    timeout_s: float = 2.0,
    vm_name: str | None = None,
) -> CloudAdapter:
    if provider == "aws":
        return AwsImds(base_url, timeout_s)
    if provider == "gcp":
        return GcpMetadata(base_url, timeout_s)
    if provider == "azure":
        return AzureScheduledEvents(base_url, timeout_s, vm_name=vm_name)
    raise ValueError(f"unknown cloud provider {provider!r}; choose from {', '.join(PROVIDERS)}")
