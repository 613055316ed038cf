"""LMaaS as Prefect flows: the whole run end to end (slow), and the scheduled re-plan from metered usage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from infra.store import LocalStore
from tasks.lm.lora import random_adapter, save_adapter
from tasks.lm.weights import load_config
from tasks.lmaas.registry import Registry
from tests.lmaas.postgres import fresh_database

INFRA = str(Path(__file__).resolve().parents[2] / "data" / "lmaas.infra.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_tiny_run_trains_registers_places_deploys_and_compares(prefect_api, tmp_path, request, database):
    from flows.lmaas.flow import lmaas

    db = None  # SQLite in the run's folder
    if database == "postgresql":  # a real server, which the replicas on the Dask workers share
        db = fresh_database(request.getfixturevalue("postgres"))
    summary = lmaas(scale="tiny", results_dir=str(tmp_path), run_id="test", db=db)
    out, details = tmp_path / "lmaas" / "test", summary["details"]
    for name in ("plan.json", "evaluation.json", "report.md", "lmaas.png", "strategies.csv", "slo.csv"):
        assert (out / name).exists(), name
    table = pd.read_csv(out / "strategies.csv")
    assert list(table.strategy) == ["lmaas", "lmaas_serverless", "multi_lora", "merged_sequential", "unbatched"]
    assert (table.requests == 12).all()
    tuned = details["fine_tuning"]["reviews"]
    assert tuned["heldout_loss"][1] < tuned["heldout_loss"][0]
    assert details["isolation"] == {"own adapter": 200, "another tenant's adapter": 403,
                                    "unknown adapter of one's own": 404, "wrong API key": 401}
    serverless = details["serverless"]
    assert serverless["scaled_to_zero_between_runs"] and serverless["cold_starts"] >= 1
    # the spare machine and then the idle planned one were given back; from zero, one came up again
    assert serverless["machines_released"] >= 2 and len(serverless["machine_start_s"]) >= 1
    assert details["serving_format"]["serve"]["chosen"] in ("int4", "bfloat16")
    assert details["metered"]["completion_tokens"] > 0 and details["metered"]["cost_usd"] > 0
    assert details["replan"]["needed"]  # the surge is half a worker beyond the plan's workers
    assert {row["baseline"] for row in summary["rows"]} == {"multi_lora", "merged_sequential", "unbatched"}
    assert json.loads((out / "evaluation.json").read_text())["summary"] == summary


def write_plan(tmp_path, registry_url, store, workers, assignment, capacity=100.0):
    """A current LMaaS plan (as `tierflow run lmaas` writes it) at ``tmp_path/plan.json``: its
    workers and assignment, the registry and store, and a profile of ``capacity`` tokens/s."""
    plan = {"workers": workers, "usd_per_hour": 0.096 * len(workers), "utilisation": {}, "active_adapters": {},
            "memory_bytes": {}, "solve_seconds": 0.0, "optimal": True,
            "inputs": {"max_utilisation": 0.7, "window_s": 2.0}, "assignment": assignment,
            "db": registry_url, "store": str(store), "infra": INFRA, "tpot_slo_s": 0.2,
            "profiles": {"serve": {"points": [{"batch": 16, "tokens_per_s": capacity, "tpot_s": 0.05}],
                                   "lora_slots": 16}}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def acme_on_one_worker(tmp_path):
    """A SQLite registry under ``tmp_path`` with tenant acme's adapters a and b, and a current plan
    that serves both on serve-0 (100 tokens/s): the registry, its URL and the plan's path."""
    config = load_config(None)
    url = f"sqlite:///{tmp_path / 'lmaas.db'}"
    registry = Registry(url, LocalStore(tmp_path / "store"), config)
    registry.add_tenant("acme")
    for name in ("a", "b"):
        registry.register_adapter("acme", name, save_adapter(random_adapter(config, rank=4, targets=("q_proj",)),
                                                            tmp_path / name))
    path = write_plan(tmp_path, url, tmp_path / "store", ["serve-0"], {"acme/a": "serve-0", "acme/b": "serve-0"})
    return registry, url, path


def test_the_scheduled_replan_grows_the_plan_when_metered_load_outgrows_a_worker(prefect_api, tmp_path):
    from flows.lmaas.flow import lmaas_replan

    registry, url, path = acme_on_one_worker(tmp_path)
    assert lmaas_replan(plan_path=str(path), window_s=60)["reasons"] == ["no load in the window"]

    acme = registry.tenant("acme")
    for model in ("acme/a", "acme/b"):  # 2 × 2,400 tokens in a minute: 80 tokens/s > 70% of 100
        for _ in range(3):
            registry.record_usage(acme, model, 10, 800, 0.1, 1.0, 0.0)
    result = lmaas_replan(plan_path=str(path), window_s=60)
    assert result["needed"] and "serve-0: load over 70% of its throughput" in result["reasons"]
    assert sorted(result["workers"]) == ["serve-0", "serve-1"] and result["moved_adapters"] == 1
    stored = json.loads(path.read_text())
    assert sorted(stored["workers"]) == ["serve-0", "serve-1"] and stored["db"] == url  # the new plan is current
    assert lmaas_replan(plan_path=str(path), window_s=60)["needed"] is False  # and it holds for the same load


def test_replan_without_a_plan_says_to_run_lmaas_first(prefect_api, tmp_path):
    from flows.lmaas.flow import lmaas_replan

    with pytest.raises(FileNotFoundError, match="run `tierflow run lmaas` first"):
        lmaas_replan(plan_path=str(tmp_path / "missing.json"))
