"""HoneyBee workloads: document vectors with role grants, users with roles, and their queries.

A workload is what every HoneyBee strategy is built from and measured on. On disk it is a
folder holding exactly :data:`FILES`:

- ``vectors.npy``: N×d float32; the doc id of a vector is its row index 0..N-1;
- ``doc_roles.csv`` (header ``doc_id,role``): which roles may see which documents;
- ``user_roles.csv`` (header ``user,role``): which roles each user holds;
- ``queries.npy``: Q×d float32; the query id is the row index;
- ``query_users.csv`` (header ``query_id,user``): who asks each query.

:func:`load_workload` checks every value before any work starts and raises
:class:`infra.errors.InputError` naming the file, the field and the bad value.

:func:`generate_workload` draws a synthetic workload shaped like an enterprise RBAC (the
shape decides how much a per-role or per-user-class partitioning costs, so it matters):

- an org tree of roles, divisions → departments → teams. Each document is owned by one
  team (team sizes Zipf-skewed) and is granted to its team, its department and its division
  (managers see their reports' documents);
- cross-cutting project roles, each granting a skewed-size subset of the documents of 2–5 teams;
- one company-wide role, :data:`ALL_STAFF`, granting the published documents; most users
  hold it, contractors do not;
- users belong to a team; a few also manage their department or division; some join
  projects (skewed popularity);
- vectors follow the org tree (division center → department → team → document, each a
  Gaussian step) so topics cluster but overlap;
- queries come from users drawn by a Zipf activity; most are near a document the user may
  see, the rest near any document.

:func:`ensure_generated` keeps one generated folder per scale and seed for reuse.

The same seed gives the same workload; each part (org, grants, users, vectors, queries)
draws from its own stream, so changing e.g. the query count leaves the documents as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from infra.errors import InputError

FILES = ("vectors.npy", "doc_roles.csv", "user_roles.csv", "queries.npy", "query_users.csv")
COLUMNS = {"doc_roles.csv": ["doc_id", "role"], "user_roles.csv": ["user", "role"], "query_users.csv": ["query_id", "user"]}
CONTRACTS = {"doc_roles.csv": "honeybee.doc_roles", "user_roles.csv": "honeybee.user_roles",
             "query_users.csv": "honeybee.query_users"}
ALL_STAFF = "all-staff"
GENERATOR_VERSION = 2  # bump when generate_workload draws differently for the same seed
_CHUNK_ROWS = 1 << 16  # vectors are drawn and checked this many rows at a time (bounded memory)


@dataclass
class Workload:
    """Documents, who may see them, and who asks what.

    vectors: (N, d) float32, C-contiguous; the doc id is the row index.
    doc_roles: columns doc_id (int64), role (str); every doc has ≥ 1 role; no duplicate pairs.
    user_roles: columns user (str), role (str); no duplicate pairs.
    queries: (Q, d) float32; the query id is the row index.
    query_users: (Q,) object array of user names.
    state: the update state folder the tables come from (:func:`load_workload`), or None
        when they are the workload folder's own.
    """

    vectors: np.ndarray
    doc_roles: pd.DataFrame
    user_roles: pd.DataFrame
    queries: np.ndarray
    query_users: np.ndarray
    name: str = "generated"
    state: str | None = None


# --------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class WorkloadShape:
    """The knobs of :func:`generate_workload`.

    Roles: ``n_roles`` = 1 company-wide + ``n_projects`` + ``n_divisions`` + ``n_departments``
    + ``n_teams`` (the rest). Shares are probabilities or fractions in [0, 1].
    """

    n_docs: int
    dim: int
    n_roles: int
    n_users: int
    n_queries: int
    n_divisions: int
    n_departments: int
    project_share: float = 0.15  # of all roles
    team_zipf: float = 1.1  # team size ∝ rank^-team_zipf
    project_teams: tuple[int, int] = (2, 5)  # a project draws its documents from this many teams
    project_fraction: tuple[float, float] = (0.02, 0.5)  # of its teams' docs; log-uniform, so sizes are skewed
    project_zipf: float = 1.1  # project popularity among users
    projects_per_user: tuple[float, ...] = (0.45, 0.35, 0.20)  # P(0 projects), P(1), P(2)
    published_share: float = 0.18  # of docs, granted to ALL_STAFF
    all_staff_share: float = 0.60  # of users; the rest are contractors
    department_manager_share: float = 0.10
    division_manager_share: float = 0.02
    team_headcount_power: float = 0.8  # users per team ∝ team docs^power
    user_zipf: float = 1.0  # query activity ∝ rank^-user_zipf
    query_permitted_share: float = 0.8  # queries near a doc the user may see
    # Per-coordinate σ of each step: division center, department, team, doc (and query noise).
    # Small steps against the doc noise make topics overlap: at small and medium scale 40–55%
    # of a doc's 10 nearest neighbours share its team, 75–80% its department.
    spread: tuple[float, float, float, float] = (0.5, 0.3, 0.15, 1.0)

    def __post_init__(self) -> None:
        source = "WorkloadShape"
        for name in ("n_docs", "dim", "n_users", "n_divisions"):
            if getattr(self, name) < 1:
                raise InputError(source, name, getattr(self, name), "must be ≥ 1")
        if self.n_queries < 0:
            raise InputError(source, "n_queries", self.n_queries, "must be ≥ 0")
        if self.n_departments < self.n_divisions:
            raise InputError(source, "n_departments", self.n_departments, f"need one per division at least ({self.n_divisions})")
        if self.n_teams < self.n_departments:
            raise InputError(source, "n_roles", self.n_roles,
                             f"leaves {self.n_teams} teams for {self.n_departments} departments; raise n_roles")
        if self.n_docs < self.n_teams:
            raise InputError(source, "n_docs", self.n_docs, f"need one doc per team at least ({self.n_teams})")
        low, high = self.project_teams
        if not 1 <= low <= high:
            raise InputError(source, "project_teams", self.project_teams, "expected (low, high) with 1 ≤ low ≤ high")
        if abs(sum(self.projects_per_user) - 1) > 1e-9:
            raise InputError(source, "projects_per_user", self.projects_per_user, "probabilities must sum to 1")

    @property
    def n_projects(self) -> int:
        return round(self.project_share * self.n_roles)

    @property
    def n_teams(self) -> int:
        return self.n_roles - 1 - self.n_projects - self.n_divisions - self.n_departments


SCALES: dict[str, WorkloadShape] = {
    "tiny": WorkloadShape(n_docs=3_000, dim=32, n_roles=30, n_users=120, n_queries=200, n_divisions=2, n_departments=5),
    # small is medium's RBAC shape on a fifth of its documents: the selective-roles regime HoneyBee's
    # claim is about, at a size the demo runs in a couple of minutes (README: where the crossover lies).
    "small": WorkloadShape(n_docs=20_000, dim=128, n_roles=300, n_users=3_000, n_queries=1_000, n_divisions=6,
                           n_departments=30),
    # The demo's small scale until issue 15: few, broad roles over a 64-d collection — a regime
    # where an exact scan of what a user may see stays cheap, so partitioning gains little
    # (README: the crossover by size). Kept for `benchmarks.honeybee --sweep --shape few_roles`.
    "few_roles": WorkloadShape(n_docs=20_000, dim=64, n_roles=100, n_users=800, n_queries=1_000, n_divisions=4,
                               n_departments=12),
    "medium": WorkloadShape(n_docs=100_000, dim=128, n_roles=300, n_users=3_000, n_queries=2_000, n_divisions=6,
                            n_departments=30),
    "large": WorkloadShape(n_docs=1_000_000, dim=128, n_roles=800, n_users=10_000, n_queries=5_000, n_divisions=10,
                           n_departments=60),
}


@dataclass
class _Org:
    """The generated org: role names by generator role id, and who owns what.

    Generator role ids run: divisions, departments, teams, projects, then ALL_STAFF.
    """

    role_names: list[str]
    team_of_doc: np.ndarray  # (N,) team
    team_department: np.ndarray  # team → department
    department_division: np.ndarray  # department → division
    n_divisions: int

    def division_role(self, division):
        return division

    def department_role(self, department):
        return self.n_divisions + department

    def team_role(self, team):
        return self.n_divisions + len(self.department_division) + team

    def project_role(self, project):
        return self.n_divisions + len(self.department_division) + len(self.team_department) + project

    @property
    def all_staff_role(self) -> int:
        return len(self.role_names) - 1


def generate_workload(scale: str | WorkloadShape = "small", seed: int = 0) -> Workload:
    """A synthetic enterprise-RBAC workload (see the module docstring); deterministic for ``seed``.

    Parameters
    ----------
    scale: a name in :data:`SCALES` or a :class:`WorkloadShape`.
    seed: the random seed.
    """
    shape = _shape(scale)
    org_rng, grant_rng, user_rng, vector_rng, query_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))
    org = _org_tree(shape, org_rng)
    grant_docs, grant_roles = _grants(shape, org, grant_rng)
    user_names, user_role_lists = _users(shape, org, user_rng)
    vectors = _vectors(shape, org, vector_rng)
    queries, query_users = _queries(shape, org, vectors, grant_docs, grant_roles, user_role_lists, query_rng)

    names = np.array(org.role_names, dtype=object)
    rank = np.empty(len(names), dtype=np.int64)
    rank[np.argsort(names, kind="stable")] = np.arange(len(names))  # sort roles by name within a doc
    order = np.lexsort((rank[grant_roles], grant_docs))
    doc_roles = pd.DataFrame({"doc_id": grant_docs[order].astype(np.int64), "role": names[grant_roles[order]]})
    user_roles = pd.DataFrame(
        [(user, org.role_names[r]) for user, roles in zip(user_names, user_role_lists) for r in roles],
        columns=["user", "role"],
    ).sort_values(["user", "role"], ignore_index=True)
    return Workload(vectors, doc_roles, user_roles, queries, np.array([user_names[u] for u in query_users], dtype=object),
                    name=scale if isinstance(scale, str) else "generated")


def _shape(scale: str | WorkloadShape) -> WorkloadShape:
    if isinstance(scale, WorkloadShape):
        return scale
    if scale not in SCALES:
        raise InputError("generate_workload", "scale", scale, f"unknown scale; one of {', '.join(SCALES)}")
    return SCALES[scale]


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities ∝ rank^-exponent, the ranks shuffled over the n items."""
    weights = rng.permutation(np.arange(1, n + 1, dtype=np.float64)) ** -exponent
    return weights / weights.sum()


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer sizes ≥ 1 summing to ``total``, as close to ``total · weights`` as that allows."""
    exact = total * weights
    sizes = np.maximum(1, np.floor(exact).astype(np.int64))
    short = total - int(sizes.sum())
    if short > 0:  # give the remainder to the largest fractional parts
        sizes[np.argsort(sizes - exact, kind="stable")[:short]] += 1
    while short < 0:  # the minimum of 1 overshot: take from the largest
        biggest = int(np.argmax(sizes))
        take = min(-short, int(sizes[biggest]) - 1)
        sizes[biggest] -= take
        short += take
    return sizes


def _assign(n_children: int, n_parents: int, rng: np.random.Generator) -> np.ndarray:
    """A parent for each child, every parent getting at least one."""
    parents = np.concatenate([np.arange(n_parents), rng.integers(0, n_parents, n_children - n_parents)])
    return rng.permutation(parents)


def _org_tree(shape: WorkloadShape, rng: np.random.Generator) -> _Org:
    department_division = _assign(shape.n_departments, shape.n_divisions, rng)
    team_department = _assign(shape.n_teams, shape.n_departments, rng)
    team_sizes = _apportion(shape.n_docs, _zipf_weights(shape.n_teams, shape.team_zipf, rng))
    team_of_doc = rng.permutation(np.repeat(np.arange(shape.n_teams), team_sizes))  # doc ids carry no team order

    def width(n: int) -> int:
        return len(str(n - 1))

    division = [f"div{i:0{width(shape.n_divisions)}d}" for i in range(shape.n_divisions)]
    department = [f"{division[department_division[j]]}.dept{j:0{width(shape.n_departments)}d}"
                  for j in range(shape.n_departments)]
    team = [f"{department[team_department[t]]}.team{t:0{width(shape.n_teams)}d}" for t in range(shape.n_teams)]
    project = [f"proj{p:0{width(max(shape.n_projects, 1))}d}" for p in range(shape.n_projects)]
    return _Org([*division, *department, *team, *project, ALL_STAFF], team_of_doc, team_department, department_division,
                shape.n_divisions)


def _grants(shape: WorkloadShape, org: _Org, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(doc, generator role id) pairs: team, department, division, projects, ALL_STAFF."""
    docs = np.arange(shape.n_docs, dtype=np.int64)
    team = org.team_of_doc
    department = org.team_department[team]
    doc_parts = [docs, docs, docs]
    role_parts = [org.team_role(team), org.department_role(department), org.division_role(org.department_division[department])]

    docs_by_team = np.argsort(team, kind="stable")
    team_start = np.concatenate([[0], np.cumsum(np.bincount(team, minlength=shape.n_teams))])
    low, high = shape.project_teams
    log_low, log_high = np.log(shape.project_fraction)
    for project in range(shape.n_projects):
        teams = rng.choice(shape.n_teams, size=min(int(rng.integers(low, high + 1)), shape.n_teams), replace=False)
        pool = np.concatenate([docs_by_team[team_start[t]:team_start[t + 1]] for t in teams])
        size = max(1, round(np.exp(rng.uniform(log_low, log_high)) * len(pool)))
        doc_parts.append(np.sort(rng.choice(pool, size=size, replace=False)))
        role_parts.append(np.full(size, org.project_role(project)))

    published = np.sort(rng.choice(shape.n_docs, size=max(1, round(shape.published_share * shape.n_docs)), replace=False))
    doc_parts.append(published)
    role_parts.append(np.full(len(published), org.all_staff_role))
    return np.concatenate(doc_parts).astype(np.int64), np.concatenate(role_parts).astype(np.int64)


