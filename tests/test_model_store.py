"""The remote tier: push a model to the JetStream Object Store, and a node's loader (a real
process of the session cluster) pulls it to local disk, checked, bit-identical."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from nats.aio.client import Client
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DEFAULT_CHUNK_SIZE
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from safetensors.torch import load_file

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.config import NatsSettings
from shared.discovery import discover
from shared.loading import store
from shared.loading.format import INDEX_FILE, CheckpointError, convert, read_index
from shared.loading.reader import load_checkpoint
from shared.loading.store import (
    CHUNK_BYTES,
    inventory_bucket,
    models_bucket,
    pull_model,
    push_model,
)
from shared.messages import FetchModelReply, LoaderInventory
from shared.model.tokenizer import TextTokenizer
from shared.subjects import MODELS_BUCKET, SERVICE_LOADER, loader_fetch_subject
from tests.helpers import isolated_cluster


async def loader_node(nc: Client) -> str:
    infos = await discover(nc, SERVICE_LOADER, window_s=1.0)
    assert infos, "the cluster's loader answers $SRV.INFO"
    return infos[0]["metadata"]["node"]


async def fetch(nc: Client, node: str, model: str) -> tuple[FetchModelReply | None, str]:
    reply = await nc.request(loader_fetch_subject(node), encode({"model": model}), timeout=120)
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        return None, f"{headers[ERROR_CODE_HEADER]} {headers[ERROR_HEADER]}"
    return FetchModelReply.model_validate(decode(reply.data)), ""


async def test_push_then_fetch_from_remote_then_local(
    cluster: object, nc: Client, tiny_model_dir: Path
) -> None:
    js = nc.jetstream(timeout=60)
    sent = await push_model(nc, js, tiny_model_dir, "tiny-pushed")
    assert sent > 20_000_000
    node = await loader_node(nc)
    first, error = await fetch(nc, node, "tiny-pushed")
    assert first is not None, error
    assert first.tier == "remote"
    second, _ = await fetch(nc, node, "tiny-pushed")
    assert second is not None and second.tier == "local-disk" and second.path == first.path
    expected = load_file(str(tiny_model_dir / "model.safetensors"))
    loaded = load_checkpoint(Path(first.path), verify=True)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
    assert (Path(first.path) / "tokenizer.json").exists()
    # The node's inventory (for the planner) lists the model and measured bandwidths.
    inventory_kv = await inventory_bucket(js)
    inventory = LoaderInventory.model_validate(decode((await inventory_kv.get(node)).value))
    held = inventory.models["tiny-pushed"]
    # Bytes to move: the partitions (tensors plus alignment padding).
    assert held.nbytes == sum(part.nbytes for part in read_index(Path(first.path)).partitions)
    assert inventory.bandwidth_bps["remote"] > 0 and inventory.bandwidth_bps["local-disk"] > 0
    on_disk = inventory.estimate_load_s("tiny-pushed", held.nbytes)
    elsewhere = inventory.estimate_load_s("not-here", held.nbytes)
    assert on_disk is not None and elsewhere is not None
    assert on_disk == held.nbytes / inventory.bandwidth_bps["local-disk"] + inventory.queue_s


async def test_fetch_of_unknown_or_incomplete_model_is_a_clear_404(
    cluster: object, nc: Client
) -> None:
    node = await loader_node(nc)
    reply, error = await fetch(nc, node, "no-such-model")
    assert reply is None and error.startswith("404") and "not in the remote store" in error
    # An upload that never wrote its index (interrupted) is not a model.
    bucket = await models_bucket(nc.jetstream(timeout=60))
    await bucket.put("half-pushed/part-00000.bin", b"\0" * 4096)
    reply, error = await fetch(nc, node, "half-pushed")
    assert reply is None and error.startswith("404")


@pytest.mark.parametrize("body", [b"\xc1", encode({"model": ""}), encode({"model": "a/b"})])
async def test_bad_fetch_request_is_refused(cluster: object, nc: Client, body: bytes) -> None:
    node = await loader_node(nc)
    reply = await nc.request(loader_fetch_subject(node), body, timeout=30)
    headers = reply.headers or {}
    assert headers.get(ERROR_CODE_HEADER) == "400"
    assert headers.get(ERROR_HEADER, "").startswith("bad fetch request")


@pytest.fixture(scope="module")
def remote_model_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """Every service gets the model through the node's loader, from the remote store only."""

    def push(nats_url: str) -> None:
        async def run() -> None:
            client = await connect(nats_url, NatsSettings(), name="push", deadline_s=10)
            try:
                await push_model(
                    client, client.jetstream(timeout=60), tiny_model_dir, "tiny-remote"
                )
            finally:
                await client.close()

        asyncio.run(run())

    env = {
        "SPOTSERVE_MODEL__NAME": "tiny-remote",
        "SPOTSERVE_LOADER__MODELS_DIR": str(tmp_path_factory.mktemp("node-disk")),
    }
    with isolated_cluster(tmp_path_factory, "remote-model", tiny_model_dir, 1, env, push) as c:
        yield c


