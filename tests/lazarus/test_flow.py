"""Lazarus end to end on the embedded cluster: one training node per Dask worker, nodes SIGKILLed mid-run."""

import json

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def tiny_run(prefect_api, tmp_path_factory):
    from flows.lazarus import lazarus

    tmp = tmp_path_factory.mktemp("lazarus")
    summary = lazarus(scale="tiny", strategies=["lazarus", "checkpoint_restart"], results_dir=str(tmp), run_id="test")
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
    assert summary["key_figure"] == "goodput_tokens_s" and summary["value"] > 0


def test_report_compares_recovery_probabilities(tiny_run):
    summary, out = tiny_run
    report = (out / "report.md").read_text()
    assert "Recovery probability" in report and "spread" in report and "compact" in report
    assert summary["recovery_probability_at_half"]["lazarus"] >= summary["recovery_probability_at_half"]["compact"]
