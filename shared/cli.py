"""The ``spotserve`` command line."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from nats.aio.client import Client

from shared.bus import clear_cluster_record, connect, resolve_nats_url, write_cluster_record
from shared.config import LogSettings, Settings, spotserve_home
from shared.logging import configure_logging
from shared.security import OPERATOR_USER, init_credentials

if TYPE_CHECKING:
    from shared.cluster import ClusterUrls
    from shared.rpc import Endpoint

app = typer.Typer(help="spotserve: LLM serving on spot instances over NATS.", no_args_is_help=True)
model_app = typer.Typer(help="Create and inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
security_app = typer.Typer(help="NATS users and passwords.", no_args_is_help=True)
app.add_typer(security_app, name="security")

# Bound on each JetStream wait of a model upload (an ack of a chunk, a purge).
PUSH_TIMEOUT_S = 60.0
# `spotserve up` looks at its services this often.
SUPERVISE_POLL_S = 0.5
# `spotserve generate`: the first token waits for the queue and the prefill.
FIRST_TOKEN_TIMEOUT_S = 300.0
# `spotserve fleet ...`: the monitor answers at once unless JetStream is slow.
FLEET_TIMEOUT_S = 10.0
# `spotserve health`: to reach NATS, then to get an answer.
HEALTH_TIMEOUT_S = 5.0

NatsUrlOption = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        help="NATS server URL (default: SPOTSERVE_NATS__URL, else the running `spotserve up`).",
    ),
]


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log NATS events.")] = False,
) -> None:
    # The CLI talks to people: only problems are logged unless asked for more.
    configure_logging(LogSettings(level="info" if verbose else "warning"), "cli")


async def _connect_or_exit(nats_url: str | None) -> Client:
    """The cluster's NATS connection, or exit 2 with a hint when there is none."""
    from shared.bus import NatsUnavailableError

    settings = Settings()
    url = resolve_nats_url(settings.nats, nats_url)
    try:
        # The operator's tool: as `operator` of a cluster `spotserve up` started here.
        return await connect(
            url, settings.nats, name="spotserve-cli", deadline_s=5.0, default_user=OPERATOR_USER
        )
    except NatsUnavailableError as exc:
        hint = "" if nats_url else "; is `spotserve up` running? (or pass --nats-url)"
        _echo_error(f"{exc}{hint}")
        raise typer.Exit(2) from None


def _echo_error(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


@model_app.command("init")
def model_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the HF model directory.")],
    size: Annotated[str, typer.Option(help="tiny (tests) or small (~100M, benchmarks).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite an existing model.")] = False,
) -> None:
    """Write the embedded default model: a Llama HF directory with seeded random weights."""
    from shared.model.checkpoint import MODEL_SIZES, init_model

    if size not in MODEL_SIZES:
        _echo_error(f"unknown size {size!r}; choose from {sorted(MODEL_SIZES)}")
        raise typer.Exit(2)
    try:
        path = init_model(directory, size=size, seed=seed, overwrite=force)
    except FileExistsError as exc:
        _echo_error(str(exc))
        raise typer.Exit(1) from None
    typer.echo(f"wrote {size} model (seed {seed}) to {path}")


