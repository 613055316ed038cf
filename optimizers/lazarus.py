"""Lazarus's decision: how many replicas each expert gets, and which nodes hold them.

After Wu et al., "Lazarus: Resilient and Elastic Training of Mixture-of-Experts Models"
(arXiv:2407.04656v2; section numbers below are that version's). Experts are replicated in
proportion to their load, and the replicas are placed so that, when nodes fail, the survivors
most likely still hold every expert and training goes on without a restart from checkpoint.

N nodes, each with ``c`` expert slots; E experts, expert ``e`` with load ``t_e`` (tokens routed to
it); every expert at least ``f`` replicas. A replica takes one slot. As in §4.1, one node may hold
several replicas of the same expert (more of that expert's tokens are then processed there), so
``r_e`` may exceed N. What survives a failure is decided by the *nodes* holding an expert, its
holder set ``H_e`` (``|H_e| ≤ min(r_e, N)``); duplicates on a node add compute, not resilience.

Replica rule (:func:`allocate_replicas`, §4.1 Eq. 1). Walk the experts by load, *lightest first*
(ties by id); with ``A`` the replicas given to the experts already walked::

    r_e = max( ⌊ t_e / Σ_{e' not yet walked} t_e' · (N·c − A) ⌋, f )

No cap at N. The last (heaviest) expert's share is everything left, so Σ r_e = N·c exactly, and
by induction the walk never overshoots: the lightest of the ``m`` experts left takes at most
``max(B/m, f)`` of the budget ``B``, so ``B − r ≥ f·(m−1)`` whenever ``B ≥ f·m``. A heavier expert
never gets fewer replicas than a lighter one (the paper states ``r_e ≥ r_{e−1}``): an expert not
raised to f takes ``r ≤ t·B/T`` (T the load left), leaving at least ``(T − t)·B/T``, so the next,
heavier expert's share is at least ``r``. All-zero loads count as equal loads; the
arithmetic is exact (fractions). §6.2: when the cluster has too few slots for f replicas of every
expert (N·c < E·f, e.g. GPT-L's 16 experts on 5 nodes of 6 slots), Lazarus stops enforcing f;
:func:`plan_lazarus` / :func:`plan_strategy` then use the largest f that fits (≥ 1) and say so in the
plan's notes, while :func:`allocate_replicas` itself raises.

Maximum Rank Overlap (:func:`place_mro`, §4.1 "Expert placement", Theorem 1, proof in §A.2). The
experts are taken in ascending order of replicas (the paper's order: ascending load, which the
rule above makes ascending in r; ties by load, then id). ``S_e`` is the set of nodes holding ``e``.

* E ≤ c: the i-th expert goes on the first ``min(r_i, N)`` nodes; so ``S_1 ⊆ S_2 ⊆ …`` and the model
  is lost iff the first ``r_1`` nodes all fail, which bounds every placement (the lightest expert
  spans at most ``r_1`` nodes): optimal. Replicas beyond N (r_i > N) go to the vacant slots.
* E > c: cut the ordered experts into ``⌈E/c⌉`` consecutive groups of c (the last one may be
  smaller); group i gets its own block of nodes, as many as its first (least replicated,
  "representative") expert has replicas — the last block is cut to the nodes left,
  ``min(N − Σ earlier blocks, r_rep)`` — and every node of the block holds one replica of every
  expert of the group. The blocks always fit (a full group's representative has at most the
  group's mean, so the earlier blocks take < N nodes). The replicas still to place go to the
  vacant slots "uniformly" (the paper's word, not specified further): here one at a time, walking
  the experts in the same order, each on the node with the most free slots that does not hold the
  expert yet, else (no such node has room) as another replica on a node with room that does.
  The model survives iff every block keeps a live node: a non-representative expert's holders
  include its group's block, and where the last block was cut, its leftovers can only land on
  the block's own nodes (every other node is full). So the leftover rule never changes recovery.

Theorem 1 says MRO maximizes the recovery probability for every number of failed nodes, for the
placement problem of §A.2 (an expert may repeat on a node). Brute force over every placement of
every replica vector on small clusters (N ≤ 5, c ≤ 3, E ≤ 5: 309 vectors; the tests) agrees
wherever the last block keeps its representative's full width — the E ≤ c case and every E > c
case whose blocks fit in N. Where the last block is cut, the theorem fails: the last group's
leftovers can only repeat on the block's own nodes (every other node is full), so that group
survives on fewer nodes than its least replicated expert has replicas. Smallest case: N=3, c=2,
r=(2,2,2) — blocks of 2 nodes and 1 node, so one failure loses the model 1/3 of the time, while
the triangle {0,1}, {1,2}, {0,2} survives any single failure. With N=4, c=3, r=(3,3,3,3) one expert
ends up on a single node, so even f=3 replicas do not make one failure safe, contrary to §4.1's
guarantee for < f failures. 16 of the 309 vectors are such exceptions (94 have a cut last block).
The demo's own cluster is one: the tiny model's 8 experts in 6 slots on 4 nodes, 3 replicas each,
gives a block of 3 nodes for 6 experts and 1 node for the other 2 — a single failure then needs a
checkpoint restore 1 time in 4, where DeepSpeed's EP pairs never do.

The repair (:func:`place_mro`): where the paper's last block is cut, the round-robin spread of the
same replicas (:func:`place_spread`; the same replica counts, so the same compute balance) is taken
instead if it survives more failures, fewest failed nodes first (:func:`_survives_more`: survival of
1 failed node decides, then of 2, …) — the order in which failures are likely when they are rare.
Brute force on the 309 vectors: never worse than the paper's construction, the 16 exceptions down to
7 (the smallest, N=4, c=2, r=(2,2,2,1,1): 1/2 against the optimum's 3/4 at one failure), and the
three cases above now optimal. Where the blocks fit, nothing changes (the paper's settings: E = 16, c = 6,
10 nodes).

Baselines (§6.3, Figure 8): :func:`place_spread` — "distributes each expert's replicas across
different nodes in a round-robin fashion": a cursor walks the nodes cyclically; the experts are
dealt in id order, one replica each round (first replicas of all experts, then second replicas,
…), each to the next node with a free slot that does not hold that expert yet (else the next
node with a free slot). :func:`place_compact` — "packs an expert's replicas on a minimum number of
nodes": experts in descending order of replicas (ties by id); each fills whole empty nodes while
it has ≥ c replicas left, and puts the rest on the node with the fewest free slots that still
takes them all (best fit), splitting over the nodes with the most free slots only when none can.
An expert with r ≤ c then sits on one node, which is why compact loses the model on almost any
failure. ``reconfig_uniform`` is §6.1's DS(FT): DeepSpeed-MoE's expert parallelism — EP size ``P`` =
the smallest divisor of E with E/P ≤ c (GPT-S: 8 experts → P = 2, 4 slots used; GPT-M: 12 → 2, 6
slots; GPT-L: 16 → 4, 4 slots), ⌊N/P⌋ EP groups each holding one replica of every expert (node k
of a group holds experts k·E/P … (k+1)·E/P − 1), nodes beyond a multiple of P idle — with
Lazarus's reconfiguration, so it recovers whenever every expert keeps a live replica.

Recovery (:func:`recovery_probability`): ``failed`` nodes go down, chosen uniformly among the
N; the model survives iff every ``H_e`` keeps a live node. Expert ``e`` is lost iff ``H_e ⊆ F``, and
only the minimal holder sets ``M`` matter (a lost superset implies a lost subset), so::

    P(survive) = 1 − Σ_{∅≠S⊆M} (−1)^{|S|+1} C(N − |∪S|, failed − |∪S|) / C(N, failed)

computed exactly: every failure set is enumerated when ``C(N, failed) ≤ 200_000``; beyond that
the inclusion–exclusion sum is accumulated over the distinct unions ``∪S`` (terms whose union
exceeds ``failed`` nodes are zero and are pruned with all their supersets). This is one MoE
layer. Figure 8's probabilities are "for a model at a given training step" (§6.3): Lazarus plans every
layer separately (§4.1), and the model survives iff every layer does — the recovery of one
:class:`Placement` holding all layers' experts side by side (layer ℓ's expert e as ℓ·E + e, ``L·c``
slots per node).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np

STRATEGIES = ("lazarus", "reconfig_uniform", "spread", "compact")
ENUMERATION_LIMIT = 200_000  # failure sets enumerated one by one up to this many
UNION_LIMIT = 1_000_000  # distinct inclusion–exclusion unions kept before giving up as infeasible


class PlacementError(ValueError):
    """Replicas or a placement that cannot be built as asked; the message names the value."""


# ---- the placement ---------------------------------------------------------------------------

@dataclass
class Placement:
    """Which expert replicas each node holds.

    Parameters
    ----------
    nodes: node → the expert ids in its slots (at most ``slots``; an expert may fill several slots
        of one node, §4.1).
    slots: ``c``, expert slots per node.
    n_experts: E; experts are ``0..E−1`` (one held nowhere is lost before any failure).
    """

    nodes: list[list[int]]
    slots: int
    n_experts: int

    def __post_init__(self) -> None:
        self.nodes = [[int(e) for e in held] for held in self.nodes]
        for n, held in enumerate(self.nodes):
            if len(held) > self.slots:
                raise PlacementError(f"node {n} holds {len(held)} replicas > {self.slots} slots")
            bad = [e for e in held if not 0 <= e < self.n_experts]
            if bad:
                raise PlacementError(f"node {n} holds expert {bad[0]}, outside 0..{self.n_experts - 1}")

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def holders(self) -> list[list[int]]:
        """Expert → the sorted distinct nodes holding it (its holder set)."""
        out: list[list[int]] = [[] for _ in range(self.n_experts)]
        for n, held in enumerate(self.nodes):
            for e in sorted(set(held)):
                out[e].append(n)
        return out

    def replicas(self, expert: int) -> set[int]:
        """The nodes holding ``expert``."""
        return {n for n, held in enumerate(self.nodes) if expert in held}

    def experts_on(self, node: int) -> list[int]:
        """The replicas ``node`` holds (an expert repeats once per slot it fills)."""
        return list(self.nodes[node])

    def replica_counts(self) -> list[int]:
        """Expert → how many replicas (slots) it has, over all nodes."""
        counts = Counter(e for held in self.nodes for e in held)
        return [counts[e] for e in range(self.n_experts)]

    def to_dict(self) -> dict:
        return {"nodes": [list(held) for held in self.nodes], "slots": self.slots, "n_experts": self.n_experts}

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        return cls(nodes=[list(held) for held in data["nodes"]], slots=int(data["slots"]),
                   n_experts=int(data["n_experts"]))


@dataclass
class LazarusPlan:
    """A strategy's replica counts and placement, and how long planning took."""

    strategy: str
    replicas: list[int]
    placement: Placement
    solve_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "replicas": list(self.replicas), "placement": self.placement.to_dict(),
                "solve_seconds": self.solve_seconds, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict) -> "LazarusPlan":
        return cls(strategy=data["strategy"], replicas=[int(r) for r in data["replicas"]],
                   placement=Placement.from_dict(data["placement"]), solve_seconds=float(data["solve_seconds"]),
                   notes=list(data.get("notes", [])))


