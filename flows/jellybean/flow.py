"""JellyBean as a Prefect flow: profile → optimize → deploy → evaluate on the tiered cluster.

``jellybean`` checks its parameters and starts (or connects to) the tiered Dask cluster for the
infrastructure spec; ``jellybean_stages`` runs the four stages there, each task routed to its tier.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.jellybean import SCALES, SYSTEM, JellyBeanParams
from infra.catalog import load_catalog
from tasks.common.run import RunContext, run_flow, stages_flow
from tasks.common.summary import Summary
from tasks.jellybean.defaults import DEFAULT_INFRA, DEFAULT_WORKFLOW
from tasks.jellybean.stages import deploy_all, evaluate, optimize, profile
from tasks.jellybean.workflow import build_problem


@stages_flow("jellybean-stages")
def jellybean_stages(run: RunContext) -> Summary:
    params, scale = run.params, SCALES[run.scale]
    strategies = [SYSTEM.strategy, *SYSTEM.baselines]

    profiled = profile(params.workflow_spec, params.infra_spec, scale["repeats"])
    run.write_table("profile", profiled)
    problem = build_problem(params.workflow_spec, params.infra_spec, profiled, load_catalog())
    plans, infeasible = optimize(problem, strategies)
    get_run_logger().info("MILP plan: %.3f $/h; infeasible baselines: %s", plans[SYSTEM.strategy].total_cost_per_hour,
                          list(infeasible) or "none")
    deployed, crossing = deploy_all(problem, params.infra_spec, plans, scale["requests"])
    evaluate(run, problem, plans, infeasible, deployed, crossing, strategies)
    return run.summary


@flow(name="jellybean", log_prints=True)
def jellybean(
    workflow: str = str(DEFAULT_WORKFLOW),
    infra: str = str(DEFAULT_INFRA),
    rate: float | None = None,
    scale: str = "small",
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
    rate: override every source's request rate (req/s).
    scale: small | medium | large — requests pushed through each plan and profiling repeats.
    scheduler: address of an existing Dask scheduler; by default an embedded cluster is started.
    results_dir: where results/jellybean/<run-id>/ is written.
    run_id: name of the run folder (default: a timestamp and a short id).
    store: also publish the run's folder to this artifact store (a folder, file:// or s3://bucket/prefix;
        the S3 endpoint comes from TIERFLOW_S3_ENDPOINT_URL for MinIO or moto).
    """
    params = JellyBeanParams.parse({"workflow": workflow, "infra": infra, "rate": rate}, "jellybean flow parameters",
                                   scale)
    run = SYSTEM.open_run(params, scale=scale, scheduler=scheduler, results_dir=results_dir, run_id=run_id, store=store)
    return run_flow(run, jellybean_stages, params.infra_spec)
