"""Contracts for JellyBean's data products: its optimizer inputs, profiles, plans and results.

The optimizer-input products are the tables of a JellyBean optimizer-input folder
(data/jellybean-vqa), read headerless with the columns named below
(:mod:`data_contracts.shipped` builds them). The accuracy table has one column per
operator of ``end_to_end_accuracy.operators`` (they differ between workflows), so its
suite checks only the fixed columns ``combination`` (the row's variants joined by
``"+"``) and ``accuracy``.

Columns, product by product (every table must have exactly these, except the accuracy
table, which adds its operator columns):

- ``jellybean.execution_profile``: operator, worker, variant, latency_ms
- ``jellybean.message_sizes``: upstream, downstream, upstream_variant, downstream_variant, size_kib
- ``jellybean.workers_specs``: worker, usd_per_hour
- ``jellybean.links``: src, dst, usd_per_gb (worker→worker and source→worker links together)
- ``jellybean.rates``: source, rate
- ``jellybean.graph``: upstream, downstream
- ``jellybean.accuracy_table``: <one per operator>, combination, accuracy
- ``jellybean.profile``: pool, tier, device, operator, variant, measured_ms, latency_ms, simulated
- ``jellybean.plan``: strategy, operator, worker, variant, machines, rate, capacity, headroom
- ``jellybean.evaluation``: strategy, compute_cost_per_hour, network_cost_per_hour,
  total_cost_per_hour, accuracy, meets_target, savings, solve_seconds
- ``jellybean.deploy``: strategy, operator, worker, tier, requests, measured_ms_per_request,
  achieved_rate, planned_rate

Capacity in a plan: a plan's ``rate`` comes from the MILP solver, which meets
``rate ≤ capacity`` only up to its feasibility tolerance, so an exact pairwise comparison
(``ExpectColumnPairValuesAToBeGreaterThanB``) would reject optimal plans over ~1e-9 of
noise. The caller therefore adds the derived column ``headroom = capacity - rate`` and the
suite requires ``headroom ≥ -1e-6`` (the tolerance :func:`optimizers.jellybean.plan_violations`
uses). ``rate`` must be ≥ 0 exactly: clip solver noise (``max(rate, 0.0)``) before validating.

No column may hold nulls. Numeric columns must hold numbers (a cell that did not parse is
reported as its text); booleans (``simulated``, ``meets_target``) must be a bool column;
counts (``machines``, ``requests``) an integer column. ``strategy`` in plans, evaluations and deploy
measurements is one of :data:`STRATEGIES`.
"""

import great_expectations as gx

from data_contracts import contract
from data_contracts.common import INTEGER_TYPES, NUMBER_TYPES, exact_columns as _columns

E = gx.expectations
TIERS = ["device", "hub", "edge", "cloud"]
STRATEGIES = ["milp", "jellybean_heuristic", "infaas_style", "cloud_only"]
HEADROOM_TOLERANCE = 1e-6


def _number(column: str) -> list:
    """Every value is a number (a cell that failed to parse is reported as the text it holds)."""
    return [E.ExpectColumnValuesToBeInTypeList(column=column, type_list=NUMBER_TYPES)]


def _at_least(column: str, low: float, *, strict: bool = False) -> list:
    return [*_number(column), E.ExpectColumnValuesToBeBetween(column=column, min_value=low, strict_min=strict)]


def _boolean(column: str) -> list:
    return [E.ExpectColumnValuesToBeOfType(column=column, type_="bool")]


def _count(column: str, low: int) -> list:
    return [
        E.ExpectColumnValuesToBeInTypeList(column=column, type_list=INTEGER_TYPES),
        E.ExpectColumnValuesToBeBetween(column=column, min_value=low),
    ]


# --------------------------------------------------------------------------- optimizer inputs


@contract("jellybean.execution_profile")
def execution_profile_suite() -> list:
    return [
        *_columns("operator", "worker", "variant", "latency_ms"),
        E.ExpectCompoundColumnsToBeUnique(column_list=["operator", "worker", "variant"]),
        *_at_least("latency_ms", 0, strict=True),
    ]


@contract("jellybean.message_sizes")
def message_sizes_suite() -> list:
    keys = ["upstream", "downstream", "upstream_variant", "downstream_variant"]
    return [
        *_columns(*keys, "size_kib"),
        E.ExpectCompoundColumnsToBeUnique(column_list=keys),
        *_at_least("size_kib", 0),
    ]


