"""What a system declares about itself, once: the :class:`System` entry of ``flows/<name>/__init__.py``.

The command line (``tierflow list``, ``run``, ``demo``, ``contracts check``, the ``tierflow <name>``
sub-commands), the summary table and the checks of ``deployments/prefect.yaml`` are all built from
these entries (:mod:`flows.registry`). An entry is cheap to import: its flow and its sub-commands are
named by reference and imported when used (Prefect, torch and cvxpy take seconds to import).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

from infra.errors import InputError
from tasks.common.params import RunParams


@dataclass(frozen=True)
class Strategy:
    """A way to do the system's job: the system itself or a baseline it is compared with."""

    name: str
    role: Literal["system", "baseline"]
    short: str  # what the summary table calls it (80 columns)
    what: str  # one line: what it is, or what it reproduces


@dataclass(frozen=True)
class Deployment:
    """A Prefect deployment of one of the system's flows (``deployments/prefect.yaml``)."""

    name: str
    flow: str  # "module:function" of the flow it runs
    cron: str
    description: str
    parameters: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def flow_name(self) -> str:
        """The flow's name as Prefect knows it (``<flow>/<deployment>``): the function's, dashed."""
        return self.flow.split(":")[1].replace("_", "-")

    @property
    def entrypoint(self) -> str:
        """The flow as a Prefect entrypoint: ``path/to/module.py:function``."""
        module, function = self.flow.split(":")
        return module.replace(".", "/") + ".py:" + function


@dataclass(frozen=True)
class System:
    """One system tierflow runs.

    ``flow`` and ``cli`` name the flow and the Typer sub-app as ``module:attribute``; ``params`` is
    the pydantic model of its run parameters (what ``--config`` may set, with their checks);
    ``scales`` the sizes a run takes (the demo runs ``small``); ``contracts`` the data products its
    stages validate and its shipped datasets meet; ``regime`` what its demo row is about.
    """

    name: str
    description: str
    flow: str
    cli: str
    params: type[RunParams]
    strategies: tuple[Strategy, ...]
    stages: tuple[str, ...]
    scales: tuple[str, ...]
    contracts: tuple[str, ...]
    regime: str
    demo_budget_s: float
    deployments: tuple[Deployment, ...] = ()

    def __post_init__(self):
        systems = [s.name for s in self.strategies if s.role == "system"]
        if len(systems) != 1:
            raise ValueError(f"system {self.name}: exactly one strategy has role 'system', got {systems}")

    @property
    def strategy(self) -> str:
        """The system's own strategy."""
        return next(s.name for s in self.strategies if s.role == "system")

    @property
    def baselines(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.strategies if s.role == "baseline")

    def short_name(self, strategy: str) -> str:
        return next((s.short for s in self.strategies if s.name == strategy), strategy)

    def check_scale(self, scale: str, source: object = "flow parameters") -> None:
        """Refuse a scale this system has no size for."""
        if scale not in self.scales:
            raise InputError(source, "scale", scale, f"a {self.name} run is one of {', '.join(self.scales)}")

    def open_run(self, params: RunParams, *, scale: str, scheduler: str | None = None, results_dir: str = "results",
                 run_id: str | None = None, store: str | None = None, out=None):
        """The :class:`tasks.common.run.RunContext` of one run of this system (``out``: its folder,
        instead of ``results_dir/<system>/<run-id>``)."""
        from tasks.common.run import RunContext

        self.check_scale(scale)
        return RunContext(self.name, params, scale=scale, regime=self.regime, results_dir=results_dir, run_id=run_id,
                          store=store, scheduler=scheduler, out=out, worker_modules=(self.flow_module,))

    @property
    def flow_module(self) -> str:
        """The module of the system's flow: importing it imports every task its workers run."""
        return self.flow.split(":")[0]

    def load_flow(self):
        """The Prefect flow (imports Prefect and the system's runtime)."""
        return load(self.flow)

    def load_cli(self):
        """The ``tierflow <name>`` Typer sub-app."""
        return load(self.cli)

    def describe(self) -> dict:
        """What ``tierflow list --json`` prints for the system."""
        return {"name": self.name, "description": self.description, "stages": list(self.stages),
                "strategies": [s.name for s in self.strategies], "baselines": list(self.baselines),
                "deployments": [f"{d.flow_name}/{d.name}" for d in self.deployments]}


def load(reference: str):
    """``"module:attribute"`` → the attribute, importing the module."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)
