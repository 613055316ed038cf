"""Strategies JellyBean's MILP is compared with, each priced by the same cost model.

* :func:`plan_brute_force` — exact: enumerates every accurate-enough variant choice and
  every way of giving machines to operators, then routes load and traffic with an LP
  (scipy's ``linprog``). Exponential; for checking the MILP on small instances.
* :func:`plan_jellybean_heuristic` — the JellyBean paper's own optimizer: a beam search
  over variants ranked by relative compute cost, then, per candidate, a beam over
  topological orders that assigns each operator greedily to the cheapest workers of
  the lowest tiers its inputs allow (cost per unit of throughput, counting the $ of the
  traffic it must receive).
* :func:`plan_infaas_style` — INFaaS-like: each operator picks, on its own, its cheapest
  variant that can still meet the accuracy target, then takes the machines with the
  lowest $/hour per request/s in any tier its inputs allow; network costs are ignored.
* :func:`plan_cloud_only` — everything on the top tier (the best such plan: the MILP
  restricted to top-tier workers).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import networkx as nx
import numpy as np
from scipy.optimize import linprog

from optimizers.jellybean import (
    KIB_PER_S_TO_GB_PER_HOUR,
    AccuracyProduct,
    AccuracyTable,
    Assignment,
    JellyBeanProblem,
    Plan,
    _flow_cost,
    feasible_variant_choices,
    plan_milp,
    price_plan,
)
from optimizers.solve import DEFAULT_TIME_LIMIT_S, InfeasibleError

BEAM_WIDTH = 10
MAX_ORDERS = 10
EPS = 1e-9


# --------------------------------------------------------------------------- brute force


def _route(problem: JellyBeanProblem, variants: dict[str, str], machines: dict[tuple[str, str], int]):
    """Cheapest loads and traffic for fixed variants and machine counts (an LP); None if infeasible."""
    ops = problem.operators
    l_keys = [(o, p) for (o, p), n in machines.items() if n > 0]
    places = {o: [p for (oo, p) in l_keys if oo == o] for o in ops}
    places.update({s: [s] for s in problem.sources})
    f_keys = [
        (u, v, a, b)
        for u, v in problem.edges
        for a in places[u]
        for b in places[v]
        if problem.tier_of(a) <= problem.tier_of(b)
    ]
    nl, nf = len(l_keys), len(f_keys)
    li = {k: i for i, k in enumerate(l_keys)}
    cost = np.zeros(nl + nf)
    bounds = [(0, problem.capacity(o, p, variants[o]) * machines[o, p]) for o, p in l_keys] + [(0, None)] * nf
    for j, (u, v, a, b) in enumerate(f_keys):
        kib = problem.message(u, v, variants.get(u, "default"), variants[v])
        cost[nl + j] = problem.link_cost(a, b) * kib * KIB_PER_S_TO_GB_PER_HOUR
    rows, rhs = [], []
    for o in ops:
        row = np.zeros(nl + nf)
        for p in places[o]:
            row[li[o, p]] = 1
        rows.append(row)
        rhs.append(problem.required_rate[o])
    for u, v in problem.edges:
        scale = problem.required_rate[v] / problem.required_rate[u]
        for a in places[u]:
            row = np.zeros(nl + nf)
            for j, k in enumerate(f_keys):
                if k[:3] == (u, v, a):
                    row[nl + j] = 1
            if u in problem.sources:
                rhs.append(problem.required_rate[v])
            else:
                row[li[u, a]] = -scale
                rhs.append(0.0)
            rows.append(row)
        for b in places[v]:
            row = np.zeros(nl + nf)
            for j, k in enumerate(f_keys):
                if k[0] == u and k[1] == v and k[3] == b:
                    row[nl + j] = 1
            row[li[v, b]] = -1
            rows.append(row)
            rhs.append(0.0)
    result = linprog(cost, A_eq=np.array(rows), b_eq=np.array(rhs), bounds=bounds, method="highs")
    if result.status != 0:
        return None
    x = result.x
    loads = {k: float(x[i]) for k, i in li.items()}
    flows = [(f_keys[j], float(x[nl + j])) for j in range(nf) if x[nl + j] > EPS]
    return loads, flows


def plan_brute_force(problem: JellyBeanProblem, max_combinations: int = 2_000_000) -> Plan:
    """Exact optimum by enumeration (small instances only)."""
    start = time.perf_counter()
    ops = problem.operators
    slots = [(p.name, p.count) for p in problem.pools]
    choices_per_pool = []
    for name, count in slots:
        # how many of this pool's machines serve each operator (or none)
        options = [c for c in itertools.product(range(count + 1), repeat=len(ops)) if sum(c) <= count]
        choices_per_pool.append(options)
    total = math.prod(len(c) for c in choices_per_pool)
    if total > max_combinations:
        raise ValueError(f"brute force would enumerate {total:,} machine assignments (limit {max_combinations:,})")
    best: tuple[float, Plan] | None = None
    for variants in feasible_variant_choices(problem):
        for combo in itertools.product(*choices_per_pool):
            machines = {(o, name): combo[pi][oi] for pi, (name, _) in enumerate(slots) for oi, o in enumerate(ops)}
            machines = {k: n for k, n in machines.items() if n and problem.capacity(k[0], k[1], variants[k[0]]) > 0}
            if any(
                sum(problem.capacity(o, p, variants[o]) * n for (oo, p), n in machines.items() if oo == o)
                < problem.required_rate[o] - EPS
                for o in ops
            ):
                continue
            compute = sum(problem.pool_by_name[p].price_per_hour * n for (_, p), n in machines.items())
            if best is not None and compute >= best[0] - EPS:
                continue
            routed = _route(problem, variants, machines)
            if routed is None:
                continue
            loads, flows = routed
            assignment = [
                Assignment(o, p, variants[o], n, loads[o, p], problem.capacity(o, p, variants[o]) * n)
                for (o, p), n in machines.items()
            ]
            flow_rows = [
                _flow_cost(problem, u, v, a, b, rate, problem.message(u, v, variants.get(u, "default"), variants[v]))
                for (u, v, a, b), rate in flows
            ]
            plan = price_plan(problem, "brute_force", variants, assignment, flow_rows, optimal=True)
            if best is None or plan.total_cost_per_hour < best[0] - EPS:
                best = (plan.total_cost_per_hour, plan)
    if best is None:
        raise InfeasibleError(f"the JellyBean plan for {problem.name}", {"enumeration": "no assignment meets every constraint"})
    best[1].solve_seconds = time.perf_counter() - start
    return best[1]


# --------------------------------------------------------------------------- the paper's heuristic


def _relative_cost(problem: JellyBeanProblem, op: str, var: str) -> float:
    if (op, var) in problem.relative_cost:
        return problem.relative_cost[op, var]
    lat = [ms for (o, _, v), ms in problem.latency_ms.items() if o == op and v == var]
    return float(np.mean(lat)) if lat else math.inf


def _can_still_reach(problem: JellyBeanProblem, partial: dict[str, str]) -> bool:
    """Whether some completion of ``partial`` meets the accuracy target (optimistic bound)."""
    acc, target = problem.accuracy, problem.accuracy_target
    if isinstance(acc, AccuracyTable):
        return any(
            a >= target and all(partial.get(op, combo[j]) == combo[j] for j, op in enumerate(acc.operators))
            for combo, a in acc.table.items()
        )
    assert isinstance(acc, AccuracyProduct)
    value = acc.scale
    for op in problem.operators:
        options = [partial[op]] if op in partial else problem.node_variants(op)
        value *= max(acc.accuracy.get((op, v), acc.scale) for v in options) / acc.scale
    return value >= target


def variant_beam_search(problem: JellyBeanProblem, width: int = BEAM_WIDTH) -> list[dict[str, str]]:
    """Up to ``width`` variant choices meeting the target, cheapest relative compute cost first."""
    beam: list[tuple[float, dict[str, str]]] = [(0.0, {})]
    for op in reversed(problem.operators):  # the sink first, as the paper does
        children = []
        for cost, partial in beam:
            for var in problem.node_variants(op):
                child = {**partial, op: var}
                if _can_still_reach(problem, child):
                    children.append((cost + _relative_cost(problem, op, var), child))
        beam = sorted(children, key=lambda c: c[0])[:width]
    return [variants for _, variants in beam if problem.accuracy.of(variants) >= problem.accuracy_target]


@dataclass
class _State:
    cost: float
    used: frozenset
    tier: dict[str, int]
    placed: dict[str, list[tuple[tuple[str, int], float]]]  # op → [((pool, idx), rate)]


def _incoming_cost(problem: JellyBeanProblem, state: _State, variants: dict[str, str], v: str, pool: str, rate: float) -> float:
    """$/hour of the input traffic of ``rate`` requests/s of ``v`` arriving at a machine of ``pool``."""
    usd = 0.0
    for u in problem.inputs[v]:
        kib = problem.message(u, v, variants.get(u, "default"), variants[v]) * rate
        if u in problem.sources:
            usd += problem.link_cost(u, pool) * kib
        else:
            for (src_pool, _), r in state.placed[u]:
                usd += problem.link_cost(src_pool, pool) * kib * r / problem.required_rate[u]
    return usd * KIB_PER_S_TO_GB_PER_HOUR


def _greedy_pick(problem, state, variants, v, avail, network_aware: bool):
    """Fill ``v``'s required rate from ``avail`` machines, cheapest per unit of throughput first."""
    need = problem.required_rate[v]
    cap = {m: problem.capacity(v, m[0], variants[v]) for m in avail}
    price = {m: problem.pool_by_name[m[0]].price_per_hour for m in avail}

    def comm(m, rate):
        return _incoming_cost(problem, state, variants, v, m[0], rate) if network_aware else 0.0

    def prefer_single(order, need):
        lowest = min(problem.pool_by_name[m[0]].tier for m in order)
        fits = [m for m in order if problem.pool_by_name[m[0]].tier == lowest and cap[m] >= need]
        return sorted(fits, key=lambda m: (price[m] + comm(m, need), cap[m])) if fits else None

    order = prefer_single(avail, need) or sorted(
        avail, key=lambda m: ((price[m] + comm(m, cap[m])) / cap[m], price[m] + comm(m, cap[m]))
    )
    chosen = []
    while need > EPS and order:
        m = order.pop(0)
        rate = min(cap[m], need)
        chosen.append((m, rate))
        need -= rate
        if need > EPS and order:
            order = prefer_single(order, need) or order
    return chosen if need <= EPS * 10 else None


