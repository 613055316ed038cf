"""HoneyBee's decision: which overlapping partitions to build, and which ones each user searches.

Documents are grouped into *role-signature blocks* ``B_j`` (the documents granted to
exactly the role set ``S_j``). A partition ``p`` is named by a role set ``Q_p``: it holds
every block granted to at least one role of ``Q_p`` (``n_p`` documents) and may serve
queries for the roles in ``Q_p``. A user class ``g`` (users holding the same role set
``R_g``, with query share ``w_g``) searches a set of partitions that together cover its
roles, each with the user's permission filter; its selectivity in ``p`` is
``s_gp = |D_p ∩ D_g| / n_p`` and one search costs ``c_gp = cost(n_p, s_gp)`` seconds at
the recall floor (``optimizers.honeybee_cost``; ``inf`` where the floor is unreachable).

MILP over candidate partitions ``P`` (:func:`candidate_partitions`)::

    min   Σ_g w_g Σ_p c_gp · y_gp                               expected query latency
    s.t.  Σ_{p: r ∈ Q_p} y_gp ≥ 1        ∀ g, r ∈ R_g          (coverage: every role of every user)
          y_gp ≤ x_p                      ∀ g, p                (build before use)
          Σ_p n_p · x_p ≤ β · N                                  (storage budget)
          x, y ∈ {0, 1};  y_gp exists only where c_gp < ∞        (recall floor)

Covering every role of ``R_g`` covers every document the user may see, so a user's
routed partitions, searched with its permission filter, return exactly what it may see.

Instances too large for the MILP use :func:`plan_greedy_merge`: start from one partition
per role and repeatedly merge the two partitions whose merge saves the most storage per
unit of added latency until the budget holds. :func:`plan_brute_force` enumerates every
candidate subset (small instances; the tests check the MILP against it). The baselines
are fixed plans priced by the same model: :func:`plan_rls` (one partition for everyone,
graph search only), :func:`plan_rls_prefilter` (the same, with exact scans for users who
may see little), :func:`plan_per_role` (one per role, a user searches each of its roles) and
:func:`plan_per_user` (one per distinct user role set).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from optimizers.solve import DEFAULT_TIME_LIMIT_S, Family, InfeasibleError, SolverError, solve_milp

SearchCost = Callable[[int, np.ndarray], np.ndarray]
STRATEGIES = ("honeybee", "rls", "rls_prefilter", "per_role", "per_user")
MILP_MAX_PAIRS = 60_000  # (user class, partition) pairs beyond which the MILP is not attempted
PAIRS_PER_ROLE = 6  # cheapest candidate partitions kept per (user class, role)


@dataclass(frozen=True)
class Block:
    """Documents granted to exactly this role set."""

    roles: frozenset[str]
    size: int


@dataclass(frozen=True)
class UserClass:
    """Users holding exactly this role set, and their share of the queries."""

    roles: frozenset[str]
    weight: float


@dataclass
class PartitioningProblem:
    """What the optimizer decides over.

    Parameters
    ----------
    blocks: the role-signature blocks (every document in exactly one).
    users: the user classes; weights are query shares (normalised here).
    search_cost: ``cost(n, s)`` → seconds per search of an ``n``-document partition at
        each selectivity in the array ``s``, ``inf`` where the recall floor is unreachable.
    storage_budget: β, the largest allowed Σ n_p / N (≥ 1).
    recall_floor: the floor ``search_cost`` was priced at (for messages and the report).
    """

    blocks: tuple[Block, ...]
    users: tuple[UserClass, ...]
    search_cost: SearchCost
    storage_budget: float = 1.4
    recall_floor: float = 0.95
    name: str = "workload"

    def __post_init__(self) -> None:
        if self.storage_budget < 1.0:
            raise ValueError(f"storage_budget must be ≥ 1.0 (every document stored at least once), got {self.storage_budget}")
        if not self.blocks or not self.users:
            raise ValueError("a partitioning problem needs at least one block and one user class")
        self.roles: list[str] = sorted(set().union(*(b.roles for b in self.blocks)))
        self.role_index = {r: i for i, r in enumerate(self.roles)}
        unknown = sorted(set().union(*(u.roles for u in self.users)) - set(self.roles))
        if unknown:
            raise ValueError(f"user roles grant no document: {unknown[:5]}")
        self.sizes = np.array([b.size for b in self.blocks], dtype=float)
        self.n_docs = int(self.sizes.sum())
        incidence = np.zeros((len(self.blocks), len(self.roles)), dtype=bool)  # block × role
        for j, b in enumerate(self.blocks):
            incidence[j, [self.role_index[r] for r in b.roles]] = True
        self.incidence = incidence
        weights = np.array([u.weight for u in self.users], dtype=float)
        self.weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights))
        self.user_blocks = sp.csr_matrix(np.stack([self.block_mask(u.roles) for u in self.users]), dtype=float)  # user × block

    def block_mask(self, roles: frozenset[str]) -> np.ndarray:
        """Blocks granted to at least one of ``roles`` (a role that grants nothing adds none)."""
        return self.incidence[:, [self.role_index[r] for r in roles if r in self.role_index]].any(axis=1)

    def size_of(self, roles: frozenset[str]) -> int:
        return int(self.sizes @ self.block_mask(roles))

    def closure(self, roles: frozenset[str]) -> frozenset[str]:
        """Every role whose documents all lie in the partition of ``roles`` (same storage, more coverage)."""
        outside = ~self.block_mask(roles)
        covered = ~(self.incidence & outside[:, None]).any(axis=0)
        return frozenset(r for r, ok in zip(self.roles, covered) if ok)

    def selectivities(self, roles: frozenset[str]) -> tuple[int, np.ndarray]:
        """Size of the partition of ``roles`` and every user class's selectivity in it."""
        mask = self.block_mask(roles)
        n = float(self.sizes @ mask)
        seen = self.user_blocks @ (self.sizes * mask)
        return int(n), seen / n if n > 0 else np.zeros(len(self.users))


