"""Lazarus's replica rule, placements and recovery probability, against the paper, hand counts and
brute force (arXiv:2407.04656v2; section numbers are that version's)."""

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from optimizers import lazarus
from optimizers.lazarus import (
    STRATEGIES, LazarusPlan, Placement, PlacementError, allocate_replicas, place_compact, place_mro,
    place_spread, plan_lazarus, plan_strategy, recovery_curve, recovery_probability, uniform_replicas,
)

# GPT-L's cluster in §6 (16 experts, 10 nodes, 6 slots, f = 2). The paper's loads come from the
# SmartMoE routing trace and are not printed; these Zipf(1.2)-like tokens per expert stand in.
PAPER_LOADS = [round(1000 / (i + 1) ** 1.2) for i in range(16)]
PAPER_NODES, PAPER_SLOTS, PAPER_F, PAPER_FAILED = 10, 6, 2, 4


def holder_masks(placement: Placement) -> list[int]:
    return [sum(1 << n for n in h) for h in placement.holders]


def curve_of_masks(masks: list[int], n_nodes: int) -> list[Fraction]:
    """Share of failure sets of each size after which every holder set keeps a live node."""
    out = []
    for failed in range(n_nodes + 1):
        sets = list(itertools.combinations(range(n_nodes), failed))
        alive = sum(all(m & ~sum(1 << n for n in down) for m in masks) for down in sets)
        out.append(Fraction(alive, len(sets)))
    return out


def brute_force_recovery(placement: Placement, n_nodes: int, failed: int) -> Fraction:
    """Share of failure sets of size ``failed`` after which every expert still has a live holder."""
    holders = [set(h) for h in placement.holders]
    sets = list(itertools.combinations(range(n_nodes), failed))
    alive = sum(all(h - set(down) for h in holders) for down in sets)
    return Fraction(alive, len(sets))


def random_instance(rng: np.random.Generator) -> tuple[np.ndarray, int, int, int]:
    """Zipf-ish loads (with zeros now and then) on a cluster that can hold f replicas of each."""
    while True:
        n_nodes, slots = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        n_experts = int(rng.integers(1, min(n_nodes * slots, 20) + 1))
        f = int(rng.integers(1, 4))
        if f <= n_nodes and n_experts * f <= n_nodes * slots:
            loads = rng.zipf(1.4, n_experts).astype(float)
            loads[rng.random(n_experts) < 0.15] = 0.0
            return loads, n_nodes, slots, f


def assert_valid(placement: Placement, replicas, n_nodes: int, slots: int) -> None:
    assert placement.n_nodes == n_nodes
    assert all(len(held) <= slots for held in placement.nodes)
    assert placement.replica_counts() == [int(r) for r in replicas]


def merge_layers(placements: list[Placement]) -> Placement:
    """All layers' experts side by side on the same nodes: the model survives iff every layer does."""
    n_experts = placements[0].n_experts
    nodes = [[layer * n_experts + e for layer, p in enumerate(placements) for e in p.nodes[n]]
             for n in range(placements[0].n_nodes)]
    return Placement(nodes, placements[0].slots * len(placements), n_experts * len(placements))


# ---- the replica rule (§4.1 Eq. 1) --------------------------------------------------------------

def test_replicas_fill_every_slot_and_respect_the_floor():
    rng = np.random.default_rng(7)
    for _ in range(400):
        loads, n_nodes, slots, f = random_instance(rng)
        r = allocate_replicas(loads, n_nodes, slots, f)
        assert r.sum() == n_nodes * slots
        assert r.min() >= f


def test_heavier_expert_never_gets_fewer_replicas_than_a_lighter_one():
    rng = np.random.default_rng(11)
    for _ in range(400):
        loads, n_nodes, slots, f = random_instance(rng)
        r = allocate_replicas(loads, n_nodes, slots, f)
        for a, b in itertools.permutations(range(len(loads)), 2):
            if loads[a] > loads[b]:
                assert r[a] >= r[b], (loads.tolist(), r.tolist())
    # lightest first: ⌊1/2.01·3⌋ = 1, then the rest, 2, to the heavier one
    assert allocate_replicas([1.01, 1.0], n_nodes=3, slots=1, f=1).tolist() == [2, 1]


