"""The partitioning optimizer: MILP against brute force, the heuristic and baselines, infeasibility."""

import itertools
import math

import numpy as np
import pytest

from optimizers.honeybee import (
    Block, PartitioningProblem, UserClass, _best_cover, candidate_partitions, plan_brute_force,
    plan_greedy_merge, plan_honeybee, plan_milp, plan_per_role, plan_per_user, plan_rls,
)
from optimizers.solve import InfeasibleError


def hnsw_like_cost(n: int, s: np.ndarray, unreachable_below: float = 0.0) -> np.ndarray:
    """Filtered search cost: fixed overhead + effort growing as selectivity falls, log in size."""
    s = np.asarray(s, dtype=float)
    cost = 5e-5 + 2e-5 * math.log(max(n, 2)) * s ** -0.8
    return np.where(s < unreachable_below, np.inf, cost)


def random_problem(seed: int, budget: float | None = None, floor_at: float = 0.0) -> PartitioningProblem:
    rng = np.random.default_rng(seed)
    roles = [f"r{i}" for i in range(int(rng.integers(3, 6)))]
    signatures = set()
    while len(signatures) < int(rng.integers(3, 8)):
        k = int(rng.integers(1, 3))
        signatures.add(frozenset(rng.choice(roles, size=k, replace=False).tolist()))
    for r in roles:  # every role grants something
        if not any(r in sig for sig in signatures):
            signatures.add(frozenset([r]))
    blocks = tuple(Block(sig, int(rng.integers(10, 300))) for sig in sorted(signatures, key=sorted))
    users = set()
    while len(users) < int(rng.integers(2, 6)):
        k = int(rng.integers(1, 4))
        users.add(frozenset(rng.choice(roles, size=min(k, len(roles)), replace=False).tolist()))
    users = tuple(UserClass(u, float(rng.uniform(0.1, 1.0))) for u in sorted(users, key=sorted))
    return PartitioningProblem(blocks, users, lambda n, s: hnsw_like_cost(n, s, floor_at),
                               storage_budget=budget if budget is not None else float(rng.uniform(1.0, 2.2)))


def assert_serves_every_role(problem, plan):
    for g, user in enumerate(problem.users):
        served = set().union(*(plan.partitions[p] for p in plan.routes[g]))
        assert served >= user.roles, (user.roles, served)
        for p in plan.routes[g]:
            assert plan.partitions[p] & user.roles, "a route never searches a partition that serves none of its roles"


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force_optimum_on_small_instances(seed):
    problem = random_problem(seed)
    candidates = candidate_partitions(problem, max_user_classes=3)[:12]
    brute = plan_brute_force(problem, candidates)
    milp = plan_milp(problem, candidates, per_role=None)
    assert milp.expected_latency_s == pytest.approx(brute.expected_latency_s, rel=1e-6)
    assert milp.storage <= problem.storage_budget + 1e-9
    assert_serves_every_role(problem, milp)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_merge_meets_the_budget_and_is_no_better_than_the_optimum(seed):
    problem = random_problem(seed)
    greedy = plan_greedy_merge(problem)
    assert greedy.method == "greedy_merge"
    assert greedy.storage <= problem.storage_budget + 1e-9
    assert_serves_every_role(problem, greedy)
    candidates = candidate_partitions(problem, max_user_classes=3, extra=greedy.partitions)[:14]
    if all(p in candidates for p in greedy.partitions):
        brute = plan_brute_force(problem, candidates)
        assert brute.expected_latency_s <= greedy.expected_latency_s + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_honeybee_is_never_slower_than_its_greedy_seed_or_rls(seed):
    problem = random_problem(seed)
    plan = plan_honeybee(problem, time_limit=20)
    assert plan.storage <= problem.storage_budget + 1e-9
    assert plan.expected_latency_s <= plan_greedy_merge(problem).expected_latency_s + 1e-12
    assert plan.expected_latency_s <= plan_rls(problem).expected_latency_s + 1e-12
    assert_serves_every_role(problem, plan)


def test_baselines_store_and_route_as_named():
    blocks = (Block(frozenset({"eng"}), 100), Block(frozenset({"eng", "all"}), 50), Block(frozenset({"all"}), 350))
    users = (UserClass(frozenset({"eng"}), 1.0), UserClass(frozenset({"eng", "all"}), 1.0), UserClass(frozenset({"all"}), 2.0))
    problem = PartitioningProblem(blocks, users, hnsw_like_cost, storage_budget=1.2)
    rls = plan_rls(problem)
    assert rls.storage == 1.0 and rls.routes == [[0], [0], [0]]
    per_role = plan_per_role(problem)
    assert per_role.storage == pytest.approx((150 + 400) / 500)
    assert [sorted(per_role.partitions[p] for p in r) for r in per_role.routes] == [
        [frozenset({"eng"})], [frozenset({"all"}), frozenset({"eng"})], [frozenset({"all"})]]
    per_user = plan_per_user(problem)
    assert per_user.sizes == [150, 500, 400]
    assert per_user.storage == pytest.approx(1050 / 500)
    # the user who may see everything pays the least in rls; the eng-only user the most
    assert rls.route_costs[1] < rls.route_costs[2] < rls.route_costs[0]


