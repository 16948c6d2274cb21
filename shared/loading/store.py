"""The remote tier: converted models in a JetStream Object Store bucket.

A model named ``NAME`` is stored as objects ``NAME/<file>`` (partitions, config and tokenizer
files) and ``NAME/index.json``, which is written LAST: a model whose index is missing is an
incomplete upload and is never pulled. Pulls write to a temp directory, check every partition
against the index (size and CRC32), then rename into place.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.loading.format import INDEX_FILE, CheckpointError, convert, is_converted
from shared.loading.reader import load_checkpoint
from shared.subjects import INVENTORY_BUCKET, MODELS_BUCKET

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_', '-' (max 128)")
    return name


async def models_bucket(js: JetStreamContext) -> ObjectStore:
    try:
        return await js.object_store(MODELS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_object_store(
            MODELS_BUCKET, config=ObjectStoreConfig(storage=StorageType.FILE)
        )


async def inventory_bucket(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(INVENTORY_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(KeyValueConfig(bucket=INVENTORY_BUCKET, history=1))


async def push_model(js: JetStreamContext, directory: Path, name: str) -> int:
    """Upload a model (converting it first if it is a plain HF directory); returns bytes sent."""
    check_model_name(name)
    with tempfile.TemporaryDirectory(prefix="spotserve-push-") as tmp:
        if not await asyncio.to_thread(is_converted, directory):
            converted = Path(tmp) / name
            await asyncio.to_thread(convert, directory, converted)
            directory = converted
        bucket = await models_bucket(js)
        files = await asyncio.to_thread(_model_files, directory)
        sent = 0
        for file in files:
            handle = await asyncio.to_thread(open, file, "rb")
            try:
                await bucket.put(f"{name}/{file.name}", handle)
            finally:
                await asyncio.to_thread(handle.close)
            sent += (await asyncio.to_thread(file.stat)).st_size
    return sent


def _model_files(directory: Path) -> list[Path]:
    """Every file of a converted model, the index last: its presence marks a complete upload."""
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.name != INDEX_FILE)
    return [*files, directory / INDEX_FILE]


async def remote_model_bytes(js: JetStreamContext, name: str) -> int:
    """Bytes of a model in the remote store (0 if it is not there)."""
    bucket = await models_bucket(js)
    try:
        listing = await bucket.list()
    except NotFoundError:
        return 0
    return sum(info.size or 0 for info in listing if info.name and info.name.startswith(f"{name}/"))


async def pull_model(js: JetStreamContext, name: str, destination: Path) -> Path:
    """Download a model into ``destination`` (atomically); raises CheckpointError if absent."""
    check_model_name(name)
    bucket = await models_bucket(js)
    try:
        listing = await bucket.list()
    except NotFoundError:
        listing = []
    names = [info.name for info in listing if info.name and info.name.startswith(f"{name}/")]
    if f"{name}/{INDEX_FILE}" not in names:
        raise CheckpointError(f"model {name!r} is not in the remote store (spotserve model push)")
    staging = await asyncio.to_thread(_staging_dir, destination)
    try:
        for object_name in names:
            target = staging / object_name.split("/", 1)[1]
            handle = await asyncio.to_thread(open, target, "wb")
            try:
                await bucket.get(object_name, writeinto=handle)
            except ObjectNotFoundError:
                raise CheckpointError(f"object {object_name} vanished during the pull") from None
            finally:
                await asyncio.to_thread(handle.close)
        # Every byte checked against the index before anyone may use the model.
        await asyncio.to_thread(load_checkpoint, staging, mode="buffered", verify=True)
        await asyncio.to_thread(_publish, staging, destination)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise
    return destination


def _staging_dir(destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))


def _publish(staging: Path, destination: Path) -> None:
    staging.chmod(0o755)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(staging, destination)
