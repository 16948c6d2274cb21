"""The host-memory tier: the loader's shared-memory pool of reusable chunks, LRU eviction,
leases, and executors copying their weights out of it bit-exactly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER
from safetensors.torch import load_file

from shared.codec import decode, encode
from shared.loading.format import CheckpointError, convert, read_index
from shared.loading.hostpool import (
    POOL_PREFIX,
    HostChunkPool,
    chunk_plan,
    load_from_host_pool,
    remove_stale_pools,
)
from shared.loading.reader import load_checkpoint
from shared.loading.store import inventory_bucket, push_model
from shared.messages import FetchModelReply, LoaderInventory
from shared.subjects import loader_fetch_subject, loader_release_subject
from tests.test_model_store import loader_node

CHUNK = 1 << 20


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three converted copies of the tiny model (about 20 MB each)."""
    root = tmp_path_factory.mktemp("pool-models")
    converted = {}
    for name in ("a", "b", "c"):
        convert(tiny_model_dir, root / name)
        converted[name] = root / name
    return converted


@pytest.fixture
def pool_for_two(models: dict[str, Path], tmp_path: Path) -> Iterator[HostChunkPool]:
    """A pool with room for exactly two of the models."""
    needed = len(chunk_plan(read_index(models["a"]), CHUNK))
    pool = HostChunkPool(tmp_path, "node", 2 * needed * CHUNK, CHUNK, read_threads=2)
    yield pool
    pool.close()


def assert_same_as_source(loaded: dict[str, torch.Tensor], tiny_model_dir: Path) -> None:
    expected = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_pooled_model_copies_out_bit_identical(
    pool_for_two: HostChunkPool, models: dict[str, Path], tiny_model_dir: Path
) -> None:
    pooled = pool_for_two.admit("a", models["a"])
    assert pooled is not None and pool_for_two.lookup("a") is pooled
    lease = pool_for_two.lease("a", seconds=60)
    assert_same_as_source(load_from_host_pool(lease, threads=3), tiny_model_dir)


def test_lru_eviction_reuses_the_chunks_of_the_least_recently_used(
    pool_for_two: HostChunkPool, models: dict[str, Path], tiny_model_dir: Path
) -> None:
    a = pool_for_two.admit("a", models["a"])
    b = pool_for_two.admit("b", models["b"])
    assert a is not None and b is not None and pool_for_two.free_chunks() == 0
    pool_for_two.lookup("a")  # a is now the most recently used: b goes first
    c = pool_for_two.admit("c", models["c"])
    assert c is not None and set(pool_for_two.held()) == {"a", "c"}
    assert sorted(c.chunks) == sorted(b.chunks)  # the same memory, reused
    # The reused chunks hold c's bytes now, not b's leftovers.
    assert_same_as_source(load_from_host_pool(pool_for_two.lease("c", 60)), tiny_model_dir)


def test_a_leased_model_is_never_evicted(
    pool_for_two: HostChunkPool, models: dict[str, Path]
) -> None:
    assert pool_for_two.admit("a", models["a"]) and pool_for_two.admit("b", models["b"])
    leases = [pool_for_two.lease("a", 60), pool_for_two.lease("b", 60)]
    assert pool_for_two.admit("c", models["c"]) is None  # everything is leased: no room
    assert set(pool_for_two.held()) == {"a", "b"}
    assert pool_for_two.release(leases[0].lease_id) and not pool_for_two.release("unknown")
    assert pool_for_two.admit("c", models["c"]) is not None
    assert set(pool_for_two.held()) == {"b", "c"}


def test_an_expired_lease_no_longer_protects(
    pool_for_two: HostChunkPool, models: dict[str, Path]
) -> None:
    assert pool_for_two.admit("a", models["a"]) and pool_for_two.admit("b", models["b"])
    pool_for_two.lease("a", seconds=0)  # an executor that died while copying
    pool_for_two.lease("b", seconds=60)
    assert pool_for_two.admit("c", models["c"]) is not None
    assert set(pool_for_two.held()) == {"b", "c"}


def test_a_model_larger_than_the_pool_is_not_admitted(
    models: dict[str, Path], tmp_path: Path
) -> None:
    pool = HostChunkPool(tmp_path, "small", 4 * CHUNK, CHUNK)
    try:
        assert pool.admit("a", models["a"]) is None and pool.free_chunks() == 4
    finally:
        pool.close()


