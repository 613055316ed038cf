"""The LMaaS benchmark runs its smoke size and records every strategy on the same trace, the cold
start and COGS (simulated GPU figures marked as simulated)."""

import json

import pytest

from benchmarks.lmaas import SIMULATED_GPUS, main


@pytest.mark.slow  # ~25 s: loads three engines; the strategies themselves are tested in test_strategies
def test_quick_benchmark_measures_every_strategy_cold_start_and_cogs(tmp_path):
    main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "lmaas.json").read_text())
    row = saved["strategies"]["10"]
    for name in ("multi_lora", "merged_sequential", "unbatched", "multi_lora_int4"):
        assert row[name]["requests"] == 8 and row[name]["tokens_per_s"] > 0
        assert row[name]["completion_tokens"] == row["multi_lora"]["completion_tokens"]  # the same trace
    assert row["merged_sequential"]["swaps"] >= 1
    assert saved["cold_start"]["cold_start_total_s"] >= saved["cold_start"]["base_model_load_s"] > 0
    assert set(saved["cogs"]["simulated"]) == set(SIMULATED_GPUS) and "roofline" in saved["simulated"][0]
    assert all(v > 0 for v in saved["cogs"]["measured"].values())
    assert (tmp_path / "lmaas.png").stat().st_size > 0