def test_replicas_follow_the_hand_computed_walk_lightest_first():
    # 8 slots, loads 1:3:6 → ⌊1/10·8⌋ = 0 → f = 1, then ⌊3/9·7⌋ = 2, then the last 5 (> N = 4: repeats on nodes)
    assert allocate_replicas([1, 6, 3], n_nodes=4, slots=2, f=1).tolist() == [1, 5, 2]
    # the two light experts take f = 2 each, the heavy one the 4 left
    assert allocate_replicas([8, 1, 1], n_nodes=4, slots=2, f=2).tolist() == [4, 2, 2]
    assert allocate_replicas([100, 1, 1, 1], n_nodes=5, slots=2, f=2).tolist() == [4, 2, 2, 2]
    # the GPT-L stand-in: every expert but the four heaviest at the floor, the heaviest above N = 10
    assert allocate_replicas(PAPER_LOADS, PAPER_NODES, PAPER_SLOTS, PAPER_F).tolist() == \
        [20, 8, 5, 3] + [2] * 12


def test_zero_loads_count_as_equal_loads_or_take_the_floor():
    assert allocate_replicas([0, 0, 0, 0], n_nodes=3, slots=4, f=1).tolist() == [3, 3, 3, 3]
    assert allocate_replicas([5, 0, 0], n_nodes=4, slots=2, f=1).tolist() == [6, 1, 1]


def test_fewer_experts_than_slots_still_fills_every_slot():
    assert allocate_replicas([3, 1], n_nodes=4, slots=3, f=1).tolist() == [9, 3]


def test_uniform_replicas_are_deepspeeds_expert_parallel_groups():
    # §6.1: GPT-S (8 experts) and GPT-M (12) run EP size 2 on all 10 nodes → 5 replicas each;
    # GPT-L (16) runs EP size 4 with 4 of the 6 slots, so only 8 nodes → 2 replicas each
    assert uniform_replicas([1] * 8, 10, 6, 2).tolist() == [5] * 8
    assert uniform_replicas([1] * 12, 10, 6, 2).tolist() == [5] * 12
    assert uniform_replicas(PAPER_LOADS, 10, 6, 2).tolist() == [2] * 16
    plan = plan_strategy("reconfig_uniform", PAPER_LOADS, 10, 6, 2)
    assert [len(held) for held in plan.placement.nodes] == [4] * 8 + [0, 0]
    assert plan.placement.nodes[0] == plan.placement.nodes[4] == [0, 1, 2, 3]
    assert_valid(plan.placement, plan.replicas, 10, 6)


def test_plans_stop_enforcing_f_when_the_slots_run_short():
    # §6.2: GPT-L on 5 nodes has 30 slots < 16 × 2
    with pytest.raises(PlacementError, match="5 × 6 = 30 < E experts × f = 16 × 2 = 32"):
        allocate_replicas(PAPER_LOADS, 5, 6, 2)
    plan = plan_lazarus(PAPER_LOADS, 5, 6, 2)
    assert sum(plan.replicas) == 30 and min(plan.replicas) == 1
    assert plan.notes and "f lowered from 2 to 1" in plan.notes[0]
    assert plan_strategy("compact", PAPER_LOADS, 5, 6, 2).notes == plan.notes


# ---- placements -------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_placement_respects_slots_and_gives_each_expert_its_replicas(strategy):
    rng = np.random.default_rng(3)
    for _ in range(150):
        loads, n_nodes, slots, f = random_instance(rng)
        if strategy == "reconfig_uniform" and n_nodes < lazarus._ep_size(len(loads), slots):
            with pytest.raises(PlacementError, match="EP size"):
                plan_strategy(strategy, loads, n_nodes, slots, f)
            continue
        plan = plan_strategy(strategy, loads, n_nodes, slots, f)
        assert plan.strategy == strategy
        assert_valid(plan.placement, plan.replicas, n_nodes, slots)