@app.command()
def profile(
    model: Annotated[Path | None, typer.Option(help="HF model dir (default: embedded).")] = None,
    size: Annotated[str, typer.Option(help="Embedded model size when --model is not given.")] = (
        "tiny"
    ),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: auto).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the profile JSON.")] = None,
    tensor: Annotated[
        list[int] | None,
        typer.Option(help="Tensor-parallel degrees for the planner's profile (repeatable)."),
    ] = None,
) -> None:
    """Measure prefill time by prompt length and decode time by batch size on this machine
    (the scheduler's profile), and per-layer times by micro-batch and tensor-parallel degree
    (the planner's; M > 1 runs M ranks here, as an executor of M devices does)."""
    from shared.model.checkpoint import default_model_dir, ensure_model
    from shared.model.profile import (
        default_parallel_profile_path,
        default_profile_path,
        measure_parallel_profile,
        measure_profile,
        save_parallel_profile,
        save_profile,
    )

    model_dir = model or ensure_model(default_model_dir(size), size)  # type: ignore[arg-type]
    measured = measure_profile(model_dir, device=device)
    path = out or default_profile_path(model_dir, measured.device)
    save_profile(measured, path)
    degrees = tuple(tensor or [1])
    if any(degree < 1 for degree in degrees):
        raise typer.BadParameter(f"tensor-parallel degrees must be >= 1, got {list(degrees)}")
    parallel = measure_parallel_profile(model_dir, device=device, tensor_degrees=degrees)
    parallel_path = (
        path.with_name(path.stem + "-parallel.json")
        if out
        else default_parallel_profile_path(model_dir, parallel.device)
    )
    save_parallel_profile(parallel, parallel_path)
    typer.echo(f"profile of {model_dir} on {measured.device}:")
    typer.echo(
        "  prompt tokens -> prefill ms: "
        + ", ".join(f"{n}: {s * 1000:.1f}" for n, s in measured.prefill)
    )
    typer.echo(
        "  batch size -> decode ms/iteration: "
        + ", ".join(f"{b}: {s * 1000:.1f}" for b, s in measured.decode)
    )
    for degree in parallel.tensor_degrees():
        typer.echo(
            f"  M={degree}, per layer ({parallel.num_layers} layers), micro-batch -> prefill of"
            f" {parallel.prefill_tokens} tokens / decode ms: "
            + ", ".join(
                f"{b}: {p * 1000:.2f} / {d * 1000:.3f}"
                for (b, p), (_, d) in zip(
                    parallel.prefill_s[degree], parallel.decode_s[degree], strict=True
                )
            )
        )
    typer.echo(f"wrote {path} and {parallel_path}")


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="HF model directory (safetensors or .bin).")],
    destination: Annotated[Path, typer.Argument(help="Where to write the converted model.")],
    force: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
    tp: Annotated[
        int,
        typer.Option(
            "--tp",
            min=1,
            help="Tensor-parallel degree M: split q/k/v/gate/up/lm_head on dim 0 and o/down on"
            " dim 1 into M shards, each shard's layers stored contiguously (1: no split).",
        ),
    ] = 1,
) -> None:
    """Convert an HF model to spotserve's loading-optimized format.

    Tensors are stored in execution order so that a pipeline stage (a layer range) and, with
    --tp M, one tensor-parallel shard each load as one or two contiguous byte ranges.
    """
    from shared.loading.format import CheckpointError
    from shared.loading.format import convert as convert_checkpoint

    with typer.progressbar(length=100, label="converting", file=sys.stderr) as bar:
        shown = [0]

        def progress(done: int, total: int) -> None:
            percent = done * 100 // max(total, 1)
            bar.update(percent - shown[0])
            shown[0] = percent

        try:
            index = convert_checkpoint(
                source, destination, force=force, progress=progress, tp_degree=tp
            )
        except (CheckpointError, FileExistsError, OSError) as exc:
            _echo_error(str(exc))
            raise typer.Exit(1) from None
    size = sum(part.nbytes for part in index.partitions)
    shards = f", {index.tp_degree} tensor-parallel shards" if index.tp_degree > 1 else ""
    typer.echo(
        f"wrote {len(index.tensors)} tensors ({size / 1e6:.1f} MB in"
        f" {len(index.partitions)} partition(s){shards}) to {destination}"
    )


@model_app.command("push")
def model_push(
    directory: Annotated[Path, typer.Argument(help="HF model dir or a converted one.")],
    name: Annotated[str | None, typer.Option(help="Name in the store (default: dir name).")] = None,
    nats_url: NatsUrlOption = None,
) -> None:
    """Upload a model to the remote store (converting it first if needed)."""
    try:
        sent = asyncio.run(_push(directory, name or directory.name, nats_url))
    except (ValueError, OSError) as exc:
        _echo_error(str(exc))
        raise typer.Exit(1) from None
    typer.echo(f"pushed {name or directory.name} ({sent / 1e6:.1f} MB)")


