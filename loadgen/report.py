"""Summaries, comparison tables and plots for load-generator runs.

The replayer fills a `RunRecord`; `summarize` turns it into the content of `report.json`, which is
self-contained: `markdown_table`, `write_plots` and `spotserve-loadgen compare` work from
report.json files alone, so a run never has to be replayed to be re-plotted or compared.

Two clocks
----------
Latencies and every `*_s` time are **wall seconds** since the run's start (the replay's own
clock, `"clock": "wall"`), or simulated seconds for `spotserve-loadgen simulate`
(`"clock": "simulated"`, the same schema otherwise, so `compare` takes both). Cost is in
**trace time**: the replay runs at `time_scale` of the trace's clock, so an instance up for `w`
wall seconds is billed `w / time_scale` seconds (time_scale 0.1: a 36 s wall span is 360 s =
0.1 instance-hour).

report.json, schema_version 1
-----------------------------
Top level:

- `schema_version` (int): 1.
- `clock` (str): `"wall"` (replay) or `"simulated"` (simulate): the clock of every latency
  and `*_s` time below.
- `policy` (str): `"spotserve"`, `"reroute"`, `"restart"` or `"ondemand"`.
- `arrivals` (str): the arrival spec or file name the replay used.
- `fleet_trace` (str | null): the fleet (preemption) trace, null for none.
- `time_scale` (float): fraction of the trace's clock the replay ran at.
- `duration_s` (float): wall seconds the replay ran.
- `counts` (object): `requests` (all sent), `completed` (finished without error),
  `failed` (ended with an error), `unfinished` (no error, never finished), `restarts` (sum of
  per-request restarts), `generated_tokens` (tokens delivered to clients, all requests).
- `latency` (object): one entry per metric, `e2e_s`, `ttft_s`, `tpot_s`, `max_gap_s` (meanings
  under `requests`), each `{"p50", "p90", "p99", "mean", "max", "n"}` in wall seconds over the
  completed requests that have the metric (`n` of them; percentiles: numpy, linear). With
  `n` = 0 every statistic is null.
- `throughput` (object): `requests_per_s` (completed requests / duration_s) and `tokens_per_s`
  (generated_tokens / duration_s); null when duration_s is 0.
- `goodput` (object): `slo_s` (the e2e latency SLO in wall seconds, null for none),
  `within_slo` (completed requests with e2e_s <= slo_s; all completed when slo_s is null) and
  `requests_per_s` (within_slo / duration_s; equals throughput's when slo_s is null).
- `preemptions` (int): preemption notices the replayer injected; `migrations` (int): KV caches
  the run's plans moved off dying instances (just-in-time "migrate" decisions);
  `reconfigurations` (int): plans published during the run.
- `cost` (object), trace time: `clock` (`"trace"`), `prices` (`spot_per_hour`,
  `on_demand_per_hour`, $ per instance-hour), `instance_hours` and `usd` (each keyed by price
  class, `"spot"` and `"on-demand"`), `total_usd`, and `usd_per_1000_completed` (null when
  nothing completed).
- `requests` (list), one object per request in the record's order: `id`, `status`
  (`"completed"`, `"failed"` or `"unfinished"`), `sent_s`, `input_tokens`, `output_tokens`
  (asked for), `tokens` (received), `ttft_s` (first token - sent), `tpot_s` (mean gap between
  tokens after the first: (last - first) / (tokens - 1)), `max_gap_s` (largest gap between
  consecutive tokens, 0 for fewer than 2 tokens), `e2e_s` (last token - sent), `finish_reason`,
  `error`, `restarts`. ttft_s and tpot_s are null without 1 and 2 tokens respectively; e2e_s is
  null unless the request completed with at least one token (an unfinished request's last token
  is not its end), so a zero-token completion counts as completed but adds no latency sample
  and is not within any SLO.
- `instances` (list): `instance_id`, `price_class`, `start_s`, `end_s` (wall; null: up until
  the run's end), `hours` (billed, trace time), `usd`.
- `fleet_events` (list): `t_s` (wall), `kind` (`"notice"`, `"kill"`, `"add"`, `"remove"`),
  `instance_id`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from shared.config import ON_DEMAND_PRICE_PER_HOUR, SPOT_PRICE_PER_HOUR

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SCHEMA_VERSION = 1
LATENCY_METRICS = ("e2e_s", "ttft_s", "tpot_s", "max_gap_s")
PRICE_CLASSES = ("spot", "on-demand")
_PERCENTILES = (50, 90, 99)
_SECONDS_PER_HOUR = 3600.0
_MISSING = "—"


@dataclass
class RequestRecord:
    request_id: str
    sent_s: float
    input_tokens: int
    output_tokens: int
    token_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    restarts: int = 0


@dataclass
class InstanceSpan:
    instance_id: str
    price_class: Literal["spot", "on-demand"]
    start_s: float
    end_s: float | None = None


@dataclass
class RunRecord:
    policy: str
    arrivals: str
    fleet_trace: str | None
    time_scale: float
    duration_s: float
    requests: list[RequestRecord]
    instances: list[InstanceSpan]
    preemptions: int = 0
    migrations: int = 0
    reconfigurations: int = 0
    fleet_events: list[tuple[float, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Prices:
    spot_per_hour: float = SPOT_PRICE_PER_HOUR
    on_demand_per_hour: float = ON_DEMAND_PRICE_PER_HOUR

    def per_hour(self, price_class: str) -> float:
        if price_class == "spot":
            return self.spot_per_hour
        if price_class == "on-demand":
            return self.on_demand_per_hour
        raise ValueError(f"unknown price class {price_class!r} (expected one of {PRICE_CLASSES})")


# --- per request ---------------------------------------------------------------------------


def request_status(request: RequestRecord) -> Literal["completed", "failed", "unfinished"]:
    # An error wins over a finish reason: a stream that "finished" with an error did not serve.
    if request.error is not None:
        return "failed"
    if request.finish_reason is not None:
        return "completed"
    return "unfinished"


def _ttft(request: RequestRecord) -> float | None:
    return request.token_s[0] - request.sent_s if request.token_s else None


def _tpot(request: RequestRecord) -> float | None:
    tokens = request.token_s
    if len(tokens) < 2:
        return None
    return (tokens[-1] - tokens[0]) / (len(tokens) - 1)


def _max_gap(request: RequestRecord) -> float:
    return max((b - a for a, b in pairwise(request.token_s)), default=0.0)


def _e2e(request: RequestRecord) -> float | None:
    if request_status(request) != "completed" or not request.token_s:
        return None
    return request.token_s[-1] - request.sent_s


def request_summary(request: RequestRecord) -> dict[str, Any]:
    """One entry of report.json's `requests` list."""
    return {
        "id": request.request_id,
        "status": request_status(request),
        "sent_s": float(request.sent_s),
        "input_tokens": request.input_tokens,
        "output_tokens": request.output_tokens,
        "tokens": len(request.token_s),
        "ttft_s": _ttft(request),
        "tpot_s": _tpot(request),
        "max_gap_s": _max_gap(request),
        "e2e_s": _e2e(request),
        "finish_reason": request.finish_reason,
        "error": request.error,
        "restarts": request.restarts,
    }


