"""HoneyBee in one process, without a cluster: what ``tierflow honeybee query`` runs.

The same planning, building, searching and measuring code as the flow, with one
in-process :class:`PartitionServer` standing in for the tier workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimizers.honeybee import PoolSlot
from optimizers.honeybee_cost import SearchCostModel, fit_cost_model
from tasks.honeybee.evaluate import QueryRun, StrategyResult, calibrate_and_measure, ground_truth, summarize
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
                storage_budget: float = 1.4, recall_target: float = 0.95, build_threads: int = 1) -> dict[str, LocalRun]:
    """Plan, build, calibrate and measure ``strategies`` on ``workload`` in this process
    (indexes built with ``build_threads`` faiss threads; queries always run on one)."""
    rbac = Rbac.of(workload)
    model = model.with_floor(recall_target)
    problem = build_problem(rbac, workload.query_users, model, storage_budget=storage_budget, name=workload.name)
    plans = plan_all(problem, tuple(strategies))
    slots = [PoolSlot(LOCAL_POOL, "cloud", float("inf"))]
    query_ids = np.arange(len(workload.queries))
    truth = ground_truth(workload.vectors, workload.queries, query_ids, workload.query_users, rbac, k)
    server = PartitionServer(workload.vectors, workload.queries, rbac)
    out = {}
    for strategy in strategies:
        deployment = make_deployment(problem, plans[strategy], model, slots, near_tier=None)
        built = server.build(strategy, deployment.specs, threads=build_threads)

        def search(jobs, strategy=strategy):
            return {pool: server.search(strategy, pool_jobs, k) for pool, pool_jobs in jobs.items()}

        run, scale, notes = calibrate_and_measure(deployment, query_ids, workload.query_users, truth, rbac, search, k,
                                                  recall_target)
        result = summarize(deployment, run, truth, query_ids, workload.query_users, rbac, recall_target, scale,
                           built, notes)
        server.drop(strategy)
        out[strategy] = LocalRun(result, run, deployment)
    return out
