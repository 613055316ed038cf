"""JellyBean's stages on the tiered cluster: what the flow (flows/jellybean/flow.py) tells in order.

Each stage submits its tasks to the tier workers (:func:`infra.cluster.on_pool`) and returns
checked tables; :func:`evaluate` writes the run's results through its :class:`RunContext`.
"""

from __future__ import annotations

import pandas as pd

from data_contracts import validate
from infra.cluster import on_pool
from infra.spec import InfraSpec
from optimizers.jellybean import JellyBeanProblem, Plan
from tasks.common.run import RunContext
from tasks.jellybean import deploy as deploying
from tasks.jellybean import report, runtime
from tasks.jellybean.tasks import plan_strategy, profile_pool, serve_batch, simulated_speedup
from tasks.jellybean.workflow import WorkflowSpec

PROFILE_CONCURRENCY = 2
SIMULATED = [
    f"device speed: latency measured on this host's CPU ({runtime.HOST_DEVICE}), scaled to each pool's device "
    "by the catalog (min of peak-compute and memory-bandwidth ratios)",
    "prices ($/hour) and link costs ($/GB) come from the catalog, not a bill",
    "model weights are random (architectures are real); accuracy comes from the authors' profiled table",
]


def profile(spec: WorkflowSpec, infra: InfraSpec, repeats: int) -> pd.DataFrame:
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
            rows += future.result()
    frame = pd.DataFrame(rows)
    return validate(frame.drop(columns=["worker"]), "jellybean.profile", "profile stage").assign(worker=frame.worker)


def optimize(problem: JellyBeanProblem, strategies: list[str]) -> tuple[dict[str, Plan], dict[str, str]]:
    """OPTIMIZE: ``strategies`` (the MILP first, then the baselines) on the same problem; baselines
    that cannot serve it are listed with the reason."""
    milp, baselines = strategies[0], strategies[1:]
    futures = {name: plan_strategy.submit(problem, name) for name in baselines}
    outcomes = {name: future.result() for name, future in futures.items()}
    # The MILP starts from the heuristic's plan (computed once, above) as its incumbent.
    incumbent = outcomes.get("jellybean_heuristic", {}).get("plan")
    outcomes[milp] = plan_strategy.submit(problem, milp, incumbent).result()
    plans = {name: outcomes[name]["plan"] for name in strategies if outcomes[name]["plan"] is not None}
    infeasible = {name: outcomes[name]["infeasible"] for name in strategies if outcomes[name]["plan"] is None}
    table = report.assignment_table(plans)
    validate(table.assign(rate=table.rate.clip(lower=0.0), headroom=table.capacity - table.rate), "jellybean.plan",
             "optimize stage")
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
            upstream = {u: outputs[u] for u in problem.inputs[op]}
            with on_pool(infra.pool(worker)):
                future = serve_batch.submit(op, plan.variants[op], worker, ids, upstream,
                                            image_variant=plan.variants.get("ExtractImageFeature", "resnet18"))
            outputs[op].append(future)
            futures.append(future)
    return [f.result() for f in futures]


def deploy_all(problem: JellyBeanProblem, infra: InfraSpec, plans: dict[str, Plan],
               requests: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DEPLOY every strategy's plan; per-worker measurements and tier-crossing traffic."""
    speedup = {p.name: simulated_speedup(p.device) for p in infra.pools}
    deployed, crossing = [], []
    for name, plan in plans.items():
        results = deploy(problem, infra, plan, requests)
        deployed.append(deploying.deployment_table(problem, plan, results, speedup))
        source_kib = {(u, v): problem.message(u, v, "default", plan.variants[v]) for u, v in problem.edges
                      if u in problem.sources}
        planned = sum(f.kib_per_s for f in plan.flows if problem.tier_of(f.dst) > problem.tier_of(f.src))
        crossing.append({"strategy": name, "planned_kib_per_request": planned / max(problem.sources.values()),
                         "measured_kib_per_request": deploying.tier_crossing_kib_per_request(problem, results, source_kib)})
    frame = pd.concat(deployed, ignore_index=True)
    validate(frame.drop(columns=["dask_worker"]), "jellybean.deploy", "deploy stage")
    return frame, pd.DataFrame(crossing)


def evaluate(run: RunContext, problem: JellyBeanProblem, plans: dict[str, Plan], infeasible: dict[str, str],
             deployed: pd.DataFrame, crossing: pd.DataFrame, strategies: list[str]) -> None:
    """EVALUATE: cost, accuracy and achieved throughput of every strategy; the run's rows, files and
    Prefect artifacts."""
    milp, baselines = strategies[0], strategies[1:]
    evaluation = validate(report.evaluation_table(problem, plans), "jellybean.evaluation", "evaluate stage")
    plot = report.cost_plot(evaluation, run.path("cost_by_strategy.png"), f"JellyBean on {problem.name}: cost by strategy")
    run.write_plan(plans[milp].to_dict())
    run.write_json("plans.json", {n: p.to_dict() for n, p in plans.items()})
    run.write_table("strategies", evaluation, "cost by strategy")
    run.write_table("deploy", deployed, "deployed request stream")
    run.write_report(report.markdown_report(problem, evaluation, deployed, crossing, infeasible, SIMULATED, plot.name))

    by = evaluation.set_index("strategy")
    achieved = deployed[deployed.strategy == milp].groupby("operator").achieved_rate.sum()
    summary = run.summary
    summary.simulated = SIMULATED
    summary.compare("cost", "$/h", "lower", by.total_cost_per_hour.to_dict(), milp, baselines)
    summary.details = {
        "workflow": problem.name,
        "infeasible_baselines": infeasible,
        "accuracy": round(float(by.loc[milp, "accuracy"]), 3),
        "accuracy_target": problem.accuracy_target,
        "throughput_met": {op: bool(achieved.get(op, 0.0) >= problem.required_rate[op] - 1e-6) for op in problem.operators},
        "solve_seconds": round(plans[milp].solve_seconds, 3),
    }
    run.write_evaluation({"strategies": evaluation.to_dict("records"), "infeasible": infeasible,
                          "deploy": deployed.to_dict("records"), "tier_crossing": crossing.to_dict("records")})
