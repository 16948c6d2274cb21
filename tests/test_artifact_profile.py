"""The SpotServe artifact's T4 profiles as ParallelProfiles, and the cost model on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.planner.costmodel import allowed_pipeline, estimate, search, step_seconds
from shared.messages import InstanceRecord
from shared.model.profile import ProfileError, from_artifact, read_any_parallel_profile

KIT = Path(__file__).resolve().parents[2] / "shared" / "traces" / "spotserve" / "profiles"
needs_kit = pytest.mark.skipif(not KIT.is_dir(), reason="the kit's traces are not beside the repo")

# A small profile in the artifact's format (times in ms per layer).
ARTIFACT = {
    "name": "megatron_small",
    "layer_num": 10,
    "padded_layer_num": 12,
    "final_fix_factor": 1.1,
    "pp_init_comm": 7.0,
    "pp_incr_comm": 0.1,
    "hidden_size": 6144,
    "max_tp": 4,
    "embed": [0.3, 0.4, 0.6],
    "tp-4": {
        "bsz-1": {"init": 40.0, "incr": 2.0},
        "bsz-2": {"init": 70.0, "incr": 2.0},
        "bsz-4": {"init": 130.0, "incr": 2.2},
    },
}


def instances(count: int, memory: int) -> list[InstanceRecord]:
    return [
        InstanceRecord(instance_id=f"n{i}", node=f"n{i}", devices=4, device_kind="cuda",
                       device_memory_bytes=memory, started_at=0.0, heartbeat_at=0.0)
        for i in range(count)
    ]  # fmt: skip


def test_artifact_fields_become_the_cost_models_inputs() -> None:
    profile = from_artifact(ARTIFACT, "small.json")
    assert profile.num_layers == 10 and profile.padded_layers == 12
    assert profile.prefill_s[4] == [(1, 0.04), (2, 0.07), (4, 0.13)]
    assert profile.decode_s[4][2] == (4, 0.0022)
    assert profile.comm_prefill_s == pytest.approx(0.007)
    assert profile.latency_factor == 1.1
    assert profile.request_embed_s == [(1, 0.0003), (2, 0.0004), (4, 0.0006)]
    # fp32 Megatron GPT layer: 12 h^2 + 13 h parameters; KV: 2 h per layer per token.
    assert profile.layer_bytes == 4 * (12 * 6144**2 + 13 * 6144)
    assert profile.kv_bytes_per_token == 2 * 6144 * 10 * 4
    assert profile.min_devices_per_replica == 12  # h6144: the artifact's 20B minimum


def test_artifact_latency_formula() -> None:
    """latency = 1.1 (t1 + 128 t2 + 2 embed[log2 B]), t1/t2 as in the artifact's solver."""
    profile = from_artifact(ARTIFACT, "small.json")
    est = estimate(profile, 2, 4, 4, 512, 128)
    f = 5  # ceil(10 / 2)
    best_t1 = min(
        init * f * (2 + m - 1) / m + 7.0 * (2 - 1) / m
        for m, init in ((1, 130.0), (2, 70.0), (4, 40.0))
    )
    best_t2 = min(
        incr * f * (2 + m - 1) + 0.1 * (2 - 1) / m for m, incr in ((1, 2.2), (2, 2.0), (4, 2.0))
    )
    expected = 1.1 * (best_t1 + 128 * best_t2 + 2 * 0.6) / 1000
    assert est.latency_s == pytest.approx(expected)
    # One iteration of the simulator: a batched prefill of 4 (t1) plus 2 embeddings.
    assert step_seconds(profile, 2, 4, 4, 512, 0) == pytest.approx(1.1 * (best_t1 + 2 * 0.6) / 1000)


def test_continuous_batching_charges_single_sequence_prefills() -> None:
    profile = from_artifact(ARTIFACT, "small.json")
    static = estimate(profile, 2, 4, 4, 512, 128)
    rolling = estimate(profile, 2, 4, 4, 512, 128, continuous_batching=True)
    single = 1.1 * (40.0 * 5 * 2 + 7.0) / 1000  # one sequence through both stages
    assert rolling.latency_s == pytest.approx(static.latency_s - static.prefill_s + 4 * single)


def test_pipeline_degrees_follow_padding_and_minimum_devices() -> None:
    profile = from_artifact(ARTIFACT, "small.json")
    # P divides the 12 padded layers, P * M >= 12 devices, and no stage of the 10 real
    # layers is empty (P = 6 would leave the last one without a layer).
    assert [p for p in range(1, 11) if allowed_pipeline(profile, p, 4)] == [3, 4]


@needs_kit
def test_20b_on_12_gpus_is_the_artifacts_example() -> None:
    """The artifact: 20B on 12 GPUs -> D1 M4 P3 B4, 14.5 s per request."""
    profile = read_any_parallel_profile(KIT / "t4x4_megatron_h6144_profile.json")
    result = search(profile, instances(3, profile.device_memory_bytes), 0.35, 512, 128, 4,
                    whole_instance_groups=True)  # fmt: skip
    config = result.config
    assert (config.data, config.tensor, config.pipeline, config.batch) == (1, 4, 3, 4)
    assert config.latency_s == pytest.approx(14.5, abs=0.05)


def test_below_the_rate_the_previous_configuration_stays_within_tolerance() -> None:
    profile = from_artifact(ARTIFACT, "small.json")
    fleet = instances(4, profile.device_memory_bytes)
    best = search(profile, fleet, 1000.0, 512, 128, 4, whole_instance_groups=True)
    assert best.needs_on_demand
    others = [
        search(profile, fleet, 1000.0, 512, 128, 4, whole_instance_groups=True,
               fixed=(p, 4)).config
        for p in (3, 4) if p != best.config.pipeline
    ]  # fmt: skip
    close = [c for c in others if c.throughput_rps >= best.config.throughput_rps * 0.95]
    assert close  # P=3 is within 1% of the best P=4 here
    for previous in close:
        kept = search(profile, fleet, 1000.0, 512, 128, 4, whole_instance_groups=True,
                      prefer=previous).config  # fmt: skip
        assert kept.pipeline == previous.pipeline


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer_num": None}, "no 'layer_num' field"),
        ({"tp-4": {"bsz-1": {"init": 1.0}}}, "tp-4.bsz-1 needs init and incr"),
        ({"tp-4": {"batch-1": {"init": 1.0, "incr": 1.0}}}, "is not bsz-<batch size>"),
        ({"tp-4": {"bsz-1": {"init": -1.0, "incr": 1.0}}}, "tp-4.bsz-1.init must be a number"),
        ({"embed": []}, "embed must be a list"),
        ({"pp_init_comm": "fast"}, "pp_init_comm must be a number"),
    ],
)
def test_bad_artifact_profiles_name_the_file_and_field(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    data = {**ARTIFACT, **change}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "bad_profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"bad_profile\.json") as error:
        read_any_parallel_profile(path)
    assert message in str(error.value)


def test_a_profile_without_the_batch_or_degree_is_refused() -> None:
    profile = from_artifact(ARTIFACT, "small.json")
    profile.check_covers(4, 4, "small.json")
    with pytest.raises(ProfileError, match="no measurements at tensor degree 2"):
        profile.check_covers(2, 4, "small.json")
    with pytest.raises(ProfileError, match=r"do not span 1..8"):
        profile.check_covers(4, 8, "small.json")


def test_not_json_and_wrong_shape_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not JSON"):
        read_any_parallel_profile(path)
    path.write_text(json.dumps({"model": "x"}))
    with pytest.raises(ProfileError, match="not a parallel profile"):
        read_any_parallel_profile(path)