@dataclass
class PartitionPlan:
    """Partitions to build and, per user class (``problem.users`` order), the ones it searches."""

    strategy: str
    method: str
    partitions: list[frozenset[str]]
    sizes: list[int]
    routes: list[list[int]]
    route_costs: list[float]  # predicted seconds per query of each user class
    storage: float  # Σ partition sizes / N
    expected_latency_s: float
    solve_seconds: float = 0.0
    optimal: bool | None = None
    gap: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["partitions"] = [sorted(p) for p in self.partitions]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PartitionPlan":
        data = dict(data)
        data["partitions"] = [frozenset(p) for p in data["partitions"]]
        return cls(**data)


# ---- pricing a fixed set of partitions -------------------------------------------------------

def _pair_costs(problem: PartitioningProblem, partitions: list[frozenset[str]]) -> tuple[list[int], np.ndarray]:
    """Sizes of the partitions and the (user class × partition) cost matrix (inf: not usable)."""
    sizes, costs = [], np.full((len(problem.users), len(partitions)), np.inf)
    for p, roles in enumerate(partitions):
        n, sel = problem.selectivities(roles)
        sizes.append(n)
        touches = np.array([bool(u.roles & roles) for u in problem.users])
        if touches.any():
            costs[touches, p] = problem.search_cost(n, sel[touches])
    return sizes, costs


