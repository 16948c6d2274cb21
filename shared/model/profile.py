"""A timing profile of a model on this hardware: prefill time by prompt length, decode time
by batch size. The scheduler's skip-join MLFQ places new jobs with it (and the planner's cost
model will use it). Produced by ``spotserve profile``; stored under ``$SPOTSERVE_HOME/profiles``.
"""

from __future__ import annotations

import hashlib
import os
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, Field

from shared.config import spotserve_home

if TYPE_CHECKING:
    import torch

    from shared.model.engine import Engine
    from shared.model.parallel import TensorParallel

DEFAULT_PREFILL_LENGTHS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)


class ModelProfile(BaseModel):
    model: str
    device: str
    created_at: float
    # (prompt tokens, seconds) sorted by tokens; (batch size, seconds per iteration).
    prefill: list[tuple[int, float]] = Field(min_length=1)
    decode: list[tuple[int, float]] = Field(min_length=1)

    def prefill_time_s(self, tokens: int) -> float:
        return _interpolate(self.prefill, tokens)

    def decode_time_s(self, batch_size: int) -> float:
        return _interpolate(self.decode, batch_size)


class ParallelProfile(BaseModel):
    """The planner's cost-model inputs (SpotServe's form, docs/design.md "Parallel configuration"):
    per-layer prefill and decode seconds by tensor degree M and micro-batch size b, the cost of
    one pipeline send, and the sizes that decide memory and migration bytes."""

    model: str
    device: str
    created_at: float
    num_layers: int = Field(ge=1)
    # Weight bytes of one layer (all shards together), of the embeddings, of norm + head.
    layer_bytes: int = Field(ge=0)
    embed_bytes: int = Field(ge=0)
    head_bytes: int = Field(ge=0)
    # KV cache bytes per token of one sequence over all layers.
    kv_bytes_per_token: int = Field(ge=0)
    prefill_tokens: int = Field(ge=1)  # the prompt length prefill_s was measured with
    # M -> [(b, seconds per layer)], sorted by b.
    prefill_s: dict[int, list[tuple[int, float]]]
    decode_s: dict[int, list[tuple[int, float]]]
    # One stage-to-stage activation send of one micro-batch (prefill, decode).
    comm_prefill_s: float = Field(ge=0)
    comm_decode_s: float = Field(ge=0)
    # Embedding lookup + sampling per iteration (outside the layers).
    embed_s: float = Field(default=0.0, ge=0)
    devices_per_instance: int = Field(ge=1)
    device_memory_bytes: int = Field(ge=0)
    # The SpotServe artifact's latency formula (``from_artifact``): every time is multiplied by
    # its ``final_fix_factor``, and a request batch of b pays 2 * request_embed_s(b) once.
    latency_factor: float = Field(default=1.0, gt=0)
    request_embed_s: list[tuple[int, float]] = Field(default_factory=list)
    # A pipeline degree must divide this layer count (FasterTransformer pads the layers); None:
    # any P that leaves no stage empty.
    padded_layers: int | None = Field(default=None, ge=1)
    # Fewest devices one replica may use (P * M): the artifact's minimum world size, which its
    # fp32 checkpoints and FasterTransformer's buffers need on 16 GB T4s.
    min_devices_per_replica: int = Field(default=1, ge=1)

    def tensor_degrees(self) -> list[int]:
        return sorted(set(self.prefill_s) & set(self.decode_s))

    def request_embed_time_s(self, batch: int) -> float:
        return _interpolate(self.request_embed_s, batch) if self.request_embed_s else 0.0

    def check_covers(self, tensor: int, max_batch: int, source: str) -> None:
        """ProfileError unless the profile measured tensor degree ``tensor`` at micro-batch
        sizes spanning 1..max_batch (between measured sizes the times are interpolated, never
        extrapolated past the largest)."""
        if tensor not in self.tensor_degrees():
            raise ProfileError(
                f"{source}: no measurements at tensor degree {tensor}"
                f" (has {', '.join(map(str, self.tensor_degrees())) or 'none'})"
            )
        for name, table in (("prefill", self.prefill_s[tensor]), ("decode", self.decode_s[tensor])):
            sizes = [b for b, _ in table]
            if not sizes or min(sizes) > 1 or max(sizes) < max_batch:
                raise ProfileError(
                    f"{source}: {name} at tensor degree {tensor} measured for batch sizes"
                    f" {sizes}, which do not span 1..{max_batch} (the largest batch)"
                )

    def prefill_layer_s(self, tensor: int, batch: int) -> float:
        return _interpolate(self.prefill_s[tensor], batch)

    def decode_layer_s(self, tensor: int, batch: int) -> float:
        return _interpolate(self.decode_s[tensor], batch)

    @property
    def weight_bytes(self) -> int:
        return self.embed_bytes + self.num_layers * self.layer_bytes + self.head_bytes


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