@pytest.mark.parametrize("place", ["mro", "spread", "compact"])
def test_placements_of_arbitrary_replica_counts_are_valid(place):
    rng = np.random.default_rng(5)
    for _ in range(300):
        n_nodes, slots = int(rng.integers(1, 8)), int(rng.integers(1, 6))
        n_experts = int(rng.integers(1, n_nodes * slots + 1))
        r = rng.integers(1, n_nodes * slots + 1, n_experts)  # may exceed N: repeats on nodes
        while r.sum() > n_nodes * slots:
            r[int(np.argmax(r))] -= 1
        if r.min() < 1:
            continue
        if place == "mro":
            p = place_mro(r, rng.random(n_experts), slots, n_nodes)
        else:
            p = (place_spread if place == "spread" else place_compact)(r, slots, n_nodes)
        assert_valid(p, r, n_nodes, slots)


def test_spread_deals_replicas_round_robin_over_the_nodes():
    p = place_spread([3, 2, 2, 1], slots=2, n_nodes=4)
    # first replicas of 0,1,2,3 on nodes 0..3; second replicas of 0,1,2 on the next nodes that lack
    # them (1, 2, 3); expert 0's third replica finds room only on node 0, which already holds it
    assert p.nodes == [[0, 0], [1, 0], [2, 1], [3, 2]]
    assert [len(h) for h in p.holders] == [2, 2, 2, 1]


def test_compact_packs_each_expert_on_as_few_nodes_as_possible():
    p = place_compact([7, 2, 2, 1], slots=3, n_nodes=4)
    # 7 → two whole nodes + 1 on the fullest node that takes it; the r=2 experts on one node each
    assert [len(h) for h in p.holders] == [3, 1, 1, 1]
    assert p.nodes[0] == [0, 0, 0] and p.nodes[1] == [0, 0, 0]
    r = allocate_replicas(PAPER_LOADS, PAPER_NODES, PAPER_SLOTS, PAPER_F)
    holders = place_compact(r, PAPER_SLOTS, PAPER_NODES).holders
    # the slots fill exactly, so one expert is split where no node has room for it whole
    spans = [len(h) - math.ceil(count / PAPER_SLOTS) for h, count in zip(holders, r)]
    assert sorted(spans) == [0] * 15 + [1]


def test_an_expert_may_fill_several_slots_of_one_node():
    p = Placement([[1, 1], [0, 1]], slots=2, n_experts=2)
    assert p.replica_counts() == [1, 3]
    assert p.holders == [[1], [0, 1]]
    assert p.replicas(1) == {0, 1} and p.experts_on(0) == [1, 1]


def test_placement_views_agree_and_round_trip_through_a_dict():
    plan = plan_lazarus(PAPER_LOADS, PAPER_NODES, PAPER_SLOTS, PAPER_F)
    p = plan.placement
    for e, nodes in enumerate(p.holders):
        assert nodes == sorted(p.replicas(e))
        assert all(e in p.experts_on(n) for n in nodes)
    assert Placement.from_dict(p.to_dict()) == p
    assert LazarusPlan.from_dict(plan.to_dict()) == plan


def test_a_placement_rejects_an_overfull_node_or_an_unknown_expert():
    with pytest.raises(PlacementError, match="3 replicas > 2 slots"):
        Placement([[0, 1, 2]], slots=2, n_experts=3)
    with pytest.raises(PlacementError, match="expert 2, outside 0..1"):
        Placement([[2]], slots=2, n_experts=2)


# ---- MRO (§4.1) --------------------------------------------------------------------------------

def test_mro_nests_holder_sets_when_every_expert_fits_on_one_node():
    p = place_mro([2, 4, 1, 3], [1, 1, 1, 1], slots=4, n_nodes=5)
    holders = sorted((set(h) for h in p.holders), key=len)
    assert all(a <= b for a, b in zip(holders, holders[1:]))
    assert p.nodes[0] == [2, 0, 3, 1]  # least replicated first


