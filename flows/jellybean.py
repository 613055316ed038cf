"""JellyBean as a Prefect flow: profile → optimize → deploy → evaluate on the tiered cluster.

``jellybean`` starts (or connects to) the tiered Dask cluster for the infrastructure
spec, then runs the four stages as a subflow whose tasks the cluster's workers execute,
each routed to its tier with :func:`infra.cluster.on`.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect_dask import DaskTaskRunner

from data_contracts import validate
from infra.catalog import load_catalog
from infra.cluster import TieredCluster, on_pool
from infra.spec import InfraSpec, load_infra_spec
from infra.store import open_store
from optimizers.jellybean import JellyBeanProblem, Plan
from optimizers.jellybean_baselines import STRATEGIES
from tasks.jellybean import deploy as deploying
from tasks.jellybean import report, runtime
from tasks.jellybean.tasks import plan_strategy, profile_pool, serve_batch, simulated_speedup
from tasks.jellybean.workflow import DEFAULT_INFRA, DEFAULT_WORKFLOW, WorkflowSpec, build_problem, load_workflow

SCALES = {"small": {"requests": 4, "repeats": 1}, "medium": {"requests": 16, "repeats": 3}, "large": {"requests": 64, "repeats": 5}}
STRATEGY_NAMES = ["milp", *STRATEGIES]
PROFILE_CONCURRENCY = 2


SIMULATED = [
    f"device speed: latency measured on this host's CPU ({runtime.HOST_DEVICE}), scaled to each pool's device "
    "by the catalog (min of peak-compute and memory-bandwidth ratios)",
    "prices ($/hour) and link costs ($/GB) come from the catalog, not a bill",
    "model weights are random (architectures are real); accuracy comes from the authors' profiled table",
]


def profile(spec: WorkflowSpec, infra: InfraSpec, repeats: int, intervals: list | None = None) -> pd.DataFrame:
    """PROFILE: time every variant on each pool's worker; scale to the pool's device."""
    variants = [(op, var) for op, o in spec.operators.items() for var in o.variants]
    rows = []
    # Two pools at a time: every worker shares this host's cores, and timing more at
    # once would measure contention, not the models.
    for wave in range(0, len(infra.pools), PROFILE_CONCURRENCY):
        futures = []
        for pool in infra.pools[wave : wave + PROFILE_CONCURRENCY]:
            with on_pool(pool):
                futures.append(profile_pool.submit(pool.name, pool.tier, pool.device, variants, repeats))
        for future in futures:
            measured = future.result()
            rows += measured["rows"]
            if intervals is not None:
                intervals.append(measured["interval"])
    frame = pd.DataFrame(rows)
    return validate(frame.drop(columns=["worker"]), "jellybean.profile", "profile stage").assign(worker=frame.worker)


def optimize(problem: JellyBeanProblem, intervals: list | None = None) -> tuple[dict[str, Plan], dict[str, str]]:
    """OPTIMIZE: the MILP and every baseline on the same problem; baselines that cannot serve it are listed."""
    futures = {name: plan_strategy.submit(problem, name) for name in STRATEGIES}
    outcomes = {name: future.result() for name, future in futures.items()}
    # The MILP starts from the heuristic's plan (computed once, above) as its incumbent.
    outcomes["milp"] = plan_strategy.submit(problem, "milp", outcomes["jellybean_heuristic"]["plan"]).result()
    plans, infeasible = {}, {}
    for name in STRATEGY_NAMES:
        outcome = outcomes[name]
        if intervals is not None:
            intervals.append(outcome["interval"])
        if outcome["plan"] is None:
            infeasible[name] = outcome["infeasible"]
        else:
            plans[name] = outcome["plan"]
    table = report.assignment_table(plans)
    validate(table.assign(rate=table.rate.clip(lower=0.0), headroom=table.capacity - table.rate), "jellybean.plan", "optimize stage")
    return plans, infeasible


def deploy(problem: JellyBeanProblem, infra: InfraSpec, plan: Plan, requests: int, seed: int = 0) -> list:
    """DEPLOY one plan: push a request stream through its variants on its tier workers."""
    request_ids = list(range(requests))
    outputs: dict[str, list] = {}
    for u, v in problem.edges:
        if u in problem.sources:  # the raw payload the consuming model takes (an image, a spoken question)
            (payload, *_) = runtime.request_inputs(v, plan.variants[v], requests, seed)
            outputs[u] = [{rid: payload[rid] for rid in request_ids}]
    shares = deploying.stream_plan(plan)
    futures = []
    for op in problem.operators:
        outputs[op] = []
        for worker, ids in deploying.split_requests(request_ids, shares[op]).items():
            pool = infra.pool(worker)
            upstream = {u: outputs[u] for u in problem.inputs[op]}
            with on_pool(pool):
                future = serve_batch.submit(op, plan.variants[op], worker, ids, upstream,
                                            image_variant=plan.variants.get("ExtractImageFeature", "resnet18"))
            outputs[op].append(future)
            futures.append(future)
    return [f.result() for f in futures]


def deploy_all(problem: JellyBeanProblem, infra: InfraSpec, plans: dict[str, Plan], requests: int,
               intervals: list | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DEPLOY every strategy's plan; per-worker measurements and tier-crossing traffic."""
    speedup = {p.name: simulated_speedup(p.device) for p in infra.pools}
    deployed, crossing = [], []
    for name, plan in plans.items():
        results = deploy(problem, infra, plan, requests)
        if intervals is not None:
            intervals.extend(r.interval for r in results)
        deployed.append(deploying.deployment_table(problem, plan, results, speedup))
        source_kib = {(u, v): problem.message(u, v, "default", plan.variants[v]) for u, v in problem.edges if u in problem.sources}
        planned = sum(f.kib_per_s for f in plan.flows if problem.tier_of(f.dst) > problem.tier_of(f.src))
        crossing.append({"strategy": name, "planned_kib_per_request": planned / max(problem.sources.values()),
                         "measured_kib_per_request": deploying.tier_crossing_kib_per_request(problem, results, source_kib)})
    frame = pd.concat(deployed, ignore_index=True)
    validate(frame.drop(columns=["dask_worker"]), "jellybean.deploy", "deploy stage")
    return frame, pd.DataFrame(crossing)