# --- per run -------------------------------------------------------------------------------


def latency_stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99 (numpy, linear), mean and max of `values`; all null when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None, "n": 0}
    array = np.asarray(values, dtype=float)
    p50, p90, p99 = (float(v) for v in np.percentile(array, _PERCENTILES, method="linear"))
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "mean": float(array.mean()),
        "max": float(array.max()),
        "n": len(values),
    }


def _per_second(count: float, duration_s: float) -> float | None:
    return count / duration_s if duration_s > 0 else None


def _instance_summary(span: InstanceSpan, run: RunRecord, prices: Prices) -> dict[str, Any]:
    # An open span is billed to the run's end; clamped at 0 so a span opened after the recorded
    # end (a late "add") cannot produce negative cost.
    end_s = run.duration_s if span.end_s is None else span.end_s
    hours = max(0.0, end_s - span.start_s) / run.time_scale / _SECONDS_PER_HOUR
    return {
        "instance_id": span.instance_id,
        "price_class": span.price_class,
        "start_s": float(span.start_s),
        "end_s": None if span.end_s is None else float(span.end_s),
        "hours": hours,
        "usd": hours * prices.per_hour(span.price_class),
    }


def _cost(instances: list[dict[str, Any]], prices: Prices, completed: int) -> dict[str, Any]:
    hours = {cls: 0.0 for cls in PRICE_CLASSES}
    for instance in instances:
        hours[instance["price_class"]] += instance["hours"]
    usd = {cls: hours[cls] * prices.per_hour(cls) for cls in PRICE_CLASSES}
    total = sum(usd.values())
    return {
        "clock": "trace",
        "prices": {
            "spot_per_hour": prices.spot_per_hour,
            "on_demand_per_hour": prices.on_demand_per_hour,
        },
        "instance_hours": hours,
        "usd": usd,
        "total_usd": total,
        "usd_per_1000_completed": total / completed * 1000 if completed else None,
    }


