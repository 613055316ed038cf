"""A run's results go to the artifact store: a local folder by default, S3 (moto's real server) by URL."""

import boto3
import pytest

from flows.jellybean import publish
from infra.store import open_store
from tests.infra.test_store import unique_bucket


@pytest.fixture
def run_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "plan.json").write_text('{"total_cost_per_hour": 7.485}')
    (folder / "report.md").write_text("# JellyBean")
    return folder


def test_results_are_published_to_a_local_store(run_folder, tmp_path):
    url = publish(run_folder, str(tmp_path / "store"), "jellybean/run-1")
    store = open_store(str(tmp_path / "store"))
    assert store.list("jellybean/run-1") == ["jellybean/run-1/plan.json", "jellybean/run-1/report.md"]
    assert store.get_json("jellybean/run-1/plan.json") == {"total_cost_per_hour": 7.485}
    assert url.startswith("file://")


def test_results_are_published_to_s3_over_http(run_folder, moto_endpoint, monkeypatch):  # noqa: F811
    bucket = unique_bucket()
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    monkeypatch.setenv("TIERFLOW_S3_ENDPOINT_URL", moto_endpoint)
    url = publish(run_folder, f"s3://{bucket}/tierflow", "jellybean/run-1")
    assert url == f"s3://{bucket}/tierflow/jellybean/run-1"
    keys = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").list_objects_v2(Bucket=bucket)["Contents"]
    assert {k["Key"] for k in keys} == {"tierflow/jellybean/run-1/plan.json", "tierflow/jellybean/run-1/report.md"}
