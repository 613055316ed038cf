"""JellyBean end to end on the embedded tiered cluster: profile → optimize → deploy → evaluate,
run as a user runs it (`tierflow run jellybean --config … --json`)."""

import json
from pathlib import Path

import pytest
import yaml

from tests.jellybean.test_cli import tierflow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_run(prefect_api, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jellybean")
    workflow = yaml.safe_load((ROOT / "data" / "vqa.workflow.yaml").read_text())
    workflow["operators"]["ExtractImageFeature"]["variants"] = ["resnet18", "resnet34"]
    workflow["accuracy"]["profiles"] = str(ROOT / "data" / "jellybean-vqa" / "accuracy_profiles.json")
    workflow["messages"] = str(ROOT / "data" / "jellybean-vqa" / "message_sizes.csv")
    (tmp / "wf.yaml").write_text(yaml.safe_dump(workflow))
    infra = {"name": "two-tiers", "pools": [
        {"name": "hub-cpu", "tier": "hub", "device": "cpu-small", "count": 4},
        {"name": "cloud-t4", "tier": "cloud", "device": "t4", "count": 3},
    ]}
    (tmp / "infra.yaml").write_text(yaml.safe_dump(infra))
    (tmp / "run.yaml").write_text(yaml.safe_dump({"workflow": "wf.yaml", "infra": "infra.yaml", "rate": 10.0}))
    result = tierflow("run", "jellybean", "--config", tmp / "run.yaml", "--results-dir", tmp / "results", "--json", cwd=tmp)
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # the summary is the last stdout line
    (out,) = (tmp / "results" / "jellybean").iterdir()  # results/jellybean/<run-id>/
    return summary, out


def test_run_json_prints_the_summary_as_the_last_stdout_line(small_run):
    summary, out = small_run
    assert summary["system"] == "jellybean" and summary["results"] == str(out)
    assert 0 <= summary["overhead_share"] < 1 and 0 < summary["task_seconds"] <= summary["wall_seconds"]
    compared = {row["baseline"] for row in summary["rows"]}
    assert compared | set(summary["details"]["infeasible_baselines"]) == {"jellybean_heuristic", "infaas_style", "cloud_only"}
    assert json.loads((out / "evaluation.json").read_text())["summary"] == summary


def test_run_writes_plan_evaluation_report_and_plot(small_run):
    summary, out = small_run
    for name in ("plan.json", "plans.json", "evaluation.json", "report.md", "cost_by_strategy.png", "profile.csv"):
        assert (out / name).is_file(), name
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert {row["strategy"] for row in evaluation["strategies"]} == {"milp", "jellybean_heuristic", "infaas_style", "cloud_only"}


def test_milp_plan_is_never_dearer_than_a_baseline_and_meets_the_target(small_run):
    summary, _ = small_run
    assert summary["details"]["accuracy"] >= summary["details"]["accuracy_target"]
    for row in summary["rows"]:
        assert (row["metric"], row["unit"], row["better"]) == ("cost", "$/h", "lower")
        assert row["value"] <= row["baseline_value"] + 1e-6 and row["ratio"] <= 1 + 1e-6, row["baseline"]
    assert summary["simulated"], "a result must say what was simulated"


def test_deployed_stream_ran_on_the_planned_tier_workers(small_run):
    _, out = small_run
    evaluation = json.loads((out / "evaluation.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    served = {(row["operator"], row["worker"]) for row in evaluation["deploy"] if row["strategy"] == "milp"}
    planned = {(a["operator"], a["worker"]) for a in plan["assignment"] if a["rate"] > 1e-9}
    assert served == planned
    assert all(row["requests"] > 0 and row["measured_ms_per_request"] > 0 for row in evaluation["deploy"])


def test_profile_was_measured_on_each_pools_own_worker(small_run):
    import pandas as pd

    _, out = small_run
    profile = pd.read_csv(out / "profile.csv")
    assert set(profile.pool) == {"hub-cpu", "cloud-t4"}
    assert (profile.pool == profile.worker).all()
    t4 = profile[profile.pool == "cloud-t4"].set_index(["operator", "variant"])
    assert (t4.latency_ms < t4.measured_ms).all()  # a T4 is simulated faster than this host's core


def test_request_stream_is_dealt_in_proportion_and_reaches_every_worker():
    from tasks.jellybean.deploy import split_requests

    dealt = split_requests(list(range(10)), {"a": 7.0, "b": 2.0, "c": 0.1})
    assert sorted(i for ids in dealt.values() for i in ids) == list(range(10))
    a, b, c = (len(dealt[w]) for w in "abc")
    assert a > b > c == 1
    assert split_requests([0, 1], {"a": 1.0, "b": 1.0, "c": 1.0}).keys() <= {"a", "b", "c"}


def test_the_report_artifact_shows_its_plot_and_tables_in_the_prefect_ui(small_run, prefect_api, tmp_path):
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tests.browser import artifact_page, chromium_or_skip

    chromium_or_skip()
    summary, out = small_run
    with get_client(sync_client=True) as client:
        reports = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["jellybean-report"])))
    (report,) = [a for a in reports if summary["run_id"] in (a.description or "")]
    page = artifact_page(prefect_api.removesuffix("/api"), str(report.id), screenshot=tmp_path / "report.png")
    plots = re.findall(r"!\[([^\]]*)\]\(", (out / "report.md").read_text())
    shown = [image for image in page["images"] if image["alt"] in plots]
    assert plots and len(shown) == len(plots), page["images"]
    assert all(image["naturalWidth"] > 0 and image["naturalHeight"] > 0 for image in shown), shown
    assert {"strategy", "total_cost_per_hour"} <= set(page["headers"])
