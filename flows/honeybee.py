"""HoneyBee as a Prefect flow: profile → optimize → deploy → evaluate on the tiered cluster.

``honeybee`` starts (or connects to) the tiered Dask cluster, then runs the stages as a
subflow: the search cost and recall models are measured on a worker and fitted; every
strategy (HoneyBee's partitioning and the ``rls``, ``per_role``, ``per_user``
baselines) is planned for the same workload; each strategy's partitions are built on
the pools the placement chose; the same queries run against every strategy at the same
recall target; the report puts them side by side.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect_dask import DaskTaskRunner

from data_contracts import validate
from infra.catalog import load_catalog
from infra.cluster import TieredCluster, on_pool, on_worker
from infra.spec import InfraSpec, load_infra_spec
from optimizers.honeybee import STRATEGIES, PoolSlot
from optimizers.honeybee_cost import fit_cost_model
from tasks.honeybee import report
from tasks.honeybee.evaluate import StrategyResult, calibrate_and_measure, ground_truth, summarize
from tasks.honeybee.profile import grid_for
from tasks.honeybee.plans import (
    Deployment, build_problem, index_bytes_per_vector, index_gib, make_deployment, plan_all,
)
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.settings import DEFAULT_INFRA, check_settings
from tasks.honeybee.tasks import build_partitions, drop_partitions, profile_search, search_partitions
from tasks.honeybee.workload import describe, ensure_generated, load_workload

SIMULATED = [
    "every pool's worker runs on this host's CPU: latencies are this host's, one core per query; "
    "pool capacities (documents a pool can hold) come from the catalog's memory of its device",
]


def profile(workload_dir: str, infra: InfraSpec, grid: str) -> pd.DataFrame:
    """PROFILE: measure filtered search on the worker of the pool that holds the most (the last, cloud-most)."""
    pool = max(infra.pools, key=lambda p: ("device", "hub", "edge", "cloud").index(p.tier))
    with on_pool(pool):
        measured = profile_search.submit(workload_dir, grid, pool.name).result()
    frame = pd.DataFrame(measured["rows"])
    return validate(frame, "honeybee.search_profile", "profile stage").assign(pool=pool.name)


def pool_slots(infra: InfraSpec, dim: int, memory_share: float = 0.5) -> list[PoolSlot]:
    """How many documents each pool can hold: half its machines' memory (catalog) per stored vector."""
    catalog = load_catalog()
    per_vector = index_bytes_per_vector(dim)
    return [PoolSlot(p.name, p.tier, memory_share * catalog.device(p.device).memory_gib * 2**30 * p.count / per_vector, p.count)
            for p in infra.pools]


def deploy(workload_dir: str, infra: InfraSpec, deployment: Deployment) -> tuple[list[dict], dict[str, str]]:
    """DEPLOY one strategy: build each pool's partitions on its worker; returns what was built and where."""
    futures = {}
    for pool in infra.pools:
        specs = [s for s, p in zip(deployment.specs, deployment.pools) if p == pool.name]
        if specs:
            with on_pool(pool):
                futures[pool.name] = build_partitions.submit(workload_dir, deployment.strategy, specs, pool.name)
    built, workers = [], {}
    for name, future in futures.items():
        outcome = future.result()
        built += [{**b, "pool": name} for b in outcome["partitions"]]
        workers[name] = outcome["worker"]
    return built, workers


def searcher(workload_dir: str, strategy: str, workers: dict[str, str], k: int):
    """Search jobs on the workers holding the partitions, one pool after another.

    Pools are measured one at a time because every worker here shares this host's cores:
    searching all pools at once would time contention, not the partitions.
    """

    def search(jobs):
        answers = {}
        for pool, pool_jobs in jobs.items():
            with on_worker(workers[pool]):
                result = search_partitions.submit(workload_dir, strategy, pool_jobs, k, pool).result()
            answers[pool] = (result["D"], result["I"], result["seconds"])
        return answers

    return search


