"""Prometheus metrics: every service serves its own, found through $SRV INFO metadata; after
known traffic (requests, a refusal, a result lookup, preemption notices, a failed fetch) the
counts are exact. Plus unit tests of the metrics server and of the naming conventions."""

from __future__ import annotations

import asyncio
import importlib
import math
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.scheduler.mlfq import SkipJoinMlfqPolicy
from services.scheduler.sequence import Sequence
from shared.client import GenerateError, SpotserveClient
from shared.cluster import LocalCluster
from shared.codec import decode, encode
from shared.config import MetricsSettings, MlfqSettings
from shared.discovery import discover
from shared.messages import (
    NOTICE_OUTCOME_HEADER,
    FetchModelRequest,
    Plan,
)
from shared.metrics import METRICS_URL_KEY, start_metrics_server
from shared.model.tokenizer import TextTokenizer
from shared.subjects import (
    FLEET_NOTICE,
    PLANS_STREAM,
    PLANS_SUBJECT,
    SERVICE_ADMISSION,
    SERVICE_EXECUTOR,
    SERVICE_LOADER,
    SERVICE_MONITOR,
    SERVICE_PLANNER,
    SERVICE_SCHEDULER,
    loader_fetch_subject,
)
from tests.helpers import connected, eventually, isolated_cluster
from tests.test_mlfq import make_request

SERVICES = ("admission", "scheduler", "executor", "monitor", "planner", "loader")
# Streamed requests (max_tokens each) and one request/reply request.
STREAMED = (3, 4, 5, 6, 7)
COMPLETED = 8
MAX_TOKENS = (*STREAMED, COMPLETED)
INSTANCES = 2


# -- reading metrics ---------------------------------------------------------------------------


