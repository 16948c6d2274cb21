"""Trace specs turned into plain, validated Python data for the replayer.

Two kinds of traces:
- request arrivals (`arrivals_from_spec`): synthetic Poisson/Gamma processes, a per-minute rate
  list, a real request log (Azure LLM inference CSV, BurstGPT CSV), or the SpotServe
  artifact's query file (`index,arrival_s,input_tokens,gap_ms` rows, no header);
- fleet availability (`read_fleet_trace`): SpotServe's spot-instance add/remove traces, as CSV
  rows or JSON lines.

Everything here is pure data: no clocks, no I/O beyond reading the trace file, so the replayer
decides how to pace it and tests can check it without timing anything.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "Arrival",
    "FleetTrace",
    "TraceError",
    "TraceEvent",
    "arrivals_from_spec",
    "backfill_nodes",
    "read_fleet_trace",
    "scale_lengths",
    "timeline",
]


class TraceError(ValueError):
    """A trace that cannot be used; the message names the file and (1-based) line, e.g.
    "traces/x.csv line 7: GeneratedTokens 'abc' is not an integer"."""


def _error(path: Path | str, line: int | None, message: str) -> TraceError:
    where = f"{path} line {line}" if line is not None else str(path)
    return TraceError(f"{where}: {message}")


# --------------------------------------------------------------------------------------------
# Request arrivals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds from the start of the replay
    input_tokens: int  # >= 1
    output_tokens: int  # >= 1


AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_HEADER = (
    "Timestamp",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
)
# The SpotServe artifact's query file (queries/query_*.txt): no header, one request a row.
QUERY_COLUMNS = ("index", "arrival_s", "input_tokens", "gap_ms")
_ACCEPTED = (
    f"accepted headers: {','.join(AZURE_HEADER)} (Azure LLM inference); "
    f"{','.join(BURSTGPT_HEADER)} (BurstGPT); "
    f"no header and rows {','.join(QUERY_COLUMNS)} starting at index 0 (SpotServe queries); "
    "or a per-minute rate list of numbers (comma/space separated)"
)
# Synthetic processes are drawn in fixed-size chunks: numpy's Generator draws element by
# element, so a fixed chunk keeps a longer run an exact extension of a shorter one (same seed).
_CHUNK = 4096
_SEPARATORS = re.compile(r"[,\s]+")


def arrivals_from_spec(
    spec: str,
    *,
    duration_s: float | None = None,
    max_requests: int | None = None,
    input_tokens: int = 512,
    output_tokens: int = 128,
    seed: int = 0,
) -> list[Arrival]:
    """Arrivals for a spec: "poisson:RATE", "gamma:RATE:CV", or a path to a per-minute rate
    list, an Azure LLM inference CSV, a BurstGPT CSV or a SpotServe artifact query file
    (detected from the first non-blank line).

    Synthetic specs and rate lists use input_tokens/output_tokens for every request; synthetic
    specs need a bound (duration_s and/or max_requests). Azure and BurstGPT logs carry both
    lengths and start at 0 s (their first request). A query file (rows
    `index,arrival_s,input_tokens,gap_ms`, no header) carries the input length, takes
    output_tokens for every request (the file has none; the paper uses 128) and keeps its
    arrival times as written (the first request is not moved to 0 s); gap_ms is checked to be
    a number and otherwise unused. A file is a query file when its first non-blank line has
    exactly 4 comma-separated numeric cells, the first being "0" (the index) and the third an
    integer (input tokens), and it has more than one non-blank line; anything else made of
    numbers, e.g. the one-line "0,0.5,1,2", is a rate list.

    Arrivals are kept while at_s < duration_s, at most max_requests of them. Deterministic for
    a given seed.
    """
    _check_bounds(duration_s, max_requests)
    if input_tokens < 1 or output_tokens < 1:
        raise ValueError(
            f"input_tokens and output_tokens must be >= 1, got {input_tokens}, {output_tokens}"
        )
    kind, _, params = spec.partition(":")
    if kind in ("poisson", "gamma"):
        rate, cv = _parse_process(spec, kind, params)
        if duration_s is None and max_requests is None:
            raise TraceError(f"{spec}: a synthetic process needs duration_s or max_requests")
        rng = np.random.default_rng(seed)
        times = _renewal_times(rng, rate, cv, duration_s, max_requests)
        return [Arrival(t, input_tokens, output_tokens) for t in times]
    path = Path(spec)
    if not path.is_file():
        raise TraceError(
            f"{spec!r} is neither a synthetic spec (poisson:RATE, gamma:RATE:CV) nor a file"
        )
    return _arrivals_from_file(path, duration_s, max_requests, input_tokens, output_tokens, seed)


def _check_bounds(duration_s: float | None, max_requests: int | None) -> None:
    if duration_s is not None and not (duration_s >= 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s}")
    if max_requests is not None and max_requests < 0:
        raise ValueError(f"max_requests must be >= 0, got {max_requests}")


def _parse_process(spec: str, kind: str, params: str) -> tuple[float, float]:
    """(rate, cv) of "poisson:RATE" (cv 1: exponential gaps) or "gamma:RATE:CV"."""
    parts = params.split(":") if params else []
    expected = 1 if kind == "poisson" else 2
    if len(parts) != expected:
        usage = "poisson:RATE" if kind == "poisson" else "gamma:RATE:CV"
        raise TraceError(f"{spec}: expected {usage}")
    rate = _positive_float(spec, "RATE", parts[0])
    cv = _positive_float(spec, "CV", parts[1]) if kind == "gamma" else 1.0
    return rate, cv


def _positive_float(spec: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{spec}: {name} {text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise TraceError(f"{spec}: {name} must be a finite number > 0, got {text!r}")
    return value


def _renewal_times(
    rng: np.random.Generator,
    rate: float,
    cv: float,
    duration_s: float | None,
    max_requests: int | None,
) -> list[float]:
    """Arrival times of a renewal process with Gamma gaps: shape 1/CV^2, scale CV^2/rate, so
    the mean gap is 1/rate; CV 1 is the exponential gap of a Poisson process."""
    shape, scale = 1.0 / cv**2, cv**2 / rate
    limit = max_requests if max_requests is not None else math.inf
    horizon = duration_s if duration_s is not None else math.inf
    times: list[float] = []
    start = 0.0
    while len(times) < limit:
        chunk = start + np.cumsum(rng.gamma(shape, scale, _CHUNK))
        inside = chunk[chunk < horizon]
        times.extend(inside.tolist())
        if len(inside) < len(chunk):
            break
        start = float(chunk[-1])
    return times if max_requests is None else times[:max_requests]


def _arrivals_from_file(
    path: Path,
    duration_s: float | None,
    max_requests: int | None,
    input_tokens: int,
    output_tokens: int,
    seed: int,
) -> list[Arrival]:
    lines = _read_lines(path)
    first = next(((n, text) for n, text in lines if text.strip()), None)
    if first is None:
        raise _error(path, None, "file is empty")
    line_no, text = first
    # Header names are compared ignoring case and padding: hand-edited exports vary in both.
    header = tuple(column.strip().lower() for column in text.split(","))
    if header == tuple(c.lower() for c in AZURE_HEADER):
        arrivals = _read_request_csv(path, line_no, AZURE_HEADER, _azure_row)
    elif header == tuple(c.lower() for c in BURSTGPT_HEADER):
        arrivals = _read_request_csv(path, line_no, BURSTGPT_HEADER, _burstgpt_row)
    elif _looks_like_queries(text, lines):
        arrivals = _read_queries(path, lines, output_tokens)
    elif _looks_numeric(text):
        rates = _parse_rates(path, lines)
        rng = np.random.default_rng(seed)
        times = _piecewise_poisson(rng, rates, duration_s)
        arrivals = [Arrival(t, input_tokens, output_tokens) for t in times]
    else:
        raise _error(path, line_no, f"unknown header {text.strip()!r}; {_ACCEPTED}")
    return _truncate(arrivals, duration_s, max_requests)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of every line; a BOM (Excel exports) is dropped."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return [(n, line.rstrip("\r\n")) for n, line in enumerate(f, start=1)]
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a UTF-8 text file ({exc.reason})") from None


def _looks_numeric(text: str) -> bool:
    tokens = [t for t in _SEPARATORS.split(text.strip()) if t]
    try:
        [float(t) for t in tokens]
    except ValueError:
        return False
    return bool(tokens)


# -- SpotServe artifact query files -----------------------------------------------------------


_DIGITS = re.compile(r"[0-9]+")


def _looks_like_queries(first: str, lines: list[tuple[int, str]]) -> bool:
    """The first non-blank line is a query row with index 0 (4 comma-separated numbers, the
    first "0", the third an integer) and the file has more rows: a one-line list of 4 rates
    is never taken for a one-request query file."""
    cells = [cell.strip() for cell in first.split(",")]
    if len(cells) != 4 or cells[0] != "0" or not _DIGITS.fullmatch(cells[2]):
        return False
    if not _looks_numeric(cells[1]) or not _looks_numeric(cells[3]):
        return False
    return sum(1 for _, text in lines if text.strip()) > 1


def _read_queries(path: Path, lines: list[tuple[int, str]], output_tokens: int) -> list[Arrival]:
    """Rows `index,arrival_s,input_tokens,gap_ms`: indices 0, 1, 2, ..., arrival times in
    non-decreasing order, kept as written."""
    arrivals: list[Arrival] = []
    previous: tuple[int, float] | None = None  # (line, arrival time) of the previous row
    for line_no, text in lines:
        if not text.strip():
            continue
        cells = [cell.strip() for cell in text.split(",")]
        if len(cells) != len(QUERY_COLUMNS):
            raise _error(
                path,
                line_no,
                f"expected {len(QUERY_COLUMNS)} columns ({','.join(QUERY_COLUMNS)}), "
                f"got {len(cells)}",
            )
        index_text, at_text, tokens_text, gap_text = cells
        if not _DIGITS.fullmatch(index_text):
            raise _error(path, line_no, f"index {index_text!r} is not an integer >= 0")
        if int(index_text) != len(arrivals):
            expected = "0 (the first row)" if not arrivals else f"{len(arrivals)} (previous + 1)"
            raise _error(
                path, line_no, f"index {index_text} is out of sequence, expected {expected}"
            )
        at_s = _query_time(path, line_no, at_text)
        if previous is not None and at_s < previous[1]:
            raise _error(
                path,
                line_no,
                f"arrival time {at_text} s is before line {previous[0]}'s {previous[1]!r} s "
                "(expected arrival times in non-decreasing order)",
            )
        if not _DIGITS.fullmatch(tokens_text) or int(tokens_text) < 1:
            raise _error(path, line_no, f"input tokens {tokens_text!r} is not an integer >= 1")
        if not _is_finite_number(gap_text):
            raise _error(
                path,
                line_no,
                f"gap {gap_text!r} is not a finite number "
                "(milliseconds since the previous request)",
            )
        arrivals.append(Arrival(at_s, int(tokens_text), output_tokens))
        previous = (line_no, at_s)
    return arrivals


def _query_time(path: Path, line_no: int, text: str) -> float:
    return _non_negative(path, line_no, "arrival time", text)


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# -- per-minute rate lists ---------------------------------------------------------------------


def _parse_rates(path: Path, lines: list[tuple[int, str]]) -> list[float]:
    rates: list[float] = []
    for line_no, text in lines:
        for token in _SEPARATORS.split(text.strip()):
            if token:
                rates.append(_rate_value(path, line_no, token))
    return rates


def _rate_value(path: Path, line_no: int, token: str) -> float:
    # A quiet minute (rate 0) is fine; a negative or infinite rate is a broken file.
    return _non_negative(path, line_no, "rate", token)


def _non_negative(path: Path, line_no: int, name: str, text: str) -> float:
    """A finite number >= 0, else a TraceError naming the file, the line and the value."""
    try:
        value = float(text)
    except ValueError:
        raise _error(path, line_no, f"{name} {text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise _error(path, line_no, f"{name} {text!r} must be a finite number >= 0")
    return value


def _piecewise_poisson(
    rng: np.random.Generator, rates: list[float], duration_s: float | None
) -> list[float]:
    """Poisson arrivals at rate r_i during minute i. Given its count, a Poisson process's
    arrivals in an interval are uniform there, so each minute is a count plus sorted uniforms."""
    total = len(rates) * 60.0
    horizon = total if duration_s is None else min(duration_s, total)
    times: list[float] = []
    for minute, rate in enumerate(rates):
        start = minute * 60.0
        if start >= horizon:
            break
        count = int(rng.poisson(rate * 60.0))
        minute_times = np.sort(rng.uniform(start, start + 60.0, count))
        times.extend(minute_times[minute_times < horizon].tolist())
    return times


# -- request logs (Azure, BurstGPT) ------------------------------------------------------------


# A request row: (integer nanoseconds on the trace's clock, input, output). Integer time keeps
# sub-µs differences exact; float seconds since 1970 would lose them.
_Row = tuple[int, int, int]
# Parses (path, line, cells) into a row, or None for a row the trace marks as not replayable.
_RowParser = Callable[[Path, int, list[str]], _Row | None]


def _read_request_csv(
    path: Path, header_line: int, header: tuple[str, ...], parse_row: _RowParser
) -> list[Arrival]:
    rows: list[_Row] = []
    for line_no, cells in _csv_rows(path):
        if line_no <= header_line or not cells or not "".join(cells).strip():
            continue  # the header (already checked) and blank lines
        if len(cells) != len(header):
            raise _error(
                path,
                line_no,
                f"expected {len(header)} columns ({','.join(header)}), got {len(cells)}",
            )
        row = parse_row(path, line_no, cells)
        if row is not None:
            rows.append(row)
    if not rows:
        raise _error(path, None, "no requests after the header")
    rows.sort(key=lambda row: row[0])  # stable: rows at the same instant keep file order
    first = rows[0][0]
    return [Arrival((t - first) / 1e9, n_in, n_out) for t, n_in, n_out in rows]


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number where the row starts, cells) for every CSV row."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1
        for cells in reader:
            yield start, cells
            start = reader.line_num + 1


def _azure_row(path: Path, line_no: int, cells: list[str]) -> _Row | None:
    at = _azure_timestamp(path, line_no, cells[0])
    n_in = _token_count(path, line_no, "ContextTokens", cells[1])
    n_out = _token_count(path, line_no, "GeneratedTokens", cells[2])
    return _replayable(at, n_in, n_out)


def _burstgpt_row(path: Path, line_no: int, cells: list[str]) -> _Row | None:
    at = _seconds_ns(path, line_no, "Timestamp", cells[0])
    n_in = _token_count(path, line_no, "Request tokens", cells[2])
    n_out = _token_count(path, line_no, "Response tokens", cells[3])
    return _replayable(at, n_in, n_out)


def _replayable(at: int, n_in: int, n_out: int) -> _Row | None:
    # 0 generated tokens is a failed request (BurstGPT logs those): there is no output length
    # to force, so it is not replayed. A prompt needs at least one token to be sent at all.
    if n_out == 0:
        return None
    return at, max(1, n_in), n_out


_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()
_AZURE_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?")


def _azure_timestamp(path: Path, line_no: int, text: str) -> int:
    """Nanoseconds since the epoch (naive, as written) of "2023-11-16 18:15:46.6805900".

    datetime.fromisoformat on 3.11 takes at most 6 fractional digits and the trace has 7, so
    the fraction is parsed here; whole seconds go through datetime to validate the date."""
    match = _AZURE_TIME.fullmatch(text.strip())
    if match is None:
        raise _error(path, line_no, f"TIMESTAMP {text!r} is not like 2023-11-16 18:15:46.6805900")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    try:
        whole = datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise _error(path, line_no, f"TIMESTAMP {text!r}: {exc}") from None
    whole_s = (whole.date().toordinal() - _EPOCH_ORDINAL) * 86400 + hour * 3600 + minute * 60
    fraction = (match.group(7) or "")[:9].ljust(9, "0")  # beyond 1 ns is noise
    return (whole_s + second) * 1_000_000_000 + int(fraction)


def _seconds_ns(path: Path, line_no: int, column: str, text: str) -> int:
    """Nanoseconds of a time in (decimal) seconds, parsed exactly."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise _error(path, line_no, f"{column} {text!r} is not a number") from None
    if not value.is_finite():
        raise _error(path, line_no, f"{column} {text!r} is not a finite number")
    return int(value * 1_000_000_000)


