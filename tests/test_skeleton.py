"""The run skeleton every system's flow runs on (tasks/common): its parameters, its summary rows,
its writer (reports with their plots embedded for the Prefect UI) and `--store` publishing."""

from __future__ import annotations

import base64
import json

import boto3
import pytest

from flows.jellybean import JellyBeanParams
from infra.errors import InputError
from infra.store import open_store
from tasks.common.run import RunContext, artifact_key, embed_images
from tasks.common.summary import ROW_KEYS, Summary
from tasks.common.tasks import busy_intervals, busy_seconds
from tests.infra.test_store import unique_bucket

PNG = base64.b64decode(  # a 1×1 transparent PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


def test_rows_have_the_same_keys_for_every_system_and_the_ratio_against_each_baseline():
    summary = Summary("lazarus", "run-1", "results/lazarus/run-1", "4 nodes, a node lost every 15 s")
    rows = summary.compare("goodput", "tok/s", "higher", {"lazarus": 800.0, "ckpt": 400.0, "reconfig": 1000.0},
                           "lazarus", ["reconfig", "ckpt", "not_run"])
    assert [(r.baseline, r.ratio, r.wins) for r in rows] == [("reconfig", 0.8, False), ("ckpt", 2.0, True)]
    cost = summary.compare("cost", "$/h", "lower", {"milp": 1.0, "cloud": 2.0}, "milp", ["cloud"])
    assert cost[0].wins and cost[0].ratio == 0.5
    document = summary.to_dict()
    assert all(tuple(row) == ROW_KEYS for row in document["rows"])
    assert {row["regime"] for row in document["rows"]} == {"4 nodes, a node lost every 15 s"}
    with pytest.raises(ValueError, match="better must be 'higher' or 'lower'"):
        summary.compare("x", "s", "faster", {"a": 1.0}, "a", [])


def test_a_baseline_that_made_no_progress_has_no_ratio_and_is_beaten():
    summary = Summary("lazarus", "run-1", "out", "a node lost every 12 s")
    row, = summary.compare("goodput", "tok/s", "higher", {"lazarus": 800.0, "ckpt": 0.0}, "lazarus", ["ckpt"])
    assert row.ratio is None and row.wins
    assert summary.to_dict()["rows"][0]["ratio"] is None  # JSON null, not Infinity


def test_overhead_is_the_share_of_wall_time_no_task_did_its_own_work():
    assert busy_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0  # overlaps count once
    summary = Summary("jellybean", "r", "out", "")
    summary.timed(wall_seconds=10.0, task_seconds=4.0)
    assert (summary.wall_seconds, summary.task_seconds, summary.overhead_share) == (10.0, 4.0, 0.6)


def test_a_task_killed_mid_run_counts_up_to_its_last_heartbeat_and_other_runs_do_not_count():
    events = [{"id": "a", "flow_run": "r", "task": "train_node", "start": 0.0, "end": 2.0},
              {"id": "a", "flow_run": "r", "task": "train_node", "start": 0.0, "end": 4.0},  # then killed
              {"id": "b", "flow_run": "r", "task": "profile", "start": 5.0, "end": 6.0},
              {"id": "c", "flow_run": "another run", "task": "x", "start": 0.0, "end": 9.0}]
    assert sorted(busy_intervals(events, ["r"])) == [(0.0, 4.0), (5.0, 6.0)]


def test_a_report_artifact_carries_its_plots_as_data_uris_and_the_file_links_them(tmp_path):
    (tmp_path / "cost.png").write_bytes(PNG)
    markdown = "# Report\n\n![cost by strategy](cost.png)\n\n![gone](missing.png)\n"
    embedded = embed_images(markdown, tmp_path)
    assert f"![cost by strategy](data:image/png;base64,{base64.b64encode(PNG).decode()})" in embedded
    assert "![gone](missing.png)" in embedded  # nothing to embed: left as it was
    assert artifact_key("LMaaS", "slo_table") == "lmaas-slo-table"


def test_a_run_config_is_checked_field_by_field_naming_file_field_and_value(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rate: -5\n")
    with pytest.raises(InputError) as caught:
        JellyBeanParams.from_config(config)
    assert str(caught.value).startswith(f"{config}: field 'rate' = -5: ") and "--rate" not in str(caught.value)
    config.write_text("workflow: wf.yaml\nshards: 4\n")
    with pytest.raises(InputError, match=r"field 'shards' = 4: unknown; a jellybean run takes workflow, infra, rate"):
        JellyBeanParams.from_config(config)
    config.write_text("infra: [unclosed\n")
    with pytest.raises(InputError, match="malformed YAML"):
        JellyBeanParams.from_config(config)
    config.write_text("- a list\n")
    with pytest.raises(InputError, match="expected a mapping of run parameters"):
        JellyBeanParams.from_config(config)
    with pytest.raises(InputError, match="file not found"):
        JellyBeanParams.from_config(tmp_path / "nope.yaml")
    config.write_text("infra: missing.infra.yaml\n")  # relative paths are the config's folder's
    with pytest.raises(InputError, match=str(tmp_path / "missing.infra.yaml")):
        JellyBeanParams.from_config(config)


@pytest.fixture
def run(tmp_path):
    context = RunContext("jellybean", JellyBeanParams(), scale="small", regime="", results_dir=str(tmp_path / "results"),
                         run_id="run-1")
    context.write_plan({"total_cost_per_hour": 7.485})
    context.path("report.md").write_text("# JellyBean")
    context.path("store").mkdir()  # a system's own store in the folder is not published
    return context


def test_a_runs_folder_is_published_to_a_local_store(run, tmp_path):
    run.store = str(tmp_path / "store")
    url = run.publish()
    store = open_store(run.store)
    assert store.list("jellybean/run-1") == ["jellybean/run-1/plan.json", "jellybean/run-1/report.md"]
    assert store.get_json("jellybean/run-1/plan.json") == {"total_cost_per_hour": 7.485}
    assert url.startswith("file://")


def test_a_runs_folder_is_published_to_s3_over_http(run, moto_endpoint, monkeypatch):
    bucket = unique_bucket()
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    monkeypatch.setenv("TIERFLOW_S3_ENDPOINT_URL", moto_endpoint)
    run.store = f"s3://{bucket}/tierflow"
    assert run.publish() == f"s3://{bucket}/tierflow/jellybean/run-1"
    keys = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").list_objects_v2(Bucket=bucket)["Contents"]
    assert {k["Key"] for k in keys} == {"tierflow/jellybean/run-1/plan.json", "tierflow/jellybean/run-1/report.md"}


def test_a_run_context_travels_to_workers_without_its_cluster_or_inputs(run):
    import pickle

    run.cluster = object()  # not picklable state stays in the flow's process
    copy = pickle.loads(pickle.dumps(run))
    assert (copy.system, copy.run_id, copy.out) == ("jellybean", "run-1", run.out)
    assert not hasattr(copy, "cluster") and not hasattr(copy, "params")
    assert json.loads(json.dumps(run.summary.to_dict()))["run_id"] == "run-1"