# ---- replica counts --------------------------------------------------------------------------

def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlacementError(f"{name} must be an integer ≥ 1, got {name} = {value!r}")


def _check_cluster(n_experts: int, n_nodes: int, slots: int, f: int) -> None:
    """Raise PlacementError naming the value when the cluster cannot hold f replicas of every expert."""
    _check_positive_int("n_nodes", n_nodes)
    _check_positive_int("slots", slots)
    _check_positive_int("f", f)
    if n_experts < 1:
        raise PlacementError("loads is empty: there must be at least one expert")
    if f > n_nodes:
        raise PlacementError(f"f = {f} replicas per expert > {n_nodes} nodes: f counts node failures survived")
    if n_experts > n_nodes * slots:
        raise PlacementError(f"E = {n_experts} experts > N·c = {n_nodes} nodes × {slots} slots = {n_nodes * slots}: "
                             "not every expert fits once")
    if n_nodes * slots < n_experts * f:
        raise PlacementError(f"N nodes × c slots = {n_nodes} × {slots} = {n_nodes * slots} < "
                             f"E experts × f = {n_experts} × {f} = {n_experts * f}")


def _check_loads(loads: Sequence[float]) -> np.ndarray:
    """Loads as a float array; NaN, infinite or negative loads raise PlacementError naming the value."""
    t = np.asarray(loads, dtype=float).reshape(-1)
    for e, value in enumerate(t):
        if not np.isfinite(value) or value < 0:
            raise PlacementError(f"load of expert {e} must be a finite number ≥ 0, got {value!r}")
    return t