def _users(shape: WorkloadShape, org: _Org, rng: np.random.Generator) -> tuple[list[str], list[list[int]]]:
    """User names and, per user, their generator role ids."""
    team_sizes = np.bincount(org.team_of_doc, minlength=shape.n_teams).astype(np.float64)
    headcount = team_sizes ** shape.team_headcount_power
    headcount /= headcount.sum()
    if shape.n_users >= shape.n_teams:  # every team has someone
        team_of_user = rng.permutation(np.concatenate([
            np.arange(shape.n_teams), rng.choice(shape.n_teams, size=shape.n_users - shape.n_teams, p=headcount)]))
    else:
        team_of_user = rng.choice(shape.n_teams, size=shape.n_users, p=headcount)
    manages_department = rng.random(shape.n_users) < shape.department_manager_share
    manages_division = rng.random(shape.n_users) < shape.division_manager_share
    staff = rng.random(shape.n_users) < shape.all_staff_share
    n_projects = rng.choice(len(shape.projects_per_user), size=shape.n_users, p=shape.projects_per_user)
    popularity = _zipf_weights(shape.n_projects, shape.project_zipf, rng) if shape.n_projects else None

    role_lists = []
    for u, team in enumerate(team_of_user):
        department = org.team_department[team]
        roles = [org.team_role(team)]
        if manages_department[u]:
            roles.append(org.department_role(department))
        if manages_division[u]:
            roles.append(org.division_role(org.department_division[department]))
        if popularity is not None and n_projects[u]:
            chosen = rng.choice(shape.n_projects, size=min(int(n_projects[u]), shape.n_projects), replace=False, p=popularity)
            roles.extend(org.project_role(int(p)) for p in chosen)
        if staff[u]:
            roles.append(org.all_staff_role)
        role_lists.append([int(r) for r in roles])
    width = len(str(shape.n_users - 1))
    return [f"user{u:0{width}d}" for u in range(shape.n_users)], role_lists