def test_mro_gives_each_group_of_c_experts_a_block_of_its_representatives_width():
    r = allocate_replicas(PAPER_LOADS, PAPER_NODES, PAPER_SLOTS, PAPER_F)
    p = place_mro(r, PAPER_LOADS, PAPER_SLOTS, PAPER_NODES)
    # ascending: experts 15..10 (r=2) on nodes 0-1, 9..4 (r=2) on 2-3, then 3,2,1,0 (r=3,5,8,20) on 4-6
    assert [set(p.nodes[n]) for n in range(4)] == [set(range(10, 16))] * 2 + [set(range(4, 10))] * 2
    assert all({0, 1, 2, 3} <= set(p.nodes[n]) for n in (4, 5, 6))
    assert sorted(set(map(tuple, (h for h in p.holders if len(h) == 2)))) == [(0, 1), (2, 3)]
    assert p.holders[3] == [4, 5, 6]


@functools.lru_cache(maxsize=None)
def best_by_holder_counts(n_nodes: int, slots: int, n_experts: int) -> dict[tuple[int, ...], list[Fraction]]:
    """Best recovery curve over every placement without repeats, keyed by each expert's number of
    holder nodes (up to renaming nodes, which recovery does not see)."""
    contents = [s for k in range(slots + 1) for s in itertools.combinations(range(n_experts), k)]
    best: dict[tuple[int, ...], list[Fraction]] = {}
    for nodes in itertools.combinations_with_replacement(contents, n_nodes):
        masks = [sum(1 << n for n, held in enumerate(nodes) if e in held) for e in range(n_experts)]
        if not all(masks):
            continue
        key = tuple(m.bit_count() for m in masks)
        curve = curve_of_masks(masks, n_nodes)
        best[key] = [max(a, b) for a, b in zip(best[key], curve)] if key in best else curve
    return best


def optimum(replicas: list[int], n_nodes: int, slots: int) -> list[Fraction]:
    """Best curve over every placement of ``replicas`` where repeats are allowed: a placement with
    repeats is one without them of ≤ r_e holders per expert, the repeats in the spare slots."""
    best = [Fraction(0)] * (n_nodes + 1)
    for key, curve in best_by_holder_counts(n_nodes, slots, len(replicas)).items():
        if all(k <= r for k, r in zip(key, replicas)):
            best = [max(a, b) for a, b in zip(best, curve)]
    return best


def mro_curve(replicas: list[int], n_nodes: int, slots: int) -> list[Fraction]:
    return curve_of_masks(holder_masks(place_mro(replicas, [float(r) for r in replicas], slots, n_nodes)), n_nodes)


def paper_mro_curve(replicas: list[int], n_nodes: int, slots: int) -> list[Fraction]:
    """The paper's block construction as written, without the repair of a cut last block."""
    placement, _ = lazarus._place_mro_blocks(replicas, np.asarray(replicas, dtype=float), slots, n_nodes)
    return curve_of_masks(holder_masks(placement), n_nodes)


def last_block_cut(replicas: list[int], n_nodes: int, slots: int) -> bool:
    order = sorted(replicas)
    if len(order) <= slots:
        return False
    groups = [order[i:i + slots] for i in range(0, len(order), slots)]
    used = sum(g[0] for g in groups[:-1])
    return n_nodes - used < groups[-1][0]


def fewest_failures_first(curve: list[Fraction]) -> tuple[Fraction, ...]:
    """A recovery curve as a key that orders placements by survival of 1, then 2, … failed nodes."""
    return tuple(curve[1:])


def replica_vectors(n_nodes: int, slots: int, n_experts: int, fill: bool):
    for r in itertools.combinations_with_replacement(range(n_nodes * slots, 0, -1), n_experts):
        if (sum(r) == n_nodes * slots) if fill else (sum(r) <= n_nodes * slots):
            yield list(r)


GRIDS = [(3, 2, (2, 3, 4, 5), True), (3, 3, (2, 3, 4, 5), True), (4, 2, (2, 3, 4, 5), True),
         (4, 3, (2, 3, 4, 5), False), (5, 2, (3, 4, 5), False)]
CASES = [(n, c, r) for n, c, es, fill in GRIDS for e in es for r in replica_vectors(n, c, e, fill)]


