"""The OpenAI-compatible HTTP gateway against a running, authenticated cluster: the official
``openai`` client (streaming and not), plain HTTP for the error cases, and its metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.backend import ApiError, Backend
from services.gateway.chat import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError
from shared.client import SpotserveClient
from shared.cluster import ClusterUrls, LocalCluster
from shared.config import GatewaySettings
from shared.model.tokenizer import TextTokenizer
from shared.natsserver import EmbeddedNatsServer, free_port
from shared.security import init_credentials
from tests.helpers import connected, eventually

MODEL = "tiny"  # the model directory's name
PROMPT = "The quick brown fox"
# Small, so that the overload test can exceed it while the other tests stay well below.
MAX_QUEUED = 16


@pytest.fixture(scope="module")
def gateway_cluster(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("gateway-cluster")
    credentials = init_credentials(state / "credentials")
    cluster = LocalCluster(
        state,
        instances=1,
        model_dir=tiny_model_dir,
        credentials=credentials,
        env={"SPOTSERVE_ADMISSION__MAX_QUEUED_REQUESTS": str(MAX_QUEUED)},
    )
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def urls(gateway_cluster: LocalCluster) -> ClusterUrls:
    return asyncio.run(gateway_cluster.urls())


@pytest.fixture(scope="module")
def base_url(urls: ClusterUrls) -> str:
    assert len(urls.gateway) == 1, urls
    return urls.gateway[0]


@pytest.fixture
def api(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


async def nats_reference(cluster: LocalCluster, prompt: str | list[int], **options: Any) -> Any:
    """The same request straight over NATS (the system's own answer)."""
    async with connected(cluster) as nc:
        return await SpotserveClient(nc).generate(prompt, **options)


async def test_models_lists_the_served_model(api: openai.AsyncOpenAI) -> None:
    models = await api.models.list()
    assert [model.id for model in models.data] == [MODEL]
    assert (await api.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError):
        await api.models.retrieve("no-such-model")


async def test_completion_equals_the_nats_answer_streamed_or_not(
    api: openai.AsyncOpenAI, gateway_cluster: LocalCluster
) -> None:
    reference = await nats_reference(
        gateway_cluster, PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True
    )
    options: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20}
    extra = {"ignore_eos": True}
    completion = await api.completions.create(**options, temperature=0, extra_body=extra)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.text == reference.text
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 20
    assert completion.usage.prompt_tokens == reference.prompt_tokens
    assert completion.usage.total_tokens == 20 + reference.prompt_tokens

    stream = await api.completions.create(
        **options,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert len({c.id for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


async def test_token_id_prompts_batches_echo_and_n(
    api: openai.AsyncOpenAI, gateway_cluster: LocalCluster, tokenizer: TextTokenizer
) -> None:
    ids = tokenizer.encode(PROMPT)
    reference = await nats_reference(gateway_cluster, ids, max_tokens=6, temperature=0.0)
    by_ids = await api.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == reference.text
    echoed = await api.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith(PROMPT)

    batched: dict[str, Any] = {
        "model": MODEL,
        "prompt": [PROMPT, "Another prompt"],
        "max_tokens": 3,
        "n": 2,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    batch = await api.completions.create(**batched)
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]
    assert batch.usage is not None and batch.usage.completion_tokens == 4 * 3
    # Each prompt counts once (n does not multiply it), as OpenAI counts it.
    expected_prompt = len(tokenizer.encode(PROMPT)) + len(tokenizer.encode("Another prompt"))
    assert batch.usage.prompt_tokens == expected_prompt
    again = await api.completions.create(**batched)
    assert [c.text for c in again.choices] == [c.text for c in batch.choices]  # seeded


async def test_chat_uses_the_template_streamed_or_not(
    api: openai.AsyncOpenAI, gateway_cluster: LocalCluster, tiny_model_dir: Path
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something."},
    ]
    template = ChatTemplate.from_model_dir(tiny_model_dir)
    assert template.is_default  # the embedded model has none: the gateway's default
    tokenizer = TextTokenizer.from_model_dir(tiny_model_dir)
    prompt_ids = tokenizer.encode(template.render(messages), add_special_tokens=False)
    assert prompt_ids[0] == tokenizer.bos_token_id  # the template places BOS, once
    reference = await nats_reference(gateway_cluster, prompt_ids, max_tokens=12, temperature=0.0)

    chat = await api.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat.object == "chat.completion"
    [choice] = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == reference.text
    assert chat.usage is not None and chat.usage.prompt_tokens == len(prompt_ids)

    stream = await api.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


async def test_stop_sequences_end_with_finish_reason_stop(api: openai.AsyncOpenAI) -> None:
    free = await api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text
    stopped = await api.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def post(base_url: str, path: str, body: Any, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{base_url}{path}", content=content, headers=headers, timeout=120)


def assert_openai_error(response: httpx.Response, status: int, **fields: Any) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    for key, value in fields.items():
        assert error[key] == value, error
    return error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "mystery_option": 1}, None),
        ("/v1/completions", {"model": MODEL, "prompt": []}, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 100}, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, None),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "x"}]}, None),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{}]},
            None,
        ),
    ],
)
def test_bad_requests_are_400_in_openai_shape(
    base_url: str, path: str, body: dict[str, Any], param: str | None
) -> None:
    error = assert_openai_error(post(base_url, path, body), 400, type="invalid_request_error")
    if param is not None:
        assert error["param"] == param


