"""The one summary every system's run ends with: rows with the same keys for every system.

A row compares the system with one baseline on one metric, in the regime the run was in::

    {"system": "lazarus", "metric": "goodput", "unit": "tok/s", "better": "higher", "value": 812.0,
     "baseline": "checkpoint_restart", "baseline_value": 640.0, "ratio": 1.269,
     "regime": "4 nodes, a node lost every 15 s", "simulated": true}

``ratio`` is value / baseline_value; ``better`` says which way is good. ``simulated`` is true when
the figure rests on something this host only simulates (the summary's ``simulated`` says what).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

ROW_KEYS = ("system", "metric", "unit", "better", "value", "baseline", "baseline_value", "ratio", "regime",
            "simulated")


@dataclass(frozen=True)
class Row:
    system: str
    metric: str
    unit: str
    better: Literal["higher", "lower"]
    value: float
    baseline: str
    baseline_value: float
    ratio: float | None  # None: the baseline's value is 0
    regime: str
    simulated: bool

    @property
    def wins(self) -> bool:
        """Whether the system beats the baseline on this metric (a baseline at 0 is beaten where higher is better)."""
        if self.ratio is None:
            return self.better == "higher" and self.value > 0
        return self.ratio > 1 if self.better == "higher" else self.ratio < 1


@dataclass
class Summary:
    """What a run reports: its rows, where its files are, its times, what was simulated, and the
    system's own figures (``details``)."""

    system: str
    run_id: str
    results: str
    regime: str
    rows: list[Row] = field(default_factory=list)
    simulated: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    wall_seconds: float | None = None
    task_seconds: float | None = None  # wall time during which some task did its own work
    overhead_share: float | None = None
    store: str | None = None

    def compare(self, metric: str, unit: str, better: Literal["higher", "lower"], values: dict[str, float],
                system: str, baselines: list[str], *, simulated: bool = True, digits: int = 4) -> list[Row]:
        """Add one row per baseline in ``values``: ``values[system]`` against each. A strategy
        missing from ``values`` (it could not run) gets no row."""
        if better not in ("higher", "lower"):
            raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
        if system not in values:
            return []
        mine = float(values[system])
        added = []
        for name in baselines:
            if name not in values:
                continue
            theirs = float(values[name])
            # a baseline that made no progress (0) has no ratio: the table shows a dash, JSON a null
            ratio = round(mine / theirs, 3) if theirs else None
            added.append(Row(self.system, metric, unit, better, round(mine, digits), name, round(theirs, digits),
                             ratio, self.regime, simulated))
        self.rows += added
        return added

    def timed(self, wall_seconds: float, task_seconds: float) -> None:
        """Record the run's wall time and the time tasks spent on their own work; the rest of the wall
        time is the platform's overhead."""
        self.wall_seconds = round(wall_seconds, 2)
        self.task_seconds = round(min(task_seconds, wall_seconds), 2)
        self.overhead_share = round(1.0 - task_seconds / wall_seconds, 3) if wall_seconds > 0 else None

    def to_dict(self) -> dict:
        """The summary as JSON values (what ``tierflow run --json`` prints last)."""
        return json.loads(json.dumps(asdict(self), default=_plain))

    @classmethod
    def from_dict(cls, data: dict) -> "Summary":
        return cls(**{**data, "rows": [Row(**r) for r in data.get("rows", [])]})


def _plain(value: object) -> object:
    """numpy scalars as Python numbers; anything else JSON cannot hold as its text."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)