def test_mro_is_optimal_wherever_its_last_block_keeps_full_width():
    """Theorem 1 checked by brute force; where the paper's last block is cut the repair (spread when
    it survives more failures) leaves 7 of the paper construction's 16 exceptions (module docstring)."""
    paper_exceptions, exceptions = [], []
    for n_nodes, slots, r in CASES:
        mro, paper, best = mro_curve(r, n_nodes, slots), paper_mro_curve(r, n_nodes, slots), optimum(r, n_nodes, slots)
        assert all(m <= b for m, b in zip(mro, best))
        assert fewest_failures_first(mro) >= fewest_failures_first(paper), (n_nodes, slots, r)
        if not last_block_cut(r, n_nodes, slots):
            assert mro == paper == best, (n_nodes, slots, r)
        if paper != best:
            paper_exceptions.append((n_nodes, slots, tuple(r)))
        if mro != best:
            exceptions.append((n_nodes, slots, tuple(r)))
    assert len(CASES) == 309 and len(paper_exceptions) == 16 and len(exceptions) == 7
    assert sum(last_block_cut(r, n, c) for n, c, r in CASES) == 94  # most cuts cost nothing
    assert {(3, 2, (2, 2, 2)), (3, 3, (3, 2, 2, 2)), (4, 3, (3, 3, 3, 3))} <= set(paper_exceptions) - set(exceptions)


def test_paper_mro_cut_last_block_counterexamples_to_theorem_1_are_repaired():
    # 3 experts × 2 replicas on 3 nodes of 2 slots: the paper's blocks of 2 nodes and 1 node lose
    # one failure 1/3 of the time; the triangle ({0,1}, {1,2}, {0,2}) survives any single failure
    assert paper_mro_curve([2, 2, 2], 3, 2) == [1, Fraction(2, 3), 0, 0]
    assert mro_curve([2, 2, 2], 3, 2) == optimum([2, 2, 2], 3, 2) == [1, 1, 0, 0]
    # r=3 expert alone on the one node left: 1 failure loses it 1/3 of the time; optimum never
    assert paper_mro_curve([3, 2, 2, 2], 3, 3) == [1, Fraction(2, 3), 0, 0]
    assert mro_curve([3, 2, 2, 2], 3, 3) == optimum([3, 2, 2, 2], 3, 3) == [1, 1, 0, 0]
    # equal replicas, f = 3: the paper's construction leaves one expert on a single node
    assert paper_mro_curve([3, 3, 3, 3], 4, 3)[:3] == [1, Fraction(3, 4), Fraction(1, 2)]
    assert mro_curve([3, 3, 3, 3], 4, 3)[:3] == optimum([3, 3, 3, 3], 4, 3)[:3] == [1, 1, 1]
    # the cut that costs nothing: the r=3 pair repeats on its 2 nodes, as good as it gets
    assert paper_mro_curve([3, 3, 2, 2, 2], 4, 3) == mro_curve([3, 3, 2, 2, 2], 4, 3) == optimum([3, 3, 2, 2, 2], 4, 3)


@pytest.mark.parametrize("n_nodes", [3, 4, 5, 6])
def test_lazarus_survives_fewer_than_f_failures_on_the_demos_small_clusters(n_nodes):
    """The tiny model (8 experts) in 6 slots, f = 2: the paper's construction put two experts on one
    node (a 1-in-4 chance that a single failure needs a restore on 4 nodes; 1 in 3 on 3)."""
    for loads in ([1.0] * 8, [40, 25, 12, 9, 6, 4, 2, 2]):
        plan = plan_lazarus(loads, n_nodes, 6, 2)
        assert min(len(h) for h in plan.placement.holders) >= 2, (loads, plan.placement.nodes)
        assert recovery_probability(plan.placement, n_nodes, 1) == 1.0


def test_repairing_a_cut_block_keeps_replanning_a_thousand_nodes_quick():
    # 8 experts in 6 slots cuts the paper's last block at every N: its 250 nodes against spread's 750
    # are decided by the fewest holders, without enumerating failure sets
    plan = plan_lazarus([1.0] * 8, n_nodes=1000, slots=6, f=2)
    assert min(len(h) for h in plan.placement.holders) == 750
    assert_valid(plan.placement, plan.replicas, 1000, 6)