def allocate_replicas(loads: Sequence[float], n_nodes: int, slots: int, f: int) -> np.ndarray:
    """Replicas per expert by the paper's load-proportional rule (§4.1 Eq. 1; module docstring).

    Parameters
    ----------
    loads: t_e, tokens routed to each expert (≥ 0; all zero means equal).
    n_nodes: N, nodes in the cluster.
    slots: c, expert slots per node.
    f: minimum replicas of every expert (1 ≤ f ≤ N).

    Returns an integer array indexed like ``loads`` with r_e ≥ f and Σ r_e = N·c; r_e may exceed N
    (an expert then repeats on nodes). Raises :class:`PlacementError` naming the bad value.
    """
    t = _check_loads(loads)
    n_experts = len(t)
    _check_cluster(n_experts, n_nodes, slots, f)
    exact = [Fraction(x) for x in t]
    if sum(exact) == 0:
        exact = [Fraction(1)] * n_experts
    budget = n_nodes * slots
    remaining_load, allocated = sum(exact), 0
    replicas = np.zeros(n_experts, dtype=int)
    for e in sorted(range(n_experts), key=lambda e: (exact[e], e)):  # lightest first
        share = math.floor(exact[e] * (budget - allocated) / remaining_load)  # the last one: all that is left
        replicas[e] = max(share, f)
        allocated += int(replicas[e])
        remaining_load -= exact[e]
    assert allocated == budget, (allocated, budget)  # see the module docstring
    return replicas


