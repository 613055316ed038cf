"""How often each strategy checkpoints: Young's rule on the failures that need a restore, checked
against brute force over intervals on an exact model of the time a job takes under failures."""

import math

import pytest

from optimizers.lazarus import (
    PlacementError, checkpoint_interval, checkpoint_interval_s, plan_strategy, restore_probability,
)
from tasks.lazarus.faults import Fault, failed_at_once, periodic_faults


def expected_seconds(work_steps: int, every: int, step_s: float, checkpoint_s: float, restore_s: float,
                     mtbf_s: float, q: float) -> float:
    """Exact expected time to train ``work_steps`` steps with a checkpoint every ``every`` steps, when
    failures come as a Poisson process every ``mtbf_s`` s on average and each needs a restore with
    probability q (so restores are a Poisson process of rate q/M). A segment is ``every`` steps and
    its checkpoint; a restore loses the segment so far and costs ``restore_s`` (no failure during
    it): E[segment] = (1/μ + R)·(e^{μ·T} − 1), μ = q/M, T = every·step_s + C."""
    rate = q / mtbf_s
    segment = every * step_s + checkpoint_s
    per_segment = segment if rate == 0 else (1 / rate + restore_s) * math.expm1(rate * segment)
    return work_steps / every * per_segment


def brute_force_best(work_steps, step_s, checkpoint_s, restore_s, mtbf_s, q, limit=5000) -> tuple[int, float]:
    costs = {k: expected_seconds(work_steps, k, step_s, checkpoint_s, restore_s, mtbf_s, q) for k in range(1, limit)}
    best = min(costs, key=costs.get)
    return best, costs[best]


@pytest.mark.parametrize("checkpoint_s, mtbf_s, step_s, restore_s", [
    (0.05, 15.0, 0.15, 1.0),   # the demo's scale: a tiny model's write, a failure every 15 s
    (2.0, 300.0, 0.5, 20.0),   # the paper's 5-minute failures
    (30.0, 2400.0, 1.0, 60.0),  # 40-minute failures, a large checkpoint
])
@pytest.mark.parametrize("q", [1.0, 0.5, 0.25, 0.05])
def test_interval_costs_what_the_best_interval_by_brute_force_costs(checkpoint_s, mtbf_s, step_s, restore_s, q):
    every = checkpoint_interval(checkpoint_s, mtbf_s, step_s, q)
    best, best_cost = brute_force_best(10_000, step_s, checkpoint_s, restore_s, mtbf_s, q)
    cost = expected_seconds(10_000, every, step_s, checkpoint_s, restore_s, mtbf_s, q)
    assert cost <= best_cost * 1.02, (every, best)
    assert abs(every - best) <= max(2, 0.25 * best), (every, best)


def test_a_placement_that_usually_survives_checkpoints_less_often_by_one_over_root_q():
    always = brute_force_best(10_000, 0.5, 2.0, 20.0, 300.0, 1.0)[0]
    quarter = brute_force_best(10_000, 0.5, 2.0, 20.0, 300.0, 0.25)[0]
    assert quarter == pytest.approx(2 * always, rel=0.1)  # √(1/0.25) = 2
    assert checkpoint_interval(2.0, 300.0, 0.5, 0.25) == pytest.approx(2 * checkpoint_interval(2.0, 300.0, 0.5), abs=1)


def test_with_restores_impossible_or_no_failures_expected_there_is_no_periodic_checkpoint():
    assert checkpoint_interval(0.05, 15.0, 0.15, 0.0) == checkpoint_interval(0.05, math.inf, 0.15) == 10**9
    assert checkpoint_interval(0.05, 15.0, 0.15, 0.0, max_steps=200) == 200
    # the exact model agrees: with q = 0 a checkpoint only costs time
    costs = [expected_seconds(1000, k, 0.15, 0.05, 1.0, 15.0, 0.0) for k in (10, 100, 1000)]
    assert costs == sorted(costs, reverse=True)


def test_checkpoint_restart_gets_youngs_rule():
    # q = 1: √(2 · C · M) = √(2 · 2 · 300) ≈ 34.6 s, in steps of 0.5 s ≈ 69.3
    assert checkpoint_interval_s(2.0, 300.0) == pytest.approx(math.sqrt(1200))
    assert checkpoint_interval(2.0, 300.0, 0.5) == 69
    assert checkpoint_interval_s(2.0, 300.0, 0.0) == checkpoint_interval_s(2.0, math.inf) == math.inf


def test_restore_probability_of_the_demos_clusters():
    lazarus4 = plan_strategy("lazarus", [1.0] * 8, 4, 6, 2).placement
    uniform3 = plan_strategy("reconfig_uniform", [1.0] * 8, 3, 6, 2).placement
    uniform4 = plan_strategy("reconfig_uniform", [1.0] * 8, 4, 6, 2).placement
    assert restore_probability(lazarus4, 4) == 0.0  # every expert on ≥ 2 nodes
    assert restore_probability(uniform4, 4) == 0.0  # two EP pairs
    assert restore_probability(uniform3, 3) == pytest.approx(2 / 3)  # one EP pair and an idle node
    # two nodes at once half the time: EP pairs lose 2 of the 6 pairs of nodes
    assert restore_probability(uniform4, 4, {1: 1, 2: 1}) == pytest.approx(0.5 * 2 / 6)
    assert restore_probability(lazarus4, 4, {1: 1, 2: 1}) == 0.0


@pytest.mark.parametrize("call, says", [
    (lambda: checkpoint_interval(-1.0, 15.0, 0.1), "checkpoint_s = -1.0"),
    (lambda: checkpoint_interval(0.1, 0.0, 0.1), "mtbf_s = 0.0"),
    (lambda: checkpoint_interval(0.1, 15.0, 0.1, 1.5), "restore_probability must be in [0, 1], got 1.5"),
    (lambda: checkpoint_interval(0.1, 15.0, float("nan")), "step_s = nan"),
    (lambda: restore_probability(plan_strategy("lazarus", [1.0] * 8, 4, 6, 2).placement, 4, {0: 1.0}),
     "integers ≥ 1, got 0"),
    (lambda: restore_probability(plan_strategy("lazarus", [1.0] * 8, 4, 6, 2).placement, 4, {1: -1.0}), "-1.0"),
])
def test_bad_input_raises_naming_the_value(call, says):
    with pytest.raises(PlacementError, match=None) as info:
        call()
    assert says in str(info.value)


def test_a_schedules_failures_at_once_are_counted_per_event():
    assert failed_at_once(periodic_faults(8.0, 40.0, 3.0)) == {1: 1.0}
    trace = [Fault(5.0, "remove", "a"), Fault(5.0, "remove", "b"), Fault(9.0, "add", "c"), Fault(12.0, "remove", "c")]
    assert failed_at_once(trace) == {1: 0.5, 2: 0.5}  # two nodes at 5 s are one event
    assert failed_at_once([]) == {1: 1.0}
