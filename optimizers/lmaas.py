"""LMaaS adapter placement: which serving workers to run, and which LoRA adapters each serves, at the
least cost per hour that still meets the tenants' latency objectives.

The model (a MILP, solved by :func:`optimizers.solve.solve_milp`):

    minimise    Σ_w c_w · y_w                                          ($ per hour of the workers run)
    subject to  Σ_w x_aw = 1                          ∀ a               (every adapter is served once)
                x_aw ≤ y_w                            ∀ a, w            (only by a running worker)
                Σ_a s_a · x_aw ≤ S_w · y_w            ∀ w               (adapter memory)
                Σ_a λ_a · x_aw ≤ ρ · μ_w · y_w        ∀ w               (throughput within the SLO's utilisation)
                Σ_a p_a · x_aw ≤ K_w · y_w            ∀ w               (adapters active at once fit the resident slots)
                Σ_{w ∈ h} Σ_a λ_a · x_aw ≤ ρ · μ_h    ∀ shared host h   (machines on one host share its cores)
                x, y ∈ {0, 1}

where ``λ_a`` is adapter a's expected load (tokens/s), ``s_a`` its size, ``p_a = 1 − exp(−r_a τ)``
the probability it has a request in flight in a window of ``τ`` seconds (``r_a`` its requests/s),
and worker w has price ``c_w`` ($/hour, from the device catalog), throughput ``μ_w`` (tokens/s,
profiled), adapter memory ``S_w`` and ``K_w`` resident slots. ``ρ`` is the highest utilisation at
which the profile met the time-per-output-token objective (batched decode: latency grows with load).
Punica and S-LoRA batch many adapters on one worker; the slot constraint keeps the adapters that
are active together within what one batch can hold without swapping.

Worker options that run on the same host (``host``, e.g. every worker process of an embedded cluster)
share its cores: each one's ``μ_w`` was profiled alone, with the whole host, so together they hold
``μ_h = max_{w ∈ h} μ_w`` and not the sum.

Re-planning from a ``current`` assignment is lexicographic: first the least cost ``C*`` as above,
then, among placements costing ``C*``, the fewest adapters moved off the worker that serves them
now (a move empties a warm host-memory slot and costs a fetch from the store):

    minimise    Σ_a (1 − x_a,cur(a))      subject to the constraints above and  Σ_w c_w · y_w ≤ C*
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np

from optimizers.solve import Family, solve_milp


class PlacementInputError(ValueError):
    """A placement input that cannot be used; names the field and the value."""


@dataclass(frozen=True)
class AdapterLoad:
    name: str
    tokens_per_s: float  # expected load λ_a
    requests_per_s: float  # expected arrival rate r_a
    size_bytes: int  # s_a


@dataclass(frozen=True)
class WorkerOption:
    """A serving worker that may be run: one device of the catalog, profiled."""

    name: str
    device: str
    usd_per_hour: float  # c_w
    tokens_per_s: float  # μ_w: throughput at full batch, profiled (or simulated from the catalog)
    adapter_memory_bytes: int  # S_w: memory for adapters beside the base model and the KV cache
    resident_slots: int  # K_w
    host: str | None = None  # options on the same host share its cores (None: a machine of its own)


@dataclass
class AdapterPlacement:
    assignment: dict[str, str]  # adapter -> worker
    workers: list[str]  # the workers to run
    usd_per_hour: float
    utilisation: dict[str, float]  # worker -> load / throughput
    active_adapters: dict[str, float]  # worker -> expected adapters active at once
    memory_bytes: dict[str, int]
    solve_seconds: float = 0.0
    optimal: bool = True
    inputs: dict = field(default_factory=dict)
    moved: int | None = None  # adapters moved off their current worker (a re-plan)

    def adapters_on(self, worker: str) -> list[str]:
        return sorted(a for a, w in self.assignment.items() if w == worker)


def _check(adapters: list[AdapterLoad], workers: list[WorkerOption], max_utilisation: float, window_s: float) -> None:
    if not adapters:
        raise PlacementInputError("adapters: at least one adapter is needed")
    if not workers:
        raise PlacementInputError("workers: at least one worker option is needed")
    for field_name, items in (("adapters", adapters), ("workers", workers)):
        names = [item.name for item in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PlacementInputError(f"{field_name}: names must be unique (repeated: {duplicates})")
    for a in adapters:
        for attr in ("tokens_per_s", "requests_per_s", "size_bytes"):
            value = getattr(a, attr)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PlacementInputError(f"adapter {a.name!r}: {attr} must be a finite number ≥ 0 (got {value!r})")
    for w in workers:
        for attr in ("usd_per_hour", "tokens_per_s", "adapter_memory_bytes", "resident_slots"):
            value = getattr(w, attr)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PlacementInputError(f"worker {w.name!r}: {attr} must be a finite number ≥ 0 (got {value!r})")
    if not 0 < max_utilisation <= 1:
        raise PlacementInputError(f"max_utilisation must be in (0, 1] (got {max_utilisation!r})")
    if not window_s > 0:
        raise PlacementInputError(f"window_s must be positive (got {window_s!r})")


def shared_hosts(workers: list[WorkerOption]) -> dict[str, list[int]]:
    """Host → the indices of the worker options on it, for hosts that hold more than one."""
    hosts: dict[str, list[int]] = {}
    for j, w in enumerate(workers):
        if w.host is not None:
            hosts.setdefault(w.host, []).append(j)
    return {h: js for h, js in hosts.items() if len(js) > 1}


def host_capacity(workers: list[WorkerOption], members: list[int]) -> float:
    """μ_h: what a host's worker options hold together (each was profiled alone, with all of it)."""
    return max(workers[j].tokens_per_s for j in members)


