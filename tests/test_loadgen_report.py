"""loadgen.report: per-request metrics, run summaries, cost, report.json, comparison, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadgen.report import (
    InstanceSpan,
    Prices,
    RequestRecord,
    RunRecord,
    compare_main,
    load_report,
    markdown_table,
    summarize,
    write_plots,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(
    requests: list[RequestRecord],
    *,
    policy: str = "spotserve",
    duration_s: float = 10.0,
    time_scale: float = 1.0,
    instances: list[InstanceSpan] | None = None,
    **extra: Any,
) -> RunRecord:
    return RunRecord(
        policy=policy,
        arrivals="poisson:rate=1",
        fleet_trace="fleet.csv",
        time_scale=time_scale,
        duration_s=duration_s,
        requests=requests,
        instances=instances or [],
        **extra,
    )


def _completed(request_id: str, sent_s: float, e2e_s: float, tokens: int = 2) -> RequestRecord:
    """A finished request whose tokens arrive evenly, the last one e2e_s after sending."""
    first = sent_s + e2e_s / 2
    times = list(np.linspace(first, sent_s + e2e_s, tokens)) if tokens > 1 else [sent_s + e2e_s]
    return RequestRecord(request_id, sent_s, 8, tokens, [float(t) for t in times], "length")


def _by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in report["requests"]}


def _table_rows(table: str) -> dict[str, list[str]]:
    """The markdown table as {first cell: other cells}, header row under "metric"."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


# --- per request ---------------------------------------------------------------------------


def test_request_metrics_exact() -> None:
    request = RequestRecord("r", 1.0, 16, 4, [1.5, 2.0, 3.0, 3.25], "length", restarts=1)
    summary = _by_id(summarize(_run([request])))["r"]
    assert summary["ttft_s"] == pytest.approx(0.5)
    assert summary["tpot_s"] == pytest.approx(1.75 / 3)
    assert summary["max_gap_s"] == pytest.approx(1.0)
    assert summary["e2e_s"] == pytest.approx(2.25)
    assert summary["tokens"] == 4
    assert summary["status"] == "completed"
    assert summary["restarts"] == 1
    assert (summary["finish_reason"], summary["error"]) == ("length", None)
    assert (summary["input_tokens"], summary["output_tokens"], summary["sent_s"]) == (16, 4, 1.0)


def test_single_token_and_chunked_tokens() -> None:
    one = RequestRecord("one", 0.0, 4, 1, [0.4], "stop")
    # A chunk of three tokens arrives at once: gaps of 0 inside the chunk.
    chunked = RequestRecord("chunk", 0.0, 4, 4, [0.5, 0.5, 0.5, 1.5], "length")
    by_id = _by_id(summarize(_run([one, chunked])))
    assert by_id["one"]["tpot_s"] is None
    assert by_id["one"]["max_gap_s"] == 0.0
    assert by_id["one"]["e2e_s"] == by_id["one"]["ttft_s"] == pytest.approx(0.4)
    assert by_id["chunk"]["tpot_s"] == pytest.approx(1.0 / 3)
    assert by_id["chunk"]["max_gap_s"] == pytest.approx(1.0)


def test_error_wins_over_finish_reason() -> None:
    request = RequestRecord("r", 0.0, 4, 2, [0.1, 0.2], "stop", error="preempted")
    report = summarize(_run([request]))
    assert _by_id(report)["r"]["status"] == "failed"
    assert report["counts"]["failed"] == 1 and report["counts"]["completed"] == 0


# --- run statistics ------------------------------------------------------------------------


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(7)
    e2e = rng.uniform(0.5, 9.0, size=57)
    requests = [
        _completed(f"r{i}", float(i), float(v), tokens=int(rng.integers(1, 6)))
        for i, v in enumerate(e2e)
    ]
    report = summarize(_run(requests, duration_s=60.0))
    per_request = report["requests"]
    for metric in ("e2e_s", "ttft_s", "tpot_s", "max_gap_s"):
        values = np.array([r[metric] for r in per_request if r[metric] is not None])
        stats = report["latency"][metric]
        assert stats["n"] == len(values)
        for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
            assert stats[key] == pytest.approx(np.percentile(values, q, method="linear"))
        assert stats["mean"] == pytest.approx(values.mean())
        assert stats["max"] == pytest.approx(values.max())
    assert report["latency"]["e2e_s"]["p99"] == pytest.approx(np.percentile(e2e, 99))