def not_built(deployment: Deployment, reason: str) -> StrategyResult:
    plan = deployment.plan
    return StrategyResult(plan.strategy, plan.method, len(plan.partitions), plan.storage, 0.0, 0, float("nan"),
                          float("nan"), float("nan"), float("nan"), float("nan"), False, 1.0,
                          plan.expected_latency_s * 1e3, float("nan"), float("nan"), 0, built=False, notes=[reason])


@flow(name="honeybee-stages", log_prints=True)
def honeybee_stages(workload_dir: str, infra: str, storage_budget: float, recall_target: float, k: int,
                    near_tier: str | None, max_index_gib: float, results_dir: str, run_id: str) -> dict:
    logger = get_run_logger()
    infra_spec = load_infra_spec(infra)
    validate(infra_spec.pools_frame(), "infra.pools", infra)
    workload = load_workload(workload_dir)
    rbac = Rbac.of(workload)
    stats = describe(workload)
    out = Path(results_dir) / "honeybee" / run_id
    out.mkdir(parents=True, exist_ok=True)

    measured = profile(workload_dir, infra_spec, grid_for(len(workload.vectors)))
    measured.to_csv(out / "search_profile.csv", index=False)
    model = fit_cost_model(measured, recall_floor=recall_target)
    (out / "cost_model.json").write_text(json.dumps(model.to_dict(), indent=2))
    logger.info("cost model fitted: %s", model.fit)

    problem = build_problem(rbac, workload.query_users, model, storage_budget=storage_budget, name=workload.name)
    plans = plan_all(problem)
    (out / "plan.json").write_text(json.dumps(plans["honeybee"].to_dict(), indent=2))
    slots = pool_slots(infra_spec, workload.vectors.shape[1])
    deployments = {s: make_deployment(problem, plan, model, slots, near_tier) for s, plan in plans.items()}

    query_ids = np.arange(len(workload.queries))
    truth = ground_truth(workload.vectors, workload.queries, query_ids, workload.query_users, rbac, k)
    results, built_all = [], []
    for strategy, deployment in deployments.items():
        gib = index_gib(deployment.plan.storage, len(workload.vectors), workload.vectors.shape[1])
        if gib > max_index_gib:
            results.append(not_built(deployment, f"not built: its indexes would take ≈{gib:.1f} GiB "
                                                  f"(> max_index_gib = {max_index_gib}); storage and predicted latency are the plan's"))
            continue
        built, workers = deploy(workload_dir, infra_spec, deployment)
        built_all += [{**b, "strategy": strategy} for b in built]
        search = searcher(workload_dir, strategy, workers, k)
        run, scale, notes = calibrate_and_measure(deployment, query_ids, workload.query_users, truth, rbac, search, k,
                                                  recall_target)
        results.append(summarize(deployment, run, truth, query_ids, workload.query_users, rbac, recall_target, scale,
                                 built, notes))
        for pool, worker in workers.items():
            with on_worker(worker):
                drop_partitions.submit(workload_dir, strategy, pool).result()
        logger.info("%s: %.0f QPS, recall %.3f, storage %.2f×", strategy, results[-1].qps, results[-1].recall,
                    results[-1].storage)
    return evaluate(workload.name, stats, results, deployments, model, recall_target, storage_budget,
                    pd.DataFrame(built_all), out, run_id)


