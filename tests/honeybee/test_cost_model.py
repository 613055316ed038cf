"""The search cost and recall models: fitted from a measured grid, inverted for the recall floor."""

import math

import numpy as np
import pandas as pd
import pytest

from optimizers.honeybee_cost import MEASUREMENT_COLUMNS, SearchCostModel, fit_cost_model


def synthetic_grid(noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Measurements drawn from known models: logit r = -2 + 1.0 ln ef + 0.9 ln s - 0.1 ln n."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (1_000, 4_000, 16_000, 64_000):
        for s in (1.0, 0.3, 0.1, 0.03, 0.01):
            for ef in (16, 32, 64, 128, 256, 512, 1024, 2048):
                logit = -2 + 1.0 * math.log(ef) + 0.9 * math.log(s) - 0.1 * math.log(n)
                recall = 1 / (1 + math.exp(-logit))
                latency = math.exp(-11 + 0.6 * math.log(ef) + 0.03 * math.log(ef) ** 2 + 0.1 * math.log(n))
                rows.append(("hnsw", n, s, ef, 10, min(recall, 0.99), latency * math.exp(noise * rng.normal())))
            rows.append(("flat", n, s, 0, 10, 1.0, 2e-5 + 3e-8 * n + 1e-8 * n * s))
    return pd.DataFrame(rows, columns=MEASUREMENT_COLUMNS)


def test_fit_recovers_the_models_that_generated_the_measurements():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.95)
    assert model.fit["hnsw_latency_r2_log"] > 0.999
    assert model.fit["flat_latency_r2"] > 0.999
    assert model.latency("flat", 10_000, 0.5, 0) == pytest.approx(2e-5 + 3e-4 + 5e-5, rel=1e-3)
    assert model.hnsw_latency[1] == pytest.approx(0.6, abs=0.05)


def test_effort_for_the_floor_grows_as_selectivity_falls_and_meets_the_floor():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.9)
    efforts = [model.hnsw_effort(16_000, s) for s in (1.0, 0.3, 0.1)]
    assert efforts == sorted(efforts) and efforts[0] < efforts[-1]
    for s, ef in zip((1.0, 0.3, 0.1), efforts):
        assert model.recall("hnsw", 16_000, s, ef) >= 0.9 - 1e-9


def test_an_unreachable_floor_is_none_and_infinite_cost():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.95)
    assert model.hnsw_effort(64_000, 1e-5) is None
    assert np.isinf(model.search_cost(64_000, np.array([1e-5]))).all() or model.partition_kind(64_000) == "flat"


def test_vectorised_cost_agrees_with_the_scalar_choice():
    model = fit_cost_model(synthetic_grid(noise=0.1), recall_floor=0.9)
    for n in (500, 5_000, 50_000):
        sel = np.array([1.0, 0.2, 0.05])
        vector = model.search_cost(n, sel)
        for s, cost in zip(sel, vector):
            choice = model.choose(model.partition_kind(n), n, float(s))
            assert (choice is None and np.isinf(cost)) or cost == pytest.approx(choice.latency_s)


def test_model_round_trips_through_a_dict():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.95)
    assert SearchCostModel.from_dict(model.to_dict()) == model


def test_fitting_refuses_bad_tables():
    with pytest.raises(ValueError, match="recall_floor"):
        fit_cost_model(synthetic_grid(), recall_floor=1.0)
    with pytest.raises(ValueError, match="columns"):
        fit_cost_model(synthetic_grid().drop(columns=["recall"]), recall_floor=0.9)
