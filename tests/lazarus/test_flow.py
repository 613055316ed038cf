"""Lazarus end to end on a tiered cluster: one training node per Dask worker, nodes SIGKILLed mid-run.

Both runs share one cluster (as `tierflow run lazarus --scheduler ADDR` would): its Nannies start a
killed node's worker again, and it never re-runs a task whose worker died.
"""

import json

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def training_cluster(prefect_api):
    from flows.lazarus import DEFAULT_INFRA
    from infra.cluster import TieredCluster
    from infra.spec import load_infra_spec

    # the workers copy PREFECT_API_URL when they start, so the Prefect server is up first
    with TieredCluster(load_infra_spec(DEFAULT_INFRA), rerun_lost_tasks=False) as cluster:
        yield cluster.address


@pytest.fixture(scope="module")
def tiny_run(training_cluster, tmp_path_factory):
    from flows.lazarus.flow import lazarus

    tmp = tmp_path_factory.mktemp("lazarus")
    summary = lazarus(scale="tiny", strategies=["lazarus", "checkpoint_restart"], scheduler=training_cluster,
                      results_dir=str(tmp), run_id="test")
    return summary, tmp / "lazarus" / "test"


def test_run_writes_plan_evaluation_report_and_plot(tiny_run):
    summary, out = tiny_run
    for name in ("plan.json", "evaluation.json", "report.md", "lazarus.png", "strategies.csv"):
        assert (out / name).is_file(), name
    plans = json.loads((out / "plan.json").read_text())
    assert set(plans) == {"lazarus", "reconfig_uniform", "spread", "compact"}
    assert summary["simulated"], "a result must say what was simulated"


def test_nodes_die_and_every_strategy_still_trains_every_step(tiny_run):
    summary, out = tiny_run
    table = pd.read_csv(out / "strategies.csv").set_index("strategy")
    for strategy in ("lazarus", "checkpoint_restart"):
        assert table.loc[strategy, "failures"] >= 1, f"{strategy} saw no failure"
        assert table.loc[strategy, "steps"] == 40 and table.loc[strategy, "completed"]
        assert table.loc[strategy, "max_loss_deviation"] < 0.05
    assert table.loc["checkpoint_restart", "restores"] == table.loc["checkpoint_restart", "failures"]
    records = json.loads((out / "records.json").read_text())
    first = next(e for e in records["lazarus"]["epochs"] if e["reason"] == "failure")
    assert first["restore_step"] is None, "with f = 2, one lost node leaves every expert alive: no checkpoint"
    (row,) = summary["rows"]  # lazarus against the one baseline it ran with
    assert (row["metric"], row["unit"], row["baseline"]) == ("goodput", "tok/s", "checkpoint_restart")
    assert row["value"] > 0 and row["baseline_value"] > 0 and "4 nodes" in row["regime"]


def test_report_compares_recovery_probabilities(tiny_run):
    summary, out = tiny_run
    report = (out / "report.md").read_text()
    assert "Recovery probability" in report and "spread" in report and "compact" in report
    at_half = summary["details"]["recovery_probability_at_half"]
    assert at_half["lazarus"] >= at_half["compact"]


def test_a_spot_trace_replays_as_preemptions_and_arrivals(training_cluster, tmp_path):
    from flows.lazarus.flow import lazarus

    trace = tmp_path / "trace.csv"  # four nodes granted, c preempted at 10 min, e granted at 16 min
    trace.write_text("0,add,a\n0,add,b\n0,add,c\n0,add,d\n600000,remove,c\n960000,add,e\n")
    summary = lazarus(scale="tiny", strategies=["lazarus"], trace=str(trace), time_scale=0.005,
                      scheduler=training_cluster, results_dir=str(tmp_path), run_id="trace")
    assert summary["details"]["failure_schedule"].startswith("trace trace.csv")
    records = json.loads((tmp_path / "lazarus" / "trace" / "records.json").read_text())["lazarus"]
    injected = [(e["kind"], round(e["time_s"])) for e in records["injected"] if "node" in e]
    assert injected[0] == ("remove", 3), "the preemption at 10 min, squeezed 200×, comes at 3 s"
    assert ("add", 5) in injected, "the arrival at 16 min comes at 4.8 s"
    table = pd.read_csv(tmp_path / "lazarus" / "trace" / "strategies.csv").set_index("strategy")
    assert table.loc["lazarus", "failures"] >= 1 and table.loc["lazarus", "steps"] == 40
    assert table.loc["lazarus", "max_loss_deviation"] < 0.05