async def _push(directory: Path, name: str, nats_url: str | None) -> int:
    from shared.loading.format import CheckpointError
    from shared.loading.store import push_model

    nc = await _connect_or_exit(nats_url)
    try:
        return await push_model(nc, nc.jetstream(timeout=PUSH_TIMEOUT_S), directory, name)
    except CheckpointError as exc:
        _echo_error(str(exc))
        raise typer.Exit(1) from None
    finally:
        await nc.close()


# `spotserve up` restarts services that die, at most this often before giving up.
MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0


def _echo_urls(urls: ClusterUrls) -> None:
    for url in urls.gateway:
        typer.echo(f"gateway: {url}  (OpenAI-compatible: {url}/v1)")
    for service, metrics_urls in urls.metrics.items():
        for url in metrics_urls:
            typer.echo(f"metrics {service}: {url}")


def default_credentials_dir() -> Path:
    return spotserve_home() / "credentials"


def _default_state_dir() -> Path:
    return spotserve_home() / "cluster"


@app.command()
def up(
    instances: Annotated[int, typer.Option(min=1, help="Executor instances to start.")] = 1,
    model: Annotated[Path | None, typer.Option(help="HF Llama-family model directory.")] = None,
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="Use this NATS server instead of starting one.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="JetStream store and logs (default ~/.cache/spotserve).")
    ] = None,
    gateway_port: Annotated[
        int | None,
        typer.Option(min=0, help="The HTTP gateway port (default: SPOTSERVE_GATEWAY__PORT, 8000)"),
    ] = None,
    metrics_port: Annotated[
        int,
        typer.Option(min=0, help="Metrics ports: one per service from this one up (0: any free)."),
    ] = 9464,
) -> None:
    """Start the cluster (embedded NATS unless --nats-url) and serve until Ctrl-C."""
    from shared.cluster import ClusterError, LocalCluster

    settings = Settings()
    # An embedded server authenticates every service and client with random passwords drawn
    # at the first start and kept (0600) under $SPOTSERVE_HOME/credentials.
    credentials = None
    if nats_url is None and settings.nats.auth:
        credentials = init_credentials(settings.nats.credentials_dir or default_credentials_dir())
    cluster = LocalCluster(
        state_dir or _default_state_dir(),
        instances=instances,
        model_dir=model,
        nats_url=nats_url,
        credentials=credentials,
        metrics_port=metrics_port,
        gateway_port=settings.gateway.port if gateway_port is None else gateway_port,
    )
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    # SIGINT too: a shell may start us with SIGINT ignored (background job), Ctrl-C must work.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    typer.echo(f"starting spotserve ({instances} executor instance(s)); logs in {cluster.log_dir}")
    try:
        cluster.start()
    except ClusterError as exc:
        _echo_error(str(exc))
        raise typer.Exit(1) from None
    if stop_requested:
        cluster.stop()
        raise typer.Exit(130)
    write_cluster_record(cluster.nats_url, credentials.directory if credentials else None)
    typer.echo(f"spotserve is up: nats {cluster.nats_url}; Ctrl-C stops it")
    _echo_urls(asyncio.run(cluster.urls()))
    restarts: list[float] = []
    while not stop_requested:
        # A service that died is started again (its state is in JetStream); one that keeps
        # dying stops the cluster instead of looping.
        for service in cluster.supervise():
            _echo_error(f"{service.name} exited and was restarted; see {service.log_path}")
            restarts.append(time.monotonic())
        restarts = [at for at in restarts if at > time.monotonic() - RESTART_WINDOW_S]
        if len(restarts) > MAX_RESTARTS:
            _echo_error(f"more than {MAX_RESTARTS} restarts in {RESTART_WINDOW_S:.0f} s")
            stop_requested = True
        time.sleep(SUPERVISE_POLL_S)
    typer.echo("stopping spotserve ...")
    cluster.stop()
    clear_cluster_record()
    typer.echo("stopped")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Wait for the whole reply.")
    ] = False,
    ignore_eos: Annotated[bool, typer.Option(help="Generate exactly max_tokens.")] = False,
    nats_url: NatsUrlOption = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the first token.")
    ] = FIRST_TOKEN_TIMEOUT_S,
) -> None:
    """Send one request and print the text as it is generated."""
    options: dict[str, object] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop or None,
        "ignore_eos": ignore_eos or None,
    }
    try:
        asyncio.run(_generate(prompt, options, not no_stream, nats_url, timeout))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _generate(
    prompt: str,
    options: dict[str, object],
    stream: bool,
    nats_url: str | None,
    first_token_timeout_s: float,
) -> None:
    from shared.client import GenerateError, SpotserveClient

    nc = await _connect_or_exit(nats_url)
    client = SpotserveClient(nc, first_chunk_timeout_s=first_token_timeout_s)
    started = time.perf_counter()
    try:
        if stream:
            usage = None
            async for chunk in client.stream(prompt, **options):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                usage, finish = chunk.usage, chunk.finish_reason
            sys.stdout.write("\n")
        else:
            result = await client.complete(prompt, **options)
            typer.echo(result.text)
            usage, finish = result.usage, result.finish_reason
    except GenerateError as exc:
        _echo_error(str(exc))
        raise typer.Exit(1) from None
    except TimeoutError:
        _echo_error(f"no answer within {first_token_timeout_s:.0f} s")
        raise typer.Exit(1) from None
    finally:
        await nc.close()
    elapsed = time.perf_counter() - started
    if usage is not None:
        typer.secho(
            f"[{finish}; {usage.prompt_tokens} prompt + {usage.completion_tokens} completion"
            f" tokens; {elapsed:.2f} s]",
            err=True,
            dim=True,
        )