@contract("jellybean.workers_specs")
def workers_specs_suite() -> list:
    return [
        *_columns("worker", "usd_per_hour"),
        E.ExpectColumnValuesToBeUnique(column="worker"),
        *_at_least("usd_per_hour", 0),
    ]


@contract("jellybean.links")
def links_suite() -> list:
    return [
        *_columns("src", "dst", "usd_per_gb"),
        E.ExpectCompoundColumnsToBeUnique(column_list=["src", "dst"]),
        *_at_least("usd_per_gb", 0),
    ]


@contract("jellybean.rates")
def rates_suite() -> list:
    return [
        *_columns("source", "rate"),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToBeUnique(column="source"),
        *_at_least("rate", 0, strict=True),
    ]


@contract("jellybean.graph")
def graph_suite() -> list:
    return [
        *_columns("upstream", "downstream"),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectCompoundColumnsToBeUnique(column_list=["upstream", "downstream"]),
        # No self-loops: within a row, upstream and downstream differ.
        E.ExpectSelectColumnValuesToBeUniqueWithinRecord(column_list=["upstream", "downstream"]),
    ]


@contract("jellybean.workflow")
def workflow_suite() -> list:
    """A workflow spec as its nodes: sources (with a rate) and operators (with inputs and variants)."""
    return [
        *_columns("node", "kind", "inputs", "variants", "rate"),
        E.ExpectColumnValuesToBeUnique(column="node"),
        E.ExpectColumnValuesToBeInSet(column="kind", value_set=["source", "operator"]),
        *_count("variants", 1),
        *_at_least("rate", 0),
    ]


@contract("jellybean.accuracy_table")
def accuracy_table_suite() -> list:
    return [
        E.ExpectTableColumnsToMatchSet(column_set=["combination", "accuracy"], exact_match=False),
        E.ExpectTableColumnCountToBeBetween(min_value=3),  # at least one operator column
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="combination"),
        E.ExpectColumnValuesToBeUnique(column="combination"),
        E.ExpectColumnValuesToNotBeNull(column="accuracy"),
        *_number("accuracy"),
        E.ExpectColumnValuesToBeBetween(column="accuracy", min_value=0, max_value=100),
    ]


# --------------------------------------------------------------------------- stage products


@contract("jellybean.profile")
def profile_suite() -> list:
    return [
        *_columns("pool", "tier", "device", "operator", "variant", "measured_ms", "latency_ms", "simulated"),
        E.ExpectColumnValuesToBeInSet(column="tier", value_set=TIERS),
        *_at_least("measured_ms", 0, strict=True),
        *_at_least("latency_ms", 0, strict=True),
        *_boolean("simulated"),
    ]


@contract("jellybean.plan")
def plan_suite() -> list:
    return [
        *_columns("strategy", "operator", "worker", "variant", "machines", "rate", "capacity", "headroom"),
        E.ExpectColumnValuesToBeInSet(column="strategy", value_set=STRATEGIES),
        *_count("machines", 1),
        *_at_least("rate", 0),
        *_at_least("capacity", 0, strict=True),
        *_at_least("headroom", -HEADROOM_TOLERANCE),  # headroom = capacity - rate
    ]


@contract("jellybean.evaluation")
def evaluation_suite() -> list:
    return [
        *_columns("strategy", "compute_cost_per_hour", "network_cost_per_hour", "total_cost_per_hour",
                  "accuracy", "meets_target", "savings", "solve_seconds"),
        E.ExpectColumnValuesToBeUnique(column="strategy"),
        E.ExpectColumnValuesToBeInSet(column="strategy", value_set=STRATEGIES),
        *_at_least("compute_cost_per_hour", 0),
        *_at_least("network_cost_per_hour", 0),
        *_at_least("total_cost_per_hour", 0),
        *_number("accuracy"),
        *_boolean("meets_target"),
        *_number("savings"),
        E.ExpectColumnValuesToBeBetween(column="savings", max_value=1),
        *_at_least("solve_seconds", 0),
    ]


@contract("jellybean.deploy")
def deploy_suite() -> list:
    return [
        *_columns("strategy", "operator", "worker", "tier", "requests", "measured_ms_per_request",
                  "achieved_rate", "planned_rate"),
        E.ExpectColumnValuesToBeInSet(column="strategy", value_set=STRATEGIES),
        E.ExpectColumnValuesToBeInSet(column="tier", value_set=TIERS),
        *_count("requests", 0),
        *_at_least("measured_ms_per_request", 0, strict=True),
        *_at_least("achieved_rate", 0),
        *_at_least("planned_rate", 0),
    ]