def _ep_size(n_experts: int, slots: int) -> int:
    """DeepSpeed-MoE's EP size P: the smallest divisor of E with E/P experts fitting in c slots (§6.1)."""
    return next(p for p in range(1, n_experts + 1) if n_experts % p == 0 and n_experts // p <= slots)


def uniform_replicas(loads: Sequence[float], n_nodes: int, slots: int, f: int) -> np.ndarray:
    """Replicas per expert under DS(FT)'s traditional expert parallelism (§6.1): ⌊N/P⌋ each, one per
    EP group of P nodes (module docstring). Neither the loads nor ``f`` change it (they are checked
    only); a cluster of fewer than P nodes cannot hold every expert and raises."""
    t = _check_loads(loads)
    n_experts = len(t)
    _check_positive_int("n_nodes", n_nodes)
    _check_positive_int("slots", slots)
    _check_positive_int("f", f)
    if n_experts < 1:
        raise PlacementError("loads is empty: there must be at least one expert")
    if n_experts > n_nodes * slots:
        raise PlacementError(f"E = {n_experts} experts > N·c = {n_nodes} nodes × {slots} slots = {n_nodes * slots}: "
                             "not every expert fits once")
    ep = _ep_size(n_experts, slots)
    if n_nodes < ep:
        raise PlacementError(f"expert parallelism needs EP size P = {ep} nodes for {n_experts} experts in "
                             f"{slots} slots, but N = {n_nodes}")
    return np.full(n_experts, n_nodes // ep, dtype=int)


# ---- placements ------------------------------------------------------------------------------

def _check_replicas(replicas: Sequence[int], slots: int, n_nodes: int | None) -> tuple[list[int], int]:
    """Replica counts as ints and the node count; raise PlacementError when they cannot be placed."""
    r = [int(x) for x in np.asarray(replicas).reshape(-1)]
    if not r:
        raise PlacementError("replicas is empty: there must be at least one expert")
    _check_positive_int("slots", slots)
    if n_nodes is None:
        if sum(r) % slots:
            raise PlacementError(f"Σ replicas = {sum(r)} is not a multiple of {slots} slots; pass n_nodes")
        n_nodes = sum(r) // slots
    _check_positive_int("n_nodes", n_nodes)
    for e, count in enumerate(r):
        if count < 1:
            raise PlacementError(f"expert {e} has {count} replicas; every expert needs at least 1")
    if sum(r) > n_nodes * slots:
        raise PlacementError(f"Σ replicas = {sum(r)} > N·c = {n_nodes} nodes × {slots} slots = {n_nodes * slots}")
    return r, n_nodes


def _fill_vacant(nodes: list[list[int]], leftovers: dict[int, int], order: Sequence[int], slots: int) -> None:
    """Place ``leftovers[e]`` more replicas of each expert, walking ``order``: each one on the node with
    the most free slots that does not hold the expert yet (lowest index on ties), else on the node
    with the most free slots. There is always room while Σ r ≤ N·c."""
    for e in order:
        need = leftovers.get(e, 0)
        if need <= 0:
            continue
        fresh = sorted((n for n in range(len(nodes)) if len(nodes[n]) < slots and e not in nodes[n]),
                       key=lambda n: (len(nodes[n]), n))[:need]  # one each: picking them in turn is the same
        for n in fresh:
            nodes[n].append(e)
        if need > len(fresh):
            room = [(len(held), n) for n, held in enumerate(nodes) if len(held) < slots]
            heapq.heapify(room)
            for _ in range(need - len(fresh)):
                used, n = heapq.heappop(room)
                nodes[n].append(e)
                if used + 1 < slots:
                    heapq.heappush(room, (used + 1, n))


def place_mro(replicas: Sequence[int], loads: Sequence[float], slots: int, n_nodes: int | None = None) -> Placement:
    """Maximum Rank Overlap placement (§4.1, Theorem 1; module docstring), repaired where the
    paper's construction cuts its last block: there the round-robin spread of the same replicas is
    taken instead when it survives more failures (:func:`_survives_more`; module docstring).

    Parameters
    ----------
    replicas: r_e per expert (r_e ≥ 1, Σ r_e ≤ N·c; r_e > N repeats the expert on nodes).
    loads: t_e per expert; breaks ties between equal replica counts in the ascending order.
    slots: c, expert slots per node.
    n_nodes: N; defaults to Σ r_e / c (every slot used).
    """
    r, n_nodes = _check_replicas(replicas, slots, n_nodes)
    t = _check_loads(loads)
    if len(t) != len(r):
        raise PlacementError(f"loads has {len(t)} experts but replicas has {len(r)}")
    paper, cut = _place_mro_blocks(r, t, slots, n_nodes)
    if cut:
        spread = place_spread(r, slots, n_nodes)
        if _survives_more(spread, paper, n_nodes):
            return spread
    return paper


def _place_mro_blocks(r: list[int], t: np.ndarray, slots: int, n_nodes: int) -> tuple[Placement, bool]:
    """The paper's MRO construction, and whether its last block was cut to fewer nodes than its
    representative's replicas (where Theorem 1 fails)."""
    n_experts = len(r)
    order = sorted(range(n_experts), key=lambda e: (r[e], t[e], e))  # least replicated first
    nodes: list[list[int]] = [[] for _ in range(n_nodes)]
    leftovers: dict[int, int] = {}
    cut = False
    if n_experts <= slots:  # nested: the i-th expert on the first min(r_i, N) nodes
        for e in order:
            for n in range(min(r[e], n_nodes)):
                nodes[n].append(e)
            leftovers[e] = r[e] - min(r[e], n_nodes)
    else:  # ⌈E/c⌉ groups of c consecutive experts, each on its own block of nodes
        cursor = 0
        for start in range(0, n_experts, slots):
            group = order[start:start + slots]
            width = min(r[group[0]], n_nodes - cursor)  # the representative's replicas; the last block is cut
            cut = cut or width < min(r[group[0]], n_nodes)
            for n in range(cursor, cursor + width):
                nodes[n].extend(group)
            for e in group:
                leftovers[e] = r[e] - width
            cursor += width
    _fill_vacant(nodes, leftovers, order, slots)
    return Placement(nodes, slots, n_experts), cut


def _survives_more(a: Placement, b: Placement, n_nodes: int) -> bool:
    """Whether ``a`` survives more failures than ``b``, fewest failed nodes first: the exact recovery
    probabilities for 1, 2, … failed nodes are compared and the first that differ decide (where a
    failure is rare, k failures at once are far likelier than k + 1).

    With ``m`` the fewest distinct nodes holding an expert, P(survive k) = 1 for k < m and, at k = m,
    1 − (distinct m-node holder sets) / C(N, m): those two decide without enumerating anything.
    Beyond m the failure sets are enumerated while there are at most ``ENUMERATION_LIMIT``;
    past that ``b`` is kept (re-planning 1,000 nodes stays a matter of milliseconds)."""
    def fewest(p: Placement) -> tuple[int, int]:
        sizes = Counter(len(h) for h in {tuple(h) for h in p.holders})
        m = min(sizes)
        return m, sizes[m]

    (ma, na), (mb, nb) = fewest(a), fewest(b)
    if (ma, -na) != (mb, -nb):
        return (ma, -na) > (mb, -nb)
    for failed in range(ma + 1, n_nodes + 1):
        if math.comb(n_nodes, failed) > ENUMERATION_LIMIT:
            return False
        pa = recovery_probability(a, n_nodes, failed, method="enumerate")
        pb = recovery_probability(b, n_nodes, failed, method="enumerate")
        if pa != pb:
            return pa > pb
    return False


def place_spread(replicas: Sequence[int], slots: int, n_nodes: int | None = None) -> Placement:
    """Round-robin spread (§6.3's baseline): deal the first replica of every expert (id order), then
    the second ones, …, each to the next node (cyclically, from where the last one went) with a free
    slot that does not hold that expert yet, else to the next node with a free slot.

    Parameters
    ----------
    replicas: r_e per expert (r_e ≥ 1, Σ r_e ≤ N·c).
    slots: c, expert slots per node.
    n_nodes: N; defaults to Σ r_e / c.
    """
    r, n_nodes = _check_replicas(replicas, slots, n_nodes)
    nodes: list[list[int]] = [[] for _ in range(n_nodes)]
    cursor = 0
    for j in range(max(r)):
        for e in range(len(r)):
            if r[e] <= j:
                continue
            first_open = chosen = None
            for step in range(n_nodes):
                n = (cursor + step) % n_nodes
                if len(nodes[n]) < slots:
                    first_open = n if first_open is None else first_open
                    if e not in nodes[n]:
                        chosen = n
                        break
            n = first_open if chosen is None else chosen  # Σ r ≤ N·c: some node has room
            nodes[n].append(e)
            cursor = n + 1
    return Placement(nodes, slots, len(r))


def place_compact(replicas: Sequence[int], slots: int, n_nodes: int | None = None) -> Placement:
    """Compact (§6.3's baseline): each expert's replicas on as few nodes as possible — experts by
    descending replicas (ties by id), whole empty nodes while ≥ c replicas are left, the rest on the
    fullest node that still takes them all, split over the emptiest nodes only when none can.

    Parameters
    ----------
    replicas: r_e per expert (r_e ≥ 1, Σ r_e ≤ N·c).
    slots: c, expert slots per node.
    n_nodes: N; defaults to Σ r_e / c.
    """
    r, n_nodes = _check_replicas(replicas, slots, n_nodes)
    nodes: list[list[int]] = [[] for _ in range(n_nodes)]
    for e in sorted(range(len(r)), key=lambda e: (-r[e], e)):
        left = r[e]
        while left:
            free = [slots - len(held) for held in nodes]
            empty = [n for n in range(n_nodes) if free[n] == slots]
            fits = [n for n in range(n_nodes) if free[n] >= left]
            if left >= slots and empty:
                n = empty[0]
            elif fits:
                n = min(fits, key=lambda n: (free[n], n))  # best fit
            else:
                n = max(range(n_nodes), key=lambda n: (free[n], -n))  # most room
            take = min(left, free[n])
            nodes[n].extend([e] * take)
            left -= take
    return Placement(nodes, slots, len(r))


def _place_ep_groups(n_experts: int, slots: int, n_nodes: int) -> Placement:
    """DeepSpeed-MoE's expert parallelism (§6.1): ⌊N/P⌋ EP groups of P consecutive nodes; node k of a
    group holds experts k·E/P … (k+1)·E/P − 1; the N mod P nodes left over hold nothing."""
    ep = _ep_size(n_experts, slots)
    per = n_experts // ep
    nodes: list[list[int]] = [[] for _ in range(n_nodes)]
    for group in range(n_nodes // ep):
        for k in range(ep):
            nodes[group * ep + k] = list(range(k * per, (k + 1) * per))
    return Placement(nodes, slots, n_experts)


# ---- recovery --------------------------------------------------------------------------------

def _minimal_sets(placement: Placement) -> list[int]:
    """The distinct minimal holder sets, as node bitmasks (a lost superset implies a lost subset)."""
    masks = sorted({sum(1 << n for n in h) for h in placement.holders}, key=lambda m: (m.bit_count(), m))
    minimal: list[int] = []
    for m in masks:
        if not any(s & m == s for s in minimal):
            minimal.append(m)
    return minimal


def _lost_by_enumeration(minimal: list[int], n_nodes: int, failed: int) -> int:
    """How many failure sets of size ``failed`` contain some minimal holder set."""
    bits = [1 << n for n in range(n_nodes)]
    lost = 0
    for combo in itertools.combinations(bits, failed):
        down = sum(combo)
        if any(m & down == m for m in minimal):
            lost += 1
    return lost


def _lost_by_inclusion_exclusion(minimal: list[int], n_nodes: int, failed: int) -> int:
    """The same count as Σ_{∅≠S} (−1)^{|S|+1} C(N − |∪S|, failed − |∪S|), summed per distinct union.

    ``g[U]`` = Σ over subsets S of the sets seen so far with ∪S = U of (−1)^{|S|}; unions with more
    than ``failed`` nodes contribute nothing, nor do their supersets, so they are dropped.
    """
    g: dict[int, int] = {0: 1}
    for m in minimal:
        if m.bit_count() > failed:
            continue
        update: dict[int, int] = {}
        for union, coef in g.items():
            grown = union | m
            if grown.bit_count() <= failed:
                update[grown] = update.get(grown, 0) - coef
        for union, coef in update.items():
            total = g.get(union, 0) + coef
            if total:
                g[union] = total
            else:
                g.pop(union, None)
        if len(g) > UNION_LIMIT:
            raise PlacementError(f"exact recovery probability not feasible: more than {UNION_LIMIT} distinct "
                                 f"unions of {len(minimal)} minimal holder sets at {failed} failed nodes")
    return -sum(coef * math.comb(n_nodes - union.bit_count(), failed - union.bit_count())
                for union, coef in g.items() if union)


def recovery_probability(placement: Placement, n_nodes: int, failed: int, *, method: str = "auto") -> float:
    """Exact probability that every expert keeps a live replica when ``failed`` of the ``n_nodes`` nodes,
    chosen uniformly at random, go down.

    Parameters
    ----------
    placement: who holds what.
    n_nodes: N (≥ the placement's nodes; nodes beyond them hold nothing).
    failed: how many nodes fail, 0 ≤ failed ≤ N.
    method: "enumerate" (every failure set), "inclusion_exclusion" (over minimal holder sets), or
        "auto": enumerate when C(N, failed) ≤ 200_000, else inclusion–exclusion. All are exact.

    Raises :class:`PlacementError` when neither is feasible: more than ``UNION_LIMIT`` distinct
    unions of ≤ ``failed`` nodes (many minimal sets and many failed nodes, e.g. a spread placement
    of 64 experts on 1000 nodes with 50 failed; MRO's few shared holder sets reach further).
    """
    if n_nodes < placement.n_nodes:
        raise PlacementError(f"n_nodes = {n_nodes} < the {placement.n_nodes} nodes of the placement")
    if isinstance(failed, bool) or not isinstance(failed, (int, np.integer)) or not 0 <= failed <= n_nodes:
        raise PlacementError(f"failed must be an integer in 0..{n_nodes}, got failed = {failed!r}")
    if method not in ("auto", "enumerate", "inclusion_exclusion"):
        raise PlacementError(f"unknown method {method!r}; choose auto, enumerate or inclusion_exclusion")
    minimal = _minimal_sets(placement)
    if 0 in minimal:  # an expert held nowhere is lost already
        return 0.0
    ways = math.comb(n_nodes, failed)
    if method == "enumerate" or (method == "auto" and ways <= ENUMERATION_LIMIT):
        lost = _lost_by_enumeration(minimal, n_nodes, failed)
    else:
        lost = _lost_by_inclusion_exclusion(minimal, n_nodes, failed)
    return float(Fraction(ways - lost, ways))


def recovery_curve(placement: Placement, n_nodes: int) -> dict[int, float]:
    """Recovery probability for every number of failed nodes, 0..N (exact; see
    :func:`recovery_probability` for when that is not feasible on large clusters)."""
    return {k: recovery_probability(placement, n_nodes, k) for k in range(n_nodes + 1)}




# ---- checkpoint interval ---------------------------------------------------------------------

def restore_probability(placement: Placement, n_nodes: int, failed_at_once: Mapping[int, float] | None = None) -> float:
    """Probability that a failure event needs a checkpoint restore: some expert loses every replica.

    Parameters
    ----------
    placement: who holds what (the plan training runs with when the failure comes).
    n_nodes: N, the nodes training.
    failed_at_once: share of failure events that take k nodes at once, {k: share} (default: one
        node at a time). Shares are normalised; k beyond N counts as all N.

    Returns ``Σ_k share_k · (1 − P(survive k failed))`` (:func:`recovery_probability`, exact).
    """
    shares = dict(failed_at_once or {1: 1.0})
    total = sum(shares.values())
    if not shares or total <= 0 or any(v < 0 or not math.isfinite(v) for v in shares.values()):
        raise PlacementError(f"failed_at_once must give shares ≥ 0 summing to > 0, got {shares!r}")
    bad = [k for k in shares if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad:
        raise PlacementError(f"failed_at_once counts failed nodes, integers ≥ 1, got {bad[0]!r}")
    return sum(share / total * (1.0 - recovery_probability(placement, n_nodes, min(int(k), n_nodes)))
               for k, share in shares.items())


def checkpoint_interval_s(checkpoint_s: float, mtbf_s: float, restore_probability: float = 1.0) -> float:
    """Seconds of training between checkpoints that minimise the expected time lost to checkpoints
    and restores (math.inf: no periodic checkpoint).

    Young's first-order rule (J. W. Young, "A first order approximation to the optimum checkpoint
    interval", CACM 17(9), 1974) applied to the failures that need a restore. With a checkpoint of
    cost C every τ seconds of training, failures every M seconds on average and a share q of them
    needing a restore (no replica of some expert survives: :func:`restore_probability`), the time
    lost per second of training is, to first order,

        L(τ) = C/τ + (q/M) · (R + τ/2)

    (R the restore itself, τ/2 the work lost since the last checkpoint on average; a failure the
    survivors recover from costs a reconfiguration whatever τ is, so it does not enter). L is least
    at τ* = √(2·C·M/q): Young's √(2·C·M) for a job that restores on every failure (q = 1, DeepSpeed's
    checkpoint-restart), and longer by 1/√q for a placement that usually survives; q = 0 needs no
    periodic checkpoint at all. R does not move τ*.

    Parameters
    ----------
    checkpoint_s: C, seconds to write one checkpoint (training stops meanwhile).
    mtbf_s: M, mean seconds between failure events of the cluster (inf: none expected).
    restore_probability: q in [0, 1].
    """
    if not math.isfinite(checkpoint_s) or checkpoint_s < 0:
        raise PlacementError(f"checkpoint_s must be a finite number ≥ 0, got checkpoint_s = {checkpoint_s!r}")
    if not 0 <= restore_probability <= 1:
        raise PlacementError(f"restore_probability must be in [0, 1], got {restore_probability!r}")
    if mtbf_s <= 0 or math.isnan(mtbf_s):
        raise PlacementError(f"mtbf_s must be > 0, got mtbf_s = {mtbf_s!r}")
    if restore_probability == 0 or math.isinf(mtbf_s):
        return math.inf
    return math.sqrt(2 * checkpoint_s * mtbf_s / restore_probability)


def checkpoint_interval(checkpoint_s: float, mtbf_s: float, step_s: float, restore_probability: float = 1.0,
                        max_steps: int = 10**9) -> int:
    """:func:`checkpoint_interval_s` in steps of ``step_s`` seconds (≥ 1; ``max_steps`` for "never")."""
    if not math.isfinite(step_s) or step_s < 0:
        raise PlacementError(f"step_s must be a finite number ≥ 0, got step_s = {step_s!r}")
    tau = checkpoint_interval_s(checkpoint_s, mtbf_s, restore_probability)
    if math.isinf(tau):
        return max_steps
    return int(min(max(1, round(tau / max(step_s, 1e-9))), max_steps))


# ---- strategies ------------------------------------------------------------------------------

def _usable_f(n_experts: int, n_nodes: int, slots: int, f: int) -> tuple[int, list[str]]:
    """f, or — when the cluster is too small for f replicas of every expert (§6.2) — the largest
    f' ≥ 1 with E·f' ≤ N·c, with a note saying so. Anything invalid is left to the callee to report."""
    counts = (n_nodes, slots, f)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in counts):
        if n_experts <= n_nodes * slots < n_experts * f:
            lowered = min(n_nodes * slots // n_experts, n_nodes)
            return lowered, [f"f lowered from {f} to {lowered}: N·c = {n_nodes}×{slots} = {n_nodes * slots} "
                             f"slots < E·f = {n_experts}×{f} (the paper stops enforcing f then, §6.2)"]
    return f, []


def plan_lazarus(loads: Sequence[float], n_nodes: int, slots: int, f: int) -> LazarusPlan:
    """Lazarus's plan: load-proportional replicas (:func:`allocate_replicas`) placed by MRO.

    Parameters
    ----------
    loads: t_e, tokens routed to each expert.
    n_nodes: N, nodes (after failures, the survivors: re-planning is this same call).
    slots: c, expert slots per node.
    f: minimum replicas per expert; lowered, with a note, when N·c < E·f (§6.2).
    """
    start = time.perf_counter()
    f, notes = _usable_f(len(np.asarray(loads).reshape(-1)), n_nodes, slots, f)
    replicas = allocate_replicas(loads, n_nodes, slots, f)
    placement = place_mro(replicas, loads, slots, n_nodes)
    return LazarusPlan("lazarus", replicas.tolist(), placement, time.perf_counter() - start, notes)


def plan_strategy(name: str, loads: Sequence[float], n_nodes: int, slots: int, f: int) -> LazarusPlan:
    """The plan of one named strategy (:data:`STRATEGIES`): "lazarus" (paper-rule replicas + MRO),
    "reconfig_uniform" (DS(FT): DeepSpeed expert parallelism, §6.1), "spread" (paper-rule replicas +
    round-robin spread, §6.3) and "compact" (paper-rule replicas + compact, §6.3)."""
    if name not in STRATEGIES:
        raise PlacementError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if name == "lazarus":
        return plan_lazarus(loads, n_nodes, slots, f)
    start = time.perf_counter()
    if name == "reconfig_uniform":
        replicas = uniform_replicas(loads, n_nodes, slots, f)
        placement = _place_ep_groups(len(replicas), slots, n_nodes)
        return LazarusPlan(name, replicas.tolist(), placement, time.perf_counter() - start)
    f, notes = _usable_f(len(np.asarray(loads).reshape(-1)), n_nodes, slots, f)
    replicas = allocate_replicas(loads, n_nodes, slots, f)
    place = place_spread if name == "spread" else place_compact
    placement = place(replicas, slots, n_nodes)
    return LazarusPlan(name, replicas.tolist(), placement, time.perf_counter() - start, notes)