DEMO_PROMPTS = (
    "The spot instance was preempted, so",
    "Once upon a time",
    "NATS subjects are",
    "Serving large language models cheaply means",
)


@app.command()
def demo(
    instances: Annotated[int, typer.Option(min=1, help="Executor instances.")] = 1,
    model: Annotated[
        Path | None, typer.Option(help="HF model dir (default: embedded tiny).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 32,
) -> None:
    """Start a throwaway cluster, send a few requests, print text and latency, stop."""
    from shared.cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="spotserve-demo-") as state:
        typer.echo(f"starting a local cluster ({instances} executor instance(s)) ...")
        started = time.perf_counter()
        with LocalCluster(Path(state), instances=instances, model_dir=model) as cluster:
            typer.echo(
                f"cluster ready in {time.perf_counter() - started:.1f} s ({cluster.nats_url})"
            )
            asyncio.run(_demo_requests(cluster.nats_url, max_tokens))
            typer.echo("stopping the cluster ...")
    typer.echo("done")


async def _demo_requests(nats_url: str, max_tokens: int) -> None:
    from shared.client import SpotserveClient

    nc = await connect(nats_url, Settings().nats, name="spotserve-demo")
    client = SpotserveClient(nc)
    try:
        completions = await asyncio.gather(
            *(
                client.generate(prompt, max_tokens=max_tokens, temperature=0.8, seed=index)
                for index, prompt in enumerate(DEMO_PROMPTS)
            )
        )
    finally:
        await nc.close()
    for prompt, completion in zip(DEMO_PROMPTS, completions, strict=True):
        typer.echo(f"\n> {prompt}")
        typer.echo(f"{completion.text!r}")
        ttft = completion.ttft_s or 0.0
        typer.echo(
            f"  [{completion.finish_reason}; {completion.completion_tokens} tokens;"
            f" first token {ttft * 1000:.0f} ms; total {completion.latency_s * 1000:.0f} ms]"
        )


# -- fleet -------------------------------------------------------------------------------------

fleet_app = typer.Typer(
    help="Watch and change the fleet of executor instances (through the monitor).",
    no_args_is_help=True,
)
app.add_typer(fleet_app, name="fleet")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
FleetTimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the monitor's answer.")
]


