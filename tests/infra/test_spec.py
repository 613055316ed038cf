"""Specification of the infrastructure spec loader.

A good spec loads into pools with their Dask resources; a bad one raises InputError
naming the file, the field path and the offending value, before any cluster starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.errors import InputError
from infra.spec import InfraSpec, load_infra_spec

REPO = Path(__file__).resolve().parents[2]
VQA_SPEC = REPO / "data" / "vqa.infra.yaml"


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.infra.yaml"
    path.write_text(text)
    return path


def test_vqa_spec_loads_with_its_pools_in_order():
    spec = load_infra_spec(VQA_SPEC)

    assert isinstance(spec, InfraSpec)
    assert spec.name == "vqa-tiers"
    assert [(p.name, p.tier, p.device, p.count) for p in spec.pools] == [
        ("gateways", "hub", "cpu-small", 4),
        ("edge-orin", "edge", "jetson-agx-orin", 2),
        ("edge-cpu", "edge", "cpu-medium", 2),
        ("cloud-t4", "cloud", "t4", 3),
        ("cloud-cpu", "cloud", "cpu-large", 1),
    ]


def test_vqa_spec_pools_advertise_one_resource_unit_per_machine():
    spec = load_infra_spec(VQA_SPEC)

    assert spec.pool("cloud-t4").resources() == {"tier-cloud": 3, "device-t4": 3, "pool-cloud-t4": 3}
    assert spec.pool("edge-orin").machine_names() == ["edge-orin-0", "edge-orin-1"]
    assert spec.pool("cloud-cpu").machine_names() == ["cloud-cpu"]
    needed = spec.required_resources()
    assert needed["tier-edge"] == 4 and needed["tier-cloud"] == 4 and needed["tier-hub"] == 4


# (spec text, field path the error names, value it names)
BAD_SPECS = {
    "unknown device": (
        "name: x\npools:\n"
        "  - {name: a, tier: edge, device: t4, count: 1}\n"
        "  - {name: b, tier: edge, device: tpu-v9, count: 1}\n",
        "pools[1].device",
        "tpu-v9",
    ),
    "unknown tier": (
        "pools:\n  - {name: a, tier: fog, device: t4}\n",
        "pools[0].tier",
        "fog",
    ),
    "count 0": (
        "pools:\n  - {name: a, tier: edge, device: t4, count: 0}\n",
        "pools[0].count",
        0,
    ),
    "duplicate pool name": (
        "pools:\n  - {name: a, tier: edge, device: t4}\n  - {name: a, tier: cloud, device: t4}\n",
        "pools[1].name",
        "a",
    ),
    "missing pools": (
        "name: x\n",
        "pools",
        None,
    ),
    "empty pools": (
        "name: x\npools: []\n",
        "pools",
        [],
    ),
    "extra key in a pool": (
        "pools:\n  - {name: a, tier: edge, device: t4, gpus: 2}\n",
        "pools[0].gpus",
        2,
    ),
    "extra top-level key": (
        "pools:\n  - {name: a, tier: edge, device: t4}\nregion: eu\n",
        "region",
        "eu",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_error_names_file_field_and_value(tmp_path, case):
    text, field, value = BAD_SPECS[case]
    path = write_spec(tmp_path, text)

    with pytest.raises(InputError) as caught:
        load_infra_spec(path)

    error = caught.value
    assert error.source == str(path)
    assert error.field == field
    assert error.value == value
    message = str(error)
    assert str(path) in message and repr(field) in message and repr(value) in message


def test_unknown_device_and_tier_errors_say_what_is_allowed(tmp_path):
    with pytest.raises(InputError, match=r"the catalog has .*cpu-small.*t4"):
        load_infra_spec(write_spec(tmp_path, BAD_SPECS["unknown device"][0]))
    with pytest.raises(InputError, match="expected one of device, hub, edge, cloud"):
        load_infra_spec(write_spec(tmp_path, BAD_SPECS["unknown tier"][0]))


def test_duplicate_pool_name_error_points_at_the_first_use(tmp_path):
    with pytest.raises(InputError, match=r"used twice \(first by pools\[0\]\)"):
        load_infra_spec(write_spec(tmp_path, BAD_SPECS["duplicate pool name"][0]))


@pytest.mark.parametrize(
    "text, line",
    [
        ("name: x\npools:\n  - {name: a, tier: edge, device: t4}\n  - {name: b, tier: edge, device: t4]\n", 4),
        ("name: x\npools:\n  - name: a\n    tier: edge\n   device: t4\n", 5),
        ("name: x\npools:\n\t- {name: a, tier: edge, device: t4}\n", 3),
    ],
    ids=["unbalanced bracket", "bad indentation", "tab"],
)
def test_malformed_yaml_error_names_file_and_line(tmp_path, text, line):
    path = write_spec(tmp_path, text)

    with pytest.raises(InputError, match="malformed YAML") as caught:
        load_infra_spec(path)

    assert caught.value.source == str(path)
    assert caught.value.field == f"line {line}"
    assert str(path) in str(caught.value)


def test_missing_file_error_names_the_path(tmp_path):
    path = tmp_path / "absent.infra.yaml"

    with pytest.raises(InputError, match="file not found") as caught:
        load_infra_spec(path)

    assert caught.value.source == str(path)


def test_two_pools_alike_in_tier_and_device_are_refused(tmp_path):
    path = tmp_path / "twins.infra.yaml"
    path.write_text(
        "pools:\n"
        "  - {name: a, tier: edge, device: t4, count: 1}\n"
        "  - {name: b, tier: edge, device: t4, count: 2}\n"
    )
    with pytest.raises(InputError) as err:
        load_infra_spec(path)
    assert err.value.field == "pools[1].device"
    assert "merge them into one pool" in str(err.value)
