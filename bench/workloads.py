"""Named LLM workloads for the scheduling benchmarks (live and simulated): (input, output)
lengths sampled from the Azure LLM inference traces, scaled, with Poisson arrivals; and the
statistics both report."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

AZURE_TRACES = Path(__file__).resolve().parents[2] / "shared/traces/azure"
# Named workloads: the Azure traces whose (input, output) lengths they sample; "mix" takes as
# many rows from each.
WORKLOADS: dict[str, tuple[str, ...]] = {
    "azure-conv": ("AzureLLMInferenceTrace_conv.csv",),
    "azure-code": ("AzureLLMInferenceTrace_code.csv",),
    "mix": ("AzureLLMInferenceTrace_conv.csv", "AzureLLMInferenceTrace_code.csv"),
}


@dataclass(frozen=True)
class Job:
    arrival_s: float
    prompt_token_ids: list[int]
    output_tokens: int


def load_lengths(trace: Path) -> list[tuple[int, int]]:
    with trace.open(newline="") as handle:
        return [
            (int(row["ContextTokens"]), int(row["GeneratedTokens"]))
            for row in csv.DictReader(handle)
            if int(row["ContextTokens"]) > 0 and int(row["GeneratedTokens"]) > 0
        ]


def workload_lengths(name: str, traces: Path = AZURE_TRACES) -> list[tuple[int, int]]:
    """The (input, output) lengths of a named workload, equally many rows from each trace."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    parts = [load_lengths(traces / file) for file in WORKLOADS[name]]
    rows = min(len(part) for part in parts)
    return [row for part in parts for row in part[:rows]]


def make_jobs(
    lengths: list[tuple[int, int]],
    count: int,
    rate: float,
    context: int,
    vocab_size: int,
    scale: float,
    seed: int,
) -> list[Job]:
    """Sample rows, scale lengths by ``scale`` (clipped to the context), Poisson arrivals."""
    rng = random.Random(seed)
    rows = rng.sample(lengths, count)
    max_input, max_output = context // 2, context // 4
    jobs, clock = [], 0.0
    for context_tokens, generated in rows:
        inputs = max(1, min(max_input, round(context_tokens * scale)))
        outputs = max(1, min(max_output, round(generated * scale)))
        prompt = [rng.randrange(3, vocab_size) for _ in range(inputs)]
        jobs.append(Job(clock, prompt, outputs))
        clock += rng.expovariate(rate) if rate > 0 else 0.0
    return jobs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values)
