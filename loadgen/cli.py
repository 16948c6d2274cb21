"""``spotserve-loadgen`` (also ``python -m loadgen``): replay traces against a cluster, simulate
them on a virtual clock, compare reports. See the README's "Replaying traces" section."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from loadgen.replay import Replayer, ReplayError, ReplayOptions, default_out_dir, stderr_progress
from loadgen.report import (
    Prices,
    compare_main,
    markdown_table,
    summarize,
    write_plots,
    write_report,
)
from loadgen.simulate import BACKFILL_S, SimCosts, SimOptions, SimulationError
from loadgen.simulate import simulate as simulate_policy
from loadgen.traces import Arrival, FleetTrace, TraceError, arrivals_from_spec, read_fleet_trace
from services.scheduler.policy import POLICY_NAMES
from shared.config import (
    ON_DEMAND_PRICE_PER_HOUR,
    SPOT_PRICE_PER_HOUR,
    NatsSettings,
    PlannerSettings,
    Settings,
)
from shared.messages import ServingMode
from shared.model.profile import ProfileError, read_any_parallel_profile

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
POLICIES = get_args(ServingMode)

# Options that replay and simulate share.
ArrivalsOption = Annotated[
    str,
    typer.Option(
        help="poisson:RATE, gamma:RATE:CV (req/s of trace time), or a file: per-minute rate"
        " list, Azure LLM inference CSV, BurstGPT CSV, SpotServe artifact query file.",
    ),
]
FleetOption = Annotated[
    Path | None,
    typer.Option(help="Spot availability trace: t_ms,add|remove,node CSV or SpotServe JSONL."),
]
PolicyOption = Annotated[
    list[str] | None,
    typer.Option(help="spotserve | reroute | restart | ondemand (repeat: run each in turn)."),
]
TimeScaleOption = Annotated[
    float, typer.Option(help="Trace seconds -> wall seconds (0.05: 20 min in 1 min).")
]
DurationOption = Annotated[
    float | None, typer.Option(help="Trace seconds to replay (default: the fleet trace's).")
]
MaxRequestsOption = Annotated[int | None, typer.Option(help="Stop after this many requests.")]
InputTokensOption = Annotated[int, typer.Option(help="Prompt tokens (synthetic arrivals).")]
OutputTokensOption = Annotated[int, typer.Option(help="Output tokens (synthetic arrivals).")]
GraceOption = Annotated[
    float, typer.Option(min=0.0, help="Preemption grace period, trace seconds.")
]
SeedOption = Annotated[int, typer.Option(help="Arrivals and prompts.")]
OutOption = Annotated[Path | None, typer.Option(help="Report directory.")]
SloOption = Annotated[
    float | None, typer.Option(help="End-to-end latency SLO (s) for the goodput.")
]
SpotPriceOption = Annotated[float, typer.Option(help="$/h of a spot instance.")]
OnDemandPriceOption = Annotated[float, typer.Option(help="$/h of an on-demand instance.")]
BaselineOption = Annotated[
    str | None, typer.Option(help="The policy the table's ratios divide by.")
]


@contextmanager
def _exit_2_on(*errors: type[Exception]) -> Iterator[None]:
    """Any of ``errors`` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _checked_policies(
    policy: list[str] | None, time_scale: float, baseline: str | None
) -> list[ServingMode]:
    """The policies to run (default: spotserve); usage errors before anything runs."""
    policies = policy or ["spotserve"]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise typer.BadParameter(f"unknown policy {unknown}; choose from {list(POLICIES)}")
    if baseline is not None and baseline not in policies:
        raise typer.BadParameter(f"--baseline {baseline!r} is not one of the policies run")
    if time_scale <= 0:
        raise typer.BadParameter("--time-scale must be > 0")
    return policies  # type: ignore[return-value]


def _read_inputs(
    arrivals: str,
    fleet: Path | None,
    duration: float | None,
    max_requests: int | None,
    **spec_options: Any,
) -> tuple[FleetTrace | None, list[Arrival]]:
    """The fleet trace and the arrivals (to ``duration``, else to the trace's end); TraceError
    naming file and line for a bad one."""
    trace = read_fleet_trace(fleet) if fleet is not None else None
    end = duration if duration is not None else trace.duration_s if trace else None
    return trace, arrivals_from_spec(
        arrivals, duration_s=end, max_requests=max_requests, **spec_options
    )