def _best_cover(user: UserClass, partitions: list[frozenset[str]], costs: np.ndarray) -> tuple[list[int], float]:
    """Cheapest set of partitions covering every role of ``user``: exact dynamic programme over
    subsets of its roles (≤ 16 roles), weighted greedy set cover beyond that."""
    need = sorted(user.roles)
    options = [p for p in range(len(partitions)) if np.isfinite(costs[p]) and partitions[p] & user.roles]
    if not options or not set().union(*(partitions[p] for p in options)) >= user.roles:
        return [], math.inf
    if len(need) <= 16:
        bit = {r: 1 << i for i, r in enumerate(need)}
        full = (1 << len(need)) - 1
        masks = {p: sum(bit[r] for r in partitions[p] & user.roles) for p in options}
        best = {0: (0.0, ())}
        for state in range(full + 1):  # states only grow, so increasing order is a valid DP order
            if state not in best:
                continue
            cost, chosen = best[state]
            for p in options:
                nxt = state | masks[p]
                if nxt != state and (nxt not in best or cost + costs[p] < best[nxt][0]):
                    best[nxt] = (cost + float(costs[p]), chosen + (p,))
        cost, chosen = best[full]
        return sorted(chosen), cost
    chosen, left = [], set(need)
    while left:  # weighted greedy set cover, then drop partitions made redundant
        p = min((p for p in options if partitions[p] & left), key=lambda p: costs[p] / len(partitions[p] & left))
        chosen.append(p)
        left -= partitions[p]
    for p in sorted(chosen, key=lambda p: -costs[p]):
        rest = [q for q in chosen if q != p]
        if rest and set().union(*(partitions[q] for q in rest)) >= user.roles:
            chosen = rest
    return sorted(chosen), float(sum(costs[p] for p in chosen))


def route_users(problem: PartitioningProblem, partitions: list[frozenset[str]], strategy: str, method: str,
                **extra) -> PartitionPlan:
    """Route every user class to its cheapest covering subset of ``partitions`` and price the plan.

    Raises :class:`InfeasibleError` naming the user class whose roles cannot be covered at
    the recall floor.
    """
    sizes, costs = _pair_costs(problem, partitions)
    routes, route_costs = [], []
    for g, user in enumerate(problem.users):
        route, cost = _best_cover(user, partitions, costs[g])
        if not route:
            raise InfeasibleError(
                f"the {strategy} plan for {problem.name}",
                {"recall floor": f"every search must reach recall ≥ {problem.recall_floor}",
                 "coverage": f"user class with roles {sorted(user.roles)} cannot be covered by the partitions at that floor"},
            )
        routes.append(sorted(route))
        route_costs.append(cost)
    return _plan(problem, strategy, method, partitions, sizes, routes, route_costs, **extra)


def _plan(problem, strategy, method, partitions, sizes, routes, route_costs, **extra) -> PartitionPlan:
    return PartitionPlan(
        strategy=strategy, method=method, partitions=list(partitions), sizes=[int(s) for s in sizes],
        routes=routes, route_costs=[float(c) for c in route_costs],
        storage=float(sum(sizes)) / problem.n_docs,
        expected_latency_s=float(problem.weights @ np.array(route_costs)), **extra,
    )


# ---- baselines -------------------------------------------------------------------------------

def plan_rls(problem: PartitioningProblem) -> PartitionPlan:
    """Row-level security: one partition of every document; each user filters it.

    Never infeasible: where the model says no measured effort reaches the recall floor (a
    user who may see very little), the route is kept at infinite predicted cost and the
    deployment raises the effort at run time until the measured recall meets the target.
    """
    partitions = [frozenset(problem.roles)]
    sizes, costs = _pair_costs(problem, partitions)
    plan = _plan(problem, "rls", "fixed", partitions, sizes, [[0] for _ in problem.users], list(costs[:, 0]))
    unreachable = int(np.isinf(costs[:, 0]).sum())
    if unreachable:
        plan.notes.append(f"{unreachable} user classes need more effort than the model measured to reach recall "
                          f"{problem.recall_floor} in the shared index")
    return plan