class Scrape:
    """The samples of one or more /metrics pages (several: values are summed over them)."""

    def __init__(self, pages: list[str]) -> None:
        self.samples: list[Sample] = []
        self.families: dict[str, Any] = {}
        for page in pages:
            for family in text_string_to_metric_families(page):
                self.families[family.name] = family
                self.samples.extend(family.samples)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``; NaN if none."""
        found = [
            sample.value
            for sample in self.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]
        return sum(found) if found else math.nan

    def has(self, *families: str) -> bool:
        return all(family in self.families for family in families)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return cast(bytes, response.read()).decode()


async def metrics_urls(nc: Client, service: str, expected: int = 1) -> list[str]:
    async def found() -> list[str] | None:
        replies = await discover(nc, service, verb="INFO", window_s=0.5)
        urls = sorted(
            {(reply.get("metadata") or {}).get(METRICS_URL_KEY, "") for reply in replies} - {""}
        )
        return urls if len(urls) >= expected else None

    return cast(list[str], await eventually(found, f"metrics URLs of {service}"))


async def scrape(nc: Client, service: str, expected: int = 1) -> Scrape:
    urls = await metrics_urls(nc, service, expected)
    pages = await asyncio.gather(*(asyncio.to_thread(fetch, url) for url in urls))
    return Scrape(list(pages))


async def eventually_scraped(
    nc: Client, service: str, check: Any, what: str, expected: int = 1
) -> Scrape:
    """Scrape ``service`` until ``check(scrape)`` holds (values updated asynchronously)."""

    async def scraped() -> Scrape | None:
        result = await scrape(nc, service, expected)
        return result if check(result) else None

    return cast(Scrape, await eventually(scraped, what, timeout_s=60))


async def plan_covering(nc: Client, fleet_seq: int) -> Plan | None:
    """The current plan if it takes the fleet events up to ``fleet_seq`` into account."""
    message = await nc.jetstream().get_last_msg(PLANS_STREAM, PLANS_SUBJECT)
    plan = Plan.model_validate(decode(message.data))
    return plan if plan.fleet_seq >= fleet_seq else None


# -- the system test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[LocalCluster]:
    env = {"SPOTSERVE_SCHEDULER__MAX_BATCH_SIZE": "4", "SPOTSERVE_EXECUTOR__TORCH_THREADS": "1"}
    with isolated_cluster(tmp_path_factory, "metrics", tiny_model_dir, INSTANCES, env) as cluster:
        yield cluster


async def test_every_service_counts_the_traffic_exactly(metrics_cluster: LocalCluster) -> None:
    async with connected(metrics_cluster) as nc:
        # A plan first, so that the requests below run under a stable configuration.
        await eventually_scraped(
            nc,
            SERVICE_PLANNER,
            lambda s: s.value("spotserve_planner_plan_epoch") >= 1,
            "the first plan",
        )

        client = SpotserveClient(nc, first_chunk_timeout_s=120, chunk_timeout_s=60)
        prompts = [f"Metrics request number {i}" for i in range(len(MAX_TOKENS))]
        options = {"temperature": 0.0, "ignore_eos": True}
        streamed, completed = await asyncio.gather(
            asyncio.gather(
                *(
                    client.generate(prompt, max_tokens=max_tokens, **options)
                    for prompt, max_tokens in zip(prompts, STREAMED, strict=False)
                )
            ),
            client.complete(prompts[-1], max_tokens=COMPLETED, **options),
        )
        assert [c.completion_tokens for c in streamed] == list(STREAMED)
        assert len(completed.token_ids) == COMPLETED
        prompt_tokens = sum(c.prompt_tokens for c in streamed) + completed.usage.prompt_tokens
        with pytest.raises(GenerateError) as refused:
            await client.complete("no tokens wanted", max_tokens=0)
        assert refused.value.code == "400"
        assert (await client.result(streamed[0].request_id)).finish_reason == "length"

        # Preemption notices: a new one, its repeat, one for an unknown instance; after both
        # instances' joins, so the notice is the FLEET stream's event INSTANCES + 1.
        await eventually_scraped(
            nc,
            SERVICE_MONITOR,
            lambda s: s.value("spotserve_monitor_fleet_events_total", kind="joined") == INSTANCES,
            "both instances joined",
        )
        outcomes = []
        for instance_id in ("instance-1", "instance-1", "nobody"):
            body = encode({"instance_id": instance_id, "grace_s": 600.0})
            reply = await nc.request(FLEET_NOTICE, body, timeout=30)
            headers = reply.headers or {}
            outcomes.append(headers.get(NOTICE_OUTCOME_HEADER) or headers.get(ERROR_CODE_HEADER))
        assert outcomes == ["new", "duplicate", "404"]

        # A fetch of a model the remote store does not have.
        loader_info = (await discover(nc, SERVICE_LOADER, verb="INFO"))[0]
        subject = loader_fetch_subject(loader_info["metadata"]["node"])
        body = encode(FetchModelRequest(model="no-such-model"))
        reply = await nc.request(subject, body, timeout=60)
        assert (reply.headers or {}).get(ERROR_CODE_HEADER) == "404"

        total_tokens = sum(MAX_TOKENS)
        requests = len(MAX_TOKENS)

        # -- admission
        admission = await eventually_scraped(
            nc,
            SERVICE_ADMISSION,
            lambda s: s.value("spotserve_admission_queued_requests") == 0,
            "admission's backlog back to 0",
        )
        outcome = "spotserve_admission_requests_total"
        assert admission.value(outcome, outcome="accepted") == requests
        assert admission.value(outcome, outcome="bad_request") == 1
        assert admission.value(outcome) == requests + 1
        assert admission.value("spotserve_admission_prompt_tokens_total") == prompt_tokens
        assert admission.value("spotserve_admission_accept_seconds_count") == requests
        lookups = "spotserve_admission_result_lookups_total"
        assert admission.value(lookups, outcome="found") == 1
        assert admission.value(lookups) == 1
        assert admission.has("spotserve_admission_arrival_rate_requests_per_second")

        # -- scheduler (a request's counters move once its last chunk has been forwarded)
        scheduler = await eventually_scraped(
            nc,
            SERVICE_SCHEDULER,
            lambda s: (
                s.value("spotserve_scheduler_requests_total") == requests
                and s.value("spotserve_scheduler_requests_held") == 0
            ),
            "the scheduler to count every request finished",
        )
        assert scheduler.value("spotserve_scheduler_requests_total", outcome="length") == requests
        assert scheduler.value("spotserve_scheduler_requests_received_total") == requests
        assert scheduler.value("spotserve_scheduler_generated_tokens_total") == total_tokens
        assert scheduler.value("spotserve_scheduler_replayed_tokens_total") == 0
        ttft = "spotserve_scheduler_time_to_first_token_seconds"
        assert scheduler.value(f"{ttft}_count") == requests
        assert scheduler.value(f"{ttft}_bucket", le="+Inf") == requests
        assert "admission's wall clock" in scheduler.families[ttft].documentation
        assert scheduler.value("spotserve_scheduler_end_to_end_seconds_count") == requests
        gaps = "spotserve_scheduler_inter_token_seconds_count"
        assert scheduler.value(gaps) == total_tokens - requests
        iterations = scheduler.value("spotserve_scheduler_iteration_seconds_count")
        assert iterations >= max(MAX_TOKENS)
        assert scheduler.value("spotserve_scheduler_batch_size_count") == iterations
        # Asynchronous scheduling: most steps went out while the one before them ran.
        sent = "spotserve_scheduler_steps_sent_total"
        assert scheduler.value(sent) == iterations
        assert scheduler.value(sent, sent="while_running") > scheduler.value(
            sent, sent="after_reply"
        )
        assert scheduler.value("spotserve_scheduler_batch_size_sum") == total_tokens
        assert scheduler.value("spotserve_scheduler_overhead_seconds_count") == iterations
        assert scheduler.value("spotserve_scheduler_step_failures_total") == 0
        assert scheduler.value("spotserve_scheduler_executors") == INSTANCES
        assert scheduler.value("spotserve_scheduler_requests_waiting") == 0
        assert scheduler.value("spotserve_scheduler_requests_running") == 0
        assert scheduler.has("spotserve_scheduler_kv_swaps", "spotserve_scheduler_request_moves")

        # -- executors (both instances, summed)
        executors = await eventually_scraped(
            nc,
            SERVICE_EXECUTOR,
            lambda s: s.value("spotserve_executor_kv_blocks_used") == 0,
            "every KV block freed",
            expected=INSTANCES,
        )
        assert executors.value("spotserve_executor_sampled_tokens_total") >= total_tokens
        assert executors.value("spotserve_executor_steps_total", outcome="ok") == iterations
        assert executors.value("spotserve_executor_step_seconds_count") == iterations
        infos = await discover(nc, SERVICE_EXECUTOR, verb="INFO", window_s=0.5)
        blocks = sum(int(info["metadata"]["kv_blocks"]) for info in infos)
        assert executors.value("spotserve_executor_kv_blocks") == blocks
        assert executors.value("spotserve_executor_kv_offloaded_sequences") == 0
        loads = "spotserve_executor_model_load_seconds_count"
        assert executors.value(loads, phase="start", source="disk") == INSTANCES
        assert executors.value("spotserve_executor_transfer_failures_total") == 0
        assert executors.has(
            "spotserve_executor_transfers",
            "spotserve_executor_transfer_bytes",
            "spotserve_executor_kv_swaps",
        )

        # -- monitor
        monitor = await scrape(nc, SERVICE_MONITOR)
        notices = "spotserve_monitor_preempt_notices_total"
        assert monitor.value(notices, source="cli", outcome="new") == 1
        assert monitor.value(notices, source="cli", outcome="duplicate") == 1
        assert monitor.value(notices, source="cli", outcome="rejected") == 1
        assert monitor.value(notices) == 3
        events = "spotserve_monitor_fleet_events_total"
        assert monitor.value(events, kind="joined") == INSTANCES
        assert monitor.value(events, kind="preempt-notice") == 1
        assert monitor.value(events) == INSTANCES + 1
        assert monitor.value("spotserve_monitor_instances", state="running") == INSTANCES - 1
        assert monitor.value("spotserve_monitor_instances", state="preempting") == 1
        assert monitor.value("spotserve_monitor_instances", state="pending") == 0

        # -- planner: a plan for the notice follows (the FLEET stream's 3rd event); every epoch
        # is one this planner published, and the scheduler follows it. (More plans may come at
        # any time, on the arrival rate: planner and scheduler are compared in one poll.)
        notice_plan = await eventually(
            lambda: plan_covering(nc, fleet_seq=INSTANCES + 1), "a plan after the notice"
        )

        async def planner_and_scheduler_agree() -> Scrape | None:
            planner = await scrape(nc, SERVICE_PLANNER)
            epoch = planner.value("spotserve_planner_plan_epoch")
            scheduler = await scrape(nc, SERVICE_SCHEDULER)
            agree = (
                epoch >= notice_plan.epoch
                and epoch == planner.value("spotserve_planner_plans_total")
                and epoch == scheduler.value("spotserve_scheduler_plan_epoch")
            )
            return planner if agree else None

        planner = cast(
            Scrape, await eventually(planner_and_scheduler_agree, "planner and scheduler agree")
        )
        published = planner.value("spotserve_planner_plans_total")
        assert planner.value("spotserve_planner_plans_total", trigger="initial") == 1
        assert planner.value("spotserve_planner_plans_total", trigger="fleet") >= 1
        assert planner.value("spotserve_planner_decision_seconds_count") == published
        assert planner.value("spotserve_planner_parallel_degree", dimension="tensor") == 1
        assert planner.has(
            "spotserve_planner_transfer_bytes",
            "spotserve_planner_jit_decisions",
            "spotserve_planner_needs_on_demand",
        )

        # -- loader (its disk bandwidth is measured once it serves)
        loader = await eventually_scraped(
            nc,
            SERVICE_LOADER,
            lambda s: s.value("spotserve_loader_bandwidth_bytes_per_second", tier="local-disk") > 0,
            "the loader's disk bandwidth",
        )
        errors = "spotserve_loader_fetch_errors_total"
        assert loader.value(errors, reason="not_found") == 1
        assert loader.value(errors) == 1
        assert loader.value("spotserve_loader_fetches_total") == 0
        assert loader.has(
            "spotserve_loader_fetch_seconds",
            "spotserve_loader_load_seconds",
            "spotserve_loader_loaded_bytes",
            "spotserve_loader_host_pool_capacity_bytes",
            "spotserve_loader_bandwidth_bytes_per_second",
        )


# -- units -------------------------------------------------------------------------------------


def test_a_taken_port_falls_back_to_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = start_metrics_server(MetricsSettings(host="127.0.0.1", port=port), "test")
        assert url is not None and url.endswith("/metrics")
        assert f":{port}/" not in url
        assert "python_info" in fetch(url) or "process_" in fetch(url)


def test_metrics_off_serve_nothing() -> None:
    assert start_metrics_server(MetricsSettings(enabled=False), "test") is None


def test_metric_names_follow_the_conventions() -> None:
    for service in SERVICES:
        module = importlib.import_module(f"services.{service}.metrics")
        metrics = [m for m in vars(module).values() if isinstance(m, MetricWrapperBase)]
        assert metrics, service
        for metric in metrics:
            name = metric._name
            assert name.startswith(f"spotserve_{service}_"), name
            assert metric._documentation, name
            assert not {"request_id", "instance_id"} & set(metric._labelnames), name
    for family in REGISTRY.collect():
        if not family.name.startswith("spotserve_"):
            continue
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if "seconds" in family.name:
            assert family.name.endswith("_seconds"), family.name
        if "bytes" in family.name:
            assert family.name.endswith(("_bytes", "_bytes_per_second")), family.name


def test_mlfq_queue_lengths_are_read_when_scraped(tokenizer: TextTokenizer) -> None:
    from services.scheduler.service import observe_gauges

    settings = MlfqSettings(num_queues=3, base_quantum_s=0.01)
    policy = SkipJoinMlfqPolicy(settings, lambda tokens: tokens / 1000)
    held: dict[str, Sequence] = {}
    fake = SimpleNamespace(held=held, executors={}, policy=policy)
    observe_gauges(cast(Any, fake))
    for index, prompt_tokens in enumerate((1, 2, 15, 100)):  # Q0, Q0, Q1, Q2
        request = make_request(prompt_tokens, f"r{index}")
        sequence = Sequence.create(request, cast(Msg, object()), tokenizer, [])
        held[request.request_id] = sequence
        policy.add_request(sequence)
    queue = "spotserve_scheduler_mlfq_queue_length"
    lengths = [REGISTRY.get_sample_value(queue, {"queue": str(q)}) for q in range(3)]
    assert lengths == [2, 1, 1]
    assert REGISTRY.get_sample_value("spotserve_scheduler_requests_held") == 4
    assert REGISTRY.get_sample_value("spotserve_scheduler_requests_waiting") == 4
    assert REGISTRY.get_sample_value("spotserve_scheduler_requests_running") == 0