def _token_count(path: Path, line_no: int, column: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _error(path, line_no, f"{column} {text!r} is not an integer") from None
    if value < 0:
        raise _error(path, line_no, f"{column} {text!r} is negative")
    return value


def _truncate(
    arrivals: list[Arrival], duration_s: float | None, max_requests: int | None
) -> list[Arrival]:
    if duration_s is not None:
        arrivals = [a for a in arrivals if a.at_s < duration_s]
    if max_requests is not None:
        arrivals = arrivals[:max_requests]
    return arrivals


# -- fitting requests to a model ---------------------------------------------------------------


def scale_lengths(
    arrivals: list[Arrival], *, context_tokens: int, min_output: int = 1
) -> list[Arrival]:
    """Fit each request to a model's context (e.g. a tiny test model with 256 positions): a
    request with input + output > context_tokens has both scaled down proportionally, each at
    least 1 (output at least min_output, unless it was shorter) and input + output ==
    context_tokens. Requests that fit are kept as they are. Returns a new list."""
    if context_tokens < 2:
        raise ValueError(f"context_tokens must be >= 2 (one input, one output): {context_tokens}")
    if not 1 <= min_output < context_tokens:
        raise ValueError(f"min_output must be in [1, {context_tokens - 1}], got {min_output}")
    return [_fit(a, context_tokens, min_output) for a in arrivals]


def _fit(arrival: Arrival, context_tokens: int, min_output: int) -> Arrival:
    total = arrival.input_tokens + arrival.output_tokens
    if total <= context_tokens:
        return arrival
    scaled = arrival.output_tokens * context_tokens // total
    output = min(arrival.output_tokens, max(min_output, scaled), context_tokens - 1)
    # The input takes the rest, so the request uses the whole context it is allowed.
    return replace(arrival, input_tokens=context_tokens - output, output_tokens=output)


# --------------------------------------------------------------------------------------------
# Fleet availability
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEvent:
    at_s: float  # seconds from the trace start
    kind: Literal["add", "remove"]
    node: str  # the trace's node name, e.g. "node3"
    # jsonl removes may carry required_tpt (req/s the fleet must sustain from then on)
    required_rps: float | None = None


@dataclass(frozen=True)
class FleetTrace:
    events: list[TraceEvent]  # sorted by at_s, stable
    duration_s: float  # the DONE event's time if present, else the last event's
    initial_nodes: list[str]  # nodes added at the first event's time (in order)
    # (at_s, required_rps) of jsonl "other" events and of removes that carry required_tpt
    rate_changes: list[tuple[float, float]] = field(default_factory=list)


# A time this far behind the latest one already seen is a broken file, not jitter to sort out.
MAX_BACKSTEP_MS = 1000.0


@dataclass(frozen=True)
class _RawEvent:
    """One trace line before validation: times still in the file's milliseconds."""

    line: int
    t_ms: float
    kind: str  # add, remove, other, DONE
    nodes: tuple[str, ...]
    required_rps: float | None


def read_fleet_trace(path: Path | str) -> FleetTrace:
    """A SpotServe availability trace: CSV rows `t_ms,add|remove,nodeK` (no header) or JSON
    lines `[t_ms, "add"|"remove"|"other"|"DONE", {"nodes": [...], ...}]` (told apart by the
    first character). Times become seconds from the first event. Raises TraceError, naming
    file and line, for malformed lines, negative times, times more than MAX_BACKSTEP_MS out of
    order (smaller back-steps are sorted, stable), an add of a node already up, a remove of a
    node that is not up, events after DONE, and a file without add/remove events."""
    path = Path(path)
    lines = [(n, text) for n, text in _read_lines(path) if text.strip()]
    if not lines:
        raise _error(path, None, "file is empty")
    parse = _jsonl_event if lines[0][1].lstrip().startswith("[") else _csv_event
    raw = [parse(path, n, text) for n, text in lines]
    _check_order(path, raw)
    raw.sort(key=lambda event: event.t_ms)
    return _build_trace(path, raw)


def _csv_event(path: Path, line_no: int, text: str) -> _RawEvent:
    cells = [cell.strip() for cell in text.split(",")]
    if len(cells) != 3:
        raise _error(path, line_no, f"expected 3 columns (t_ms,add|remove,node), got {len(cells)}")
    t_text, kind, node = cells
    try:
        t_ms = float(t_text)
    except ValueError:
        raise _error(path, line_no, f"time {t_text!r} is not a number") from None
    if kind not in ("add", "remove"):
        raise _error(path, line_no, f"unknown event kind {kind!r} (expected add or remove)")
    if not node:
        raise _error(path, line_no, "empty node name")
    return _RawEvent(line_no, _check_time(path, line_no, t_ms), kind, (node,), None)


def _jsonl_event(path: Path, line_no: int, text: str) -> _RawEvent:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, line_no, f"bad JSON: {exc.msg}") from None
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], dict)):
        raise _error(path, line_no, "expected [t_ms, kind, {...}]")
    t_ms, kind, body = item
    if isinstance(t_ms, bool) or not isinstance(t_ms, int | float):
        raise _error(path, line_no, f"time {t_ms!r} is not a number")
    if kind not in ("add", "remove", "other", "DONE"):
        raise _error(
            path, line_no, f"unknown event kind {kind!r} (expected add, remove, other or DONE)"
        )
    nodes = _json_nodes(path, line_no, kind, body)
    required = _json_required_rps(path, line_no, kind, body)
    return _RawEvent(line_no, _check_time(path, line_no, float(t_ms)), kind, nodes, required)


