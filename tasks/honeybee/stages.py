"""HoneyBee's stages on the tiered cluster: what the flow (flows/honeybee/flow.py) tells in order.

The search cost and recall models are measured on a worker and fitted; every strategy (HoneyBee's
partitioning and its baselines) is planned for the same workload; each strategy's partitions are
built on the pools the placement chose and the same queries run against every strategy at the same
recall target; :func:`evaluate` puts them side by side through the run's :class:`RunContext`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE

from data_contracts import validate
from infra.catalog import load_catalog
from infra.cluster import on_pool, on_worker
from infra.spec import InfraSpec
from optimizers.honeybee import PoolSlot
from tasks.common.run import RunContext
from tasks.common.tasks import task
from tasks.honeybee import report
from tasks.common.summary import Row
from tasks.honeybee.evaluate import StrategyResult, evaluate_strategies, ground_truth
from tasks.honeybee.plans import Deployment, index_bytes_per_vector, index_gib, make_deployment, plan_all
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.tasks import build_partitions, drop_partitions, profile_search, search_partitions

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


@task(cache_policy=NO_CACHE, task_run_name="plan every strategy")
def plan_strategies(problem, strategies: list[str], model, slots: list[PoolSlot],
                    near_tier: str | None) -> tuple[dict, dict[str, Deployment]]:
    """OPTIMIZE: every strategy's partitioning of the same problem (HoneyBee's MILP among them), and
    each plan's deployment (partitions placed on the pools' ``slots``, every role's route with its
    search efforts from ``model``), in the flow's process."""
    plans = plan_all(problem, tuple(strategies))
    return plans, {s: make_deployment(problem, plan, model, slots, near_tier) for s, plan in plans.items()}


@task(cache_policy=NO_CACHE, task_run_name="exact answers of the queries")
def exact_answers(workload, rbac: Rbac, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every query's exact top-k among the documents its user may see (what recall is measured
    against), in the flow's process."""
    query_ids = np.arange(len(workload.queries))
    return query_ids, ground_truth(workload.vectors, workload.queries, query_ids, workload.query_users, rbac, k)


def pool_slots(infra: InfraSpec, dim: int, memory_share: float = 0.5) -> list[PoolSlot]:
    """How many documents each pool can hold: half its machines' memory (catalog) per stored vector."""
    catalog = load_catalog()
    per_vector = index_bytes_per_vector(dim)
    return [PoolSlot(p.name, p.tier, memory_share * catalog.device(p.device).memory_gib * 2**30 * p.count / per_vector,
                     p.count) for p in infra.pools]


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


def searcher(workload_dir: str, workers_of: dict[str, dict[str, str]], k: int):
    """Search jobs of one or several strategies (strategy → pool → jobs) on the workers holding their
    partitions: one task per worker, which searches every strategy's jobs there in turn (the order
    given), the workers one after another. Pools are measured one at a time because every worker
    here shares this host's cores: searching all pools at once would time contention, not the
    partitions."""

    def search(jobs: dict[str, dict[str, list]], passes: int) -> dict[str, dict]:
        answers: dict[str, dict] = {strategy: {} for strategy in jobs}
        by_worker: dict[tuple[str, str], list[str]] = {}
        for strategy, pools in jobs.items():
            for pool in pools:
                by_worker.setdefault((workers_of[strategy][pool], pool), []).append(strategy)
        for (worker, pool), strategies in by_worker.items():
            with on_worker(worker):
                result = search_partitions.submit(workload_dir, strategies, {s: jobs[s][pool] for s in strategies},
                                                  k, pool, passes).result()
            for strategy, found in result.items():
                answers[strategy][pool] = (found["D"], found["I"], found["seconds"])
        return answers

    return search


def not_built(deployment: Deployment, reason: str) -> StrategyResult:
    plan = deployment.plan
    return StrategyResult(plan.strategy, plan.method, len(plan.partitions), plan.storage, 0.0, 0, float("nan"),
                          float("nan"), float("nan"), float("nan"), float("nan"), False, 1.0,
                          plan.expected_latency_s * 1e3, float("nan"), float("nan"), 0, built=False, notes=[reason])


