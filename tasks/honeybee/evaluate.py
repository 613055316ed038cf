"""Run a strategy's queries for real and measure them: latency, QPS, recall@k, security.

``search`` is how jobs reach the partitions: a local :class:`PartitionServer` (the
``tierflow honeybee query`` command) or per-pool tasks on the tier workers (the flow). A
query fans out to the partitions routed to its user, each searched with the user's
permission filter; :func:`merge_results` merges and re-checks permissions. A query's
latency is the sum of its partition searches plus the merge (one core serves it), so
QPS = 1 / mean latency per core. Each measured search's time is its median over
:data:`~tasks.honeybee.index.TIMED_PASSES` passes over the jobs (a shared core's lost time
slices would otherwise land on whichever search ran then).

Every strategy is held to the same recall target the same way: searches start at the
efforts the cost model predicts for the floor, and while the measured recall@k on a
calibration sample is below the target (plus a small margin), every HNSW efSearch and IVF
nprobe is multiplied by 1.5 (the
``rls`` baseline "raises ef until recall meets the target" this way). Strategies compared
in one run are built together and measured interleaved, chunk by chunk of the queries
(:func:`measure_interleaved`), so the noise of a shared machine does not favour one —
:func:`evaluate_strategies`, what the flow and ``tierflow honeybee query`` both run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tasks.honeybee.index import TIMED_PASSES, exact_search, recall_at_k
from tasks.honeybee.plans import Deployment, effective_roles
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.serve import SearchJob, merge_results

# (pool → jobs, timed passes) → pool → (D, I, seconds), one row per job
SearchFn = Callable[[dict[str, list[SearchJob]], int], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]
# the same for several strategies in one go, searched in the mapping's order:
# (strategy → pool → jobs, timed passes) → strategy → pool → (D, I, seconds)
SearchTogetherFn = Callable[[dict[str, dict[str, list[SearchJob]]], int], dict[str, dict]]
EFFORT_STEP = 1.5
MAX_CALIBRATION_ROUNDS = 12
CALIBRATION_MARGIN = 0.003  # the sample must beat the target by this much: the full query set is not the sample


def ground_truth(vectors: np.ndarray, queries: np.ndarray, query_ids: np.ndarray, users: np.ndarray, rbac: Rbac,
                 k: int) -> np.ndarray:
    """Exact top-k among the documents each query's user may see: (len(query_ids), k) ids."""
    truth = np.full((len(query_ids), k), -1, dtype=np.int64)
    by_roles: dict[frozenset[str], list[int]] = {}
    for row, user in enumerate(users[query_ids]):
        by_roles.setdefault(rbac.user_roles_of(user), []).append(row)
    for roles, rows in by_roles.items():
        _, truth[rows] = exact_search(vectors, queries[query_ids[rows]], k, rbac.permitted_mask(roles))
    return truth


@dataclass
class QueryRun:
    """What running a strategy's queries measured."""

    found: np.ndarray  # (q, k) doc ids, distance order, -1 padded
    latency_s: np.ndarray  # (q,) seconds: partition searches + merge
    searches: np.ndarray  # (q,) partitions searched
    rejected_at_merge: int  # documents the final permission check dropped (0 unless a filter failed)

    @classmethod
    def concat(cls, runs: list["QueryRun"]) -> "QueryRun":
        """Runs over consecutive chunks of the queries, as one run over all of them."""
        return cls(np.concatenate([r.found for r in runs]), np.concatenate([r.latency_s for r in runs]),
                   np.concatenate([r.searches for r in runs]), sum(r.rejected_at_merge for r in runs))


@dataclass
class Routed:
    """A chunk of queries fanned out to their partitions: the jobs per pool, and where each query's
    answers will be (pool, row of that pool's jobs)."""

    jobs: dict[str, list[SearchJob]]
    where: list[list[tuple[str, int]]]
    roles_of: list[frozenset[str]]


def route_queries(deployment: Deployment, query_ids: np.ndarray, users: np.ndarray, rbac: Rbac,
                  effort_scale: float = 1.0) -> Routed:
    """Fan ``query_ids`` out to their users' partitions, at the efforts × ``effort_scale``."""
    jobs: dict[str, list[SearchJob]] = {}
    where: list[list[tuple[str, int]]] = []
    roles_of = [effective_roles(rbac, rbac.user_roles_of(u)) for u in users[query_ids]]
    for q, roles in zip(query_ids, roles_of):
        slots = []
        # A user whose roles grant nothing (all revoked, or left) has no route: the answer is empty.
        for pid, effort, exact in (deployment.routes[roles] if roles else ()):
            pool = deployment.pools[pid]
            scaled = effort if exact or deployment.specs[pid].kind == "flat" else int(math.ceil(effort * effort_scale))
            jobs.setdefault(pool, []).append(SearchJob(int(q), roles, pid, scaled, exact))
            slots.append((pool, len(jobs[pool]) - 1))
        where.append(slots)
    return Routed(jobs, where, roles_of)


