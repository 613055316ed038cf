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
                latency = math.exp(-13 + 0.6 * math.log(ef) + 0.03 * math.log(ef) ** 2 + 0.1 * math.log(n))
                rows.append(("hnsw", n, s, ef, 10, min(recall, 0.99), latency * math.exp(noise * rng.normal())))
            m = n * s  # a subset scan reads only the permitted rows; dearer per row once they leave the cache
            scan = 2e-5 + 1e-8 * n if s == 1.0 else 2e-5 + 2e-8 * m + 4e-8 * max(0.0, m - 4_000)
            rows.append(("flat", n, s, 0, 10, 1.0, scan))
    return pd.DataFrame(rows, columns=MEASUREMENT_COLUMNS)


def test_fit_recovers_the_models_that_generated_the_measurements():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.95)
    assert model.fit["hnsw_latency_r2_log"] > 0.999
    assert model.fit["flat_latency_r2"] > 0.999
    assert model.latency("flat", 10_000, 0.5, 0) == pytest.approx(2e-5 + 2e-8 * 5_000 + 4e-8 * 1_000, rel=1e-3)
    assert model.latency("flat", 10_000, 1.0, 0) == pytest.approx(2e-5 + 1e-8 * 10_000, rel=1e-3)
    assert model.flat_latency[4] == 4_000
    assert model.hnsw_latency[1] == pytest.approx(0.6, abs=0.05)


def test_effort_for_the_floor_grows_as_selectivity_falls_and_meets_the_floor():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.9)
    efforts = [model.hnsw_effort(16_000, s) for s in (1.0, 0.3, 0.1)]
    assert efforts == sorted(efforts) and efforts[0] < efforts[-1]
    for s, ef in zip((1.0, 0.3, 0.1), efforts):
        assert model.recall("hnsw", 16_000, s, ef) >= 0.9 - 1e-9


def test_an_unreachable_floor_leaves_only_the_exact_scan():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.95)
    assert model.hnsw_effort(64_000, 1e-5) is None
    assert model.choose("hnsw", 64_000, 1e-5, allow_exact=False) is None
    scan = model.choose("hnsw", 64_000, 1e-5)
    assert scan.exact and scan.recall == 1.0
    assert model.search_cost(64_000, np.array([1e-5]))[0] == pytest.approx(scan.latency_s)


def test_a_user_who_may_see_little_of_a_big_partition_is_scanned_not_walked():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.9)
    assert model.partition_kind(64_000) == "hnsw"
    assert not model.choose("hnsw", 64_000, 1.0).exact
    assert model.choose("hnsw", 64_000, 0.001).exact


def test_vectorised_cost_agrees_with_the_scalar_choice():
    model = fit_cost_model(synthetic_grid(noise=0.1), recall_floor=0.9)
    for n in (500, 5_000, 50_000):
        sel = np.array([1.0, 0.2, 0.05])
        vector = model.search_cost(n, sel)
        for s, cost in zip(sel, vector):
            choice = model.choose(model.partition_kind(n), n, float(s))  # graph or scan, whichever is cheaper
            assert (choice is None and np.isinf(cost)) or cost == pytest.approx(choice.latency_s)


def test_model_round_trips_through_a_dict():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.95)
    assert SearchCostModel.from_dict(model.to_dict()) == model


def test_fitting_refuses_bad_tables():
    with pytest.raises(ValueError, match="recall_floor"):
        fit_cost_model(synthetic_grid(), recall_floor=1.0)
    with pytest.raises(ValueError, match="columns"):
        fit_cost_model(synthetic_grid().drop(columns=["recall"]), recall_floor=0.9)


def with_ivf_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Add IVF measurements from known models: logit r = 3 + 1.2 ln(nprobe/nlist) + 0.3 ln s, linear latency."""
    from optimizers.honeybee_cost import ivf_cells

    rows = []
    for n in (1_000, 4_000, 16_000, 64_000):
        nlist = ivf_cells(n)
        for s in (1.0, 0.3, 0.1, 0.03):
            for nprobe in sorted({min(p, nlist) for p in (1, 2, 4, 8, 16, 32, 64)}):
                recall = 1.0 if nprobe >= nlist else 1 / (1 + math.exp(-(3 + 1.2 * math.log(nprobe / nlist) + 0.3 * math.log(s))))
                probed = nprobe * n / nlist
                latency = 2e-5 + 1e-8 * nlist + 1e-8 * probed + 2e-8 * probed * s
                rows.append(("ivf", n, s, nprobe, 10, min(recall, 0.99), latency))
    return pd.concat([frame, pd.DataFrame(rows, columns=MEASUREMENT_COLUMNS)], ignore_index=True)


def test_ivf_models_are_fitted_when_measured_and_nprobe_meets_the_floor():
    model = fit_cost_model(with_ivf_rows(synthetic_grid()), recall_floor=0.9)
    assert model.ivf_recall is not None and model.fit["ivf_latency_r2"] > 0.999
    assert model.ivf_latency == pytest.approx((2e-5, 1e-8, 1e-8, 2e-8), rel=1e-3)
    assert model.ivf_recall[1] == pytest.approx(1.2, abs=0.1)
    for s in (1.0, 0.1):
        choice = model.choose("ivf", 16_000, s)
        assert choice.kind == "ivf" and not choice.exact and choice.recall >= 0.9 - 1e-9
    assert model.choose("ivf", 16_000, 0.1).effort >= model.choose("ivf", 16_000, 1.0).effort
    cost = model.search_cost(16_000, np.array([1.0, 0.1]))
    kind = model.partition_kind(16_000)
    for s, c in zip((1.0, 0.1), cost):
        assert c == pytest.approx(model.choose(kind, 16_000, s).latency_s, rel=1e-6) or kind == "hnsw"
    assert SearchCostModel.from_dict(model.to_dict()) == model


def test_a_model_without_ivf_measurements_never_picks_ivf():
    model = fit_cost_model(synthetic_grid(), recall_floor=0.9)
    assert model.ivf_recall is None
    assert all(model.partition_kind(n) in ("hnsw", "flat") for n in (100, 10_000, 1_000_000))
