"""Tensor parallelism inside one instance (Megatron-style) and a helper to start M ranks.

Column-parallel linears (q/k/v, gate/up, lm_head) hold 1/M of the output rows: plain
``nn.Linear`` of the smaller size, no communication. Row-parallel ones (o_proj, down_proj) hold
1/M of the input columns; their partial outputs are summed by an all-reduce, then the whole bias
is added once. The vocab-parallel head all-gathers its logits. The split is exactly the one
``spotserve convert --tp M`` writes (``shared.loading.format.tp_split_dim``), so a rank's shard
loads from a converted checkpoint or is sliced from a full tensor, with the same bytes.

Backends: NCCL on CUDA, gloo on CPU (the tests run M=2 on CPU).
"""

from __future__ import annotations

import io
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (``group`` None: the default group)."""

    rank: int
    world_size: int
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"tensor-parallel rank {self.rank} outside 0..{self.world_size - 1}")

    def all_reduce(self, x: Tensor) -> Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, name: str, tensor: Tensor) -> Tensor:
        """This rank's piece of a whole checkpoint tensor (the cut ``convert --tp`` makes)."""
        from shared.loading.format import tp_split_dim

        dim = tp_split_dim(name, tensor.dim())
        if dim is None or self.world_size == 1:
            return tensor
        if tensor.shape[dim] % self.world_size:
            raise ValueError(
                f"cannot split {name} (shape {list(tensor.shape)}) into {self.world_size}"
                f" tensor-parallel shards on dim {dim}"
            )
        # A copy, so the rest of the whole tensor can be freed.
        return tensor.chunk(self.world_size, dim)[self.rank].clone()


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_shard @ W_shard^T) + b: ``in_features`` is this rank's share."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class GatheredColumnLinear(nn.Linear):
    """A column-parallel linear whose output is all-gathered (the vocab-parallel LM head)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return self.tp.all_gather_last_dim(super().forward(x))


def row_linear(
    in_features: int, out_features: int, bias: bool, tp: TensorParallel | None
) -> nn.Linear:
    """nn.Linear without tensor parallelism; else a row-parallel one of 1/M of the inputs."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features // tp.world_size, out_features, bias, tp)


def column_linear(
    in_features: int, out_features: int, bias: bool, tp: TensorParallel | None, gather: bool = False
) -> nn.Linear:
    """nn.Linear of 1/M of the outputs (all of them without tensor parallelism); ``gather``
    all-gathers the outputs so every rank sees all of them."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if gather:
        return GatheredColumnLinear(in_features, out_features // tp.world_size, bias, tp)
    return nn.Linear(in_features, out_features // tp.world_size, bias=bias)


# ---------------------------------------------------------------------------------------------
# Starting a group


def default_backend(device: torch.device | str | None = None) -> str:
    kind = torch.device(device).type if device is not None else None
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if kind == "cuda" else "gloo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FileRendezvous:
    """Where one host's ranks meet: a store file in a fresh private directory. Unlike a TCP
    port picked before rank 0 binds it, nothing else on the machine can take it meanwhile."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="spotserve-ranks-")
        self.init_method = f"file://{os.path.join(self._directory.name, 'store')}"

    def close(self) -> None:
        self._directory.cleanup()


def init_tensor_parallel(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str | None = None,
    timeout_s: float = 120.0,
) -> TensorParallel:
    """Join the default process group (``init_method``: ``tcp://host:port`` or ``file://path``)."""
    if init_method.startswith(("tcp://127.0.0.1", "file://")):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: no interface guessing
    dist.init_process_group(
        backend or default_backend(),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return TensorParallel(rank, world_size)


# fn(tp, *args) runs in every rank; its (picklable) return value comes back per rank.
RankFunction = Callable[..., Any]


def _rank_main(
    rank: int,
    fn: RankFunction,
    world_size: int,
    init_method: str,
    backend: str | None,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    tp = init_tensor_parallel(rank, world_size, init_method, backend)
    try:
        value = fn(tp, *args)
    finally:
        dist.destroy_process_group()
    buffer = io.BytesIO()
    torch.save(value, buffer)  # bytes, not shared-memory handles: safe after this process exits
    results.put((rank, buffer.getvalue()))


def run_ranks(
    fn: RankFunction,
    world_size: int,
    args: tuple[Any, ...] = (),
    backend: str | None = None,
    init_method: str | None = None,
    timeout_s: float = 300.0,
) -> list[Any]:
    """Run ``fn(tp, *args)`` in ``world_size`` spawned processes joined in one group; return
    each rank's result, in rank order. ``fn`` must be importable (a module-level function).
    A rank's exception is raised here; the ranks are killed after ``timeout_s``."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import start_processes

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    rendezvous = FileRendezvous()
    init_method = init_method or rendezvous.init_method
    # torch leaves start_processes unannotated.
    processes = start_processes(  # type: ignore[no-untyped-call]
        _rank_main,
        args=(fn, world_size, init_method, backend, args, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    collected: dict[int, Any] = {}

    def drain() -> None:  # while waiting too: a rank blocks on a full pipe until read
        while not results.empty():
            rank, payload = results.get()
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)

    try:
        while not processes.join(timeout=0.2):
            drain()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} tensor-parallel ranks ran past {timeout_s} s")
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
        rendezvous.close()
    drain()
    return [collected[rank] for rank in range(world_size)]