def merge_queries(routed: Routed, answers: dict, rbac: Rbac, k: int) -> QueryRun:
    """Merge each query's partition answers (re-checking permissions); its latency is its searches'
    time plus the merge's."""
    n = len(routed.where)
    found = np.full((n, k), -1, dtype=np.int64)
    latency = np.zeros(n)
    searches = np.zeros(n, dtype=int)
    rejected = 0
    for row, (slots, roles) in enumerate(zip(routed.where, routed.roles_of)):
        start = time.perf_counter()
        permitted = rbac.permitted_mask(roles)
        found[row], dropped = merge_results([answers[pool][0][j] for pool, j in slots],
                                            [answers[pool][1][j] for pool, j in slots], permitted, k)
        merge_s = time.perf_counter() - start
        latency[row] = sum(answers[pool][2][j] for pool, j in slots) + merge_s
        searches[row] = len(slots)
        rejected += dropped
    return QueryRun(found, latency, searches, rejected)


def run_queries(deployment: Deployment, query_ids: np.ndarray, users: np.ndarray, rbac: Rbac, search: SearchFn,
                k: int, effort_scale: float = 1.0, passes: int = 1) -> QueryRun:
    """Fan ``query_ids`` out to their users' partitions, search (timed over ``passes``), merge; time everything."""
    routed = route_queries(deployment, query_ids, users, rbac, effort_scale)
    return merge_queries(routed, search(routed.jobs, passes), rbac, k)


@dataclass
class StrategyResult:
    """One strategy's figures on the query workload."""

    strategy: str
    method: str
    partitions: int
    storage: float
    build_s: float
    index_bytes: int
    qps: float
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    recall: float
    meets_target: bool
    effort_scale: float
    predicted_latency_mean_ms: float
    predicted_recall: float
    searches_per_query: float
    rejected_at_merge: int
    built: bool = True
    notes: list[str] = field(default_factory=list)