def test_failed_and_unfinished_are_counted_not_timed() -> None:
    requests = [
        _completed("ok1", 0.0, 1.0),
        _completed("ok2", 1.0, 3.0),
        RequestRecord("failed", 0.0, 4, 4, [50.0, 90.0], error="instance lost"),
        RequestRecord("unfinished", 2.0, 4, 4, [70.0]),
        RequestRecord("never", 3.0, 4, 4),
    ]
    report = summarize(_run(requests, duration_s=10.0))
    assert report["counts"] == {
        "requests": 5,
        "completed": 2,
        "failed": 1,
        "unfinished": 2,
        "restarts": 0,
        "generated_tokens": 7,
    }
    assert report["latency"]["e2e_s"]["n"] == 2
    assert report["latency"]["e2e_s"]["max"] == pytest.approx(3.0)
    assert report["latency"]["ttft_s"]["max"] == pytest.approx(1.5)
    by_id = _by_id(report)
    assert by_id["failed"]["e2e_s"] is None and by_id["unfinished"]["e2e_s"] is None
    # Partial streams still show what they got, for diagnosis.
    assert by_id["failed"]["ttft_s"] == pytest.approx(50.0)
    assert by_id["failed"]["error"] == "instance lost"
    assert [by_id[k]["status"] for k in ("failed", "unfinished", "never")] == [
        "failed",
        "unfinished",
        "unfinished",
    ]


def test_throughput_and_goodput_with_slo() -> None:
    requests = [_completed(f"r{i}", float(i), e2e, tokens=3) for i, e2e in enumerate([1, 2, 3, 4])]
    report = summarize(_run(requests, duration_s=10.0), slo_s=2.5)
    assert report["throughput"]["requests_per_s"] == pytest.approx(0.4)
    assert report["throughput"]["tokens_per_s"] == pytest.approx(1.2)
    assert report["goodput"] == {"slo_s": 2.5, "within_slo": 2, "requests_per_s": 0.2}
    # The SLO is inclusive.
    assert summarize(_run(requests, duration_s=10.0), slo_s=2.0)["goodput"]["within_slo"] == 2


def test_goodput_without_slo_is_throughput() -> None:
    report = summarize(_run([_completed("a", 0.0, 5.0), _completed("b", 1.0, 50.0)]))
    assert report["goodput"]["slo_s"] is None
    assert report["goodput"]["within_slo"] == 2
    assert report["goodput"]["requests_per_s"] == report["throughput"]["requests_per_s"]


def test_run_fields_and_fleet_copied() -> None:
    run = _run(
        [_completed("a", 0.0, 1.0)],
        instances=[InstanceSpan("i-1", "spot", 0.0, 5.0)],
        preemptions=2,
        migrations=1,
        fleet_events=[(4.0, "notice", "i-1"), (5.0, "kill", "i-1")],
    )
    report = summarize(run)
    assert report["schema_version"] == 1 and report["clock"] == "wall"
    assert (report["policy"], report["arrivals"], report["fleet_trace"]) == (
        "spotserve",
        "poisson:rate=1",
        "fleet.csv",
    )
    assert (report["time_scale"], report["duration_s"]) == (1.0, 10.0)
    assert (report["preemptions"], report["migrations"]) == (2, 1)
    assert report["fleet_events"] == [
        {"t_s": 4.0, "kind": "notice", "instance_id": "i-1"},
        {"t_s": 5.0, "kind": "kill", "instance_id": "i-1"},
    ]
    assert report["instances"][0]["instance_id"] == "i-1"
    assert report["instances"][0]["end_s"] == 5.0


# --- cost ----------------------------------------------------------------------------------


def test_cost_in_trace_time() -> None:
    prices = Prices()
    run = _run(
        [_completed(f"r{i}", 0.0, 1.0) for i in range(4)],
        duration_s=72.0,
        time_scale=0.1,
        instances=[
            InstanceSpan("s1", "spot", 0.0, 36.0),  # 36 wall s at 0.1 = 360 trace s = 0.1 h
            InstanceSpan("s2", "spot", 36.0, 54.0),  # 0.05 h
            InstanceSpan("od", "on-demand", 0.0),  # open: to the run's end, 72 wall s = 0.2 h
        ],
    )
    cost = summarize(run, prices)["cost"]
    assert cost["clock"] == "trace"
    assert cost["instance_hours"]["spot"] == pytest.approx(0.15)
    assert cost["instance_hours"]["on-demand"] == pytest.approx(0.2)
    spot_usd, od_usd = 0.15 * 1.9046, 0.2 * 3.912
    assert cost["usd"]["spot"] == pytest.approx(spot_usd)
    assert cost["usd"]["on-demand"] == pytest.approx(od_usd)
    assert cost["total_usd"] == pytest.approx(spot_usd + od_usd)
    assert cost["usd_per_1000_completed"] == pytest.approx((spot_usd + od_usd) / 4 * 1000)
    assert cost["prices"] == {"spot_per_hour": 1.9046, "on_demand_per_hour": 3.912}


