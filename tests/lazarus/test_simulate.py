"""The at-scale simulator of Lazarus and its baselines (tasks.lazarus.simulate): what it must model."""

from __future__ import annotations

import numpy as np
import pytest

from optimizers.lazarus import plan_strategy
from tasks.lazarus.simulate import (
    SIMULATED,
    SLOTS,
    STRATEGIES,
    Cluster,
    Scenario,
    checkpoint_bytes,
    periodic_failures,
    plot_simulated,
    replan_seconds,
    simulate,
    simulate_all,
    spot_trace_scenario,
    step_time,
    zipf_loads,
)
from tasks.moe.model import CONFIGS

MODELS = ("gpt-s", "gpt-m", "gpt-l")


def _step(model: str, strategy: str, loads, n_nodes: int = 10, device: str = "rtx3090"):
    plan = plan_strategy(strategy, loads, n_nodes, SLOTS, 2)
    return step_time(model, plan.placement, loads, Cluster(device))


def test_zipf_loads_give_the_two_hottest_experts_the_asked_share():
    loads = zipf_loads(16, 0.87)
    assert loads.sum() == pytest.approx(1.0)
    assert loads[:2].sum() == pytest.approx(0.87)
    assert np.all(np.diff(loads) <= 0)


def test_step_time_grows_with_model_size_and_falls_with_faster_devices():
    times = [_step(m, "lazarus", np.ones(CONFIGS[m].n_expert)).total_s for m in MODELS]
    assert times[0] < times[1] < times[2]
    loads = zipf_loads(12)
    by_device = [_step("gpt-m", "lazarus", loads, device=d).total_s for d in ("t4", "rtx3090", "a100", "h100")]
    assert by_device == sorted(by_device, reverse=True) and by_device[0] > by_device[-1]


@pytest.mark.parametrize("model", MODELS)
def test_load_aware_replicas_train_faster_than_uniform_replicas_under_skewed_loads(model):
    loads = zipf_loads(CONFIGS[model].n_expert, 0.87)
    lazarus, uniform = _step(model, "lazarus", loads), _step(model, "reconfig_uniform", loads)
    assert lazarus.expert_compute_s < uniform.expert_compute_s
    assert lazarus.tokens_per_s > uniform.tokens_per_s


def test_deepspeed_runs_gpt_l_on_8_of_10_nodes_as_in_the_paper():
    loads = zipf_loads(16)
    assert _step("gpt-l", "reconfig_uniform", loads).nodes == 8
    assert _step("gpt-l", "lazarus", loads).nodes == 10


def test_without_failures_checkpoint_restart_and_lazarus_differ_only_by_checkpoint_overhead():
    quiet = Scenario("quiet", 10, 1800.0, tuple(range(10)), (),
                     checkpoint_every={"lazarus": 250, "checkpoint_restart": 50})
    write_s = checkpoint_bytes("gpt-m") / Cluster().storage_bytes_per_s
    loads = zipf_loads(12)
    achieved = {}
    for name in ("lazarus", "checkpoint_restart"):
        run = simulate("gpt-m", name, quiet, loads=loads)
        assert run.restarts == run.reconfigurations == 0
        lost = {k: v for k, v in run.time_lost_s.items() if v > 1e-9}
        assert set(lost) <= {"checkpoint_write", "rebalance", "step_in_flight"}
        assert lost["checkpoint_write"] == pytest.approx(run.checkpoints * write_s)
        assert lost.get("step_in_flight", 0) < run.initial_step_s
        training_s = run.horizon_s - sum(lost.values())
        assert run.steps * run.initial_step_s == pytest.approx(training_s, rel=1e-6)
        achieved[name] = run.throughput_tokens_per_s
    step_ratio = (_step("gpt-m", "lazarus", loads).tokens_per_s
                  / _step("gpt-m", "reconfig_uniform", loads).tokens_per_s)
    ds = simulate("gpt-m", "checkpoint_restart", quiet, loads=loads)
    laz = simulate("gpt-m", "lazarus", quiet, loads=loads)
    share = {r.strategy: (r.horizon_s - sum(r.time_lost_s.values())) / r.horizon_s for r in (laz, ds)}
    expected = step_ratio * share["lazarus"] / share["checkpoint_restart"]
    assert achieved["lazarus"] / achieved["checkpoint_restart"] == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("model", MODELS)
def test_more_frequent_failures_cost_checkpoint_restart_more_than_lazarus(model):
    rare = periodic_failures(10, 40, 60, name="fail-40min")
    frequent = periodic_failures(10, 5, 60, name="fail-5min")
    drop = {}
    for name in ("lazarus", "checkpoint_restart"):
        rare_tp = simulate(model, name, rare).throughput_tokens_per_s
        drop[name] = 1 - simulate(model, name, frequent).throughput_tokens_per_s / rare_tp
    assert drop["checkpoint_restart"] > drop["lazarus"]


def test_lazarus_restores_a_checkpoint_only_when_every_replica_of_an_expert_is_lost():
    loads = zipf_loads(8)
    plan = plan_strategy("lazarus", loads, 10, SLOTS, 2)
    smallest = min(plan.placement.holders, key=len)
    others = [n for n in range(10) if n not in smallest][:len(smallest)]
    for failed, restarts in ((tuple(smallest), 1), (tuple(others), 0)):
        scn = Scenario("one-burst", 10, 1200.0, tuple(range(10)), ((300.0, failed),),
                       checkpoint_every={"lazarus": 250})
        run = simulate("gpt-s", "lazarus", scn, loads=loads)
        assert run.restarts == restarts
        assert run.reconfigurations == 1 - restarts


def test_spot_trace_scales_the_paper_segment_to_n_nodes():
    small, large = spot_trace_scenario(10), spot_trace_scenario(100)
    assert len(small.initial) == 10 and len(large.initial) == 100
    assert len(small.failures) == len(large.failures)
    assert sum(len(n) for _, n in large.failures) == 10 * sum(len(n) for _, n in small.failures)


def test_every_result_carries_a_non_empty_simulated_list():
    results = simulate_all(models=("gpt-s",), node_counts=(10,))
    assert results["simulated"] == SIMULATED and results["simulated"]
    assert len(results["runs"]) == 3 * len(STRATEGIES)
    for run in results["runs"]:
        assert run["simulated"], run
        assert run["throughput_tokens_per_s"] > 0
    assert results["constants"]["mfu"] > 0


def test_replan_at_1000_nodes_is_measured_and_reported():
    assert replan_seconds(1000, repeats=1) > 0
    results = simulate_all(models=("gpt-s",), node_counts=(10,), scenarios=("fail-5min",))
    assert results["replan_seconds_1000_nodes"] > 0
    assert "re-plan time" in results["measured"][0]


def test_the_at_scale_grid_runs_and_plots(tmp_path):
    results = simulate_all(models=("gpt-l",), node_counts=(1000,))
    lazarus = [r for r in results["runs"] if r["strategy"] == "lazarus"]
    assert {r["scenario"] for r in lazarus} == {"fail-5min", "fail-40min", "spot-trace"}
    for run in lazarus:
        assert run["n_nodes"] == 1000 and run["useful_tokens"] > 0
        assert run["ratio_vs_checkpoint_restart"] > 1
    path = plot_simulated(results, tmp_path / "simulated.png")
    assert path.exists() and path.stat().st_size > 0
