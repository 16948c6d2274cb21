"""``spotserve-loadgen`` (also ``python -m loadgen``): replay traces against a cluster, compare
reports. See the README's "Replaying traces" section."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from loadgen.replay import Replayer, ReplayError, ReplayOptions, default_out_dir, stderr_progress
from loadgen.report import Prices, compare_main, markdown_table, summarize, write_plots
from loadgen.traces import TraceError, arrivals_from_spec, read_fleet_trace
from shared.config import NatsSettings, Settings
from shared.messages import ServingMode

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
POLICIES = get_args(ServingMode)


@app.command()
def replay(
    arrivals: Annotated[
        str,
        typer.Option(
            help="poisson:RATE, gamma:RATE:CV (req/s of trace time), or a file: per-minute rate"
            " list, Azure LLM inference CSV, BurstGPT CSV."
        ),
    ],
    fleet: Annotated[
        Path | None,
        typer.Option(help="Spot availability trace: t_ms,add|remove,node CSV or SpotServe JSONL."),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(help="spotserve | reroute | restart | ondemand (repeat: run each in turn)."),
    ] = None,
    time_scale: Annotated[
        float, typer.Option(help="Trace seconds -> wall seconds (0.05: 20 min in 1 min).")
    ] = 1.0,
    duration: Annotated[
        float | None, typer.Option(help="Trace seconds to replay (default: the fleet trace's).")
    ] = None,
    max_requests: Annotated[int | None, typer.Option(help="Stop after this many requests.")] = None,
    input_tokens: Annotated[int, typer.Option(help="Prompt tokens (synthetic arrivals).")] = 512,
    output_tokens: Annotated[int, typer.Option(help="Output tokens (synthetic arrivals).")] = 128,
    fit_context: Annotated[
        bool, typer.Option(help="Scale request lengths down to the model's context.")
    ] = True,
    grace: Annotated[float, typer.Option(help="Preemption grace period, trace seconds.")] = 30.0,
    warmup: Annotated[
        float | None,
        typer.Option(
            help="Wall seconds of the first arrivals played first, unrecorded (default: the"
            " arrival-rate window, SPOTSERVE_ADMISSION__RATE_WINDOW_S, 60 s)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Arrivals and prompts.")] = 0,
    nats_url: Annotated[
        str | None, typer.Option(help="Drive this running cluster (default: start one here).")
    ] = None,
    instances: Annotated[
        int | None,
        typer.Option(help="Embedded cluster's executors (default: the trace's first nodes)."),
    ] = None,
    model_size: Annotated[str, typer.Option(help="Embedded model (tiny, small).")] = "tiny",
    out: Annotated[Path | None, typer.Option(help="Report directory.")] = None,
    slo: Annotated[
        float | None, typer.Option(help="End-to-end latency SLO (s) for the goodput.")
    ] = None,
    spot_price: Annotated[float, typer.Option(help="$/h of a spot instance.")] = 1.9046,
    on_demand_price: Annotated[float, typer.Option(help="$/h of an on-demand instance.")] = 3.912,
    baseline: Annotated[
        str | None, typer.Option(help="The policy the table's ratios divide by.")
    ] = None,
) -> None:
    """Replay arrivals (and a fleet trace) under one or more serving policies; write
    report-<policy>.json, report.md and plots, and print the side-by-side table."""
    policies = policy or ["spotserve"]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise typer.BadParameter(f"unknown policy {unknown}; choose from {list(POLICIES)}")
    if time_scale <= 0:
        raise typer.BadParameter("--time-scale must be > 0")
    try:
        trace = read_fleet_trace(fleet) if fleet is not None else None
        # Checked before any cluster starts: a bad spec or file fails at once.
        arrivals_from_spec(
            arrivals,
            duration_s=duration if duration is not None else trace.duration_s if trace else None,
            max_requests=max_requests,
        )
    except TraceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    base = ReplayOptions(
        arrivals=arrivals,
        fleet=trace,
        fleet_name=fleet.name if fleet else None,
        time_scale=time_scale,
        duration_s=duration,
        max_requests=max_requests,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        fit_context=fit_context,
        grace_s=grace,
        seed=seed,
        # A full arrival-rate window: every policy starts with the planner's rate measured on
        # the same steady load (a shorter one leaves the first policy the meter's ramp).
        warmup_s=Settings().admission.rate_window_s if warmup is None else warmup,
    )
    out_dir = out or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    prices = Prices(spot_per_hour=spot_price, on_demand_per_hour=on_demand_price)
    size = instances or (len(trace.initial_nodes) if trace else 2)
    try:
        reports = run_policies(base, policies, nats_url, size, model_size, prices, slo)
    except (ReplayError, TraceError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for report in reports:
        path = out_dir / f"report-{report['policy']}.json"
        path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    table = markdown_table(reports, baseline=baseline)
    (out_dir / "report.md").write_text(table + "\n", encoding="utf-8")
    plots = write_plots(reports, out_dir)
    typer.echo(table)
    typer.echo(f"wrote {out_dir}: reports, report.md, {len(plots)} plots")


def run_policies(
    base: ReplayOptions,
    policies: list[str],
    nats_url: str | None,
    instances: int,
    model_size: str,
    prices: Prices,
    slo: float | None,
) -> list[dict[str, Any]]:
    """Each policy in turn on one cluster: the given one, or an embedded one started here."""
    from shared.config import Settings

    if nats_url is not None:  # as SPOTSERVE_NATS__USER, else `operator` of `spotserve up`
        settings = Settings().nats.model_copy(update={"url": nats_url})
        return asyncio.run(_replay_all(settings, base, policies, prices, slo))
    from shared.cluster import LocalCluster
    from shared.model.checkpoint import default_model_dir, ensure_model
    from shared.security import init_credentials

    model_dir = ensure_model(default_model_dir(model_size), model_size)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="spotserve-loadgen-") as state:
        credentials = init_credentials(Path(state) / "credentials")
        cluster = LocalCluster(
            Path(state), instances=instances, model_dir=model_dir, credentials=credentials
        )
        stderr_progress(f"starting an embedded cluster of {instances} instances ...")
        cluster.start()
        try:
            return asyncio.run(_replay_all(cluster.nats_settings(), base, policies, prices, slo))
        finally:
            cluster.stop()


async def _replay_all(
    settings: NatsSettings,
    base: ReplayOptions,
    policies: list[str],
    prices: Prices,
    slo: float | None,
) -> list[dict[str, Any]]:
    from shared.bus import connect

    assert settings.url is not None
    nc = await connect(settings.url, settings, name="spotserve-loadgen", default_user="operator")
    reports = []
    try:
        for name in policies:
            options = ReplayOptions(**{**base.__dict__, "policy": name})
            run = await Replayer(nc, options, progress=stderr_progress).run()
            reports.append(summarize(run, prices, slo))
    finally:
        await nc.close()
    return reports


@app.command()
def compare(
    reports: Annotated[list[Path], typer.Argument(help="report.json files")],
    baseline: Annotated[str | None, typer.Option(help="Policy the ratios divide by.")] = None,
) -> None:
    """Print the side-by-side table of earlier runs, with ratios."""
    try:
        typer.echo(compare_main(reports, baseline=baseline))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


# The SpotServe artifact's trace segment A_S, when this checkout sits beside the kit's traces.
KIT_SEGMENT = Path(__file__).resolve().parents[2] / "shared/traces/spotserve/trace_0304_real.jsonl"
# Otherwise an example of the same format (ours, not a real trace): 4 instances, one preempted
# at 5 min, one added at 8 min, two preempted at 14 min, 20 minutes in all.
EXAMPLE_SEGMENT = """\
[0, "add", {"nodes": ["node-0", "node-1", "node-2", "node-3"]}]
[300000, "remove", {"nodes": ["node-1"]}]
[480000, "add", {"nodes": ["node-4"]}]
[840000, "remove", {"nodes": ["node-0", "node-2"]}]
[1200000, "DONE", {}]
"""


@app.command()
def demo(
    fleet: Annotated[
        Path | None,
        typer.Option(help="Availability trace (default: the kit's A_S segment, else an example)."),
    ] = None,
    baseline: Annotated[str, typer.Option(help="The baseline policy to compare with.")] = "reroute",
    time_scale: Annotated[float, typer.Option(help="Trace seconds -> wall seconds.")] = 0.025,
    arrivals: Annotated[
        str, typer.Option(help="Arrivals in trace time (the paper's Gamma process, CV 1).")
    ] = "gamma:0.08:1",
    output_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 64,
    out: Annotated[Path | None, typer.Option(help="Report directory.")] = None,
) -> None:
    """The mission in about a minute: an embedded cluster replays a compressed spot-availability
    segment with real preemptions (SIGKILL at each deadline) under SpotServe and one baseline,
    then prints the side-by-side table and writes the reports and plots."""
    out_dir = out or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    if fleet is None:
        fleet = KIT_SEGMENT
        if not fleet.exists():
            fleet = out_dir / "example-segment.jsonl"
            fleet.write_text(EXAMPLE_SEGMENT, encoding="utf-8")
    typer.echo(f"replaying {fleet.name} at x{time_scale} under spotserve and {baseline}")
    replay(
        arrivals=arrivals,
        fleet=fleet,
        policy=["spotserve", baseline],
        time_scale=time_scale,
        duration=None,
        max_requests=None,
        input_tokens=512,
        output_tokens=output_tokens,
        fit_context=True,
        grace=30.0,
        warmup=5.0,
        seed=0,
        nats_url=None,
        instances=None,
        model_size="tiny",
        out=out_dir,
        slo=None,
        spot_price=1.9046,
        on_demand_price=3.912,
        baseline=baseline,
    )
