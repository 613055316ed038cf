"""Lazarus: resilient, elastic Mixture-of-Experts training that keeps going when nodes die.

``flow.py`` is the flow (profile → optimize → deploy → evaluate, with real failures), ``cli.py`` the
``tierflow lazarus`` commands (plan a placement, kill a node of the running run).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import PrivateAttr, StrictInt, field_validator

from flows.system import Deployment, Strategy, System
from infra.errors import InputError
from tasks.common.params import RunParams

DEFAULT_INFRA = Path(__file__).resolve().parents[2] / "data" / "lazarus.infra.yaml"
STRATEGIES = ("lazarus", "reconfig_uniform", "checkpoint_restart")
# each scale's model, cluster, failures and regime: tasks/lazarus/scales.py (it imports torch: read when a run starts)
SCALES = ("tiny", "small", "medium", "large")


class LazarusParams(RunParams):
    """infra: infrastructure spec, one worker process per training node (``worker_per_machine``);
    strategies: which of the strategies to run (default: all); trace: a spot trace
    (``time_ms,add|remove,node``) to replay instead of periodic failures, its busiest 80-minute
    segment squeezed by ``time_scale`` (trace seconds per real second); seed: the training's seed;
    checkpoint_store: the artifact store for checkpoints (a folder or s3://…; default: the run's folder)."""

    SYSTEM = "lazarus"
    PATH_FIELDS = ("infra", "trace")

    infra: str = str(DEFAULT_INFRA)
    strategies: list[str] = list(STRATEGIES)
    trace: str | None = None
    time_scale: float = 0.01
    seed: StrictInt = 0
    checkpoint_store: str | None = None
    _trace: object = PrivateAttr(None)

    @field_validator("strategies")
    @classmethod
    def _known(cls, chosen: list[str]) -> list[str]:
        if not chosen or any(s not in STRATEGIES for s in chosen):
            raise ValueError(f"expected a list of some of {', '.join(STRATEGIES)}")
        return chosen

    @field_validator("time_scale")
    @classmethod
    def _squeezes(cls, scale: float) -> float:
        if not (math.isfinite(scale) and 0 < scale <= 1):
            raise ValueError("expected a number in (0, 1]: trace seconds per real second")
        return scale

    def load_inputs(self, source: object, scale: str | None = None) -> None:
        from infra.spec import load_infra_spec
        from infra.traces import load_spot_trace
        from tasks.lazarus.scales import SCALES as SHAPES

        self._infra = load_infra_spec(self.infra)
        machines = sum(p.count for p in self._infra.pools if p.worker_per_machine)
        nodes = SHAPES[scale or "small"]["nodes"]
        if machines < nodes:
            raise InputError(self.infra, "pools", machines, f"a {scale or 'small'} Lazarus run needs ≥ {nodes} machines "
                             "with worker_per_machine: true (one worker process per training node)")
        self._trace = load_spot_trace(self.trace) if self.trace else None

    @property
    def spot_trace(self):
        """The loaded spot trace, or None for periodic failures."""
        return self._trace


SYSTEM = System(
    name="lazarus",
    description="resilient, elastic MoE training that keeps going when nodes die",
    flow="flows.lazarus.flow:lazarus",
    cli="flows.lazarus.cli:lazarus_app",
    params=LazarusParams,
    strategies=(
        Strategy("lazarus", "system", "lazarus", "adaptive expert replicas, MRO placement, reconfigure on failure"),
        Strategy("reconfig_uniform", "baseline", "reconfig", "DeepSpeed(FT): uniform replicas, reconfigure on failure"),
        Strategy("checkpoint_restart", "baseline", "ckpt", "DeepSpeed: restart from the last checkpoint on failure"),
    ),
    stages=("profile", "optimize", "deploy", "evaluate"),
    scales=SCALES,
    contracts=("lazarus.evaluation", "lazarus.spot_trace", "moe.corpus"),
    regime="MoE training under node failures",
    demo_budget_s=180,
    deployments=(
        Deployment("weekly-resilience", "flows.lazarus.flow:lazarus", "0 4 * * 0",
                   "Lazarus weekly resilience check: re-profile the MoE training, re-plan expert replicas and "
                   "placements from the router's loads (with their exact recovery odds), then train under injected "
                   "preemptions with lazarus, reconfig_uniform and checkpoint_restart and compare goodput. Pass "
                   "`trace` to replay a spot-instance trace instead.", {"scale": "small"}, ("lazarus", "resilience")),
    ),
)