def test_cost_with_custom_prices_and_per_instance() -> None:
    run = _run([], duration_s=3600.0, instances=[InstanceSpan("a", "spot", 0.0, 1800.0)])
    report = summarize(run, Prices(spot_per_hour=2.0, on_demand_per_hour=5.0))
    assert report["instances"][0]["hours"] == pytest.approx(0.5)
    assert report["instances"][0]["usd"] == pytest.approx(1.0)
    assert report["cost"]["total_usd"] == pytest.approx(1.0)
    assert report["cost"]["usd_per_1000_completed"] is None


# --- edge cases ----------------------------------------------------------------------------


def test_no_completed_requests() -> None:
    requests = [RequestRecord("f", 0.0, 4, 4, [1.0], error="boom"), RequestRecord("u", 1.0, 4, 4)]
    instances = [InstanceSpan("a", "on-demand", 0.0)]
    report = summarize(_run(requests, instances=instances), slo_s=1.0)
    for metric in ("e2e_s", "ttft_s", "tpot_s", "max_gap_s"):
        assert report["latency"][metric] == {
            "p50": None,
            "p90": None,
            "p99": None,
            "mean": None,
            "max": None,
            "n": 0,
        }
    assert report["throughput"]["requests_per_s"] == 0.0
    assert report["goodput"]["requests_per_s"] == 0.0
    assert report["cost"]["usd_per_1000_completed"] is None
    json.dumps(report, allow_nan=False)
    table = markdown_table([report])
    assert _table_rows(table)["P99 e2e (s)"] == ["—"]


def test_empty_run_and_zero_duration() -> None:
    report = summarize(_run([], duration_s=0.0))
    assert report["counts"]["requests"] == 0
    assert report["throughput"] == {"requests_per_s": None, "tokens_per_s": None}
    assert report["goodput"]["requests_per_s"] is None
    assert report["cost"]["total_usd"] == 0.0
    json.dumps(report, allow_nan=False)


def test_zero_token_requests() -> None:
    # Finished with no tokens (e.g. immediate EOS): completed, but no latency sample.
    empty_done = RequestRecord("empty", 0.0, 4, 0, [], "stop")
    report = summarize(_run([empty_done, _completed("ok", 0.0, 2.0)]), slo_s=10.0)
    summary = _by_id(report)["empty"]
    assert summary["status"] == "completed" and summary["tokens"] == 0
    assert (summary["ttft_s"], summary["tpot_s"], summary["e2e_s"]) == (None, None, None)
    assert summary["max_gap_s"] == 0.0
    assert report["counts"]["completed"] == 2
    assert report["latency"]["e2e_s"]["n"] == 1
    assert report["latency"]["max_gap_s"]["n"] == 2
    assert report["goodput"]["within_slo"] == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"time_scale": 0.0}, "time_scale"),
        ({"duration_s": -1.0}, "duration_s"),
    ],
)
def test_invalid_run_rejected(changes: dict[str, float], message: str) -> None:
    run = _run([])
    for key, value in changes.items():
        setattr(run, key, value)
    with pytest.raises(ValueError, match=message):
        summarize(run)


def test_invalid_slo_and_price_class_rejected() -> None:
    with pytest.raises(ValueError, match="slo_s"):
        summarize(_run([]), slo_s=0.0)
    bad = InstanceSpan("x", "reserved", 0.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        summarize(_run([], instances=[bad]))


# --- report.json ---------------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path) -> None:
    run = _run(
        [_completed("a", 0.0, 1.0, tokens=3), RequestRecord("b", 1.0, 4, 4, error="x")],
        instances=[InstanceSpan("i", "spot", 0.0)],
        fleet_events=[(2.0, "kill", "i")],
    )
    report = summarize(run, slo_s=5.0)
    path = write_report(report, tmp_path / "run" / "report.json")
    assert load_report(path) == report


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"policy": "spotserve"}', "schema_version"),
        ('{"schema_version": 2}', "schema_version"),
    ],
)
def test_bad_report_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "broken-report.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_report(path)
    assert str(path) in str(info.value)


# --- comparison table ----------------------------------------------------------------------


def _priced_report(policy: str, e2e_values: list[float], spot_hours: float) -> dict[str, Any]:
    requests = [_completed(f"r{i}", float(i), e2e) for i, e2e in enumerate(e2e_values)]
    span = InstanceSpan("i", "spot", 0.0, spot_hours * 3600.0)
    return summarize(_run(requests, policy=policy, duration_s=100.0, instances=[span]))


