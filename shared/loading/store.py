"""The remote tier: converted models in a JetStream Object Store bucket.

A model named ``NAME`` is stored as objects ``NAME/<file>`` (partitions, config and tokenizer
files) and ``NAME/index.json``, which is written LAST: a model whose index is missing is an
incomplete upload and is never pulled. Pulls write to a temp directory, check every partition
against the index (size and CRC32), then rename into place.

Objects are plain NATS Object Store objects (meta on ``$O.<bucket>.M.<name>``, chunks on
``$O.<bucket>.C.<nuid>``, a ``SHA-256=`` digest), so any NATS client can read and write them.
What differs from nats-py's ``ObjectStore.put``/``get`` is how the bytes move:

- put: 1 MiB chunks (the object's ``max_chunk_size``; nats-py writes 128 KiB) with several
  awaiting their JetStream ack at a time instead of one; file reads and hashing in a thread;
- get: a pull consumer asked for a window of chunks ahead, instead of nats-py's ordered push
  consumer, whose flow-control replies nats-py sends from a 250 ms poll when its reader is
  behind (the server stops sending until then: that capped a pull at ~60 MB/s); the SHA-256
  digest, the partition's CRC32 and the file writes in two threads, overlapping the network;
- the files of a model move concurrently.

Objects written by other clients (any chunk size) are read the same way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT, KeyValue
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_DIGEST_TYPE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from nats.nuid import NUID

from shared.loading.format import (
    INDEX_FILE,
    CheckpointError,
    PartitionEntry,
    convert,
    is_converted,
    read_index,
)
from shared.subjects import (
    MODELS_BUCKET,
    inventory_bucket_config,
    key_value_bucket,
    models_store_config,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STREAM = OBJ_STREAM_TEMPLATE.format(bucket=MODELS_BUCKET)

# Largest chunk written (capped by the server's max_payload, whose default is also 1 MiB).
# Measured on loopback: 256 KiB..2 MiB move alike; 8 MiB messages cost nats-server (and the
# client) more CPU per byte and pull ~35% slower.
CHUNK_BYTES = 1024 * 1024
# Chunks of one object published and not yet acknowledged by JetStream.
PUBLISH_WINDOW = 8
# Bytes of one object requested from the server and not yet received (read-ahead of a pull).
# With CONCURRENT_OBJECTS pulls at once, kept well under nats-server's max_pending (64 MiB
# per connection by default: a client further behind is cut off as a slow consumer). On
# loopback 8 MiB pulls as fast as 16..48 MiB.
PULL_WINDOW_BYTES = 8 * 1024 * 1024
# Received bytes waiting for the disk writer before the pull stops reading the connection.
WRITE_BACKLOG_BYTES = 16 * 1024 * 1024
# Files of one model moved at the same time.
CONCURRENT_OBJECTS = 4
# Bound on every single wait of a push (an ack, a purge) and on listing the bucket.
TIMEOUT_S = 60.0
# Times the pull of one object resumes (a new consumer after the last chunk received) when
# chunks were lost in transit, its consumer vanished or the server went silent (a reconnect).
RESUMES = 3
# The server sends a heartbeat on a pull request with nothing to deliver yet; a pull that
# hears nothing at all (no chunk, no heartbeat) for _STALL_HEARTBEATS of them resumes.
_HEARTBEAT_S = 5.0
_STALL_HEARTBEATS = 3
# Lifetime of one pull request on the server; an expired one is asked again.
_PULL_EXPIRES_S = 300.0
# Bound on the clean-up of a failed upload's chunks and of a pull's consumer.
_CLEANUP_TIMEOUT_S = 10.0
# The JetStream API prefix of spotserve's contexts (no domain, no custom prefix): the pull
# consumer's "next messages" requests are sent to it directly.
JS_API_PREFIX = api.DEFAULT_PREFIX

T = TypeVar("T")


class RemoteStoreError(RuntimeError):
    """The transfer itself failed (stalled, consumer lost): retry; the data may be fine."""


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_', '-' (max 128)")
    return name


async def models_bucket(js: JetStreamContext) -> ObjectStore:
    try:
        return await js.object_store(MODELS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_object_store(MODELS_BUCKET, config=models_store_config())


async def inventory_bucket(js: JetStreamContext) -> KeyValue:
    return await key_value_bucket(js, inventory_bucket_config())


async def push_model(nc: Client, js: JetStreamContext, directory: Path, name: str) -> int:
    """Upload a model (converting it first if it is a plain HF directory); returns bytes sent.
    ``js`` is a JetStream context of ``nc``, which bounds the chunk size."""
    check_model_name(name)
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="spotserve-push-"))
    try:
        if not await asyncio.to_thread(is_converted, directory):
            converted = tmp / name
            await asyncio.to_thread(convert, directory, converted)
            directory = converted
        bucket = await models_bucket(js)
        *files, index = await asyncio.to_thread(_model_files, directory)
        sizes = await _all(
            [_put_call(nc, js, bucket, f"{name}/{file.name}", file) for file in files],
            CONCURRENT_OBJECTS,
        )
        # Only now, every other file stored: the index makes the model visible.
        sizes.append(await put_object(nc, js, bucket, f"{name}/{index.name}", index))
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return sum(sizes)


def _put_call(
    nc: Client, js: JetStreamContext, bucket: ObjectStore, object_name: str, path: Path
) -> Callable[[], Awaitable[int]]:
    return lambda: put_object(nc, js, bucket, object_name, path)


def _model_files(directory: Path) -> list[Path]:
    """Every file of a converted model, the index last: its presence marks a complete upload."""
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.name != INDEX_FILE)
    return [*files, directory / INDEX_FILE]


async def remote_model_bytes(js: JetStreamContext, name: str) -> int:
    """Bytes of a model in the remote store (0 if it is not there)."""
    objects = await _model_objects(await models_bucket(js), name)
    return sum(info.size or 0 for info in objects.values())


async def pull_model(nc: Client, js: JetStreamContext, name: str, destination: Path) -> Path:
    """Download a model into ``destination`` (atomically); raises CheckpointError if absent.
    ``js`` is a JetStream context of ``nc``, which receives the chunks."""
    check_model_name(name)
    objects = await _model_objects(await models_bucket(js), name)
    if INDEX_FILE not in objects:
        raise CheckpointError(f"model {name!r} is not in the remote store (spotserve model push)")
    staging = await asyncio.to_thread(_staging_dir, destination)
    try:
        await get_object(nc, js, objects.pop(INDEX_FILE), staging / INDEX_FILE)
        index = await asyncio.to_thread(read_index, staging)
        partitions = {part.file: part for part in index.partitions}
        missing = sorted(set(partitions) - set(objects))
        if missing:
            raise CheckpointError(f"model {name!r} in the remote store lacks {missing}")
        # Every partition byte is checked against the index (CRC32) as it is written.
        await _all(
            [
                _get_call(nc, js, info, staging / file, partitions.get(file))
                for file, info in sorted(objects.items(), key=lambda item: -(item[1].size or 0))
            ],
            CONCURRENT_OBJECTS,
        )
        await asyncio.to_thread(_publish, staging, destination)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise
    return destination


def _get_call(
    nc: Client,
    js: JetStreamContext,
    info: api.ObjectInfo,
    path: Path,
    partition: PartitionEntry | None,
) -> Callable[[], Awaitable[None]]:
    return lambda: get_object(nc, js, info, path, partition)


async def _model_objects(bucket: ObjectStore, name: str) -> dict[str, api.ObjectInfo]:
    """The live objects of a model, by file name."""
    try:
        listing = await asyncio.wait_for(bucket.list(ignore_deletes=True), TIMEOUT_S)
    except NotFoundError:
        return {}
    objects: dict[str, api.ObjectInfo] = {}
    for info in listing:
        if info.deleted or not info.name or not info.name.startswith(f"{name}/"):
            continue
        file = info.name.split("/", 1)[1]
        if not file or "/" in file or file in {".", ".."}:
            raise CheckpointError(f"object {info.name!r} is not a file of a model")
        objects[file] = info
    return objects


# --- put ---------------------------------------------------------------------------------


async def put_object(
    nc: Client, js: JetStreamContext, bucket: ObjectStore, object_name: str, path: Path
) -> int:
    """Store one file as an Object Store object; returns its size. Readable by any NATS client
    (chunks, then the meta message with the SHA-256 digest); a replaced object's old chunks are
    purged after the new meta is in."""
    chunk_bytes = max(1, min(CHUNK_BYTES, nc.max_payload))
    try:
        previous: api.ObjectInfo | None = await bucket.get_info(object_name)
    except NotFoundError:
        previous = None
    nuid = NUID().next().decode()
    chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=nuid)
    digest = hashlib.sha256()
    size = chunks = 0
    acks: deque[asyncio.Future[api.PubAck]] = deque()
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while data := await asyncio.to_thread(_read_chunk, handle, digest, chunk_bytes):
            acks.append(await js.publish_async(chunk_subject, data, wait_stall=TIMEOUT_S))
            size, chunks = size + len(data), chunks + 1
            while len(acks) >= PUBLISH_WINDOW:
                await asyncio.wait_for(acks.popleft(), TIMEOUT_S)
        while acks:
            await asyncio.wait_for(acks.popleft(), TIMEOUT_S)
        info = api.ObjectInfo(
            name=object_name,
            bucket=MODELS_BUCKET,
            nuid=nuid,
            size=size,
            chunks=chunks,
            digest=OBJ_DIGEST_TEMPLATE.format(
                digest=base64.urlsafe_b64encode(digest.digest()).decode()
            ),
            mtime=datetime.now(UTC).isoformat(),
            options=api.ObjectMetaOptions(max_chunk_size=chunk_bytes),
        )
        await js.publish(
            _meta_subject(object_name),
            json.dumps(info.as_dict()).encode(),
            headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT},
        )
    except BaseException:
        for ack in acks:
            ack.cancel()
        await _purge_quietly(js, chunk_subject)
        raise
    finally:
        await asyncio.to_thread(handle.close)
    if previous is not None and previous.nuid and not previous.deleted:
        await js.purge_stream(
            _STREAM, subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=previous.nuid)
        )
    return size


def _read_chunk(handle: BinaryIO, digest: hashlib._Hash, size: int) -> bytes:
    data = handle.read(size)
    digest.update(data)
    return data


def _meta_subject(object_name: str) -> str:
    encoded = base64.urlsafe_b64encode(object_name.encode()).decode()
    return OBJ_META_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=encoded)


async def _purge_quietly(js: JetStreamContext, subject: str) -> None:
    try:
        await asyncio.wait_for(js.purge_stream(_STREAM, subject=subject), _CLEANUP_TIMEOUT_S)
    except Exception:
        pass  # the upload failed anyway; its chunks are unreachable without a meta message


# --- get ---------------------------------------------------------------------------------


class _Sink:
    """The file an object is written to, with its SHA-256 and the CRC32 of the partition's
    ``nbytes`` first bytes. ``write`` and ``check`` of a batch run in two worker threads at
    once (hashing overlaps the page-cache copy); one batch at a time."""

    def __init__(self, path: Path, crc_bytes: int) -> None:
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()
        self.crc = 0
        self.crc_left = crc_bytes
        self.size = 0
        # A cancelled pull does not stop a thread already writing: close() waits for it.
        self.writing = threading.Lock()
        self.checking = threading.Lock()

    def write(self, chunks: list[bytes]) -> None:
        with self.writing:
            for data in chunks:
                self.handle.write(data)
                self.size += len(data)

    def check(self, chunks: list[bytes]) -> None:
        with self.checking:
            for data in chunks:
                self.digest.update(data)
                if self.crc_left > 0:
                    covered = memoryview(data)[: self.crc_left]
                    self.crc = zlib.crc32(covered, self.crc)
                    self.crc_left -= len(covered)

    async def consume(self, chunks: list[bytes]) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.write, chunks), asyncio.to_thread(self.check, chunks)
        )

    def close(self) -> None:
        with self.writing, self.checking:
            self.handle.close()


async def get_object(
    nc: Client,
    js: JetStreamContext,
    info: api.ObjectInfo,
    path: Path,
    partition: PartitionEntry | None = None,
) -> None:
    """Write one object to ``path``, checked against its digest (and, for a partition, the
    index's size and CRC32): CheckpointError if the stored bytes are not what was put."""
    if info.options is not None and info.options.link is not None:
        raise CheckpointError(f"object {info.name} is a link; links are not followed")
    if not info.nuid or info.size is None or info.chunks is None or not info.digest:
        raise CheckpointError(f"object {info.name} has incomplete metadata")
    sink = await asyncio.to_thread(_Sink, path, partition.nbytes if partition else 0)
    try:
        if info.chunks:
            await _ObjectPull(nc, js, info, sink).run()
    finally:
        await asyncio.to_thread(sink.close)
    if sink.size != info.size:
        raise CheckpointError(
            f"object {info.name}: {sink.size} bytes, its metadata says {info.size}"
        )
    digest = info.digest.removeprefix(OBJ_DIGEST_TYPE).removeprefix(OBJ_DIGEST_TYPE.upper())
    try:
        expected = base64.urlsafe_b64decode(digest)
    except ValueError:
        raise CheckpointError(
            f"object {info.name} has a malformed digest {info.digest!r}"
        ) from None
    if sink.digest.digest() != expected:
        raise CheckpointError(f"object {info.name} is corrupt: SHA-256 differs from its digest")
    if partition is not None and (sink.crc_left > 0 or sink.crc != partition.crc32):
        raise CheckpointError(f"{partition.file} does not match the index (size or CRC32)")


class _Interrupted(Exception):
    """This consumer will deliver no more: chunks lost in transit, the consumer gone, or the
    server silent (a reconnect). The pull resumes after the last chunk received."""


class _ObjectPull:
    """The chunks of one object in stream order, from a pull consumer asked for a window of
    them ahead; the writes run in threads while the next chunks arrive. Resumes up to RESUMES
    times with a new consumer starting after the last chunk received (what nats-py's ordered
    consumer does after a gap)."""

    def __init__(self, nc: Client, js: JetStreamContext, info: api.ObjectInfo, sink: _Sink) -> None:
        assert info.chunks and info.size is not None
        self.nc = nc
        self.js = js
        self.info = info
        self.sink = sink
        self.received = 0  # chunks received in order (written, being written or in backlog)
        self.last_sequence = 0  # the stream sequence of the last of them
        self.backlog: list[bytes] = []
        self.backlog_bytes = 0
        self.writer: asyncio.Future[None] | None = None
        self.window = max(1, PULL_WINDOW_BYTES // max(1, -(-info.size // info.chunks)))

    async def run(self) -> None:
        try:
            for attempt in range(RESUMES + 1):
                try:
                    await self._attempt()
                    break
                except _Interrupted as exc:
                    if attempt == RESUMES:
                        raise RemoteStoreError(f"pull of {self.info.name} failed: {exc}") from None
            if self.writer is not None:
                await self.writer
            if self.backlog:
                await self.sink.consume(self.backlog)
        finally:
            if self.writer is not None and not self.writer.done():
                await asyncio.gather(self.writer, return_exceptions=True)

    async def _attempt(self) -> None:
        assert self.info.chunks
        remaining = self.info.chunks - self.received
        config = api.ConsumerConfig(
            filter_subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=self.info.nuid),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=TIMEOUT_S,
        )
        if self.last_sequence:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last_sequence + 1
        consumer = await self.js.add_consumer(_STREAM, config=config)
        try:
            if consumer.num_pending != remaining:
                raise CheckpointError(
                    f"object {self.info.name} is damaged (or was just replaced): the store holds"
                    f" {self.received + (consumer.num_pending or 0)} of its {self.info.chunks}"
                    " chunks"
                )
            inbox = self.nc.new_inbox()
            # The window bounds what can be pending: no client-side limit to drop a chunk.
            sub = await self.nc.subscribe(inbox, pending_msgs_limit=0, pending_bytes_limit=0)
            try:
                next_subject = f"{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{_STREAM}.{consumer.name}"
                await self._consume(sub, next_subject, inbox, remaining)
            finally:
                try:
                    await sub.unsubscribe()
                except nats.errors.Error:
                    pass  # the connection is gone: so is the subscription
        finally:
            try:
                await asyncio.wait_for(
                    self.js.delete_consumer(_STREAM, consumer.name), _CLEANUP_TIMEOUT_S
                )
            except Exception:
                pass  # it goes away by itself after inactive_threshold

    async def _consume(
        self, sub: Subscription, next_subject: str, inbox: str, remaining: int
    ) -> None:
        request = {"expires": int(_PULL_EXPIRES_S * 1e9), "idle_heartbeat": int(_HEARTBEAT_S * 1e9)}
        silence_s = _HEARTBEAT_S * _STALL_HEARTBEATS
        delivered = requested = 0
        while delivered < remaining:
            want = min(remaining, delivered + self.window) - requested
            if want >= max(1, self.window // 2) or (want > 0 and requested + want == remaining):
                body = json.dumps({**request, "batch": want}).encode()
                await self.nc.publish(next_subject, body, reply=inbox)
                requested += want
            try:
                msg = await sub.next_msg(timeout=silence_s)
            except nats.errors.TimeoutError:
                raise _Interrupted(f"no chunk and no heartbeat for {silence_s:.0f} s") from None
            headers = msg.headers or {}
            status = headers.get(api.Header.STATUS)
            if status == "100":  # idle heartbeat: the server is there, nothing to send yet
                continue
            if status == "408":  # a request expired: ask again for what it still owed
                requested -= int(headers.get("Nats-Pending-Messages", "0") or 0)
                continue
            if status:
                raise _Interrupted(f"{status} {headers.get(api.Header.DESCRIPTION, '')}".strip())
            metadata = msg.metadata
            if metadata.sequence.consumer != delivered + 1:
                raise _Interrupted("chunks lost in transit")
            delivered += 1
            self.received += 1
            self.last_sequence = metadata.sequence.stream
            if delivered < remaining and metadata.num_pending == 0:
                raise CheckpointError(
                    f"object {self.info.name} is damaged (or was just replaced): the store"
                    f" held {self.received} of its {self.info.chunks} chunks"
                )
            await self._write(msg.data)

    async def _write(self, data: bytes) -> None:
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        if self.writer is not None and (
            self.writer.done() or self.backlog_bytes >= WRITE_BACKLOG_BYTES
        ):
            await self.writer  # backpressure: stop reading until the disk caught up
            self.writer = None
        if self.writer is None:
            self.writer = asyncio.ensure_future(self.sink.consume(self.backlog))
            self.backlog, self.backlog_bytes = [], 0


# --- helpers -----------------------------------------------------------------------------


async def _all(calls: list[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run the calls, at most ``limit`` at a time; the first failure cancels the rest and is
    raised as it is (not wrapped in an ExceptionGroup: callers catch CheckpointError)."""
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await call()

    tasks = [asyncio.ensure_future(one(call)) for call in calls]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _staging_dir(destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))


def _publish(staging: Path, destination: Path) -> None:
    staging.chmod(0o755)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(staging, destination)
