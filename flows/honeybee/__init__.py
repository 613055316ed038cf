"""HoneyBee: role-based access control for vector search by overlapping partitions.

``flow.py`` is the flow (profile → optimize → deploy → evaluate), ``cli.py`` the ``tierflow honeybee``
commands (generate, profile, query, update) on files, in this process.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import PrivateAttr, StrictInt, field_validator

from flows.system import Deployment, Strategy, System
from tasks.common.params import RunParams

DEFAULT_INFRA = Path(__file__).resolve().parents[2] / "data" / "honeybee.infra.yaml"
SCALES = ("small", "medium", "large")  # the generated workload's size; the profiling grid follows it


class HoneyBeeParams(RunParams):
    """workload: a workload folder (vectors.npy, doc_roles.csv, user_roles.csv, queries.npy,
    query_users.csv), by default one generated for the run's scale (and kept for reuse);
    infra: an infrastructure spec; storage_budget: the most vector copies per document HoneyBee may
    store; recall_target: recall@k every strategy must reach; k: results per query; near_tier: the
    tier users query from (the hottest partitions go there); max_index_gib: strategies whose indexes
    would need more memory are planned but not built."""

    SYSTEM = "honeybee"
    PATH_FIELDS = ("workload", "infra")

    workload: str | None = None
    infra: str = str(DEFAULT_INFRA)
    storage_budget: float = 1.4
    recall_target: float = 0.95
    k: StrictInt = 10
    near_tier: str | None = "edge"
    max_index_gib: float = 4.0
    _workload: object = PrivateAttr(None)
    _workload_dir: str | None = PrivateAttr(None)

    @field_validator("storage_budget")
    @classmethod
    def _at_least_one_copy(cls, budget: float) -> float:
        if not budget >= 1.0:
            raise ValueError("must be a number ≥ 1.0: every document is stored at least once")
        return budget

    @field_validator("recall_target")
    @classmethod
    def _a_share(cls, target: float) -> float:
        if not 0 < target < 1:
            raise ValueError("must be a number in (0, 1), e.g. 0.95")
        return target

    @field_validator("k")
    @classmethod
    def _positive(cls, k: int) -> int:
        if k < 1:
            raise ValueError("must be an integer ≥ 1")
        return k

    @field_validator("near_tier")
    @classmethod
    def _a_tier(cls, tier: str | None) -> str | None:
        from infra.catalog import TIERS

        if tier is not None and tier not in TIERS:
            raise ValueError(f"must be one of {', '.join(TIERS)}")
        return tier

    @field_validator("max_index_gib")
    @classmethod
    def _some_memory(cls, gib: float) -> float:
        if not gib > 0:
            raise ValueError("must be a number > 0 (GiB of index memory a strategy may use)")
        return gib

    def load_inputs(self, source: object, scale: str | None = None) -> None:
        from infra.spec import load_infra_spec
        from tasks.honeybee.workload import ensure_generated, load_workload

        self._infra = load_infra_spec(self.infra)
        self._workload_dir = str(Path(self.workload).resolve()) if self.workload else str(ensure_generated(scale or "small"))
        self._workload = load_workload(self._workload_dir)

    @property
    def workload_dir(self) -> str:
        """The workload folder the run uses (the given one, or the generated one for its scale)."""
        return self._workload_dir

    @property
    def loaded_workload(self):
        return self._workload


SYSTEM = System(
    name="honeybee",
    description="role-based access control for vector search by overlapping partitions",
    flow="flows.honeybee.flow:honeybee",
    cli="flows.honeybee.cli:honeybee_app",
    params=HoneyBeeParams,
    strategies=(
        Strategy("honeybee", "system", "honeybee", "overlapping role partitions under a storage budget (MILP)"),
        Strategy("rls", "baseline", "rls", "row-level security: one index, results filtered after search"),
        Strategy("rls_prefilter", "baseline", "rls-pre", "one index, permitted documents filtered before search"),
        Strategy("per_role", "baseline", "role", "one index per role"),
        Strategy("per_user", "baseline", "user", "one index per user"),
    ),
    stages=("profile", "optimize", "deploy", "evaluate"),
    scales=SCALES,
    contracts=("honeybee.search_profile", "honeybee.evaluation", "honeybee.doc_roles", "honeybee.user_roles",
               "honeybee.query_users"),
    regime="generated enterprise RBAC workload",
    demo_budget_s=150,
    deployments=(
        Deployment("nightly-repartition", "flows.honeybee.flow:honeybee", "30 3 * * *",
                   "HoneyBee nightly re-partitioning: re-measure filtered search on a worker, re-fit the cost and "
                   "recall models, re-plan the overlapping partitions under the storage budget (MILP over "
                   "role-signature candidates), build them on the tier workers and measure them against rls, "
                   "rls_prefilter, per_role and per_user on the same queries. Pass `workload` to re-partition "
                   "your own collection.",
                   {"scale": "small", "storage_budget": 1.4, "recall_target": 0.95}, ("honeybee", "repartition")),
    ),
)
