"""The device & tier catalog: what it must hold, and how it reports a bad file."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from infra.catalog import (
    DEFAULT_DEVICES_PATH,
    DEFAULT_LINKS_PATH,
    TIERS,
    CatalogError,
    load_catalog,
    tier_rank,
)

REQUIRED_DEVICES = {
    "cpu-small": "cpu", "cpu-medium": "cpu", "cpu-large": "cpu",
    "jetson-orin-nano": "edge", "jetson-agx-orin": "edge",
    "t4": "gpu", "v100": "gpu", "a40": "gpu", "l40s": "gpu", "a100": "gpu", "h100": "gpu", "h200": "gpu",
    "a10g": "gpu", "rtx3090": "gpu",  # the Lazarus simulator's nodes (the paper's testbed and AWS G5)
}
FIGURES = ("tflops_fp16", "tflops_fp32", "memory_gib", "memory_gbps", "usd_per_hour", "tdp_watts")


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


# --- what the shipped catalog holds ---------------------------------------------------------

@pytest.mark.parametrize("name, kind", REQUIRED_DEVICES.items())
def test_every_required_device_is_present_with_positive_figures_and_a_source(catalog, name, kind):
    device = catalog.device(name)
    assert device.kind == kind
    for figure in FIGURES:
        assert getattr(device, figure) > 0, figure
    assert device.source.strip()


def test_fp16_tensor_peak_is_at_least_the_fp32_peak_on_every_device(catalog):
    for device in catalog.devices.values():
        assert device.tflops_fp16 >= device.tflops_fp32, device.device


def test_tiers_are_ordered_device_hub_edge_cloud():
    assert [tier_rank(t) for t in ("device", "hub", "edge", "cloud")] == [0, 1, 2, 3]
    with pytest.raises(CatalogError, match="'moon'"):
        tier_rank("moon")


def test_every_ordered_pair_of_tiers_has_a_link(catalog):
    for src in TIERS:
        for dst in TIERS:
            link = catalog.link(src, dst)
            assert (link.src_tier, link.dst_tier) == (src, dst)
            assert link.bandwidth_mbps > 0 and link.latency_ms >= 0 and link.source.strip()
    assert len(catalog.links) == len(TIERS) ** 2


def test_same_tier_links_cost_nothing(catalog):
    for tier in TIERS:
        assert catalog.link(tier, tier).usd_per_gb == 0


def test_data_leaving_the_cloud_for_the_internet_costs_aws_egress(catalog):
    assert catalog.link("cloud", "device").usd_per_gb == 0.09
    assert catalog.link("cloud", "hub").usd_per_gb == 0.09
    assert catalog.link("device", "cloud").usd_per_gb > 0  # AWS ingress is free, the carrier uplink is metered


def test_h200_is_faster_than_t4_by_the_ratio_of_their_fp16_tflops(catalog):
    h200, t4 = catalog.device("h200"), catalog.device("t4")
    assert catalog.speedup("t4", "h200") == pytest.approx(h200.tflops_fp16 / t4.tflops_fp16)
    assert catalog.speedup("t4", "h200") > 1
    assert catalog.speedup("h200", "t4") == pytest.approx(1 / catalog.speedup("t4", "h200"))


def test_memory_bound_speedup_is_the_ratio_of_memory_bandwidth(catalog):
    assert catalog.speedup("a100", "h200", bound="memory") == pytest.approx(4800 / 1555)


def test_cpu_throughput_counts_fp32_because_cpus_lack_fp16_tensor_units(catalog):
    cpu, t4 = catalog.device("cpu-large"), catalog.device("t4")
    assert catalog.speedup("cpu-large", "t4") == pytest.approx(t4.tflops_fp16 / cpu.tflops_fp32)


def test_unknown_bound_is_rejected_by_name(catalog):
    with pytest.raises(CatalogError, match="'latency'"):
        catalog.speedup("t4", "h200", bound="latency")


def test_unknown_device_error_names_it_and_lists_the_known_ones(catalog):
    with pytest.raises(CatalogError) as caught:
        catalog.device("tpu-v5")
    message = str(caught.value)
    assert "'tpu-v5'" in message
    assert all(name in message for name in REQUIRED_DEVICES)


def test_the_shipped_catalog_is_read_once(catalog):
    assert load_catalog() is catalog


def test_frames_have_one_row_per_device_and_per_link(catalog):
    devices, links = catalog.devices_frame(), catalog.links_frame()
    assert sorted(devices["device"]) == sorted(REQUIRED_DEVICES)
    assert list(devices.columns) == ["device", "kind", *FIGURES, "source"]
    assert len(links) == len(TIERS) ** 2
    assert list(links.columns) == ["src_tier", "dst_tier", "bandwidth_mbps", "latency_ms", "usd_per_gb", "source"]


# --- how a bad file is reported -------------------------------------------------------------

def _copy_with_change(src: Path, dst: Path, data_row: int, column: str, value: str) -> Path:
    """Copy a shipped CSV, setting ``column`` of its ``data_row``-th row (0-based) to ``value``."""
    with open(src, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[data_row][column] = value
    with open(dst, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


@pytest.mark.parametrize("which, data_row, column, value", [
    ("devices", 5, "usd_per_hour", "-0.5"),        # negative price
    ("devices", 0, "kind", "tpu"),                 # unknown kind
    ("devices", 3, "tflops_fp16", "fast"),         # not a number
    ("devices", 7, "memory_gbps", "nan"),          # not a finite number
    ("devices", 2, "device", "Big CPU"),           # name with capitals and a space
    ("devices", 4, "source", ""),                  # no citation
    ("devices", 6, "device", "t4"),                # duplicate device (t4 is row 2 of the data)
    ("links", 2, "bandwidth_mbps", "lots"),        # non-numeric bandwidth
    ("links", 9, "src_tier", "moon"),              # unknown tier
    ("links", 4, "usd_per_gb", "-0.01"),           # negative transfer price
])
def test_a_bad_value_names_the_file_row_field_and_value(tmp_path, which, data_row, column, value):
    shipped = DEFAULT_DEVICES_PATH if which == "devices" else DEFAULT_LINKS_PATH
    bad = _copy_with_change(shipped, tmp_path / f"{which}.csv", data_row, column, value)
    with pytest.raises(CatalogError) as caught:
        load_catalog(**{f"{which}_path": bad})
    error, row = caught.value, data_row + 2  # row 1 is the header
    assert (error.source, error.row, error.field, error.value) == (str(bad), row, column, value)
    message = str(error)
    assert str(bad) in message and f"row {row}" in message and repr(column) in message and repr(value) in message


def test_a_missing_column_is_named(tmp_path):
    bad = tmp_path / "devices.csv"
    lines = DEFAULT_DEVICES_PATH.read_text().splitlines()
    bad.write_text("\n".join(line.rsplit(",", 1)[0] if i == 0 else line for i, line in enumerate(lines)))
    with pytest.raises(CatalogError, match=r"row 1: header lacks column 'source'"):
        load_catalog(devices_path=bad)


def test_a_links_file_missing_a_tier_pair_says_which(tmp_path):
    bad = tmp_path / "links.csv"
    lines = DEFAULT_LINKS_PATH.read_text().splitlines()
    bad.write_text("\n".join(line for line in lines if not line.startswith("edge,hub,")))
    with pytest.raises(CatalogError, match=r"no link edge -> hub"):
        load_catalog(links_path=bad)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CatalogError, match="nowhere.csv"):
        load_catalog(devices_path=tmp_path / "nowhere.csv")


def test_explicit_files_are_read_afresh(tmp_path):
    cheap = _copy_with_change(DEFAULT_DEVICES_PATH, tmp_path / "devices.csv", 5, "usd_per_hour", "0.1")
    custom = load_catalog(devices_path=cheap)
    assert custom is not load_catalog()
    assert custom.device("t4").usd_per_hour == 0.1
    assert load_catalog().device("t4").usd_per_hour == 0.526
