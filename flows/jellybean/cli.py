"""``tierflow jellybean …``: JellyBean's stages run alone, with files between them.

- ``profile``: measure every variant on each pool's worker (a tiered cluster) and write the profile CSV;
- ``optimize``: the MILP or a baseline (or all) on a profile or the authors' input folder;
- ``deploy``: push a request stream through each plan on its tier workers;
- ``evaluate``: cost, accuracy and deployed throughput of the strategies side by side.

Nothing is imported here that imports Prefect before the server's URL is known (see flows/console.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.console import console, ensure_server, fail, user_errors
from flows.jellybean import SYSTEM, JellyBeanParams
from tasks.jellybean.defaults import DEFAULT_INFRA, DEFAULT_WORKFLOW

jellybean_app = typer.Typer(help="JellyBean: ML inference workflows on tiered infrastructure at least cost.",
                            no_args_is_help=True)


def _problem_from(inputs: Optional[Path], workflow: Optional[Path], infra: Optional[Path], profile: Optional[Path],
                  rate: Optional[float], accuracy: Optional[float], profile_file: str):
    from infra.catalog import load_catalog
    from infra.spec import load_infra_spec
    from tasks.jellybean.inputs import load_repository_inputs
    from tasks.jellybean.workflow import build_problem, load_workflow

    if inputs is not None:
        return load_repository_inputs(inputs, profile_file=profile_file, rate=rate, accuracy_target=accuracy)
    if workflow is None or infra is None or profile is None:
        fail("give --inputs DIR (the JellyBean repository's format), or --workflow, --infra and --profile")
    import pandas as pd

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
            fail(f"unknown strategy {strategy!r}; choose all or one of {', '.join(solvers)}")
    except (InputError, InfeasibleError, SolverError, ContractError, OSError, ValueError) as exc:
        fail(str(exc))
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

    from infra.cluster import TieredCluster, quiet_logs
    from tasks.jellybean.stages import profile as profile_stage
    from infra.spec import load_infra_spec
    from tasks.jellybean.runtime import check_servable
    from tasks.jellybean.workflow import load_workflow

    with user_errors():
        spec, infra_spec = load_workflow(workflow), load_infra_spec(infra)
        check_servable(spec)
    ensure_server()
    quiet_logs()
    with user_errors(), TieredCluster(infra_spec, scheduler=scheduler) as cluster:
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

    from infra.cluster import TieredCluster, quiet_logs
    from infra.spec import load_infra_spec
    from tasks.jellybean.runtime import check_servable
    from tasks.jellybean.stages import deploy_all
    from tasks.jellybean.workflow import load_workflow

    with user_errors():
        check_servable(load_workflow(workflow))
        problem = _problem_from(None, workflow, infra, profile, None, None, "")
        decided = _read_plans(plans)
        infra_spec = load_infra_spec(infra)
    ensure_server()
    quiet_logs()
    with user_errors(), TieredCluster(infra_spec, scheduler=scheduler) as cluster:
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

    from data_contracts import validate
    from flows.table import print_summaries
    from infra.errors import InputError

    with user_errors():
        problem = _problem_from(None, workflow, infra, profile, None, None, "")
        decided = _read_plans(plans)
        if SYSTEM.strategy not in decided:
            raise InputError(plans, SYSTEM.strategy, None, "the plans must include the MILP's")
        frame = pd.read_csv(deployed / "deploy.csv")
        validate(frame.drop(columns=["dask_worker"], errors="ignore"), "jellybean.deploy", deployed / "deploy.csv")
        crossing = pd.read_csv(deployed / "tier_crossing.csv")
    ensure_server()
    from prefect import flow

    from tasks.jellybean.stages import evaluate

    strategies = [s for s in (SYSTEM.strategy, *SYSTEM.baselines) if s in decided]
    run = SYSTEM.open_run(JellyBeanParams(workflow=str(workflow), infra=str(infra)), scale="small", out=out)
    flow(name="jellybean-evaluate")(evaluate)(run, problem, decided, {}, frame, crossing, strategies)
    summary = run.summary.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        print_summaries([summary])