def plan_rls_prefilter(problem: PartitioningProblem) -> PartitionPlan:
    """Row-level security with pre-filtering: the same single shared index, but a user who may
    see little of it is served by an exact scan of its permitted vectors when that is cheaper
    than the graph walk (what vector databases do for very selective filters)."""
    plan = route_users(problem, [frozenset(problem.roles)], "rls_prefilter", "fixed")
    return plan


def plan_per_role(problem: PartitioningProblem) -> PartitionPlan:
    """One partition per role; a user searches each of its roles' partitions and merges."""
    partitions = [frozenset([r]) for r in problem.roles]
    sizes, costs = _pair_costs(problem, partitions)
    routes = [sorted(problem.role_index[r] for r in u.roles) for u in problem.users]
    route_costs = [float(costs[g, route].sum()) for g, route in enumerate(routes)]
    return _plan(problem, "per_role", "fixed", partitions, sizes, routes, route_costs)


def plan_per_user(problem: PartitioningProblem) -> PartitionPlan:
    """One partition per distinct user role set, holding exactly what those users may see."""
    partitions = [u.roles for u in problem.users]
    sizes, costs = _pair_costs(problem, partitions)
    routes = [[g] for g in range(len(problem.users))]
    return _plan(problem, "per_user", "fixed", partitions, sizes, routes, [float(costs[g, g]) for g in range(len(problem.users))])


# ---- the greedy merge heuristic ----------------------------------------------------------------