# ---- recovery probability ---------------------------------------------------------------------

def small_placements():
    rng = np.random.default_rng(13)
    out = []
    for _ in range(25):
        loads, n_nodes, slots, f = random_instance(rng)
        for strategy in STRATEGIES:
            if strategy == "reconfig_uniform" and n_nodes < lazarus._ep_size(len(loads), slots):
                continue
            out.append((plan_strategy(strategy, loads, n_nodes, slots, f).placement, n_nodes))
    return out


def test_recovery_probability_matches_brute_force_enumeration():
    for placement, n_nodes in small_placements():
        for failed in range(n_nodes + 1):
            expected = float(brute_force_recovery(placement, n_nodes, failed))
            assert recovery_probability(placement, n_nodes, failed) == expected
            assert recovery_probability(placement, n_nodes, failed, method="inclusion_exclusion") == expected


def test_inclusion_exclusion_matches_enumeration_in_the_papers_setting():
    for strategy in STRATEGIES:
        p = plan_strategy(strategy, PAPER_LOADS, PAPER_NODES, PAPER_SLOTS, PAPER_F).placement
        for failed in range(PAPER_NODES + 1):
            assert recovery_probability(p, PAPER_NODES, failed, method="inclusion_exclusion") == \
                recovery_probability(p, PAPER_NODES, failed, method="enumerate")