def _assign(problem: JellyBeanProblem, variants: dict[str, str], *, network_aware: bool,
            width: int = BEAM_WIDTH, max_orders: int = MAX_ORDERS) -> list[_State]:
    graph = nx.DiGraph(problem.edges)
    machines = [(p.name, i) for p in problem.pools for i in range(p.count)]
    tiers = sorted({p.tier for p in problem.pools})
    finals: list[_State] = []
    for order in itertools.islice(nx.all_topological_sorts(graph), max_orders):
        beam = [_State(0.0, frozenset(), dict(problem.source_tier), {})]
        for v in order:
            if v in problem.sources:
                continue
            children = []
            for st in beam:
                low = max(st.tier[u] for u in problem.inputs[v])
                runnable = [m for m in machines if m not in st.used and problem.capacity(v, m[0], variants[v]) > 0]
                for top in [t for t in tiers if t >= low]:
                    avail = [m for m in runnable if low <= problem.pool_by_name[m[0]].tier <= top]
                    if not avail:
                        continue
                    chosen = _greedy_pick(problem, st, variants, v, avail, network_aware)
                    if chosen is None:
                        continue
                    compute = sum(problem.pool_by_name[m[0]].price_per_hour for m, _ in chosen)
                    comm = sum(_incoming_cost(problem, st, variants, v, m[0], r) for m, r in chosen)
                    children.append(_State(
                        st.cost + compute + comm, st.used | {m for m, _ in chosen},
                        {**st.tier, v: max(problem.pool_by_name[m[0]].tier for m, _ in chosen)},
                        {**st.placed, v: chosen},
                    ))
                    if not network_aware:
                        break  # INFaaS-style: the first tier range that works, no look-ahead
            beam = sorted(children, key=lambda s: s.cost)[:width]
        finals.extend(beam)
    return sorted(finals, key=lambda s: s.cost)[:width]