def test_markdown_table_ratio_rows() -> None:
    spot = _priced_report("spotserve", [1.0] * 10, spot_hours=1.0)
    ondemand = _priced_report("ondemand", [2.0] * 10, spot_hours=4.0)
    table = markdown_table([spot, ondemand], baseline="ondemand")
    rows = _table_rows(table)
    assert rows["metric"] == ["spotserve", "ondemand"]
    assert rows["P99 e2e (s)"] == ["1.000", "2.000"]
    assert rows["P99 e2e / baseline"] == ["0.50x", "1.00x"]
    assert rows["cost / baseline"] == ["0.25x", "1.00x"]
    assert rows["cost vs baseline"] == ["-75.0%", "baseline"]
    assert rows["cost"] == ["$1.90", "$7.62"]
    assert rows["completed / failed"] == ["10 / 0", "10 / 0"]
    assert "Baseline: `ondemand`" in table
    for row in (
        "P50 e2e (s)",
        "P90 e2e (s)",
        "mean e2e (s)",
        "P99 TTFT (s)",
        "P99 max gap (s)",
        "throughput (req/s)",
        "goodput (req/s)",
        "preemptions",
        "migrations",
    ):
        assert row in rows


def test_markdown_table_default_baseline_is_first() -> None:
    first = _priced_report("restart", [4.0] * 5, spot_hours=2.0)
    second = _priced_report("spotserve", [1.0] * 5, spot_hours=1.0)
    table = markdown_table([first, second])
    rows = _table_rows(table)
    assert rows["P99 e2e / baseline"] == ["1.00x", "0.25x"]
    assert rows["cost / baseline"] == ["1.00x", "0.50x"]
    assert "Baseline: `restart` (the first report)" in table
    with pytest.raises(ValueError, match="nosuch"):
        markdown_table([first, second], baseline="nosuch")


def test_markdown_ratio_missing_when_baseline_has_no_latency() -> None:
    empty = summarize(_run([RequestRecord("x", 0.0, 1, 1)], policy="ondemand"))
    other = _priced_report("spotserve", [1.0], spot_hours=1.0)
    rows = _table_rows(markdown_table([empty, other]))
    assert rows["P99 e2e / baseline"] == ["—", "—"]
    assert rows["cost / baseline"] == ["—", "—"]  # the baseline cost $0


def test_compare_main_labels_shared_policies_by_file(tmp_path: Path) -> None:
    fast = _priced_report("spotserve", [1.0] * 4, spot_hours=1.0)
    slow = _priced_report("spotserve", [3.0] * 4, spot_hours=1.0)
    paths = [
        write_report(fast, tmp_path / "a" / "report.json"),
        write_report(slow, tmp_path / "b" / "report.json"),
    ]
    out = compare_main(paths, baseline="spotserve@b/report.json")
    rows = _table_rows(out)
    assert rows["metric"] == ["spotserve@a/report.json", "spotserve@b/report.json"]
    assert rows["P99 e2e / baseline"] == ["0.33x", "1.00x"]
    assert out == markdown_table(
        [fast, slow], baseline="spotserve@b/report.json", sources=["a/report.json", "b/report.json"]
    )


def test_compare_main_bad_file_names_it(tmp_path: Path) -> None:
    good = write_report(_priced_report("ondemand", [1.0], 1.0), tmp_path / "good.json")
    with pytest.raises(ValueError, match=r"missing\.json"):
        compare_main([good, tmp_path / "missing.json"])


# --- plots ---------------------------------------------------------------------------------


def test_write_plots_creates_pngs(tmp_path: Path) -> None:
    spot = summarize(
        _run(
            [
                _completed("a", 0.0, 1.0, tokens=4),
                _completed("b", 2.0, 3.0, tokens=4),
                RequestRecord("c", 3.0, 4, 4, [3.5], error="lost"),
            ],
            instances=[
                InstanceSpan("s1", "spot", 0.0, 6.0),
                InstanceSpan("s2", "spot", 0.0),
                InstanceSpan("o1", "on-demand", 6.5),
            ],
            preemptions=1,
            fleet_events=[(4.0, "notice", "s1"), (6.0, "kill", "s1"), (6.5, "add", "o1")],
        )
    )
    empty = summarize(_run([], policy="ondemand"))  # nothing completed, no instances
    out_dir = tmp_path / "plots"
    paths = write_plots([spot, empty], out_dir)
    assert len(paths) == 3
    assert len({p.name for p in paths}) == 3
    for path in paths:
        assert path.parent == out_dir and path.suffix == ".png"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 1000