def test_malformed_bodies_unknown_models_and_routes(base_url: str) -> None:
    assert_openai_error(post(base_url, "/v1/completions", None, raw=b"{not json"), 400)
    assert_openai_error(post(base_url, "/v1/completions", [1, 2]), 400)
    assert_openai_error(
        post(base_url, "/v1/completions", {"model": "gpt-4", "prompt": "x"}),
        404,
        param="model",
        code="model_not_found",
    )
    assert_openai_error(httpx.get(f"{base_url}/v1/nothing-here"), 404, type="not_found_error")
    assert_openai_error(httpx.get(f"{base_url}/v1/completions"), 405)


def test_context_overflow_is_a_clear_400(base_url: str, tokenizer: TextTokenizer) -> None:
    context = tokenizer.context_length
    long_prompt = [5] * (context + 10)
    error = assert_openai_error(
        post(base_url, "/v1/completions", {"model": MODEL, "prompt": long_prompt}), 400
    )
    assert error["code"] == "context_length_exceeded"
    assert str(context) in error["message"]
    too_many = post(
        base_url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": context * 2}
    )
    assert "max_tokens" in assert_openai_error(too_many, 400)["message"]


async def test_overload_is_429_with_retry_after(base_url: str) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=300) as http:
        responses = await asyncio.gather(
            *(http.post(f"{base_url}/v1/completions", json=body) for _ in range(3 * MAX_QUEUED))
        )
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert_openai_error(refused[0], 429, type="rate_limit_error", code="rate_limit_exceeded")
    assert int(refused[0].headers["Retry-After"]) >= 1
    # What was accepted completed whole.
    for response in responses:
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == 200


async def test_a_client_that_goes_away_mid_stream_leaves_the_gateway_serving(
    base_url: str, api: openai.AsyncOpenAI
) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "stream": True}
    async with (
        httpx.AsyncClient(timeout=120) as http,
        http.stream("POST", f"{base_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: ")
    # The client hung up; the gateway stops streaming it and serves the next request.
    completion = await api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert completion.choices[0].finish_reason in ("stop", "length")

    def in_flight() -> bool:
        samples = scrape(gateway_metrics_url(base_url))
        return (
            samples.get(("spotserve_gateway_choices_in_flight", ())) == 0.0
            and samples.get(("spotserve_gateway_requests_in_flight", ())) == 0.0
        )

    await eventually(lambda: asyncio.to_thread(in_flight), "no choice in flight", 60)


def health(base_url: str) -> httpx.Response:
    return httpx.get(f"{base_url}/health", timeout=30)


def test_health_is_ok_while_the_cluster_serves(base_url: str) -> None:
    response = health(base_url)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


# -- metrics -------------------------------------------------------------------------------------

_METRICS_URLS: dict[str, str] = {}


def gateway_metrics_url(base_url: str) -> str:
    return _METRICS_URLS[base_url]


@pytest.fixture(scope="module", autouse=True)
def _remember_metrics_url(urls: ClusterUrls, base_url: str) -> None:
    [url] = urls.metrics["gateway"]
    _METRICS_URLS[base_url] = url


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_gateway_metrics_count_the_traffic(
    base_url: str, api: openai.AsyncOpenAI, urls: ClusterUrls
) -> None:
    url = gateway_metrics_url(base_url)
    route = (("route", "/v1/completions"), ("status", "200"))
    before = await asyncio.to_thread(scrape, url)
    for _ in range(3):
        await api.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True}
        )
    with pytest.raises(openai.BadRequestError):
        await api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=9)
    after = await asyncio.to_thread(scrape, url)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("spotserve_gateway_http_requests_total", route) == 3
    bad = (("route", "/v1/completions"), ("status", "400"))
    assert delta("spotserve_gateway_http_requests_total", bad) == 1
    assert delta("spotserve_gateway_generated_tokens_total") == 15
    assert delta("spotserve_gateway_choices_total", (("finish_reason", "length"),)) == 3
    assert delta("spotserve_gateway_time_to_first_token_seconds_count") == 3
    assert delta("spotserve_gateway_end_to_end_seconds_count") == 3
    assert delta("spotserve_gateway_inter_token_seconds_count") >= 3  # several chunks each
    # Every service serves its own metrics.
    assert {"admission", "scheduler", "executor", "planner", "monitor", "loader"} <= set(
        urls.metrics
    )


# -- a gateway without a cluster behind it -------------------------------------------------------