# The SpotServe artifact's T4 profiles (elastic-switch/profile/T4-4x/*.json) measure
# FasterTransformer's Megatron GPT models; their shapes come from the artifact's checkpoint
# generator (ckpt/generate_random_gpt_ckpt.py: vocabulary 51200, 1024 positions, fp32 weights,
# inter size 4h, tied head) and its run scripts (scripts_ae/aws_e2e.sh: MIN_WORLD_SIZE 4 for
# 6.7B, 12 for 20B (h6144), 16 for 30B (h7168); 4 GPUs per g4dn.12xlarge instance).
ARTIFACT_VOCAB = 51200
ARTIFACT_POSITIONS = 1024
ARTIFACT_BYTES_PER_PARAM = 4  # fp32
ARTIFACT_PREFILL_TOKENS = 512
ARTIFACT_MIN_DEVICES = {4096: 4, 6144: 12, 7168: 16}  # by hidden size
T4_MEMORY_BYTES = 16 * 10**9  # NVIDIA T4 datasheet: 16 GB GDDR6
T4_PER_INSTANCE = 4  # g4dn.12xlarge


def from_artifact(data: dict[str, object], source: str) -> ParallelProfile:
    """A ParallelProfile from the SpotServe artifact's profile JSON, read as is: per tensor
    degree ``tp-M`` and batch ``bsz-B``, ``init`` (ms per layer, 512-token prefill) and
    ``incr`` (ms per layer, one decode step); ``embed[log2 B]`` ms; ``pp_init_comm`` /
    ``pp_incr_comm`` ms per hop; ``final_fix_factor``; ``layer_num`` / ``padded_layer_num``;
    ``hidden_size``. Its latency formula is kept (``latency_factor``, ``request_embed_s``)."""

    def field(name: str) -> object:
        if name not in data:
            raise ProfileError(f"{source}: no {name!r} field (a SpotServe artifact profile has it)")
        return data[name]

    def number(name: str, value: object, positive: bool = False) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        if not ok or (positive and value <= 0):  # type: ignore[operator]
            raise ProfileError(f"{source}: {name} must be a number {'> 0' if positive else '>= 0'},"
                               f" not {value!r}")  # fmt: skip
        return float(value)  # type: ignore[arg-type]

    layers = int(number("layer_num", field("layer_num"), positive=True))
    padded = int(number("padded_layer_num", data.get("padded_layer_num", layers), positive=True))
    hidden = int(number("hidden_size", field("hidden_size"), positive=True))
    embeds = field("embed")
    if not isinstance(embeds, list) or not embeds:
        raise ProfileError(f"{source}: embed must be a list of ms by log2(batch), not {embeds!r}")
    prefill: dict[int, list[tuple[int, float]]] = {}
    decode: dict[int, list[tuple[int, float]]] = {}
    for key, table in data.items():
        if not key.startswith("tp-"):
            continue
        try:
            tensor = int(key[3:])
        except ValueError:
            raise ProfileError(f"{source}: {key!r} is not tp-<degree>") from None
        if not isinstance(table, dict) or not table:
            raise ProfileError(f"{source}: {key} must map bsz-<B> to init/incr times")
        rows = []
        for bkey, times in table.items():
            where = f"{key}.{bkey}"
            if not bkey.startswith("bsz-") or not bkey[4:].isdigit() or int(bkey[4:]) < 1:
                raise ProfileError(f"{source}: {where} is not bsz-<batch size>")
            if not isinstance(times, dict) or "init" not in times or "incr" not in times:
                raise ProfileError(f"{source}: {where} needs init and incr (ms per layer)")
            init = number(f"{where}.init", times["init"], positive=True)
            incr = number(f"{where}.incr", times["incr"], positive=True)
            rows.append((int(bkey[4:]), init / 1000, incr / 1000))
        rows.sort()
        prefill[tensor] = [(b, init) for b, init, _ in rows]
        decode[tensor] = [(b, incr) for b, _, incr in rows]
    if not prefill:
        raise ProfileError(f"{source}: no tp-<degree> tables")
    layer_params = 12 * hidden * hidden + 13 * hidden
    factor = number("final_fix_factor", data.get("final_fix_factor", 1.0), positive=True)
    return ParallelProfile(
        model=str(data.get("name", source)),
        device="cuda:T4",
        created_at=0.0,
        num_layers=layers,
        layer_bytes=layer_params * ARTIFACT_BYTES_PER_PARAM,
        embed_bytes=(ARTIFACT_VOCAB + ARTIFACT_POSITIONS) * hidden * ARTIFACT_BYTES_PER_PARAM,
        head_bytes=2 * hidden * ARTIFACT_BYTES_PER_PARAM,  # final layer norm; the head is tied
        kv_bytes_per_token=2 * hidden * layers * ARTIFACT_BYTES_PER_PARAM,
        prefill_tokens=ARTIFACT_PREFILL_TOKENS,
        prefill_s=prefill,
        decode_s=decode,
        comm_prefill_s=number("pp_init_comm", field("pp_init_comm")) / 1000,
        comm_decode_s=number("pp_incr_comm", field("pp_incr_comm")) / 1000,
        devices_per_instance=T4_PER_INSTANCE,
        device_memory_bytes=T4_MEMORY_BYTES,
        latency_factor=factor,
        request_embed_s=[(2**i, number(f"embed[{i}]", ms) / 1000) for i, ms in enumerate(embeds)],
        padded_layers=padded,
        min_devices_per_replica=ARTIFACT_MIN_DEVICES.get(hidden, 1),
    )