def combined_capacity(workers: list[WorkerOption]) -> float:
    """What all the options hold together: each one's own μ_w, a shared host's μ_h once."""
    hosts = shared_hosts(workers)
    shared = {j for members in hosts.values() for j in members}
    return (sum(w.tokens_per_s for j, w in enumerate(workers) if j not in shared)
            + sum(host_capacity(workers, members) for members in hosts.values()))


def active_probability(requests_per_s: float, window_s: float) -> float:
    """p_a: the chance an adapter with Poisson arrivals at ``requests_per_s`` has a request within ``window_s``."""
    return 1.0 - math.exp(-requests_per_s * window_s)


def plan_adapter_placement(adapters: list[AdapterLoad], workers: list[WorkerOption], *, max_utilisation: float = 0.7,
                           window_s: float = 2.0, time_limit: float = 60.0,
                           current: dict[str, str] | None = None) -> AdapterPlacement:
    """The cheapest set of workers and assignment of adapters (the MILP in the module docstring);
    with ``current`` (adapter → worker), the cheapest that moves the fewest adapters.

    Raises :class:`optimizers.solve.InfeasibleError` naming the constraint families that conflict
    (e.g. an adapter larger than any worker's adapter memory, or more load than all workers carry)."""
    _check(adapters, workers, max_utilisation, window_s)
    names = {w.name: j for j, w in enumerate(workers)}
    unknown = sorted({w for w in (current or {}).values() if w not in names})
    if unknown:
        raise PlacementInputError(f"current: worker(s) {unknown} are not among the worker options {sorted(names)}")
    n_a, n_w = len(adapters), len(workers)
    load = np.array([a.tokens_per_s for a in adapters])
    size = np.array([a.size_bytes for a in adapters], dtype=float)
    active = np.array([active_probability(a.requests_per_s, window_s) for a in adapters])
    price = np.array([w.usd_per_hour for w in workers])
    x = cp.Variable((n_a, n_w), boolean=True)
    y = cp.Variable(n_w, boolean=True)
    gib = 2.0 ** 30  # memory in GiB keeps the coefficients near 1
    families = {
        "every adapter served once": Family([cp.sum(x, axis=1) == 1], "each adapter is assigned to exactly one worker"),
        "only running workers serve": Family([x <= np.ones((n_a, 1)) @ cp.reshape(y, (1, n_w), order="C")],
                                             "an adapter goes to a worker that is run"),
        "adapter memory": Family([(size / gib) @ x <= cp.multiply(np.array([w.adapter_memory_bytes for w in workers]) / gib, y)],
                                 "the adapters on a worker fit its adapter memory"),
        "throughput within the latency objective": Family(
            [load @ x <= cp.multiply(max_utilisation * np.array([w.tokens_per_s for w in workers]), y)],
            f"a worker's load stays within {max_utilisation:.0%} of its profiled throughput"),
        "active adapters fit the resident slots": Family(
            [active @ x <= cp.multiply(np.array([w.resident_slots for w in workers], dtype=float), y)],
            f"adapters expected active within {window_s:g} s fit a worker's LoRA slots"),
    }
    hosts = shared_hosts(workers)
    if hosts:
        families["machines on one host share its throughput"] = Family(
            [load @ cp.sum(x[:, members], axis=1) <= max_utilisation * host_capacity(workers, members)
             for members in hosts.values()],
            "the workers on one host carry together at most what one of them was profiled to hold alone "
            f"(hosts: {', '.join(f'{h}: {len(js)} workers' for h, js in hosts.items())})")
    solution = solve_milp(cp.Minimize(price @ y), families, what="the LMaaS adapter placement", time_limit=time_limit)
    seconds, optimal, moved = solution.seconds, solution.optimal, None
    placed = [(i, names[current[a.name]]) for i, a in enumerate(adapters) if a.name in (current or {})]
    if placed:
        cheapest = float(price @ np.round(y.value))
        stay = cp.sum(cp.hstack([x[i, j] for i, j in placed]))
        families["no dearer than the cheapest"] = Family([price @ y <= cheapest + 1e-9],
                                                         f"the workers cost at most the least, ${cheapest:g}/hour")
        second = solve_milp(cp.Maximize(stay), families, what="the LMaaS re-placement", time_limit=time_limit)
        seconds, optimal = seconds + second.seconds, optimal and second.optimal
    chosen = np.round(x.value).astype(int)
    running = np.round(y.value).astype(int)
    where = chosen.argmax(axis=1)
    if placed:
        moved = sum(int(where[i] != j) for i, j in placed)
    return _placement(adapters, workers, where, running, load, size, active, seconds, optimal,
                      {"max_utilisation": max_utilisation, "window_s": window_s}, moved)


