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
  so a user sees when a full re-plan would pay;
- **kept for every reader**: :func:`save_state` writes the changed tables and partitions to
  the workload's update state (never to the workload), where every later read of the
  workload — ``query``, the flow, the deployment — finds them (:func:`load_workload`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from optimizers.honeybee import PartitionPlan, PoolSlot, plan_strategy, route_users
from optimizers.honeybee_cost import SearchCostModel
from tasks.honeybee.changes import Change, Tables, apply_changes
from infra.errors import InputError
from tasks.honeybee.index import PartitionIndex, faiss_threads
from tasks.honeybee.plans import Deployment, build_problem, effective_roles, make_deployment
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.serve import PartitionServer, SearchJob, merge_results
from tasks.honeybee.workload import (
    STATE_META, Workload, check_state_made_from, current_state, load_workload, read_state, read_state_meta, save_workload,
    state_link, workload_fingerprint,
)

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
        self.queries = workload.queries
        self.tables = Tables(workload.vectors, workload.doc_roles, workload.user_roles)
        self.rbac = Rbac(len(workload.vectors), workload.doc_roles, workload.user_roles, self.query_users)
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
        self.rbac = Rbac(len(new.vectors), new.doc_roles, new.user_roles, self.query_users)
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
            fresh = LiveDeployment(Workload(new.vectors, new.doc_roles, new.user_roles, self.queries,
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
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        for q, user in enumerate(users):
            roles = effective_roles(self.rbac, self.rbac.user_roles_of(user))
            if not roles:  # every role this user holds grants nothing: nothing to return
                continue
            route = self.deployment.routes[roles]
            jobs = [SearchJob(q, roles, pid, effort, exact) for pid, effort, exact in route]
            D, I, _ = self.server.search(STRATEGY, jobs, k, queries)
            found[q], _ = merge_results(list(D), list(I), self.rbac.permitted_mask(roles), k)
        return found


# ---- keeping the live deployment between commands ----------------------------------------------
#
# A state folder is a workload folder (the tables as the changes left them) plus state.json and
# the built partitions; every read of the workload answers from it (tasks.honeybee.workload).


def state_folder_for_update(workload_dir: str | Path, requested: str | Path | None = None) -> Path:
    """Where an update of the workload in ``workload_dir`` keeps its state.

    By default the workload's current state (:func:`current_state`) or, for a first update,
    ``<workload>.honeybee-state`` beside it. ``requested`` (``update --state``) may put a first
    state elsewhere (the default place then links to it) but not start a second one: a workload
    has one current set of permissions.
    """
    current = current_state(workload_dir)
    if requested is None:
        return current or state_link(workload_dir)
    requested = Path(requested).resolve()
    if current is not None and current != requested:
        raise InputError("--state", "state", str(requested),
                         f"{workload_dir} already keeps its update state in {current}: updates continue there "
                         "(pass that folder, or none)")
    return requested


def save_state(live: LiveDeployment, folder: str | Path, workload_dir: str | Path) -> Path:
    """Write the live deployment (tables, plan, model, built partitions) to ``folder``, made
    from the workload in ``workload_dir`` (recorded by its fingerprint, so reads can tell a
    state from an older workload); a state kept away from the workload gets a link beside it.

    Written to a temporary folder beside it and swapped in, so a crash leaves the previous
    state whole.
    """
    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    save_workload(Workload(live.tables.vectors, live.tables.doc_roles, live.tables.user_roles, live.queries,
                           live.query_users), tmp)
    (tmp / "partitions").mkdir()
    for pid, index in live.server.partitions[STRATEGY].items():
        (tmp / "partitions" / f"{pid}.npz").write_bytes(index.to_bytes())
    state = {"plan": live.plan.to_dict(), "model": live.model.to_dict(), "storage_budget": live.storage_budget,
             "recall_target": live.model.recall_floor, "deleted": sorted(live.tables.deleted), "name": live.problem.name,
             "workload": str(Path(workload_dir).resolve()), "workload_fingerprint": workload_fingerprint(workload_dir),
             "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / STATE_META).write_text(json.dumps(state, default=float))
    old = folder.with_name(f".{folder.name}-old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    link = state_link(workload_dir)
    if link != folder and not link.exists() and not link.is_symlink():
        os.symlink(folder, link, target_is_directory=True)
    return folder


def load_state(folder: str | Path, workload_dir: str | Path) -> LiveDeployment:
    """The live deployment :func:`save_state` wrote from the workload in ``workload_dir``; raises
    InputError for a folder that is not a state, or one made from another version of the workload."""
    folder = Path(folder)
    check_state_made_from(folder, workload_dir)
    state = read_state_meta(folder)
    workload = read_state(folder)
    try:
        plan = state["plan"]
        partitions = {pid: PartitionIndex.from_bytes((folder / "partitions" / f"{pid}.npz").read_bytes())
                      for pid in range(len(plan["partitions"]))}
        model = SearchCostModel.from_dict(state["model"])
        settings = {"storage_budget": state["storage_budget"], "recall_target": state["recall_target"]}
        restored = {"plan": plan, "deleted": state["deleted"], "partitions": partitions}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(folder, "<folder>", str(folder), f"unreadable HoneyBee update state: {exc}") from None
    return LiveDeployment(replace(workload, name=state.get("name", workload.name)), model, **settings,
                          _restored=restored)


@dataclass
class UpdateOutcome:
    """One ``tierflow honeybee update``: the report, where the state is kept, and the re-check
    of every workload query against the new permissions."""

    report: UpdateReport
    state: Path
    first_build_seconds: float | None
    verified_queries: int
    forbidden_results: int

    def to_dict(self) -> dict:
        return {**self.report.to_dict(), "state": str(self.state), "first_build_seconds": self.first_build_seconds,
                "verified_queries": self.verified_queries, "forbidden_results": self.forbidden_results}


def update_workload(workload_dir: str | Path, changes: list[Change], model_for: Callable[[Workload], SearchCostModel],
                    *, state: str | Path | None = None, storage_budget: float = 1.4, recall_target: float = 0.95,
                    compare_with_fresh_plan: bool = True,
                    status: Callable[[str], AbstractContextManager] = lambda what: nullcontext()) -> UpdateOutcome:
    """Apply ``changes`` to the workload in ``workload_dir`` and keep the result in its update state.

    The first update plans and builds HoneyBee's partitions (priced by ``model_for(workload)``,
    at ``storage_budget`` and ``recall_target``); later ones continue from the state
    (:func:`state_folder_for_update`). Every query of the workload is then searched through
    the live partitions and re-checked against the new permissions before the state is saved.
    ``status(message)`` is entered around each long step (a CLI spinner).
    """
    folder = state_folder_for_update(workload_dir, state)
    first_build = None
    if folder.exists():
        live = load_state(folder, workload_dir)
    else:
        workload = load_workload(workload_dir)
        model = model_for(workload)
        with status("planning and building the partitions (first update)…"):
            live = LiveDeployment(workload, model, storage_budget=storage_budget, recall_target=recall_target)
        first_build = live.build_seconds
    with status(f"applying {len(changes)} changes" + (", then a full rebuild to compare…" if compare_with_fresh_plan else "…")):
        report = live.apply(changes, compare_with_fresh_plan=compare_with_fresh_plan)
    truth = Rbac(len(live.tables.vectors), live.tables.doc_roles, live.tables.user_roles, live.query_users)
    found = live.search(live.queries, list(live.query_users), k=10)
    leaked = sum(int((~truth.user_mask(user)[ids[ids >= 0]]).sum()) for user, ids in zip(live.query_users, found))
    save_state(live, folder, workload_dir)
    return UpdateOutcome(report, folder, first_build, len(found), leaked)
