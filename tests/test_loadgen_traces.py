"""loadgen.traces: synthetic arrival processes, request logs, fleet availability traces.

Most tests write small traces to tmp_path; the ones on the real public traces read them from
/work/shared/traces (the kit next to the repository) and skip where it is absent.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loadgen.traces import (
    MAX_BACKSTEP_MS,
    Arrival,
    FleetTrace,
    TraceError,
    TraceEvent,
    arrivals_from_spec,
    read_fleet_trace,
    scale_lengths,
    timeline,
)

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
SPOTSERVE = TRACES / "spotserve"
AZURE = TRACES / "azure"

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
BURST_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def kit(path: Path) -> Path:
    """A file of the shared trace kit, or skip: a clone elsewhere has no kit."""
    if not path.exists():
        pytest.skip(f"trace kit not present: {path}")
    return path


def raises_at(path: Path, line: int | None, match: str) -> pytest.RaisesExc[TraceError]:
    """Expect a TraceError whose message names the file (and line) before saying `match`."""
    where = f"{path} line {line}" if line is not None else str(path)
    return pytest.raises(TraceError, match=re.escape(f"{where}: ") + match)


def gaps(arrivals: list[Arrival]) -> np.ndarray:
    return np.diff([0.0] + [a.at_s for a in arrivals])


def times(arrivals: list[Arrival]) -> list[float]:
    return [a.at_s for a in arrivals]


# -- synthetic processes ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_mean_rate_and_exponential_gaps(seed: int) -> None:
    arrivals = arrivals_from_spec("poisson:4", max_requests=20_000, seed=seed)
    assert len(arrivals) == 20_000
    g = gaps(arrivals)
    assert (g >= 0).all()
    assert 1 / g.mean() == pytest.approx(4.0, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    assert {(a.input_tokens, a.output_tokens) for a in arrivals} == {(512, 128)}


@pytest.mark.parametrize(("rate", "cv"), [(1.5, 2.0), (0.35, 0.5), (3.0, 1.0)])
def test_gamma_mean_rate_and_cv(rate: float, cv: float) -> None:
    arrivals = arrivals_from_spec(f"gamma:{rate}:{cv}", max_requests=50_000, seed=7)
    g = gaps(arrivals)
    assert 1 / g.mean() == pytest.approx(rate, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.05)


def test_duration_bounds_synthetic_arrivals() -> None:
    arrivals = arrivals_from_spec("poisson:10", duration_s=2_000, input_tokens=7, output_tokens=3)
    assert all(0 < t < 2_000 for t in times(arrivals))
    assert times(arrivals) == sorted(times(arrivals))
    assert len(arrivals) == pytest.approx(20_000, rel=0.03)
    assert {(a.input_tokens, a.output_tokens) for a in arrivals} == {(7, 3)}


def test_both_bounds_stop_at_whichever_comes_first() -> None:
    few = arrivals_from_spec("poisson:10", duration_s=1_000, max_requests=50)
    assert len(few) == 50
    short = arrivals_from_spec("poisson:10", duration_s=5, max_requests=10_000)
    assert len(short) < 200 and all(t < 5 for t in times(short))
    assert arrivals_from_spec("poisson:10", max_requests=0) == []
    assert arrivals_from_spec("poisson:10", duration_s=0) == []


@pytest.mark.parametrize("spec", ["poisson:2", "gamma:2:3"])
def test_synthetic_is_deterministic_per_seed(spec: str) -> None:
    one = arrivals_from_spec(spec, duration_s=600, seed=3)
    assert one == arrivals_from_spec(spec, duration_s=600, seed=3)
    assert one != arrivals_from_spec(spec, duration_s=600, seed=4)
    # A longer run with the same seed extends the shorter one rather than redrawing it.
    longer = arrivals_from_spec(spec, duration_s=6_000, seed=3)
    assert longer[: len(one)] == one


@pytest.mark.parametrize("spec", ["poisson:2", "gamma:2:0.5"])
def test_synthetic_needs_a_bound(spec: str) -> None:
    with pytest.raises(TraceError, match="duration_s"):
        arrivals_from_spec(spec)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("poisson:abc", "RATE 'abc' is not a number"),
        ("poisson:-1", "RATE must be a finite number > 0"),
        ("poisson:0", "RATE must be a finite number > 0"),
        ("poisson:inf", "RATE must be a finite number > 0"),
        ("poisson", "expected poisson:RATE"),
        ("poisson:1:2", "expected poisson:RATE"),
        ("gamma:1", "expected gamma:RATE:CV"),
        ("gamma:1:0", "CV must be a finite number > 0"),
        ("gamma:1:x", "CV 'x' is not a number"),
        ("no/such/trace.csv", "neither a synthetic spec"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(TraceError, match=re.escape(match)):
        arrivals_from_spec(spec, duration_s=10)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        arrivals_from_spec("poisson:1", duration_s=-1)
    with pytest.raises(ValueError, match="max_requests"):
        arrivals_from_spec("poisson:1", max_requests=-1)
    with pytest.raises(ValueError, match="input_tokens"):
        arrivals_from_spec("poisson:1", duration_s=10, input_tokens=0)


# -- per-minute rate lists ---------------------------------------------------------------------


RATES = [0.5, 2.0, 0.0, 1.0]


def per_minute_counts(arrivals: list[Arrival], minutes: int) -> np.ndarray:
    return np.bincount([int(t // 60) for t in times(arrivals)], minlength=minutes)


def test_rate_list_is_piecewise_poisson(tmp_path: Path) -> None:
    path = write(tmp_path, "rates.txt", "\n".join(str(r) for r in RATES) + "\n")
    runs = [arrivals_from_spec(str(path), seed=seed) for seed in range(300)]
    for arrivals in runs:
        assert all(0 <= t < 240 for t in times(arrivals))
        assert times(arrivals) == sorted(times(arrivals))
    counts = np.mean([per_minute_counts(a, len(RATES)) for a in runs], axis=0)
    for minute, rate in enumerate(RATES):
        assert counts[minute] == pytest.approx(rate * 60, rel=0.05), minute
    assert counts[2] == 0  # a quiet minute stays quiet


def test_rate_list_one_line_and_duration(tmp_path: Path) -> None:
    path = write(tmp_path, "rates.csv", "0.5, 2.0 0.0,1.0\n")
    arrivals = arrivals_from_spec(str(path), seed=1)
    assert arrivals == arrivals_from_spec(str(path), seed=1)
    assert arrivals != arrivals_from_spec(str(path), seed=2)
    cut = arrivals_from_spec(str(path), seed=1, duration_s=90)
    assert cut and all(t < 90 for t in times(cut))
    # A duration longer than the list keeps the list's own length (4 minutes).
    assert arrivals_from_spec(str(path), seed=1, duration_s=10_000) == arrivals
    assert len(arrivals_from_spec(str(path), seed=1, max_requests=5)) == 5
    sized = arrivals_from_spec(str(path), input_tokens=9, output_tokens=4)
    assert {(a.input_tokens, a.output_tokens) for a in sized} == {(9, 4)}


def test_long_rate_list_counts(tmp_path: Path) -> None:
    # 200 minutes alternating 1 and 3 req/s: per-rate averages over many minutes.
    rates = [1.0, 3.0] * 100
    path = write(tmp_path, "long.txt", ",".join(map(str, rates)))
    counts = per_minute_counts(arrivals_from_spec(str(path), seed=5), len(rates))
    assert counts[0::2].mean() == pytest.approx(60, rel=0.05)
    assert counts[1::2].mean() == pytest.approx(180, rel=0.05)


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ("0.5\n1.0\n1.x\n", 3, "rate '1.x' is not a number"),
        ("0.5,1.0\n-1\n", 2, "rate '-1' must be a finite number >= 0"),
    ],
)
def test_rate_list_errors_name_the_line(tmp_path: Path, text: str, line: int, match: str) -> None:
    path = write(tmp_path, "rates.txt", text)
    with raises_at(path, line, re.escape(match)):
        arrivals_from_spec(str(path))


def test_real_rate_list() -> None:
    path = kit(SPOTSERVE / "arrival_rates_per_minute.csv")
    arrivals = arrivals_from_spec(str(path), seed=0)
    assert all(0 <= t < 19 * 60 for t in times(arrivals))
    # 19 minutes at 0.55-0.70 req/s: about 0.6 * 1140 = 690 requests.
    assert 550 < len(arrivals) < 850


# -- request logs ------------------------------------------------------------------------------


AZURE_ROWS = [
    "2023-11-16 18:15:46.6805900,374,44",
    "2023-11-16 18:15:50.9951690,396,109",
    "2023-11-16 18:15:46.6805901,10,5",  # out of order, 100 ns after the first
    "2023-11-16 18:16:46.6805900,0,7",  # an empty prompt still needs one token
    "2023-11-16 18:17:00.0000000,20,0",  # generated nothing: not replayable
]


def test_azure_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "azure.csv", "\n".join([AZURE_HEADER, *AZURE_ROWS]) + "\n")
    arrivals = arrivals_from_spec(str(path))
    assert [(a.input_tokens, a.output_tokens) for a in arrivals] == [
        (374, 44),
        (10, 5),
        (396, 109),
        (1, 7),
    ]
    assert arrivals[0].at_s == 0.0
    assert arrivals[1].at_s == pytest.approx(1e-7, abs=1e-12)  # the 7th fractional digit
    assert arrivals[2].at_s == pytest.approx(4.314579, abs=1e-9)
    assert arrivals[3].at_s == pytest.approx(60.0, abs=1e-9)
    assert len(arrivals_from_spec(str(path), max_requests=2)) == 2
    assert len(arrivals_from_spec(str(path), duration_s=5)) == 3


def test_azure_csv_stable_sort_and_crlf(tmp_path: Path) -> None:
    rows = [
        "2023-11-16 18:00:01.0000000,1,1",
        "2023-11-16 18:00:00.0000000,2,2",
        "2023-11-16 18:00:01.0000000,3,3",
    ]
    path = write(tmp_path, "azure.csv", "\r\n".join([AZURE_HEADER, *rows]) + "\r\n")
    arrivals = arrivals_from_spec(str(path))
    assert [a.input_tokens for a in arrivals] == [2, 1, 3]
    assert times(arrivals) == [0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("2023-11-16 18:15:46.6805900,374,abc", "GeneratedTokens 'abc' is not an integer"),
        ("2023-11-16 18:15:46.6805900,3.5,4", "ContextTokens '3.5' is not an integer"),
        ("2023-11-16 18:15:46.6805900,-3,4", "ContextTokens '-3' is negative"),
        ("2023-11-16 18:15:46.6805900,374", r"expected 3 columns \(TIMESTAMP,.*\), got 2"),
        ("2023-11-16 18:15:46.6805900,374,4,5", "expected 3 columns"),
        ("yesterday,374,4", "TIMESTAMP 'yesterday' is not like"),
        ("2023-13-16 18:15:46.6805900,374,4", "TIMESTAMP '2023-13-16 18:15:46.6805900': month"),
    ],
)
def test_azure_errors_name_file_and_line(tmp_path: Path, row: str, match: str) -> None:
    path = write(tmp_path, "azure.csv", "\n".join([AZURE_HEADER, AZURE_ROWS[0], row]) + "\n")
    with raises_at(path, 3, match):
        arrivals_from_spec(str(path))


BURST_ROWS = [
    "10,ChatGPT,472,18,490,Conversation log",
    "5,GPT-4,1000,200,1200,API log",
    '12,"ChatGPT, turbo",30,0,30,Conversation log',  # failed request: 0 response tokens
    "12.5,ChatGPT,30,40,70,Conversation log",
]


def test_burstgpt_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "burst.csv", "\n".join([BURST_HEADER, *BURST_ROWS]) + "\n")
    arrivals = arrivals_from_spec(str(path))
    assert arrivals == [
        Arrival(0.0, 1000, 200),
        Arrival(5.0, 472, 18),
        Arrival(7.5, 30, 40),
    ]
    assert arrivals_from_spec(str(path), duration_s=7.5) == arrivals[:2]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("x,ChatGPT,1,2,3,API log", "Timestamp 'x' is not a number"),
        ("1,ChatGPT,1,two,3,API log", "Response tokens 'two' is not an integer"),
        ("1,ChatGPT,1,2,3", r"expected 6 columns \(Timestamp,Model,.*\), got 5"),
    ],
)
def test_burstgpt_errors_name_file_and_line(tmp_path: Path, row: str, match: str) -> None:
    path = write(tmp_path, "burst.csv", "\n".join([BURST_HEADER, BURST_ROWS[0], "", row]) + "\n")
    with raises_at(path, 4, match):
        arrivals_from_spec(str(path))


def test_unknown_header_lists_the_accepted_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "mystery.csv", "time,prompt,completion\n1,2,3\n")
    with raises_at(path, 1, "unknown header 'time,prompt,completion'") as info:
        arrivals_from_spec(str(path))
    assert AZURE_HEADER in str(info.value) and BURST_HEADER in str(info.value)


def test_empty_request_files(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.csv", "\n  \n")
    with raises_at(empty, None, "file is empty"):
        arrivals_from_spec(str(empty))
    header_only = write(tmp_path, "header.csv", AZURE_HEADER + "\n")
    with raises_at(header_only, None, "no requests"):
        arrivals_from_spec(str(header_only))


@pytest.mark.parametrize(("name", "rows"), [("conv", 19_366), ("code", 8_819)])
def test_real_azure_traces(name: str, rows: int) -> None:
    path = kit(AZURE / f"AzureLLMInferenceTrace_{name}.csv")
    arrivals = arrivals_from_spec(str(path))
    assert len(arrivals) == rows
    assert arrivals[0].at_s == 0.0
    assert times(arrivals) == sorted(times(arrivals))
    assert 3_000 < arrivals[-1].at_s < 3_700  # about one hour
    assert min(min(a.input_tokens, a.output_tokens) for a in arrivals) >= 1
    if name == "conv":
        assert arrivals[0] == Arrival(0.0, 374, 44)
        assert arrivals[1].at_s == pytest.approx(4.314579, abs=1e-9)
        assert np.mean([a.input_tokens for a in arrivals]) == pytest.approx(1155, rel=0.02)
        assert np.mean([a.output_tokens for a in arrivals]) == pytest.approx(211, rel=0.02)
    assert len(arrivals_from_spec(str(path), duration_s=600)) < rows / 4


# -- scale_lengths -----------------------------------------------------------------------------


def test_scale_lengths_fits_the_context() -> None:
    arrivals = [
        Arrival(0.0, 100, 50),  # fits: unchanged
        Arrival(1.0, 1000, 200),
        Arrival(2.0, 1, 5000),
        Arrival(3.0, 5000, 1),
        Arrival(4.0, 255, 1),  # exactly the context
    ]
    scaled = scale_lengths(arrivals, context_tokens=256)
    assert scaled is not arrivals and arrivals[1] == Arrival(1.0, 1000, 200)
    assert scaled[0] == arrivals[0] and scaled[4] == arrivals[4]
    for before, after in zip(arrivals, scaled, strict=True):
        assert after.at_s == before.at_s
        assert after.input_tokens >= 1 and after.output_tokens >= 1
        assert after.input_tokens + after.output_tokens <= 256
    assert scaled[1] == Arrival(1.0, 214, 42)  # 1000:200 is 5:1
    assert scaled[2] == Arrival(2.0, 1, 255)
    assert scaled[3] == Arrival(3.0, 255, 1)


def test_scale_lengths_min_output() -> None:
    scaled = scale_lengths(
        [Arrival(0.0, 5000, 10), Arrival(0.0, 5000, 3)], context_tokens=256, min_output=8
    )
    assert scaled == [Arrival(0.0, 248, 8), Arrival(0.0, 253, 3)]  # never longer than asked


def test_scale_lengths_real_trace_and_bad_arguments() -> None:
    arrivals = arrivals_from_spec("poisson:1", max_requests=100, input_tokens=4000)
    assert all(
        a.input_tokens + a.output_tokens <= 64 for a in scale_lengths(arrivals, context_tokens=64)
    )
    with pytest.raises(ValueError, match="context_tokens"):
        scale_lengths(arrivals, context_tokens=1)
    with pytest.raises(ValueError, match="min_output"):
        scale_lengths(arrivals, context_tokens=64, min_output=64)


# -- fleet traces: inline ----------------------------------------------------------------------


FLEET_CSV = """\
480000,add,node1
540000,add,node2
600000,add,node3
600000,remove,node1
660000,add,node1
"""

FLEET_JSONL = """\
[1000, "add", {"nodes": ["node-0", "node-1", "node-2"]}]
[121000, "add", {"nodes": ["node-3"]}]
[301000, "other", {"nodes": [], "required_tpt": 0.8}]
[601000, "remove", {"nodes": ["node-1", "node-3"], "required_tpt": 0.6}]
[1141000, "DONE", {"nodes": []}]
"""


def test_fleet_csv(tmp_path: Path) -> None:
    trace = read_fleet_trace(write(tmp_path, "fleet.csv", FLEET_CSV))
    assert trace.events == [
        TraceEvent(0.0, "add", "node1"),
        TraceEvent(60.0, "add", "node2"),
        TraceEvent(120.0, "add", "node3"),
        TraceEvent(120.0, "remove", "node1"),
        TraceEvent(180.0, "add", "node1"),  # back after its removal
    ]
    assert trace.duration_s == 180.0
    assert trace.initial_nodes == ["node1"]
    assert trace.rate_changes == []
    assert timeline(trace) == [(0.0, 1), (60.0, 2), (120.0, 3), (120.0, 2), (180.0, 3)]


def test_fleet_jsonl(tmp_path: Path) -> None:
    trace = read_fleet_trace(str(write(tmp_path, "fleet.jsonl", FLEET_JSONL)))
    assert trace == FleetTrace(
        events=[
            TraceEvent(0.0, "add", "node-0"),
            TraceEvent(0.0, "add", "node-1"),
            TraceEvent(0.0, "add", "node-2"),
            TraceEvent(120.0, "add", "node-3"),
            TraceEvent(600.0, "remove", "node-1", required_rps=0.6),
            TraceEvent(600.0, "remove", "node-3", required_rps=0.6),
        ],
        duration_s=1140.0,  # the DONE event, not the last add/remove
        initial_nodes=["node-0", "node-1", "node-2"],
        rate_changes=[(300.0, 0.8), (600.0, 0.6)],
    )
    assert timeline(trace)[-1] == (600.0, 2)


def test_fleet_small_backsteps_are_sorted(tmp_path: Path) -> None:
    text = "0,add,a\n5000,add,b\n4500,remove,a\n6000,add,a\n"
    trace = read_fleet_trace(write(tmp_path, "jitter.csv", text))
    assert [(e.at_s, e.kind, e.node) for e in trace.events] == [
        (0.0, "add", "a"),
        (4.5, "remove", "a"),
        (5.0, "add", "b"),
        (6.0, "add", "a"),
    ]


def test_fleet_times_relative_to_the_earliest_event(tmp_path: Path) -> None:
    trace = read_fleet_trace(write(tmp_path, "late.csv", "10500,add,b\n10000,add,a\n"))
    assert trace.events == [TraceEvent(0.0, "add", "a"), TraceEvent(0.5, "add", "b")]
    assert trace.initial_nodes == ["a"]


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ("0,add,a\n10,remove,b\n", 2, "remove of 'b', which is not up"),
        ("0,add,a\n10,remove,a\n20,remove,a\n", 3, "remove of 'a', which is not up"),
        ("0,add,a\n10,add,a\n", 2, "add of 'a', which is already up"),
        ("0,add,a\n1x0,add,b\n", 2, "time '1x0' is not a number"),
        ("0,add,a\n10,add\n", 2, r"expected 3 columns \(t_ms,add\|remove,node\), got 2"),
        ("0,add,a\n10,preempt,a\n", 2, "unknown event kind 'preempt'"),
        ("0,add,a\n-10,add,b\n", 2, "negative time -10 ms"),
        ("0,add,a\n10,add,\n", 2, "empty node name"),
        (
            f"0,add,a\n{MAX_BACKSTEP_MS * 5:g},add,b\n0,add,c\n",
            3,
            "time 0 ms is 5000 ms before line 2.*out of order",
        ),
    ],
)
def test_fleet_csv_errors_name_file_and_line(
    tmp_path: Path, text: str, line: int, match: str
) -> None:
    path = write(tmp_path, "fleet.csv", text)
    with raises_at(path, line, match):
        read_fleet_trace(path)


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ('[60000, "add", {"nodes": ["n2"]', "bad JSON"),
        ('[60000, "crash", {"nodes": ["n2"]}]', "unknown event kind 'crash'"),
        ('[60000, "remove", {"nodes": ["n9"]}]', "remove of 'n9', which is not up"),
        ('[60000, "add", {"nodes": ["n1"]}]', "add of 'n1', which is already up"),
        ('[60000, "add"]', r"expected \[t_ms, kind, \{...\}\]"),
        ('["soon", "add", {"nodes": ["n2"]}]', "time 'soon' is not a number"),
        ('[60000, "add", {"nodes": "n2"}]', "nodes 'n2' is not a list of node names"),
        ('[60000, "add", {"nodes": []}]', "add event without nodes"),
        ('[60000, "other", {"nodes": []}]', "other event without required_tpt"),
        ('[60000, "other", {"required_tpt": -1}]', "required_tpt -1 must be a finite number >= 0"),
        ('[-5, "add", {"nodes": ["n2"]}]', "negative time"),
    ],
)
def test_fleet_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, match: str) -> None:
    text = '[0, "add", {"nodes": ["n1"]}]\n\n' + bad_line + '\n[90000, "DONE", {"nodes": []}]\n'
    path = write(tmp_path, "fleet.jsonl", text)
    with raises_at(path, 3, match):
        read_fleet_trace(path)


def test_fleet_event_after_done(tmp_path: Path) -> None:
    text = '[0, "add", {"nodes": ["n1"]}]\n[10, "DONE", {}]\n[20, "add", {"nodes": ["n2"]}]\n'
    path = write(tmp_path, "fleet.jsonl", text)
    with raises_at(path, 3, "add event after DONE"):
        read_fleet_trace(path)


def test_fleet_empty_files(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.csv", "")
    with raises_at(empty, None, "file is empty"):
        read_fleet_trace(empty)
    blank = write(tmp_path, "blank.jsonl", "\n \n")
    with raises_at(blank, None, "file is empty"):
        read_fleet_trace(blank)
    only_done = write(tmp_path, "done.jsonl", '[0, "DONE", {"nodes": []}]\n')
    with raises_at(only_done, None, "no add/remove events"):
        read_fleet_trace(only_done)
    with pytest.raises(TraceError, match="cannot read"):
        read_fleet_trace(tmp_path / "missing.csv")


# -- fleet traces: the real SpotServe files ----------------------------------------------------


def replay_nodes(trace: FleetTrace) -> set[str]:
    """Apply the events independently of the loader: adds of down nodes, removes of up ones."""
    up: set[str] = set()
    for event in trace.events:
        if event.kind == "add":
            assert event.node not in up
            up.add(event.node)
        else:
            assert event.node in up
            up.remove(event.node)
    return up


def test_every_real_fleet_trace_loads() -> None:
    paths = [*sorted(kit(SPOTSERVE).glob("*.jsonl")), SPOTSERVE / "g4dn_full.csv"]
    assert len(paths) == 7
    for path in paths:
        trace = read_fleet_trace(path)
        assert trace.events and trace.initial_nodes, path
        assert [e.at_s for e in trace.events] == sorted(e.at_s for e in trace.events)
        assert trace.events[-1].at_s <= trace.duration_s
        assert min(n for _, n in timeline(trace)) >= 1
        replay_nodes(trace)


def test_real_trace_0304() -> None:
    trace = read_fleet_trace(kit(SPOTSERVE / "trace_0304_real.jsonl"))
    assert trace.duration_s == 22 * 60
    assert trace.initial_nodes == [f"node-{i}" for i in range(7)]
    assert Counter(e.kind for e in trace.events) == {"add": 11, "remove": 3}
    assert replay_nodes(trace) == {f"node-{i}" for i in (0, 1, 2, 4, 5, 6, 7, 9)}
    assert max(n for _, n in timeline(trace)) == 10
    assert trace.rate_changes == []


def test_real_workload_traces_carry_rates() -> None:
    for name in ("trace_0304_workload.jsonl", "trace_0506_workload.jsonl"):
        trace = read_fleet_trace(kit(SPOTSERVE / name))
        assert trace.rate_changes == [(300.0, 0.8), (600.0, 0.6)]
        removes = [e for e in trace.events if e.kind == "remove" and e.at_s == 600.0]
        assert removes and all(e.required_rps == 0.6 for e in removes)
        assert trace.duration_s == 19 * 60


def test_real_g4dn_full() -> None:
    trace = read_fleet_trace(kit(SPOTSERVE / "g4dn_full.csv"))
    assert Counter(e.kind for e in trace.events) == {"add": 79, "remove": 74}
    assert trace.initial_nodes == ["node1"]  # the first row, at 480 s on the trace's clock
    assert trace.duration_s == (38_760_000 - 480_000) / 1000  # about 10.6 h
    counts = [n for _, n in timeline(trace)]
    assert max(counts) == 24 and counts[-1] == 5
    assert len(replay_nodes(trace)) == 5


def test_fleet_initial_nodes_are_the_first_adds(tmp_path: Path) -> None:
    # A rate change before any node: the first add/remove instant still gives the initial nodes.
    text = '[0, "other", {"required_tpt": 1.0}]\n[60000, "add", {"nodes": ["a", "b"]}]\n'
    trace = read_fleet_trace(write(tmp_path, "late_adds.jsonl", text))
    assert trace.initial_nodes == ["a", "b"]
    assert trace.events[0].at_s == 60.0 and trace.rate_changes == [(0.0, 1.0)]
    assert trace.duration_s == 60.0
