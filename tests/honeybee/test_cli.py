"""`tierflow honeybee …` as a user runs it: generate, profile, query; bad input is one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.honeybee.rbac import Rbac
from tasks.honeybee.workload import load_workload


TIERFLOW = str(Path(sys.executable).with_name("tierflow"))


def tierflow(*args, check=True):
    result = subprocess.run([TIERFLOW, *map(str, args)], env=dict(os.environ), capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hb") / "tiny"
    tierflow("honeybee", "generate", "--scale", "tiny", "--seed", "3", "--out", str(folder))
    return folder


@pytest.fixture(scope="module")
def model(workload, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "cost_model.json"
    tierflow("honeybee", "profile", "--workload", str(workload), "--out", str(path))
    return path


@pytest.mark.parametrize("strategy", ["honeybee", "rls", "rls_prefilter", "per_role", "per_user"])
def test_query_prints_each_querys_permitted_ids_with_qps_storage_and_build_time(workload, model, strategy):
    out = tierflow("honeybee", "query", "--workload", str(workload), "--strategy", strategy, "--k", "7",
                   "--model", str(model), "--json")
    document = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = load_workload(workload)
    rbac = Rbac.of(loaded)
    assert len(document["queries"]) == len(loaded.queries)
    for row in document["queries"]:
        ids = np.array(row["ids"], dtype=np.int64)
        assert len(ids) <= 7 and rbac.user_mask(row["user"])[ids].all()
        distances = ((loaded.vectors[ids] - loaded.queries[row["query_id"]]) ** 2).sum(axis=1)
        assert (np.diff(distances) >= -1e-4).all(), "ids come nearest first"
    assert document["qps"] > 0 and document["build_s"] >= 0 and document["recall"] >= 0.95
    assert document["storage"] >= 1.0


def test_query_without_a_model_measures_one_here(workload):
    out = tierflow("honeybee", "query", "--workload", str(workload), "--strategy", "rls", "--json")
    assert json.loads(out.stdout.strip().splitlines()[-1])["strategy"] == "rls"


@pytest.mark.parametrize("args, expected", [
    (["--budget", "0.8"], "storage_budget"),
    (["--recall", "1.5"], "recall_target"),
    (["--strategy", "per_group"], "--strategy"),
])
def test_bad_settings_are_one_clear_line(workload, model, args, expected):
    result = tierflow("honeybee", "query", "--workload", str(workload), "--model", str(model), *args, check=False)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_a_broken_workload_names_the_file_and_value(tmp_path, workload, model):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(workload, broken)
    lines = (broken / "query_users.csv").read_text().splitlines()
    lines[1] = "0,nobody"
    (broken / "query_users.csv").write_text("\n".join(lines) + "\n")
    result = tierflow("honeybee", "query", "--workload", str(broken), "--model", str(model), check=False)
    assert result.returncode == 2
    assert "query_users.csv" in result.stderr and "nobody" in result.stderr and "Traceback" not in result.stderr


def test_run_config_with_an_unknown_field_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("storage_budget: 1.2\nshards: 4\n")
    result = tierflow("run", "honeybee", "--config", str(config), check=False)
    assert result.returncode == 2 and "shards" in result.stderr


def test_run_config_with_a_budget_below_one_is_refused_before_anything_starts(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("storage_budget: 0.9\n")
    result = tierflow("run", "honeybee", "--config", str(config), check=False)
    assert result.returncode == 2 and "storage_budget" in result.stderr and "0.9" in result.stderr


def test_update_applies_changes_incrementally_and_keeps_its_state_between_runs(workload, model, tmp_path):
    loaded = load_workload(workload)
    doc = int(loaded.doc_roles.doc_id.iloc[0])
    role = loaded.doc_roles.role.iloc[0]
    changes = tmp_path / "changes.jsonl"
    vector = [float(v) for v in loaded.vectors[doc]]
    changes.write_text("\n".join(json.dumps(c) for c in [
        {"op": "revoke", "doc": doc, "role": role},
        {"op": "join", "user": "newcomer", "role": role},
        {"op": "add_doc", "doc": len(loaded.vectors), "roles": [role], "vector": vector},
        {"op": "delete_doc", "doc": doc + 1},
    ]) + "\n")
    state = tmp_path / "state"
    before = {p.name: p.read_bytes() for p in workload.iterdir()}
    first = json.loads(tierflow("honeybee", "update", "--workload", workload, "--changes", changes, "--state", state,
                                "--model", model, "--json").stdout.strip().splitlines()[-1])
    assert first["forbidden_results"] == 0 and first["changes"] == 4
    assert 0 < first["vectors_added"] + first["vectors_removed"] < first["full_rebuild_vectors"]
    assert first["first_build_seconds"] is not None
    assert {p.name: p.read_bytes() for p in workload.iterdir()} == before, "the workload folder is never written"
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps({"op": "leave", "user": "newcomer", "role": role}) + "\n")
    second = json.loads(tierflow("honeybee", "update", "--workload", workload, "--changes", again, "--state", state,
                                 "--json").stdout.strip().splitlines()[-1])
    assert second["first_build_seconds"] is None, "the second update starts from the kept state"
    assert second["forbidden_results"] == 0 and second["vectors_added"] + second["vectors_removed"] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"op": "revoke", "doc": doc, "role": role}) + "\n")  # already revoked
    result = tierflow("honeybee", "update", "--workload", workload, "--changes", bad, "--state", state, check=False)
    assert result.returncode == 2 and "bad.jsonl:1" in result.stderr and "Traceback" not in result.stderr
