"""HoneyBee end to end on the embedded tiered cluster: profile → optimize → deploy → evaluate."""

import json

import pandas as pd
import pytest
import yaml

from tasks.honeybee.workload import generate_workload, save_workload


@pytest.fixture(scope="module")
def tiny_run(prefect_api, tmp_path_factory):
    from flows.honeybee.flow import honeybee

    tmp = tmp_path_factory.mktemp("honeybee")
    save_workload(generate_workload("tiny", seed=1), tmp / "workload")
    infra = {"name": "two-tiers", "pools": [
        {"name": "edge-cache", "tier": "edge", "device": "cpu-small", "count": 1},
        {"name": "cloud-search", "tier": "cloud", "device": "cpu-large", "count": 2},
    ]}
    (tmp / "infra.yaml").write_text(yaml.safe_dump(infra))
    summary = honeybee(workload=str(tmp / "workload"), infra=str(tmp / "infra.yaml"), storage_budget=1.4,
                       recall_target=0.95, results_dir=str(tmp / "results"), run_id="test")
    return summary, tmp / "results" / "honeybee" / "test"


def test_run_writes_plan_model_evaluation_report_and_plot(tiny_run):
    summary, out = tiny_run
    for name in ("plan.json", "cost_model.json", "search_profile.csv", "evaluation.json", "report.md",
                 "latency_vs_storage.png", "strategies.csv", "partitions.csv"):
        assert (out / name).is_file(), name
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert {row["strategy"] for row in evaluation["strategies"]} == {"honeybee", "rls", "rls_prefilter", "per_role", "per_user"}
    assert summary["simulated"], "a result must say what was simulated"


def test_every_strategy_meets_the_recall_target_and_nothing_forbidden_is_returned(tiny_run):
    summary, out = tiny_run
    details = summary["details"]
    assert details["rejected_at_merge"] == 0
    assert details["not_built"] == []
    for strategy, recall in details["recall"].items():
        assert recall >= details["recall_target"], strategy
    # each row against the baseline the claim is about, in the run's regime
    rows = {(row["metric"], row["baseline"]): row for row in summary["rows"]}
    assert set(rows) == {("QPS", "rls"), ("QPS", "rls_prefilter"), ("latency", "per_role"), ("storage", "per_role"),
                         ("storage", "per_user"), ("latency", "per_user")}
    assert rows["QPS", "rls"]["better"] == "higher" and rows["storage", "per_user"]["better"] == "lower"
    assert rows["storage", "per_role"]["value"] == pytest.approx(summary["details"]["storage"]["honeybee"], abs=1e-3)
    assert {row["regime"] for row in summary["rows"]} == {summary["regime"]} and "roles" in summary["regime"]


def test_honeybee_stays_within_its_storage_budget_and_baselines_store_what_they_are(tiny_run):
    summary, _ = tiny_run
    storage = summary["details"]["storage"]
    assert storage["honeybee"] <= summary["details"]["storage_budget"] + 1e-9
    assert storage["rls"] == 1.0
    assert storage["rls"] <= storage["per_role"] <= storage["per_user"]


def test_partitions_were_built_on_the_tier_workers_the_placement_chose(tiny_run):
    _, out = tiny_run
    built = pd.read_csv(out / "partitions.csv")
    assert set(built.pool) <= {"edge-cache", "cloud-search"}
    honeybee = built[built.strategy == "honeybee"]
    assert honeybee["size"].sum() > 0 and (honeybee.build_s >= 0).all()
    evaluation = json.loads((out / "evaluation.json").read_text())
    pools = evaluation["deployments"]["per_role"]["pools"]
    assert sum(pools.values()) == len(built[built.strategy == "per_role"])


def test_report_compares_predicted_with_measured_latency_and_recall(tiny_run):
    _, out = tiny_run
    table = pd.read_csv(out / "strategies.csv")
    assert (table.predicted_latency_mean_ms > 0).all() and (table.latency_mean_ms > 0).all()
    assert table.predicted_recall.between(0, 1).all()
    report = (out / "report.md").read_text()
    assert "predicted_latency_mean_ms" in report and "Cost model fit" in report
