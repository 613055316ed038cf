"""The coordinator of an elastic MoE run: admits nodes, re-plans on failures, joins and load shifts.

It runs beside the flow (a thread) and talks to the nodes only through the control plane
(:mod:`tasks.lazarus.control`). What it decides comes from the optimizer
(:func:`optimizers.lazarus.plan_strategy`) under a :class:`Policy`:

- ``lazarus``: the paper's replica rule and MRO placement; after a failure the survivors
  re-plan and continue from where they were, fetching the experts they now need from each
  other; a checkpoint is restored only when some expert has no surviving replica.
- ``reconfig_uniform``: the same reconfiguration with uniform replicas and spread placement
  (the paper's DS(FT) baseline).
- ``checkpoint_restart``: fixed expert parallelism (uniform replicas, spread, never re-planned
  from loads); every failure stops the whole job — every node process is killed and started
  afresh by the launcher (``relaunch``), as a DeepSpeed-MoE job is — and restores the last
  checkpoint.

How often each strategy checkpoints is one rule for all (:class:`CheckpointRule`): every epoch's
interval is Young's rule on the failures that epoch's plan would need a restore for
(:func:`optimizers.lazarus.checkpoint_interval`) — every failure for ``checkpoint_restart``, the
exact share its placement loses an expert for the others — with the checkpoint write measured in
the run so far. The interval is in seconds of the run, so no step-time estimate enters it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from infra.store import ArtifactStore
from optimizers.lazarus import Placement, PlacementError, checkpoint_interval_s, plan_strategy, restore_probability
from tasks.lazarus.checkpoint import latest_checkpoint
from tasks.lazarus.control import ControlPlane, Epoch


@dataclass(frozen=True)
class Policy:
    """How a strategy plans and what it does when a node fails."""

    name: str
    placement: str  # an optimizers.lazarus strategy
    on_failure: str  # "reconfigure" (keep going on the survivors) or "restart" (relaunch, restore the last checkpoint)
    rebalance: bool  # re-plan replicas from router loads every ``rebalance_every`` steps


POLICIES = {
    "lazarus": Policy("lazarus", "lazarus", "reconfigure", True),
    "reconfig_uniform": Policy("reconfig_uniform", "reconfig_uniform", "reconfigure", False),
    "checkpoint_restart": Policy("checkpoint_restart", "reconfig_uniform", "restart", False),
}


@dataclass(frozen=True)
class CheckpointRule:
    """How often to checkpoint, chosen per epoch from its plan — the same rule for every strategy.

    Parameters
    ----------
    checkpoint_s: seconds one checkpoint takes, until the run has measured its own.
    mtbf_s: mean seconds between failure events (the schedule's; inf: none expected).
    failed_at_once: share of failure events taking k nodes at once, {k: share} (default: one).
    """

    checkpoint_s: float
    mtbf_s: float
    failed_at_once: dict[int, float] = field(default_factory=lambda: {1: 1.0})

    def choose(self, policy: Policy, placement: list[list[int]], n_expert: int,
               checkpoint_s: float | None = None) -> tuple[float, float]:
        """(seconds between checkpoints, restore probability) for an epoch of ``placement``: a policy
        that restarts on failure restores every time (q = 1); one that reconfigures only when the
        failed nodes held every replica of some expert (q exact, :func:`optimizers.lazarus.restore_probability`)."""
        if policy.on_failure == "restart":
            q = 1.0
        else:
            slots = max(1, max(map(len, placement)))
            q = restore_probability(Placement(placement, slots, n_expert), len(placement), self.failed_at_once)
        every_s = checkpoint_interval_s(self.checkpoint_s if checkpoint_s is None else checkpoint_s, self.mtbf_s, q)
        return every_s, q


@dataclass
class Recovery:
    """One failure and what it took to get training going again (seconds)."""

    epoch: int
    failed: list[str]
    survivors: list[str]
    committed: int  # steps every survivor holding experts had committed (training resumes here unless restored)
    restored_step: int | None
    detected_s: float | None  # kill → first survivor's report
    replan_s: float  # survivors' reports complete → new plan made
    relaunch_s: float = 0.0  # every survivor's process killed and a fresh one registered (restart policy)
    setup_s: float | None = None  # plan published → every member ready (process group, state fetch/restore)
    fetch_s: float | None = None  # slowest member's expert-state fetch
    restore_s: float | None = None  # slowest member's checkpoint load
    lost_steps: int = 0  # committed steps thrown away: the furthest survivor's, back to the checkpoint restored
    waited_s: float = 0.0  # parked with too few nodes to hold every expert, until more arrived


@dataclass
class _Pending:
    """A recovery between the survivors' reports and its new epoch (kept while it waits for nodes)."""

    failed_epoch: Epoch
    survivors: list[str]
    failed: list[str]
    reports: dict
    detected: float | None
    parked_since: float | None = None
    why_parked: str = ""


@dataclass
class Coordinator:
    """Drives one run's epochs. ``alive(node)`` says whether a node's process still runs;
    ``killed_at(node)`` when the fault injector killed it (None if it did not);
    ``relaunch(nodes)`` replaces those nodes' processes by fresh ones under the same ids (needed by
    a policy that restarts on failure)."""

    control: ControlPlane
    policy: Policy
    n_expert: int
    slots: int
    f: int
    store: ArtifactStore
    checkpoint_prefix: str
    alive: Callable[[str], bool]
    killed_at: Callable[[str], float | None] = lambda node: None
    relaunch: Callable[[list[str]], list[str]] | None = None
    rebalance_every: int = 20
    report_timeout_s: float = 20.0
    wait_for_nodes_s: float = 120.0  # a recovery with too few nodes to hold every expert waits this long for more
    checkpoint_rule: CheckpointRule | None = None  # None: every epoch keeps the run's fixed interval
    epochs: list[Epoch] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    joins: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _admitted: list[str] = field(default_factory=list)
    _handled: set = field(default_factory=set)
    _last_rebalance: int = 0
    _parked: "_Pending | None" = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- planning -----------------------------------------------------------------------
    def _plan(self, members: list[str], loads: list[float]) -> tuple[list[list[int]], list[int]]:
        plan = plan_strategy(self.policy.placement, loads, len(members), self.slots, self.f)
        return plan.placement.nodes, [int(r) for r in plan.replicas]

    def _loads(self) -> list[float]:
        """Router loads summed over the latest heartbeats (uniform before any step)."""
        total = np.zeros(self.n_expert)
        for beat in self.control.heartbeats().values():
            if beat and beat.get("loads"):
                total += np.asarray(beat["loads"], dtype=float)
        return list(total) if total.sum() > 0 else [1.0] * self.n_expert

    @property
    def current(self) -> Epoch | None:
        return self.epochs[-1] if self.epochs else None

    def _publish(self, epoch: Epoch, *, at_boundary: bool = False) -> None:
        if self.checkpoint_rule is not None:
            epoch.checkpoint_every_s, epoch.restore_probability = self.checkpoint_rule.choose(
                self.policy, epoch.placement, self.n_expert, self._measured_checkpoint_s())
        self.epochs.append(epoch)
        self.control.publish(epoch, at_boundary=at_boundary)

    def _measured_checkpoint_s(self) -> float | None:
        """The median time this run's checkpoints took to write (None before the first)."""
        written = [c["seconds"] for c in self.control.checkpoints().values()]
        return float(np.median(written)) if written else None

    def start(self, members: list[str]) -> Epoch:
        """Epoch 0 over ``members`` (registered nodes), planned from uniform loads."""
        loads = [1.0] * self.n_expert
        placement, replicas = self._plan(members, loads)
        epoch = Epoch(0, list(members), placement, 0, "start", held=[[] for _ in members], restore_step=0,
                      dense_source=None, replicas=replicas, loads=loads)
        self._publish(epoch)
        return epoch

    def admit(self, node: str) -> None:
        """Let a registered node join at the members' next step boundary."""
        with self._lock:
            self._admitted.append(node)

    def run(self, poll_s: float = 0.05) -> None:
        """Poll until :meth:`stop` (run it in a thread)."""
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # keep coordinating; the run's report carries the error
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(poll_s)

    def stop(self) -> None:
        self._stop.set()
        self.control.stop()

    def step(self) -> None:
        """One look at the control plane: failures first, then joins, then load shifts."""
        epoch = self.current
        if epoch is None:
            return
        if self._parked is not None:
            self._unpark()
            return
        # a failure may hit the epoch the members train in while the next (a join, a
        # rebalance) is published but not yet entered: look at both
        for number in (epoch.number, epoch.number - 1):
            if number >= 0 and number not in self._handled and self.control.failures(number):
                self._handled.update({epoch.number, number})
                self._recover(self.epochs[number], epoch)
                return
        ready = self.control.ready(epoch.number)
        if epoch.number not in self._handled and not self.control.aborted(epoch.number):
            # a member that dies before the epoch's group forms would leave the others waiting
            if any(n not in ready and not self.alive(n) for n in epoch.members):
                self.control.abort(epoch.number)
        if not set(epoch.members) <= set(ready):
            return  # joins and re-plans switch members at a step boundary: wait until they all train
        with self._lock:
            joining = [n for n in self._admitted if n not in epoch.members and self.alive(n)]
            self._admitted = [n for n in self._admitted if n not in joining]
        if joining:
            self._join(epoch, joining)
            return
        if self.policy.rebalance and self.rebalance_every:
            beats = [b for n, b in self.control.heartbeats().items() if n in epoch.members and b]
            committed = min((b["committed"] for b in beats if b["epoch"] == epoch.number), default=0)
            if committed - max(self._last_rebalance, epoch.resume_step) >= self.rebalance_every:
                self._last_rebalance = committed
                self._rebalance(epoch)

    def _join(self, epoch: Epoch, joining: list[str]) -> None:
        members = epoch.members + joining
        loads = self._loads()
        placement, replicas = self._plan(members, loads)
        held = [list(p) for p in epoch.placement] + [[] for _ in joining]
        nxt = Epoch(epoch.number + 1, members, placement, -1, "join", held=held, dense_source=0, replicas=replicas,
                    loads=loads, notes=[f"{', '.join(joining)} joined"])
        self.joins.append({"epoch": nxt.number, "nodes": joining, "time": time.time()})
        self._publish(nxt, at_boundary=True)

    def _rebalance(self, epoch: Epoch) -> None:
        loads = self._loads()
        placement, replicas = self._plan(epoch.members, loads)
        if replicas == epoch.replicas and placement == epoch.placement:
            return
        nxt = Epoch(epoch.number + 1, list(epoch.members), placement, -1, "rebalance",
                    held=[list(p) for p in epoch.placement], dense_source=0, replicas=replicas, loads=loads)
        self._publish(nxt, at_boundary=True)

    def _recover(self, failed_epoch: Epoch, latest: Epoch) -> None:
        """Wait for every live node's report, then re-plan over the survivors.

        ``failed_epoch`` is the epoch whose collectives failed; ``latest`` the newest published
        (the same, or a join/rebalance its members had not entered yet). Every live node of
        either reports its committed steps and the experts it holds in memory; the new plan
        fetches from those, or restores the checkpoint when some expert is held by nobody.
        """
        # nodes still gathering to form either epoch (a joiner, say) give up and report now,
        # instead of waiting out their rendezvous for members that failed
        self.control.abort(failed_epoch.number)
        self.control.abort(latest.number)
        everyone = list(dict.fromkeys(failed_epoch.members + latest.members))
        deadline = time.monotonic() + self.report_timeout_s
        while time.monotonic() < deadline:
            reports = {**self.control.failures(failed_epoch.number), **self.control.failures(latest.number)}
            if not [n for n in everyone if n not in reports and self.alive(n)]:
                break
            time.sleep(0.02)
        reports = {**self.control.failures(failed_epoch.number), **self.control.failures(latest.number)}
        survivors = [n for n in everyone if n in reports and self.alive(n)]
        with self._lock:  # nodes admitted but not yet in an epoch come along
            survivors += [n for n in self._admitted if self.alive(n) and n not in survivors]
            self._admitted = []
        failed = [n for n in everyone if n not in survivors]
        kills = [t for t in (self.killed_at(n) for n in failed) if t is not None]
        first_report = min((r["time"] for r in reports.values()), default=None)
        detected = first_report - min(kills) if kills and first_report is not None else None
        self._resume(_Pending(failed_epoch, survivors, failed, reports, detected))

    def _resume(self, p: "_Pending") -> None:
        """Plan over ``p``'s survivors and publish the epoch they continue in; with too few of them
        to hold every expert, park until nodes arrive (:meth:`_unpark`) instead of giving up."""
        survivors, reports = p.survivors, p.reports
        with_state = [n for n in survivors if n in reports and reports[n].get("held")]
        committed = min((reports[n]["committed"] for n in with_state), default=0)
        if not survivors:
            self.errors.append("every node failed: nothing left to train on")
            self.stop()
            return
        loads = self._loads()
        start = time.perf_counter()
        try:
            placement, replicas = self._plan(survivors, loads)
        except PlacementError as exc:  # fewer survivors than the model's experts need slots
            p.parked_since = p.parked_since or time.monotonic()
            p.why_parked = str(exc)
            self._parked = p
            return
        held = [list(reports[n].get("held", [])) if n in reports else [] for n in survivors]
        surviving = set().union(*map(set, held))
        restore, notes = None, []
        if p.parked_since is not None:
            notes.append(f"waited {time.monotonic() - p.parked_since:.1f} s for nodes ({p.why_parked})")
        if self.policy.on_failure == "restart":
            restore = latest_checkpoint(self.store, self.checkpoint_prefix) or 0
            notes.append(f"{self.policy.name}: every failure restores the last checkpoint")
        elif surviving != set(range(self.n_expert)):
            restore = latest_checkpoint(self.store, self.checkpoint_prefix) or 0
            lost = sorted(set(range(self.n_expert)) - surviving)
            notes.append(f"experts {lost} have no surviving replica: restoring the checkpoint of step {restore}")
        if restore is not None:
            held = [[] for _ in survivors]
        replan_s = time.perf_counter() - start
        relaunch_s, failed = 0.0, list(p.failed)
        if self.policy.on_failure == "restart" and self.relaunch is not None:
            t = time.perf_counter()
            try:
                up = self.relaunch(survivors)  # the job stops: no process outlives the failure
                if up != survivors:  # preempted while the job restarted: it restarts without them
                    survivors, failed = up, failed + [n for n in survivors if n not in up]
                    placement, replicas = self._plan(survivors, loads)
                    held = [[] for _ in survivors]
            except PlacementError as exc:  # too few came back to hold every expert: wait for nodes, then restart
                p.survivors, p.failed = survivors, failed
                p.parked_since = p.parked_since or time.monotonic()
                p.why_parked = str(exc)
                self._parked = p
                return
            except Exception as exc:  # noqa: BLE001 - a job that cannot restart ends the run, saying why
                self.errors.append(f"relaunching {', '.join(survivors)} failed: {type(exc).__name__}: {exc}")
                self.stop()
                return
            relaunch_s = time.perf_counter() - t
        source = next((i for i, h in enumerate(held) if h), None)  # a member with the dense weights in memory
        nxt = Epoch(self.current.number + 1, survivors, placement, restore if restore is not None else committed,
                    "failure", held=held, restore_step=restore, dense_source=source, replicas=replicas, loads=loads,
                    notes=notes + [f"{', '.join(failed) or 'nobody'} failed"])
        self._publish(nxt)
        progress = max((reports[n]["committed"] for n in survivors if n in reports), default=0)
        recovery = Recovery(p.failed_epoch.number, failed, survivors, committed, restore, p.detected,
                            replan_s=replan_s, relaunch_s=relaunch_s,
                            waited_s=time.monotonic() - p.parked_since if p.parked_since is not None else 0.0,
                            lost_steps=max(progress - restore, 0) if restore is not None else 0)
        self.recoveries.append(recovery)
        threading.Thread(target=self._time_setup, args=(nxt, recovery), daemon=True).start()

    def _unpark(self) -> None:
        """A parked recovery goes on once nodes arrive (or ends the run after ``wait_for_nodes_s``)."""
        p = self._parked
        with self._lock:
            arrived = [n for n in self._admitted if self.alive(n) and n not in p.survivors]
            self._admitted = [n for n in self._admitted if n not in arrived]
        lost = [n for n in p.survivors if not self.alive(n)]
        if arrived or lost:
            self._parked = None
            p.survivors = [n for n in p.survivors if n not in lost] + arrived
            p.failed = p.failed + lost
            self._resume(p)
        elif time.monotonic() - p.parked_since > self.wait_for_nodes_s:
            self._parked = None
            self.errors.append(f"no plan over {len(p.survivors)} survivors and no node arrived in "
                               f"{self.wait_for_nodes_s:.0f} s: {p.why_parked}")
            self.stop()

    def _time_setup(self, epoch: Epoch, recovery: Recovery) -> None:
        """Fill in how long the members took to be ready in ``epoch`` (set-up, fetch, restore)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self._stop.is_set():
            ready = self.control.ready(epoch.number)
            if set(epoch.members) <= set(ready):
                recovery.setup_s = max(r["time"] for r in ready.values()) - epoch.created
                recovery.fetch_s = max(r.get("fetch_s", 0.0) for r in ready.values())
                recovery.restore_s = max(r.get("restore_s", 0.0) for r in ready.values())
                return
            time.sleep(0.05)

    def finished(self, steps: int) -> bool:
        """Whether the current members have committed ``steps`` steps."""
        epoch = self.current
        beats = self.control.heartbeats()
        return bool(epoch) and all(beats.get(n) and beats[n]["committed"] >= steps for n in epoch.members)
