"""Decode tokens/s of the whole system vs the executor's forward pass in-process.

Same model, same batch sizes, side by side in one run:
- in-process: ``Engine.step`` called directly (the executor's forward pass, no NATS);
- system: client -> admission -> JetStream -> scheduler -> executor -> JetStream -> client,
  one executor instance, all requests sent at once so they decode as one batch.

Decode rate = decode tokens / time between the batch's first token and its last token, so
prefill and queueing are left out of both sides alike.

    python -m bench.decode_throughput [--size small] [--batch-sizes 1,8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shared.bus import connect
from shared.client import SpotserveClient
from shared.cluster import LocalCluster
from shared.config import NatsSettings
from shared.model.checkpoint import default_model_dir, ensure_model
from shared.model.engine import Engine, SequenceStep
from shared.model.tokenizer import TextTokenizer

PROMPT = "Spot instances are cheap but can be taken away with two minutes of notice, so"


def in_process_rate(model_dir: Path, batch_size: int, tokens: int, prompt_ids: list[int]) -> float:
    engine = Engine(model_dir, max_slots=batch_size)
    ids = [f"r{i}" for i in range(batch_size)]

    def step(inputs: dict[str, list[int]], index: int) -> dict[str, int]:
        return engine.step(
            [SequenceStep(rid, toks, 0.0, 1.0, 0, index) for rid, toks in inputs.items()]
        )

    last = step({rid: prompt_ids for rid in ids}, 0)
    started = time.perf_counter()
    for index in range(1, tokens):
        last = step({rid: [token] for rid, token in last.items()}, index)
    elapsed = time.perf_counter() - started
    engine.release(ids)
    return batch_size * (tokens - 1) / elapsed


async def system_rate(nats_url: str, batch_size: int, tokens: int) -> float:
    nc = await connect(nats_url, NatsSettings(), name="bench")
    client = SpotserveClient(nc)
    try:
        completions = await asyncio.gather(
            *(
                client.generate(PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True)
                for _ in range(batch_size)
            )
        )
    finally:
        await nc.close()
    first = min(c.chunk_times[0] for c in completions)
    last = max(c.chunk_times[-1] for c in completions)
    decoded = sum(len(c.chunk_times) - 1 for c in completions)
    return decoded / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (overrides --size)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; median reported")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_dir = args.model or ensure_model(default_model_dir(args.size), args.size)
    prompt_ids = TextTokenizer.from_model_dir(model_dir).encode(PROMPT)
    torch.set_num_threads(torch.get_num_threads())

    in_process = {
        b: statistics.median(
            in_process_rate(model_dir, b, args.tokens, prompt_ids) for _ in range(args.repeats)
        )
        for b in batch_sizes
    }
    with tempfile.TemporaryDirectory(prefix="spotserve-bench-") as state:
        env = {
            "SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": str(max(batch_sizes)),
            "SPOTSERVE_EXECUTOR__MAX_SLOTS": str(max(batch_sizes)),
        }
        with LocalCluster(Path(state), instances=1, model_dir=model_dir, env=env) as cluster:
            asyncio.run(system_rate(cluster.nats_url, 1, 8))  # warm-up
            system = {
                b: statistics.median(
                    asyncio.run(system_rate(cluster.nats_url, b, args.tokens))
                    for _ in range(args.repeats)
                )
                for b in batch_sizes
            }
    print(
        f"model {model_dir} | {args.tokens} tokens/request | torch threads "
        f"{torch.get_num_threads()} | median of {args.repeats}"
    )
    print(
        f"{'batch':>5}  {'in-process tok/s':>16}  {'system tok/s':>12}  {'system/in-process':>17}"
    )
    for b in batch_sizes:
        ratio = system[b] / in_process[b]
        print(f"{b:>5}  {in_process[b]:>16.1f}  {system[b]:>12.1f}  {ratio:>17.2f}")


if __name__ == "__main__":
    main()