def corrupt_copy(source: Path, destination: Path, offset: int) -> Path:
    """Copy a converted model and flip one byte of its first partition; returns that file."""
    subprocess.run(["cp", "-r", str(source), str(destination)], check=True)
    part = destination / read_index(destination).partitions[0].file
    with open(part, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return part


def test_a_corrupt_partition_is_refused_and_its_chunks_come_back(
    models: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    part = corrupt_copy(models["a"], broken, 5 * CHUNK + 123)
    pool = HostChunkPool(tmp_path / "pool", "node", 64 * CHUNK, CHUNK)
    try:
        with pytest.raises(CheckpointError, match=f"{part}.*corrupt"):
            pool.admit("broken", broken)
        assert pool.held() == {} and pool.free_chunks() == 64
        assert pool.admit("a", models["a"]) is not None  # the pool keeps serving others
    finally:
        pool.close()


def test_pool_file_is_private_removed_on_close_and_stale_ones_cleaned(tmp_path: Path) -> None:
    pool = HostChunkPool(tmp_path, "node", 2 * CHUNK, CHUNK)
    assert pool.path.exists() and (pool.path.stat().st_mode & 0o777) == 0o600
    pool.close()
    assert not pool.path.exists()
    # A pool left by a loader that was killed (its pid is gone) is removed at the next start.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    stale = tmp_path / f"{POOL_PREFIX}node-{dead}"
    stale.write_bytes(b"x")
    live = tmp_path / f"{POOL_PREFIX}node-{os.getpid()}"
    live.write_bytes(b"x")
    assert remove_stale_pools(tmp_path) == [stale] and live.exists()


async def fetch_leased(nc: Client, node: str, model: str) -> FetchModelReply:
    body = encode({"model": model, "host_lease": True})
    reply = await nc.request(loader_fetch_subject(node), body, timeout=120)
    assert ERROR_CODE_HEADER not in (reply.headers or {}), reply.headers
    return FetchModelReply.model_validate(decode(reply.data))


async def test_loader_leases_models_from_its_host_pool(
    cluster: object, nc: Client, tiny_model_dir: Path
) -> None:
    js = nc.jetstream(timeout=60)
    await push_model(nc, js, tiny_model_dir, "tiny-pooled")
    node = await loader_node(nc)
    first = await fetch_leased(nc, node, "tiny-pooled")
    assert first.tier == "remote" and first.host is not None
    second = await fetch_leased(nc, node, "tiny-pooled")
    assert second.tier == "host-memory" and second.host is not None
    assert second.host.chunks == first.host.chunks
    assert second.host.lease_id != first.host.lease_id
    assert_same_as_source(load_from_host_pool(second.host), tiny_model_dir)
    for lease in (first.host, second.host):
        body = encode({"lease_id": lease.lease_id})
        reply = await nc.request(loader_release_subject(node), body, timeout=10)
        assert decode(reply.data) == {"released": True}
    reply = await nc.request(loader_release_subject(node), encode({"lease": 1}), timeout=10)
    assert (reply.headers or {}).get(ERROR_CODE_HEADER) == "400"
    # The planner sees the model in the node's host memory, with the tier's bandwidth.
    inventory_kv = await inventory_bucket(js)
    inventory = LoaderInventory.model_validate(decode((await inventory_kv.get(node)).value))
    held = inventory.models["tiny-pooled"]
    assert held.tier == "host-memory" and inventory.bandwidth_bps["host-memory"] > 0
    estimate = inventory.estimate_load_s("tiny-pooled", held.nbytes)
    assert estimate == inventory.queue_s + held.nbytes / inventory.bandwidth_bps["host-memory"]


async def test_loader_refuses_a_corrupt_model_on_its_disk_and_keeps_serving(
    cluster: object, nc: Client, models: dict[str, Path]
) -> None:
    from shared.discovery import discover
    from shared.subjects import SERVICE_LOADER

    info = (await discover(nc, SERVICE_LOADER, window_s=1.0))[0]
    node, models_dir = info["metadata"]["node"], Path(info["metadata"]["models_dir"])
    # A model that was never pulled (copied in by hand), with one flipped byte.
    part = await asyncio.to_thread(corrupt_copy, models["a"], models_dir / "tiny-corrupt", CHUNK)
    body = encode({"model": "tiny-corrupt", "host_lease": True})
    reply = await nc.request(loader_fetch_subject(node), body, timeout=120)
    headers = reply.headers or {}
    assert headers.get(ERROR_CODE_HEADER) == "404"
    assert str(part) in headers.get("Nats-Service-Error", "") and "corrupt" in headers.get(
        "Nats-Service-Error", ""
    )
    # Nothing of it was handed out, and the loader still serves other models.
    await push_model(nc, nc.jetstream(timeout=60), models["b"], "tiny-after-corrupt")
    fetched = await fetch_leased(nc, node, "tiny-after-corrupt")
    assert fetched.host is not None


@pytest.mark.parametrize("tp_degree", [1, 2])
def test_a_stage_or_shard_copies_out_like_a_partial_disk_load(
    tiny_model_dir: Path, tmp_path: Path, tp_degree: int
) -> None:
    converted = tmp_path / "model"
    convert(tiny_model_dir, converted, tp_degree=tp_degree)
    pool = HostChunkPool(tmp_path / "pool", "node", 64 * CHUNK, CHUNK)
    try:
        assert pool.admit("m", converted) is not None
        lease = pool.lease("m", 60)
        ranks = [None, *range(tp_degree)] if tp_degree > 1 else [None]
        for layers in [None, (0, 1), (2, 3)]:
            for rank in ranks:
                expected = load_checkpoint(converted, layers=layers, tp_rank=rank)
                loaded = load_from_host_pool(lease, layers=layers, tp_rank=rank)
                assert set(loaded) == set(expected), (layers, rank)
                for name, tensor in expected.items():
                    assert torch.equal(loaded[name], tensor), (name, layers, rank)
    finally:
        pool.close()