def _vectors(shape: WorkloadShape, org: _Org, rng: np.random.Generator) -> np.ndarray:
    """Division center → department → team → doc, each a Gaussian step; drawn in chunks."""
    s_division, s_department, s_team, s_doc = (np.float32(s) for s in shape.spread)
    d = shape.dim
    division = rng.standard_normal((shape.n_divisions, d), dtype=np.float32) * s_division
    department = division[org.department_division] + rng.standard_normal((shape.n_departments, d), dtype=np.float32) * s_department
    team = department[org.team_department] + rng.standard_normal((shape.n_teams, d), dtype=np.float32) * s_team
    vectors = np.empty((shape.n_docs, d), dtype=np.float32)
    for start in range(0, shape.n_docs, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, shape.n_docs)
        vectors[start:stop] = team[org.team_of_doc[start:stop]]
        vectors[start:stop] += rng.standard_normal((stop - start, d), dtype=np.float32) * s_doc
    return vectors


def _queries(shape: WorkloadShape, org: _Org, vectors: np.ndarray, grant_docs: np.ndarray, grant_roles: np.ndarray,
             user_role_lists: list[list[int]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Query vectors and the user (index) asking each."""
    n_roles = len(org.role_names)
    by_role = np.argsort(grant_roles, kind="stable")
    role_docs, role_start = grant_docs[by_role], np.concatenate([[0], np.cumsum(np.bincount(grant_roles, minlength=n_roles))])
    by_doc = np.argsort(grant_docs, kind="stable")
    doc_roles, doc_start = grant_roles[by_doc], np.concatenate([[0], np.cumsum(np.bincount(grant_docs, minlength=shape.n_docs))])

    def permitted_doc(roles: list[int]) -> int:
        # Uniform over the union of the roles' docs: pick a role by size, a doc in it, and keep
        # the doc with probability 1/(how many of these roles grant it).
        sizes = np.array([role_start[r + 1] - role_start[r] for r in roles], dtype=np.float64)
        while True:
            role = roles[rng.choice(len(roles), p=sizes / sizes.sum())]
            doc = int(role_docs[role_start[role] + rng.integers(role_start[role + 1] - role_start[role])])
            granting = np.isin(doc_roles[doc_start[doc]:doc_start[doc + 1]], roles).sum()
            if rng.random() * granting < 1:
                return doc

    users = rng.choice(shape.n_users, size=shape.n_queries, p=_zipf_weights(shape.n_users, shape.user_zipf, rng))
    near_permitted = rng.random(shape.n_queries) < shape.query_permitted_share
    anchors = np.array([permitted_doc(user_role_lists[u]) if near else int(rng.integers(shape.n_docs))
                        for u, near in zip(users, near_permitted)], dtype=np.int64)
    noise = rng.standard_normal((shape.n_queries, shape.dim), dtype=np.float32) * np.float32(shape.spread[-1])
    return np.ascontiguousarray(vectors[anchors] + noise, dtype=np.float32), users


# --------------------------------------------------------------------------- folder format


def save_workload(workload: Workload, folder: str | os.PathLike[str]) -> Path:
    """Write ``workload`` as a workload folder (see :data:`FILES`); each file is replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    query_users = pd.DataFrame({"query_id": np.arange(len(workload.query_users), dtype=np.int64),
                                "user": np.asarray(workload.query_users, dtype=object)})
    _write_atomically(folder / "vectors.npy", "wb", lambda fh: np.save(fh, np.ascontiguousarray(workload.vectors, np.float32)))
    _write_atomically(folder / "queries.npy", "wb", lambda fh: np.save(fh, np.ascontiguousarray(workload.queries, np.float32)))
    for name, frame in (("doc_roles.csv", workload.doc_roles), ("user_roles.csv", workload.user_roles),
                        ("query_users.csv", query_users)):
        _write_atomically(folder / name, "w", lambda fh, f=frame[COLUMNS[name]]: f.to_csv(fh, index=False, lineterminator="\n"))
    return folder


def ensure_generated(scale: str = "small", seed: int = 0, root: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the generated ``scale`` workload for ``seed``, generating it the first time.

    It lives under ``root`` (default ``$TIERFLOW_HOME/honeybee/workloads``), named after the
    scale, the seed and :data:`GENERATOR_VERSION`, so a changed generator never reuses an old folder.
    """
    from infra.prefect_server import tierflow_home

    _shape(scale)  # an unknown scale fails before anything is written
    folder = Path(root or tierflow_home() / "honeybee" / "workloads") / f"{scale}-seed{seed}-v{GENERATOR_VERSION}"
    if not all((folder / name).is_file() for name in FILES):  # a save cut short is redone
        save_workload(generate_workload(scale, seed), folder)
    return folder


def _write_atomically(path: Path, mode: str, write: Callable) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode, **({} if "b" in mode else {"newline": ""})) as fh:
            write(fh)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_workload(folder: str | os.PathLike[str], *, updates: bool = True) -> Workload:
    """Read and check a workload folder (see :data:`FILES`) as its updates left it; never modifies it.

    With ``updates`` (the default) a workload that ``tierflow honeybee update`` changed is read
    from its update state (:func:`current_state`): the permissions, users and documents every
    read must answer from; ``Workload.state`` names the state folder. The state must have been
    made from the workload's files as they are now (:func:`workload_fingerprint`), else an
    InputError says so — a workload edited after an update has no one current permission set.
    ``updates=False`` reads the folder's own files only.

    Raises :class:`InputError` naming the file, the field and the offending value for:
    a missing or unreadable file, a CSV without its header columns; vectors that are not a
    2-D float array, NaN/inf in vectors or queries, queries of another dimension; a doc id
    that is not an integer or not a row of vectors.npy, a doc without a role, an empty name,
    a duplicate pair; query ids not covering 0..Q-1 exactly once, an unknown user or role.
    """
    folder = Path(folder)
    state = current_state(folder) if updates and folder.is_dir() else None
    if state is None:
        return _read_folder(folder, updated=False)
    check_state_made_from(state, folder)
    # The state holds the workload's queries too (the fingerprint says they are the workload's).
    return replace(read_state(state), name=folder.name)


def read_state(state: str | os.PathLike[str]) -> Workload:
    """The tables an update state holds, checked as a workload folder's are, except that changes
    may have left documents with no role, roles that grant nothing and query users with no role."""
    return replace(_read_folder(Path(state), updated=True), state=str(Path(state).resolve()))


def _read_folder(folder: Path, *, updated: bool) -> Workload:
    """A workload folder's files, checked; ``updated`` for an update state, where changes may have
    left documents with no role (revoked or deleted: no one sees them), roles that grant nothing
    and query users who hold no role any more (they see nothing)."""
    kind = "an update state folder" if updated else "a workload folder"
    if not folder.is_dir():
        raise InputError(folder, "<folder>", str(folder), f"not a folder; {kind} holds {', '.join(FILES)}")
    path = {name: folder / name for name in FILES}
    for name in FILES:
        if not path[name].is_file():
            raise InputError(path[name], "<file>", str(path[name]), f"file not found; {kind} holds {', '.join(FILES)}")

    vectors = _read_matrix(path["vectors.npy"])
    queries = _read_matrix(path["queries.npy"], allow_empty=True)
    if queries.shape[1] != vectors.shape[1]:
        raise InputError(path["queries.npy"], "shape[1]", queries.shape[1],
                         f"queries have dimension {queries.shape[1]} but vectors.npy has {vectors.shape[1]}")
    n_docs, n_queries = len(vectors), len(queries)

    doc_roles = _read_table(path["doc_roles.csv"])
    doc_ids = _integers(path["doc_roles.csv"], doc_roles, "doc_id")
    outside = np.flatnonzero((doc_ids < 0) | (doc_ids >= n_docs))
    if len(outside):
        raise InputError(path["doc_roles.csv"], _at(doc_roles, outside[0], "doc_id"), int(doc_ids[outside[0]]),
                         f"vectors/ids mismatch: vectors.npy has {n_docs} rows, so doc ids run 0..{n_docs - 1}")
    _names(path["doc_roles.csv"], doc_roles, "role")
    doc_roles["doc_id"] = doc_ids
    _unique(path["doc_roles.csv"], doc_roles, ["doc_id", "role"])
    roleless = np.flatnonzero(np.bincount(doc_ids, minlength=n_docs) == 0)
    if len(roleless) and not updated:
        raise InputError(path["doc_roles.csv"], "doc_id", int(roleless[0]),
                         f"doc {roleless[0]} (a row of vectors.npy) has no role; every doc needs at least one "
                         f"({len(roleless)} docs have none)")

    user_roles = _read_table(path["user_roles.csv"])
    _names(path["user_roles.csv"], user_roles, "user")
    _names(path["user_roles.csv"], user_roles, "role")
    _unique(path["user_roles.csv"], user_roles, ["user", "role"])
    unknown = np.flatnonzero(~user_roles["role"].isin(doc_roles["role"].unique()).to_numpy())
    if len(unknown) and not updated:
        raise InputError(path["user_roles.csv"], _at(user_roles, unknown[0], "role"), user_roles["role"].iloc[unknown[0]],
                         "unknown role: not in doc_roles.csv, so it grants no document")

    query_users = _read_table(path["query_users.csv"])
    query_ids = _integers(path["query_users.csv"], query_users, "query_id")
    outside = np.flatnonzero((query_ids < 0) | (query_ids >= n_queries))
    if len(outside):
        raise InputError(path["query_users.csv"], _at(query_users, outside[0], "query_id"), int(query_ids[outside[0]]),
                         f"not a query: queries.npy has {n_queries} rows, so query ids run 0..{n_queries - 1}")
    query_users["query_id"] = query_ids
    _unique(path["query_users.csv"], query_users, ["query_id"])
    missing = np.flatnonzero(np.bincount(query_ids, minlength=n_queries) == 0)
    if len(missing):
        raise InputError(path["query_users.csv"], "query_id", int(missing[0]),
                         f"no user for query {missing[0]}: query ids must cover 0..{n_queries - 1} exactly once "
                         f"({len(missing)} missing)")
    _names(path["query_users.csv"], query_users, "user")
    unknown = np.flatnonzero(~query_users["user"].isin(user_roles["user"].unique()).to_numpy())
    if len(unknown) and not updated:
        raise InputError(path["query_users.csv"], _at(query_users, unknown[0], "user"), query_users["user"].iloc[unknown[0]],
                         "unknown user: not in user_roles.csv, so the user may see nothing")

    tables = {"doc_roles.csv": doc_roles, "user_roles.csv": user_roles, "query_users.csv": query_users}
    for name, table in tables.items():
        tables[name] = _meets_contract(path[name], table.reset_index(drop=True))
    users = np.empty(n_queries, dtype=object)
    users[query_ids] = query_users["user"].to_numpy(dtype=object)
    return Workload(vectors, tables["doc_roles.csv"], tables["user_roles.csv"], queries, users, name=folder.name)


def _read_matrix(path: Path, *, allow_empty: bool = False) -> np.ndarray:
    """A 2-D finite float32 array from a .npy file (other float dtypes are converted)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, "<file>", str(path), f"not a readable .npy array: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(path, "<file>", str(path), "expected one array saved with numpy.save, not an archive")
    if array.ndim != 2:
        raise InputError(path, "shape", array.shape, "expected a 2-D array (one row per vector)")
    if array.dtype.kind != "f":
        raise InputError(path, "dtype", str(array.dtype), "expected float vectors (float32)")
    if array.shape[1] == 0 or (array.shape[0] == 0 and not allow_empty):
        raise InputError(path, "shape", array.shape, "expected at least one row of at least one dimension")
    read = array
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, reported below
        array = np.ascontiguousarray(read, dtype=np.float32)
    for start in range(0, len(array), _CHUNK_ROWS):
        finite = np.isfinite(array[start:start + _CHUNK_ROWS])
        if not finite.all():
            row, column = (int(i) for i in np.argwhere(~finite)[0])
            value = float(read[start + row, column])
            problem = "must be finite (no NaN or inf)" if not np.isfinite(value) else "is beyond the float32 range (±3.4e38)"
            raise InputError(path, f"row {start + row}", value, f"every value {problem}; column {column} holds {value}")
    return array


def _read_table(path: Path) -> pd.DataFrame:
    """A headed CSV with the columns of :data:`COLUMNS` as text, indexed by file line; blank lines skipped."""
    expected = COLUMNS[path.name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # a row with extra fields
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, index_col=False,
                                skip_blank_lines=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, pd.errors.ParserWarning) as exc:
        raise InputError(path, "<file>", str(path), f"not a readable CSV: {exc}") from None
    absent = [c for c in expected if c not in frame.columns]
    if absent:
        raise InputError(path, "header", ",".join(map(str, frame.columns)),
                         f"missing column(s) {', '.join(absent)}; the first line must be {','.join(expected)}")
    frame = frame[expected]
    frame.index = frame.index + 2  # file line: 1 is the header
    blank = (frame == "").all(axis=1)
    return frame[~blank.to_numpy()].copy()


def _at(frame: pd.DataFrame, position: int, column: str) -> str:
    """The field name of a cell, with its file line: ``doc_id (line 7)``."""
    return f"{column} (line {frame.index[position]})"


def _integers(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    texts = frame[column].str.strip()
    bad = np.flatnonzero(~texts.str.fullmatch(r"[+-]?\d{1,18}").to_numpy(dtype=bool))
    if len(bad):
        raise InputError(path, _at(frame, bad[0], column), frame[column].iloc[bad[0]], "not an integer id")
    return texts.astype(np.int64).to_numpy()


def _names(path: Path, frame: pd.DataFrame, column: str) -> None:
    empty = np.flatnonzero((frame[column].str.strip() == "").to_numpy(dtype=bool))
    if len(empty):
        raise InputError(path, _at(frame, empty[0], column), frame[column].iloc[empty[0]], f"empty {column} name")


def _unique(path: Path, frame: pd.DataFrame, key: list[str]) -> None:
    repeated = np.flatnonzero(frame.duplicated(key).to_numpy())
    if len(repeated):
        row = frame.iloc[repeated[0]]
        first = frame.index[(frame[key] == row[key]).all(axis=1).to_numpy()][0]
        what = f"({', '.join(key)})" if len(key) > 1 else key[0]
        raise InputError(path, f"{','.join(key)} (line {frame.index[repeated[0]]})", ",".join(str(row[k]) for k in key),
                         f"duplicate {what}: already on line {first}; each must appear once")


def _meets_contract(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The table's data contract, as a second line of defence after the checks above."""
    from data_contracts import ContractError, validate

    try:
        return validate(frame, CONTRACTS[path.name], path)
    except ContractError as exc:
        raise InputError(path, exc.product, exc.failures[0], "breaks the data contract: " + "; ".join(exc.failures)) from None


# --------------------------------------------------------------------------- the update state beside a workload
#
# ``tierflow honeybee update`` never writes a workload folder: it keeps the changed tables (and
# the live partitions) in an update state, a folder in the workload format plus ``state.json``
# (:mod:`tasks.honeybee.update`). Every read of the workload answers from it (:func:`load_workload`).

STATE_SUFFIX = ".honeybee-state"
STATE_META = "state.json"


def state_link(folder: str | os.PathLike[str]) -> Path:
    """Where a workload's update state is found: ``<workload>.honeybee-state`` beside the folder,
    the state itself or a link to a state kept elsewhere (``update --state``)."""
    folder = Path(folder).resolve()
    return folder.with_name(folder.name + STATE_SUFFIX)


def current_state(folder: str | os.PathLike[str]) -> Path | None:
    """The update state folder a workload's reads answer from, or None when it was never updated.

    A link to a state that is gone is an InputError, not a fall-back to the workload's own
    (older) permissions.
    """
    link = state_link(folder)
    if link.is_symlink() and not link.exists():
        raise InputError(link, "<link>", os.readlink(link),
                         "the workload's update state is missing (the link points nowhere): restore that folder, "
                         "or remove the link to answer from the workload's own permissions")
    return link.resolve() if link.exists() else None


def workload_fingerprint(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over the workload's files (:data:`FILES`): which workload an update state was made from."""
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(name.encode() + b"\0")
        with open(Path(folder) / name, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_state_meta(state: str | os.PathLike[str]) -> dict:
    """An update state's ``state.json``; InputError for a folder that is not a state."""
    path = Path(state) / STATE_META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "<file>", str(path), "missing: not a HoneyBee update state folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, "<file>", str(path), f"unreadable HoneyBee update state: {exc}") from None
    if not isinstance(meta, dict):
        raise InputError(path, "<file>", str(path), "unreadable HoneyBee update state: expected a JSON object")
    return meta


def check_state_made_from(state: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
    """Raise InputError unless ``state`` was made from the workload files in ``folder`` as they are now.

    A state written before states recorded their workload carries no fingerprint and is
    trusted: its revocations still apply.
    """
    recorded = read_state_meta(state).get("workload_fingerprint")
    if recorded is not None and recorded != workload_fingerprint(folder):
        raise InputError(Path(state) / STATE_META, "workload_fingerprint", recorded[:12],
                         f"this update state was made from another version of {folder} (its files changed since): "
                         f"move the state aside and re-apply the changes to the new workload")


# --------------------------------------------------------------------------- statistics


def describe(workload: Workload) -> dict:
    """Sizes and selectivities of ``workload``, JSON-able.

    ``per_role_storage`` is Σ_role |docs(role)| / N (an index per role); ``per_user_storage``
    is Σ over distinct user role sets of |permitted docs| / N (an index per user class).
    Selectivity is the fraction of docs a user may see; ``query_selectivity_p50`` weighs
    users by how many queries they ask.
    """
    from tasks.honeybee.rbac import Rbac

    rbac = Rbac.of(workload)
    n_docs = rbac.n_docs
    classes = rbac.user_classes()
    class_counts = rbac.permitted_counts(list(classes))
    count_of_user = {user: int(count) for users, count in zip(classes.values(), class_counts) for user in users}
    user_selectivity = np.array([count_of_user[u] for u in rbac.users], dtype=np.float64) / n_docs
    query_selectivity = np.array([count_of_user[u] for u in workload.query_users], dtype=np.float64) / n_docs
    role_sizes = workload.doc_roles["role"].value_counts().to_numpy()
    return {
        "name": workload.name,
        "state": workload.state,
        "n_docs": n_docs,
        "dim": int(workload.vectors.shape[1]),
        "n_roles": len(rbac.roles),
        "n_users": len(rbac.users),
        "n_queries": int(len(workload.queries)),
        "n_role_signatures": len(rbac.blocks()),
        "n_user_classes": len(classes),
        "roles_per_doc_mean": len(workload.doc_roles) / n_docs,
        "role_size_min": int(role_sizes.min()),
        "role_size_median": float(np.median(role_sizes)),
        "role_size_max": int(role_sizes.max()),
        "per_role_storage": float(role_sizes.sum()) / n_docs,
        "per_user_storage": float(class_counts.sum()) / n_docs,
        "user_selectivity_min": float(user_selectivity.min()),
        "user_selectivity_p50": float(np.median(user_selectivity)),
        "user_selectivity_max": float(user_selectivity.max()),
        "query_selectivity_p50": float(np.median(query_selectivity)) if len(query_selectivity) else None,
    }
