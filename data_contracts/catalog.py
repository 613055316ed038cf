"""Contracts for the device & tier catalog (infra/catalog/*.csv)."""

import great_expectations as gx

from data_contracts import contract

E = gx.expectations
TIERS = ["device", "hub", "edge", "cloud"]


@contract("catalog.devices")
def devices_suite() -> list:
    numeric = ["tflops_fp16", "tflops_fp32", "memory_gib", "memory_gbps", "usd_per_hour", "tdp_watts"]
    return [
        E.ExpectTableColumnsToMatchSet(column_set=["device", "kind", *numeric, "source"], exact_match=True),
        E.ExpectColumnValuesToBeUnique(column="device"),
        E.ExpectColumnValuesToMatchRegex(column="device", regex=r"^[a-z0-9][a-z0-9.-]*$"),
        E.ExpectColumnValuesToBeInSet(column="kind", value_set=["cpu", "edge", "gpu"]),
        *[E.ExpectColumnValuesToBeBetween(column=c, min_value=0, strict_min=True) for c in numeric],
        E.ExpectColumnValuesToNotBeNull(column="source"),
        E.ExpectColumnValueLengthsToBeBetween(column="source", min_value=3),
    ]


@contract("catalog.links")
def links_suite() -> list:
    return [
        E.ExpectTableColumnsToMatchSet(
            column_set=["src_tier", "dst_tier", "bandwidth_mbps", "latency_ms", "usd_per_gb", "source"], exact_match=True
        ),
        E.ExpectColumnValuesToBeInSet(column="src_tier", value_set=TIERS),
        E.ExpectColumnValuesToBeInSet(column="dst_tier", value_set=TIERS),
        E.ExpectCompoundColumnsToBeUnique(column_list=["src_tier", "dst_tier"]),
        E.ExpectTableRowCountToEqual(value=len(TIERS) ** 2),
        E.ExpectColumnValuesToBeBetween(column="bandwidth_mbps", min_value=0, strict_min=True),
        E.ExpectColumnValuesToBeBetween(column="latency_ms", min_value=0),
        E.ExpectColumnValuesToBeBetween(column="usd_per_gb", min_value=0),
        E.ExpectColumnValueLengthsToBeBetween(column="source", min_value=3),
    ]
