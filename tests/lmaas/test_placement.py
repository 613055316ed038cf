"""LMaaS adapter placement: the MILP's cost equals brute force on small instances, every constraint
family binds when it should, infeasibility names the conflicting families, and a shifted load mix is
noticed."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from optimizers.lmaas import (AdapterLoad, PlacementInputError, WorkerOption, active_probability,
                              brute_force_placement, needs_replan, plan_adapter_placement)
from optimizers.solve import InfeasibleError

MIB = 2 ** 20


def workers(n_cheap=2, n_big=1):
    return ([WorkerOption(f"cpu-{i}", "cpu-small", 0.096, 400, 64 * MIB, 4) for i in range(n_cheap)]
            + [WorkerOption(f"gpu-{i}", "l40s", 1.20, 6000, 1024 * MIB, 32) for i in range(n_big)])


def random_instance(seed: int, n_adapters: int = 5):
    """Random loads on 2–4 worker options; every third seed puts the cheap ones on one shared host."""
    rng = random.Random(seed)
    adapters = [AdapterLoad(f"a{i}", rng.uniform(5, 250), rng.uniform(0.01, 1.5), rng.randint(4, 40) * MIB)
                for i in range(n_adapters)]
    options = workers(rng.randint(1, 2), rng.randint(0, 1)) + [WorkerOption("cpu-x", "cpu-medium", 0.384, 1500, 256 * MIB, 8)]
    if seed % 3 == 0:
        options = [replace(w, host="host-a") if w.device == "cpu-small" else w for w in options]
    return adapters, options


@pytest.mark.parametrize("seed", range(12))
def test_the_milp_placement_costs_what_brute_force_finds_optimal(seed):
    adapters, options = random_instance(seed)
    best = brute_force_placement(adapters, options)
    if best is None:
        with pytest.raises(InfeasibleError):
            plan_adapter_placement(adapters, options)
        return
    plan = plan_adapter_placement(adapters, options)
    assert plan.usd_per_hour == pytest.approx(best)
    assert set(plan.assignment) == {a.name for a in adapters}
    by_name = {w.name: w for w in options}
    for worker in plan.workers:  # the plan's own figures respect every budget
        assert plan.utilisation[worker] <= 0.7 + 1e-6
        assert plan.memory_bytes[worker] <= by_name[worker].adapter_memory_bytes
        assert plan.active_adapters[worker] <= by_name[worker].resident_slots + 1e-6


@pytest.mark.parametrize("seed", range(10))
def test_a_replan_moves_as_few_adapters_as_brute_force_at_the_least_cost(seed):
    adapters, options = random_instance(seed)
    rng = random.Random(100 + seed)
    current = {a.name: rng.choice(options).name for a in adapters[:-1]}  # the last adapter is new
    best = brute_force_placement(adapters, options, current=current)
    if best is None:
        with pytest.raises(InfeasibleError):
            plan_adapter_placement(adapters, options, current=current)
        return
    plan = plan_adapter_placement(adapters, options, current=current)
    assert (plan.usd_per_hour, plan.moved) == (pytest.approx(best[0]), best[1])
    assert plan.moved == sum(plan.assignment[a] != w for a, w in current.items())


def test_a_replan_that_still_fits_moves_nothing_and_an_unknown_worker_is_named():
    adapters = [AdapterLoad(f"a{i}", 20, 0.1, 4 * MIB) for i in range(6)]
    options = workers(n_cheap=2, n_big=0)
    first = plan_adapter_placement(adapters, options)
    again = plan_adapter_placement(adapters, options, current=first.assignment)
    assert again.moved == 0 and again.assignment == first.assignment
    with pytest.raises(PlacementInputError, match=r"worker\(s\) \['gone-7'\] are not among the worker options"):
        plan_adapter_placement(adapters, options, current={"a0": "gone-7"})


def test_workers_on_one_host_carry_together_what_one_of_them_holds():
    """Two worker processes on one host's cores were each profiled alone: a load that needs both is
    not held by running both; it buys a machine of its own, or is infeasible by name."""
    adapters = [AdapterLoad(f"a{i}", 90, 0.1, 4 * MIB) for i in range(5)]  # 450 tokens/s; one cheap worker holds 280
    apart = workers(n_cheap=2, n_big=1)
    assert plan_adapter_placement(adapters, apart).workers == ["cpu-0", "cpu-1"]
    shared = [replace(w, host="this-host") if w.device == "cpu-small" else w for w in apart]
    assert plan_adapter_placement(adapters, shared).workers == ["gpu-0"]
    with pytest.raises(InfeasibleError, match="machines on one host share its throughput"):
        plan_adapter_placement(adapters, shared[:2])
    light = [AdapterLoad(f"a{i}", 50, 0.1, 4 * MIB) for i in range(5)]  # 250 tokens/s: one of them holds it
    plan = plan_adapter_placement(light, shared[:2])
    assert len(plan.workers) == 1
    two = replace(plan, workers=["cpu-0", "cpu-1"],  # each within its own 280, not within the host's
                  assignment={a.name: ("cpu-0" if i % 2 else "cpu-1") for i, a in enumerate(adapters)})
    assert needs_replan(two, adapters, shared[:2]) == ["host this-host: its workers' load over 70% of what the host holds"]


def test_light_load_packs_onto_the_cheapest_worker_and_heavy_load_buys_a_bigger_one():
    light = [AdapterLoad(f"a{i}", 10, 0.05, 8 * MIB) for i in range(6)]
    plan = plan_adapter_placement(light, workers())
    assert len(plan.workers) == 1 and plan.workers[0].startswith("cpu") and plan.usd_per_hour == pytest.approx(0.096)
    heavy = [AdapterLoad(f"a{i}", 600, 2.0, 8 * MIB) for i in range(6)]
    plan = plan_adapter_placement(heavy, workers())
    assert plan.workers == ["gpu-0"] and plan.usd_per_hour == pytest.approx(1.20)


def test_many_active_adapters_spread_over_workers_by_their_slots():
    """Eight adapters that are nearly always active, light in tokens: one CPU worker's 4 slots hold 4."""
    adapters = [AdapterLoad(f"a{i}", 5, 20.0, 4 * MIB) for i in range(8)]
    plan = plan_adapter_placement(adapters, workers(n_cheap=3, n_big=0))
    assert len(plan.workers) == 2 and all(len(plan.adapters_on(w)) == 4 for w in plan.workers)


