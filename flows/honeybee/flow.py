"""HoneyBee as a Prefect flow: profile → optimize → deploy → evaluate on the tiered cluster.

``honeybee`` checks its parameters (the workload is generated for the scale unless given) and starts
(or connects to) the tiered Dask cluster; ``honeybee_stages`` runs the stages there: the search cost
model measured on a worker, every strategy planned for the same workload, each one's partitions built
on the pools its placement chose and queried at the same recall target.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.honeybee import DEFAULT_INFRA, SYSTEM, HoneyBeeParams
from optimizers.honeybee_cost import fit_cost_model
from tasks.common.run import RunContext, run_flow, stages_flow
from tasks.common.summary import Summary
from tasks.honeybee.plans import build_problem
from tasks.honeybee.profile import grid_for
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.stages import deploy_and_measure, evaluate, plan_strategies, pool_slots, profile
from tasks.honeybee.workload import describe


@stages_flow("honeybee-stages")
def honeybee_stages(run: RunContext) -> Summary:
    params, workload = run.params, run.params.loaded_workload
    strategies = [SYSTEM.strategy, *SYSTEM.baselines]

    measured = profile(params.workload_dir, params.infra_spec, grid_for(len(workload.vectors)))
    run.write_table("search_profile", measured)
    model = fit_cost_model(measured, recall_floor=params.recall_target)
    run.write_json("cost_model.json", model.to_dict())
    get_run_logger().info("cost model fitted: %s", model.fit)

    problem = build_problem(Rbac.of(workload), workload.query_users, model, storage_budget=params.storage_budget,
                            name=workload.name)
    slots = pool_slots(params.infra_spec, workload.vectors.shape[1])
    plans, deployments = plan_strategies(problem, strategies, model, slots, params.near_tier)
    run.write_plan(plans[SYSTEM.strategy].to_dict())

    results, built = deploy_and_measure(workload, params.workload_dir, params.infra_spec, deployments, params.k,
                                        params.recall_target, params.max_index_gib)
    evaluate(run, workload.name, describe(workload), results, deployments, model, built, strategies)
    return run.summary


@flow(name="honeybee", log_prints=True)
def honeybee(
    workload: str | None = None,
    infra: str = str(DEFAULT_INFRA),
    storage_budget: float = 1.4,
    recall_target: float = 0.95,
    k: int = 10,
    near_tier: str | None = "edge",
    max_index_gib: float = 4.0,
    scale: str = "small",
    scheduler: str | None = None,
    results_dir: str = "results",
    run_id: str | None = None,
    store: str | None = None,
) -> dict:
    """Partition a vector collection for role-based access and compare with the baselines.

    Parameters
    ----------
    workload, infra, storage_budget, recall_target, k, near_tier, max_index_gib: see
        :class:`flows.honeybee.HoneyBeeParams`.
    scale: small | medium | large — the generated workload (the profiling grid follows its size).
    scheduler: address of an existing Dask scheduler; by default an embedded cluster is started.
    results_dir: where results/honeybee/<run-id>/ is written.
    run_id: name of the run folder (default: a timestamp and a short id).
    store: also publish the run's folder to this artifact store (a folder or s3://bucket/prefix).
    """
    params = HoneyBeeParams.parse({"workload": workload, "infra": infra, "storage_budget": storage_budget,
                                   "recall_target": recall_target, "k": k, "near_tier": near_tier,
                                   "max_index_gib": max_index_gib}, "honeybee flow parameters", scale)
    run = SYSTEM.open_run(params, scale=scale, scheduler=scheduler, results_dir=results_dir, run_id=run_id, store=store)
    return run_flow(run, honeybee_stages, params.infra_spec)