def _counts(run: RunRecord, statuses: list[str]) -> dict[str, int]:
    return {
        "requests": len(run.requests),
        "completed": statuses.count("completed"),
        "failed": statuses.count("failed"),
        "unfinished": statuses.count("unfinished"),
        "restarts": sum(r.restarts for r in run.requests),
        "generated_tokens": sum(len(r.token_s) for r in run.requests),
    }


def _goodput(
    completed: list[dict[str, Any]], slo_s: float | None, duration_s: float
) -> dict[str, Any]:
    if slo_s is None:
        within = len(completed)
    else:
        within = sum(1 for r in completed if r["e2e_s"] is not None and r["e2e_s"] <= slo_s)
    return {
        "slo_s": None if slo_s is None else float(slo_s),
        "within_slo": within,
        "requests_per_s": _per_second(within, duration_s),
    }


def _validate_run(run: RunRecord, slo_s: float | None) -> None:
    if not run.time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {run.time_scale}")
    if not run.duration_s >= 0:
        raise ValueError(f"duration_s must be >= 0, got {run.duration_s}")
    if slo_s is not None and not slo_s > 0:
        raise ValueError(f"slo_s must be > 0, got {slo_s}")


def summarize(
    run: RunRecord,
    prices: Prices = Prices(),
    slo_s: float | None = None,
    clock: Literal["wall", "simulated"] = "wall",
) -> dict[str, Any]:
    """The report.json content (JSON-serializable; schema in the module docstring)."""
    _validate_run(run, slo_s)
    requests = [request_summary(r) for r in run.requests]
    completed = [r for r in requests if r["status"] == "completed"]
    counts = _counts(run, [r["status"] for r in requests])
    instances = [_instance_summary(span, run, prices) for span in run.instances]
    return {
        "schema_version": SCHEMA_VERSION,
        "clock": clock,
        "policy": run.policy,
        "arrivals": run.arrivals,
        "fleet_trace": run.fleet_trace,
        "time_scale": float(run.time_scale),
        "duration_s": float(run.duration_s),
        "counts": counts,
        "latency": {
            metric: latency_stats([r[metric] for r in completed if r[metric] is not None])
            for metric in LATENCY_METRICS
        },
        "throughput": {
            "requests_per_s": _per_second(counts["completed"], run.duration_s),
            "tokens_per_s": _per_second(counts["generated_tokens"], run.duration_s),
        },
        "goodput": _goodput(completed, slo_s, run.duration_s),
        "preemptions": run.preemptions,
        "migrations": run.migrations,
        "reconfigurations": run.reconfigurations,
        "cost": _cost(instances, prices, counts["completed"]),
        "requests": requests,
        "instances": instances,
        "fleet_events": [
            {"t_s": float(t), "kind": kind, "instance_id": instance_id}
            for t, kind, instance_id in run.fleet_events
        ],
    }