def _json_nodes(path: Path, line_no: int, kind: str, body: dict[str, Any]) -> tuple[str, ...]:
    nodes = body.get("nodes", [])
    if not (isinstance(nodes, list) and all(isinstance(n, str) and n for n in nodes)):
        raise _error(path, line_no, f"nodes {nodes!r} is not a list of node names")
    if kind in ("add", "remove") and not nodes:
        raise _error(path, line_no, f"{kind} event without nodes")
    return tuple(nodes)


def _json_required_rps(path: Path, line_no: int, kind: str, body: dict[str, Any]) -> float | None:
    value = body.get("required_tpt")
    if value is None:
        if kind == "other":
            raise _error(path, line_no, "other event without required_tpt")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(path, line_no, f"required_tpt {value!r} is not a number")
    if not (value >= 0 and math.isfinite(value)):
        raise _error(path, line_no, f"required_tpt {value!r} must be a finite number >= 0")
    return float(value)


def _check_time(path: Path, line_no: int, t_ms: float) -> float:
    if not math.isfinite(t_ms):
        raise _error(path, line_no, f"time {t_ms!r} is not a finite number")
    if t_ms < 0:
        raise _error(path, line_no, f"negative time {t_ms:g} ms")
    return t_ms


def _check_order(path: Path, raw: list[_RawEvent]) -> None:
    latest = raw[0]
    for event in raw[1:]:
        if latest.t_ms - event.t_ms > MAX_BACKSTEP_MS:
            raise _error(
                path,
                event.line,
                f"time {event.t_ms:g} ms is {latest.t_ms - event.t_ms:g} ms before line "
                f"{latest.line}'s {latest.t_ms:g} ms (out of order by more than "
                f"{MAX_BACKSTEP_MS:g} ms)",
            )
        if event.t_ms > latest.t_ms:
            latest = event