def evaluate(problem: JellyBeanProblem, plans: dict[str, Plan], infeasible: dict[str, str], deployed: pd.DataFrame,
             crossing: pd.DataFrame, out: Path, run_id: str) -> dict:
    """EVALUATE: cost, accuracy and achieved throughput of every strategy; files and Prefect artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    evaluation = validate(report.evaluation_table(problem, plans), "jellybean.evaluation", "evaluate stage")
    plot = report.cost_plot(evaluation, out / "cost_by_strategy.png", f"JellyBean on {problem.name}: cost by strategy")
    (out / "plan.json").write_text(json.dumps(plans["milp"].to_dict(), indent=2))
    (out / "plans.json").write_text(json.dumps({n: p.to_dict() for n, p in plans.items()}, indent=2))
    markdown = report.markdown_report(problem, evaluation, deployed, crossing, infeasible, SIMULATED, plot.name)
    (out / "report.md").write_text(markdown)
    create_table_artifact(evaluation.round(4).to_dict("records"), key="jellybean-evaluation", description="cost by strategy")
    create_table_artifact(deployed.round(3).to_dict("records"), key="jellybean-deploy", description="deployed request stream")
    create_markdown_artifact(markdown, key="jellybean-report", description="JellyBean report")

    by = evaluation.set_index("strategy")
    achieved = deployed[deployed.strategy == "milp"].groupby("operator").achieved_rate.sum()
    baselines = [n for n in STRATEGIES if n in plans]
    summary = {
        "system": "jellybean",
        "run_id": run_id,
        "workflow": problem.name,
        "key_figure": "total_cost_per_hour",
        "milp": round(float(by.loc["milp", "total_cost_per_hour"]), 4),
        "baselines": {n: round(float(by.loc[n, "total_cost_per_hour"]), 4) for n in baselines},
        "savings": {n: round(float(by.loc[n, "savings"]), 4) for n in baselines},
        "infeasible_baselines": infeasible,
        "accuracy": round(float(by.loc["milp", "accuracy"]), 3),
        "accuracy_target": problem.accuracy_target,
        "throughput_met": {op: bool(achieved.get(op, 0.0) >= problem.required_rate[op] - 1e-6) for op in problem.operators},
        "solve_seconds": round(plans["milp"].solve_seconds, 3),
        "results": str(out),
        "simulated": SIMULATED,
    }
    document = {"summary": summary, "strategies": evaluation.to_dict("records"), "infeasible": infeasible,
                "deploy": deployed.to_dict("records"), "tier_crossing": crossing.to_dict("records")}
    (out / "evaluation.json").write_text(json.dumps(document, indent=2, default=str))
    return summary


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall-clock time during which at least one task was doing its own work."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


@flow(name="jellybean-stages", log_prints=True)
def jellybean_stages(workflow: str, infra: str, scale: str, rate: float | None, results_dir: str, run_id: str,
                     store: str | None = None) -> dict:
    logger = get_run_logger()
    spec, infra_spec = load_workflow(workflow, rate=rate), load_infra_spec(infra)
    validate(spec.nodes_frame(), "jellybean.workflow", workflow)
    validate(infra_spec.pools_frame(), "infra.pools", infra)
    settings = SCALES[scale]
    intervals: list[tuple[float, float]] = []
    out = Path(results_dir) / "jellybean" / run_id
    out.mkdir(parents=True, exist_ok=True)

    profiled = profile(spec, infra_spec, settings["repeats"], intervals)
    profiled.to_csv(out / "profile.csv", index=False)
    problem = build_problem(spec, infra_spec, profiled, load_catalog())
    plans, infeasible = optimize(problem, intervals)
    logger.info("MILP plan: %.3f $/h; infeasible baselines: %s", plans["milp"].total_cost_per_hour, list(infeasible) or "none")
    deployed, crossing = deploy_all(problem, infra_spec, plans, settings["requests"], intervals)
    deployed.to_csv(out / "deploy.csv", index=False)
    summary = evaluate(problem, plans, infeasible, deployed, crossing, out, run_id)
    summary["task_seconds"] = round(busy_seconds(intervals), 2)
    if store:
        summary["store"] = publish(out, store, f"jellybean/{run_id}")
    return summary


def publish(folder: Path, store_url: str, prefix: str) -> str:
    """Copy a run's files into the artifact store (local folder or S3), content-hashed."""
    store = open_store(store_url)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            store.put_file(f"{prefix}/{path.name}", path)
    return store.url(prefix)