def plan_greedy_merge(problem: PartitioningProblem, *, shortlist: int = 16, replicas: int = 200) -> PartitionPlan:
    """Merge per-role partitions until the storage budget holds, cheapest latency first.

    Groups of roles stay disjoint; each step looks at the ``shortlist`` merges saving the
    most storage (documents the two partitions share) and takes the one with the best
    saving per second of added expected latency (a merge that lowers latency is taken
    first). Merges that lower latency continue after the budget holds. Storage left
    under the budget then buys replicated partitions for the busiest user classes
    (:func:`_replicate_for_busy_users`).
    """
    start = time.perf_counter()
    groups: list[frozenset[str]] = [frozenset([r]) for r in problem.roles]
    masks = [problem.block_mask(g) for g in groups]
    member = np.array([[r in u.roles for r in problem.roles] for u in problem.users])  # user × role

    def group_costs(mask: np.ndarray, roles: frozenset[str]) -> np.ndarray:
        n = float(problem.sizes @ mask)
        touches = member[:, [problem.role_index[r] for r in roles]].any(axis=1)
        out = np.zeros(len(problem.users))
        if touches.any():
            rows = np.flatnonzero(touches)
            out[rows] = problem.search_cost(int(n), (problem.user_blocks[rows] @ (problem.sizes * mask)) / n)
        return out  # 0 for users that do not search this group

    weights = problem.weights
    costs = np.stack([group_costs(m, g) for m, g in zip(masks, groups)])  # group × user
    weighted = np.nan_to_num(costs, posinf=1e9) @ weights
    budget = problem.storage_budget * problem.n_docs
    stacked = np.stack(masks).astype(np.float32)
    overlap = (stacked * problem.sizes.astype(np.float32)) @ stacked.T  # documents two groups share
    touch = (costs > 0).astype(np.float32)  # group × user: the user searches the group
    together = (touch * weights.astype(np.float32)) @ touch.T  # query share searching both groups
    np.fill_diagonal(overlap, 0)
    np.fill_diagonal(together, 0)
    storage = float(problem.sizes @ stacked.T.sum(axis=1))
    merges = 0
    while len(groups) > 1:
        over = storage > budget + 1e-9
        shortlisted = {divmod(int(i), len(groups)) for m in (overlap, together)
                       for i in np.argsort(-m, axis=None)[: shortlist * 2]}
        best, best_score = None, -math.inf
        for a, b in shortlisted:
            if a >= b or (overlap[a, b] <= 0 and together[a, b] <= 0):
                continue
            mask = masks[a] | masks[b]
            roles = groups[a] | groups[b]
            new = group_costs(mask, roles)
            delta = float(np.nan_to_num(new, posinf=1e9) @ weights) - weighted[a] - weighted[b]
            saving = float(overlap[a, b])
            if delta < 0:  # faster and never more storage: take the biggest such win first
                score = 1e18 - delta
            elif over and saving > 0:
                score = saving / max(delta, 1e-12)
            else:
                continue
            if score > best_score:
                best, best_score = (a, b, mask, roles, new), score
        if best is None:
            if not over:
                break
            raise AssertionError("storage above budget with no overlapping partitions left")  # Σ sizes = N ≤ budget then
        a, b, mask, roles, new = best
        storage -= float(overlap[a, b])
        for i in (b, a):
            del groups[i], masks[i]
        groups.append(roles)
        masks.append(mask)
        costs = np.vstack([np.delete(costs, [a, b], axis=0), new])
        weighted = np.append(np.delete(weighted, [a, b]), float(np.nan_to_num(new, posinf=1e9) @ weights))
        touch = np.vstack([np.delete(touch, [a, b], axis=0), (new > 0).astype(np.float32)])
        merges += 1
        if len(groups) == 1:
            break
        overlap = np.pad(np.delete(np.delete(overlap, [a, b], axis=0), [a, b], axis=1), ((0, 1), (0, 1)))
        together = np.pad(np.delete(np.delete(together, [a, b], axis=0), [a, b], axis=1), ((0, 1), (0, 1)))
        row = np.stack(masks[:-1]).astype(np.float32) @ (problem.sizes * mask).astype(np.float32)
        overlap[-1, :-1] = overlap[:-1, -1] = row
        row = touch[:-1] @ (touch[-1] * weights.astype(np.float32))
        together[-1, :-1] = together[:-1, -1] = row
    partitions = [problem.closure(g) for g in groups]
    merged = route_users(problem, partitions, "honeybee", "greedy_merge")
    added = _replicate_for_busy_users(problem, merged, budget - storage, replicas)
    plan = route_users(problem, partitions + added, "honeybee", "greedy_merge",
                       solve_seconds=time.perf_counter() - start, optimal=False,
                       notes=[f"greedy_merge: {merges} merges from {len(problem.roles)} per-role partitions, "
                              f"{len(added)} replicated partitions for busy user classes"])
    rls = plan_rls(problem)
    if rls.expected_latency_s < plan.expected_latency_s:  # never worse than one shared partition
        rls.strategy, rls.method, rls.solve_seconds, rls.optimal = "honeybee", "greedy_merge", plan.solve_seconds, False
        rls.notes = ["greedy_merge: the single shared partition was faster than any merge found"]
        return rls
    return plan


def _replicate_for_busy_users(problem: PartitioningProblem, plan: PartitionPlan, spare: float,
                              replicas: int) -> list[frozenset[str]]:
    """Spend spare storage on partitions holding exactly what a busy user class may see.

    Candidates are the closed role sets of the ``replicas`` busiest user classes; each is
    added by the best expected-latency gain per stored document while it fits. A class
    gains when it can search the new partition alone instead of its current route.
    """
    current = np.array(plan.route_costs)
    busiest = np.argsort(-problem.weights)[:replicas]
    options = sorted({problem.closure(problem.users[g].roles) for g in busiest} - set(plan.partitions), key=sorted)
    if not options or spare <= 0:
        return []
    sizes, costs = _pair_costs(problem, options)
    serves_all = np.array([[u.roles <= c for c in options] for u in problem.users])  # user × option
    alone = np.where(serves_all, costs, np.inf)
    added, left = [], set(range(len(options)))
    while left:
        gains = {c: float(problem.weights @ np.maximum(current - alone[:, c], 0)) / max(sizes[c], 1)
                 for c in left if sizes[c] <= spare}
        c = max(gains, key=gains.get, default=None)
        if c is None or gains[c] <= 0:
            break
        added.append(options[c])
        spare -= sizes[c]
        current = np.minimum(current, alone[:, c])
        left.discard(c)
    return added