def test_an_impossible_placement_names_the_conflicting_constraints():
    huge = [AdapterLoad("huge", 1, 0.1, 4096 * MIB)]
    with pytest.raises(InfeasibleError, match="adapter memory") as caught:
        plan_adapter_placement(huge, workers())
    assert "every adapter served once" in caught.value.conflicting
    overload = [AdapterLoad("busy", 50_000, 1, MIB)]
    with pytest.raises(InfeasibleError, match="throughput within the latency objective"):
        plan_adapter_placement(overload, workers())


def test_a_shifted_load_mix_is_noticed():
    adapters = [AdapterLoad(f"a{i}", 20, 0.1, 8 * MIB) for i in range(4)]
    options = workers()
    plan = plan_adapter_placement(adapters, options)
    assert needs_replan(plan, adapters, options) == []
    shifted = [AdapterLoad(a.name, 200, 0.1, a.size_bytes) for a in adapters] + [AdapterLoad("new", 1, 0.1, MIB)]
    reasons = needs_replan(plan, shifted, options)
    assert "1 adapter(s) not placed yet" in reasons and any("load over 70%" in r for r in reasons)


def test_bad_inputs_name_the_field():
    good = [AdapterLoad("a", 1, 0.1, MIB)]
    with pytest.raises(PlacementInputError, match=r"adapter 'a': tokens_per_s must be a finite number ≥ 0 \(got -1\)"):
        plan_adapter_placement([AdapterLoad("a", -1, 0.1, MIB)], workers())
    with pytest.raises(PlacementInputError, match=r"adapters: names must be unique \(repeated: \['a'\]\)"):
        plan_adapter_placement(good * 2, workers())
    with pytest.raises(PlacementInputError, match=r"max_utilisation must be in \(0, 1\]"):
        plan_adapter_placement(good, workers(), max_utilisation=1.5)


def test_active_probability_is_poisson():
    assert active_probability(0, 2) == 0 and active_probability(1, 2) == pytest.approx(1 - 2.718281828 ** -2)