def _write_outputs(reports: list[dict[str, Any]], out_dir: Path, baseline: str | None) -> None:
    """report-<policy>.json, report.md and the plots in ``out_dir``; the table on stdout."""
    for report in reports:
        write_report(report, out_dir / f"report-{report['policy']}.json")
    table = markdown_table(reports, baseline=baseline)
    (out_dir / "report.md").write_text(table + "\n", encoding="utf-8")
    plots = write_plots(reports, out_dir)
    typer.echo(table)
    typer.echo(f"wrote {out_dir}: reports, report.md, {len(plots)} plots")


@app.command()
def replay(
    arrivals: ArrivalsOption,
    fleet: FleetOption = None,
    policy: PolicyOption = None,
    time_scale: TimeScaleOption = 1.0,
    duration: DurationOption = None,
    max_requests: MaxRequestsOption = None,
    input_tokens: InputTokensOption = 512,
    output_tokens: OutputTokensOption = 128,
    fit_context: Annotated[
        bool, typer.Option(help="Scale request lengths down to the model's context.")
    ] = True,
    grace: GraceOption = 30.0,
    warmup: Annotated[
        float | None,
        typer.Option(
            help="Wall seconds of the first arrivals played first, unrecorded (default: the"
            " arrival-rate window, SPOTSERVE_ADMISSION__RATE_WINDOW_S, 60 s)."
        ),
    ] = None,
    seed: SeedOption = 0,
    nats_url: Annotated[
        str | None, typer.Option(help="Drive this running cluster (default: start one here).")
    ] = None,
    instances: Annotated[
        int | None,
        typer.Option(help="Embedded cluster's executors (default: the trace's first nodes)."),
    ] = None,
    model_size: Annotated[str, typer.Option(help="Embedded model (tiny, small).")] = "tiny",
    out: OutOption = None,
    slo: SloOption = None,
    spot_price: SpotPriceOption = SPOT_PRICE_PER_HOUR,
    on_demand_price: OnDemandPriceOption = ON_DEMAND_PRICE_PER_HOUR,
    baseline: BaselineOption = None,
) -> None:
    """Replay arrivals (and a fleet trace) under one or more serving policies; write
    report-<policy>.json, report.md and plots, and print the side-by-side table."""
    policies = _checked_policies(policy, time_scale, baseline)
    # Checked before any cluster starts: a bad spec or file fails at once.
    with _exit_2_on(TraceError):
        trace, _ = _read_inputs(arrivals, fleet, duration, max_requests)
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
    with _exit_2_on(ReplayError, TraceError, ValueError):
        reports = run_policies(base, policies, nats_url, size, model_size, prices, slo)
    _write_outputs(reports, out_dir, baseline)


_COSTS = SimCosts()
_PLANNER = PlannerSettings()
_GBIT = 1e9 / 8  # bytes/s per Gbit/s

ProfileOption = Annotated[
    Path,
    typer.Option(
        help="The model's timing profile: a SpotServe artifact profile JSON or the"
        " ParallelProfile JSON `spotserve profile` writes."
    ),
]
SchedulerOption = Annotated[
    str, typer.Option(help=f"Iteration-level scheduler: {' | '.join(POLICY_NAMES)}.")
]
MaxBatchOption = Annotated[int, typer.Option(min=1, help="Largest batch of a replica.")]
SparesOption = Annotated[int, typer.Option(min=0, help="Idle instances kept beyond the plan's.")]
OnDemandInstancesOption = Annotated[
    int | None,
    typer.Option(min=1, help="The ondemand policy's fleet (default: what the planner needs)."),
]
MaxPipelineOption = Annotated[
    int | None, typer.Option(min=1, help="Largest pipeline degree (default: any).")
]
RateMarginOption = Annotated[float, typer.Option(help="Capacity planned per measured request/s.")]
LinkOption = Annotated[float, typer.Option(help="Gbit/s between instances.")]
PcieOption = Annotated[
    float, typer.Option(help="Gbit/s inside an instance (PCIe 3.0 x16: 15.75 GB/s).")
]
TransferFixedOption = Annotated[
    float, typer.Option(min=0.0, help="Fixed seconds of a weights or KV cache hand-over.")
]
DiskOption = Annotated[float, typer.Option(help="Gbit/s of a weight load from local disk.")]
RemoteOption = Annotated[float, typer.Option(help="Gbit/s of a weight load from the remote store.")]
RestartOption = Annotated[
    float, typer.Option(min=0.0, help="Seconds an engine (re)start takes before it loads.")
]
StepOverheadOption = Annotated[
    float, typer.Option(min=0.0, help="Seconds per iteration outside the executor.")
]
BackfillOption = Annotated[
    float,
    typer.Option(min=0.0, help="Nodes added this long after a remove are on-demand (+O traces)."),
]


