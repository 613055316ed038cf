"""The ``tierflow`` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Nothing imported here may import Prefect: it reads PREFECT_API_URL once, at import, and
# the server's URL is only known once _ensure_server() has run.
from flows.honeybee_cli import honeybee_app
from flows.lazarus_cli import lazarus_app
from flows.lm_cli import lm_app
from flows.lmaas_cli import lmaas_app
from flows.console import console, ensure_server as _ensure_server, fail as _fail, user_errors as _user_errors
from tasks.jellybean.defaults import DEFAULT_INFRA, DEFAULT_WORKFLOW

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

app = typer.Typer(help="tierflow: ML-systems designs as Prefect flows on tier-tagged Dask workers.", no_args_is_help=True)
server_app = typer.Typer(help="The local Prefect server tierflow runs against.", no_args_is_help=True)
contracts_app = typer.Typer(help="Data contracts (Great Expectations).", no_args_is_help=True)
cluster_app = typer.Typer(help="The tiered Dask cluster.", no_args_is_help=True)
jellybean_app = typer.Typer(help="JellyBean: ML inference workflows on tiered infrastructure at least cost.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(contracts_app, name="contracts")
app.add_typer(cluster_app, name="cluster")
app.add_typer(jellybean_app, name="jellybean")
app.add_typer(honeybee_app, name="honeybee")
app.add_typer(lazarus_app, name="lazarus")
app.add_typer(lm_app, name="lm")
app.add_typer(lmaas_app, name="lmaas")

CONFIG_KEYS = {  # what a run config (--config) may set, per system; path-valued keys are resolved
    "jellybean": ("workflow", "infra", "rate"),
    "honeybee": ("workload", "infra", "storage_budget", "recall_target", "k", "near_tier", "max_index_gib"),
    "lazarus": ("infra", "strategies", "trace", "time_scale", "seed"),
    "lmaas": ("infra", "strategies", "db", "seed"),
}
PATH_KEYS = ("workflow", "infra", "workload", "trace")
SYSTEMS = {
    "jellybean": "serve ML inference workflows across device/hub/edge/cloud tiers at least cost",
    "honeybee": "role-based access control for vector search by overlapping partitions",
    "lazarus": "resilient, elastic MoE training that keeps going when nodes die",
    "lmaas": "multi-tenant, serverless LM serving with batched multi-LoRA inference",
}


def _quiet_logs() -> None:
    from infra.cluster import quiet_logs

    quiet_logs()


# ----------------------------------------------------------------------------- run


def run_system(system: str, scale: str, config: Optional[Path], scheduler: Optional[str], results_dir: str,
               store: Optional[str] = None) -> dict:
    """Run one system's flow; returns its evaluation summary."""
    from infra.errors import InputError
    from optimizers.solve import InfeasibleError

    if system not in SYSTEMS:
        _fail(f"unknown system {system!r}; landed systems: {', '.join(SYSTEMS)}")
    if scale not in ("small", "medium", "large"):
        _fail(f"--scale: {scale!r} is not one of small, medium, large")
    params: dict = {}
    if config is not None:
        try:
            params = yaml.safe_load(config.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            _fail(f"{config}: cannot read the run config: {exc}")
        if not isinstance(params, dict):
            _fail(f"{config}: expected a mapping of flow parameters, got {type(params).__name__}")
        unknown = sorted(set(params) - set(CONFIG_KEYS[system]))
        if unknown:
            _fail(f"{config}: field {unknown[0]!r}: unknown; a {system} run config takes {', '.join(CONFIG_KEYS[system])}")
        for key in PATH_KEYS:
            if key in params:
                params[key] = str((config.parent / str(params[key])).resolve())
    try:  # bad input fails here, before a server or a cluster starts (and before Prefect is imported)
        _check_run_inputs(system, params, config)
    except InputError as exc:
        _fail(str(exc))
    _ensure_server()
    _quiet_logs()
    from infra.cluster import ClusterError

    try:
        if system == "honeybee":
            from flows.honeybee import honeybee

            if store:
                _fail("--store: honeybee runs write results/ only (artifact-store publishing is jellybean's so far)")
            return honeybee(scale=scale, scheduler=scheduler, results_dir=results_dir, **params)
        if system == "lazarus":
            from flows.lazarus import lazarus

            return lazarus(scale=scale, scheduler=scheduler, results_dir=results_dir, store=store, **params)
        if system == "lmaas":
            from flows.lmaas import lmaas

            return lmaas(scale=scale, scheduler=scheduler, results_dir=results_dir, store=store, **params)
        from flows.jellybean import jellybean

        return jellybean(scale=scale, scheduler=scheduler, results_dir=results_dir, store=store, **params)
    except (InputError, ClusterError, InfeasibleError) as exc:
        _fail(str(exc))


def _check_run_inputs(system: str, params: dict, config: Optional[Path]) -> None:
    """Load every input a run names, so bad input is reported before anything starts."""
    from infra.spec import load_infra_spec

    if system == "jellybean":
        from tasks.jellybean.runtime import check_servable
        from tasks.jellybean.workflow import load_workflow

        check_servable(load_workflow(params.get("workflow", DEFAULT_WORKFLOW), rate=params.get("rate")))
        load_infra_spec(params.get("infra", DEFAULT_INFRA))
        return
    if system == "lazarus":
        _check_lazarus_inputs(params, config or "--config")
        return
    if system == "lmaas":
        _check_lmaas_inputs(params, config or "--config")
        return
    from tasks.honeybee.settings import DEFAULT_INFRA as HONEYBEE_INFRA, check_settings
    from tasks.honeybee.workload import load_workload

    source = config or "--config"
    check_settings(source, params)
    load_infra_spec(params.get("infra", HONEYBEE_INFRA))
    if "workload" in params:
        load_workload(params["workload"])


def _check_lmaas_inputs(params: dict, source) -> None:
    from infra.errors import InputError
    from infra.spec import load_infra_spec

    baselines = ("multi_lora", "merged_sequential", "unbatched")
    chosen = params.get("strategies", list(baselines))
    if not isinstance(chosen, list) or not chosen or any(s not in baselines for s in chosen):
        raise InputError(source, "strategies", chosen, f"expected a list of {', '.join(baselines)}")
    if not isinstance(params.get("seed", 0), int):
        raise InputError(source, "seed", params["seed"], "expected an integer")
    if "db" in params and not (isinstance(params["db"], str) and "://" in params["db"]):
        raise InputError(source, "db", params["db"], "expected a SQLAlchemy URL, e.g. postgresql://user@host/lmaas")
    infra = params.get("infra", Path(__file__).resolve().parents[1] / "data" / "lmaas.infra.yaml")
    spec = load_infra_spec(infra)
    if len(spec.pools) < 2 or not any(p.name == "train" for p in spec.pools):
        raise InputError(infra, "pools", [p.name for p in spec.pools],
                         "LMaaS needs a pool named 'train' (fine-tuning) and at least one serving pool")


def _check_lazarus_inputs(params: dict, source) -> None:
    from infra.errors import InputError
    from infra.spec import load_infra_spec
    from infra.traces import load_spot_trace

    strategies = ("lazarus", "reconfig_uniform", "checkpoint_restart")
    chosen = params.get("strategies", list(strategies))
    if not isinstance(chosen, list) or not chosen or any(s not in strategies for s in chosen):
        raise InputError(source, "strategies", chosen, f"expected a list of {', '.join(strategies)}")
    scale = params.get("time_scale", 0.01)
    if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise InputError(source, "time_scale", scale, "expected a number in (0, 1]: trace seconds per real second")
    spec = load_infra_spec(params.get("infra", Path(__file__).resolve().parents[1] / "data" / "lazarus.infra.yaml"))
    machines = sum(p.count for p in spec.pools if p.worker_per_machine)
    if machines < 4:
        raise InputError(params.get("infra", "infra"), "pools", machines,
                         "Lazarus needs ≥ 4 machines with worker_per_machine: true (one worker process per training node)")
    if "trace" in params:
        load_spot_trace(params["trace"])


@app.command("list")
def list_systems() -> None:
    """The systems tierflow runs."""
    table = Table("system", "what it does")
    for name, what in SYSTEMS.items():
        table.add_row(name, what)
    Console().print(table)


@app.command()
def run(
    system: str = typer.Argument(..., help="a system from `tierflow list`"),
    scale: str = typer.Option("small", help="small | medium | large"),
    config: Optional[Path] = typer.Option(None, help="YAML of flow parameters (e.g. workflow, infra, rate)"),
    scheduler: Optional[str] = typer.Option(None, help="address of an existing Dask scheduler (tcp://host:port)"),
    results_dir: str = typer.Option("results", help="where results/<system>/<run-id>/ is written"),
    store: Optional[str] = typer.Option(None, help="also copy results to an artifact store: a folder or s3://bucket/prefix"),
    as_json: bool = typer.Option(False, "--json", help="print the evaluation summary as one JSON line, last"),
) -> None:
    """Run a system end to end: profile → optimize → deploy → evaluate."""
    summary = run_system(system, scale, config, scheduler, results_dir, store)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_summary([summary])


def _print_summary(summaries: list[dict]) -> None:
    table = Table("system", "key figure", "system's value", "baseline", "baseline's value", "ratio (system/baseline)")
    for s in summaries:
        for name, value in s["baselines"].items():
            mine = s.get("value", s.get("milp"))
            table.add_row(s["system"], s["key_figure"], f"{mine:.3f}", name, f"{value:.3f}", f"{mine / value:.3f}")
    Console().print(table)
    for s in summaries:
        Console().print(f"{s['system']}: results in {s['results']}")


@app.command()
def demo(scale: str = typer.Option("small", help="small | medium | large")) -> None:
    """Run every landed system at small scale and print the side-by-side summary."""
    summaries = [run_system(system, scale, None, None, "results") for system in SYSTEMS]
    _print_summary(summaries)
    url = os.environ["PREFECT_API_URL"].removesuffix("/api")
    Console().print(f"Browse the runs in the Prefect UI: {url}/runs")
    Console().print("The Prefect server keeps running; stop it with `tierflow server stop`.")


# ----------------------------------------------------------------------------- server


@server_app.command("start")
def server_start(port: int = typer.Option(4200, help="port on 127.0.0.1")) -> None:
    """Start the local Prefect server (UI included) in the background."""
    from infra import prefect_server

    with console.status("starting the Prefect server…"):
        info = prefect_server.start(port=port)
    Console().print(f"Prefect server up: UI {info.ui_url}  API {info.api_url}  (pid {info.pid})")
    Console().print(f"Use it from other shells with: export PREFECT_API_URL={info.api_url}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the Prefect server tierflow started."""
    from infra import prefect_server

    Console().print("stopped" if prefect_server.stop() else "no tierflow Prefect server is running")


@server_app.command("status")
def server_status() -> None:
    """Whether the Prefect server is up, and where."""
    from infra import prefect_server

    info = prefect_server.running()
    if info is None:
        Console().print("not running")
        raise typer.Exit(1)
    Console().print(f"running: UI {info.ui_url}  API {info.api_url}  (pid {info.pid})")


# ----------------------------------------------------------------------------- contracts


@contracts_app.command("check")
def contracts_check(root: Path = typer.Option(Path(__file__).resolve().parents[1], help="project root")) -> None:
    """Validate every shipped dataset against its contract."""
    from data_contracts.shipped import check_shipped

    results = check_shipped(root)
    table = Table("dataset", "contract", "result")
    failed = 0
    for path, product, failures in results:
        table.add_row(str(path), product, "[green]ok[/green]" if not failures else "[red]" + "; ".join(failures) + "[/red]")
        failed += bool(failures)
    Console().print(table)
    if failed:
        _fail(f"{failed} of {len(results)} datasets break their contract")
    Console().print(f"{len(results)} datasets meet their contracts")


# ----------------------------------------------------------------------------- cluster


@cluster_app.command("up")
def cluster_up(infra: Path = typer.Option(..., help="infrastructure spec (YAML)")) -> None:
    """Start the tiered cluster for a spec, print the scheduler address, serve until Ctrl-C."""
    from infra.cluster import TieredCluster
    from infra.errors import InputError
    from infra.spec import load_infra_spec

    try:
        spec = load_infra_spec(infra)
    except InputError as exc:
        _fail(str(exc))
    _quiet_logs()
    with TieredCluster(spec) as cluster:
        Console().print(f"scheduler: {cluster.address}")
        for address, resources in cluster.worker_pools().items():
            Console().print(f"  worker {address}: {resources}")
        Console().print(f"use it with: tierflow run <system> --scheduler {cluster.address}")
        sys.stdout.flush()
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


# ----------------------------------------------------------------------------- jellybean stages


def _problem_from(inputs: Optional[Path], workflow: Optional[Path], infra: Optional[Path], profile: Optional[Path],
                  rate: Optional[float], accuracy: Optional[float], profile_file: str):
    from infra.catalog import load_catalog
    from infra.spec import load_infra_spec
    from tasks.jellybean.inputs import load_repository_inputs
    from tasks.jellybean.workflow import build_problem, load_workflow
    import pandas as pd

    if inputs is not None:
        return load_repository_inputs(inputs, profile_file=profile_file, rate=rate, accuracy_target=accuracy)
    if workflow is None or infra is None or profile is None:
        _fail("give --inputs DIR (the JellyBean repository's format), or --workflow, --infra and --profile")
    from data_contracts import validate

    frame = validate(pd.read_csv(profile).drop(columns=["worker"], errors="ignore"), "jellybean.profile", profile)
    problem = build_problem(load_workflow(workflow, rate=rate), load_infra_spec(infra), frame, load_catalog())
    if accuracy is not None:
        problem.accuracy_target = accuracy
    return problem


@jellybean_app.command("optimize")
def jellybean_optimize(
    inputs: Optional[Path] = typer.Option(None, help="a JellyBean optimizer-input folder (the authors' format)"),
    workflow: Optional[Path] = typer.Option(None, help="tierflow workflow spec (with --infra and --profile)"),
    infra: Optional[Path] = typer.Option(None, help="infrastructure spec"),
    profile: Optional[Path] = typer.Option(None, help="profile CSV from `tierflow jellybean profile`"),
    strategy: str = typer.Option("milp", help="milp | brute_force | jellybean_heuristic | infaas_style | cloud_only | all"),
    rate: Optional[float] = typer.Option(None, help="override every source's rate (req/s)"),
    accuracy: Optional[float] = typer.Option(None, help="override the accuracy target"),
    profile_file: str = typer.Option("execution_profile.csv", help="with --inputs: which execution profile"),
    out: Optional[Path] = typer.Option(None, help="write the plan JSON here"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Choose variants and workers at least cost (OPTIMIZE stage alone)."""
    from data_contracts import ContractError
    from infra.errors import InputError
    from optimizers.jellybean import check_feasible_inputs, plan_milp
    from optimizers.jellybean_baselines import STRATEGIES, plan_brute_force, plan_milp_seeded
    from optimizers.solve import InfeasibleError, SolverError

    try:
        problem = _problem_from(inputs, workflow, infra, profile, rate, accuracy, profile_file)
        check_feasible_inputs(problem)
        solvers = {"milp": plan_milp_seeded, "brute_force": plan_brute_force, **STRATEGIES}
        if strategy == "all":
            baselines = {}
            for name, solver in STRATEGIES.items():
                try:
                    baselines[name] = solver(problem)
                except InfeasibleError as exc:
                    console.print(f"[yellow]{name}[/yellow] cannot serve this workflow: {escape(str(exc))}")
            # The heuristic's plan, computed once above, caps the MILP (what plan_milp_seeded does).
            plans = {"milp": plan_milp(problem, incumbent=baselines.get("jellybean_heuristic")), **baselines}
        elif strategy in solvers:
            plans = {strategy: solvers[strategy](problem)}
        else:
            _fail(f"unknown strategy {strategy!r}; choose all or one of {', '.join(solvers)}")
    except (InputError, InfeasibleError, SolverError, ContractError, OSError, ValueError) as exc:
        _fail(str(exc))
    document = {n: p.to_dict() for n, p in plans.items()} if strategy == "all" else plans[strategy].to_dict()
    if out:
        out.write_text(json.dumps(document, indent=2))
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
        return
    for plan in plans.values():
        table = Table("operator", "worker", "variant", "machines", "rate (req/s)", title=plan.strategy)
        for a in plan.assignment:
            table.add_row(a.operator, a.worker, a.variant, str(a.machines), f"{a.rate:.2f}")
        Console().print(table)
        Console().print(f"compute {plan.compute_cost_per_hour:.4f} + network {plan.network_cost_per_hour:.4f} = "
                        f"{plan.total_cost_per_hour:.4f} $/h, accuracy {plan.accuracy:.2f}, solved in {plan.solve_seconds:.2f} s")


@jellybean_app.command("profile")
def jellybean_profile(
    workflow: Path = typer.Option(DEFAULT_WORKFLOW),
    infra: Path = typer.Option(DEFAULT_INFRA),
    scheduler: Optional[str] = typer.Option(None),
    repeats: int = typer.Option(2),
    out: Path = typer.Option(Path("profile.csv")),
) -> None:
    """Measure every variant on each pool's worker (PROFILE stage alone)."""
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from flows.jellybean import profile as profile_stage
    from infra.cluster import TieredCluster
    from infra.spec import load_infra_spec
    from tasks.jellybean.runtime import check_servable
    from tasks.jellybean.workflow import load_workflow

    with _user_errors():
        spec, infra_spec = load_workflow(workflow), load_infra_spec(infra)
        check_servable(spec)
    _ensure_server()
    _quiet_logs()
    with _user_errors(), TieredCluster(infra_spec, scheduler=scheduler) as cluster:
        stage = flow(name="jellybean-profile")(profile_stage).with_options(task_runner=DaskTaskRunner(address=cluster.address))
        frame = stage(spec, infra_spec, repeats)
    frame.to_csv(out, index=False)
    Console().print(f"wrote {len(frame)} rows to {out}")


def _read_plans(path: Path) -> dict:
    from infra.errors import InputError
    from optimizers.jellybean import Plan

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "<file>", str(path), f"cannot read plans: {exc}") from None
    try:
        if "assignment" in data:  # a single plan.json
            data = {data["strategy"]: data}
        return {name: Plan.from_dict(plan) for name, plan in data.items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(path, "plan", str(exc), "not a tierflow JellyBean plan") from None


@jellybean_app.command("deploy")
def jellybean_deploy(
    plans: Path = typer.Option(..., help="plans.json (every strategy) or plan.json from `optimize --out`"),
    workflow: Path = typer.Option(DEFAULT_WORKFLOW),
    infra: Path = typer.Option(DEFAULT_INFRA),
    profile: Path = typer.Option(..., help="profile CSV the plans were made from"),
    requests: int = typer.Option(4, help="requests pushed through each plan"),
    scheduler: Optional[str] = typer.Option(None),
    out: Path = typer.Option(Path("deploy"), help="folder for deploy.csv and tier_crossing.csv"),
) -> None:
    """Push a request stream through each plan on its tier workers (DEPLOY stage alone)."""
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from flows.jellybean import deploy_all
    from infra.cluster import TieredCluster
    from infra.errors import InputError
    from infra.spec import load_infra_spec

    from tasks.jellybean.runtime import check_servable
    from tasks.jellybean.workflow import load_workflow

    with _user_errors():
        check_servable(load_workflow(workflow))
        problem = _problem_from(None, workflow, infra, profile, None, None, "")
        decided = _read_plans(plans)
        infra_spec = load_infra_spec(infra)
    _ensure_server()
    _quiet_logs()
    with _user_errors(), TieredCluster(infra_spec, scheduler=scheduler) as cluster:
        stage = flow(name="jellybean-deploy")(deploy_all).with_options(task_runner=DaskTaskRunner(address=cluster.address))
        deployed, crossing = stage(problem, infra_spec, decided, requests)
    out.mkdir(parents=True, exist_ok=True)
    deployed.to_csv(out / "deploy.csv", index=False)
    crossing.to_csv(out / "tier_crossing.csv", index=False)
    Console().print(f"wrote {out / 'deploy.csv'} and {out / 'tier_crossing.csv'}")


@jellybean_app.command("evaluate")
def jellybean_evaluate(
    plans: Path = typer.Option(..., help="plans.json from the optimize stage"),
    deployed: Path = typer.Option(..., help="folder written by `tierflow jellybean deploy`"),
    workflow: Path = typer.Option(DEFAULT_WORKFLOW),
    infra: Path = typer.Option(DEFAULT_INFRA),
    profile: Path = typer.Option(..., help="profile CSV the plans were made from"),
    out: Path = typer.Option(Path("evaluation"), help="folder for evaluation.json, report.md and the plot"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON line, last"),
) -> None:
    """Compare the strategies' cost, accuracy and deployed throughput (EVALUATE stage alone)."""
    import pandas as pd
    from prefect import flow

    from data_contracts import ContractError, validate
    from flows.jellybean import evaluate
    from infra.errors import InputError

    try:
        problem = _problem_from(None, workflow, infra, profile, None, None, "")
        decided = _read_plans(plans)
        if "milp" not in decided:
            raise InputError(plans, "milp", None, "the plans must include the MILP's")
        frame = pd.read_csv(deployed / "deploy.csv")
        validate(frame.drop(columns=["dask_worker"], errors="ignore"), "jellybean.deploy", deployed / "deploy.csv")
        crossing = pd.read_csv(deployed / "tier_crossing.csv")
    except (InputError, ContractError, OSError) as exc:
        _fail(str(exc))
    _ensure_server()
    summary = flow(name="jellybean-evaluate")(evaluate)(problem, decided, {}, frame, crossing, out, out.name)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_summary([summary])


def main() -> None:  # pragma: no cover - console entry point
    app()
