"""Lazarus against its baselines at scale, simulated from the device catalog.

This machine has no GPUs, so everything here except the re-plan time is simulated, and every
result says so (``"simulated": [...]``). The paper is Wu et al., *Lazarus* (arXiv:2407.04656v2);
its evaluation facts are in ``docs/lazarus-paper-facts.md`` and section numbers below are v2's.

Step time (:func:`step_time`), for one training step of an expert-parallel GPT-MoE on the nodes
of a placement, one GPU per node, nothing overlapped (every term adds)::

    dense compute      3 · (forward FLOPs − expert FLOPs) · tokens per node / (peak · MFU)
    expert compute     3 · expert FLOPs · max_node Σ_{replicas on the node} t_e / r_e / (peak · MFU)
    all-to-all         4 passes · MoE layers · max_node max(sent, received) tokens · d · 2 B · (n−1)/n / B_net
    dense all-reduce   2(n−1)/n · dense parameters · 2 B / B_net                     (ring)
    expert all-reduce  max_node Σ_{experts on the node} 2(h_e−1)/h_e · expert parameters · 2 B · layers / B_net

``t_e`` is the tokens routed to expert ``e`` (its load share × n · 4096, top-1), split evenly over its
``r_e`` replicas (§4.2); ``h_e`` the nodes holding it (replicas of an expert sync their gradients,
which both Lazarus and DeepSpeed pay). Every MoE layer has the same loads, so one placement
stands for all of them (a per-layer permutation of the same loads gives the same holder sets).

Failures and recovery (:func:`simulate`), per strategy (:data:`STRATEGIES`):

* ``lazarus``: the paper's replicas + MRO. A failure stops training for the NCCL timeout
  (:data:`DETECT_S`), the re-plan (``plan_strategy`` timed here, for real), the communicator
  rebuild (:data:`REBUILD_S`) and the state fetch (the experts each node lacks, weights and Adam
  state, over its link); then it trains on the survivors. If the failed nodes held every replica
  of some expert (checked on the actual placement), it restores the last checkpoint instead.
  Rebalanced every 200 steps (§6.1; the loads here are constant, so only the re-plan is paid).
* ``reconfig_uniform`` (DS(FT), §6.1): DeepSpeed's expert parallelism with Lazarus's
  reconfiguration; nodes left over from an incomplete EP group are dropped for good (§6.2).
* ``checkpoint_restart`` (DS, §6.1): every failure of a node in use stops everyone; the job restarts
  from the last checkpoint on the largest multiple of the EP size among the live nodes.

A failure that comes while a recovery is under way is caught by the same timeout if it comes
within :data:`DETECT_S` of the first; later ones start a new recovery when training resumes.
Nodes that join (spot trace) wait :data:`JOIN_WAIT_S` (§6.4) and are absorbed at the next step.
Checkpoints (every K steps, the paper's K per scenario, or Young's rule) block training for the
state bytes / storage bandwidth; a restore reads as long.

Scale (:func:`scenario`): N from 10 to 1000 nodes with the *per-node* failure rate of the paper's
10-node runs held constant (1 of 10 every 5 min = a per-node MTBF of 50 min), failures stopping
when half the nodes are left (§6.2). From a few hundred nodes on, failures then come faster than
any recovery (≈ 25 s), so every strategy mostly waits until the failures stop; the spot trace is
scaled instead (each of its ≤ 10 nodes stands for N/10).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from infra.catalog import load_catalog
from infra.traces import SpotTrace, busiest_segment, load_spot_trace
from optimizers.lazarus import Placement, PlacementError, checkpoint_interval, plan_strategy
from tasks.moe.model import CONFIGS, ParamCounts, param_counts

# ---- constants, and what each rests on -------------------------------------------------------

TOKENS_PER_NODE = 4 * 1024  # per-GPU batch 4 × sequence 1024 (§6.1); one GPU per node (§6.1)
SLOTS = 6  # expert slots per GPU (§6.1)
MIN_REPLICAS = 2  # f (§6.1)
REBALANCE_EVERY = 200  # steps (§6.1)
# Share of the fp16 tensor peak the model's matmuls reach: CALIBRATED, not measured. With 0.12, simulated
# GPT-M on 10 RTX 3090s trains 43.6 samples/s with Lazarus and 34.5 with DS, against the paper's 45 and 34
# before any failure (§6.2); 0.35, a common large-model figure, makes the testbed's steps ~2× too fast.
MFU = 0.12
ACTIVATION_BYTES = 2  # fp16 hidden vectors in the all-to-all (§6.1: FP16)
GRADIENT_BYTES = 2  # fp16 gradients in the all-reduces
# fp16 weight 2 + fp32 master weight 4 + fp32 Adam m and v 8: 14 B/parameter reproduces §6.3's
# 63 MB (GPT-S) and 112 MB (GPT-L) of weights + optimizer state per expert (as MiB).
STATE_BYTES_PER_PARAM = 14
NETWORK_GBPS = 100.0  # inter-node bandwidth per node: the testbed's 100 Gbps NICs and switch (§6.1)
STORAGE_GBPS = 10.0  # checkpoints to NFS over 10 Gbps (§6.1)
DETECT_S = 15.0  # queued NCCL kernels time out in 10–20 s (§6.3, Table 2): the midpoint
REBUILD_S = 10.0  # NCCL communicators rebuilt in 5–15 s (§6.3): the midpoint; also a restart's
JOIN_WAIT_S = 120.0  # every system waits 2 min to gather joining nodes (§6.4)
DEFAULT_DEVICE = "rtx3090"  # the paper's testbed GPU (§6.1)
# Zipf-like loads: share of tokens going to the 2 most popular experts. §2.1 / Figure 2: up to 87% on
# GPT-L. 0.8 fits the same two GPT-M figures best together with MFU (the fit hardly depends on it).
TOP2_SHARE = 0.8

# Checkpoint interval in steps, per scenario and strategy (the paper's, §6.1, §6.2, §6.4). Lazarus's
# 250 is stated for the spot-trace run only; it is used in every scenario as the fallback.
PAPER_CHECKPOINT_EVERY = {
    "fail-5min": {"lazarus": 250, "reconfig_uniform": 250, "checkpoint_restart": 50},
    "fail-40min": {"lazarus": 250, "reconfig_uniform": 1000, "checkpoint_restart": 200},
    "spot-trace": {"lazarus": 250, "reconfig_uniform": 250, "checkpoint_restart": 50},
}
# The paper's ratios of Lazarus over DS (samples), GPT-S … GPT-L (§6.2, §6.4): the bands in the plot.
PAPER_RATIO_VS_DS = {"fail-5min": (2.8, 5.7), "fail-40min": (1.6, 2.3), "spot-trace": (2.3, 3.4)}

SIMULATED = [
    "compute time: catalog fp16 tensor peak × assumed MFU, FLOPs from tasks.moe.model.param_counts",
    "expert loads: Zipf-like shares (top-2 share a parameter), the same in every layer, not a routing trace",
    "all-to-all and gradient all-reduce time: bytes / inter-node bandwidth, no overlap with compute",
    "failure times and failed nodes (periodic, seeded RNG) and spot-trace node counts scaled to N",
    "recovery time: paper's NCCL timeout and communicator rebuild constants + state bytes / bandwidth",
    "checkpoint write and restore time: model state bytes / storage bandwidth",
    "throughput: useful (never rolled back) tokens / horizon",
]
MEASURED = ["re-plan time: wall time of optimizers.lazarus.plan_strategy on this machine"]
SCENARIOS = ("fail-5min", "fail-40min", "spot-trace")
DEFAULT_NODE_COUNTS = (10, 32, 100, 316, 1000)
P3_TRACE = Path(__file__).resolve().parents[2] / "data" / "spot-traces" / "bamboo-p3-trace.csv"


# ---- inputs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """The simulated hardware: a catalog device per node and the links between nodes.

    Parameters
    ----------
    device: catalog device name (``infra/catalog/devices.csv``).
    network_gbps: inter-node bandwidth of one node, each direction.
    storage_gbps: bandwidth to the checkpoint store.
    mfu: share of the device's fp16 tensor peak the model's matmuls reach.
    """

    device: str = DEFAULT_DEVICE
    network_gbps: float = NETWORK_GBPS
    storage_gbps: float = STORAGE_GBPS
    mfu: float = MFU

    def __post_init__(self) -> None:
        load_catalog().device(self.device)  # an unknown device is named with the known ones
        for name in ("network_gbps", "storage_gbps", "mfu"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Cluster.{name} must be a number > 0, got {value!r}")
        if self.mfu > 1:
            raise ValueError(f"Cluster.mfu is a share of peak, ≤ 1, got {self.mfu!r}")

    @property
    def flops(self) -> float:
        """FLOP/s one node sustains."""
        return load_catalog().device(self.device).tflops_fp16 * 1e12 * self.mfu

    @property
    def network_bytes_per_s(self) -> float:
        return self.network_gbps * 1e9 / 8

    @property
    def storage_bytes_per_s(self) -> float:
        return self.storage_gbps * 1e9 / 8


@dataclass(frozen=True)
class Strategy:
    """How a system places experts and what it does when a node in use fails."""

    name: str
    placement: str  # an optimizers.lazarus strategy
    on_failure: str  # "reconfigure": go on with the survivors; "restart": restore the last checkpoint
    rebalance_every: int | None  # re-plan from loads every this many steps
    reuses_dropped_nodes: bool  # DS(FT) never reuses nodes left over from an incomplete EP group (§6.2)


STRATEGIES = {
    "lazarus": Strategy("lazarus", "lazarus", "reconfigure", REBALANCE_EVERY, True),
    "reconfig_uniform": Strategy("reconfig_uniform", "reconfig_uniform", "reconfigure", None, False),
    "checkpoint_restart": Strategy("checkpoint_restart", "reconfig_uniform", "restart", None, True),
}


@dataclass(frozen=True)
class Scenario:
    """When nodes fail and join, over a horizon; physical nodes are integers.

    failures and joins: (time in seconds, the nodes) in time order.
    checkpoint_every: steps between checkpoints, per strategy.
    mtbf_s: mean time between failure events of the whole cluster (for Young's rule).
    """

    name: str
    n_nodes: int
    horizon_s: float
    initial: tuple[int, ...]
    failures: tuple[tuple[float, tuple[int, ...]], ...]
    joins: tuple[tuple[float, tuple[int, ...]], ...] = ()
    checkpoint_every: dict[str, int] = field(default_factory=dict)
    mtbf_s: float = math.inf
    setting: str = ""


# ---- loads and step time ---------------------------------------------------------------------

def zipf_loads(n_experts: int, top2_share: float = TOP2_SHARE) -> np.ndarray:
    """Load shares ∝ 1 / rank^s (hottest expert first), s chosen so the two hottest get ``top2_share``."""
    if n_experts < 2:
        raise ValueError(f"n_experts must be ≥ 2, got {n_experts}")
    if not 2 / n_experts <= top2_share < 1:
        raise ValueError(f"top2_share must be in [2/E, 1) = [{2 / n_experts:.3f}, 1), got {top2_share!r}")
    ranks = np.arange(1, n_experts + 1, dtype=float)

    def share(s: float) -> float:
        w = ranks ** -s
        return float(w[:2].sum() / w.sum())

    low, high = 0.0, 1.0
    while share(high) < top2_share:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if share(mid) < top2_share else (low, mid)
    w = ranks ** -high
    return w / w.sum()


@dataclass(frozen=True)
class StepTime:
    """One training step on the nodes of a placement, in seconds, and the useful tokens it trains."""

    dense_compute_s: float
    expert_compute_s: float
    all_to_all_s: float
    dense_allreduce_s: float
    expert_allreduce_s: float
    nodes: int
    tokens: int

    @property
    def total_s(self) -> float:
        return (self.dense_compute_s + self.expert_compute_s + self.all_to_all_s
                + self.dense_allreduce_s + self.expert_allreduce_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s


def _counts(placement: Placement) -> np.ndarray:
    """Node × expert → replicas (slots) the node gives that expert."""
    counts = np.zeros((placement.n_nodes, placement.n_experts), dtype=int)
    for n, held in enumerate(placement.nodes):
        np.add.at(counts[n], np.asarray(held, dtype=int), 1)
    return counts


def step_time(model: str, placement: Placement, loads: Sequence[float], cluster: Cluster) -> StepTime:
    """Simulated time of one step of ``model`` (a key of ``tasks.moe.model.CONFIGS``) on the nodes of
    ``placement`` that hold experts (module docstring); ``loads`` are per-expert token shares."""
    pc = _param_counts(model)
    counts = _counts(placement)
    active = counts.sum(axis=1) > 0
    counts = counts[active]
    n = int(counts.shape[0])
    if n == 0:
        raise PlacementError("the placement has no node holding an expert")
    share = np.asarray(loads, dtype=float)
    share = share / share.sum()
    tokens = n * TOKENS_PER_NODE
    per_replica = share * tokens * pc.top_k / np.maximum(counts.sum(axis=0), 1)  # t_e / r_e
    expert_tokens = counts @ per_replica  # tokens each node computes, per MoE layer
    busiest = float(expert_tokens.max())

    expert_fwd = pc.expert_flops_per_token * pc.n_moe_layers
    dense_fwd = pc.forward_flops_per_token - pc.top_k * expert_fwd
    remote = (n - 1) / n
    hidden_bytes = CONFIGS[model].n_embd * ACTIVATION_BYTES
    sent = TOKENS_PER_NODE * pc.top_k
    a2a_bytes = 4 * pc.n_moe_layers * max(sent, busiest) * hidden_bytes * remote  # dispatch + combine, fwd + bwd
    holders = (counts > 0).sum(axis=0)  # h_e
    ring = np.where(holders > 1, 2 * (holders - 1) / np.maximum(holders, 1), 0.0)
    expert_ar_bytes = float(((counts > 0) @ ring).max()) * pc.per_expert * GRADIENT_BYTES * pc.n_moe_layers
    bw = cluster.network_bytes_per_s
    return StepTime(
        dense_compute_s=3 * dense_fwd * TOKENS_PER_NODE / cluster.flops,
        expert_compute_s=3 * expert_fwd * busiest / cluster.flops,
        all_to_all_s=a2a_bytes / bw,
        dense_allreduce_s=2 * remote * pc.dense * GRADIENT_BYTES / bw,
        expert_allreduce_s=expert_ar_bytes / bw,
        nodes=n,
        tokens=tokens,
    )


@lru_cache(maxsize=None)
def _param_counts(model: str) -> ParamCounts:
    if model not in CONFIGS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(CONFIGS)}")
    return param_counts(CONFIGS[model])


def expert_state_bytes(model: str) -> int:
    """Weights + optimizer state of one expert of one layer (:data:`STATE_BYTES_PER_PARAM`)."""
    return _param_counts(model).per_expert * STATE_BYTES_PER_PARAM


def checkpoint_bytes(model: str) -> int:
    """One copy of every parameter's weights + optimizer state."""
    return _param_counts(model).total * STATE_BYTES_PER_PARAM


# ---- plans (cached: the loads are constant, so a plan depends on the node count only) ----------

@dataclass(frozen=True)
class _Plan:
    placement: Placement  # only the nodes in use (DS idles the nodes beyond a multiple of the EP size)
    step: StepTime
    replan_s: float  # measured wall time of plan_strategy


@lru_cache(maxsize=4096)
def _plan(model: str, placement_name: str, n_nodes: int, loads: tuple[float, ...], cluster: Cluster) -> _Plan | None:
    """The plan on ``n_nodes`` live nodes, or None when they cannot hold the model."""
    if n_nodes < 1:
        return None
    start = time.perf_counter()
    try:
        plan = plan_strategy(placement_name, list(loads), n_nodes, SLOTS, min(MIN_REPLICAS, n_nodes))
    except PlacementError:
        return None
    replan_s = time.perf_counter() - start
    used = Placement([held for held in plan.placement.nodes if held], SLOTS, plan.placement.n_experts)
    return _Plan(used, step_time(model, used, loads, cluster), replan_s)


def replan_seconds(n_nodes: int = 1000, slots: int = SLOTS, experts: int = 16, f: int = MIN_REPLICAS,
                   top2_share: float = TOP2_SHARE, repeats: int = 5) -> float:
    """Measured wall time (median of ``repeats``) of ``plan_strategy("lazarus")`` at ``n_nodes`` nodes,
    on Zipf-like loads (§6.7 reports < 1 s on one core for 1K GPUs)."""
    loads = zipf_loads(experts, top2_share)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan_strategy("lazarus", loads, n_nodes, slots, f)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _remap(old: Placement | None, old_nodes: list[int], new: Placement, pool: list[int],
           expert_bytes: int, n_layers: int, bw: float) -> tuple[list[int], float]:
    """Which physical node takes each node of the new plan, and the state-fetch time.

    The paper's greedy (§4.3): each physical node takes the new-plan node needing the fewest experts
    it lacks; nodes with the same holdings are taken together. Each node fetches what it lacks over
    its own link, from owners spread over the survivors, all at once: the slowest node decides.
    """
    held = {p: frozenset(old.nodes[j]) for j, p in enumerate(old_nodes)} if old is not None else {}
    groups: dict[frozenset, list[int]] = {}
    for p in pool:
        groups.setdefault(held.get(p, frozenset()), []).append(p)
    targets: dict[frozenset, list[int]] = {}
    for j, experts in enumerate(new.nodes):
        targets.setdefault(frozenset(experts), []).append(j)
    assignment: list[int | None] = [None] * new.n_nodes
    most_missing = 0
    for have, nodes in groups.items():
        while nodes:
            want = min((w for w in targets if targets[w]), key=lambda w: len(w - have), default=None)
            if want is None:
                break
            for _ in range(min(len(nodes), len(targets[want]))):
                assignment[targets[want].pop()] = nodes.pop(0)
            most_missing = max(most_missing, len(want - have))
    return [p for p in assignment if p is not None], most_missing * expert_bytes * n_layers / bw


# ---- scenarios -------------------------------------------------------------------------------

def periodic_failures(n_nodes: int, every_min_at_10: float, horizon_min: float, seed: int = 0,
                      name: str | None = None) -> Scenario:
    """A random node fails every ``every_min_at_10 · 10 / n_nodes`` minutes until half the nodes are
    left (§6.2; failed nodes are not replaced): the per-node failure rate of the paper's 10-node run,
    held constant at scale. The failed nodes come from a seeded RNG, the same for every strategy."""
    interval = every_min_at_10 * 60 * 10 / n_nodes
    order = np.random.default_rng(seed).permutation(n_nodes)
    failures = tuple((k * interval, (int(order[k - 1]),)) for k in range(1, n_nodes // 2 + 1)
                     if k * interval < horizon_min * 60)
    name = name or f"fail-{every_min_at_10:g}min"
    return Scenario(name, n_nodes, horizon_min * 60, tuple(range(n_nodes)), failures,
                    checkpoint_every=dict(PAPER_CHECKPOINT_EVERY.get(name, PAPER_CHECKPOINT_EVERY["fail-5min"])),
                    mtbf_s=interval,
                    setting=f"1 node of {n_nodes} fails every {interval:.1f} s (per-node MTBF "
                            f"{every_min_at_10 * 10:g} min, as 1 of 10 every {every_min_at_10:g} min) until "
                            f"{n_nodes - n_nodes // 2} are left; not replaced (§6.2); horizon {horizon_min:g} min")


def spot_trace_scenario(n_nodes: int, trace: SpotTrace | None = None) -> Scenario:
    """The paper's spot-trace replay (§6.4): the 80-minute, ≤ 10-node segment of the P3 trace with
    the most preemptions, each of its 10 node positions standing for n_nodes / 10 physical nodes."""
    trace = trace or busiest_segment(load_spot_trace(P3_TRACE))
    blocks = [len(b) for b in np.array_split(np.arange(n_nodes), 10)]
    slot_of: dict[str, int] = {}
    members: dict[str, tuple[int, ...]] = {}
    next_id = 0
    initial: list[int] = []
    failures: dict[float, list[int]] = {}
    joins: dict[float, list[int]] = {}
    for event in trace.events:
        if event.kind == "add":
            slot = min(set(range(10)) - set(slot_of.values()))
            slot_of[event.node] = slot
            members[event.node] = tuple(range(next_id, next_id + blocks[slot]))
            next_id += blocks[slot]
            if event.time_s == 0:
                initial.extend(members[event.node])
            else:
                joins.setdefault(event.time_s, []).extend(members[event.node])
        else:
            slot_of.pop(event.node)
            failures.setdefault(event.time_s, []).extend(members[event.node])
    horizon = 80 * 60.0
    mtbf = horizon / max(len(failures), 1)
    return Scenario("spot-trace", n_nodes, horizon, tuple(initial),
                    tuple((t, tuple(v)) for t, v in sorted(failures.items())),
                    tuple((t, tuple(v)) for t, v in sorted(joins.items())),
                    checkpoint_every=dict(PAPER_CHECKPOINT_EVERY["spot-trace"]), mtbf_s=mtbf,
                    setting=f"{trace.source}: 80 min, each of the 10 node positions = {n_nodes / 10:g} nodes; "
                            f"joins wait {JOIN_WAIT_S:g} s (§6.4)")


def scenario(name: str, n_nodes: int, seed: int = 0) -> Scenario:
    """A named scenario: "fail-5min" (30 min, §6.2), "fail-40min" (280 min: 5 failures at 40-min
    intervals and 80 min on the 5 left, inferred from §6.2's text) or "spot-trace" (80 min, §6.4)."""
    if name == "fail-5min":
        return periodic_failures(n_nodes, 5, 30, seed, name)
    if name == "fail-40min":
        return periodic_failures(n_nodes, 40, 280, seed, name)
    if name == "spot-trace":
        return spot_trace_scenario(n_nodes)
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


# ---- the simulator ---------------------------------------------------------------------------

@dataclass
class RunResult:
    """What one strategy achieved in one scenario (every quantity simulated but ``replan_s``)."""

    strategy: str
    useful_tokens: float
    horizon_s: float
    steps: int
    restarts: int = 0
    reconfigurations: int = 0
    scale_ups: int = 0
    checkpoints: int = 0
    time_lost_s: dict[str, float] = field(default_factory=lambda: {
        "checkpoint_write": 0.0, "reconfiguration": 0.0, "restart": 0.0, "rolled_back_training": 0.0,
        "step_in_flight": 0.0, "rebalance": 0.0, "scale_up": 0.0, "stalled": 0.0})
    replan_s: list[float] = field(default_factory=list)
    checkpoint_every: int = 0
    initial_step_s: float = 0.0

    @property
    def throughput_tokens_per_s(self) -> float:
        return self.useful_tokens / self.horizon_s


def _lost_an_expert(placement: Placement, nodes: list[int], failed: set[int]) -> bool:
    """Whether the failed physical nodes held every replica of some expert."""
    down = {j for j, p in enumerate(nodes) if p in failed}
    return any(set(h) <= down for h in placement.holders)


class _Run:
    """One strategy through one scenario: the state, and one method per kind of event."""

    def __init__(self, model: str, how: Strategy, scn: Scenario, cluster: Cluster, loads: tuple[float, ...],
                 checkpoint_rule: str):
        self.model, self.how, self.scn, self.cluster, self.loads = model, how, scn, cluster, loads
        self.pc = _param_counts(model)
        self.write_s = self.read_s = checkpoint_bytes(model) / cluster.storage_bytes_per_s
        # the state
        self.t = 0.0
        self.alive: set[int] = set(scn.initial)
        self.waiting: dict[int, float] = {}  # joined (or idle) node → when it may be absorbed
        self.dropped: set[int] = set()  # DS(FT)'s nodes left over from an incomplete EP group
        self.plan: _Plan | None = self.plan_on(len(scn.initial))
        self.nodes: list[int] = list(scn.initial)[:self.plan.placement.n_nodes] if self.plan else []
        if not how.reuses_dropped_nodes:
            self.dropped |= set(scn.initial) - set(self.nodes)
        self.steps, self.tokens = 0, 0.0
        self.checkpoint_steps, self.checkpoint_tokens, self.trained_since_checkpoint_s = 0, 0.0, 0.0
        first_step_s = self.plan.step.total_s if self.plan else math.inf
        if checkpoint_rule == "paper":
            self.every = scn.checkpoint_every.get(how.name, 10**9)
        elif checkpoint_rule == "young" and self.plan:
            self.every = checkpoint_interval(self.write_s, scn.mtbf_s, first_step_s)
        else:
            self.every = 10**9
        self.result = RunResult(how.name, 0.0, scn.horizon_s, 0, checkpoint_every=self.every,
                                initial_step_s=first_step_s)
        self.lost = self.result.time_lost_s

    def plan_on(self, n: int) -> _Plan | None:
        return _plan(self.model, self.how.placement, n, self.loads, self.cluster)

    # -- training between events --

    def train_until(self, t_end: float, finish_step: bool = False) -> None:
        """Train from self.t to t_end: steps, checkpoints and rebalances; the step cut by t_end is
        lost, or finished when ``finish_step`` (a join is absorbed at the next step)."""
        rebalance = self.how.rebalance_every
        while self.t < t_end:
            if self.plan is None:
                self.lost["stalled"] += t_end - self.t
                self.t = t_end
                return
            s = self.plan.step.total_s
            k = min(self.every - self.steps % self.every, rebalance - self.steps % rebalance if rebalance else 10**12)
            if self.t + k * s > t_end:
                done = int((t_end - self.t) // s)
                if not finish_step:
                    self.commit(done, s)
                    self.lost["step_in_flight"] += t_end - self.t
                    self.t = t_end
                    return
                if done + 1 < k:
                    self.commit(done + 1, s)
                    return
            self.commit(k, s)  # up to the next checkpoint or rebalance, which follow
            if self.steps % self.every == 0:
                if self.t + self.write_s > t_end and not finish_step:  # cut short: no checkpoint
                    self.lost["checkpoint_write"] += t_end - self.t
                    self.t = t_end
                    return
                self.t += self.write_s
                self.lost["checkpoint_write"] += self.write_s
                self.mark_checkpoint()
            if rebalance and self.steps % rebalance == 0:
                self.t += self.plan.replan_s  # loads are constant: the same plan, nothing moves
                self.lost["rebalance"] += self.plan.replan_s

    def commit(self, k: int, s: float) -> None:
        self.t += k * s
        self.steps += k
        self.tokens += k * self.plan.step.tokens
        self.trained_since_checkpoint_s += k * s

    def mark_checkpoint(self) -> None:
        self.result.checkpoints += 1
        self.checkpoint_steps, self.checkpoint_tokens = self.steps, self.tokens
        self.trained_since_checkpoint_s = 0.0

    def roll_back(self) -> None:
        self.lost["rolled_back_training"] += self.trained_since_checkpoint_s
        self.steps, self.tokens = self.checkpoint_steps, self.checkpoint_tokens
        self.trained_since_checkpoint_s = 0.0

    # -- nodes and plans --

    def absorbable(self, now: float) -> list[int]:
        return [p for p, ready in self.waiting.items() if ready <= now and p in self.alive]

    def ready(self, now: float) -> list[int]:
        """Live nodes a restart may use: not dropped, not still being gathered."""
        return sorted(p for p in self.alive - self.dropped if self.waiting.get(p, now) <= now)

    def adopt(self, pool: list[int], now: float, restore: bool) -> tuple[float, float]:
        """Plan on ``pool`` and map its nodes; return (re-plan seconds paid, state-fetch seconds)."""
        new = self.plan_on(len(pool))
        old_plan, old_nodes = self.plan, self.nodes
        if new is None:  # too few nodes to hold the model: stall until more join
            self.plan, self.nodes = None, []
            self.waiting.update({p: now for p in pool})
            return 0.0, 0.0
        for p in pool:
            self.waiting.pop(p, None)
        if restore or old_plan is None:  # every node loads the checkpoint: nothing to fetch
            nodes, fetch = pool[:new.placement.n_nodes], 0.0
        else:
            nodes, fetch = _remap(old_plan.placement, old_nodes, new.placement, pool,
                                  expert_state_bytes(self.model), self.pc.n_moe_layers,
                                  self.cluster.network_bytes_per_s)
        left_over = set(pool) - set(nodes)
        if not self.how.reuses_dropped_nodes:  # DS(FT) drops nodes it used; joined ones not yet used wait on
            self.dropped |= left_over & set(old_nodes)
            left_over -= set(old_nodes)
        self.waiting.update({p: now for p in left_over})
        self.plan, self.nodes = new, nodes
        self.result.replan_s.append(new.replan_s)
        return (new.replan_s if self.how.on_failure == "reconfigure" else 0.0), fetch

    # -- events --

    def on_join(self, at: float, nodes: tuple[int, ...]) -> None:
        self.alive |= set(nodes)
        self.waiting.update({p: at + JOIN_WAIT_S for p in nodes})

    def on_absorb(self, now: float) -> None:
        """Joined nodes, gathered for JOIN_WAIT_S, enter at the next step boundary."""
        self.train_until(now, finish_step=True)
        now = self.t
        new = self.absorbable(now)
        if not new:
            return
        restart = self.how.on_failure == "restart"
        pool = self.ready(now) if restart else self.nodes + new
        target = self.plan_on(len(pool))
        if target is None or (self.plan and target.placement.n_nodes <= self.plan.placement.n_nodes):
            return  # no larger configuration yet (DeepSpeed needs whole EP groups)
        if restart:  # checkpoint now, restart on more nodes
            self.mark_checkpoint()
            self.adopt(pool, now, restore=True)
            pause = self.write_s + REBUILD_S + self.read_s
        else:
            replan, fetch = self.adopt(pool, now, restore=False)
            pause = replan + REBUILD_S + fetch
        self.result.scale_ups += 1
        self.lost["scale_up"] += pause
        self.t = now + pause

    def on_failure(self, now: float, failed: set[int]) -> None:
        """Nodes caught by one detection timeout are gone: reconfigure, or restore the last checkpoint."""
        self.train_until(now)
        failed &= self.alive
        self.alive -= failed
        for p in failed:
            self.waiting.pop(p, None)
        if not failed & set(self.nodes):
            return  # idle nodes: nobody notices
        if self.how.on_failure == "restart" or _lost_an_expert(self.plan.placement, self.nodes, failed):
            self.roll_back()
            self.dropped.clear()  # a restart is a new job: it uses every live node, dropped ones too
            self.plan = None
            replan, _ = self.adopt(self.ready(now), now, restore=True)
            pause = DETECT_S + replan + REBUILD_S + self.read_s
            self.result.restarts += 1
            self.lost["restart"] += pause
        else:
            survivors = [p for p in self.nodes if p not in failed] + self.absorbable(now)
            replan, fetch = self.adopt(survivors, now, restore=False)
            pause = DETECT_S + replan + REBUILD_S + fetch
            self.result.reconfigurations += 1
            self.lost["reconfiguration"] += pause
        self.t = now + pause

    def run(self) -> RunResult:
        events: list[tuple[float, int, str, tuple[int, ...]]] = []
        for at, nodes in self.scn.failures:
            events.append((at, len(events), "fail", nodes))
        for at, nodes in self.scn.joins:
            events.append((at, len(events), "join", nodes))
            events.append((at + JOIN_WAIT_S, len(events), "absorb", ()))
        heapq.heapify(events)
        while events:
            at, _, kind, nodes = heapq.heappop(events)
            now = max(at, self.t)  # what happened during a recovery is handled when it ends
            if now >= self.scn.horizon_s:
                break
            if kind == "join":
                self.on_join(at, nodes)
            elif kind == "absorb":
                self.on_absorb(now)
            else:  # every failure within the detection timeout is caught by it
                caught = [e for e in events if e[2] == "fail" and e[0] < now + DETECT_S]
                events = [e for e in events if e not in caught]
                heapq.heapify(events)
                self.on_failure(now, set(nodes).union(*(e[3] for e in caught)))
        self.train_until(self.scn.horizon_s)
        self.result.steps, self.result.useful_tokens = self.steps, self.tokens
        return self.result


def simulate(model: str, strategy: str, scn: Scenario, cluster: Cluster = Cluster(),
             loads: Sequence[float] | None = None, checkpoint_rule: str = "paper") -> RunResult:
    """Simulate ``strategy`` (:data:`STRATEGIES`) training ``model`` through scenario ``scn``.

    Parameters
    ----------
    model: a key of ``tasks.moe.model.CONFIGS`` (gpt-s, gpt-m, gpt-l).
    strategy: lazarus, reconfig_uniform or checkpoint_restart.
    scn: failures and joins (:func:`scenario`).
    cluster: device and bandwidths.
    loads: per-expert token shares; default :func:`zipf_loads` at :data:`TOP2_SHARE`.
    checkpoint_rule: "paper" (the paper's interval per scenario), "young" (Young's √(2·C·MTBF)
        from the checkpoint write time and the scenario's cluster MTBF) or "none".
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if checkpoint_rule not in ("paper", "young", "none"):
        raise ValueError(f"checkpoint_rule must be paper, young or none, got {checkpoint_rule!r}")
    n_expert = _param_counts(model).n_expert
    loads = tuple(float(x) for x in (zipf_loads(n_expert) if loads is None else loads))
    if len(loads) != n_expert:
        raise ValueError(f"loads has {len(loads)} experts but {model} has {n_expert}")
    return _Run(model, STRATEGIES[strategy], scn, cluster, loads, checkpoint_rule).run()


# ---- the grid --------------------------------------------------------------------------------

def constants() -> dict:
    """Every constant the simulation uses, with its value."""
    return {
        "tokens_per_node_per_step": TOKENS_PER_NODE, "slots_per_node": SLOTS, "min_replicas_f": MIN_REPLICAS,
        "rebalance_every_steps": REBALANCE_EVERY, "mfu": MFU, "activation_bytes": ACTIVATION_BYTES,
        "gradient_bytes": GRADIENT_BYTES, "state_bytes_per_param": STATE_BYTES_PER_PARAM,
        "network_gbps": NETWORK_GBPS, "storage_gbps": STORAGE_GBPS, "detect_s": DETECT_S, "rebuild_s": REBUILD_S,
        "join_wait_s": JOIN_WAIT_S, "top2_share": TOP2_SHARE, "paper_checkpoint_every": PAPER_CHECKPOINT_EVERY,
    }


def simulate_all(models: Sequence[str] = ("gpt-s", "gpt-m", "gpt-l"), devices: Sequence[str] = (DEFAULT_DEVICE,),
                 node_counts: Sequence[int] = DEFAULT_NODE_COUNTS, scenarios: Sequence[str] = SCENARIOS,
                 top2_share: float = TOP2_SHARE, network_gbps: float = NETWORK_GBPS,
                 storage_gbps: float = STORAGE_GBPS, mfu: float = MFU, checkpoint_rule: str = "paper",
                 seed: int = 0) -> dict:
    """Every (model, device, N, scenario, strategy), with throughput ratios of each strategy over
    checkpoint_restart and reconfig_uniform in the same scenario; see the module docstring.

    Returns {"runs": [...], "replan_seconds_1000_nodes": s, "simulated": [...], "measured": [...],
    "constants": {...}}; every run dict carries "simulated" as well.
    """
    runs = []
    scenario_cache = {(name, n): scenario(name, n, seed) for name in scenarios for n in node_counts}
    for device in devices:
        cluster = Cluster(device, network_gbps, storage_gbps, mfu)
        for model in models:
            loads = zipf_loads(CONFIGS[model].n_expert, top2_share)
            for n in node_counts:
                for name in scenarios:
                    scn = scenario_cache[(name, n)]
                    results = {s: simulate(model, s, scn, cluster, loads, checkpoint_rule) for s in STRATEGIES}
                    for s, r in results.items():
                        runs.append(_run_dict(model, device, n, scn, r, results))
    return {
        "runs": runs,
        "replan_seconds_1000_nodes": replan_seconds(1000),
        "simulated": list(SIMULATED),
        "measured": list(MEASURED),
        "constants": {**constants(), "top2_share": top2_share, "network_gbps": network_gbps,
                      "storage_gbps": storage_gbps, "mfu": mfu, "checkpoint_rule": checkpoint_rule, "seed": seed},
    }


def _run_dict(model: str, device: str, n: int, scn: Scenario, r: RunResult, peers: dict[str, RunResult]) -> dict:
    def ratio(other: str) -> float | None:
        base = peers[other].useful_tokens
        return r.useful_tokens / base if base > 0 else None

    return {
        "model": model, "device": device, "n_nodes": n, "scenario": scn.name, "strategy": r.strategy,
        "throughput_tokens_per_s": r.throughput_tokens_per_s,
        "samples_per_s": r.throughput_tokens_per_s / CONFIGS[model].block_size,
        "useful_tokens": r.useful_tokens, "steps": r.steps, "horizon_s": r.horizon_s,
        "ratio_vs_checkpoint_restart": ratio("checkpoint_restart"),
        "ratio_vs_reconfig_uniform": ratio("reconfig_uniform"),
        "restarts": r.restarts, "reconfigurations": r.reconfigurations, "scale_ups": r.scale_ups,
        "checkpoints": r.checkpoints, "checkpoint_every_steps": r.checkpoint_every,
        "initial_step_s": r.initial_step_s,
        "time_lost_s": dict(r.time_lost_s), "time_lost_total_s": sum(r.time_lost_s.values()),
        "replan_s_max": max(r.replan_s, default=0.0),
        "setting": scn.setting,
        "simulated": list(SIMULATED), "measured": list(MEASURED),
    }


def headline(results: dict, strategy: str = "lazarus") -> dict:
    """{scenario: {model: {N: (ratio vs checkpoint_restart, ratio vs reconfig_uniform)}}}."""
    out: dict = {}
    for run in results["runs"]:
        if run["strategy"] == strategy:
            out.setdefault(run["scenario"], {}).setdefault(run["model"], {})[run["n_nodes"]] = (
                run["ratio_vs_checkpoint_restart"], run["ratio_vs_reconfig_uniform"])
    return out


def plot_simulated(results: dict, path: str | Path) -> Path:
    """Lazarus's throughput over checkpoint_restart against N, one panel per scenario, with the
    paper's reported range as a shaded band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = headline(results)
    names = [s for s in SCENARIOS if s in table]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        if name in PAPER_RATIO_VS_DS:
            low, high = PAPER_RATIO_VS_DS[name]
            ax.axhspan(low, high, color="tab:green", alpha=0.15, label=f"paper, 10 GPUs: {low}×–{high}×")
        for model, by_n in sorted(table[name].items()):
            ns = sorted(n for n in by_n if by_n[n][0] is not None)
            ax.plot(ns, [by_n[n][0] for n in ns], marker="o", label=model)
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("nodes (1 GPU each)")
        ax.set_ylabel("lazarus / checkpoint_restart (useful tokens)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    devices = sorted({r["device"] for r in results["runs"]})
    fig.suptitle(f"SIMULATED from the device catalog ({', '.join(devices)}): Lazarus vs DeepSpeed checkpoint-restart")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
