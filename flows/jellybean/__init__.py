"""JellyBean: ML inference workflows served across device/hub/edge/cloud tiers at least cost.

``flow.py`` is the flow (profile → optimize → deploy → evaluate), ``cli.py`` the ``tierflow jellybean``
stages run alone with files between them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PrivateAttr

from flows.system import Deployment, Strategy, System
from tasks.common.params import RunParams
from tasks.jellybean.defaults import DEFAULT_INFRA, DEFAULT_WORKFLOW

# requests pushed through each plan, and profiling repeats
SCALES = {"small": {"requests": 4, "repeats": 1}, "medium": {"requests": 16, "repeats": 3},
          "large": {"requests": 64, "repeats": 5}}


class JellyBeanParams(RunParams):
    """workflow: a tierflow workflow spec (YAML); infra: an infrastructure spec (YAML);
    rate: every source's request rate (req/s), instead of the workflow's."""

    SYSTEM = "jellybean"
    PATH_FIELDS = ("workflow", "infra")

    workflow: str = str(DEFAULT_WORKFLOW)
    infra: str = str(DEFAULT_INFRA)
    rate: Annotated[float, Field(gt=0)] | None = None
    _workflow: object = PrivateAttr(None)

    def load_inputs(self, source: object, scale: str | None = None) -> None:
        from infra.spec import load_infra_spec
        from tasks.jellybean.runtime import check_servable
        from tasks.jellybean.workflow import load_workflow

        self._workflow = load_workflow(self.workflow, rate=self.rate)
        check_servable(self._workflow)
        self._infra = load_infra_spec(self.infra)

    @property
    def workflow_spec(self):
        return self._workflow


SYSTEM = System(
    name="jellybean",
    description="serve ML inference workflows across device/hub/edge/cloud tiers at least cost",
    flow="flows.jellybean.flow:jellybean",
    cli="flows.jellybean.cli:jellybean_app",
    params=JellyBeanParams,
    strategies=(
        Strategy("milp", "system", "milp", "JellyBean's MILP: variants and workers at least cost"),
        Strategy("jellybean_heuristic", "baseline", "heuristic", "the paper's greedy heuristic"),
        Strategy("infaas_style", "baseline", "infaas", "INFaaS-style: cheapest variant per operator"),
        Strategy("cloud_only", "baseline", "cloud", "everything in the cloud tier"),
    ),
    stages=("profile", "optimize", "deploy", "evaluate"),
    scales=tuple(SCALES),
    contracts=("jellybean.workflow", "jellybean.profile", "jellybean.plan", "jellybean.deploy",
               "jellybean.evaluation", "jellybean.execution_profile", "jellybean.message_sizes",
               "jellybean.workers_specs", "jellybean.links", "jellybean.rates", "jellybean.graph",
               "jellybean.accuracy_table"),
    regime="VQA workflow, 4 tiers",
    demo_budget_s=90,
    deployments=(
        Deployment("hourly-replan", "flows.jellybean.flow:jellybean", "0 * * * *",
                   "JellyBean re-planning: profile every model variant on the tier workers, solve the least-cost "
                   "variant and worker assignment (MILP) against its baselines, deploy the plan on the embedded "
                   "tiered Dask cluster and evaluate it. Runs hourly at small scale so the plan follows the "
                   "current measurements.", {"scale": "small"}, ("jellybean", "replan")),
        Deployment("nightly-profile", "flows.jellybean.flow:jellybean", "0 2 * * *",
                   "JellyBean nightly re-profiling at medium scale (more profiling repeats and a longer request "
                   "stream through each plan), for steadier latency figures than the hourly re-plan.",
                   {"scale": "medium"}, ("jellybean", "profile")),
    ),
)