async def test_system_serves_loader_loaded_weights_like_transformers(
    remote_model_cluster: LocalCluster, tiny_model_dir: Path, tokenizer: TextTokenizer
) -> None:
    from tests.test_end_to_end import hf_greedy

    nc = await connect(remote_model_cluster.nats_url, NatsSettings(), name="t", deadline_s=10)
    try:
        completion = await SpotserveClient(nc).generate(
            "Loaded through the loader", max_tokens=16, temperature=0.0, ignore_eos=True
        )
    finally:
        await nc.close()
    prompt = tokenizer.encode("Loaded through the loader")
    assert completion.token_ids == hf_greedy(tiny_model_dir, prompt, 16)
    executor_log = (remote_model_cluster.log_dir / "executor-0.log").read_text()
    assert '"model.fetched"' in executor_log and "tiny-remote" in executor_log


@pytest.fixture(scope="module")
def converted_tiny(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    converted = tmp_path_factory.mktemp("converted") / "tiny"
    convert(tiny_model_dir, converted)
    return converted


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of a converted model, the index last (the order of a push)."""
    files = {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.name != INDEX_FILE}
    return {**files, INDEX_FILE: (directory / INDEX_FILE).read_bytes()}


def damaged_copy(source: Path, destination: Path) -> Path:
    """A copy whose partition has one byte flipped (its index unchanged)."""
    shutil.copytree(source, destination)
    with open(destination / "part-00000.bin", "r+b") as handle:
        handle.seek(12345)
        flipped = handle.read(1)[0] ^ 0xFF
        handle.seek(12345)
        handle.write(bytes([flipped]))
    return destination


async def test_objects_interoperate_with_stock_nats_py(
    nc: Client, converted_tiny: Path, tmp_path: Path
) -> None:
    """What push_model writes, nats-py's own ObjectStore.get reads (chunks, meta, digest); what
    nats-py's ObjectStore.put writes (128 KiB chunks), pull_model reads."""
    js = nc.jetstream(timeout=60)
    bucket = await models_bucket(js)
    await push_model(nc, js, converted_tiny, "tiny-interop")
    files = await asyncio.to_thread(file_bytes, converted_tiny)
    for file, data in files.items():
        result = await bucket.get(f"tiny-interop/{file}")  # checks the SHA-256 digest
        assert result.data == data, file
    info = await bucket.get_info("tiny-interop/part-00000.bin")
    assert info.options is not None and info.options.max_chunk_size == CHUNK_BYTES
    assert info.chunks == -(-(info.size or 0) // CHUNK_BYTES) > 1

    for file, data in files.items():
        await bucket.put(f"tiny-stock/{file}", data)
    stock = await bucket.get_info("tiny-stock/part-00000.bin")
    assert stock.options is not None and stock.options.max_chunk_size == OBJ_DEFAULT_CHUNK_SIZE
    pulled = await pull_model(nc, js, "tiny-stock", tmp_path / "tiny-stock")
    assert await asyncio.to_thread(file_bytes, pulled) == files


@pytest.mark.parametrize("damage", ["corrupt chunk", "missing chunk", "corrupt at the source"])
async def test_damaged_remote_model_is_a_checkpoint_error(
    nc: Client, converted_tiny: Path, tmp_path: Path, damage: str
) -> None:
    js = nc.jetstream(timeout=60)
    bucket = await models_bucket(js)
    name = "tiny-" + damage.replace(" ", "-")
    source = converted_tiny
    if damage == "corrupt at the source":
        # The bytes stored are the bytes pushed (the digest holds), but not what the index says.
        source = await asyncio.to_thread(damaged_copy, converted_tiny, tmp_path / "source")
    await push_model(nc, js, source, name)
    info = await bucket.get_info(f"{name}/part-00000.bin")
    stream = f"OBJ_{MODELS_BUCKET}"
    chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=info.nuid)
    last = await js.get_last_msg(stream, chunks)
    if damage == "corrupt chunk":
        # Same chunk count and size, other bytes: only the digest can tell.
        await js.delete_msg(stream, last.seq)
        await js.publish(chunks, b"\xff" * len(last.data or b""))
        expected = "corrupt: SHA-256"
    elif damage == "missing chunk":
        # This object's first chunk (the message before its last may be another object's:
        # files are pushed concurrently).
        first = await js.get_msg(stream, seq=1, subject=chunks, next=True)
        assert first.seq != last.seq, "the partition has more than one chunk"
        await js.delete_msg(stream, first.seq)
        expected = "damaged"
    else:
        expected = "does not match the index"
    destination = tmp_path / "node" / name
    with pytest.raises(CheckpointError, match=expected):
        await pull_model(nc, js, name, destination)
    # Nothing at the destination, no staging directory left behind.
    assert await asyncio.to_thread(lambda: list(destination.parent.iterdir())) == []


async def test_pull_resumes_after_its_consumer_vanishes(
    nc: Client, converted_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like nats-py's ordered consumer after a gap: a new consumer from the last chunk held."""
    js = nc.jetstream(timeout=60)
    await push_model(nc, js, converted_tiny, "tiny-resume")
    info = await (await models_bucket(js)).get_info("tiny-resume/part-00000.bin")
    chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=MODELS_BUCKET, obj=info.nuid)
    # A slow disk and a small window: the pull of the partition lasts long enough to interrupt.
    monkeypatch.setattr(store, "PULL_WINDOW_BYTES", 2 * CHUNK_BYTES)
    write = store._Sink.write

    def slow_write(sink: store._Sink, data: list[bytes]) -> None:
        time.sleep(0.05)
        write(sink, data)

    monkeypatch.setattr(store._Sink, "write", slow_write)
    attempt = store._ObjectPull._attempt
    attempts: list[str | None] = []

    async def counted_attempt(pull: store._ObjectPull) -> None:
        attempts.append(pull.info.name)
        await attempt(pull)

    monkeypatch.setattr(store._ObjectPull, "_attempt", counted_attempt)
    pull = asyncio.create_task(pull_model(nc, js, "tiny-resume", tmp_path / "tiny-resume"))
    stream = f"OBJ_{MODELS_BUCKET}"
    deleted = False
    async with asyncio.timeout(30):
        while not deleted:
            for consumer in await js.consumers_info(stream):
                delivered = consumer.delivered.consumer_seq if consumer.delivered else 0
                if consumer.config.filter_subject == chunks and delivered >= 3:
                    await js.delete_consumer(stream, consumer.name)
                    deleted = True
            await asyncio.sleep(0.01)
        pulled = await pull
    assert attempts.count("tiny-resume/part-00000.bin") == 2  # it was cut off, and resumed
    files = await asyncio.to_thread(file_bytes, converted_tiny)
    assert await asyncio.to_thread(file_bytes, pulled) == files