async def _fleet_request(
    endpoint: Endpoint[Any, Any], body: dict[str, object], nats_url: str | None, timeout_s: float
) -> tuple[dict[str, str], dict[str, object]]:
    """One JSON request to the monitor: (reply headers, reply body); exits on any failure
    (2: no NATS, no monitor or no answer in time; 1: the monitor refused the request). The
    body goes out as given: the monitor validates it and says what is wrong."""
    import json

    from shared.codec import content_type_header
    from shared.rpc import NoResponders, RpcTimeout, error_of, request_raw

    subject = endpoint.subject_for()
    data = json.dumps(body).encode()
    nc = await _connect_or_exit(nats_url)
    try:
        reply = await request_raw(nc, subject, data, timeout_s, content_type_header("json"))
    except NoResponders:
        _echo_error(f"no monitor answers on {subject}; is the cluster up?")
        raise typer.Exit(2) from None
    except RpcTimeout:
        _echo_error(f"the monitor did not answer within {timeout_s:g} s")
        raise typer.Exit(2) from None
    finally:
        await nc.close()
    error = error_of(reply.headers)
    if error is not None:
        _echo_error(f"{error.message} (code {error.code})")
        raise typer.Exit(1)
    return dict(reply.headers or {}), json.loads(reply.data)


def _print_json(value: object) -> None:
    import json

    typer.echo(json.dumps(value, indent=2))


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 10) % 10}"


@fleet_app.command("preempt")
def fleet_preempt(
    instance: Annotated[str, typer.Argument(help="Instance id (see `spotserve fleet status`).")],
    grace: Annotated[
        float | None,
        typer.Option(
            "--grace", min=0, max=3600, help="Seconds until it is gone (default: the monitor's)."
        ),
    ] = None,
    json_output: JsonOption = False,
    nats_url: NatsUrlOption = None,
    timeout: FleetTimeoutOption = FLEET_TIMEOUT_S,
) -> None:
    """Announce that INSTANCE will be taken away after a grace period, as a cloud would."""
    from shared.messages import NOTICE_OUTCOME_HEADER
    from shared.rpc import NOTICE_ENDPOINT

    body: dict[str, object] = {"instance_id": instance, "source": "cli"}
    if grace is not None:
        body["grace_s"] = float(grace)
    headers, event = asyncio.run(_fleet_request(NOTICE_ENDPOINT, body, nats_url, timeout))
    outcome = headers.get(NOTICE_OUTCOME_HEADER, "new")
    if json_output:
        _print_json({"outcome": outcome, "event": event})
        return
    if outcome == "cancelled":
        typer.echo(f"{instance} had been added but not joined yet: cancelled (process stopped)")
        return
    deadline = float(event["deadline"])  # type: ignore[arg-type]
    said = {"new": "preempt notice", "updated": "earlier deadline", "duplicate": "already noticed"}
    typer.echo(
        f"{instance}: {said.get(outcome, outcome)}; gone at {_clock(deadline)}"
        f" (in {max(0.0, deadline - time.time()):.1f} s)"
    )


@fleet_app.command("add")
def fleet_add(
    count: Annotated[int, typer.Option("--count", min=1, max=64, help="Instances to add.")] = 1,
    price_class: Annotated[str, typer.Option("--price-class", help="spot or on-demand.")] = "spot",
    json_output: JsonOption = False,
    nats_url: NatsUrlOption = None,
    timeout: FleetTimeoutOption = FLEET_TIMEOUT_S,
) -> None:
    """Start new executor instances (the local provider: new processes on this machine)."""
    from shared.rpc import ADD_ENDPOINT

    if price_class not in ("spot", "on-demand"):
        _echo_error(f"unknown price class {price_class!r}; choose spot or on-demand")
        raise typer.Exit(2)
    body = {"count": count, "price_class": price_class}
    _, reply = asyncio.run(_fleet_request(ADD_ENDPOINT, body, nats_url, timeout))
    if json_output:
        _print_json(reply)
        return
    for instance_id in reply["instance_ids"]:  # type: ignore[attr-defined]
        typer.echo(f"starting {instance_id} (it joins once its model is loaded)")