def _state_to_assignment(problem: JellyBeanProblem, variants: dict[str, str], state: _State) -> list[Assignment]:
    rows: dict[tuple[str, str], list[float]] = {}
    for op, picks in state.placed.items():
        for (pool, _), rate in picks:
            rows.setdefault((op, pool), []).append(rate)
    return [
        Assignment(op, pool, variants[op], len(r), sum(r), problem.capacity(op, pool, variants[op]) * len(r))
        for (op, pool), r in rows.items()
    ]


def _best_priced(problem: JellyBeanProblem, strategy: str, candidates, start: float, notes: list[str]) -> Plan:
    best = None
    for variants, state in candidates:
        plan = price_plan(problem, strategy, variants, _state_to_assignment(problem, variants, state), notes=notes)
        if best is None or plan.total_cost_per_hour < best.total_cost_per_hour - EPS or (
            abs(plan.total_cost_per_hour - best.total_cost_per_hour) <= EPS and plan.accuracy > best.accuracy
        ):
            best = plan
    if best is None:
        raise InfeasibleError(f"the {strategy} plan for {problem.name}", {strategy: "the greedy assignment found no plan that covers every operator's rate"})
    best.solve_seconds = time.perf_counter() - start
    return best


def plan_jellybean_heuristic(problem: JellyBeanProblem) -> Plan:
    """The JellyBean paper's optimizer: variant beam search, then greedy per-tier assignment."""
    start = time.perf_counter()
    candidates = [(variants, state) for variants in variant_beam_search(problem)
                  for state in _assign(problem, variants, network_aware=True)]
    return _best_priced(problem, "jellybean_heuristic", candidates, start,
                        [f"beam width {BEAM_WIDTH} over variants, {MAX_ORDERS} topological orders"])


