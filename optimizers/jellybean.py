"""JellyBean: pick model variants and the workers that run them, at least cost.

The model follows the JellyBean authors' optimizer (its cost model, not its code):

* a workflow is a DAG of operators fed by sources; operator ``v`` must serve
  ``R(v) = min_u R(u)·ratio(u, v)`` requests/s (sources: their injection rate);
* a machine serves at most one operator and costs its full $/hour when used; its
  throughput for ``v`` is ``1000 / latency_ms`` of the chosen variant;
* traffic never flows from a higher tier to a lower one; only traffic that crosses
  tiers is charged, at ``unit $/GB × KiB/s × 3600 / 1024²`` (unit costs already carry
  the repository's scaling factor);
* the variants chosen must reach the end-to-end accuracy target.

Machines come in pools of identical machines (a pool of one is a single worker), which
keeps the exact MILP small for large fleets: choosing *how many* machines of a pool
serve an operator is exact when the machines are identical.

The MILP (:func:`plan_milp`) chooses variants, machine counts, per-pool load and the
traffic between pools (flow variables) jointly::

    min  Σ_{o,p,v} price_p · n[o,p,v]  +  Σ_e Σ_{p→q cross-tier} c_pq · s_e(v_u, v_v) · f[e,p,q,v_u,v_v] · 3600/1024²
    s.t. Σ_v y[o,v] = 1                                   (one variant per operator)
         accuracy(y) ≥ target                             (accuracy)
         Σ_{o,v} n[o,p,v] ≤ count_p                       (one operator per machine)
         n[o,p,v] ≤ count_p · y[o,v]                      (machines run the chosen variant)
         ℓ[o,p,v] ≤ μ[o,p,v] · n[o,p,v]                   (capacity)
         Σ_{p,v} ℓ[o,p,v] = R(o)                          (throughput)
         Σ_{q,*} f[e,p,q,v_u,*] = R(v)/R(u) · ℓ[u,p,v_u]  (traffic leaves where u ran)
         Σ_{p,*} f[e,p,q,*,v_v] = ℓ[v,q,v_v]              (traffic arrives where v runs)
         f[e,p,q,·] = 0 when tier(p) > tier(q)            (no traffic back down the tiers)

Strategies compared with it (each its own function): :func:`plan_brute_force` (exact
enumeration, small instances), :func:`plan_jellybean_heuristic` (the paper's beam search
over variants, then greedy per-tier assignment), :func:`plan_infaas_style` and
:func:`plan_cloud_only`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from graphlib import CycleError, TopologicalSorter

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from optimizers.solve import DEFAULT_TIME_LIMIT_S, Family, InfeasibleError, SolverError, solve_milp

# The repository's formula, $/GB × KiB/s × 3600 / 1024²: its "GB" is 1024² KiB.
KIB_PER_S_TO_GB_PER_HOUR = 3600 / 1024**2
DEFAULT = "default"


# --------------------------------------------------------------------------- the problem


@dataclass(frozen=True)
class Pool:
    """Identical machines in one tier. ``tier`` is a rank: 0 is nearest the sources."""

    name: str
    tier: int
    price_per_hour: float
    count: int = 1
    device: str = ""


@dataclass(frozen=True)
class AccuracyTable:
    """End-to-end accuracy looked up by the variants of ``operators`` (a profiled table)."""

    operators: tuple[str, ...]
    table: dict[tuple[str, ...], float]

    def of(self, variants: dict[str, str]) -> float:
        return self.table.get(tuple(variants[o] for o in self.operators), -math.inf)


@dataclass(frozen=True)
class AccuracyProduct:
    """End-to-end accuracy = scale × Π accuracy(o, v) / scale (each in [0, scale])."""

    accuracy: dict[tuple[str, str], float]
    scale: float = 100.0

    def of(self, variants: dict[str, str]) -> float:
        value = self.scale
        for (op, var), acc in self.accuracy.items():
            if variants.get(op) == var:
                value *= acc / self.scale
        return value


@dataclass
class JellyBeanProblem:
    """Everything the optimizer needs; built by a loader that has validated it."""

    sources: dict[str, float]  # source → requests/s
    source_tier: dict[str, int]  # source → tier rank where its requests originate
    edges: list[tuple[str, str]]
    ratios: dict[tuple[str, str], float]  # requests v gets per request of u (default 1)
    variants: dict[str, list[str]]  # operator → its variants
    relative_cost: dict[tuple[str, str], float]  # (op, variant) → unitless compute cost
    pools: list[Pool]
    latency_ms: dict[tuple[str, str, str], float]  # (op, pool, variant) → ms per request
    message_kib: dict[tuple[str, str, str, str], float]  # (u, v, u_var, v_var) → KiB per request of v
    link_usd_per_gb: dict[tuple[str, str], float]  # (pool or source, pool) → $/GB when crossing tiers
    accuracy: AccuracyTable | AccuracyProduct
    accuracy_target: float
    name: str = "workflow"

    def __post_init__(self) -> None:
        self.pool_by_name = {p.name: p for p in self.pools}
        graph: dict[str, set[str]] = {n: set() for n in [*self.sources, *self.variants]}
        for u, v in self.edges:
            graph.setdefault(v, set()).add(u)
        try:
            order = list(TopologicalSorter(graph).static_order())
        except CycleError as exc:
            raise ValueError(f"the workflow has a cycle: {' → '.join(exc.args[1])}") from None
        self.operators = [n for n in order if n not in self.sources]
        self.inputs = {n: [u for u, v in self.edges if v == n] for n in order}
        self.required_rate: dict[str, float] = dict(self.sources)
        for op in self.operators:
            ins = self.inputs[op]
            self.required_rate[op] = min(self.required_rate[u] * self.ratios.get((u, op), 1.0) for u in ins) if ins else 0.0
        self.top_tier = max(p.tier for p in self.pools)

    # --- look-ups

    def capacity(self, op: str, pool: str, variant: str) -> float:
        """Requests/s one machine of ``pool`` serves for ``op`` with ``variant`` (0: cannot run)."""
        ms = self.latency_ms.get((op, pool, variant))
        return 1000.0 / ms if ms else 0.0

    def message(self, u: str, v: str, u_var: str, v_var: str) -> float:
        """KiB that ``v`` receives from ``u`` per request of ``v`` (the repository's fall-backs)."""
        for key in ((u, v, u_var, v_var), (u, v, DEFAULT, v_var), (u, v, u_var, DEFAULT), (u, v, DEFAULT, DEFAULT)):
            if key in self.message_kib:
                return self.message_kib[key]
        return 0.0

    def tier_of(self, place: str) -> int:
        return self.source_tier[place] if place in self.sources else self.pool_by_name[place].tier

    def link_cost(self, src: str, dst: str) -> float:
        """$/GB for traffic from ``src`` (pool or source) to pool ``dst``; only upward traffic is charged."""
        if self.tier_of(dst) <= self.tier_of(src):
            return 0.0
        return self.link_usd_per_gb.get((src, dst), 0.0)

    def node_variants(self, node: str) -> list[str]:
        return self.variants.get(node, [DEFAULT])

    def machines(self) -> int:
        return sum(p.count for p in self.pools)


# --------------------------------------------------------------------------- plans


@dataclass
class Assignment:
    operator: str
    worker: str  # pool name (a single worker when the pool has one machine)
    variant: str
    machines: int
    rate: float  # requests/s this pool serves for the operator
    capacity: float  # requests/s the assigned machines can serve


@dataclass
class Flow:
    upstream: str
    downstream: str
    src: str  # pool or source
    dst: str  # pool
    rate: float  # requests of downstream per second
    kib_per_s: float
    usd_per_hour: float


@dataclass
class Plan:
    """A strategy's decision and what it costs under the shared cost model."""

    strategy: str
    variants: dict[str, str]
    assignment: list[Assignment]
    flows: list[Flow]
    compute_cost_per_hour: float
    network_cost_per_hour: float
    total_cost_per_hour: float
    accuracy: float
    solve_seconds: float
    optimal: bool | None = None
    notes: list[str] = field(default_factory=list)
    gap: float | None = None  # relative MIP gap when the solver stopped at its time limit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """The inverse of :meth:`to_dict` (a plan read back from plan.json)."""
        fields = dict(data)
        fields["assignment"] = [Assignment(**a) for a in data["assignment"]]
        fields["flows"] = [Flow(**f) for f in data["flows"]]
        return cls(**fields)


def _flow_cost(problem: JellyBeanProblem, u: str, v: str, src: str, dst: str, rate: float, kib: float) -> Flow:
    kib_per_s = rate * kib
    usd = problem.link_cost(src, dst) * kib_per_s * KIB_PER_S_TO_GB_PER_HOUR
    return Flow(u, v, src, dst, rate, kib_per_s, usd)


def proportional_flows(problem: JellyBeanProblem, variants: dict[str, str], assignment: list[Assignment]) -> list[Flow]:
    """Traffic split in proportion to assigned rates at both ends (the repository's rule)."""
    share: dict[str, dict[str, float]] = {}
    for a in assignment:
        share.setdefault(a.operator, {}).setdefault(a.worker, 0.0)
        share[a.operator][a.worker] += a.rate / problem.required_rate[a.operator]
    for s in problem.sources:
        share[s] = {s: 1.0}
    flows = []
    for u, v in problem.edges:
        kib = problem.message(u, v, variants.get(u, DEFAULT), variants[v])
        for src, su in share[u].items():
            for dst, sv in share[v].items():
                rate = problem.required_rate[v] * su * sv
                if rate > 0:
                    flows.append(_flow_cost(problem, u, v, src, dst, rate, kib))
    return flows


def price_plan(
    problem: JellyBeanProblem,
    strategy: str,
    variants: dict[str, str],
    assignment: list[Assignment],
    flows: list[Flow] | None = None,
    solve_seconds: float = 0.0,
    optimal: bool | None = None,
    notes: list[str] | None = None,
) -> Plan:
    """Cost a decision with the shared model (flows default to the proportional split)."""
    flows = proportional_flows(problem, variants, assignment) if flows is None else flows
    compute = sum(problem.pool_by_name[a.worker].price_per_hour * a.machines for a in assignment)
    network = sum(f.usd_per_hour for f in flows)
    return Plan(
        strategy=strategy,
        variants=dict(variants),
        assignment=assignment,
        flows=flows,
        compute_cost_per_hour=compute,
        network_cost_per_hour=network,
        total_cost_per_hour=compute + network,
        accuracy=problem.accuracy.of(variants),
        solve_seconds=solve_seconds,
        optimal=optimal,
        notes=notes or [],
    )


def plan_violations(problem: JellyBeanProblem, plan: Plan, tol: float = 1e-6) -> list[str]:
    """Every way ``plan`` breaks the model's rules (empty for a feasible plan)."""
    issues = []
    if plan.accuracy < problem.accuracy_target - tol:
        issues.append(f"accuracy {plan.accuracy:.3f} below target {problem.accuracy_target}")
    used: dict[str, int] = {}
    served: dict[str, float] = {}
    for a in plan.assignment:
        used[a.worker] = used.get(a.worker, 0) + a.machines
        cap = problem.capacity(a.operator, a.worker, a.variant) * a.machines
        if a.variant != plan.variants[a.operator]:
            issues.append(f"{a.worker} runs {a.variant} but {a.operator} uses {plan.variants[a.operator]}")
        if a.rate > cap * (1 + tol) + tol:
            issues.append(f"{a.operator} on {a.worker}: rate {a.rate:.3f} above capacity {cap:.3f}")
        served[a.operator] = served.get(a.operator, 0.0) + a.rate
    for pool, n in used.items():
        if n > problem.pool_by_name[pool].count:
            issues.append(f"{pool}: {n} machines used, pool has {problem.pool_by_name[pool].count}")
    for op in problem.operators:
        if served.get(op, 0.0) < problem.required_rate[op] * (1 - tol) - tol:
            issues.append(f"{op} served at {served.get(op, 0.0):.3f} of {problem.required_rate[op]:.3f} req/s")
    placed = {(a.operator, a.worker): a.rate for a in plan.assignment}
    for s in problem.sources:
        placed[s, s] = problem.required_rate[s]
    sent: dict[tuple[str, str, str], float] = {}
    received: dict[tuple[str, str, str], float] = {}
    for f in plan.flows:
        if f.rate <= tol:
            continue
        if problem.tier_of(f.src) > problem.tier_of(f.dst):
            issues.append(f"traffic {f.upstream}→{f.downstream} flows down from {f.src} to {f.dst}")
        if (f.upstream, f.src) not in placed or (f.downstream, f.dst) not in placed:
            issues.append(f"traffic {f.upstream}→{f.downstream} from {f.src} to {f.dst} touches a pool not serving it")
        sent[f.upstream, f.downstream, f.src] = sent.get((f.upstream, f.downstream, f.src), 0.0) + f.rate
        received[f.upstream, f.downstream, f.dst] = received.get((f.upstream, f.downstream, f.dst), 0.0) + f.rate
    for u, v in problem.edges:
        scale = problem.required_rate[v] / problem.required_rate[u]
        for (op, worker), rate in placed.items():
            if op == u and abs(sent.get((u, v, worker), 0.0) - rate * scale) > tol * max(1.0, rate):
                issues.append(f"{u} on {worker} serves {rate:.3f} req/s but sends {sent.get((u, v, worker), 0.0):.3f} to {v}")
            if op == v and abs(received.get((u, v, worker), 0.0) - rate) > tol * max(1.0, rate):
                issues.append(f"{v} on {worker} serves {rate:.3f} req/s but gets {received.get((u, v, worker), 0.0):.3f} from {u}")
    return issues


# --------------------------------------------------------------------------- accuracy


def feasible_variant_choices(problem: JellyBeanProblem) -> list[dict[str, str]]:
    """Every variant combination meeting the accuracy target (for enumeration strategies)."""
    ops = problem.operators
    combos = []
    for choice in itertools.product(*(problem.node_variants(o) for o in ops)):
        variants = dict(zip(ops, choice))
        if problem.accuracy.of(variants) >= problem.accuracy_target:
            combos.append(variants)
    return combos


def best_reachable_accuracy(problem: JellyBeanProblem) -> float:
    """The highest end-to-end accuracy any variant choice reaches."""
    acc = problem.accuracy
    if isinstance(acc, AccuracyTable):
        return max(acc.table.values(), default=-math.inf)
    return acc.of({op: max(problem.node_variants(op), key=lambda v: acc.accuracy.get((op, v), acc.scale))
                   for op in problem.operators})


# --------------------------------------------------------------------------- the MILP


class _Rows:
    """Sparse constraint rows over the model's variable blocks, grouped by family."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.rows: list[tuple[dict[str, list[tuple[int, float]]], str, float]] = []

    def add(self, terms: dict[str, list[tuple[int, float]]], sense: str, rhs: float) -> None:
        self.rows.append((terms, sense, rhs))

    def constraints(self, variables: dict[str, cp.Variable]) -> list[cp.Constraint]:
        out = []
        for sense in ("<=", "=="):
            chosen = [r for r in self.rows if r[1] == sense]
            if not chosen:
                continue
            expr = 0
            for block, size in self.sizes.items():
                data, ri, ci = [], [], []
                for i, (terms, _, _) in enumerate(chosen):
                    for col, coef in terms.get(block, []):
                        ri.append(i)
                        ci.append(col)
                        data.append(coef)
                if data:
                    expr = expr + sp.csr_matrix((data, (ri, ci)), shape=(len(chosen), size)) @ variables[block]
            rhs = np.array([r[2] for r in chosen])
            out.append(expr <= rhs if sense == "<=" else expr == rhs)
        return out


def plan_milp(
    problem: JellyBeanProblem,
    *,
    time_limit: float = DEFAULT_TIME_LIMIT_S,
    allowed_pools: set[str] | None = None,
    strategy: str = "milp",
    incumbent: Plan | None = None,
) -> Plan:
    """The exact joint MILP (variants, machines, loads and flows); see the module docstring.

    ``incumbent`` (a feasible plan, e.g. the heuristic's) caps the objective: the solver
    prunes with it, and if the time limit passes before anything cheaper is found the
    incumbent is returned, marked not optimal. The plan is never dearer than it.
    """
    start = time.perf_counter()
    ops, pools = problem.operators, [p for p in problem.pools if allowed_pools is None or p.name in allowed_pools]
    # Index the variable blocks: y (variant choice), n (machines), l (load), f (flows), c (accuracy combos).
    y_idx = {(o, v): i for i, (o, v) in enumerate((o, v) for o in ops for v in problem.node_variants(o))}
    runnable = [(o, p.name, v) for o in ops for p in pools for v in problem.node_variants(o) if problem.capacity(o, p.name, v) > 0]
    n_idx = {key: i for i, key in enumerate(runnable)}
    places = {o: sorted({p for (oo, p, _) in runnable if oo == o}) for o in ops}
    for s in problem.sources:
        places[s] = [s]
    # Traffic may only leave a pool where the upstream variant can run and only arrive where
    # the downstream (variant) can: every flow end is tied to a load by the traffic family.
    vv_dep = {(u, v): _size_depends_on_downstream_variant(problem, u, v) for u, v in problem.edges}
    f_keys = []
    for u, v in problem.edges:
        for src in places[u]:
            for dst in places[v]:
                if problem.tier_of(src) > problem.tier_of(dst):
                    continue  # no traffic back down the tiers
                for uvar in problem.node_variants(u):
                    if u not in problem.sources and (u, src, uvar) not in n_idx:
                        continue
                    if vv_dep[u, v]:
                        vvars = [vv for vv in problem.node_variants(v) if (v, dst, vv) in n_idx]
                    else:
                        vvars = ["*"]
                    f_keys.extend((u, v, src, dst, uvar, vvar) for vvar in vvars)
    f_idx = {k: i for i, k in enumerate(f_keys)}
    acc = problem.accuracy
    combos: list[tuple[str, ...]] = []
    if isinstance(acc, AccuracyTable):
        combos = [k for k, a in acc.table.items() if a >= problem.accuracy_target]
    sizes = {"y": len(y_idx), "n": len(n_idx), "l": len(n_idx), "f": max(len(f_idx), 1), "c": max(len(combos), 1)}
    variables = {
        "y": cp.Variable(sizes["y"], boolean=True),
        "n": cp.Variable(sizes["n"], integer=True),
        "l": cp.Variable(sizes["l"], nonneg=True),
        "f": cp.Variable(sizes["f"], nonneg=True),
        "c": cp.Variable(sizes["c"], boolean=True),
    }
    families: dict[str, _Rows] = {}
    meanings: dict[str, str] = {}

    def family(name: str, meaning: str) -> _Rows:
        meanings[name] = meaning
        return families.setdefault(name, _Rows(sizes))

    one_variant = family("one variant per operator", "each operator runs exactly one variant")
    for o in ops:
        one_variant.add({"y": [(y_idx[o, v], 1.0) for v in problem.node_variants(o)]}, "==", 1.0)

    target = problem.accuracy_target
    if isinstance(acc, AccuracyTable):
        fam = family("accuracy", f"end-to-end accuracy ≥ {target} (profiled table: {len(combos)} combinations qualify)")
        fam.add({"c": [(i, 1.0) for i in range(len(combos))]}, "==", 1.0)
        for j, op in enumerate(acc.operators):
            for var in problem.node_variants(op):
                terms = [(i, -1.0) for i, combo in enumerate(combos) if combo[j] == var]
                fam.add({"y": [(y_idx[op, var], 1.0)], "c": terms}, "==", 0.0)
    else:
        fam = family("accuracy", f"end-to-end accuracy ≥ {target}")
        # log-linear: Σ y[o,v]·log(acc(o,v)/scale) ≥ log(target/scale)
        terms = [(y_idx[o, v], -math.log(max(acc.accuracy.get((o, v), acc.scale), 1e-12) / acc.scale)) for o in ops for v in problem.node_variants(o)]
        fam.add({"y": terms}, "<=", -math.log(target / acc.scale) + 1e-9)

    per_machine = family("one operator per machine", "a machine serves at most one operator")
    for p in pools:
        terms = [(i, 1.0) for (o, pn, v), i in n_idx.items() if pn == p.name]
        if terms:
            per_machine.add({"n": terms}, "<=", float(p.count))
    chosen = family("machines run the chosen variant", "a machine runs an operator only with its chosen variant")
    capacity = family("capacity", "a pool serves at most its machines' throughput")
    for (o, pn, v), i in n_idx.items():
        # More machines of one pool than its share needs never pay (traffic is priced per pool),
        # so ceil(R/μ) bounds n as tightly as the pool size does, and far tighter in the relaxation.
        useful = min(problem.pool_by_name[pn].count, math.ceil(problem.required_rate[o] / problem.capacity(o, pn, v) - 1e-9))
        chosen.add({"n": [(i, 1.0)], "y": [(y_idx[o, v], -float(useful))]}, "<=", 0.0)
        capacity.add({"l": [(i, 1.0)], "n": [(i, -problem.capacity(o, pn, v))]}, "<=", 0.0)
    tiers = sorted({p.tier for p in pools})
    for o in ops:
        fam = family(
            f"throughput of {o}",
            f"{o} must serve {problem.required_rate[o]:g} req/s with the workers of tiers {tiers[0]}–{tiers[-1]} that can run it",
        )
        rate = problem.required_rate[o]
        for v in problem.node_variants(o):
            keys = [n_idx[k] for k in n_idx if k[0] == o and k[2] == v]
            # the whole rate, on the chosen variant only: Σ_p ℓ[o,p,v] = R(o)·y[o,v]
            fam.add({"l": [(i, 1.0) for i in keys], "y": [(y_idx[o, v], -rate)]}, "==", 0.0)
            # and at least as many machines as the fastest pool would need: a valid cut
            fastest = max((problem.capacity(o, k[1], v) for k in n_idx if k[0] == o and k[2] == v), default=0.0)
            if fastest > 0:
                fam.add({"n": [(i, -1.0) for i in keys], "y": [(y_idx[o, v], math.ceil(rate / fastest - 1e-9))]}, "<=", 0.0)
            else:
                fam.add({"y": [(y_idx[o, v], 1.0)]}, "<=", 0.0)  # no worker can run this variant

    traffic = family("traffic follows the load", "inputs leave where the upstream ran and arrive where the downstream runs")
    out_of: dict[tuple, list[tuple[int, float]]] = {}
    into: dict[tuple, list[tuple[int, float]]] = {}
    for (u, v, src, dst, uvar, vvar), i in f_idx.items():
        out_of.setdefault((u, v, src, uvar), []).append((i, 1.0))
        into.setdefault((u, v, dst, vvar), []).append((i, 1.0))
    for u, v in problem.edges:
        scale = problem.required_rate[v] / problem.required_rate[u] if problem.required_rate[u] else 0.0
        for src in places[u]:
            for uvar in problem.node_variants(u):
                out = out_of.get((u, v, src, uvar), [])
                if u in problem.sources:  # a source's requests must all be served: throughput
                    families[f"throughput of {v}"].add({"f": out}, "==", problem.required_rate[v])
                elif (u, src, uvar) in n_idx:
                    traffic.add({"f": out, "l": [(n_idx[u, src, uvar], -scale)]}, "==", 0.0)
        for dst in places[v]:
            here = [vvar for vvar in problem.node_variants(v) if (v, dst, vvar) in n_idx]
            if vv_dep[u, v]:
                for vvar in here:
                    traffic.add({"f": into.get((u, v, dst, vvar), []), "l": [(n_idx[v, dst, vvar], -1.0)]}, "==", 0.0)
            else:
                loads = [(n_idx[v, dst, vvar], -1.0) for vvar in here]
                traffic.add({"f": into.get((u, v, dst, "*"), []), "l": loads}, "==", 0.0)

    price = np.zeros(sizes["n"])
    for (o, pn, v), i in n_idx.items():
        price[i] = problem.pool_by_name[pn].price_per_hour
    f_cost = np.zeros(sizes["f"])
    for (u, v, src, dst, uvar, vvar), i in f_idx.items():
        kib = problem.message(u, v, uvar, vvar if vvar != "*" else DEFAULT)
        f_cost[i] = problem.link_cost(src, dst) * kib * KIB_PER_S_TO_GB_PER_HOUR
    objective = cp.Minimize(price @ variables["n"] + f_cost @ variables["f"])
    cp_families = {name: Family(rows.constraints(variables), meanings[name]) for name, rows in families.items()}
    cp_families["bounds"] = Family([variables["n"] >= 0], "machine counts are non-negative")
    if incumbent is not None:
        bound = incumbent.total_cost_per_hour * (1 + 1e-7) + 1e-9
        cp_families["no dearer than the incumbent"] = Family(
            [objective.args[0] <= bound], f"cost at most the {incumbent.strategy} plan's {incumbent.total_cost_per_hour:.4f} $/h"
        )
    try:
        solution = solve_milp(objective, cp_families, what=f"the JellyBean plan for {problem.name}", time_limit=time_limit)
    except SolverError:
        if incumbent is None:
            raise
        kept = price_plan(problem, strategy, incumbent.variants, incumbent.assignment, incumbent.flows,
                          solve_seconds=time.perf_counter() - start, optimal=False,
                          notes=[f"nothing cheaper than the {incumbent.strategy} plan found within {time_limit:.0f} s"])
        return kept

    y = variables["y"].value
    variants = {o: max(problem.node_variants(o), key=lambda v: y[y_idx[o, v]]) for o in ops}
    n_val, l_val, f_val = variables["n"].value, variables["l"].value, variables["f"].value
    assignment = []
    for (o, pn, v), i in n_idx.items():
        machines = int(round(n_val[i]))
        if machines > 0:
            assignment.append(Assignment(o, pn, v, machines, float(l_val[i]), problem.capacity(o, pn, v) * machines))
    flows = []
    for (u, v, src, dst, uvar, vvar), i in f_idx.items():
        if f_val[i] > 1e-9:
            kib = problem.message(u, v, uvar, vvar if vvar != "*" else DEFAULT)
            flows.append(_flow_cost(problem, u, v, src, dst, float(f_val[i]), kib))
    plan = price_plan(
        problem, strategy, variants, assignment, flows,
        solve_seconds=time.perf_counter() - start, optimal=solution.optimal,
    )
    plan.gap = 0.0 if solution.optimal else solution.gap
    return plan


def _size_depends_on_downstream_variant(problem: JellyBeanProblem, u: str, v: str) -> bool:
    vvars = problem.node_variants(v)
    if len(vvars) == 1:
        return False
    return any(
        len({problem.message(u, v, uvar, vvar) for vvar in vvars}) > 1 for uvar in problem.node_variants(u)
    )


def check_feasible_inputs(problem: JellyBeanProblem) -> None:
    """Fail fast, before any solve, on targets no plan can reach (names the binding rule)."""
    best = best_reachable_accuracy(problem)
    if best < problem.accuracy_target:
        raise InfeasibleError(
            f"the JellyBean plan for {problem.name}",
            {"accuracy": f"the target {problem.accuracy_target} is above the best reachable end-to-end accuracy {best:.2f}"},
        )
    for op in problem.operators:
        top = max(
            sum(problem.capacity(op, p.name, v) * p.count for p in problem.pools) for v in problem.node_variants(op)
        )
        if top < problem.required_rate[op]:
            raise InfeasibleError(
                f"the JellyBean plan for {problem.name}",
                {f"throughput of {op}": f"{op} cannot reach {problem.required_rate[op]:g} req/s even with every worker "
                 f"(at most {top:.2f} req/s with its fastest variant)"},
            )
