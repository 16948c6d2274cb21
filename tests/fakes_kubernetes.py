"""A local stand-in for the Kubernetes API server: nodes and pods, listed and watched the way
the real one answers (asyncio, on a loopback port, in the test's event loop).

- ``GET /api/v1/nodes`` and ``GET /api/v1/namespaces/<ns>/pods`` (``labelSelector`` with
  equality terms, ``limit``/``continue`` pages): a ``…List`` with ``metadata.resourceVersion``.
- ``?watch=1&resourceVersion=RV``: a chunked response of newline-delimited
  ``{"type", "object"}`` events after RV (every change has its own, cluster-wide increasing
  resourceVersion, as etcd's); a watch from a version older than the last compaction gets an
  ``ERROR`` event with a 410 Status, as the real server does. ``timeoutSeconds`` ends it.
- ``Authorization: Bearer <token>`` is required (401 with a Status otherwise).

The test drives the streams: :meth:`bookmark`, :meth:`expire` (410 to the open watches and
everything before now compacted), :meth:`end_watches` (a normal end, like timeoutSeconds),
:meth:`drop` (the connection cut mid-stream), :meth:`garbage` (a malformed line), and
:meth:`pause`/:meth:`resume` (changes are stored but not streamed meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import ssl
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Resource = Literal["nodes", "pods"]
RESOURCES: tuple[Resource, ...] = ("nodes", "pods")
KINDS = {"nodes": "Node", "pods": "Pod"}
EXECUTOR_LABELS = {"app.kubernetes.io/component": "executor"}


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_node(
    name: str,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, Any]] | None = None,
    unschedulable: bool = False,
    provider_id: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    if provider_id:
        spec["providerID"] = provider_id
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": spec,
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
    }


def make_pod(
    name: str, node: str, namespace: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(EXECUTOR_LABELS if labels is None else labels),
            "ownerReferences": [{"kind": "ReplicaSet", "name": "executor-5d9f"}],
        },
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 30},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


def taint(key: str, effect: str = "NoSchedule", added_at: float | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"key": key, "effect": effect}
    if added_at is not None:
        found["timeAdded"] = rfc3339(added_at)
    return found


def disruption(reason: str, at: float) -> dict[str, Any]:
    return {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": reason,
        "message": f"{reason} (fake)",
        "lastTransitionTime": rfc3339(at),
    }


@dataclass
class Request:
    resource: Resource | None
    watch: bool
    query: dict[str, str]
    authorized: bool


@dataclass(eq=False)
class Watch:
    resource: Resource
    selector: dict[str, str]
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)


def _selector(text: str) -> dict[str, str]:
    terms: dict[str, str] = {}
    for term in filter(None, text.split(",")):
        key, _, value = term.replace("==", "=").partition("=")
        terms[key.strip()] = value.strip()
    return terms


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


class FakeKubernetesApi:
    def __init__(self, token: str | None = "test-token", namespace: str = "spot") -> None:
        self.token = token
        self.namespace = namespace
        self.version = 1000
        self.objects: dict[Resource, dict[str, dict[str, Any]]] = {r: {} for r in RESOURCES}
        self.history: dict[Resource, list[tuple[int, str, dict[str, Any]]]] = {
            r: [] for r in RESOURCES
        }
        self.compacted: dict[Resource, int] = dict.fromkeys(RESOURCES, 0)
        self.last_event_version: dict[Resource, int] = dict.fromkeys(RESOURCES, 0)
        self.requests: list[Request] = []
        self.watches: set[Watch] = set()
        self.paused: set[Resource] = set()
        # Each event in two chunks (a client must not expect one event per chunk).
        self.split_chunks = False
        self._uids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._scheme = "http"
        self._writers: set[asyncio.StreamWriter] = set()

    # -- running -------------------------------------------------------------------------------

    async def start(self, tls: ssl.SSLContext | None = None) -> FakeKubernetesApi:
        """Serve (HTTPS with ``tls``, as the real API server always does)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self._scheme = "https" if tls is not None else "http"
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"{self._scheme}://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    # -- what the test sees --------------------------------------------------------------------

    def lists(self, resource: Resource) -> int:
        return sum(1 for r in self.requests if r.resource == resource and not r.watch)

    def watch_requests(self, resource: Resource) -> list[Request]:
        return [r for r in self.requests if r.resource == resource and r.watch]

    def watching(self, resource: Resource) -> int:
        return sum(1 for watch in self.watches if watch.resource == resource)

    @property
    def unauthorized(self) -> int:
        return sum(1 for r in self.requests if not r.authorized)

    # -- changing objects ----------------------------------------------------------------------

    def put(self, resource: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED)."""
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        name = metadata["name"]
        old = self.objects[resource].get(name)
        metadata["uid"] = old["metadata"]["uid"] if old else f"uid-{next(self._uids)}"
        self.version += 1
        metadata["resourceVersion"] = str(self.version)
        self.objects[resource][name] = obj
        self._record(resource, "MODIFIED" if old else "ADDED", obj)
        return obj

    def update(self, resource: Resource, name: str, change: Any) -> dict[str, Any]:
        """``change(obj)`` on a copy of the object, stored as a MODIFIED."""
        obj = copy.deepcopy(self.objects[resource][name])
        change(obj)
        return self.put(resource, obj)

    def delete(self, resource: Resource, name: str) -> None:
        obj = copy.deepcopy(self.objects[resource].pop(name))
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self._record(resource, "DELETED", obj)

    def _record(self, resource: Resource, kind: str, obj: dict[str, Any]) -> None:
        self.history[resource].append((self.version, kind, copy.deepcopy(obj)))
        self.last_event_version[resource] = self.version
        if resource in self.paused:
            return
        for watch in self._open(resource):
            if _matches(obj, watch.selector):
                watch.queue.put_nowait(("event", {"type": kind, "object": obj}))

    # -- driving the streams -------------------------------------------------------------------

    def _open(self, resource: Resource) -> list[Watch]:
        return [watch for watch in self.watches if watch.resource == resource]

    def bookmark(self, resource: Resource) -> str:
        version = str(self.version)
        event = {
            "type": "BOOKMARK",
            "object": {"kind": KINDS[resource], "metadata": {"resourceVersion": version}},
        }
        for watch in self._open(resource):
            watch.queue.put_nowait(("event", event))
        return version

    def expire(self, resource: Resource) -> None:
        """Compact everything before now: the open watches get ERROR 410 and end, and a watch
        from an older version is refused the same way."""
        self.compacted[resource] = self.version
        for watch in self._open(resource):
            watch.queue.put_nowait(("event", self._gone(self.last_event_version[resource])))
            watch.queue.put_nowait(("end", None))

    def end_watches(self, resource: Resource) -> None:
        for watch in self._open(resource):
            watch.queue.put_nowait(("end", None))

    def drop(self, resource: Resource) -> None:
        for watch in self._open(resource):
            watch.queue.put_nowait(("drop", None))

    def garbage(self, resource: Resource, line: bytes) -> None:
        for watch in self._open(resource):
            watch.queue.put_nowait(("raw", line))

    def pause(self, resource: Resource) -> None:
        self.paused.add(resource)

    def resume(self, resource: Resource) -> None:
        self.paused.discard(resource)

    def _gone(self, version: int) -> dict[str, Any]:
        return {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {version} ({self.version})",
                "reason": "Expired",
                "code": 410,
            },
        }

    # -- HTTP ----------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the fake is stopping
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1").split()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(request_line) < 2 or request_line[0] != "GET":
            return await self._send(writer, 405, self._status(405, "only GET"))
        url = urllib.parse.urlsplit(request_line[1])
        query = dict(urllib.parse.parse_qsl(url.query))
        resource: Resource | None = None
        if url.path == "/api/v1/nodes":
            resource = "nodes"
        elif url.path == f"/api/v1/namespaces/{self.namespace}/pods":
            resource = "pods"
        watch = query.get("watch") in ("1", "true")
        authorized = self.token is None or headers.get("authorization") == f"Bearer {self.token}"
        self.requests.append(Request(resource, watch, query, authorized))
        if not authorized:
            return await self._send(writer, 401, self._status(401, "Unauthorized"))
        if resource is None:
            return await self._send(writer, 404, self._status(404, "the server could not find"))
        selector = _selector(query.get("labelSelector", ""))
        if watch:
            return await self._watch(writer, resource, selector, query)
        return await self._list(writer, resource, selector, query)

    def _status(self, code: int, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                "code": code}  # fmt: skip

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _list(
        self,
        writer: asyncio.StreamWriter,
        resource: Resource,
        selector: dict[str, str],
        query: dict[str, str],
    ) -> None:
        items = [
            obj for _, obj in sorted(self.objects[resource].items()) if _matches(obj, selector)
        ]
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
        body = {"kind": f"{KINDS[resource]}List", "apiVersion": "v1", "metadata": metadata,
                "items": page}  # fmt: skip
        await self._send(writer, 200, body)

    async def _watch(
        self,
        writer: asyncio.StreamWriter,
        resource: Resource,
        selector: dict[str, str],
        query: dict[str, str],
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        since = int(query.get("resourceVersion") or 0)
        if since < self.compacted[resource]:
            await self._chunk(writer, json.dumps(self._gone(since)).encode() + b"\n")
            return await self._end(writer)
        watch = Watch(resource, selector)
        # No await between the snapshot and the registration: no change falls in between.
        backlog = [
            {"type": kind, "object": obj}
            for version, kind, obj in self.history[resource]
            if version > since and _matches(obj, selector)
        ]
        self.watches.add(watch)
        try:
            for event in backlog:
                await self._chunk(writer, json.dumps(event).encode() + b"\n")
            timeout_s = float(query.get("timeoutSeconds") or 1800)
            loop = asyncio.get_running_loop()
            ends_at = loop.time() + timeout_s
            while True:
                try:
                    what, item = await asyncio.wait_for(
                        watch.queue.get(), max(0.0, ends_at - loop.time())
                    )
                except TimeoutError:
                    return await self._end(writer)
                if what == "event":
                    await self._chunk(writer, json.dumps(item).encode() + b"\n")
                elif what == "raw":
                    await self._chunk(writer, item + b"\n")
                elif what == "end":
                    return await self._end(writer)
                elif what == "drop":
                    writer.transport.abort()
                    return
        finally:
            self.watches.discard(watch)

    async def _chunk(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        parts = [data[: len(data) // 2], data[len(data) // 2 :]] if self.split_chunks else [data]
        for part in parts:
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()

    async def _end(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"0\r\n\r\n")
        await writer.drain()
