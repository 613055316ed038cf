"""The LMaaS benchmark runs its smoke size and records every strategy on the same trace at each
rate, the simulator's check against those replays, the cold start and COGS (GPU figures simulated
and marked so)."""

import json

import pytest

from benchmarks.lmaas import SIMULATED_GPUS, main
from tasks.lmaas.strategies import STRATEGIES


@pytest.mark.slow  # ~40 s: loads three engines; the strategies themselves are tested in test_strategies
def test_quick_benchmark_measures_every_strategy_checks_the_simulator_and_prices_cogs(tmp_path):
    main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "lmaas.json").read_text())
    for rate in ("6", "30"):
        row = saved["strategies"]["10"][rate]
        for name in ("multi_lora", "merged_sequential", "unbatched", "multi_lora_int4"):
            assert row[name]["requests"] == 8 and row[name]["tokens_per_s"] > 0
            assert row[name]["completion_tokens"] == row["multi_lora"]["completion_tokens"]  # the same trace
        assert row["merged_sequential"]["swaps"] >= 1
    checks = saved["simulator_check"]["checks"]
    assert {(c["rate"], c["strategy"]) for c in checks} == {(r, s) for r in (6.0, 30.0) for s in STRATEGIES}
    assert all(c["simulated_tokens_per_s"] > 0 for c in checks)
    assert saved["cold_start"]["cold_start_total_s"] >= saved["cold_start"]["base_model_load_s"] > 0
    assert all(v > 0 for v in saved["cogs_this_host"]["usd_per_million_tokens"]["10"].values())
    gpus = saved["cogs_gpu_simulated"]["10"]
    assert set(gpus) == set(SIMULATED_GPUS)
    assert "virtual time" in saved["simulated"][0] and "catalog" in saved["simulated"][0]
    assert all(gpus[d][mode][s]["usd_per_million_tokens"] > 0 for d in gpus for mode in ("eager", "device_only")
               for s in STRATEGIES)
    assert saved["gpu_model"]["host_side_measured_here"]["base_s"] > 0
    assert (tmp_path / "lmaas.png").stat().st_size > 0
