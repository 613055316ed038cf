"""HoneyBee's partitions kept current as permissions and documents change, without a rebuild.

A :class:`LiveDeployment` holds a HoneyBee plan's built partitions and applies changes
(:mod:`tasks.honeybee.changes`) incrementally:

- **permissions first**: the ground truth (:class:`Rbac`) is rebuilt from the new tables
  and every cached permission filter dropped, so from the moment a change is applied no
  search can return what a user may no longer see — whatever the partitions still hold;
- **partition contents**: a partition holds every document granted to one of its roles;
  the documents that now belong to it are added to its index, those that no longer do are
  removed (tombstoned) — only the difference is touched;
- **re-optimizing what changed**: a role no partition serves (new, or granted to no one
  before) gets a partition of its own; a user class whose role set is new is routed over
  the built partitions (the cheapest cover, as the optimizer prices it); every other
  route stays. The report compares the storage and predicted latency with a fresh plan,
  so a user sees when a full re-plan would pay.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from optimizers.honeybee import PartitionPlan, PoolSlot, plan_strategy, route_users
from optimizers.honeybee_cost import SearchCostModel
from tasks.honeybee.changes import Change, Tables, apply_changes
from infra.errors import InputError
from tasks.honeybee.index import PartitionIndex, faiss_threads
from tasks.honeybee.plans import Deployment, build_problem, effective_roles, make_deployment
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.serve import PartitionServer, SearchJob, merge_results
from tasks.honeybee.workload import Workload

STRATEGY = "honeybee"
POOL = "local"


@dataclass
class UpdateReport:
    """What one batch of changes cost, next to what a full rebuild costs."""

    changes: int
    vectors_added: int
    vectors_removed: int
    partitions_touched: int
    partitions_created: int
    classes_rerouted: int
    seconds: float
    full_rebuild_vectors: int
    storage: float
    storage_budget: float
    predicted_latency_ms: float
    fresh_plan_predicted_latency_ms: float | None = None
    fresh_plan_storage: float | None = None
    full_rebuild_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class LiveDeployment:
    """HoneyBee's partitions for a workload, kept current under changes (module docstring).

    Parameters
    ----------
    workload: the documents, grants, users (and queries, used for query weights).
    model: the search cost model the plan is priced with.
    storage_budget, recall_target: as for the plan.
    """

    def __init__(self, workload: Workload, model: SearchCostModel, *, storage_budget: float = 1.4,
                 recall_target: float = 0.95, _restored: dict | None = None):
        self.model = model.with_floor(recall_target)
        self.storage_budget = storage_budget
        self.query_users = workload.query_users
        self.tables = Tables(workload.vectors, workload.doc_roles, workload.user_roles)
        self.rbac = Rbac(len(workload.vectors), workload.doc_roles, workload.user_roles)
        start = time.perf_counter()
        if _restored is not None:  # from save(): the built partitions come back as they were
            self.tables.deleted = set(_restored["deleted"])
            self.problem = build_problem(self.rbac, self.query_users, self.model, storage_budget=storage_budget,
                                         name=workload.name)
            self.plan = PartitionPlan.from_dict(_restored["plan"])
            self.deployment = self._deploy(self.plan)
            self.server = PartitionServer(self.tables.vectors, workload.queries, self.rbac)
            self.server.partitions[STRATEGY] = _restored["partitions"]
            self.build_seconds = 0.0
            return
        self.problem = build_problem(self.rbac, self.query_users, self.model, storage_budget=storage_budget,
                                     name=workload.name)
        self.plan = plan_strategy(self.problem, STRATEGY)
        self.deployment = self._deploy(self.plan)
        self.server = PartitionServer(self.tables.vectors, workload.queries, self.rbac)
        self.server.build(STRATEGY, self.deployment.specs)
        self.build_seconds = time.perf_counter() - start

    def _deploy(self, plan: PartitionPlan) -> Deployment:
        return make_deployment(self.problem, plan, self.model, [PoolSlot(POOL, "cloud", float("inf"))], None)

    # ---- applying changes ---------------------------------------------------------------
    def apply(self, changes: list[Change], *, compare_with_fresh_plan: bool = False) -> UpdateReport:
        """Apply ``changes`` incrementally; raises InputError (nothing applied) for a bad one."""
        start = time.perf_counter()
        new = apply_changes(self.tables, changes)  # validates everything before touching anything
        old_masks = {p: self.rbac.permitted_mask(roles) for p, roles in enumerate(self.plan.partitions)}
        self.tables = new
        self.rbac = Rbac(len(new.vectors), new.doc_roles, new.user_roles)
        self.server.permissions_changed(new.vectors, self.rbac)

        added = removed = touched = 0
        built = self.server.partitions[STRATEGY]
        with faiss_threads(1):
            for p, roles in enumerate(self.plan.partitions):
                now = self.rbac.permitted_mask(roles)
                before = np.zeros(len(now), dtype=bool)
                before[: len(old_masks[p])] = old_masks[p]
                joining, leaving = np.flatnonzero(now & ~before), np.flatnonzero(before & ~now)
                if len(joining):
                    built[p].add(new.vectors[joining], joining.astype(np.int64))
                if len(leaving):
                    built[p].remove(leaving)
                added, removed = added + len(joining), removed + len(leaving)
                touched += bool(len(joining) or len(leaving))

        created, rerouted = self._replan_what_changed()
        report = UpdateReport(
            changes=len(changes), vectors_added=added + sum(built[p].size for p in created), vectors_removed=removed,
            partitions_touched=touched, partitions_created=len(created), classes_rerouted=rerouted,
            seconds=time.perf_counter() - start, full_rebuild_vectors=int(sum(self.plan.sizes)),
            storage=self.plan.storage, storage_budget=self.storage_budget,
            predicted_latency_ms=self.plan.expected_latency_s * 1e3,
        )
        if report.storage > self.storage_budget + 1e-9:
            report.notes.append(f"storage {report.storage:.3f}× is above the budget {self.storage_budget}×: "
                                "a full re-plan would bring it back")
        if compare_with_fresh_plan:
            fresh_start = time.perf_counter()
            fresh = LiveDeployment(Workload(new.vectors, new.doc_roles, new.user_roles, self.server.queries,
                                            self.query_users), self.model, storage_budget=self.storage_budget,
                                   recall_target=self.model.recall_floor)
            report.full_rebuild_seconds = time.perf_counter() - fresh_start
            report.fresh_plan_predicted_latency_ms = fresh.plan.expected_latency_s * 1e3
            report.fresh_plan_storage = fresh.plan.storage
        return report

    def _replan_what_changed(self) -> tuple[list[int], int]:
        """Partitions for roles nothing serves; every user class routed over the built partitions.

        Routing touches no index, so all classes get their cheapest cover under the new
        selectivities; ``rerouted`` counts the classes whose route is new or changed.
        """
        old_routes = {u.roles: route for u, route in zip(self.problem.users, self.plan.routes)}
        if not self._anyone_sees_anything():
            self.deployment.routes = {}  # no user holds a role that grants a document: nothing to route
            return [], 0
        self.problem = build_problem(self.rbac, self.query_users, self.model, storage_budget=self.storage_budget,
                                     name=self.problem.name)
        served = set().union(*self.plan.partitions)
        held = set().union(*(u.roles for u in self.problem.users))
        orphans = sorted(held - served)  # roles someone holds that no partition serves
        partitions = list(self.plan.partitions) + [frozenset([r]) for r in orphans]
        created = list(range(len(self.plan.partitions), len(partitions)))
        self.plan = route_users(self.problem, partitions, STRATEGY, self.plan.method, notes=list(self.plan.notes))
        rerouted = sum(old_routes.get(u.roles) != route for u, route in zip(self.problem.users, self.plan.routes))
        self.deployment = self._deploy(self.plan)
        if created:
            self.server.build(STRATEGY, [s for s in self.deployment.specs if s.pid in created])
        return created, rerouted

    def _anyone_sees_anything(self) -> bool:
        return any(effective_roles(self.rbac, roles) for roles in self.rbac.user_classes())

    # ---- searching ----------------------------------------------------------------------
    def search(self, queries: np.ndarray, users: list[str], k: int) -> np.ndarray:
        """Top-k permitted doc ids for each (query, user), through the live partitions."""
        self.server.queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        for q, user in enumerate(users):
            roles = effective_roles(self.rbac, self.rbac.user_roles_of(user))
            if not roles:  # every role this user holds grants nothing: nothing to return
                continue
            route = self.deployment.routes[roles]
            jobs = [SearchJob(q, roles, pid, effort, exact) for pid, effort, exact in route]
            D, I, _ = self.server.search(STRATEGY, jobs, k)
            found[q], _ = merge_results(list(D), list(I), self.rbac.permitted_mask(roles), k)
        return found


# ---- keeping the live deployment between commands ----------------------------------------------

STATE_FILES = ("vectors.npy", "doc_roles.csv", "user_roles.csv", "queries.npy", "query_users.csv", "state.json")


def save_state(live: LiveDeployment, folder: str | Path) -> Path:
    """Write the live deployment (tables, plan, model, built partitions) to ``folder``.

    Written to a temporary folder beside it and swapped in, so a crash leaves the previous
    state whole.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    np.save(tmp / "vectors.npy", live.tables.vectors)
    np.save(tmp / "queries.npy", live.server.queries)
    live.tables.doc_roles.to_csv(tmp / "doc_roles.csv", index=False)
    live.tables.user_roles.to_csv(tmp / "user_roles.csv", index=False)
    pd.DataFrame({"query_id": np.arange(len(live.query_users)), "user": live.query_users}).to_csv(
        tmp / "query_users.csv", index=False)
    (tmp / "partitions").mkdir()
    for pid, index in live.server.partitions[STRATEGY].items():
        (tmp / "partitions" / f"{pid}.npz").write_bytes(index.to_bytes())
    state = {"plan": live.plan.to_dict(), "model": live.model.to_dict(), "storage_budget": live.storage_budget,
             "recall_target": live.model.recall_floor, "deleted": sorted(live.tables.deleted), "name": live.problem.name}
    (tmp / "state.json").write_text(json.dumps(state, default=float))
    old = folder.with_name(f".{folder.name}-old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_state(folder: str | Path) -> LiveDeployment:
    """The live deployment :func:`save_state` wrote; raises InputError for a folder that is not one."""
    from optimizers.honeybee_cost import SearchCostModel

    folder = Path(folder)
    for name in STATE_FILES:
        if not (folder / name).is_file():
            raise InputError(folder / name, "<file>", str(folder / name), "missing: not a HoneyBee update state folder")
    try:
        state = json.loads((folder / "state.json").read_text())
        vectors, queries = np.load(folder / "vectors.npy"), np.load(folder / "queries.npy")
        doc_roles = pd.read_csv(folder / "doc_roles.csv", dtype={"role": str})
        user_roles = pd.read_csv(folder / "user_roles.csv", dtype=str)
        query_users = pd.read_csv(folder / "query_users.csv", dtype={"user": str})["user"].to_numpy(dtype=object)
        plan = state["plan"]
        partitions = {pid: PartitionIndex.from_bytes((folder / "partitions" / f"{pid}.npz").read_bytes())
                      for pid in range(len(plan["partitions"]))}
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(folder, "<folder>", str(folder), f"unreadable HoneyBee update state: {exc}") from None
    workload = Workload(vectors, doc_roles, user_roles, queries, query_users, name=state["name"])
    return LiveDeployment(workload, SearchCostModel.from_dict(state["model"]), storage_budget=state["storage_budget"],
                          recall_target=state["recall_target"],
                          _restored={"plan": plan, "deleted": state["deleted"], "partitions": partitions})
