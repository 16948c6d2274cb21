"""loadgen against a running cluster (real processes, a real nats-server): a small availability
trace (two nodes, one preempted with a grace period, one added) and Poisson arrivals, replayed
under the SpotServe policy and the restart baseline, each a mode of the same cluster; then the
command line (``--nats-url``, ondemand) writes its reports, table and plots, and ``compare``
reads them back. Every request completes; the fleet events happen as the trace says."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadgen.replay import Replayer, ReplayOptions
from loadgen.report import summarize
from loadgen.traces import read_fleet_trace
from shared.cluster import LocalCluster
from tests.helpers import connected, isolated_cluster
from tests.test_reparallelization import ENV

TRACE = """\
[0, "add", {"nodes": ["node-a", "node-b"]}]
[6000, "remove", {"nodes": ["node-a"]}]
[7000, "add", {"nodes": ["node-c"]}]
[12000, "DONE", {}]
"""


@pytest.fixture(scope="module")
def replay_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    env = {**ENV, "SPOTSERVE_PLANNER__FILL_SPARE": "true", "SPOTSERVE_PLANNER__RATE_POLL_S": "0.5"}
    with isolated_cluster(tmp_path_factory, "replay", tiny_model_dir, 2, env) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traces") / "small.jsonl"
    path.write_text(TRACE)
    return path


@pytest.mark.parametrize("policy", ["spotserve", "restart"])
async def test_a_trace_replays_under_a_policy(
    replay_cluster: LocalCluster, trace_file: Path, policy: str
) -> None:
    options = ReplayOptions(
        arrivals="poisson:2",
        policy=policy,  # type: ignore[arg-type]
        fleet=read_fleet_trace(trace_file),
        fleet_name=trace_file.name,
        grace_s=3.0,
        input_tokens=24,
        output_tokens=96,
        seed=3,
        warmup_s=2.0,
    )
    async with connected(replay_cluster) as nc:
        run = await Replayer(nc, options).run()
    report = summarize(run)
    counts = report["counts"]
    assert counts["requests"] == len(run.requests) > 5
    assert counts["completed"] == counts["requests"], [r.error for r in run.requests if r.error]
    assert all(len(r.token_s) == r.output_tokens for r in run.requests)
    assert report["policy"] == policy and report["preemptions"] == 1
    kinds = [kind for _, kind, _ in run.fleet_events]
    assert kinds.count("notice") == 1 and kinds.count("add") == 1
    # node-a's instance was paid until its deadline (6 s), node-c's from its request (7 s).
    spans = sorted(run.instances, key=lambda span: span.start_s)
    assert len(spans) == 3
    ended = [span for span in spans if span.end_s is not None]
    assert len(ended) == 1 and 5.0 < (ended[0].end_s or 0) < 8.0
    assert 6.0 < spans[-1].start_s < 9.0
    assert report["cost"]["total_usd"] > 0
    assert run.reconfigurations >= 2  # the notice and the join at least


def test_the_command_line_writes_reports_and_compares_them(
    replay_cluster: LocalCluster, trace_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "loadgen", "replay", "--arrivals", "poisson:2",
        "--duration", "4", "--fleet", str(trace_file), "--policy", "ondemand",
        "--nats-url", replay_cluster.nats_url, "--input-tokens", "16", "--output-tokens", "16",
        "--out", str(out), "--warmup", "0",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| P99 e2e (s) |" in done.stdout
    report = json.loads((out / "report-ondemand.json").read_text())
    assert report["preemptions"] == 0  # on-demand: no fleet events played
    assert report["cost"]["instance_hours"]["on-demand"] > 0
    assert report["counts"]["completed"] == report["counts"]["requests"] > 0
    assert {p.name for p in out.glob("*.png")} >= {"latency_cdf.png", "instances.png"}
    compared = subprocess.run(
        [sys.executable, "-m", "loadgen", "compare", str(out / "report-ondemand.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert compared.returncode == 0 and "ondemand" in compared.stdout


def test_a_malformed_trace_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[0, "add", {"nodes": ["a"]}]\n[5, "explode", {}]\n')
    done = subprocess.run(
        [sys.executable, "-m", "loadgen", "replay", "--arrivals", "poisson:1", "--fleet", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "bad.jsonl line 2" in done.stderr
