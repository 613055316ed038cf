"""The shared MILP helper: optimal answers, and infeasibility explained by constraint family."""

import cvxpy as cp
import pytest

from optimizers.solve import Family, InfeasibleError, solve_milp


def test_solves_a_small_knapsack_to_its_known_optimum():
    take = cp.Variable(4, boolean=True)
    value, weight = [10, 13, 7, 8], [5, 6, 3, 4]
    solution = solve_milp(
        cp.Maximize(value @ take),
        {"capacity": Family([weight @ take <= 10], "total weight at most 10")},
    )
    assert solution.optimal
    assert solution.objective == pytest.approx(21)  # items 1 and 3 (13 + 8), weight 10


def test_infeasible_model_names_only_the_conflicting_families():
    x = cp.Variable(3, integer=True)
    families = {
        "bounds": Family([x >= 0, x <= 5], "each x between 0 and 5"),
        "demand": Family([cp.sum(x) >= 20], "total at least 20"),
        "unrelated": Family([x[0] == 1], "x0 is one"),
    }
    with pytest.raises(InfeasibleError) as err:
        solve_milp(cp.Minimize(cp.sum(x)), families, what="the toy plan")
    assert set(err.value.conflicting) == {"bounds", "demand"}
    assert "the toy plan is infeasible" in str(err.value)
    assert "total at least 20" in str(err.value)
