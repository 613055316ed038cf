"""One way to solve a MILP: cvxpy + HiGHS, quiet, time-limited, with named constraint families.

Every optimizer states its constraints as *families* — a name a user understands
("throughput of SpeechRecognition", "one operator per worker") mapped to the cvxpy
constraints that express it. When a model is infeasible, :func:`solve_milp` finds an
irreducible set of families that conflict (a deletion filter over families, each test
a feasibility solve) and reports them by name instead of a bare status.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import cvxpy as cp
import numpy as np

DEFAULT_TIME_LIMIT_S = 60.0
DEFAULT_MIP_GAP = 1e-6
PROBE_TIME_LIMIT_S = 10.0  # each feasibility probe of the infeasibility diagnosis

# cvxpy logs its banner and compilation warnings through this logger.
logging.getLogger("__cvxpy__").setLevel(logging.ERROR)


@dataclass
class Family:
    """A constraint family: the constraints and what they mean, in a user's words."""

    constraints: list[cp.Constraint]
    meaning: str = ""


class InfeasibleError(ValueError):
    """The model has no solution; ``conflicting`` names the families that clash."""

    def __init__(self, what: str, conflicting: dict[str, str]):
        self.what, self.conflicting = what, conflicting
        lines = [f"  - {name}: {meaning}" if meaning else f"  - {name}" for name, meaning in conflicting.items()]
        super().__init__(f"{what} is infeasible; these constraints cannot all hold:\n" + "\n".join(lines))

    def __reduce__(self):  # survive pickling between Dask workers
        return (type(self), (self.what, self.conflicting))


class SolverError(RuntimeError):
    """The solver failed (numerical trouble, or no solution within the time limit)."""


@dataclass
class Solution:
    """What a solve produced: objective value, status, time and whether it is proven optimal."""

    objective: float
    status: str
    seconds: float
    optimal: bool
    gap: float | None = None
    stats: dict = field(default_factory=dict)


_banner_shown = False
_banner_lock = threading.Lock()


@contextmanager
def _quiet_first_highs() -> Iterator[None]:
    """HiGHS prints its banner from C to stdout once per process; send that one to /dev/null.

    The first solve holds a lock while fd 1 is redirected, so a concurrent solve (two
    Prefect tasks on one Dask worker) neither sees nor restores the redirected stdout.
    """
    global _banner_shown
    if _banner_shown:
        yield
        return
    with _banner_lock:
        if _banner_shown:
            yield
            return
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
                yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            _banner_shown = True


def _solve(problem: cp.Problem, time_limit: float, mip_gap: float) -> None:
    # At the time limit cvxpy warns "Solution may be inaccurate"; Solution.optimal and .gap say it instead.
    with _quiet_first_highs(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        problem.solve(
            solver=cp.HIGHS, verbose=False, output_flag=False, log_to_console=False,
            time_limit=float(time_limit), mip_rel_gap=mip_gap,
        )


def _feasible(families: dict[str, Family], names: list[str], time_limit: float) -> bool:
    constraints = [c for name in names for c in families[name].constraints]
    probe = cp.Problem(cp.Minimize(0), constraints)
    _solve(probe, time_limit, 1.0)
    return probe.status not in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE)


def conflicting_families(families: dict[str, Family], time_limit: float = DEFAULT_TIME_LIMIT_S) -> dict[str, str]:
    """An irreducible infeasible subset of ``families`` (deletion filter), by name → meaning.

    Drops each family in turn; if the rest is still infeasible the family is not needed
    to explain the conflict and stays dropped. What remains conflicts, and removing any
    one of its members makes the model feasible.
    """
    keep = list(families)
    for name in list(families):
        trial = [n for n in keep if n != name]
        if trial and not _feasible(families, trial, time_limit):
            keep = trial
    return {name: families[name].meaning for name in keep}


def solve_milp(
    objective: cp.Minimize | cp.Maximize,
    families: dict[str, Family],
    *,
    what: str = "the model",
    time_limit: float = DEFAULT_TIME_LIMIT_S,
    mip_gap: float = DEFAULT_MIP_GAP,
) -> Solution:
    """Solve a (mixed-integer) linear program with HiGHS.

    Parameters
    ----------
    objective: the cvxpy objective.
    families: constraint families by name (see :class:`Family`).
    what: how errors refer to the model ("the JellyBean plan").
    time_limit: seconds HiGHS may spend; the best solution found by then is returned
        with ``optimal=False``.
    mip_gap: relative optimality gap at which HiGHS stops.

    Raises :class:`InfeasibleError` naming the conflicting families when no solution
    exists, and :class:`SolverError` when HiGHS fails or finds nothing in time.
    """
    constraints = [c for fam in families.values() for c in fam.constraints]
    problem = cp.Problem(objective, constraints)
    start = time.perf_counter()
    try:
        _solve(problem, time_limit, mip_gap)
    except cp.error.SolverError as exc:
        raise SolverError(f"HiGHS failed on {what}: {exc}") from exc
    seconds = time.perf_counter() - start
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise InfeasibleError(what, conflicting_families(families, min(time_limit, PROBE_TIME_LIMIT_S)))
    if problem.status in (cp.UNBOUNDED, cp.UNBOUNDED_INACCURATE):
        raise SolverError(f"{what} is unbounded: a constraint family is missing")
    if (
        problem.value is None
        or problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE, cp.USER_LIMIT)
        or (problem.status != cp.OPTIMAL and not _satisfies(constraints))
    ):
        raise SolverError(f"HiGHS found no solution for {what} within {time_limit:.0f} s (status {problem.status})")
    stats = problem.solver_stats
    gap = _mip_gap(stats)
    return Solution(
        objective=float(problem.value),
        status=problem.status,
        seconds=seconds,
        optimal=problem.status == cp.OPTIMAL,
        gap=gap,
        stats={"solve_time": getattr(stats, "solve_time", None), "num_iters": getattr(stats, "num_iters", None)},
    )


def _satisfies(constraints: list[cp.Constraint], tol: float = 1e-6) -> bool:
    """Whether the values left in the variables meet every constraint (a stopped solve may leave junk)."""
    for constraint in constraints:
        try:
            violation = float(np.max(np.atleast_1d(constraint.violation())))
            scale = max(1.0, float(np.max(np.abs(np.atleast_1d(constraint.args[0].value)))))
        except (ValueError, TypeError):
            return False
        if violation > tol * scale:
            return False
    return True


def _mip_gap(stats) -> float | None:
    """HiGHS's relative MIP gap at the end of the solve (0 when proven optimal), if it reports one."""
    extra = getattr(stats, "extra_stats", None)
    for source in (extra, getattr(extra, "info", None)):
        value = getattr(source, "mip_gap", None)
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None
