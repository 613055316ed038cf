"""Failures and arrivals to inject into a run: every few seconds, or replayed from a spot trace.

A schedule is a list of :class:`Fault` at times from the run's start. ``remove`` kills a
node's process (SIGKILL: a preemption gives no notice); ``add`` starts a node that joins at
the next step boundary. The same schedule is replayed against every strategy, so they
face the same failures at the same moments: a periodic schedule picks its victim by rank
position with a seeded generator; a trace names its nodes, mapped onto the run's as they come.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from infra.traces import SpotTrace


@dataclass(frozen=True)
class Fault:
    """At ``time_s`` after the start, ``kind`` (remove | add) happens to trace node ``name`` (None: any member)."""

    time_s: float
    kind: str
    name: str | None = None


def periodic_faults(every_s: float, horizon_s: float, rejoin_after_s: float | None = None) -> list[Fault]:
    """A node fails every ``every_s`` seconds; with ``rejoin_after_s``, a replacement arrives that much later."""
    if every_s <= 0:
        raise ValueError(f"fail_every_s must be > 0, got {every_s}")
    faults = []
    for t in np.arange(every_s, horizon_s, every_s):
        faults.append(Fault(float(t), "remove"))
        if rejoin_after_s is not None:
            faults.append(Fault(float(t + rejoin_after_s), "add"))
    return sorted(faults, key=lambda f: f.time_s)


def failed_at_once(faults: list[Fault]) -> dict[int, float]:
    """Share of failure events that take k nodes at once, {k: share}, from a schedule: removals at the
    same moment are one event (a periodic schedule: {1: 1.0}; a trace may drop several together)."""
    sizes = Counter(Counter(f.time_s for f in faults if f.kind == "remove").values())
    total = sum(sizes.values())
    return {k: n / total for k, n in sorted(sizes.items())} if total else {1: 1.0}


def trace_faults(trace: SpotTrace) -> tuple[int, list[Fault]]:
    """(nodes alive at the start, the trace's later events as faults) — the trace starts the run with
    the nodes it grants at time 0."""
    initial = [e.node for e in trace.events if e.time_s == 0 and e.kind == "add"]
    later = [Fault(e.time_s, e.kind, e.node) for e in trace.events if not (e.time_s == 0 and e.kind == "add")]
    return len(initial), [Fault(0.0, "name", n) for n in initial] + later


@dataclass
class FaultInjector:
    """Applies a schedule to an :class:`~tasks.lazarus.local.ElasticRun` from its start (a thread)."""

    run: object  # ElasticRun: kill(node), add_node(), members(), alive(node), started_at
    faults: list[Fault]
    seed: int = 0
    min_members: int = 1
    events: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._names: dict[str, str] = {}
        self._stop = threading.Event()
        self._arrivals: list[threading.Thread] = []

    def start(self) -> None:
        """Start replaying, in a thread that inherits this one's context (a flow run's, so the
        nodes it adds can be submitted as Prefect tasks)."""
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._loop,), name="lazarus-faults", daemon=True)
        members = self.run.members()
        for fault in (f for f in self.faults if f.kind == "name"):  # the trace's initial nodes, in order
            if members:
                self._names[fault.name] = members.pop(0)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for arrival in self._arrivals:
            arrival.join(timeout=5)

    def _loop(self) -> None:
        for fault in (f for f in self.faults if f.kind != "name"):
            while not self._stop.is_set() and time.time() - self.run.started_at < fault.time_s:
                time.sleep(0.02)
            if self._stop.is_set() or self.run.done():
                return
            if fault.kind == "add":  # a node can take seconds to start (a worker restarting): the failures after it keep their times
                context = contextvars.copy_context()
                arrival = threading.Thread(target=context.run, args=(self._apply_or_record, fault), daemon=True,
                                           name="lazarus-arrival")
                arrival.start()
                self._arrivals.append(arrival)
            else:
                self._apply_or_record(fault)

    def _apply_or_record(self, fault: Fault) -> None:
        try:
            self._apply(fault)
        except Exception as exc:  # noqa: BLE001 - a fault that cannot apply is recorded, the run goes on
            self.events.append({"time_s": fault.time_s, "kind": fault.kind, "error": str(exc)})

    def _apply(self, fault: Fault) -> None:
        at = time.time() - self.run.started_at
        if fault.kind == "remove":
            members = [n for n in self.run.members() if self.run.alive(n)]
            if fault.name is not None:
                node = self._names.pop(fault.name, None)
                if node is None or node not in members:
                    return  # a node this run never had (beyond its capacity)
            else:
                if len(members) <= self.min_members:
                    self.events.append({"time_s": at, "kind": "remove", "skipped": "too few members left"})
                    return
                node = members[int(self._rng.integers(len(members)))]
            self.run.kill(node)
            self.events.append({"time_s": at, "kind": "remove", "node": node})
        elif fault.kind == "add":
            node = self.run.add_node()
            if fault.name is not None:
                self._names[fault.name] = node
            self.events.append({"time_s": at, "kind": "add", "node": node})