def _build_trace(path: Path, raw: list[_RawEvent]) -> FleetTrace:
    """Validate the (time-sorted) events against the set of live nodes and convert them."""
    start_ms = raw[0].t_ms
    up: set[str] = set()
    events: list[TraceEvent] = []
    rate_changes: list[tuple[float, float]] = []
    done: _RawEvent | None = None
    for event in raw:
        if done is not None:
            raise _error(path, event.line, f"{event.kind} event after DONE (line {done.line})")
        at_s = (event.t_ms - start_ms) / 1000.0
        if event.kind == "DONE":
            done = event
            continue
        if event.required_rps is not None:
            rate_changes.append((at_s, event.required_rps))
        if event.kind in ("add", "remove"):
            kind: Literal["add", "remove"] = "add" if event.kind == "add" else "remove"
            for node in event.nodes:
                _apply(path, event, node, up)
                events.append(TraceEvent(at_s, kind, node, event.required_rps))
    if not events:
        raise _error(path, None, "no add/remove events")
    duration_s = (raw[-1].t_ms - start_ms) / 1000.0
    return FleetTrace(events, duration_s, _initial_nodes(events), rate_changes)


def _apply(path: Path, event: _RawEvent, node: str, up: set[str]) -> None:
    if event.kind == "add":
        if node in up:
            raise _error(path, event.line, f"add of {node!r}, which is already up")
        up.add(node)
    else:
        if node not in up:
            raise _error(path, event.line, f"remove of {node!r}, which is not up")
        up.remove(node)


