"""From a workload to deployable plans: the optimizer's problem, each strategy's plan, and how
every user class searches each partition (index kind and effort, from the cost model)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from optimizers.honeybee import (
    STRATEGIES, Block, PartitioningProblem, PartitionPlan, PoolSlot, UserClass, place_partitions, plan_strategy,
)
from optimizers.honeybee_cost import SearchCostModel
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.serve import PartitionSpec

QUIET_CLASS_WEIGHT = 0.01  # queries credited to a user class that sent none: still routed, barely weighed
INDEX_OVERHEAD_BYTES = 320  # HNSW links and ids per stored vector, besides the vector itself


def index_bytes_per_vector(dim: int) -> int:
    """Memory one stored vector takes in a partition index (float32 vector + graph links and ids)."""
    return 4 * dim + INDEX_OVERHEAD_BYTES


def index_gib(storage: float, n_docs: int, dim: int) -> float:
    """GiB the indexes of a plan storing ``storage`` × ``n_docs`` vectors of ``dim`` take."""
    return storage * n_docs * index_bytes_per_vector(dim) / 2**30


def effective_roles(rbac: Rbac, roles: frozenset[str]) -> frozenset[str]:
    """The roles of a set that grant at least one document (a role emptied by revocations grants nothing)."""
    return frozenset(r for r in roles if len(rbac.role_docs(r)))


def build_problem(rbac: Rbac, query_users: np.ndarray, model: SearchCostModel, *, storage_budget: float,
                  name: str = "workload") -> PartitioningProblem:
    """The partitioning problem of a workload: its role-signature blocks, its user classes
    weighted by the queries their users send, priced by ``model`` at its recall floor.

    Documents with no role (deleted) are in no block; a user class is keyed by the roles
    that grant something, and a class with none has nothing to search and is left out.
    """
    sent: dict[str, int] = {}
    for user in query_users:
        sent[user] = sent.get(user, 0) + 1
    weights: dict[frozenset[str], float] = {}
    for roles, members in rbac.user_classes().items():
        key = effective_roles(rbac, roles)
        if key:
            weights[key] = weights.get(key, 0.0) + sum(sent.get(u, 0) for u in members)
    users = tuple(UserClass(roles, weight or QUIET_CLASS_WEIGHT) for roles, weight in sorted(weights.items(), key=lambda kv: sorted(kv[0])))
    blocks = tuple(Block(sig, len(ids)) for sig, ids in rbac.blocks() if sig)
    return PartitioningProblem(blocks, users, model.search_cost, storage_budget=storage_budget,
                               recall_floor=model.recall_floor, name=name)


@dataclass
class Deployment:
    """A strategy's plan made concrete: what to build where, and how each user class searches."""

    strategy: str
    plan: PartitionPlan
    specs: list[PartitionSpec]
    pools: list[str]  # pool of each partition
    routes: dict[frozenset[str], list[tuple[int, int, bool]]]  # user role set → [(partition, effort, exact scan)]
    predicted_latency: dict[frozenset[str], float]
    predicted_recall: dict[frozenset[str], float]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"strategy": self.strategy, "method": self.plan.method, "partitions": len(self.specs),
                "storage": self.plan.storage, "kinds": {k: sum(s.kind == k for s in self.specs) for k in ("hnsw", "ivf", "flat")},
                "pools": {p: self.pools.count(p) for p in sorted(set(self.pools))}, "notes": self.plan.notes + self.notes}


def make_deployment(problem: PartitioningProblem, plan: PartitionPlan, model: SearchCostModel,
                    slots: list[PoolSlot], near_tier: str | None) -> Deployment:
    """Index kinds, search efforts and pools for ``plan``.

    ``rls`` and ``rls_prefilter`` always get an HNSW index; ``rls`` walks the graph only
    (the baseline raises ef to meet the recall target), every other strategy scans a
    user's permitted vectors exactly where the model says that is cheaper. Other
    partitions get the kind the model says is cheaper at their size. Where the model says
    the floor is unreachable by a graph walk the largest measured ef is used and the
    deployment says so (the evaluation measures the recall actually reached).
    """
    single = plan.strategy in ("rls", "rls_prefilter")
    kinds = ["hnsw" if single else model.partition_kind(n) for n in plan.sizes]
    allow_exact = plan.strategy != "rls"
    selectivity = {p: problem.selectivities(roles)[1] for p, roles in enumerate(plan.partitions)}
    routes, latency, recall, notes = {}, {}, {}, []
    loads = np.zeros(len(plan.partitions))
    for g, user in enumerate(problem.users):
        route, lat, rec = [], 0.0, 1.0
        for p in plan.routes[g]:
            s = float(selectivity[p][g])
            choice = model.choose(kinds[p], plan.sizes[p], s, allow_exact=allow_exact)
            if choice is None:
                effort = model.ef_range[1]
                notes.append(f"partition {p} for roles {sorted(user.roles)}: recall floor unreachable by the model "
                             f"at selectivity {s:.4f}; searched at ef={effort}")
                lat_p, rec_p = model.latency("hnsw", plan.sizes[p], s, effort), model.recall("hnsw", plan.sizes[p], s, effort)
                exact = False
            else:
                effort, lat_p, rec_p, exact = choice.effort, choice.latency_s, choice.recall, choice.exact
            route.append((p, int(effort), bool(exact)))
            lat += lat_p
            rec = min(rec, rec_p)
            loads[p] += problem.weights[g] * lat_p
        routes[user.roles], latency[user.roles], recall[user.roles] = route, lat, rec
    specs = [PartitionSpec(p, tuple(sorted(roles)), kinds[p]) for p, roles in enumerate(plan.partitions)]
    pools = place_partitions(plan.sizes, list(loads), slots, near_tier)
    scans = sum(exact for route in routes.values() for _, _, exact in route)
    if scans and any(k == "hnsw" for k in kinds):
        notes.append(f"{scans} of {sum(len(r) for r in routes.values())} (user class, partition) searches are exact "
                     "scans of the permitted vectors (cheaper than the graph walk at their selectivity)")
    return Deployment(plan.strategy, plan, specs, pools, routes, latency, recall, notes[-20:])


def plan_all(problem: PartitioningProblem, strategies: tuple[str, ...] = STRATEGIES, *,
             time_limit: float = 60.0) -> dict[str, PartitionPlan]:
    """Every named strategy's plan for the same problem."""
    return {s: plan_strategy(problem, s, time_limit=time_limit) if s == "honeybee" else plan_strategy(problem, s)
            for s in strategies}