def calibrate(deployment: Deployment, query_ids: np.ndarray, users: np.ndarray, truth: np.ndarray, rbac: Rbac,
              search: SearchFn, k: int, target: float, *, calibration: int = 300, seed: int = 0) -> tuple[float, list[str]]:
    """The effort scale at which a calibration sample of the queries reaches ``target`` recall
    (plus :data:`CALIBRATION_MARGIN`): efforts ×1.5 per round, from the model's."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(query_ids), size=min(calibration, len(query_ids)), replace=False))
    scale, notes = 1.0, []
    if not _tunable(deployment):
        return scale, notes
    for _ in range(MAX_CALIBRATION_ROUNDS):
        run = run_queries(deployment, query_ids[sample], users, rbac, search, k, scale)
        if recall_at_k(run.found, truth[sample]) >= min(target + CALIBRATION_MARGIN, 1.0):
            return scale, notes
        scale *= EFFORT_STEP
    notes.append(f"recall target {target} not reached on the calibration sample after "
                 f"{MAX_CALIBRATION_ROUNDS} rounds (effort ×{scale:.1f})")
    return scale, notes


def _tunable(deployment: Deployment) -> bool:
    """Whether the deployment has an effort to raise (a graph walk or an IVF probe)."""
    return any(not exact and deployment.specs[pid].kind in ("hnsw", "ivf")
               for route in deployment.routes.values() for pid, _, exact in route)


@dataclass
class Contender:
    """A deployed strategy ready to be measured: how to reach it and its calibrated effort scale."""

    deployment: Deployment
    search: SearchFn
    scale: float = 1.0
    notes: list[str] = field(default_factory=list)


def measure_interleaved(contenders: dict[str, Contender], query_ids: np.ndarray, users: np.ndarray,
                        truth: np.ndarray, rbac: Rbac, k: int, target: float, *,
                        chunk: int = 250, together: SearchTogetherFn | None = None) -> dict[str, QueryRun]:
    """Run every query for every contender, interleaved: chunk by chunk of ``query_ids``, each
    contender in turn (the order rotating), so a noisy spell on a shared machine falls on all
    of them alike instead of on whichever ran then. With ``together``, a chunk's searches for every
    contender go out in one call (one task per pool, the contenders searched there in turn, in the
    same rotating order) instead of one call per contender.

    A contender whose whole-set recall falls short of ``target`` (its calibration sample
    met it) has its efforts raised and is re-run alone, at most three times; its
    ``scale`` and ``notes`` say so.
    """
    names = list(contenders)
    # without ``together``, each contender's own search in turn
    search_all = together or (lambda jobs, passes: {name: contenders[name].search(by_pool, passes)
                                                    for name, by_pool in jobs.items()})
    parts: dict[str, list[QueryRun]] = {name: [] for name in names}
    for i, start in enumerate(range(0, len(query_ids), chunk) or [0]):
        rows = query_ids[start : start + chunk]
        order = names[i % len(names):] + names[: i % len(names)]
        routed = {name: route_queries(contenders[name].deployment, rows, users, rbac, contenders[name].scale)
                  for name in order}
        answers = search_all({name: r.jobs for name, r in routed.items()}, TIMED_PASSES)
        for name in order:
            parts[name].append(merge_queries(routed[name], answers[name], rbac, k))
    runs = {name: QueryRun.concat(parts[name]) for name in names}
    for name, c in contenders.items():
        for _ in range(3):
            if recall_at_k(runs[name].found, truth) >= target or not _tunable(c.deployment):
                break
            c.scale *= EFFORT_STEP
            c.notes.append(f"whole query set below the recall target at the calibrated effort: raised to ×{c.scale:.2f} "
                           "and re-run on its own")
            runs[name] = run_queries(c.deployment, query_ids, users, rbac, c.search, k, c.scale, TIMED_PASSES)
    return runs


def evaluate_strategies(deployments: dict[str, Deployment],
                        build: Callable[[str, Deployment], tuple[list[dict], SearchFn]], drop: Callable[[str], None],
                        query_ids: np.ndarray, users: np.ndarray, truth: np.ndarray, rbac: Rbac, k: int,
                        target: float, together: SearchTogetherFn | None = None
                        ) -> dict[str, tuple[StrategyResult, QueryRun]]:
    """Every strategy on the same queries, the same way: build them all (``build(name, deployment)``
    returns what was built and how to search it), calibrate each to ``target``, measure them interleaved
    (:func:`measure_interleaved`; ``together`` searches a chunk for all of them in one call),
    summarize, then ``drop`` each.

    All of them are built before any is measured, so their indexes are in memory together.
    """
    contenders, built = {}, {}
    for name, deployment in deployments.items():
        built[name], search = build(name, deployment)
        scale, notes = calibrate(deployment, query_ids, users, truth, rbac, search, k, target)
        contenders[name] = Contender(deployment, search, scale, notes)
    runs = measure_interleaved(contenders, query_ids, users, truth, rbac, k, target, together=together)
    out = {}
    for name, c in contenders.items():
        out[name] = (summarize(c.deployment, runs[name], truth, query_ids, users, rbac, target, c.scale, built[name],
                               c.notes), runs[name])
        drop(name)
    return out


def summarize(deployment: Deployment, run: QueryRun, truth: np.ndarray, query_ids: np.ndarray, users: np.ndarray,
              rbac: Rbac, target: float, scale: float, build: list[dict], notes: list[str]) -> StrategyResult:
    """The figures of one measured strategy, with the model's predictions beside them."""
    recall = recall_at_k(run.found, truth)
    roles = [effective_roles(rbac, rbac.user_roles_of(u)) for u in users[query_ids]]
    # A user who may see nothing searches nothing: predicted 0 s, and the empty answer is exact.
    predicted_latency = float(np.mean([deployment.predicted_latency[r] if r else 0.0 for r in roles]))
    predicted_recall = float(np.mean([deployment.predicted_recall[r] if r else 1.0 for r in roles]))
    mean = float(run.latency_s.mean())
    return StrategyResult(
        strategy=deployment.strategy, method=deployment.plan.method, partitions=len(deployment.specs),
        storage=deployment.plan.storage, build_s=float(sum(b["build_s"] for b in build)),
        index_bytes=int(sum(b["nbytes"] for b in build)), qps=1.0 / mean if mean > 0 else math.inf,
        latency_mean_ms=mean * 1e3, latency_p50_ms=float(np.percentile(run.latency_s, 50)) * 1e3,
        latency_p99_ms=float(np.percentile(run.latency_s, 99)) * 1e3, recall=recall, meets_target=recall >= target,
        effort_scale=scale, predicted_latency_mean_ms=predicted_latency * 1e3, predicted_recall=predicted_recall,
        searches_per_query=float(run.searches.mean()), rejected_at_merge=run.rejected_at_merge,
        notes=deployment.plan.notes + deployment.notes + notes,
    )
