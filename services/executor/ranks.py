"""Tensor parallelism inside one instance: the executor process is rank 0 of M, and ranks
1..M-1 are worker processes it starts (spawned), one per local device, each holding its shard
of the same layers (``shared.model.parallel``: NCCL on GPUs, gloo on CPU).

Every call that touches the model or the KV cache runs on every rank in the same order, since
the forward pass's all-reduces pair up across ranks: rank 0 sends the call down each worker's
pipe, runs it itself, then collects the workers' answers. All ranks all-gather the same logits,
so rank 0's sampled tokens are the instance's. A KV cache leaves the instance whole (the ranks'
head shards concatenated) and arrives whole (each rank keeps its heads), so caches move between
instances of any tensor-parallel degree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch
import torch.multiprocessing as mp

from shared.model.engine import Engine, EngineError, SequenceStep, StageBatch, StageResult
from shared.model.llama import WeightsSource
from shared.model.parallel import FileRendezvous, init_tensor_parallel
from shared.model.spec import EngineSpec

__all__ = ["EngineSpec", "RankFailedError", "ShardedEngine"]

_T = TypeVar("_T")

# A worker that does not answer a call within this long is taken for dead.
CALL_TIMEOUT_S = 600.0
# A worker builds its engine (reads its shards) within this long.
READY_TIMEOUT_S = 600.0
# How often an idle worker checks that rank 0 is still alive.
WORKER_POLL_S = 1.0
# Workers get this long to stop after being told to; then they are killed.
STOP_TIMEOUT_S = 10.0


class RankFailedError(RuntimeError):
    """A worker rank died or failed where rank 0 did not: the instance can no longer serve."""


def backend_for(spec: EngineSpec) -> str:
    device = spec.rank_device(0)
    return "nccl" if device is not None and device.startswith("cuda") else "gloo"


def threads_per_rank(spec: EngineSpec, world_size: int) -> int:
    """The machine's cores shared among the ranks (CPU), unless configured."""
    return spec.torch_threads or max(1, (os.cpu_count() or 1) // world_size)


def _worker_main(
    rank: int, world_size: int, init_method: str, spec: EngineSpec, conn: Connection
) -> None:
    """A worker rank: build the engine, then run rank 0's calls in order until told to stop
    or rank 0 goes away."""
    torch.set_num_threads(threads_per_rank(spec, world_size))
    tp = init_tensor_parallel(rank, world_size, init_method, backend_for(spec))
    parent = os.getppid()
    try:
        engine = Engine.from_spec(spec, tp)
        conn.send(("ready", None))
        while True:
            if not conn.poll(WORKER_POLL_S):
                if os.getppid() != parent:  # rank 0 was killed: nothing left to serve
                    return
                continue
            try:
                method, args = conn.recv()
            except EOFError:
                return
            if method == "stop":
                return
            try:
                if method == "rebuild":
                    engine = Engine.from_spec(args[0], tp)
                    result: Any = None
                else:
                    result = _run_call(engine, method, args, rank, world_size)
            except EngineError as exc:
                conn.send(("refused", str(exc)))
                continue
            except Exception as exc:  # reported to rank 0, which stops the instance
                conn.send(("error", repr(exc)))
                continue
            conn.send(("ok", result))
    finally:
        torch.distributed.destroy_process_group()


def _run_call(engine: Engine, method: str, args: tuple[Any, ...], rank: int, world: int) -> Any:
    """One call on a worker rank; only what rank 0 needs comes back (a KV shard)."""
    if method == "export_kv":
        return engine.export_kv(*args)
    if method == "import_kv":
        request_id, length, tensors, into = args
        return engine.import_kv(request_id, length, rank_shard(tensors, rank, world), into)
    getattr(engine, method)(*args)
    return None


def rank_shard(tensors: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """A rank's KV heads of a whole cache (``<layer>.k/v`` are [kv_heads, length, head_dim])."""
    return {name: t.chunk(world, dim=0)[rank].clone() for name, t in tensors.items()}


class ShardedEngine:
    """Rank 0's engine with the worker ranks behind it, used like one :class:`Engine`.

    Reads (free slots, held sequences, the model's layout) come from rank 0's engine, which
    holds the same sequences as every other rank."""

    def __init__(self, spec: EngineSpec, world_size: int, start_timeout_s: float = READY_TIMEOUT_S):
        if world_size < 2:
            raise ValueError(f"a sharded engine needs 2 or more ranks, got {world_size}")
        self.spec = spec
        self.world_size = world_size
        context = mp.get_context("spawn")
        self._rendezvous = FileRendezvous()
        init_method = self._rendezvous.init_method
        self._conns: list[Connection] = []
        self.processes: list[Any] = []
        for rank in range(1, world_size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(rank, world_size, init_method, spec, theirs),
                name=f"tensor-parallel-rank-{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self._conns.append(ours)
            self.processes.append(process)
        torch.set_num_threads(threads_per_rank(spec, world_size))
        self.tp = init_tensor_parallel(0, world_size, init_method, backend_for(spec))
        self.local = Engine.from_spec(spec, self.tp)
        for rank, conn in enumerate(self._conns, start=1):
            if self._answer(rank, conn, start_timeout_s)[0] != "ready":
                raise RankFailedError(f"tensor-parallel rank {rank} did not start")

    # -- reads: rank 0's engine -------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self.local.model

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def layers(self) -> tuple[int, int]:
        return self.local.layers

    @property
    def n_layers(self) -> int:
        return self.local.n_layers

    @property
    def can_send_weights(self) -> bool:
        """Shards here: every rank reads its part of a new stage from the node's disk."""
        return False

    @property
    def is_first_stage(self) -> bool:
        return self.local.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.local.is_last_stage

    @property
    def num_free_blocks(self) -> int:
        return self.local.num_free_blocks

    @property
    def kv_blocks(self) -> int:
        return self.local.kv_blocks

    @property
    def block_size(self) -> int:
        return self.local.block_size

    @property
    def context_length(self) -> int:
        return self.local.context_length

    def fitting_uploads(self, request_ids: list[str]) -> list[str]:
        return self.local.fitting_uploads(request_ids)

    def offloaded_ids(self) -> list[str]:
        return self.local.offloaded_ids()

    def sequence_ids(self) -> list[str]:
        return self.local.sequence_ids()

    def sequence_length(self, request_id: str) -> int:
        return self.local.sequence_length(request_id)

    def held_layers(self) -> set[int]:
        return self.local.held_layers()

    def checkpoint_tensors(self, layers: list[int]) -> dict[str, torch.Tensor]:
        raise EngineError("tensor-parallel shards here: read the layers from disk")

    # -- calls on every rank ----------------------------------------------------------------

    def step(self, seqs: list[SequenceStep]) -> dict[str, int]:
        return self._everywhere("step", (seqs,), lambda: self.local.step(seqs))

    def run_stage(self, batch: StageBatch) -> StageResult:
        return self._everywhere("run_stage", (batch,), lambda: self.local.run_stage(batch))

    def release(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        self._everywhere("release", (ids,), lambda: self.local.release(ids))

    def offload(self, request_ids: list[str]) -> None:
        self._everywhere("offload", (request_ids,), lambda: self.local.offload(request_ids))

    def upload(self, request_ids: list[str]) -> None:
        self._everywhere("upload", (request_ids,), lambda: self.local.upload(request_ids))

    def export_kv(self, request_id: str) -> tuple[int, dict[str, torch.Tensor]]:
        """The whole cache: every rank's heads, concatenated in rank order."""
        self._send("export_kv", (request_id,))
        try:
            length, tensors = self.local.export_kv(request_id)
        finally:
            answers = [self._answer(r, c) for r, c in enumerate(self._conns, start=1)]
        if any(status != "ok" for status, _ in answers):
            raise RankFailedError(f"tensor-parallel ranks disagree on the KV cache of {request_id}")
        return length, {
            name: torch.cat([tensor, *(value[1][name] for _, value in answers)], dim=0)
            for name, tensor in tensors.items()
        }

    def import_kv(
        self, request_id: str, length: int, tensors: dict[str, torch.Tensor], into: str = "auto"
    ) -> str:
        """A whole cache in: each rank keeps its heads."""
        world = self.world_size
        expected = {name: t.shape[0] for name, t in tensors.items() if t.shape[0] % world}
        if expected:
            raise EngineError(f"KV cache of {request_id}: heads do not split {world} ways")
        return self._everywhere(
            "import_kv",
            (request_id, length, tensors, into),
            lambda: self.local.import_kv(request_id, length, rank_shard(tensors, 0, world), into),
        )

    def rebuild(self, spec: EngineSpec, weights: WeightsSource | None = None) -> ShardedEngine:
        """Every rank builds a new engine (another layer range) from the node's disk copy."""
        if weights is not None:
            raise ValueError("tensor-parallel ranks read their shards from disk, not weights")
        self._everywhere("rebuild", (spec,), lambda: self._rebuild_here(spec))
        return self

    def _rebuild_here(self, spec: EngineSpec) -> None:
        self.local = Engine.from_spec(spec, self.tp)
        self.spec = spec

    def dead_ranks(self) -> list[int]:
        return [r for r, p in enumerate(self.processes, start=1) if not p.is_alive()]

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("stop", ()))
            except OSError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        torch.distributed.destroy_process_group()
        self._rendezvous.close()

    # -- helpers ------------------------------------------------------------------------------

    def _everywhere(self, method: str, args: tuple[Any, ...], local: Callable[[], _T]) -> _T:
        """Send the call to every worker, run it here, then wait for the workers' answers. A
        call rank 0 refuses is refused the same way everywhere (the checks are the same); a
        worker that refuses what rank 0 did means the ranks no longer agree."""
        self._send(method, args)
        refused: EngineError | None = None
        try:
            result = local()
        except EngineError as exc:
            refused = exc
        finally:
            answers = [self._answer(r, c) for r, c in enumerate(self._conns, start=1)]
        if refused is not None:
            raise refused
        disagree = [rank for rank, (status, _) in enumerate(answers, start=1) if status != "ok"]
        if disagree:
            raise RankFailedError(f"tensor-parallel ranks {disagree} refused {method}")
        return result

    def _send(self, method: str, args: tuple[Any, ...]) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send((method, args))
            except OSError as exc:
                raise RankFailedError(f"tensor-parallel rank {rank} is gone: {exc!r}") from None

    def _answer(
        self, rank: int, conn: Connection, timeout_s: float = CALL_TIMEOUT_S
    ) -> tuple[str, Any]:
        """A worker's (status, value): "ok" or "refused" (an EngineError's message)."""
        try:
            if not conn.poll(timeout_s):
                raise RankFailedError(
                    f"tensor-parallel rank {rank} did not answer in {timeout_s} s"
                )
            status, value = conn.recv()
        except (EOFError, OSError) as exc:
            raise RankFailedError(f"tensor-parallel rank {rank} is gone: {exc!r}") from None
        if status == "error":
            raise RankFailedError(f"tensor-parallel rank {rank} failed: {value}")
        return status, value