# --- report files --------------------------------------------------------------------------


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write `report` as report.json; NaN/inf are refused so every reader can parse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def load_report(path: Path) -> dict[str, Any]:
    """Read a report.json; a missing file, bad JSON or a wrong/missing schema_version is a
    ValueError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read report: {exc}") from exc
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(report, dict):
        raise ValueError(f"{path}: a report is a JSON object, got {type(report).__name__}")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
        )
    return report


# --- comparison table ----------------------------------------------------------------------


def _column_labels(reports: list[dict[str, Any]], sources: list[str] | None) -> list[str]:
    """policy, or policy@source (the file) where several reports share a policy."""
    policies = [str(r["policy"]) for r in reports]
    labels = []
    for index, policy in enumerate(policies):
        if policies.count(policy) == 1:
            labels.append(policy)
        else:
            suffix = sources[index] if sources is not None else str(index + 1)
            labels.append(f"{policy}@{suffix}")
    # The same file given twice still needs distinct columns.
    return [
        f"{label}#{index + 1}" if labels.count(label) > 1 else label
        for index, label in enumerate(labels)
    ]


def _baseline_index(reports: list[dict[str, Any]], labels: list[str], baseline: str | None) -> int:
    if baseline is None:
        return 0
    for candidates in (labels, [str(r["policy"]) for r in reports]):
        if baseline in candidates:
            return candidates.index(baseline)
    raise ValueError(f"baseline {baseline!r} matches no report (have: {', '.join(labels)})")


def _fmt(value: float | None, spec: str) -> str:
    return _MISSING if value is None else format(value, spec)


def _money(value: float | None) -> str:
    # Short test runs cost cents: keep 4 significant digits below a dollar.
    if value is None:
        return _MISSING
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.4g}"


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _percent_change(value: float | None, base: float | None) -> str:
    ratio = _ratio(value, base)
    return _MISSING if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def _metric_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    latency, counts, cost = report["latency"], report["counts"], report["cost"]
    e2e = latency["e2e_s"]
    slo = report["goodput"]["slo_s"]
    return [
        ("P50 e2e (s)", _fmt(e2e["p50"], ".3f")),
        ("P90 e2e (s)", _fmt(e2e["p90"], ".3f")),
        ("P99 e2e (s)", _fmt(e2e["p99"], ".3f")),
        ("mean e2e (s)", _fmt(e2e["mean"], ".3f")),
        ("P99 TTFT (s)", _fmt(latency["ttft_s"]["p99"], ".3f")),
        ("P99 max gap (s)", _fmt(latency["max_gap_s"]["p99"], ".3f")),
        ("completed / failed", f"{counts['completed']} / {counts['failed']}"),
        ("unfinished", str(counts["unfinished"])),
        ("throughput (req/s)", _fmt(report["throughput"]["requests_per_s"], ".3f")),
        ("throughput (tok/s)", _fmt(report["throughput"]["tokens_per_s"], ".1f")),
        ("goodput (req/s)", _fmt(report["goodput"]["requests_per_s"], ".3f")),
        ("goodput SLO (s)", _fmt(slo, "g") if slo is not None else "none"),
        ("preemptions", str(report["preemptions"])),
        ("migrations", str(report["migrations"])),
        ("reconfigurations", str(report.get("reconfigurations", 0))),
        ("cost", _money(cost["total_usd"])),
        ("cost per 1000 completed", _money(cost["usd_per_1000_completed"])),
    ]


def _baseline_rows(reports: list[dict[str, Any]], base: int) -> list[tuple[str, list[str]]]:
    base_p99 = reports[base]["latency"]["e2e_s"]["p99"]
    base_cost = reports[base]["cost"]["total_usd"]

    def times(value: float | None, of: float | None) -> str:
        ratio = _ratio(value, of)
        return _MISSING if ratio is None else f"{ratio:.2f}x"

    cost_vs = [
        "baseline" if i == base else _percent_change(r["cost"]["total_usd"], base_cost)
        for i, r in enumerate(reports)
    ]
    return [
        ("cost vs baseline", cost_vs),
        ("P99 e2e / baseline", [times(r["latency"]["e2e_s"]["p99"], base_p99) for r in reports]),
        ("cost / baseline", [times(r["cost"]["total_usd"], base_cost) for r in reports]),
    ]


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def markdown_table(
    reports: list[dict[str, Any]],
    baseline: str | None = None,
    sources: list[str] | None = None,
) -> str:
    """Side by side, one column per report (header = policy, or policy@file when two share a
    policy; `sources` names the files, else the column number stands in): latency, counts,
    throughput, goodput, fleet and cost rows, then ratio rows (P99 e2e and cost divided by the
    baseline's). The baseline is the report whose column label or policy is `baseline`, default
    the first report. Plain GitHub Markdown."""
    if not reports:
        raise ValueError("no reports to compare")
    if sources is not None and len(sources) != len(reports):
        raise ValueError(f"{len(sources)} sources for {len(reports)} reports")
    labels = _column_labels(reports, sources)
    base = _baseline_index(reports, labels, baseline)
    per_report = [_metric_rows(r) for r in reports]
    rows = [
        (name, [cells[i][1] for cells in per_report]) for i, (name, _) in enumerate(per_report[0])
    ]
    rows += _baseline_rows(reports, base)
    lines = [
        "| metric | " + " | ".join(_escape(label) for label in labels) + " |",
        "|---|" + "---:|" * len(labels),
        *(
            "| " + name + " | " + " | ".join(_escape(c) for c in cells) + " |"
            for name, cells in rows
        ),
        "",
        f"Baseline: `{labels[base]}`"
        + (" (the first report)" if baseline is None else "")
        + ". Ratios are report / baseline (below 1 is better). Latencies in"
        f" {_clock_name(reports)} seconds, cost in trace time.",
    ]
    return "\n".join(lines) + "\n"


def _clock_name(reports: list[dict[str, Any]]) -> str:
    """ "wall", "simulated", or both when a comparison mixes replayed and simulated runs."""
    clocks = sorted({str(r.get("clock", "wall")) for r in reports})
    return " / ".join(clocks)


def _source_labels(paths: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the files apart (runs/a/report.json: a/report.json)."""
    parts = [Path(p).parts for p in paths]
    depth = 1
    while depth < max(len(p) for p in parts):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [str(p) for p in paths]


def compare_main(paths: list[Path], baseline: str | None = None) -> str:
    """What `spotserve-loadgen compare A.json B.json ...` prints: markdown_table of the loaded
    reports."""
    if not paths:
        raise ValueError("compare needs at least one report.json")
    reports = [load_report(Path(p)) for p in paths]
    return markdown_table(reports, baseline=baseline, sources=_source_labels(list(paths)))


# --- plots ---------------------------------------------------------------------------------


def _live_steps(
    instances: list[dict[str, Any]], duration_s: float
) -> tuple[list[float], list[int]]:
    """Step function of live instances: (times, count from each time on), from 0 to the end."""
    deltas: list[tuple[float, int]] = []
    for instance in instances:
        deltas.append((instance["start_s"], 1))
        # Open spans stay up through the run's end: no drop to 0 at the right edge.
        if instance["end_s"] is not None:
            deltas.append((instance["end_s"], -1))
    # Ends sort before starts at the same instant so a replacement does not show a spike.
    deltas.sort()
    times, counts, live = [0.0], [0], 0
    for t, delta in deltas:
        live += delta
        times.append(t)
        counts.append(live)
    times.append(max([duration_s, *times]))
    counts.append(live)
    return times, counts


def _count_at(times: list[float], counts: list[int], t: float) -> int:
    index = int(np.searchsorted(np.asarray(times), t, side="right")) - 1
    return counts[max(index, 0)]


def _plot_cdf(ax: Axes, reports: list[dict[str, Any]], labels: list[str]) -> None:
    for report, label in zip(reports, labels, strict=True):
        e2e = sorted(r["e2e_s"] for r in report["requests"] if r["e2e_s"] is not None)
        if not e2e:
            label += " (no completed requests)"
        fractions = np.arange(1, len(e2e) + 1) / max(len(e2e), 1)
        ax.step(e2e, fractions, where="post", label=label)
    ax.set_xlabel(f"end-to-end latency ({_clock_name(reports)} s)")
    ax.set_ylabel("fraction of completed requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_instances(ax: Axes, report: dict[str, Any], label: str) -> None:
    instances, duration = report["instances"], report["duration_s"]
    times, counts = _live_steps(instances, duration)
    ax.step(times, counts, where="post", label="all", color="black")
    for price_class, color in (("spot", "tab:blue"), ("on-demand", "tab:orange")):
        subset = [i for i in instances if i["price_class"] == price_class]
        if subset:
            ax.step(*_live_steps(subset, duration), where="post", label=price_class, color=color)
    markers = {"notice": ("v", "tab:red"), "kill": ("x", "tab:red"), "add": ("^", "tab:green")}
    for kind, (marker, color) in markers.items():
        events = [e["t_s"] for e in report["fleet_events"] if e["kind"] == kind]
        if events:
            heights = [_count_at(times, counts, t) for t in events]
            ax.scatter(events, heights, marker=marker, color=color, zorder=3, label=kind)
    ax.set_title(f"{label} (preemptions: {report['preemptions']})")
    ax.set_ylabel("live instances")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _plot_latency_over_time(ax: Axes, report: dict[str, Any], label: str) -> None:
    done = [r for r in report["requests"] if r["e2e_s"] is not None]
    points = ax.scatter([r["sent_s"] for r in done], [r["e2e_s"] for r in done], s=6, label=label)
    # Failed/unfinished requests have no latency: tick them along the bottom edge.
    lost = [r["sent_s"] for r in report["requests"] if r["status"] != "completed"]
    if lost:
        ax.scatter(
            lost,
            [0.0] * len(lost),
            marker="|",
            s=80,
            color=points.get_facecolor()[0] if done else None,
            transform=ax.get_xaxis_transform(),
            label=f"{label}: not completed",
        )


def write_plots(reports: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """PNG files (matplotlib Agg, no display): e2e latency CDF per report, live instances over
    time with fleet-event markers (one panel per report), and e2e latency by send time; returns
    the paths."""
    # Figure objects without pyplot: no global state, no display, safe from any thread.
    from matplotlib.figure import Figure

    if not reports:
        raise ValueError("no reports to plot")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _column_labels(reports, None)
    paths = []

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    _plot_cdf(fig.add_subplot(), reports, labels)
    paths.append(_save(fig, out_dir / "latency_cdf.png"))

    fig = Figure(figsize=(8, 2.6 * len(reports) + 0.6), layout="constrained")
    axes = fig.subplots(len(reports), 1, sharex=True, squeeze=False)[:, 0]
    for ax, report, label in zip(axes, reports, labels, strict=True):
        _plot_instances(ax, report, label)
    axes[-1].set_xlabel(f"time since start ({_clock_name(reports)} s)")
    paths.append(_save(fig, out_dir / "instances.png"))

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for report, label in zip(reports, labels, strict=True):
        _plot_latency_over_time(ax, report, label)
    ax.set_xlabel(f"request sent ({_clock_name(reports)} s since start)")
    ax.set_ylabel(f"end-to-end latency ({_clock_name(reports)} s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    paths.append(_save(fig, out_dir / "latency_over_time.png"))
    return paths


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path
