"""Bad JellyBean input is refused before any work starts, naming the file, field and value."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from infra.catalog import load_catalog
from infra.errors import InputError
from infra.spec import load_infra_spec
from tasks.jellybean.inputs import load_repository_inputs
from tasks.jellybean.workflow import build_problem, load_workflow

ROOT = Path(__file__).resolve().parents[2]
VQA = ROOT / "data" / "jellybean-vqa"


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "inputs"
    shutil.copytree(VQA, folder)
    return folder


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text().rstrip("\n") + "\n" + line + "\n")


def test_shipped_inputs_load_including_the_row_with_a_trailing_comma():
    problem = load_repository_inputs(VQA)
    assert problem.latency_ms["SpeechRecognition", "workflow-compute-cpu-3", "wav2vec2-base-960h"] == pytest.approx(107.50537608333333)
    assert problem.operators == ["ExtractImageFeature", "SpeechRecognition", "VQA"]


@pytest.mark.parametrize("file, line, field, value", [
    ("execution_profile.csv", "VQA,workflow-compute-cpu-1,default,fast", "latency_ms", "fast"),
    ("execution_profile.csv", "VQA,workflow-compute-cpu-9,default,3.0", "worker", "workflow-compute-cpu-9"),
    ("input_injection_rates.csv", "ReadImage,-40", "rate", "-40"),
    ("message_sizes.csv", "ExtractImageFeature,VQA,resnet999,default,2.0", "upstream_variant", "resnet999"),
    ("workers_specs.csv", "workflow-compute-cpu-1,0.1,extra", "row", "workflow-compute-cpu-1,0.1,extra"),
])
def test_bad_csv_rows_name_file_row_field_and_value(inputs, file, line, field, value):
    append(inputs / file, line)
    with pytest.raises(InputError) as err:
        load_repository_inputs(inputs)
    assert err.value.source.endswith(file)
    assert field in err.value.field
    assert err.value.value == value


def test_a_missing_profile_for_one_variant_on_a_worker_is_named(inputs):
    path = inputs / "execution_profile.csv"
    rows = [r for r in path.read_text().splitlines() if not r.startswith("ExtractImageFeature,workflow-compute-cpu-2,resnet50")]
    path.write_text("\n".join(rows))
    with pytest.raises(InputError) as err:
        load_repository_inputs(inputs)
    assert err.value.value == "ExtractImageFeature,workflow-compute-cpu-2,resnet50"
    assert "missing profile" in str(err.value)


def test_an_unknown_variant_in_the_accuracy_table_is_named(inputs):
    path = inputs / "execution_profile.csv"
    path.write_text("\n".join(r for r in path.read_text().splitlines() if ",resnet152," not in r))
    with pytest.raises(InputError) as err:
        load_repository_inputs(inputs)
    assert err.value.value == "resnet152"


def test_a_missing_file_is_named(inputs):
    (inputs / "message_sizes.csv").unlink()
    with pytest.raises(InputError, match="message_sizes.csv"):
        load_repository_inputs(inputs)


@pytest.fixture
def workflow(tmp_path):
    spec = yaml.safe_load((ROOT / "data" / "vqa.workflow.yaml").read_text())
    spec["accuracy"]["profiles"] = str(VQA / "accuracy_profiles.json")
    spec["messages"] = str(VQA / "message_sizes.csv")
    return spec


def write(tmp_path, spec) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_cyclic_workflow_is_refused(tmp_path, workflow):
    workflow["operators"]["ExtractImageFeature"]["inputs"] = ["ReadImage", "VQA"]
    with pytest.raises(InputError, match="cycle"):
        load_workflow(write(tmp_path, workflow))


def test_a_negative_rate_is_refused_with_its_field(tmp_path, workflow):
    workflow["sources"]["ReadImage"]["rate"] = -5
    with pytest.raises(InputError) as err:
        load_workflow(write(tmp_path, workflow))
    assert err.value.field == "sources.ReadImage.rate"
    assert err.value.value == -5


def test_an_unknown_input_node_is_named(tmp_path, workflow):
    workflow["operators"]["VQA"]["inputs"] = ["ExtractImageFeature", "SpeechRecognitoin"]
    with pytest.raises(InputError) as err:
        load_workflow(write(tmp_path, workflow))
    assert err.value.value == "SpeechRecognitoin"


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("name: vqa\nsources:\n  ReadImage: {rate: 40\n")
    with pytest.raises(InputError) as err:
        load_workflow(path)
    assert err.value.field.startswith("line ")


def test_a_missing_profile_row_is_named_when_building_the_problem(tmp_path, workflow):
    spec = load_workflow(write(tmp_path, workflow))
    infra = load_infra_spec(ROOT / "data" / "vqa.infra.yaml")
    rows = [{"pool": p.name, "operator": op, "variant": v, "latency_ms": 10.0}
            for p in infra.pools for op, o in spec.operators.items() for v in o.variants]
    profile = pd.DataFrame(rows[1:])
    with pytest.raises(InputError) as err:
        build_problem(spec, infra, profile, load_catalog())
    first = rows[0]
    assert err.value.value == f"{first['operator']},{first['pool']},{first['variant']}"


def test_a_truncated_json_file_is_named_not_a_traceback(inputs):
    (inputs / "accuracy_profiles.json").write_text("{\n")
    with pytest.raises(InputError, match="malformed JSON"):
        load_repository_inputs(inputs)


def test_an_accuracy_row_with_too_few_variants_is_named(inputs):
    import json

    path = inputs / "accuracy_profiles.json"
    data = json.loads(path.read_text())
    data["end_to_end_accuracy"]["table"][3]["variants"] = ["resnet34"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        load_repository_inputs(inputs)
    assert err.value.field == "end_to_end_accuracy.table[3].variants"


@pytest.mark.parametrize("rate", [0, -3, "fast"])
def test_a_rate_override_is_checked_like_the_spec(tmp_path, workflow, rate):
    with pytest.raises(InputError, match="> 0"):
        load_workflow(write(tmp_path, workflow), rate=rate)


def test_a_variant_typo_in_the_execution_profile_is_an_unknown_variant_on_its_own_row(inputs):
    path = inputs / "execution_profile.csv"
    lines = path.read_text().splitlines()
    row = next(i for i, r in enumerate(lines) if r.startswith("ExtractImageFeature,workflow-compute-cpu-3,resnet50,"))
    lines[row] = lines[row].replace(",resnet50,", ",resnet5O,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        load_repository_inputs(inputs)
    assert err.value.source.endswith("execution_profile.csv")
    assert err.value.field == f"row {row + 1} variant" and err.value.value == "resnet5O"
    assert "unknown variant of ExtractImageFeature" in err.value.reason and "resnet50" in err.value.reason


@pytest.mark.parametrize("extra, cycle", [
    ("ExtractImageFeature,ReadImage", "ExtractImageFeature → ReadImage → ExtractImageFeature"),
    ("VQA,ReadSpeech", "VQA → ReadSpeech → SpeechRecognition → VQA"),
])
def test_a_reversed_edge_that_makes_a_cycle_names_the_cycle(inputs, extra, cycle):
    append(inputs / "logical_graph.csv", extra)
    with pytest.raises(InputError) as err:
        load_repository_inputs(inputs)
    assert err.value.source.endswith("logical_graph.csv")
    assert err.value.field == "row 5" and err.value.value == extra
    assert f"closes a cycle {cycle}" in err.value.reason and "listed twice" not in err.value.reason


def test_an_edge_listed_twice_names_both_rows(inputs):
    append(inputs / "logical_graph.csv", "ReadImage,ExtractImageFeature")
    with pytest.raises(InputError) as err:
        load_repository_inputs(inputs)
    assert err.value.field == "row 5" and "listed twice (first on row 1)" in err.value.reason


def test_a_cycle_in_a_workflow_spec_names_the_cycle(tmp_path, workflow):
    workflow["operators"]["ExtractImageFeature"]["inputs"] = ["ReadImage", "VQA"]
    with pytest.raises(InputError) as err:
        load_workflow(write(tmp_path, workflow))
    assert "closes a cycle" in err.value.reason
    assert "ExtractImageFeature → VQA" in err.value.reason or "VQA → ExtractImageFeature" in err.value.reason


def test_an_input_listed_twice_in_a_workflow_spec_is_named(tmp_path, workflow):
    workflow["operators"]["VQA"]["inputs"] = ["ExtractImageFeature", "SpeechRecognition", "ExtractImageFeature"]
    with pytest.raises(InputError) as err:
        load_workflow(write(tmp_path, workflow))
    assert err.value.field == "operators.VQA.inputs" and err.value.value == "ExtractImageFeature"
