"""Contract for an infrastructure spec, as its pools table (one row per pool)."""

import great_expectations as gx

from data_contracts import contract

E = gx.expectations


@contract("infra.pools")
def pools_suite() -> list:
    return [
        E.ExpectTableColumnsToMatchSet(column_set=["name", "tier", "device", "count"], exact_match=True),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToBeUnique(column="name"),
        E.ExpectColumnValuesToBeInSet(column="tier", value_set=["device", "hub", "edge", "cloud"]),
        E.ExpectColumnValuesToBeBetween(column="count", min_value=1),
    ]
