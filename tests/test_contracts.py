"""Data contracts: every shipped dataset meets its suite; broken data fails naming product, source and value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from data_contracts import ContractError, check, validate
from data_contracts.shipped import check_shipped, read_csv, shipped_datasets

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def shipped_results() -> list[tuple[str, str, list[str]]]:
    return check_shipped(ROOT)


def test_every_shipped_dataset_meets_its_contract(shipped_results):
    broken = [f"{path} ({product}): {failures}" for path, product, failures in shipped_results if failures]
    assert not broken, "\n".join(broken)


def test_shipped_datasets_cover_the_catalog_and_jellybean_inputs(shipped_results):
    checked = {(path, product) for path, product, _ in shipped_results}
    vqa = "data/jellybean-vqa"
    assert {
        ("infra/catalog/devices.csv", "catalog.devices"),
        ("infra/catalog/links.csv", "catalog.links"),
        (f"{vqa}/execution_profile.csv", "jellybean.execution_profile"),
        (f"{vqa}/execution_profile_p90.csv", "jellybean.execution_profile"),
        (f"{vqa}/message_sizes.csv", "jellybean.message_sizes"),
        (f"{vqa}/workers_specs.csv", "jellybean.workers_specs"),
        (f"{vqa}/workers_workers_link.csv", "jellybean.links"),
        (f"{vqa}/sources_workers_link.csv", "jellybean.links"),
        (f"{vqa}/input_injection_rates.csv", "jellybean.rates"),
        (f"{vqa}/logical_graph.csv", "jellybean.graph"),
        (f"{vqa}/accuracy_profiles.json", "jellybean.accuracy_table"),
        ("data/vqa.infra.yaml", "infra.pools"),
        ("data/vqa.workflow.yaml", "jellybean.workflow"),
        ("data/moe-corpus.txt", "moe.corpus"),
        ("data/spot-traces/bamboo-p3-trace.csv", "lazarus.spot_trace"),
    } <= checked


def test_a_corpus_line_outside_printable_ascii_breaks_its_contract(tmp_path):
    from data_contracts.shipped import read_text_lines

    corpus = tmp_path / "moe-corpus.txt"
    lines = (ROOT / "data" / "moe-corpus.txt").read_text().splitlines()
    lines[2] = lines[2] + " caf\u00e9\ttab"
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(ContractError) as caught:
        validate(read_text_lines(corpus), "moe.corpus", corpus)
    assert "moe.corpus" in str(caught.value) and "caf\u00e9" in str(caught.value)


def test_a_workflow_with_an_operator_without_variants_breaks_its_contract(tmp_path):
    import yaml

    from data_contracts.shipped import read_workflow_nodes

    spec = yaml.safe_load((ROOT / "data" / "vqa.workflow.yaml").read_text())
    spec["operators"]["VQA"]["variants"] = []
    path = tmp_path / "bad.workflow.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ContractError) as caught:
        validate(read_workflow_nodes(path), "jellybean.workflow", path)
    assert "jellybean.workflow" in str(caught.value) and "0" in str(caught.value)


def test_corrupted_execution_profile_fails_naming_product_source_and_values(tmp_path):
    folder = tmp_path / "data" / "jellybean-vqa"
    shutil.copytree(ROOT / "data" / "jellybean-vqa", folder)
    profile = folder / "execution_profile.csv"
    lines = profile.read_text().splitlines()
    operator, worker, variant, _ = lines[0].split(",")[:4]
    lines[0] = f"{operator},{worker},{variant},-12.5"
    lines.append(lines[1])  # a duplicate (operator, worker, variant)
    profile.write_text("\n".join(lines) + "\n")

    frames = {path: (product, frame) for path, product, frame in shipped_datasets(tmp_path)}
    product, frame = frames["data/jellybean-vqa/execution_profile.csv"]
    with pytest.raises(ContractError) as caught:
        validate(frame, product, profile)
    message = str(caught.value)
    assert "jellybean.execution_profile" in message and str(profile) in message
    assert "-12.5" in message  # the negative latency
    duplicate = lines[1].split(",")
    assert "expect_compound_columns_to_be_unique" in message and duplicate[2] in message

    broken = {path for path, _, failures in check_shipped(tmp_path) if failures}
    assert broken == {"data/jellybean-vqa/execution_profile.csv"}


def test_catalog_with_a_negative_price_fails_naming_the_value():
    source = ROOT / "infra" / "catalog" / "devices.csv"
    devices = read_csv(source)
    devices.loc[0, "usd_per_hour"] = -0.25
    with pytest.raises(ContractError) as caught:
        validate(devices, "catalog.devices", source)
    message = str(caught.value)
    assert "catalog.devices" in message and str(source) in message and "-0.25" in message


def _plan(**changes) -> pd.DataFrame:
    plan = pd.DataFrame({
        "strategy": ["milp", "milp"],
        "operator": ["ExtractImageFeature", "SpeechRecognition"],
        "worker": ["workflow-compute-gpu-1", "workflow-compute-cpu-3"],
        "variant": ["resnet50", "wav2vec2-base-960h"],
        "machines": [1, 2],
        "rate": [40.0, 18.6],
        "capacity": [40.0, 18.6 + 1e-9],
    })
    for column, values in changes.items():
        plan[column] = values
    plan["headroom"] = plan["capacity"] - plan["rate"]
    return plan


def test_plan_at_capacity_up_to_solver_noise_meets_its_contract():
    assert check(_plan(rate=[40.0, 18.6 + 5e-9]), "jellybean.plan") == []


@pytest.mark.parametrize("changes, expected", [
    ({"rate": [-1.0, 18.6]}, "unexpected [-1.0]"),
    ({"rate": [45.0, 18.6]}, "column='headroom'"),
    ({"strategy": ["milp", "round_robin"]}, "'round_robin'"),
    ({"machines": [0, 2]}, "column='machines'"),
])
def test_plan_contract_rejects_bad_rates_machines_and_strategies(changes, expected):
    failures = check(_plan(**changes), "jellybean.plan")
    assert any(expected in f for f in failures), failures


def _evaluation(**changes) -> pd.DataFrame:
    evaluation = pd.DataFrame({
        "strategy": ["milp", "jellybean_heuristic", "infaas_style", "cloud_only"],
        "compute_cost_per_hour": [1.2, 1.3, 1.5, 2.0],
        "network_cost_per_hour": [0.1, 0.1, 0.2, 0.4],
        "total_cost_per_hour": [1.3, 1.4, 1.7, 2.4],
        "accuracy": [56.6, 56.6, 57.9, 56.6],
        "meets_target": [True, True, True, True],
        "savings": [0.46, 0.42, 0.29, 0.0],
        "solve_seconds": [0.8, 0.05, 0.01, 0.0],
    })
    for column, values in changes.items():
        evaluation[column] = values
    return evaluation


def test_evaluation_contract_holds_for_the_four_strategies():
    assert check(_evaluation(), "jellybean.evaluation") == []


def test_evaluation_contract_rejects_unknown_strategy_and_negative_cost():
    failures = check(_evaluation(strategy=["milp", "milp", "greedy", "cloud_only"],
                                 network_cost_per_hour=[0.1, -0.1, 0.2, 0.4]), "jellybean.evaluation")
    assert any("'greedy'" in f for f in failures), failures
    assert any("expect_column_values_to_be_unique" in f and "'milp'" in f for f in failures), failures
    assert any("column='network_cost_per_hour'" in f and "-0.1" in f for f in failures), failures