@flow(name="jellybean", log_prints=True)
def jellybean(
    workflow: str = str(DEFAULT_WORKFLOW),
    infra: str = str(DEFAULT_INFRA),
    scale: str = "small",
    rate: float | None = None,
    scheduler: str | None = None,
    results_dir: str = "results",
    run_id: str | None = None,
    store: str | None = None,
) -> dict:
    """Plan and deploy a JellyBean workflow on a tiered cluster and compare it with the baselines.

    Parameters
    ----------
    workflow: a tierflow workflow spec (YAML).
    infra: an infrastructure spec (YAML).
    scale: small | medium | large — requests pushed through each plan and profiling repeats.
    rate: override every source's request rate (req/s).
    scheduler: address of an existing Dask scheduler; by default an embedded cluster is started.
    results_dir: where results/<system>/<run-id>/ is written.
    run_id: name of the run folder (default: a timestamp and a short id).
    store: also copy the results to this artifact store (a folder, file:// or s3://bucket/prefix;
        the S3 endpoint comes from TIERFLOW_S3_ENDPOINT_URL for MinIO or moto).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    runtime.check_servable(load_workflow(workflow, rate=rate))  # fail on bad input before starting anything
    spec = load_infra_spec(infra)
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    started = time.perf_counter()
    with TieredCluster(spec, scheduler=scheduler) as cluster:
        stages = jellybean_stages.with_options(task_runner=DaskTaskRunner(address=cluster.address))
        summary = stages(workflow, infra, scale, rate, results_dir, run_id, store)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    # Platform overhead: the share of the run's wall time no task was doing its own work.
    summary["overhead_share"] = round(1.0 - summary["task_seconds"] / summary["wall_seconds"], 3)
    out = Path(summary["results"]) / "evaluation.json"
    document = json.loads(out.read_text())
    document["summary"] = summary
    out.write_text(json.dumps(document, indent=2, default=str))
    return summary