# ---- candidates, MILP and brute force ----------------------------------------------------------

def candidate_partitions(problem: PartitioningProblem, *, max_user_classes: int = 200,
                         extra: list[frozenset[str]] | None = None) -> list[frozenset[str]]:
    """Candidate partitions, each a closed role set (it serves every role it fully holds).

    One per role, one for everything (the RLS partition), the role sets of the
    ``max_user_classes`` busiest user classes, and ``extra`` (e.g. the greedy plan's
    partitions). Candidates larger than the storage budget allows are dropped.
    """
    seeds = [frozenset([r]) for r in problem.roles] + [frozenset(problem.roles)]
    busiest = np.argsort(-problem.weights)[:max_user_classes]
    seeds += [problem.users[g].roles for g in busiest]
    seeds += list(extra or [])
    out, seen = [], set()
    budget = problem.storage_budget * problem.n_docs
    for roles in seeds:
        closed = problem.closure(roles)
        if closed in seen or problem.size_of(closed) > budget + 1e-9:
            continue
        seen.add(closed)
        out.append(closed)
    return out


def _usable_pairs(problem: PartitioningProblem, costs: np.ndarray, partitions: list[frozenset[str]],
                  per_role: int | None, required: set[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    """(user class, partition) pairs the MILP may use: finite cost, and among the ``per_role``
    cheapest partitions for at least one of the user's roles (None: all), plus ``required``."""
    pairs = set(required)
    for g, user in enumerate(problem.users):
        for r in user.roles:
            options = [p for p in range(len(partitions)) if r in partitions[p] and np.isfinite(costs[g, p])]
            options.sort(key=lambda p: costs[g, p])
            pairs.update((g, p) for p in (options if per_role is None else options[:per_role]))
    return sorted(pairs)


def plan_milp(problem: PartitioningProblem, candidates: list[frozenset[str]] | None = None, *,
              time_limit: float = DEFAULT_TIME_LIMIT_S, incumbent: PartitionPlan | None = None,
              per_role: int | None = PAIRS_PER_ROLE) -> PartitionPlan:
    """Solve the partitioning MILP (module docstring) over ``candidates``.

    ``incumbent`` (a feasible plan, e.g. the greedy one) is returned when the solver finds
    nothing better within ``time_limit``. Raises :class:`InfeasibleError` naming the
    constraint families that conflict.
    """
    start = time.perf_counter()
    candidates = candidates if candidates is not None else candidate_partitions(problem)
    sizes, costs = _pair_costs(problem, candidates)
    required = set()
    if incumbent is not None:  # the incumbent's own routes stay available, so its plan is feasible
        where = {roles: p for p, roles in enumerate(candidates)}
        for g, route in enumerate(incumbent.routes):
            required.update((g, where[incumbent.partitions[q]]) for q in route if incumbent.partitions[q] in where)
    pairs = _usable_pairs(problem, costs, candidates, per_role, required)
    for g, user in enumerate(problem.users):
        covered = set().union(*(candidates[p] for gg, p in pairs if gg == g)) if pairs else set()
        missing = user.roles - covered
        if missing:
            raise InfeasibleError(
                f"the HoneyBee plan for {problem.name}",
                {"recall floor": f"every search must reach recall ≥ {problem.recall_floor}",
                 "coverage": f"no candidate partition serves role(s) {sorted(missing)} of user class "
                             f"{sorted(user.roles)} at that floor",
                 "storage budget": f"candidates are limited to ≤ {problem.storage_budget}× the documents"},
            )
    n_pairs, n_cands = len(pairs), len(candidates)
    x = cp.Variable(n_cands, boolean=True)
    y = cp.Variable(n_pairs, boolean=True)
    rows = {(g, r): i for i, (g, r) in enumerate((g, r) for g, u in enumerate(problem.users) for r in sorted(u.roles))}
    cov_i, cov_j = [], []
    for j, (g, p) in enumerate(pairs):
        for r in candidates[p] & problem.users[g].roles:
            cov_i.append(rows[g, r])
            cov_j.append(j)
    cover = sp.csr_matrix((np.ones(len(cov_i)), (cov_i, cov_j)), shape=(len(rows), n_pairs))
    link = sp.csr_matrix((np.ones(n_pairs), (range(n_pairs), [p for _, p in pairs])), shape=(n_pairs, n_cands))
    price = np.array([problem.weights[g] * costs[g, p] for g, p in pairs])
    objective = cp.Minimize(price @ y)
    families = {
        "coverage": Family([cover @ y >= 1], "every role of every user class is served by a partition it searches "
                                             f"at recall ≥ {problem.recall_floor}"),
        "build before use": Family([y <= link @ x], "a user searches only partitions that are built"),
        "storage budget": Family([np.array(sizes, dtype=float) @ x <= problem.storage_budget * problem.n_docs],
                                 f"Σ partition sizes ≤ {problem.storage_budget} × {problem.n_docs} documents"),
    }
    if incumbent is not None:
        families["no slower than the incumbent"] = Family(
            [price @ y <= incumbent.expected_latency_s * (1 + 1e-7) + 1e-12],
            f"expected latency at most the {incumbent.method} plan's")
    try:
        solution = solve_milp(objective, families, what=f"the HoneyBee plan for {problem.name}", time_limit=time_limit)
    except (SolverError, InfeasibleError) as exc:
        if incumbent is None or isinstance(exc, InfeasibleError) and "no slower than the incumbent" not in exc.conflicting:
            raise
        incumbent.notes.append(f"milp found nothing faster than {incumbent.method} within {time_limit:.0f} s")
        return incumbent
    built = [p for p in range(n_cands) if x.value[p] > 0.5]
    chosen = [candidates[p] for p in built]
    # routes come from y; re-deriving the cheapest cover over the built set can only lower cost
    plan = route_users(problem, chosen, "honeybee", "milp", solve_seconds=time.perf_counter() - start,
                       optimal=solution.optimal, gap=solution.gap,
                       notes=[f"milp: {n_cands} candidates, {n_pairs} (user class, partition) pairs"])
    return plan


def plan_brute_force(problem: PartitioningProblem, candidates: list[frozenset[str]]) -> PartitionPlan:
    """Enumerate every subset of ``candidates`` within the budget; exact, for small instances."""
    if len(candidates) > 16:
        raise ValueError(f"brute force over {len(candidates)} candidates is too many (≤ 16)")
    start = time.perf_counter()
    sizes, costs = _pair_costs(problem, candidates)
    best, best_cost = None, math.inf
    for size in range(1, len(candidates) + 1):
        for subset in itertools.combinations(range(len(candidates)), size):
            if sum(sizes[p] for p in subset) > problem.storage_budget * problem.n_docs + 1e-9:
                continue
            total = 0.0
            for g, user in enumerate(problem.users):
                options = [p for p in subset if candidates[p] & user.roles and np.isfinite(costs[g, p])]
                cheapest = math.inf
                for k in range(1, len(options) + 1):
                    for combo in itertools.combinations(options, k):
                        if set().union(*(candidates[p] for p in combo)) >= user.roles:
                            cheapest = min(cheapest, float(sum(costs[g, p] for p in combo)))
                total += problem.weights[g] * cheapest
                if total >= best_cost:
                    break
            if total < best_cost:
                best, best_cost = subset, total
    if best is None:
        raise InfeasibleError(f"the HoneyBee plan for {problem.name}",
                              {"coverage": "no subset of candidates covers every user", "storage budget": ""})
    return route_users(problem, [candidates[p] for p in best], "honeybee", "brute_force",
                       solve_seconds=time.perf_counter() - start, optimal=True)


def plan_honeybee(problem: PartitioningProblem, *, time_limit: float = DEFAULT_TIME_LIMIT_S,
                  max_pairs: int = MILP_MAX_PAIRS) -> PartitionPlan:
    """HoneyBee's plan: the greedy merge, then the MILP over candidates seeded with it when the
    instance is small enough (``max_pairs``); the MILP is capped by the greedy plan, so it is
    never slower. The plan's ``method`` names which one produced it."""
    try:
        greedy = plan_greedy_merge(problem)
    except InfeasibleError:
        greedy = None  # the MILP decides, and names the constraints that conflict if it cannot
    candidates = candidate_partitions(problem, extra=greedy.partitions if greedy else None)
    sizes, costs = _pair_costs(problem, candidates)
    n_pairs = len(_usable_pairs(problem, costs, candidates, PAIRS_PER_ROLE))
    if n_pairs > max_pairs and greedy is not None:
        greedy.notes.append(f"milp skipped: {n_pairs} (user class, partition) pairs > {max_pairs}")
        return greedy
    return plan_milp(problem, candidates, time_limit=time_limit, incumbent=greedy)


def plan_strategy(problem: PartitioningProblem, strategy: str, **kwargs) -> PartitionPlan:
    """The plan of one named strategy (:data:`STRATEGIES`)."""
    planners = {"honeybee": plan_honeybee, "rls": plan_rls, "rls_prefilter": plan_rls_prefilter,
                "per_role": plan_per_role, "per_user": plan_per_user}
    if strategy not in planners:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return planners[strategy](problem, **kwargs) if strategy == "honeybee" else planners[strategy](problem)


# ---- placing partitions on the tiers -----------------------------------------------------------

@dataclass(frozen=True)
class PoolSlot:
    """A pool partitions can live on: its tier, how many documents it can hold, how many machines."""

    name: str
    tier: str
    capacity: float
    machines: int = 1


def place_partitions(sizes: list[int], loads: list[float], slots: list[PoolSlot],
                     near_tier: str | None = None) -> list[str]:
    """Assign each partition to a pool.

    The hottest partitions (expected search seconds per stored document) go to the pools
    of ``near_tier`` — the tier users query from — until those pools carry their share of
    the load or more (their machines / all machines) or run out of room; every other partition
    goes, heaviest first, to the pool with the least load per machine that has room.
    Raises ValueError naming the partition that fits nowhere.
    """
    free = {s.name: float(s.capacity) for s in slots}
    load = {s.name: 0.0 for s in slots}
    machines = {s.name: max(s.machines, 1) for s in slots}
    near = [s.name for s in slots if s.tier == near_tier]
    share = sum(machines[s] for s in near) / sum(machines.values())
    quota = share * float(sum(loads))
    out: list[str | None] = [None] * len(sizes)

    def put(p: int, pool: str) -> None:
        out[p] = pool
        free[pool] -= sizes[p]
        load[pool] += loads[p]

    for p in sorted(range(len(sizes)), key=lambda p: -loads[p] / max(sizes[p], 1)):
        room = [s for s in near if free[s] >= sizes[p]]
        if room and sum(load[s] for s in near) < quota:
            put(p, min(room, key=lambda s: load[s] / machines[s]))
    for p in sorted((p for p in range(len(sizes)) if out[p] is None), key=lambda p: -loads[p]):
        room = [s.name for s in slots if free[s.name] >= sizes[p]]
        if not room:
            raise ValueError(f"partition {p} of {sizes[p]} documents fits in no pool "
                             f"(free capacity: {', '.join(f'{k}={v:.0f}' for k, v in free.items())})")
        put(p, min(room, key=lambda s: (load[s] + loads[p]) / machines[s]))
    return [str(p) for p in out]