def deploy_and_measure(workload, workload_dir: str, infra: InfraSpec, deployments: dict[str, Deployment], k: int,
                       recall_target: float, max_index_gib: float) -> tuple[list[StrategyResult], pd.DataFrame]:
    """DEPLOY every strategy, then measure them all interleaved on the same queries at the same recall
    target (:func:`tasks.honeybee.evaluate.evaluate_strategies`); partitions are dropped once measured."""
    logger = get_run_logger()
    rbac = Rbac.of(workload)
    query_ids, truth = exact_answers(workload, rbac, k)
    skipped, to_build, built_all, workers_of = {}, {}, [], {}
    search = searcher(workload_dir, workers_of, k)  # reads workers_of as the strategies are built
    for strategy, deployment in deployments.items():
        gib = index_gib(deployment.plan.storage, len(workload.vectors), workload.vectors.shape[1])
        if gib > max_index_gib:
            skipped[strategy] = not_built(deployment, f"not built: its indexes would take ≈{gib:.1f} GiB "
                                                      f"(> max_index_gib = {max_index_gib}); storage and predicted "
                                                      "latency are the plan's")
        else:
            to_build[strategy] = deployment

    def build(strategy: str, deployment: Deployment):
        built, workers_of[strategy] = deploy(workload_dir, infra, deployment)
        built_all.extend({**b, "strategy": strategy} for b in built)
        return built, lambda jobs, passes: search({strategy: jobs}, passes)[strategy]

    def drop(strategy: str):
        for pool, worker in workers_of[strategy].items():
            with on_worker(worker):
                drop_partitions.submit(workload_dir, strategy, pool).result()

    measured = evaluate_strategies(to_build, build, drop, query_ids, workload.query_users, truth, rbac, k, recall_target,
                                   together=search)
    results = [measured[s][0] if s in measured else skipped[s] for s in deployments]
    for r in results:
        logger.info("%s: %.0f QPS, recall %.3f, storage %.2f×", r.strategy, r.qps, r.recall, r.storage)
    return results, pd.DataFrame(built_all)


def evaluate(run: RunContext, name: str, stats: dict, results: list[StrategyResult], deployments: dict[str, Deployment],
             model, built: pd.DataFrame, strategies: list[str]) -> None:
    """EVALUATE: the side-by-side table, plot, report, artifacts and the run's rows."""
    params = run.params
    table = report.results_table(results)
    validate(table.drop(columns=["method"]), "honeybee.evaluation", "evaluate stage")
    run.write_table("strategies", table, "strategies side by side")
    run.write_table("partitions", built)
    plot = report.latency_storage_plot(table, run.path("latency_vs_storage.png"), f"HoneyBee on {name}: latency vs storage")
    placement = {s: d.summary()["pools"] for s, d in deployments.items()}
    notes = {r.strategy: r.notes for r in results}
    run.write_report(report.markdown_report(name, stats, table, params.recall_target, params.storage_budget, model.fit,
                                            placement, SIMULATED, plot.name, notes))

    by = table.set_index("strategy")
    mine = strategies[0]
    summary = run.summary
    summary.simulated = SIMULATED
    summary.regime = report.regime(stats)
    # each row against the baseline it is about (QPS vs rls; latency and storage vs per_role, ...)
    summary.rows += [Row(**{**r, "simulated": bool(r["simulated"])})
                     for r in report.summary_rows(table, summary.regime, SIMULATED) if r["ratio"] is not None]
    summary.details = {
        "workload": name,
        "state": stats.get("state"),  # the update state the permissions were read from, if any
        "storage": {s: round(float(by.loc[s, "storage"]), 3) for s in by.index},
        "recall": {s: round(float(by.loc[s, "recall"]), 4) for s in by.index if by.loc[s, "built"]},
        "recall_target": params.recall_target,
        "storage_budget": params.storage_budget,
        "method": str(by.loc[mine, "method"]),
        "not_built": [s for s in by.index if not by.loc[s, "built"]],
        "rejected_at_merge": int(table.rejected_at_merge.sum()),
    }
    run.write_evaluation({"workload": stats, "strategies": table.to_dict("records"), "notes": notes,
                          "cost_model": model.to_dict(), "deployments": {s: d.summary() for s, d in deployments.items()}})
