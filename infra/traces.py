"""Spot-instance traces: when nodes are granted and preempted, replayed as failures and joins.

A trace file is a headerless CSV, one event per line: ``time_ms,add|remove,node`` (the
format of Bamboo's public EC2 traces, shipped in ``data/spot-traces/``). Lazarus replays
a segment of one: the paper takes an 80-minute window of the P3 trace and caps the
cluster at 10 nodes (:meth:`SpotTrace.capped`, :func:`busiest_segment`), then squeezes it
in time to fit a short run (:meth:`SpotTrace.scaled`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from infra.errors import InputError

EVENT_KINDS = ("add", "remove")


@dataclass(frozen=True)
class TraceEvent:
    """At ``time_s`` seconds from the trace's start, ``node`` is granted (add) or preempted (remove)."""

    time_s: float
    kind: str
    node: str


@dataclass(frozen=True)
class SpotTrace:
    """Events in time order, and where they came from (for messages and results)."""

    events: tuple[TraceEvent, ...]
    source: str = "trace"

    @property
    def duration_s(self) -> float:
        return self.events[-1].time_s if self.events else 0.0

    def window(self, start_s: float, length_s: float) -> "SpotTrace":
        """The events in ``[start_s, start_s + length_s)``, re-timed from 0. Nodes alive at
        ``start_s`` are granted at time 0, so the window starts with the cluster it had."""
        alive = self.alive_at(start_s)
        events = [TraceEvent(0.0, "add", node) for node in alive]
        events += [TraceEvent(e.time_s - start_s, e.kind, e.node) for e in self.events
                   if start_s < e.time_s < start_s + length_s]
        return SpotTrace(tuple(events), f"{self.source}[{start_s / 60:.0f}–{(start_s + length_s) / 60:.0f} min]")

    def capped(self, max_nodes: int) -> "SpotTrace":
        """At most ``max_nodes`` alive at once: a grant beyond the cap is declined, and the
        declined node's later preemption is then no event for this cluster."""
        alive, events = set(), []
        for e in self.events:
            if e.kind == "add" and e.node not in alive and len(alive) < max_nodes:
                alive.add(e.node)
                events.append(e)
            elif e.kind == "remove" and e.node in alive:
                alive.discard(e.node)
                events.append(e)
        return SpotTrace(tuple(events), f"{self.source} (≤ {max_nodes} nodes)")

    def scaled(self, factor: float) -> "SpotTrace":
        """Time squeezed by ``factor`` (0.01: 80 minutes replay in 48 s)."""
        if factor <= 0:
            raise ValueError(f"time scale factor must be > 0, got {factor}")
        return SpotTrace(tuple(TraceEvent(e.time_s * factor, e.kind, e.node) for e in self.events),
                         f"{self.source} × {factor:g} in time")

    def alive_at(self, time_s: float) -> list[str]:
        """Nodes alive just after every event at or before ``time_s``, in the order they joined."""
        alive: dict[str, None] = {}
        for e in self.events:
            if e.time_s > time_s:
                break
            if e.kind == "add":
                alive[e.node] = None
            else:
                alive.pop(e.node, None)
        return list(alive)

    def node_counts(self) -> list[tuple[float, int]]:
        """(time, nodes alive) after each event."""
        alive, out = set(), []
        for e in self.events:
            (alive.add if e.kind == "add" else alive.discard)(e.node)
            out.append((e.time_s, len(alive)))
        return out

    def preemptions(self) -> int:
        return sum(e.kind == "remove" for e in self.events)


def load_spot_trace(path: str | os.PathLike[str]) -> SpotTrace:
    """Read a ``time_ms,add|remove,node`` trace; a bad line is an InputError naming the
    file, the line and its value (unknown event kinds, negative or decreasing times,
    a node removed that was never added)."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise InputError(path, "<file>", str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "<file>", str(path), f"cannot read: {exc}") from None
    events, alive, last = [], set(), 0.0
    for line, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 3:
            raise InputError(path, f"line {line}", ",".join(row), "expected 3 fields: time_ms,add|remove,node")
        time_text, kind, node = (cell.strip() for cell in row)
        try:
            time_ms = float(time_text)
        except ValueError:
            raise InputError(path, f"line {line}: time_ms", time_text, "not a number") from None
        if time_ms < 0 or time_ms / 1e3 < last:
            raise InputError(path, f"line {line}: time_ms", time_text,
                             "times must be ≥ 0 and never decrease (events in time order)")
        if kind not in EVENT_KINDS:
            raise InputError(path, f"line {line}: event", kind, f"unknown event kind; expected one of {', '.join(EVENT_KINDS)}")
        if not node:
            raise InputError(path, f"line {line}: node", node, "empty node name")
        if kind == "remove" and node not in alive:
            raise InputError(path, f"line {line}: node", node, "removed but not alive (never added, or removed twice)")
        (alive.add if kind == "add" else alive.discard)(node)
        last = time_ms / 1e3
        events.append(TraceEvent(last, kind, node))
    if not events:
        raise InputError(path, "<file>", str(path), "no events")
    return SpotTrace(tuple(events), path.name)


def busiest_segment(trace: SpotTrace, minutes: float = 80.0, max_nodes: int = 10, step_minutes: float = 5.0) -> SpotTrace:
    """The ``minutes``-long window of ``trace``, capped at ``max_nodes``, with the most
    preemptions (ties: the earliest), re-timed from 0 — the paper's kind of replay segment."""
    length, step = minutes * 60, step_minutes * 60
    best, best_start = -1, 0.0
    start = 0.0
    while start + length <= max(trace.duration_s, length):
        count = trace.window(start, length).capped(max_nodes).preemptions()
        if count > best:
            best, best_start = count, start
        start += step
    return trace.window(best_start, length).capped(max_nodes)