def _placement(adapters, workers, where, running, load, size, active, seconds, optimal, inputs,
               moved: int | None = None) -> AdapterPlacement:
    names = [w.name for w in workers]
    on = [names[j] for j in range(len(workers)) if running[j]]
    utilisation, active_on, memory = {}, {}, {}
    for j, w in enumerate(workers):
        if not running[j]:
            continue
        mine = where == j
        utilisation[w.name] = float(load[mine].sum() / w.tokens_per_s) if w.tokens_per_s else math.inf
        active_on[w.name] = float(active[mine].sum())
        memory[w.name] = int(size[mine].sum())
    return AdapterPlacement({a.name: names[j] for a, j in zip(adapters, where)}, on,
                            float(sum(w.usd_per_hour for j, w in enumerate(workers) if running[j])),
                            utilisation, active_on, memory, seconds, optimal, inputs, moved)


def brute_force_placement(adapters: list[AdapterLoad], workers: list[WorkerOption], *, max_utilisation: float = 0.7,
                          window_s: float = 2.0, current: dict[str, str] | None = None):
    """The optimal cost by trying every assignment (tiny instances only: workers ** adapters); None if
    infeasible. With ``current``: the optimal (cost, adapters moved), lexicographically."""
    _check(adapters, workers, max_utilisation, window_s)
    load = [a.tokens_per_s for a in adapters]
    active = [active_probability(a.requests_per_s, window_s) for a in adapters]
    index = {w.name: j for j, w in enumerate(workers)}
    now = [index.get((current or {}).get(a.name)) for a in adapters]
    hosts, best = shared_hosts(workers), None
    for where in itertools.product(range(len(workers)), repeat=len(adapters)):
        feasible = True
        for j, w in enumerate(workers):
            mine = [i for i, k in enumerate(where) if k == j]
            if not mine:
                continue
            if (sum(adapters[i].size_bytes for i in mine) > w.adapter_memory_bytes
                    or sum(load[i] for i in mine) > max_utilisation * w.tokens_per_s + 1e-9
                    or sum(active[i] for i in mine) > w.resident_slots + 1e-9):
                feasible = False
                break
        for members in hosts.values():
            if sum(load[i] for i, k in enumerate(where) if k in members) > (
                    max_utilisation * host_capacity(workers, members) + 1e-9):
                feasible = False
        if feasible:
            cost = sum(workers[j].usd_per_hour for j in set(where))
            if current is None:
                best = cost if best is None else min(best, cost)
            else:
                moved = sum(j is not None and k != j for k, j in zip(where, now))
                best = (round(cost, 9), moved) if best is None else min(best, (round(cost, 9), moved))
    return best


def needs_replan(placement: AdapterPlacement, adapters: list[AdapterLoad], workers: list[WorkerOption]) -> list[str]:
    """Why the current placement no longer fits loads ``adapters`` (empty: it still does): new adapters,
    or a worker now over its utilisation, memory or slot budget."""
    reasons = []
    known = set(placement.assignment)
    new = [a.name for a in adapters if a.name not in known]
    if new:
        reasons.append(f"{len(new)} adapter(s) not placed yet")
    by_name = {w.name: w for w in workers}
    rho, window = placement.inputs.get("max_utilisation", 0.7), placement.inputs.get("window_s", 2.0)
    for worker in placement.workers:
        mine = [a for a in adapters if placement.assignment.get(a.name) == worker]
        w = by_name[worker]
        if sum(a.tokens_per_s for a in mine) > rho * w.tokens_per_s:
            reasons.append(f"{worker}: load over {rho:.0%} of its throughput")
        if sum(a.size_bytes for a in mine) > w.adapter_memory_bytes:
            reasons.append(f"{worker}: adapters over its memory")
        if sum(active_probability(a.requests_per_s, window) for a in mine) > w.resident_slots:
            reasons.append(f"{worker}: more adapters active at once than its slots")
    for host, members in shared_hosts(workers).items():
        on_host = {workers[j].name for j in members} & set(placement.workers)
        if sum(a.tokens_per_s for a in adapters if placement.assignment.get(a.name) in on_host) > (
                rho * host_capacity(workers, members)):
            reasons.append(f"host {host}: its workers' load over {rho:.0%} of what the host holds")
    return reasons
