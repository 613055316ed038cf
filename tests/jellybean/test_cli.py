"""`tierflow jellybean …` as a user runs it: each stage alone with files between them (`run --json`
is tested in test_flow, whose run goes through it; the command line's shape in tests/test_cli.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TIERFLOW = str(Path(sys.executable).with_name("tierflow"))


def tierflow(*args, cwd, check=True):
    result = subprocess.run([TIERFLOW, *map(str, args)], cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"tierflow {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    workflow = yaml.safe_load((ROOT / "data" / "vqa.workflow.yaml").read_text())
    workflow["operators"]["ExtractImageFeature"]["variants"] = ["resnet18", "resnet34"]
    workflow["sources"] = {s: {"rate": 5, "tier": "device"} for s in workflow["sources"]}
    workflow["accuracy"]["profiles"] = str(ROOT / "data" / "jellybean-vqa" / "accuracy_profiles.json")
    workflow["messages"] = str(ROOT / "data" / "jellybean-vqa" / "message_sizes.csv")
    (tmp / "wf.yaml").write_text(yaml.safe_dump(workflow))
    (tmp / "infra.yaml").write_text(yaml.safe_dump({"name": "cli", "pools": [
        {"name": "hub-cpu", "tier": "hub", "device": "cpu-small", "count": 2},
        {"name": "cloud-t4", "tier": "cloud", "device": "t4", "count": 2},
    ]}))
    return tmp


@pytest.fixture(scope="module")
def cluster_up(prefect_api, small):
    """`tierflow cluster up` for the small spec: the scheduler address it prints (one cluster for the
    stages below, as a user shares one between commands; stopped by SIGTERM at the end)."""
    import re
    import signal
    import time

    # the workers copy PREFECT_API_URL when they start, so the Prefect server is up first
    process = subprocess.Popen([TIERFLOW, "cluster", "up", "--infra", small / "infra.yaml"], cwd=small,
                               env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        address, deadline = None, time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            match = re.search(r"scheduler: (tcp://127\.0\.0\.1:\d+)", process.stdout.readline())
            address = match.group(1) if match else None
        assert address, "no scheduler address printed"
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.slow  # 1–2.5 min: every stage a command of its own; the same stages run end to end in test_flow
def test_stages_run_alone_with_files_between_them(prefect_api, small, cluster_up):
    common = ["--workflow", small / "wf.yaml", "--infra", small / "infra.yaml"]
    tierflow("jellybean", "profile", *common, "--repeats", 1, "--scheduler", cluster_up, "--out", small / "profile.csv",
             cwd=small)
    tierflow("jellybean", "optimize", *common, "--profile", small / "profile.csv", "--strategy", "all",
             "--out", small / "plans.json", cwd=small)
    plans = json.loads((small / "plans.json").read_text())
    assert "milp" in plans and "jellybean_heuristic" in plans
    tierflow("jellybean", "deploy", *common, "--profile", small / "profile.csv", "--plans", small / "plans.json",
             "--requests", 2, "--scheduler", cluster_up, "--out", small / "deploy", cwd=small)
    result = tierflow("jellybean", "evaluate", *common, "--profile", small / "profile.csv", "--plans", small / "plans.json",
                      "--deployed", small / "deploy", "--out", small / "evaluation", "--json", cwd=small)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (value,) = {row["value"] for row in summary["rows"]}  # the MILP's cost against each baseline
    assert value == pytest.approx(plans["milp"]["total_cost_per_hour"], abs=1e-4)
    assert (small / "evaluation" / "report.md").is_file()


def test_bad_input_exits_with_a_message_naming_the_field(small):
    bad = yaml.safe_load((small / "wf.yaml").read_text())
    bad["sources"]["ReadImage"]["rate"] = -1
    (small / "bad.yaml").write_text(yaml.safe_dump(bad))
    (small / "bad-run.yaml").write_text(yaml.safe_dump({"workflow": "bad.yaml", "infra": "infra.yaml"}))
    result = tierflow("run", "jellybean", "--config", small / "bad-run.yaml", cwd=small, check=False)
    assert result.returncode == 2
    assert "sources.ReadImage.rate" in result.stderr and "-1" in result.stderr


def test_optimize_prints_the_plan_json_for_the_authors_input_folder(tmp_path):
    result = tierflow("jellybean", "optimize", "--inputs", ROOT / "data" / "jellybean-vqa", "--json", cwd=tmp_path)
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("variants", "assignment", "compute_cost_per_hour", "network_cost_per_hour", "total_cost_per_hour",
                "accuracy", "solve_seconds"):
        assert key in plan
    assert {"operator", "worker", "rate"} <= set(plan["assignment"][0])
    assert plan["total_cost_per_hour"] == pytest.approx(7.485, abs=1e-3)


def test_an_infeasible_target_exits_naming_the_binding_constraint(tmp_path):
    result = tierflow("jellybean", "optimize", "--inputs", ROOT / "data" / "jellybean-vqa", "--rate", 400, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "throughput of" in result.stderr and "400 req/s" in result.stderr


def test_cluster_up_prints_a_scheduler_address_whose_workers_carry_the_tiers(cluster_up):
    from distributed import Client

    with Client(cluster_up, timeout="20s") as client:
        resources = [w["resources"] for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    assert {"tier-hub": 2, "device-cpu-small": 2, "pool-hub-cpu": 2} in resources
    assert {"tier-cloud": 2, "device-t4": 2, "pool-cloud-t4": 2} in resources