@fleet_app.command("status")
def fleet_status(
    json_output: JsonOption = False,
    nats_url: NatsUrlOption = None,
    timeout: FleetTimeoutOption = FLEET_TIMEOUT_S,
) -> None:
    """The instances the monitor knows: alive, preempting (with deadline), pending."""
    from shared.messages import FleetStatus
    from shared.rpc import STATUS_ENDPOINT

    _, reply = asyncio.run(_fleet_request(STATUS_ENDPOINT, {}, nats_url, timeout))
    if json_output:
        _print_json(reply)
        return
    status = FleetStatus.model_validate(reply)
    if not status.instances and not status.pending:
        typer.echo("no instances")
        return
    typer.echo(
        f"{'INSTANCE':<24} {'NODE':<14} {'DEVICE':<10} {'MEMORY':>9} {'PRICE':<14}"
        f" {'STATE':<11} {'DEADLINE':<11} LEASE"
    )
    for item in status.instances:
        record = item.record
        price = f"{record.price_class} ${record.price_per_hour:.2f}/h"
        deadline = _clock(item.deadline) if item.deadline is not None else "-"
        typer.echo(
            f"{record.instance_id:<24} {record.node:<14}"
            f" {f'{record.devices}x{record.device_kind}':<10}"
            f" {record.device_memory_bytes / 2**30:>7.1f}Gi {price:<14} {item.state:<11}"
            f" {deadline:<11} {item.lease_left_s:.1f}s"
        )
    for instance_id in status.pending:
        typer.echo(f"{instance_id:<24} (starting)")


@security_app.command("init")
def security_init(
    directory: Annotated[Path, typer.Argument(help="Where the password files go (0700).")],
    nats_config: Annotated[
        Path | None,
        typer.Option(help="Also write a whole nats-server config with these users here."),
    ] = None,
    listen: Annotated[str, typer.Option(help="The server's client address.")] = "0.0.0.0:4222",
    store_dir: Annotated[Path, typer.Option(help="The server's JetStream store.")] = Path(
        "/data/jetstream"
    ),
    http: Annotated[
        str | None, typer.Option(help="The server's monitoring address (for /healthz).")
    ] = None,
    user: Annotated[
        list[str] | None, typer.Option(help="Extra client users (client-NAME), repeatable.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Server certificate: the config requires TLS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key.")] = None,
) -> None:
    """Random passwords for every service, `client` and `operator` (kept when they exist:
    safe to run at every start), <user>.password files with mode 0600, and the server's
    users and permissions (nats-auth.conf, or a whole config with --nats-config)."""
    from shared.natsserver import MAX_PAYLOAD_BYTES
    from shared.security import ALL_USERS, server_config, write_server_config

    extra = tuple(user or [])
    bad = [name for name in extra if not name.startswith("client-")]
    if bad:
        raise typer.BadParameter(f"extra users must be named client-NAME, got {bad}")
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give both --tls-cert and --tls-key, or neither")
    credentials = init_credentials(directory, (*ALL_USERS, *extra))
    if nats_config is not None:
        tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        text = server_config(credentials, listen, store_dir, MAX_PAYLOAD_BYTES, http, tls)
        write_server_config(nats_config, text)
    typer.echo(f"credentials of {len(credentials.passwords)} users in {directory}")


@app.command()
def health(
    service: Annotated[str, typer.Argument(help="admission, scheduler, planner, monitor, ...")],
    this_node: Annotated[
        bool, typer.Option("--this-node", help="Only instances on this host count.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to reach NATS, then to get an answer.")
    ] = HEALTH_TIMEOUT_S,
) -> None:
    """Exit 0 when SERVICE answers $SRV discovery, 1 when not, 2 without NATS (health checks)."""
    from shared.health import check

    try:
        status, message = check(service, this_node=this_node, timeout_s=timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(message, err=status != 0)
    raise typer.Exit(status)


if __name__ == "__main__":
    app()