@pytest.fixture
def lone_nats(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path / "js", log_file=tmp_path / "nats.log") as server:
        yield server


def start_service(module: str, nats_url: str, model_dir: Path, log: Path, **env: str):
    environment = {
        **os.environ,
        "SPOTSERVE_NATS__URL": nats_url,
        "SPOTSERVE_MODEL__PATH": str(model_dir),
        "SPOTSERVE_METRICS__PORT": "0",
        **env,
    }
    with open(log, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", module], env=environment, stdout=log_file, stderr=log_file
        )


async def test_without_capacity_requests_are_503(
    lone_nats: EmbeddedNatsServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    gateway = start_service(
        "services.gateway",
        lone_nats.url,
        tiny_model_dir,
        tmp_path / "gateway.log",
        SPOTSERVE_GATEWAY__PORT=str(port),
    )
    monitor = None
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    try:

        async def answers() -> bool:
            try:
                await asyncio.to_thread(health, base_url)
            except httpx.TransportError:
                return False
            return True

        await eventually(answers, "the gateway to listen", 120)
        # Nobody serves generate: 503, and /health says why.
        no_admission = await asyncio.to_thread(post, base_url, "/v1/completions", body)
        assert_openai_error(no_admission, 503)
        unhealthy = await asyncio.to_thread(health, base_url)
        assert unhealthy.status_code == 503 and "admission" in unhealthy.json()["reason"]
        # A monitor whose fleet has no running instance: 503 no capacity, at once.
        monitor = start_service(
            "services.monitor", lone_nats.url, tiny_model_dir, tmp_path / "monitor.log"
        )

        async def no_capacity() -> bool:
            response = await asyncio.to_thread(post, base_url, "/v1/completions", body)
            return response.status_code == 503 and response.json()["error"]["code"] == "no_capacity"

        await eventually(no_capacity, "503 no_capacity", 120)
    finally:
        for process in (gateway, monitor):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    assert gateway.returncode == 0, (tmp_path / "gateway.log").read_text()[-2000:]


def test_an_api_key_guards_the_api(
    lone_nats: EmbeddedNatsServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret-key\n")
    gateway = start_service(
        "services.gateway",
        lone_nats.url,
        tiny_model_dir,
        tmp_path / "gateway.log",
        SPOTSERVE_GATEWAY__PORT=str(port),
        SPOTSERVE_GATEWAY__API_KEY_FILE=str(key_file),
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health(base_url)
                break
            except httpx.TransportError:
                assert gateway.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
            assert_openai_error(refused, 401, code="invalid_api_key")
        allowed = httpx.get(
            f"{base_url}/v1/models", headers={"Authorization": "Bearer s3cret-key"}, timeout=30
        )
        assert allowed.status_code == 200 and allowed.json()["data"][0]["id"] == MODEL
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


def test_the_gateway_bounds_its_concurrent_requests() -> None:
    backend = Backend(cast(Client, None), GatewaySettings(max_concurrent_requests=2))
    first, second = backend.take_slot(), backend.take_slot()
    with pytest.raises(ApiError) as refused:
        backend.take_slot()
    assert refused.value.status == 429 and refused.value.retry_after_s
    first()
    first()  # giving a slot back twice frees it once
    assert backend.active_requests == 1
    backend.take_slot()
    second()
    assert backend.active_requests == 1


# -- the chat template ---------------------------------------------------------------------------

LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def with_template(model_dir: Path, destination: Path, template: str) -> Path:
    """A copy of the model's tokenizer files with a chat template in tokenizer_config.json."""
    destination.mkdir()
    for name in ("tokenizer.json", "config.json", "special_tokens_map.json"):
        (destination / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (destination / "tokenizer_config.json").write_text(json.dumps(config))
    return destination


def test_the_model_template_renders_as_transformers_does(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    model_dir = with_template(tiny_model_dir, tmp_path / "templated", LLAMA3_STYLE)
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hello — ünïcode"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again?"},
    ]
    ours = ChatTemplate.from_model_dir(model_dir)
    assert not ours.is_default
    reference = AutoTokenizer.from_pretrained(model_dir)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.render(messages) == expected
    tokenizer = TextTokenizer.from_model_dir(model_dir)
    expected_ids = reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True
    )
    if not isinstance(expected_ids, list):  # newer transformers return a BatchEncoding
        expected_ids = expected_ids["input_ids"]
    assert tokenizer.encode(ours.render(messages), add_special_tokens=False) == list(expected_ids)


def test_template_errors_and_the_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = with_template(tiny_model_dir, tmp_path / "templated", LLAMA3_STYLE)
    with pytest.raises(ChatTemplateError, match="unknown role developer"):
        ChatTemplate.from_model_dir(model_dir).render([{"role": "developer", "content": "x"}])
    default = ChatTemplate(DEFAULT_TEMPLATE, {"bos_token": "<s>"}, is_default=True)
    rendered = default.render([{"role": "user", "content": "hi"}])
    assert rendered == "<s>user: hi\nassistant:"
