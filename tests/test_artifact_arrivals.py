"""loadgen.traces: the SpotServe artifact's query files (`index,arrival_s,input_tokens,gap_ms`).

Small files are written to tmp_path; the real ones are read from the trace kit next to the
repository (/work/shared/traces) and skipped where it is absent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loadgen.traces import Arrival, TraceError, arrivals_from_spec

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
QUERIES_20B = TRACES / "spotserve" / "queries" / "query_tpt0.35_cv6.txt"
RATES = TRACES / "spotserve" / "arrival_rates_per_minute.csv"

SMALL = "0,2.5,512,0\n1,3.25,256,750\n2,3.25,1,0\n3,10.0,100,6750\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the real kit file ---------------------------------------------------------------------------


@pytest.mark.skipif(not QUERIES_20B.exists(), reason=f"trace kit not present: {QUERIES_20B}")
def test_kit_query_file() -> None:
    arrivals = arrivals_from_spec(str(QUERIES_20B), output_tokens=128)
    assert len(arrivals) == 1024
    assert arrivals[0].at_s == 2.937844460333155  # as written, not moved to 0 s
    assert arrivals[1].at_s == 5.917635005418527
    assert {a.input_tokens for a in arrivals} == {512}
    assert {a.output_tokens for a in arrivals} == {128}
    at = [a.at_s for a in arrivals]
    assert at == sorted(at)


@pytest.mark.skipif(not QUERIES_20B.exists(), reason=f"trace kit not present: {QUERIES_20B}")
def test_kit_query_file_output_argument_and_truncation() -> None:
    arrivals = arrivals_from_spec(str(QUERIES_20B), output_tokens=7, input_tokens=3)
    assert {(a.input_tokens, a.output_tokens) for a in arrivals} == {(512, 7)}
    first_minute = arrivals_from_spec(str(QUERIES_20B), duration_s=60.0)
    assert first_minute == [a for a in arrivals_from_spec(str(QUERIES_20B)) if a.at_s < 60.0]
    assert 0 < len(first_minute) < 1024
    assert len(arrivals_from_spec(str(QUERIES_20B), max_requests=10)) == 10


# -- small hand-written files ----------------------------------------------------------------


def test_small_query_file(tmp_path: Path) -> None:
    path = write(tmp_path, "q.txt", SMALL)
    assert arrivals_from_spec(str(path), output_tokens=64, input_tokens=9) == [
        Arrival(2.5, 512, 64),
        Arrival(3.25, 256, 64),
        Arrival(3.25, 1, 64),  # the same instant as the previous row is in order
        Arrival(10.0, 100, 64),
    ]


def test_blank_lines_crlf_bom_and_padding(tmp_path: Path) -> None:
    path = tmp_path / "q.txt"
    path.write_bytes(b"\xef\xbb\xbf\r\n 0, 2.5 ,512,0\r\n\r\n1,3.0, 8 ,500.5\r\n\r\n")
    assert arrivals_from_spec(str(path)) == [Arrival(2.5, 512, 128), Arrival(3.0, 8, 128)]


def test_truncation(tmp_path: Path) -> None:
    path = str(write(tmp_path, "q.txt", SMALL))
    assert [a.at_s for a in arrivals_from_spec(path, duration_s=3.25)] == [2.5]
    assert [a.at_s for a in arrivals_from_spec(path, duration_s=3.26)] == [2.5, 3.25, 3.25]
    assert [a.at_s for a in arrivals_from_spec(path, max_requests=2)] == [2.5, 3.25]
    assert arrivals_from_spec(path, duration_s=2.0) == []
    assert arrivals_from_spec(path, max_requests=0) == []


# -- bad rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "0,1.0,512,0\n1,2.0,512\n",
            2,
            "expected 4 columns (index,arrival_s,input_tokens,gap_ms), got 3",
        ),
        ("0,1.0,512,0\n1,2.0,512,0\n2,3.0,512,0,9\n", 3, "expected 4 columns"),
        ("0,1.0,512,0\n1.0,2.0,512,0\n", 2, "index '1.0' is not an integer >= 0"),
        ("0,1.0,512,0\nx,2.0,512,0\n", 2, "index 'x' is not an integer >= 0"),
        ("0,1.0,512,0\n2,2.0,512,0\n", 2, "index 2 is out of sequence, expected 1"),
        ("0,1.0,512,0\n1,2.0,512,0\n1,3.0,512,0\n", 3, "index 1 is out of sequence, expected 2"),
        ("0,1.0,512,0\n1,soon,512,0\n", 2, "arrival time 'soon' is not a number"),
        ("0,1.0,512,0\n1,-2.0,512,0\n", 2, "arrival time '-2.0' must be a finite number >= 0"),
        ("0,1.0,512,0\n1,inf,512,0\n", 2, "arrival time 'inf' must be a finite number >= 0"),
        ("0,1.0,512,0\n1,nan,512,0\n", 2, "arrival time 'nan' must be a finite number >= 0"),
        (
            "0,1.0,512,0\n1,5.0,512,0\n2,4.5,512,0\n",
            3,
            "arrival time 4.5 s is before line 2's 5.0 s (expected arrival times in non-decreasing",
        ),
        ("0,1.0,512,0\n1,2.0,0,0\n", 2, "input tokens '0' is not an integer >= 1"),
        ("0,1.0,512,0\n1,2.0,-3,0\n", 2, "input tokens '-3' is not an integer >= 1"),
        ("0,1.0,512,0\n1,2.0,51.2,0\n", 2, "input tokens '51.2' is not an integer >= 1"),
        ("0,1.0,512,0\n1,2.0,many,0\n", 2, "input tokens 'many' is not an integer >= 1"),
        ("0,1.0,512,0\n1,2.0,512,later\n", 2, "gap 'later' is not a finite number (milliseconds"),
        ("0,1.0,512,0\n1,2.0,512,nan\n", 2, "gap 'nan' is not a finite number"),
        ("0,1.0,512,0\n1,2.0,512,\n", 2, "gap '' is not a finite number"),
        # line numbers count blank lines: the file's own 1-based line
        ("\n0,1.0,512,0\n\n1,2.0,512,0\n\n3,3.0,512,0\n", 6, "index 3 is out of sequence"),
    ],
)
def test_bad_rows(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, "bad_queries.txt", text)
    with pytest.raises(TraceError, match=re.escape(f"{path} line {line}: {message}")) as info:
        arrivals_from_spec(str(path))
    assert "bad_queries.txt" in str(info.value)
    assert f"line {line}" in str(info.value)


# -- rate lists stay rate lists ----------------------------------------------------------------


@pytest.mark.parametrize("rates", ["0.5,0.6,0.7,0.8", "0,0.5,1,2", "0,2.5,512,0"])
def test_one_line_of_four_numbers_is_a_rate_list(tmp_path: Path, rates: str) -> None:
    comma = write(tmp_path, "comma.csv", rates + "\n")
    space = write(tmp_path, "space.txt", rates.replace(",", " ") + "\n")  # never a query file
    arrivals = arrivals_from_spec(str(comma), seed=3, input_tokens=11, output_tokens=22)
    assert arrivals == arrivals_from_spec(str(space), seed=3, input_tokens=11, output_tokens=22)
    # Four minutes of Poisson arrivals, not four requests read from the line.
    assert len(arrivals) > 4
    assert max(a.at_s for a in arrivals) > 60.0
    assert {(a.input_tokens, a.output_tokens) for a in arrivals} == {(11, 22)}


@pytest.mark.skipif(not RATES.exists(), reason=f"trace kit not present: {RATES}")
def test_kit_rate_list_is_still_a_rate_list(tmp_path: Path) -> None:
    text = RATES.read_text()
    assert len(text.split(",")) == 19
    space = write(tmp_path, "space.txt", text.replace(",", " "))
    arrivals = arrivals_from_spec(str(RATES), seed=1)
    assert arrivals == arrivals_from_spec(str(space), seed=1)
    # ~0.6 req/s for 19 minutes: hundreds of arrivals spread over the 19 minutes.
    assert len(arrivals) > 300
    assert 18 * 60 < arrivals[-1].at_s < 19 * 60
