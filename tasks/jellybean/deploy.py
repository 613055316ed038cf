"""Applying a plan: which requests of the stream each assigned worker serves, and what it achieved."""

from __future__ import annotations

import pandas as pd

from infra.catalog import TIERS
from optimizers.jellybean import JellyBeanProblem, Plan


def split_requests(request_ids: list[int], shares: dict[str, float]) -> dict[str, list[int]]:
    """Deal ``request_ids`` to workers in proportion to ``shares`` (largest remainder, deterministic).

    When there are at least as many requests as workers, every worker gets one first, so
    each assignment of the plan is exercised even in a short stream.
    """
    total = sum(shares.values())
    if total <= 0:
        raise ValueError("no worker has a positive share")
    n, workers = len(request_ids), sorted(shares)
    base = 1 if n >= len(workers) else 0
    rest = n - base * len(workers)
    exact = {w: rest * shares[w] / total for w in workers}
    counts = {w: base + int(exact[w]) for w in workers}
    for w in sorted(workers, key=lambda w: exact[w] - int(exact[w]), reverse=True)[: n - sum(counts.values())]:
        counts[w] += 1
    out, start = {}, 0
    for w in workers:
        out[w] = request_ids[start : start + counts[w]]
        start += counts[w]
    return {w: ids for w, ids in out.items() if ids}


def stream_plan(plan: Plan) -> dict[str, dict[str, float]]:
    """Operator → {worker: planned rate}, the shares the stream is dealt by."""
    shares: dict[str, dict[str, float]] = {}
    for a in plan.assignment:
        if a.rate > 1e-9:
            shares.setdefault(a.operator, {})[a.worker] = shares.get(a.operator, {}).get(a.worker, 0.0) + a.rate
    return shares


def deployment_table(problem: JellyBeanProblem, plan: Plan, results: list, speedup: dict[str, float]) -> pd.DataFrame:
    """Per (operator, worker): requests served, time per request here, and the rate it achieves.

    ``achieved_rate`` is what the worker's machines sustain on their (simulated) device:
    machines × 1000 / (measured ms here / device speed-up), capped by nothing: compare it
    with ``planned_rate`` (what the plan asks of them).
    """
    machines = {(a.operator, a.worker): a.machines for a in plan.assignment}
    planned = {(a.operator, a.worker): a.rate for a in plan.assignment}
    rows = []
    for r in results:
        pool = problem.pool_by_name[r.pool]
        ms_device = r.ms_per_request / speedup[r.pool]
        rows.append({
            "strategy": plan.strategy,
            "operator": r.operator,
            "worker": r.pool,
            "tier": TIERS[pool.tier],
            "dask_worker": r.worker,
            "requests": len(r.request_ids),
            "measured_ms_per_request": r.ms_per_request,
            "achieved_rate": machines[r.operator, r.pool] * 1000.0 / ms_device,
            "planned_rate": planned[r.operator, r.pool],
        })
    return pd.DataFrame(rows)


def tier_crossing_kib_per_request(problem: JellyBeanProblem, results: list, source_kib: dict[tuple[str, str], float]) -> float:
    """KiB per end-to-end request that crossed a tier upward in the deployed stream.

    Operator outputs count at their real serialized size; a source's payload at the
    profiled message size of its edge (``source_kib``, keyed by edge).
    """
    where: dict[tuple[str, int], int] = {}
    out_bytes: dict[tuple[str, int], int] = {}
    for r in results:
        for rid in r.request_ids:
            where[r.operator, rid] = problem.pool_by_name[r.pool].tier
            out_bytes[r.operator, rid] = r.out_bytes[rid]
    requests = {rid for r in results for rid in r.request_ids}
    crossing = 0.0
    for u, v in problem.edges:
        for rid in requests:
            if (v, rid) not in where:
                continue
            src_tier = problem.source_tier[u] if u in problem.sources else where[u, rid]
            if where[v, rid] > src_tier:
                crossing += source_kib[u, v] if u in problem.sources else out_bytes[u, rid] / 1024
    return crossing / max(len(requests), 1)
