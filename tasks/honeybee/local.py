"""HoneyBee in one process, without a cluster: what ``tierflow honeybee query`` runs.

The same planning, building, searching and measuring code as the flow, with one
in-process :class:`PartitionServer` standing in for the tier workers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from optimizers.honeybee import PoolSlot
from optimizers.honeybee_cost import SearchCostModel, fit_cost_model
from tasks.honeybee.evaluate import QueryRun, StrategyResult, evaluate_strategies, ground_truth
from tasks.honeybee.plans import Deployment, build_problem, make_deployment, plan_all
from tasks.honeybee.profile import GRIDS, measure_search
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.serve import PartitionServer
from tasks.honeybee.workload import Workload

LOCAL_POOL = "local"


def profile_locally(workload: Workload, grid: str, recall_target: float, seed: int = 0) -> SearchCostModel:
    """Measure the search grid in this process and fit the cost model."""
    frame = measure_search(workload.vectors, workload.queries, GRIDS[grid], seed=seed)
    return fit_cost_model(frame, recall_floor=recall_target)


@dataclass
class LocalRun:
    """One strategy run in this process: its figures, its answers and its deployment."""

    result: StrategyResult
    run: QueryRun
    deployment: Deployment


def run_locally(workload: Workload, strategies: list[str], model: SearchCostModel, *, k: int = 10,
                storage_budget: float = 1.4, recall_target: float = 0.95, build_threads: int = 1,
                extra_budgets: tuple[float, ...] = ()) -> dict[str, LocalRun]:
    """Plan, build, calibrate and measure ``strategies`` on ``workload`` in this process
    (indexes built with ``build_threads`` faiss threads; queries always run on one).

    Every strategy is built and calibrated first, then all are measured interleaved
    (:func:`evaluate_strategies`). ``extra_budgets`` adds HoneyBee planned at other storage
    budgets, keyed ``honeybee@<budget>``.
    """
    rbac = Rbac.of(workload)
    model = model.with_floor(recall_target)
    problem = build_problem(rbac, workload.query_users, model, storage_budget=storage_budget, name=workload.name)
    plans = plan_all(problem, tuple(strategies))
    for budget in extra_budgets:
        plans[f"honeybee@{budget:g}"] = plan_all(replace(problem, storage_budget=budget), ("honeybee",))["honeybee"]
    slots = [PoolSlot(LOCAL_POOL, "cloud", float("inf"))]
    query_ids = np.arange(len(workload.queries))
    truth = ground_truth(workload.vectors, workload.queries, query_ids, workload.query_users, rbac, k)
    server = PartitionServer(workload.vectors, workload.queries, rbac)
    deployments = {name: make_deployment(problem, plan, model, slots, near_tier=None) for name, plan in plans.items()}

    def build(name: str, deployment: Deployment):
        def search(jobs, passes):
            return {pool: server.search(name, pool_jobs, k, passes=passes) for pool, pool_jobs in jobs.items()}

        return server.build(name, deployment.specs, threads=build_threads), search

    measured = evaluate_strategies(deployments, build, server.drop, query_ids, workload.query_users, truth, rbac, k,
                                   recall_target)
    return {name: LocalRun(result, run, deployments[name]) for name, (result, run) in measured.items()}