def evaluate(name: str, stats: dict, results: list[StrategyResult], deployments: dict[str, Deployment], model,
             target: float, budget: float, built: pd.DataFrame, out: Path, run_id: str) -> dict:
    """EVALUATE: the side-by-side table, plot, report, artifacts and the run summary."""
    table = report.results_table(results)
    validate(table.drop(columns=["method"]), "honeybee.evaluation", "evaluate stage")
    table.to_csv(out / "strategies.csv", index=False)
    built.to_csv(out / "partitions.csv", index=False)
    plot = report.latency_storage_plot(table, out / "latency_vs_storage.png", f"HoneyBee on {name}: latency vs storage")
    placement = {s: d.summary()["pools"] for s, d in deployments.items()}
    notes = {r.strategy: r.notes for r in results}
    markdown = report.markdown_report(name, stats, table, target, budget, model.fit, placement, SIMULATED, plot.name, notes)
    (out / "report.md").write_text(markdown)
    create_table_artifact(table.round(4).to_dict("records"), key="honeybee-strategies", description="strategies side by side")
    create_markdown_artifact(markdown, key="honeybee-report", description="HoneyBee report")

    by = table.set_index("strategy")
    hb = by.loc["honeybee"]
    baselines = [s for s in STRATEGIES if s != "honeybee" and s in by.index]
    summary = {
        "system": "honeybee",
        "run_id": run_id,
        "workload": name,
        "key_figure": "qps",
        "higher_is_better": True,
        "value": round(float(hb.qps), 1),
        "baselines": {s: round(float(by.loc[s, "qps"]), 1) for s in baselines if by.loc[s, "built"]},
        "speedup": {s: round(float(hb.qps / by.loc[s, "qps"]), 3) for s in baselines if by.loc[s, "built"]},
        "storage": {s: round(float(by.loc[s, "storage"]), 3) for s in by.index},
        "recall": {s: round(float(by.loc[s, "recall"]), 4) for s in by.index if by.loc[s, "built"]},
        "recall_target": target,
        "storage_budget": budget,
        "method": str(hb.method),
        "not_built": [s for s in by.index if not by.loc[s, "built"]],
        "rejected_at_merge": int(table.rejected_at_merge.sum()),
        "results": str(out),
        "simulated": SIMULATED,
    }
    document = {"summary": summary, "workload": stats, "strategies": table.to_dict("records"), "notes": notes,
                "cost_model": model.to_dict(), "deployments": {s: d.summary() for s, d in deployments.items()}}
    (out / "evaluation.json").write_text(json.dumps(document, indent=2, default=str))
    return summary


@flow(name="honeybee", log_prints=True)
def honeybee(
    workload: str | None = None,
    infra: str = str(DEFAULT_INFRA),
    scale: str = "small",
    storage_budget: float = 1.4,
    recall_target: float = 0.95,
    k: int = 10,
    near_tier: str | None = "edge",
    max_index_gib: float = 4.0,
    scheduler: str | None = None,
    results_dir: str = "results",
    run_id: str | None = None,
) -> dict:
    """Partition a vector collection for role-based access and compare with the baselines.

    Parameters
    ----------
    workload: a workload folder (vectors.npy, doc_roles.csv, user_roles.csv, queries.npy,
        query_users.csv); by default one is generated for ``scale`` (and kept for reuse).
    infra: an infrastructure spec (YAML).
    scale: small | medium | large — the generated workload (the profiling grid follows its size).
    storage_budget: the most vector copies per document HoneyBee may store (≥ 1).
    recall_target: recall@k every strategy must reach (mean over queries).
    k: results per query.
    near_tier: the tier users query from; the hottest partitions are placed there.
    max_index_gib: strategies whose indexes would need more memory are planned but not built.
    scheduler: address of an existing Dask scheduler; by default an embedded cluster is started.
    results_dir: where results/honeybee/<run-id>/ is written.
    run_id: name of the run folder (default: a timestamp and a short id).
    """
    if scale not in ("small", "medium", "large"):
        raise ValueError(f"scale must be one of small, medium, large, got {scale!r}")
    check_settings("honeybee flow parameters", {"storage_budget": storage_budget, "recall_target": recall_target,
                                                "k": k, "near_tier": near_tier, "max_index_gib": max_index_gib})
    workload_dir = str(Path(workload).resolve()) if workload else str(ensure_generated(scale))
    load_workload(workload_dir)  # bad input fails here, before the cluster starts
    spec = load_infra_spec(infra)
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    started = time.perf_counter()
    with TieredCluster(spec, scheduler=scheduler) as cluster:
        stages = honeybee_stages.with_options(task_runner=DaskTaskRunner(address=cluster.address))
        summary = stages(workload_dir, infra, storage_budget, recall_target, k, near_tier, max_index_gib,
                         results_dir, run_id)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    return summary