def _initial_nodes(events: list[TraceEvent]) -> list[str]:
    """Nodes up once the first add/remove instant is applied: added then and not removed then.
    (The replayer maps these to the starting instances and skips the adds at that instant.)"""
    at_first = [e for e in events if e.at_s == events[0].at_s]
    removed = {e.node for e in at_first if e.kind == "remove"}
    return [e.node for e in at_first if e.kind == "add" and e.node not in removed]


def timeline(trace: FleetTrace) -> list[tuple[float, int]]:
    """(at_s, number of live nodes) after each event, for plots and tests."""
    live = 0
    points: list[tuple[float, int]] = []
    for event in trace.events:
        live += 1 if event.kind == "add" else -1
        points.append((event.at_s, live))
    return points


def backfill_nodes(trace: FleetTrace, delay_s: float = 90.0) -> set[str]:
    """Nodes that stand in for preempted ones: added exactly ``delay_s`` after a remove, up to
    as many as that remove took. The SpotServe artifact's "+O" traces backfill each preemption
    with an on-demand instance 90 s later and do not mark those nodes otherwise."""
    removed: dict[float, int] = {}
    for event in trace.events:
        if event.kind == "remove":
            removed[event.at_s] = removed.get(event.at_s, 0) + 1
    backfill: set[str] = set()
    for event in trace.events:
        key = round(event.at_s - delay_s, 6)
        matches = [t for t in removed if abs(t - key) < 1e-6 and removed[t] > 0]
        if event.kind == "add" and matches:
            removed[matches[0]] -= 1
            backfill.add(event.node)
    return backfill