def read_any_parallel_profile(path: Path) -> ParallelProfile:
    """A SpotServe artifact profile (it has ``layer_num`` or ``tp-*`` tables) or a profile
    ``spotserve profile`` wrote; ProfileError naming the file otherwise."""
    import json

    from pydantic import ValidationError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a JSON object")
    if "layer_num" in data or any(key.startswith("tp-") for key in data):
        return from_artifact(data, str(path))
    try:
        return ParallelProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "profile"
        raise ProfileError(
            f"{path}: not a parallel profile ({where}: {first['msg']}); expected the output of"
            " `spotserve profile` or a SpotServe artifact profile"
        ) from None


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    """Piecewise linear; beyond the last point, extrapolate from the last two."""
    xs = [p[0] for p in points]
    if len(points) == 1:
        return points[0][1] * max(x, 1) / max(xs[0], 1)
    index = min(max(bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[index - 1], points[index]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def default_profile_path(model_dir: Path, device: str) -> Path:
    """One profile per architecture (config.json) and device kind."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]
    return spotserve_home() / "profiles" / f"{digest}-{device.split(':')[0]}.json"


def find_profile(model_dir: Path) -> Path | None:
    """An existing profile of this architecture, a GPU one first (the scheduler does not know
    the executors' devices when it starts)."""
    cuda = default_profile_path(model_dir, "cuda")
    cpu = default_profile_path(model_dir, "cpu")
    return next((path for path in (cuda, cpu) if path.exists()), None)


ProfileT = TypeVar("ProfileT", bound=BaseModel)


def load_profile(path: Path) -> ModelProfile | None:
    return _load(path, ModelProfile)


def save_profile(profile: ModelProfile, path: Path) -> None:
    _save(profile, path)


def _load(path: Path, model: type[ProfileT]) -> ProfileT | None:
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None


def _save(profile: BaseModel, path: Path) -> None:
    """Written whole or not at all (a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.model_dump_json(indent=2))
    tmp.replace(path)


def measure_profile(
    model_dir: Path,
    device: str | None = None,
    lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    repeats: int = 3,
) -> ModelProfile:
    """Time the engine's prefill and decode (median of ``repeats``, after a warm-up)."""
    from shared.model.engine import Engine, SequenceStep

    slots = max(batch_sizes)
    engine = Engine(model_dir, device=device, max_slots=slots)
    usable = [n for n in lengths if n < engine.context_length]

    def prefill(n: int) -> float:
        started = time.perf_counter()
        engine.step([SequenceStep("p", [3] * n, 0.0, 1.0, 0, 0)])
        _sync(engine)
        elapsed = time.perf_counter() - started
        engine.release(["p"])
        return elapsed

    def decode(batch: int) -> float:
        ids = [f"d{i}" for i in range(batch)]
        engine.step([SequenceStep(rid, [3] * 16, 0.0, 1.0, 0, 0) for rid in ids])
        started = time.perf_counter()
        engine.step([SequenceStep(rid, [4], 0.0, 1.0, 0, 1) for rid in ids])
        _sync(engine)
        elapsed = time.perf_counter() - started
        engine.release(ids)
        return elapsed

    prefill(16)  # warm-up: first calls allocate and pick kernels
    decode(1)
    return ModelProfile(
        model=str(model_dir),
        device=str(engine.device),
        created_at=time.time(),
        prefill=_non_decreasing(
            [(n, _median([prefill(n) for _ in range(repeats)])) for n in usable]
        ),
        decode=_non_decreasing(
            [(b, _median([decode(b) for _ in range(repeats)])) for b in batch_sizes]
        ),
    )


def _non_decreasing(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """More tokens never take less time; a noisy dip would make interpolation lie."""
    result, highest = [], 0.0
    for x, seconds in points:
        highest = max(highest, seconds)
        result.append((x, highest))
    return result


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _sync(engine: object) -> None:
    import torch

    device = getattr(engine, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def default_parallel_profile_path(model_dir: Path, device: str) -> Path:
    base = default_profile_path(model_dir, device)
    return base.with_name(base.stem + "-parallel.json")


def load_parallel_profile(path: Path) -> ParallelProfile | None:
    return _load(path, ParallelProfile)


def save_parallel_profile(profile: ParallelProfile, path: Path) -> None:
    _save(profile, path)


def measure_parallel_profile(
    model_dir: Path,
    device: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    prefill_tokens: int = 128,
    repeats: int = 3,
    tensor_degrees: tuple[int, ...] = (1,),
) -> ParallelProfile:
    """Per-layer prefill/decode seconds of the engine on this device, by micro-batch size, for
    each tensor-parallel degree M (M > 1: M ranks started here, as an executor runs them; on
    a CPU they share its cores). The pipeline send cost is left at 0: the planner measures it
    over its own NATS link."""
    from shared.model.engine import Engine

    engine = Engine(model_dir, device=device, max_slots=max(batch_sizes))
    model = engine.model
    tokens = min(prefill_tokens, engine.context_length - 2)
    prefill_s, decode_s = {}, {}
    for degree in sorted(set(tensor_degrees) | {1}):
        if degree == 1:
            times = layer_times(engine, batch_sizes, tokens, repeats)
        else:
            from shared.model.parallel import run_ranks

            args = (model_dir, device, batch_sizes, tokens, repeats)
            times = run_ranks(_rank_layer_times, degree, args)[0]  # every rank waits alike
        prefill_s[degree], decode_s[degree] = times

    def tensor_bytes(module: torch.nn.Module | None) -> int:
        assert module is not None, "a whole model holds every part"
        return sum(p.numel() * p.element_size() for p in module.parameters())

    model_args = model.args
    layers = model_args.n_layers
    element = next(model.parameters()).element_size()
    return ParallelProfile(
        model=str(model_dir),
        device=str(engine.device),
        created_at=time.time(),
        num_layers=layers,
        layer_bytes=tensor_bytes(model.layers[0]),
        embed_bytes=tensor_bytes(model.embed_tokens),
        head_bytes=tensor_bytes(model.norm)
        + (0 if model_args.tie_word_embeddings else tensor_bytes(model.lm_head)),
        kv_bytes_per_token=2 * model_args.n_kv_heads * model_args.head_dim * layers * element,
        prefill_tokens=tokens,
        prefill_s=prefill_s,
        decode_s=decode_s,
        comm_prefill_s=0.0,
        comm_decode_s=0.0,
        devices_per_instance=1,
        device_memory_bytes=device_memory_bytes(engine.device),
    )


Points = list[tuple[int, float]]


def layer_times(
    engine: Engine, batch_sizes: tuple[int, ...], tokens: int, repeats: int
) -> tuple[Points, Points]:
    """(prefill, decode) seconds per layer by batch size, of ``tokens``-long prompts."""
    from shared.model.engine import SequenceStep

    def timed(steps: list[SequenceStep]) -> float:
        started = time.perf_counter()
        engine.step(steps)
        _sync(engine)
        return time.perf_counter() - started

    def prefill(batch: int) -> float:
        ids = [f"p{i}" for i in range(batch)]
        elapsed = timed([SequenceStep(rid, [3] * tokens, 0.0, 1.0, 0, 0) for rid in ids])
        engine.release(ids)
        return elapsed

    def decode(batch: int) -> float:
        ids = [f"d{i}" for i in range(batch)]
        engine.step([SequenceStep(rid, [3] * 16, 0.0, 1.0, 0, 0) for rid in ids])
        elapsed = timed([SequenceStep(rid, [4], 0.0, 1.0, 0, 1) for rid in ids])
        engine.release(ids)
        return elapsed

    prefill(1)  # warm-up
    decode(1)
    layers = engine.model.args.n_layers

    def per_layer(measure: Callable[[int], float], batch: int) -> float:
        # The embedding and head are folded into the layers' share (embed_s stays 0): a
        # separate measurement of them is below this machine's timing noise.
        return _median([measure(batch) for _ in range(repeats)]) / layers

    return (
        _non_decreasing([(b, per_layer(prefill, b)) for b in batch_sizes]),
        _non_decreasing([(b, per_layer(decode, b)) for b in batch_sizes]),
    )


def _rank_layer_times(
    tp: TensorParallel,
    model_dir: Path,
    device: str | None,
    batch_sizes: tuple[int, ...],
    tokens: int,
    repeats: int,
) -> tuple[Points, Points]:
    """One rank of a tensor-parallel measurement (run by ``run_ranks`` in every rank)."""
    import torch

    from shared.model.engine import Engine

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.world_size))
    if device is not None and device.startswith("cuda"):
        device = f"cuda:{tp.rank}"
    engine = Engine(model_dir, device=device, max_slots=max(batch_sizes), tp=tp)
    return layer_times(engine, batch_sizes, tokens, repeats)


def device_memory_bytes(device: object) -> int:
    """Memory of a device: the GPU's, or the host's for the CPU."""
    import torch

    if isinstance(device, torch.device) and device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
