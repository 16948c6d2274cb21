"""``spotserve-loadgen simulate``: the whole fleet on a virtual clock, with the planner's and the
scheduler's own code, writing the reports ``replay`` writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import loadgen.simulate
from loadgen.cli import app
from services.planner.policy import SpotServePolicy
from services.scheduler.mlfq import SkipJoinMlfqPolicy
from services.scheduler.policy import FcfsPolicy
from shared.model.profile import ParallelProfile

KIT = Path(__file__).resolve().parents[2] / "shared/traces"
needs_kit = pytest.mark.skipif(not KIT.exists(), reason="the kit's traces are not beside this repo")
SPOT = KIT / "spotserve"
PROFILE_20B = SPOT / "profiles/t4x4_megatron_h6144_profile.json"
QUERIES = SPOT / "queries/query_tpt0.35_cv6.txt"
A_S = SPOT / "trace_0304_real.jsonl"  # 3 removes (node-8, node-3, node-10)
POLICIES = ("spotserve", "reroute", "restart", "ondemand")
PNGS = ("latency_cdf.png", "instances.png", "latency_over_time.png")


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def simulate_20b(out: Path, *args: str | Path) -> Result:
    return cli("simulate", "--arrivals", QUERIES, "--fleet", A_S, "--profile", PROFILE_20B,
               "--out", out, *args)  # fmt: skip


def reports_in(out: Path) -> dict[str, dict[str, Any]]:
    return {p: json.loads((out / f"report-{p}.json").read_text()) for p in POLICIES}


@pytest.fixture(scope="module")
def a_s_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    """The 20B profile on the paper's A_S segment and query file under all four policies."""
    out = tmp_path_factory.mktemp("a_s")
    policies = [arg for p in POLICIES for arg in ("--policy", p)]
    return simulate_20b(out, *policies, "--baseline", "reroute"), out


@needs_kit
def test_the_command_simulates_every_policy_and_writes_replays_reports(
    a_s_run: tuple[Result, Path],
) -> None:
    result, out = a_s_run
    assert result.exit_code == 0, result.output
    reports = reports_in(out)
    for policy, report in reports.items():
        assert report["policy"] == policy
        assert report["clock"] == "simulated"
        assert report["fleet_trace"] == A_S.name
        counts = report["counts"]
        assert counts["requests"] > 400  # the query file's first 22 minutes, 0.35 req/s
        assert counts["completed"] == counts["requests"]
        assert counts["failed"] == counts["unfinished"] == 0
        assert counts["generated_tokens"] == 128 * counts["requests"]
    table = (out / "report.md").read_text()
    assert all(policy in table for policy in POLICIES)
    assert table in result.stdout
    for png in PNGS:
        assert (out / png).stat().st_size > 0
    compared = cli("compare", out / "report-spotserve.json", out / "report-restart.json")
    assert compared.exit_code == 0, compared.output
    assert "spotserve" in compared.stdout and "restart" in compared.stdout


@needs_kit
def test_baselines_restart_requests_and_ondemand_bills_only_on_demand(
    a_s_run: tuple[Result, Path],
) -> None:
    result, out = a_s_run
    assert result.exit_code == 0, result.output
    reports = reports_in(out)
    assert reports["spotserve"]["counts"]["restarts"] == 0  # migrates, never recomputes
    assert reports["reroute"]["counts"]["restarts"] > 0
    assert reports["restart"]["counts"]["restarts"] > 0
    for policy in ("spotserve", "reroute", "restart"):
        assert reports[policy]["preemptions"] == 3  # A_S's removes
        hours = reports[policy]["cost"]["instance_hours"]
        assert hours["spot"] > 0 and hours["on-demand"] == 0
    ondemand = reports["ondemand"]
    assert ondemand["preemptions"] == 0
    assert ondemand["cost"]["instance_hours"]["spot"] == 0
    assert ondemand["cost"]["instance_hours"]["on-demand"] > 0
    assert {i["price_class"] for i in ondemand["instances"]} == {"on-demand"}