def infaas_variants(problem: JellyBeanProblem) -> dict[str, str]:
    """Each operator alone picks its cheapest variant that meets its own accuracy requirement.

    With per-operator accuracies (a product model) each operator's own requirement is an
    equal share of the end-to-end target, ``(target/scale)^(1/#operators)``, which
    composes to the target. With only an end-to-end table, an operator's variant is
    acceptable on its own if the target is reachable with the other operators at their
    best; the combination may then miss the target, which the plan's notes say.
    """
    acc = problem.accuracy
    chosen = {}
    for op in problem.operators:
        if isinstance(acc, AccuracyProduct):
            share = acc.scale * (problem.accuracy_target / acc.scale) ** (1 / len(problem.operators))
            ok = [v for v in problem.node_variants(op) if acc.accuracy.get((op, v), acc.scale) >= share - EPS]
        else:
            ok = [v for v in problem.node_variants(op) if _can_still_reach(problem, {op: v})]
        if not ok:
            raise InfeasibleError(f"the infaas_style plan for {problem.name}", {"accuracy": f"no variant of {op} meets its own share of the target"})
        chosen[op] = min(ok, key=lambda v: _relative_cost(problem, op, v))
    return chosen


def plan_infaas_style(problem: JellyBeanProblem) -> Plan:
    """INFaaS-like: per-operator variant choice, then network-unaware cheapest-throughput assignment."""
    start = time.perf_counter()
    variants = infaas_variants(problem)
    notes = ["variants chosen per operator, not jointly", "assignment ignores network cost"]
    if problem.accuracy.of(variants) < problem.accuracy_target:
        notes.append(f"per-operator choice misses the end-to-end target ({problem.accuracy.of(variants):.2f})")
    states = _assign(problem, variants, network_aware=False, width=1, max_orders=1)
    return _best_priced(problem, "infaas_style", [(variants, s) for s in states], start, notes)


def plan_cloud_only(problem: JellyBeanProblem) -> Plan:
    """Everything on the top tier: the cheapest plan that uses only top-tier workers."""
    top = {p.name for p in problem.pools if p.tier == problem.top_tier}
    plan = plan_milp(problem, allowed_pools=top, strategy="cloud_only")
    plan.notes.append(f"only top-tier workers ({len(top)} pools)")
    return plan


def plan_milp_seeded(problem: JellyBeanProblem, time_limit: float = DEFAULT_TIME_LIMIT_S) -> Plan:
    """The MILP, capped by the paper's heuristic plan: optimal when it finishes, never dearer than the heuristic."""
    try:
        incumbent = plan_jellybean_heuristic(problem)
    except InfeasibleError:
        incumbent = None
    return plan_milp(problem, time_limit=time_limit, incumbent=incumbent)


STRATEGIES = {
    "jellybean_heuristic": plan_jellybean_heuristic,
    "infaas_style": plan_infaas_style,
    "cloud_only": plan_cloud_only,
}