@app.command("simulate")
def simulate_command(
    arrivals: ArrivalsOption,
    profile: ProfileOption,
    fleet: FleetOption = None,
    policy: PolicyOption = None,
    time_scale: TimeScaleOption = 1.0,
    duration: DurationOption = None,
    max_requests: MaxRequestsOption = None,
    input_tokens: InputTokensOption = 512,
    output_tokens: OutputTokensOption = 128,
    grace: GraceOption = 30.0,
    seed: SeedOption = 0,
    out: OutOption = None,
    slo: SloOption = None,
    spot_price: SpotPriceOption = SPOT_PRICE_PER_HOUR,
    on_demand_price: OnDemandPriceOption = ON_DEMAND_PRICE_PER_HOUR,
    baseline: BaselineOption = None,
    scheduler: SchedulerOption = "fcfs",
    max_batch: MaxBatchOption = 4,
    spares: SparesOption = 0,
    on_demand_instances: OnDemandInstancesOption = None,
    max_pipeline: MaxPipelineOption = None,
    rate_margin: RateMarginOption = _PLANNER.rate_margin,
    link_gbps: LinkOption = _COSTS.link_bytes_s / _GBIT,
    pcie_gbps: PcieOption = _COSTS.pcie_bytes_s / _GBIT,
    transfer_fixed_s: TransferFixedOption = _COSTS.transfer_fixed_s,
    disk_gbps: DiskOption = _COSTS.disk_bytes_s / _GBIT,
    remote_gbps: RemoteOption = _COSTS.remote_bytes_s / _GBIT,
    restart_s: RestartOption = _COSTS.restart_s,
    step_overhead_s: StepOverheadOption = _COSTS.step_overhead_s,
    backfill_s: BackfillOption = BACKFILL_S,
) -> None:
    """Simulate arrivals and a fleet trace on a virtual clock, with the planner's and the
    scheduler's own code, under one or more serving policies; write the same reports as
    replay (report-<policy>.json, report.md, plots) and print the side-by-side table."""
    policies = _checked_policies(policy, time_scale, baseline)
    rates = {"--link-gbps": link_gbps, "--pcie-gbps": pcie_gbps, "--disk-gbps": disk_gbps,
             "--remote-gbps": remote_gbps, "--rate-margin": rate_margin}  # fmt: skip
    _check_sim_usage(scheduler, rates)
    # Everything read and checked before the first policy runs.
    with _exit_2_on(TraceError, ProfileError, ValueError):
        model = read_any_parallel_profile(profile)
        model.check_covers(model.devices_per_instance, max_batch, str(profile))
        trace, requests = _read_inputs(
            arrivals, fleet, duration, max_requests,
            input_tokens=input_tokens, output_tokens=output_tokens, seed=seed,
        )  # fmt: skip
    base = SimOptions(
        profile=model,
        arrivals=requests,
        arrivals_name=arrivals,
        fleet=trace,
        fleet_name=fleet.name if fleet else None,
        grace_s=grace,
        time_scale=time_scale,
        max_batch=max_batch,
        scheduler=scheduler,
        spares=spares,
        on_demand_instances=on_demand_instances,
        backfill_s=backfill_s,
        planner=PlannerSettings(
            max_pipeline=max_pipeline,
            whole_instance_groups=True,
            max_batch=max_batch,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            rate_margin=rate_margin,
        ),
        costs=_sim_costs(
            link_gbps,
            pcie_gbps,
            disk_gbps,
            remote_gbps,
            transfer_fixed_s,
            restart_s,
            step_overhead_s,
        ),
    )
    prices = Prices(spot_per_hour=spot_price, on_demand_per_hour=on_demand_price)
    _simulate_policies(base, policies, prices, slo, out, baseline)


