"""Fault injection with real processes and a real nats-server: SIGKILL one service (or the
nats-server) while a batch of requests streams, start it again as ``spotserve up``'s supervisor
(or compose's restart policy) would, and account for every request.

For each fault: the requests in flight, how many completed with exactly the output of an
uninterrupted run, how many got an explicit error, how many were lost (neither: must be 0), and
the recovery time (fault -> a new request's first token). A client that missed part of its
stream (core NATS does not redeliver) reads the committed result (``spotserve.v1.result``).

    python -m bench.faults [--faults admission,scheduler,...] [--requests 4] [--max-tokens 60]

``tests/test_faults.py`` runs the same scenarios and asserts the outcomes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.errors import Error as NatsError

from shared.bus import connect
from shared.client import GenerateError, SpotserveClient
from shared.cluster import LocalCluster
from shared.config import NatsSettings
from shared.messages import ResultReply

FAULTS = ("admission", "scheduler", "planner", "monitor", "loader", "executor-0", "nats")
PROMPT = "Fault injection request number"
# Fixed sampling: an interrupted request must end with exactly the uninterrupted tokens.
SAMPLING = {"temperature": 0.8, "seed": 7, "ignore_eos": True}
RESULT_WAIT_S = 240.0


@dataclass
class FaultOutcome:
    fault: str
    in_flight: int
    completed: int  # with the uninterrupted output
    errored: int  # an explicit error reply
    lost: int  # neither
    wrong: int  # completed with another output (must be 0)
    recovery_s: float | None  # fault -> a new request's first token

    def row(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        return (
            f"{self.fault:>11} {self.in_flight:>9} {self.completed:>9} {self.errored:>7}"
            f" {self.lost:>4} {self.wrong:>5} {recovery:>10}"
        )


HEADER = f"{'fault':>11} {'in flight':>9} {'completed':>9} {'errored':>7} {'lost':>4} {'wrong':>5}"
HEADER += f" {'recovery s':>10}"


async def reference(client: SpotserveClient, count: int, max_tokens: int) -> list[list[int]]:
    """The uninterrupted outputs."""
    completions = await asyncio.gather(
        *(client.generate(f"{PROMPT} {i}", max_tokens=max_tokens, **SAMPLING) for i in range(count))
    )
    return [completion.token_ids for completion in completions]


async def one_request(
    client: SpotserveClient, index: int, max_tokens: int, progress: asyncio.Event
) -> tuple[str, list[int]]:
    """("completed", tokens) or ("errored", []): the stream, or (when it broke or has a gap)
    the committed result."""
    request_id = f"fault-{uuid.uuid4().hex[:12]}"
    tokens: list[int] = []
    expected_index = 0
    try:
        async for chunk in client.stream(
            f"{PROMPT} {index}", max_tokens=max_tokens, request_id=request_id, **SAMPLING
        ):
            if chunk.index != expected_index:
                break  # a gap: the rest comes from the committed result
            expected_index += 1
            tokens.extend(chunk.token_ids)
            if expected_index >= 8:
                progress.set()
            if chunk.finish_reason is not None:
                return "completed", tokens
    except GenerateError as exc:
        if exc.code not in {"503", "500"} or expected_index == 0:
            return "errored", []
    except (TimeoutError, NatsError):
        pass
    result = await committed_result(client, request_id)
    if result is None:
        return ("errored", []) if expected_index == 0 else ("lost", [])
    return "completed", result.token_ids


async def committed_result(client: SpotserveClient, request_id: str) -> ResultReply | None:
    """Poll the committed result until the request has finished (None: never accepted)."""
    deadline = time.monotonic() + RESULT_WAIT_S
    while time.monotonic() < deadline:
        try:
            result = await client.result(request_id, timeout_s=5)
            if result.finish_reason is not None:
                return result
        except GenerateError as exc:
            if exc.code == "404":
                return None
        except (TimeoutError, NatsError):
            pass  # NATS or admission still coming back
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{request_id} did not finish within {RESULT_WAIT_S:.0f} s")


async def first_token_again(client: SpotserveClient, since: float) -> float:
    """Seconds from ``since`` until a new request gets its first token."""
    while True:
        try:
            async for _chunk in client.stream("Recovered?", max_tokens=1):
                return time.monotonic() - since
        except (GenerateError, TimeoutError, NatsError):
            await asyncio.sleep(0.1)


async def run_fault(
    nc: Client,
    fault: str,
    inject: Callable[[], None],
    expected: list[list[int]],
    max_tokens: int,
) -> FaultOutcome:
    client = SpotserveClient(nc, first_chunk_timeout_s=60, chunk_timeout_s=20)
    progress = asyncio.Event()
    tasks = [
        asyncio.create_task(one_request(client, i, max_tokens, progress))
        for i in range(len(expected))
    ]
    await asyncio.wait_for(progress.wait(), 120)
    started = time.monotonic()
    await asyncio.to_thread(inject)
    recovery = await asyncio.wait_for(first_token_again(client, started), 240)
    outcomes = await asyncio.gather(*tasks)
    completed = sum(
        o == "completed" and t == e for (o, t), e in zip(outcomes, expected, strict=True)
    )
    wrong = sum(o == "completed" and t != e for (o, t), e in zip(outcomes, expected, strict=True))
    return FaultOutcome(
        fault=fault,
        in_flight=len(tasks),
        completed=completed,
        errored=sum(o == "errored" for o, _ in outcomes),
        lost=sum(o == "lost" for o, _ in outcomes),
        wrong=wrong,
        recovery_s=recovery,
    )


def injector(cluster: LocalCluster, fault: str) -> Callable[[], None]:
    """SIGKILL, then start again (the supervisor's part)."""

    def inject() -> None:
        if fault == "nats":
            cluster.restart_nats(kill=True)
            return
        cluster.kill(fault)
        cluster.restart(fault)

    return inject


def fault_env() -> dict[str, str]:
    return {
        "SPOTSERVE_SCHEDULER__ACK_WAIT_S": "3",  # a killed scheduler's requests come back soon
        "SPOTSERVE_SCHEDULER__DISCOVERY_INTERVAL_S": "0.5",
        "SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": "2",  # the batch spreads over both executors
        "SPOTSERVE_MONITOR__LEASE_S": "3",
        "SPOTSERVE_MONITOR__HEARTBEAT_S": "0.25",
        "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1",
    }


async def run_all(
    cluster: LocalCluster, faults: list[str], requests: int, max_tokens: int
) -> list[FaultOutcome]:
    nc = await connect(cluster.nats_url, NatsSettings(), name="bench-faults", deadline_s=10)
    try:
        expected = await reference(SpotserveClient(nc), requests, max_tokens)
        outcomes = []
        for fault in faults:
            outcomes.append(
                await run_fault(nc, fault, injector(cluster, fault), expected, max_tokens)
            )
        return outcomes
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=60)
    args = parser.parse_args()
    from shared.model.checkpoint import default_model_dir, ensure_model

    model_dir = ensure_model(default_model_dir("tiny"), "tiny")
    with tempfile.TemporaryDirectory(prefix="spotserve-faults-") as state:
        cluster = LocalCluster(Path(state), instances=2, model_dir=model_dir, env=fault_env())
        with cluster:
            outcomes = asyncio.run(
                run_all(cluster, args.faults.split(","), args.requests, args.max_tokens)
            )
    print(f"tiny model, 2 instances, {args.requests} requests of {args.max_tokens} tokens each")
    print(HEADER)
    for outcome in outcomes:
        print(outcome.row())


if __name__ == "__main__":
    main()
