"""The JellyBean MILP: exact against brute force, never worse than the paper's heuristic."""

import pytest

from optimizers.jellybean import check_feasible_inputs, plan_milp, plan_violations
from optimizers.jellybean_baselines import (
    STRATEGIES,
    plan_brute_force,
    plan_jellybean_heuristic,
    variant_beam_search,
)
from optimizers.solve import InfeasibleError
from tasks.jellybean.generate import generate_problem
from tasks.jellybean.inputs import load_repository_inputs

VQA = "data/jellybean-vqa"


@pytest.fixture(scope="module")
def vqa():
    return load_repository_inputs(VQA)


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force_optimum_on_small_random_instances(seed):
    problem = generate_problem(seed, operators=2 + seed % 2, machines=4 + seed % 2, tiers=2)
    milp = plan_milp(problem)
    brute = plan_brute_force(problem)
    assert plan_violations(problem, milp) == []
    assert plan_violations(problem, brute) == []
    assert milp.total_cost_per_hour == pytest.approx(brute.total_cost_per_hour, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_milp_with_pools_of_identical_machines_matches_brute_force(seed):
    problem = generate_problem(100 + seed, operators=2, machines=6, pools=3, tiers=2)
    assert max(p.count for p in problem.pools) == 2
    assert plan_milp(problem).total_cost_per_hour == pytest.approx(
        plan_brute_force(problem).total_cost_per_hour, rel=1e-6, abs=1e-9
    )


@pytest.mark.parametrize("seed", range(10))
def test_milp_never_costs_more_than_any_baseline(seed):
    problem = generate_problem(200 + seed, operators=3 + seed % 3, machines=12, pools=6, tiers=3, variants=3)
    milp = plan_milp(problem)
    assert plan_violations(problem, milp) == []
    for name, strategy in STRATEGIES.items():
        try:
            baseline = strategy(problem)
        except InfeasibleError:
            continue  # a baseline may fail where the MILP succeeds
        assert plan_violations(problem, baseline) == [], name
        assert milp.total_cost_per_hour <= baseline.total_cost_per_hour + 1e-6, name


def test_vqa_milp_plan_meets_the_target_at_the_repository_brute_force_cost(vqa):
    plan = plan_milp(vqa)
    assert plan.optimal
    assert plan_violations(vqa, plan) == []
    assert plan.variants["ExtractImageFeature"] == "resnet18"
    assert plan.variants["SpeechRecognition"] == "wav2vec2-large-960h-lv60-self"
    assert plan.accuracy == pytest.approx(56.59)
    # The authors' brute force (no backward traffic) finds 7.4850 $/h on these inputs.
    assert plan.total_cost_per_hour == pytest.approx(7.4850, abs=5e-4)
    assert plan.compute_cost_per_hour == pytest.approx(6.242)


def test_vqa_heuristic_reproduces_the_papers_optimizer(vqa):
    plan = plan_jellybean_heuristic(vqa)
    assert plan_violations(vqa, plan) == []
    # Re-deriving the authors' main.py on these inputs gives 6.242 + 1.266778 $/h.
    assert plan.compute_cost_per_hour == pytest.approx(6.242)
    assert plan.total_cost_per_hour == pytest.approx(7.508778, abs=1e-5)


def test_variant_beam_search_ranks_by_relative_cost_and_respects_the_target(vqa):
    candidates = variant_beam_search(vqa)
    assert candidates[0]["ExtractImageFeature"] == "resnet18"
    assert all(vqa.accuracy.of(c) >= 56.0 for c in candidates)


def test_unreachable_accuracy_target_is_named_before_solving():
    problem = load_repository_inputs(VQA, accuracy_target=60.0)
    with pytest.raises(InfeasibleError) as err:
        check_feasible_inputs(problem)
    assert "accuracy" in err.value.conflicting
    assert "58.33" in str(err.value)


def test_unreachable_rate_names_the_operator_that_cannot_keep_up():
    problem = load_repository_inputs(VQA, rate=400.0)
    with pytest.raises(InfeasibleError) as err:
        check_feasible_inputs(problem)
    assert "throughput of ExtractImageFeature" in str(err.value) or "throughput of SpeechRecognition" in str(err.value)


def test_infeasible_milp_names_the_throughput_family():
    # Enough machines in total for each operator alone, not for all of them at once.
    problem = load_repository_inputs(VQA, rate=150.0)
    check_feasible_inputs(problem)
    with pytest.raises(InfeasibleError) as err:
        plan_milp(problem)
    assert "one operator per machine" in err.value.conflicting
    assert any(name.startswith("throughput of") for name in err.value.conflicting)


def test_milp_seeded_with_the_heuristic_is_never_dearer_even_when_stopped_early():
    from optimizers.jellybean import plan_milp

    problem = generate_problem(7, operators=8, machines=100, pools=20, tiers=4, variants=3)
    heuristic = plan_jellybean_heuristic(problem)
    rushed = plan_milp(problem, time_limit=0.05, incumbent=heuristic)
    assert plan_violations(problem, rushed) == []
    assert rushed.total_cost_per_hour <= heuristic.total_cost_per_hour + 1e-6


def test_medium_instance_solves_to_optimality_with_a_reported_gap_of_zero():
    from optimizers.jellybean import plan_milp

    problem = generate_problem(0, operators=8, machines=100, pools=20, tiers=4, variants=3)
    plan = plan_milp(problem, time_limit=120)
    assert plan.optimal and plan.gap == 0.0
    assert plan_violations(problem, plan) == []


def test_traffic_only_flows_between_pools_that_serve_its_ends():
    # U runs variant a only on E0 and b only on C1; V runs x only on C1b and y only on E0.
    # A model that let traffic leave or enter pools not serving it would find a free route.
    from optimizers.jellybean import AccuracyProduct, JellyBeanProblem, Pool

    problem = JellyBeanProblem(
        sources={"S": 10.0}, source_tier={"S": 0}, edges=[("S", "U"), ("U", "V")], ratios={},
        variants={"U": ["a", "b"], "V": ["x", "y"]}, relative_cost={},
        pools=[Pool("E0", 0, 1.0, 1), Pool("C1", 1, 1.0, 1), Pool("C1b", 1, 1.0, 1)],
        latency_ms={("U", "E0", "a"): 10.0, ("U", "C1", "b"): 10.0, ("V", "C1b", "x"): 10.0, ("V", "E0", "y"): 10.0},
        message_kib={("U", "V", "default", "x"): 1e6, ("U", "V", "default", "y"): 1.0},
        link_usd_per_gb={("E0", "C1"): 1.0, ("E0", "C1b"): 1.0, ("S", "C1"): 1.0, ("S", "C1b"): 1.0},
        accuracy=AccuracyProduct({("U", "a"): 100.0, ("U", "b"): 50.0, ("V", "x"): 100.0, ("V", "y"): 50.0}),
        accuracy_target=90.0,
    )
    milp = plan_milp(problem)
    assert plan_violations(problem, milp) == []
    assert milp.total_cost_per_hour == pytest.approx(plan_brute_force(problem).total_cost_per_hour, rel=1e-6)