def spy(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Counts the calls of ``owner.name`` and delegates to the real one."""
    calls: list[int] = []
    real: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@needs_kit
@pytest.mark.parametrize(
    ("scheduler", "policy_class"), [("fcfs", FcfsPolicy), ("skip-join-mlfq", SkipJoinMlfqPolicy)]
)
def test_the_services_own_policies_run_in_the_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheduler: str, policy_class: type
) -> None:
    plans = spy(monkeypatch, SpotServePolicy, "plan")
    schedules = spy(monkeypatch, policy_class, "schedule")
    memory = spy(monkeypatch, loadgen.simulate, "plan_memory")
    moves = spy(monkeypatch, loadgen.simulate, "planned_moves")
    # Up to the second add (360 s): an initial plan and at least one replan.
    result = simulate_20b(tmp_path, "--scheduler", scheduler, "--duration", "420")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report-spotserve.json").read_text())
    assert report["counts"]["completed"] == report["counts"]["requests"] > 0
    assert report["reconfigurations"] >= 1
    assert len(plans) >= 2
    assert len(moves) >= 2  # every plan's moves are decided by the scheduler's code
    # One scheduling decision and one memory plan per iteration: >= one per output token.
    tokens = report["counts"]["generated_tokens"]
    assert len(memory) >= tokens / 4  # at most --max-batch sequences per iteration
    assert len(schedules) >= len(memory)


@needs_kit
def test_an_unknown_scheduler_policy_or_baseline_is_a_usage_error(tmp_path: Path) -> None:
    for option, value in (
        ("--scheduler", "lifo"),
        ("--policy", "cheapest"),
        ("--baseline", "restart"),
    ):
        result = simulate_20b(tmp_path, option, value)
        assert result.exit_code == 2
        assert value in result.output
    assert not list(tmp_path.iterdir())


def artifact_profile(tmp_path: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    data = json.loads(PROFILE_20B.read_text())
    change(data)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def without_batches_from_4(data: dict[str, Any]) -> None:
    del data["tp-4"]["bsz-4"], data["tp-4"]["bsz-8"]


BAD_INPUTS: dict[str, tuple[str, str, list[str]]] = {
    # name: (option, file text or a profile change, message parts after the file's name)
    "profile without tp-4": ("--profile", "tp-4", ["tensor degree 4", "has 1, 2, 8"]),
    "profile without bsz-4": ("--profile", "bsz-4", ["at tensor degree 4", "[1, 2]", "1..4"]),
    "profile not JSON": ("--profile", "tp-4: {bsz-1: 1}\n", ["not JSON"]),
    "fleet out of order": (
        "--fleet",
        '[0, "add", {"nodes": ["node-0", "node-1", "node-2"]}]\n'
        '[600000, "add", {"nodes": ["node-3"]}]\n'
        '[300000, "remove", {"nodes": ["node-1"]}]\n',
        ["line 3"],
    ),
    "query row of 3 columns": (
        "--arrivals",
        "0,2.9,512,0\n1,5.9,512\n2,8.7,512,2800\n",
        ["line 2"],
    ),
}


@needs_kit
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_file_is_an_error_naming_it(tmp_path: Path, case: str) -> None:
    option, text, parts = BAD_INPUTS[case]
    if text == "tp-4":
        path = artifact_profile(tmp_path, lambda data: data.pop("tp-4"))
    elif text == "bsz-4":
        path = artifact_profile(tmp_path, without_batches_from_4)
    else:
        path = tmp_path / "input.txt"
        path.write_text(text)
    out = tmp_path / "out"
    args = {"--arrivals": QUERIES, "--fleet": A_S, "--profile": PROFILE_20B, option: path}
    result = cli("simulate", *[x for pair in args.items() for x in pair], "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    message = result.stderr.split(str(path), 1)  # the file first, then what is wrong with it
    assert len(message) == 2, result.stderr
    assert all(part in message[1] for part in parts), result.stderr
    assert not out.exists()  # failed before any simulation


def test_a_small_profile_of_one_device_instances_simulates_a_preemption(tmp_path: Path) -> None:
    """A profile as ``spotserve profile`` writes it (1 device per instance, tensor degree 1)
    and a hand-made fleet: three instances, two preempted, one added."""
    profile = ParallelProfile(
        model="tiny",
        device="cpu",
        created_at=0.0,
        num_layers=4,
        layer_bytes=50_000_000,
        embed_bytes=20_000_000,
        head_bytes=1_000,
        kv_bytes_per_token=16_384,
        prefill_tokens=128,
        prefill_s={1: [(1, 0.004), (2, 0.007), (4, 0.012), (8, 0.022)]},
        decode_s={1: [(1, 0.001), (2, 0.0011), (4, 0.0013), (8, 0.0016)]},
        comm_prefill_s=0.001,
        comm_decode_s=0.0001,
        devices_per_instance=1,
        device_memory_bytes=8 * 2**30,
    )
    profile_path = tmp_path / "profile.json"
    profile_path.write_text(profile.model_dump_json())
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(
        "0,add,node-0\n0,add,node-1\n0,add,node-2\n"
        "90000,remove,node-1\n150000,add,node-3\n240000,remove,node-2\n300000,add,node-4\n"
    )
    out = tmp_path / "out"
    result = cli("simulate", "--arrivals", "poisson:2", "--fleet", fleet, "--profile",
                 profile_path, "--input-tokens", "128", "--output-tokens", "32", "--out", out,
                 "--policy", "spotserve", "--policy", "restart")  # fmt: skip
    assert result.exit_code == 0, result.output
    for policy in ("spotserve", "restart"):
        report = json.loads((out / f"report-{policy}.json").read_text())
        assert report["preemptions"] == 2  # the trace's removes
        assert report["counts"]["requests"] > 400  # 2 req/s for 300 s
        assert report["counts"]["completed"] == report["counts"]["requests"]
        kills = {e["instance_id"] for e in report["fleet_events"] if e["kind"] == "kill"}
        assert kills == {"node-1", "node-2"}