def test_inclusion_exclusion_is_exact_where_enumeration_is_too_large():
    n_nodes, failed = 40, 10  # C(40, 10) ≈ 8.5e8 failure sets: "auto" takes inclusion–exclusion
    ways = math.comb(n_nodes, failed)
    # 8 disjoint groups of 5 nodes, each group holding its own 2 experts: closed form by groups lost
    groups = Placement([[2 * (n // 5), 2 * (n // 5) + 1] for n in range(n_nodes)], slots=2, n_experts=16)
    lost = sum((-1) ** (j + 1) * math.comb(8, j) * math.comb(n_nodes - 5 * j, failed - 5 * j) for j in range(1, 3))
    assert recovery_probability(groups, n_nodes, failed) == float(Fraction(ways - lost, ways))
    # nested holders (MRO with E ≤ c): lost iff the 4 holders of the least replicated expert fail
    nested = place_mro([40, 20, 4], [3, 2, 1], slots=3, n_nodes=n_nodes)
    assert recovery_probability(nested, n_nodes, failed) == \
        float(Fraction(ways - math.comb(n_nodes - 4, failed - 4), ways))


def test_inclusion_exclusion_says_so_when_exact_computation_is_not_feasible(monkeypatch):
    monkeypatch.setattr(lazarus, "UNION_LIMIT", 50)
    p = plan_strategy("spread", PAPER_LOADS, PAPER_NODES, PAPER_SLOTS, PAPER_F).placement
    with pytest.raises(PlacementError, match="not feasible: more than 50 distinct unions .* at 5 failed nodes"):
        recovery_probability(p, PAPER_NODES, 5, method="inclusion_exclusion")


def test_recovery_curve_runs_from_certain_to_impossible():
    p = plan_lazarus(PAPER_LOADS, PAPER_NODES, PAPER_SLOTS, PAPER_F).placement
    curve = recovery_curve(p, PAPER_NODES)
    assert list(curve) == list(range(PAPER_NODES + 1))
    assert curve[0] == 1.0 and curve[PAPER_NODES] == 0.0
    assert all(curve[k] >= curve[k + 1] for k in range(PAPER_NODES))


# ---- the paper's setting (§6.3, Figure 8) -------------------------------------------------------

def survive(strategy: str, loads, failed: int = PAPER_FAILED) -> float:
    p = plan_strategy(strategy, loads, PAPER_NODES, PAPER_SLOTS, PAPER_F).placement
    return recovery_probability(p, PAPER_NODES, failed)


def test_papers_setting_one_layer_mro_far_above_spread_and_compact():
    got = {name: survive(name, PAPER_LOADS) for name in STRATEGIES}
    print({name: round(p, 4) for name, p in got.items()})  # paper (whole GPT-L model): MRO 41%, spread 12%, compact 0
    # MRO's blocks {0,1}, {2,3}, {4,5,6}: lost iff one is among the 4 failed → 1 − (2·28 − 1 + 7)/210
    assert got["lazarus"] == float(Fraction(148, 210))
    assert got["reconfig_uniform"] == float(Fraction(104, 210))  # EP pairs {k, k+4}, k = 0..3
    assert got["spread"] == float(Fraction(25, 210))
    assert got["compact"] == float(Fraction(1, 210))  # only if the 4 failed are 4 of the 5 nodes one heavy expert fills


def test_papers_setting_whole_model_compact_never_recovers():
    """Figure 8 is per model: every layer planned on its own loads, the model lost if any layer is."""
    rng = np.random.default_rng(0)
    layers = [np.round(np.array([1000 / (i + 1) ** rng.uniform(0.8, 1.6) for i in range(16)])[rng.permutation(16)])
              for _ in range(12)]
    curves = {}
    for name in ("lazarus", "spread", "compact"):
        model = merge_layers([plan_strategy(name, loads, PAPER_NODES, PAPER_SLOTS, PAPER_F).placement
                              for loads in layers])
        curves[name] = [recovery_probability(model, PAPER_NODES, k) for k in range(PAPER_NODES + 1)]
    assert all(p == 0.0 for p in curves["compact"][3:])
    assert curves["lazarus"][1] == curves["spread"][1] == 1.0 > curves["compact"][1]
    assert curves["lazarus"][PAPER_FAILED] > 4 * curves["spread"][PAPER_FAILED]


# ---- errors and speed -------------------------------------------------------------------------

@pytest.mark.parametrize("call,message", [
    (lambda: allocate_replicas([1] * 4, n_nodes=3, slots=2, f=2), "3 × 2 = 6 < E experts × f = 4 × 2 = 8"),
    (lambda: allocate_replicas([1, 1], n_nodes=3, slots=4, f=4), "f = 4"),
    (lambda: allocate_replicas([1, 1], n_nodes=3, slots=4, f=0), "f = 0"),
    (lambda: allocate_replicas([1, -2.5], n_nodes=3, slots=4, f=1), "-2.5"),
    (lambda: allocate_replicas([1, float("nan")], n_nodes=3, slots=4, f=1), "nan"),
    (lambda: allocate_replicas([1] * 7, n_nodes=3, slots=2, f=1), "E = 7 experts > N·c = 3 nodes × 2 slots = 6"),
    (lambda: uniform_replicas([1] * 16, n_nodes=3, slots=6, f=2), "EP size P = 4 nodes"),
    (lambda: place_spread([3, 3, 3], slots=2, n_nodes=4), "Σ replicas = 9 > N·c = 4 nodes × 2 slots = 8"),
    (lambda: place_compact([5, 2], slots=2), "Σ replicas = 7 is not a multiple of 2 slots"),
    (lambda: place_mro([2, 0], [1, 1], slots=2, n_nodes=4), "expert 1 has 0 replicas"),
    (lambda: plan_strategy("random", [1, 1], 2, 2, 1), "'random'"),
    (lambda: recovery_probability(Placement([[0]], 1, 1), 1, 2), "failed = 2"),
])
def test_bad_input_raises_naming_the_value(call, message):
    with pytest.raises(PlacementError) as info:
        call()
    assert message in str(info.value)


def test_replanning_a_thousand_nodes_gives_a_valid_plan():
    # §6.7 plans 1K GPUs; how long it takes is a benchmark figure (benchmarks/lazarus.py,
    # replan_seconds_1000_nodes), not a timed unit test on a shared machine
    loads = np.random.default_rng(0).zipf(1.3, 64).astype(float)
    plan = plan_lazarus(loads, n_nodes=1000, slots=6, f=2)
    assert sum(plan.replicas) == 6000
    assert_valid(plan.placement, plan.replicas, 1000, 6)
