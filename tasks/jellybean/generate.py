"""Generated JellyBean instances: random workflows on tiered fleets, for tests and scaling.

A generated instance is shaped like the VQA one: sources in the lowest tier, operators
with a few variants (faster ones less accurate), machines that get faster and dearer
up the tiers, and upward links that cost money. Workers come in pools of identical
machines, the way a fleet is bought.
"""

from __future__ import annotations

import math

import numpy as np

from optimizers.jellybean import AccuracyProduct, JellyBeanProblem, Pool

TIER_SPEEDUP = (1.0, 2.5, 6.0, 20.0)  # machine speed relative to tier 0
TIER_PRICE = (0.10, 0.40, 1.20, 3.00)  # $/hour of one machine
UPLINK_USD_PER_GB = (0.0, 0.05, 0.09, 0.12)  # charged when traffic climbs into this tier


def generate_problem(
    seed: int,
    operators: int = 3,
    machines: int = 6,
    pools: int | None = None,
    tiers: int = 2,
    variants: int = 2,
    rate: float = 10.0,
    target_slack: float = 0.5,
) -> JellyBeanProblem:
    """A random feasible instance.

    Parameters
    ----------
    seed: random seed (same seed, same instance).
    operators: number of operators in the workflow DAG.
    machines: total machines across all pools.
    pools: number of pools (default: one per machine, i.e. every worker distinct).
    tiers: number of tiers (≤ 4).
    variants: variants per operator.
    rate: requests/s of each source.
    target_slack: where the accuracy target sits between the least and most accurate
        choice (0: anything goes, 1: only the most accurate variants).
    """
    rng = np.random.default_rng(seed)
    pools = machines if pools is None else pools
    sources = {f"src{i}": float(rate) for i in range(1 + (operators > 3))}
    names = [f"op{i}" for i in range(operators)]
    edges = []
    for i, op in enumerate(names):
        upstream = list(sources) + names[:i]
        k = 1 if i == 0 or rng.random() < 0.6 else 2
        for u in rng.choice(upstream if i else list(sources), size=min(k, len(upstream) if i else len(sources)), replace=False):
            edges.append((str(u), op))
    variant_names = {op: [f"v{j}" for j in range(variants)] for op in names}
    base_ms = {op: rng.uniform(20, 200) for op in names}
    accuracy, latency_factor = {}, {}
    for op in names:
        for j, var in enumerate(variant_names[op]):
            latency_factor[op, var] = 1.0 + 0.8 * j + rng.uniform(0, 0.3)
            accuracy[op, var] = 100.0 * (0.90 + 0.09 * j / max(variants - 1, 1) + rng.uniform(0, 0.005))

    sizes = np.full(pools, machines // pools)
    sizes[: machines % pools] += 1
    pool_list, latency = [], {}
    for i in range(pools):
        tier = int(min(tiers - 1, i * tiers // pools))
        name = f"t{tier}-p{i}"
        jitter = rng.uniform(0.8, 1.25)
        pool_list.append(Pool(name, tier, round(TIER_PRICE[tier] * jitter, 4), int(sizes[i])))
        for op in names:
            for var in variant_names[op]:
                latency[op, name, var] = base_ms[op] * latency_factor[op, var] / TIER_SPEEDUP[tier] * rng.uniform(0.9, 1.1)

    messages = {}
    for u, v in edges:
        for var in variant_names.get(u, ["default"]):
            messages[u, v, var, "default"] = float(rng.uniform(50, 800) if u in sources else rng.uniform(1, 50))
    links = {}
    for a in [*sources, *(p.name for p in pool_list)]:
        for b in pool_list:
            ta = 0 if a in sources else next(p.tier for p in pool_list if p.name == a)
            if b.tier > ta:
                links[a, b.name] = UPLINK_USD_PER_GB[b.tier] * rng.uniform(0.8, 1.2)

    acc = AccuracyProduct(accuracy)
    worst = acc.of({op: variant_names[op][0] for op in names})
    best = acc.of({op: variant_names[op][-1] for op in names})
    target = worst + target_slack * (best - worst)
    problem = JellyBeanProblem(
        sources=sources,
        source_tier={s: 0 for s in sources},
        edges=edges,
        ratios={},
        variants=variant_names,
        relative_cost={(op, var): base_ms[op] * latency_factor[op, var] for op in names for var in variant_names[op]},
        pools=pool_list,
        latency_ms=latency,
        message_kib=messages,
        link_usd_per_gb=links,
        accuracy=acc,
        accuracy_target=target,
        name=f"generated-{seed}",
    )
    _ensure_capacity(problem, rng)
    return problem


def _ensure_capacity(problem: JellyBeanProblem, rng: np.random.Generator) -> None:
    """Scale the source rates down until a plan surely exists.

    If every operator fits on ``ceil(R / slowest machine's capacity)`` machines and those
    add up to at most the fleet, then giving consecutive blocks of machines (sorted by
    tier) to the operators in topological order is feasible: tiers never decrease along
    an edge, whatever variants the accuracy target forces.
    """
    for _ in range(60):
        blocks = sum(
            math.ceil(problem.required_rate[op] / min(problem.capacity(op, p.name, problem.variants[op][-1]) for p in problem.pools) - 1e-9)
            for op in problem.operators
        )
        if blocks <= problem.machines():
            return
        for s in problem.sources:
            problem.sources[s] *= 0.8
        problem.__post_init__()
    raise RuntimeError(f"could not make {problem.name} feasible")
