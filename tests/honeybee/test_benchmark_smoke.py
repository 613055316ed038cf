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
