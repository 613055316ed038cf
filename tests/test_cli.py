"""The `tierflow` command line as a user meets it: built from the system registry, quick to start,
and bad input refused with one clear line, exit code 2 and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.registry import SYSTEMS, systems
from infra.prefect_server import free_port

ROOT = Path(__file__).resolve().parents[1]
TIERFLOW = str(Path(sys.executable).with_name("tierflow"))
HEAVY = ("prefect", "torch", "cvxpy", "distributed")


def tierflow(*args, cwd):
    return subprocess.run([TIERFLOW, *map(str, args)], cwd=cwd, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)


def imported_by(*args: str, tmp_path: Path) -> set[str]:
    """The heavy libraries a `tierflow ARGS` command imports (run in a fresh interpreter)."""
    code = ("import sys\nfrom flows.cli import app\ntry:\n    app(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,))
    env = {**os.environ, "TIERFLOW_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.strip().splitlines()[-1].split()) if done.stdout.strip() else set()


def test_list_json_is_one_array_with_one_object_per_registered_system(tmp_path):
    listed = json.loads(tierflow("list", "--json", cwd=tmp_path).stdout)
    assert [entry["name"] for entry in listed] == list(SYSTEMS)
    for entry in listed:
        system = systems()[entry["name"]]
        assert set(entry) == {"name", "description", "stages", "strategies", "baselines", "deployments"}
        assert entry["strategies"][0] == system.strategy and entry["baselines"] == list(system.baselines)
        assert set(entry["baselines"]) < set(entry["strategies"])
    assert "lmaas-replan/hourly-adapter-replan" in next(e for e in listed if e["name"] == "lmaas")["deployments"]


@pytest.mark.parametrize("args", [["--help"], ["list"], ["lmaas", "tenant", "list"], ["honeybee", "--help"],
                                  ["lazarus", "plan", "--nodes", "4", "--slots", "4", "--loads", "3,2,1,1"]])
def test_commands_that_run_no_flow_import_neither_prefect_nor_torch(args, tmp_path):
    # Prefect reads PREFECT_API_URL once, at import, and it and torch take seconds to import here
    assert not imported_by(*args, tmp_path=tmp_path) & {"prefect", "torch"}


def test_every_system_has_its_sub_commands_and_its_flow():
    for system in systems().values():
        assert system.load_cli().info.no_args_is_help, system.name
        assert system.flow.startswith(f"flows.{system.name}.") and system.cli.startswith(f"flows.{system.name}.")


# --- bad input: one clear line, exit code 2, nothing written -----------------------------------


def refused(result) -> str:
    """The one line a refused command printed."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def run_refused(tmp_path, *args) -> str:
    line = refused(tierflow("run", *args, "--results-dir", tmp_path / "results", cwd=tmp_path))
    assert not (tmp_path / "results").exists(), "a refused run writes nothing"
    return line


def test_an_unknown_system_is_refused_naming_the_systems(tmp_path):
    line = run_refused(tmp_path, "nosuch")
    assert "'nosuch'" in line and all(name in line for name in SYSTEMS)


def test_an_unknown_scale_is_refused_naming_the_scales(tmp_path):
    assert "--scale: 'huge' is not one of small, medium, large" in run_refused(tmp_path, "jellybean", "--scale", "huge")


def test_demo_only_refuses_a_system_it_does_not_know_before_running_any(tmp_path):
    line = refused(tierflow("demo", "--only", "jellybean,nosuch", "--results-dir", tmp_path / "results", cwd=tmp_path))
    assert "unknown system 'nosuch'" in line and not (tmp_path / "results").exists()


@pytest.mark.parametrize("content, says", [
    (None, "file not found"),
    ("rate: [1, 2\n", "malformed YAML"),
    ("- 3\n", "expected a mapping of run parameters"),
    ("rate: 10\nshards: 4\n", "field 'shards' = 4: unknown; a jellybean run takes workflow, infra, rate"),
])
def test_a_bad_config_is_refused_naming_the_file(tmp_path, content, says):
    config = tmp_path / "run.yaml"
    if content is not None:
        config.write_text(content)
    line = run_refused(tmp_path, "jellybean", "--config", config)
    assert str(config) in line and says in line


def test_a_negative_rate_in_a_config_file_names_the_file_and_the_field_not_a_flag(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rate: -5\n")
    line = run_refused(tmp_path, "jellybean", "--config", config)
    assert line.startswith(f"error: {config}: field 'rate' = -5") and "--rate" not in line


def test_a_scheduler_nobody_listens_on_is_one_line_without_a_traceback(tmp_path):
    address = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    line = run_refused(tmp_path, "jellybean", "--scheduler", address)
    assert f"--scheduler {address}: no Dask scheduler answers there" in line


def test_contracts_check_goes_system_by_system(tmp_path):
    result = tierflow("contracts", "check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "datasets meet their contracts" in result.stdout
    for name in ("platform", "jellybean", "lazarus"):
        assert name in result.stdout


def test_every_data_contract_belongs_to_one_system_or_the_platform():
    from data_contracts import products
    from flows.cli import contract_owners
    from flows.registry import PLATFORM_CONTRACTS

    declared = [p for s in systems().values() for p in s.contracts] + list(PLATFORM_CONTRACTS)
    assert len(declared) == len(set(declared)), "a contract declared twice"
    assert set(products()) == set(contract_owners())


def test_the_summary_table_reads_whole_in_80_columns():
    from rich.console import Console

    from flows.table import print_summaries
    from tasks.common.summary import Summary

    summaries = []
    for name, metric, unit, better, values in [
        ("jellybean", "cost", "$/h", "lower", {"milp": 7.485, "jellybean_heuristic": 8.1, "cloud_only": 14.2}),
        ("lmaas", "throughput", "tok/s", "higher", {"lmaas": 61.2, "multi_lora": 70.1, "merged_sequential": 20.3}),
    ]:
        summary = Summary(name, "20261203-101010-abcdef", f"results/{name}/20261203-101010-abcdef",
                          "a regime described at some length, long enough that it must wrap onto a second line")
        summary.compare(metric, unit, better, values, next(iter(values)), list(values)[1:])
        summary.timed(100.0, 85.0)
        summaries.append(summary.to_dict())
    console = Console(width=80, record=True, color_system=None)
    print_summaries(summaries, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "cost $/h ↓" in text and "throughput tok/s ↑" in text
    assert "heuristic" in text and "cloud" in text and "merged" in text  # the baselines' short names
    assert "0.92×" in text and "0.87×" in text and "regime: a regime described" in text
    assert "…" not in text and "100 s, 15% overhead" in text


def test_a_run_talks_to_the_server_ensure_api_chose_even_if_prefect_was_imported_before(prefect_api, tmp_path):
    code = f"""
import json, os, sys
os.environ["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # nobody listens there
import prefect  # noqa: F401  (Prefect reads its settings now)
from flows.cli import run_system
from flows.system import Strategy, System
from tasks.common.params import RunParams
probe = System(name="probe", description="", flow="tests.probe_flow:probe", cli="", params=RunParams,
               strategies=(Strategy("probe", "system", "probe", ""),), stages=(), scales=("small",), contracts=(),
               regime="", demo_budget_s=1)
print(json.dumps(run_system(probe, RunParams(), scale="small", scheduler=None, results_dir="{tmp_path}", store=None,
                            api_url="{prefect_api}")))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ran = json.loads(done.stdout.strip().splitlines()[-1])
    assert ran["api_url"] == prefect_api
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the session's server knows the run
        assert str(client.read_flow_run(ran["flow_run"]).id) == ran["flow_run"]