def test_honeybee_beats_rls_when_storage_allows_splitting_a_small_role_out():
    blocks = (Block(frozenset({"eng"}), 100), Block(frozenset({"eng", "all"}), 50), Block(frozenset({"all"}), 9850))
    users = (UserClass(frozenset({"eng"}), 1.0), UserClass(frozenset({"all"}), 1.0))
    problem = PartitioningProblem(blocks, users, hnsw_like_cost, storage_budget=1.02)
    plan = plan_honeybee(problem)
    assert plan.expected_latency_s < plan_rls(problem).expected_latency_s
    assert frozenset({"eng"}) in plan.partitions and plan.storage <= 1.02


def test_closure_adds_roles_whose_documents_the_partition_already_holds():
    blocks = (Block(frozenset({"team", "dept"}), 10), Block(frozenset({"dept"}), 5), Block(frozenset({"other"}), 7))
    users = (UserClass(frozenset({"team"}), 1.0),)
    problem = PartitioningProblem(blocks, users, hnsw_like_cost)
    assert problem.closure(frozenset({"dept"})) == frozenset({"dept", "team"})
    assert problem.closure(frozenset({"team"})) == frozenset({"team"})


def test_best_cover_is_the_cheapest_covering_subset():
    rng = np.random.default_rng(3)
    roles = ["a", "b", "c", "d"]
    for _ in range(30):
        partitions = [frozenset(rng.choice(roles, size=int(rng.integers(1, 4)), replace=False).tolist()) for _ in range(6)]
        costs = rng.uniform(1, 10, size=6)
        user = UserClass(frozenset(rng.choice(roles, size=int(rng.integers(1, 4)), replace=False).tolist()), 1.0)
        best = math.inf
        for k in range(1, 7):
            for combo in itertools.combinations(range(6), k):
                if set().union(*(partitions[p] for p in combo)) >= user.roles:
                    best = min(best, costs[list(combo)].sum())
        route, cost = _best_cover(user, partitions, costs)
        assert cost == pytest.approx(best) if math.isfinite(best) else route == []


def test_unreachable_recall_floor_names_the_conflicting_constraints():
    # the tiny team's documents are also the big role's: at budget 1.0 it cannot have a partition of
    # its own, and in the shared one its selectivity (0.1%) is below what reaches the recall floor
    blocks = (Block(frozenset({"tiny", "big"}), 5), Block(frozenset({"big"}), 5000))
    users = (UserClass(frozenset({"tiny"}), 1.0), UserClass(frozenset({"big"}), 1.0))
    problem = PartitioningProblem(blocks, users, lambda n, s: hnsw_like_cost(n, s, unreachable_below=0.5),
                                  storage_budget=1.0)
    with pytest.raises(InfeasibleError) as err:
        plan_honeybee(problem, time_limit=10)
    assert {"coverage", "storage budget"} <= set(err.value.conflicting)
    assert "recall" in str(err.value)
    relaxed = PartitioningProblem(blocks, users, problem.search_cost, storage_budget=1.01)
    assert frozenset({"tiny"}) in plan_honeybee(relaxed, time_limit=10).partitions


def test_storage_budget_below_one_is_refused():
    with pytest.raises(ValueError, match="storage_budget"):
        PartitioningProblem((Block(frozenset({"a"}), 1),), (UserClass(frozenset({"a"}), 1.0),), hnsw_like_cost,
                            storage_budget=0.9)


def test_placement_puts_hot_partitions_near_users_within_capacity():
    from optimizers.honeybee import PoolSlot, place_partitions

    sizes = [100, 100, 1000, 500]
    loads = [5.0, 0.1, 2.0, 0.5]  # partition 0 is the hottest per document
    slots = [PoolSlot("edge", "edge", 150, machines=2), PoolSlot("cloud-a", "cloud", 1000), PoolSlot("cloud-b", "cloud", 1000)]
    placed = place_partitions(sizes, loads, slots, near_tier="edge")
    assert placed[0] == "edge"
    assert placed[1] != "edge"  # partition 0 alone exceeds the edge's share of the load (2 of 4 machines)
    for slot in slots:
        assert sum(s for s, p in zip(sizes, placed) if p == slot.name) <= slot.capacity
    assert {placed[2], placed[3]} == {"cloud-a", "cloud-b"}  # the two heaviest loads are split
    with pytest.raises(ValueError, match="fits in no pool"):
        place_partitions([5000], [1.0], slots)


def test_placement_does_not_pile_everything_on_a_roomy_near_tier():
    from optimizers.honeybee import PoolSlot, place_partitions

    slots = [PoolSlot("edge", "edge", 1e9, machines=1), PoolSlot("cloud", "cloud", 1e9, machines=3)]
    placed = place_partitions([10] * 8, [1.0] * 8, slots, near_tier="edge")
    assert placed.count("edge") == 2 and placed.count("cloud") == 6


def test_rls_is_never_infeasible_it_notes_users_beyond_the_models_reach():
    blocks = (Block(frozenset({"tiny"}), 5), Block(frozenset({"big"}), 5000))
    users = (UserClass(frozenset({"tiny"}), 1.0), UserClass(frozenset({"big"}), 1.0))
    problem = PartitioningProblem(blocks, users, lambda n, s: hnsw_like_cost(n, s, unreachable_below=0.5),
                                  storage_budget=1.0)
    plan = plan_rls(problem)
    assert plan.routes == [[0], [0]] and math.isinf(plan.route_costs[0]) and math.isfinite(plan.route_costs[1])
    assert "1 user classes" in plan.notes[0]