def _sim_costs(
    link_gbps: float,
    pcie_gbps: float,
    disk_gbps: float,
    remote_gbps: float,
    transfer_fixed_s: float,
    restart_s: float,
    step_overhead_s: float,
) -> SimCosts:
    return SimCosts(
        link_bytes_s=link_gbps * _GBIT,
        pcie_bytes_s=pcie_gbps * _GBIT,
        transfer_fixed_s=transfer_fixed_s,
        disk_bytes_s=disk_gbps * _GBIT,
        remote_bytes_s=remote_gbps * _GBIT,
        restart_s=restart_s,
        step_overhead_s=step_overhead_s,
    )


def _check_sim_usage(scheduler: str, values: dict[str, float]) -> None:
    """Usage errors of ``simulate`` before anything is read."""
    if scheduler not in POLICY_NAMES:
        raise typer.BadParameter(
            f"unknown scheduler {scheduler!r}; choose from {list(POLICY_NAMES)}"
        )
    for name, value in values.items():
        if not value > 0:
            raise typer.BadParameter(f"{name} must be > 0")


def _simulate_policies(
    base: SimOptions,
    policies: list[ServingMode],
    prices: Prices,
    slo: float | None,
    out: Path | None,
    baseline: str | None,
) -> None:
    """Each policy's simulation of the same inputs, written as replay's reports are."""
    reports = []
    started = time.perf_counter()
    with _exit_2_on(TraceError, ProfileError, SimulationError, ValueError):
        for name in policies:
            stderr_progress(f"simulating {name} ...")
            run = simulate_policy(replace(base, policy=name))
            reports.append(summarize(run, prices, slo, clock="simulated"))
    elapsed = time.perf_counter() - started
    out_dir = out or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_outputs(reports, out_dir, baseline)
    typer.echo(f"simulated {', '.join(policies)} in {elapsed:.1f} s of wall-clock time")


def run_policies(
    base: ReplayOptions,
    policies: Sequence[str],
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
    policies: Sequence[str],
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


# The SpotServe artifact's inputs, when this checkout sits beside the kit's traces: trace
# segment A_S, the GPT-20B T4 profile and the 20B arrivals the paper replayed.
KIT = Path(__file__).resolve().parents[2] / "shared/traces/spotserve"
KIT_SEGMENT = KIT / "trace_0304_real.jsonl"
KIT_PROFILE_20B = KIT / "profiles/t4x4_megatron_h6144_profile.json"
KIT_ARRIVALS_20B = KIT / "queries/query_tpt0.35_cv6.txt"
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
    """The mission in about two minutes: an embedded cluster replays a compressed
    spot-availability segment with real preemptions (SIGKILL at each deadline) under SpotServe
    and one baseline, prints the side-by-side table and writes the reports and plots; then the
    same segment at the paper's scale (GPT-20B on 4xT4 instances, the artifact's arrivals)
    under all four policies, simulated with the planner's and scheduler's own code."""
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
        spot_price=SPOT_PRICE_PER_HOUR,
        on_demand_price=ON_DEMAND_PRICE_PER_HOUR,
        baseline=baseline,
    )
    if not (KIT_PROFILE_20B.exists() and KIT_ARRIVALS_20B.exists()):
        typer.echo(
            f"the paper-scale simulation needs the SpotServe artifact's profiles and arrivals"
            f" ({KIT}); skipped"
        )
        return
    typer.echo(
        f"\n{fleet.name} at the paper's scale, simulated: GPT-20B on 4xT4 instances"
        f" ({KIT_PROFILE_20B.name}), the paper's arrivals ({KIT_ARRIVALS_20B.name}), 30 s grace"
    )
    simulate_command(
        arrivals=str(KIT_ARRIVALS_20B),
        profile=KIT_PROFILE_20B,
        fleet=fleet,
        policy=list(POLICIES),
        out=out_dir / "paper-scale",
        baseline="spotserve",
    )
