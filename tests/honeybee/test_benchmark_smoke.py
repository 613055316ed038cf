"""The HoneyBee benchmark runs on the tiny workload and records what it measured."""

import json

from benchmarks.honeybee import run
from optimizers.honeybee import STRATEGIES


def test_quick_benchmark_measures_every_strategy_the_budget_sweep_and_the_selectivity_buckets(tmp_path):
    results = run("tiny", [1.2], tmp_path)
    saved = json.loads((tmp_path / "honeybee.json").read_text())
    assert set(saved["strategies"]) | set(saved["not_built"]) == set(STRATEGIES)
    assert saved["headline"]["forbidden_results"] == 0
    assert saved["headline"]["honeybee_qps_vs_rls"] > 0
    for figures in saved["strategies"].values():
        assert figures["recall"] >= 0.95 and figures["storage"] >= 1.0
    assert saved["budget_sweep"]["1.2"]["storage"] <= 1.2 + 1e-9
    assert sum(b["queries"] for b in saved["selectivity_buckets"]) == saved["workload"]["n_queries"]
    assert (tmp_path / "latency_vs_storage.png").stat().st_size > 0
    assert (tmp_path / "speedup_by_selectivity.png").stat().st_size > 0
    assert results["headline"] == saved["headline"]


def test_the_size_sweep_measures_every_strategy_at_every_size(tmp_path):
    from benchmarks.honeybee import sweep

    results = sweep("tiny", [1500, 3000], tmp_path)
    saved = json.loads((tmp_path / "honeybee_sweep_tiny.json").read_text())
    assert [pt["n_docs"] for pt in saved["points"]] == [1500, 3000]
    for point in saved["points"]:
        assert set(point["strategies"]) | set(point["not_built"]) == set(STRATEGIES)
        assert point["all_meet_target"] and point["honeybee_qps_vs"]["rls"] > 0
    assert (tmp_path / "crossover_by_size_tiny.png").stat().st_size > 0
    assert results["crossover"] == saved["crossover"]


def test_the_crossover_is_the_size_from_which_a_claim_holds_at_every_larger_size():
    from benchmarks.honeybee import _crossover

    def point(n, vs_rls, vs_prefilter, vs_per_role):
        return {"n_docs": n, "honeybee_qps_vs": {"rls": vs_rls, "rls_prefilter": vs_prefilter},
                "honeybee_latency_vs_per_role": vs_per_role}

    points = [point(5_000, 3.0, 1.2, 1.1), point(20_000, 6.5, 0.9, 1.3), point(50_000, 8.0, 1.4, 1.6),
              point(100_000, 12.0, 2.0, 1.4)]
    assert _crossover(points) == {"qps_ge_6x_rls": 20_000, "qps_above_rls_prefilter": 50_000,
                                  "latency_within_1.5x_per_role": 100_000}
    assert _crossover(points[:3])["latency_within_1.5x_per_role"] is None
