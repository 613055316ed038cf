"""Contracts for HoneyBee's data products: its workload tables, its search profile and its evaluation.

The workload products are the CSV tables of a HoneyBee workload folder
(:mod:`tasks.honeybee.workload`), as :func:`tasks.honeybee.workload.load_workload` reads
them: names as text (``"007"`` stays ``"007"``), ids as integers.

Columns, product by product (every table must have exactly these):

- ``honeybee.doc_roles``: doc_id, role — one grant per row, no pair twice
- ``honeybee.user_roles``: user, role — one held role per row, no pair twice
- ``honeybee.query_users``: query_id, user — one row per query
- ``honeybee.search_profile``: kind, n, selectivity, effort, k, recall, latency_s — the grid the
  search cost and recall models are fitted to (:mod:`tasks.honeybee.profile`); kind is
  ``hnsw``, ``ivf`` or ``flat``, selectivity in (0, 1], recall in [0, 1], latency > 0
- ``honeybee.evaluation``: one row per strategy (see :class:`tasks.honeybee.evaluate.StrategyResult`,
  less ``method`` and ``notes``); strategy is one of :data:`STRATEGIES`, storage ≥ 1, recall in
  [0, 1] where the strategy was built, and ``rejected_at_merge`` — documents a search returned
  that the user may not see — is 0: a security failure fails the stage

No column may hold nulls. Ids (``doc_id``, ``query_id``) are an integer column of values
≥ 0; names (``role``, ``user``) are non-empty. What the contracts cannot see from one table
alone (a doc id within the rows of vectors.npy, every doc having a role, query ids covering
0..Q-1, users and roles known to the other tables) is checked by the loader.
"""

import great_expectations as gx

from data_contracts import contract
from data_contracts.common import INTEGER_TYPES, exact_columns as _columns

E = gx.expectations


def _id(column: str) -> list:
    """An integer column of values ≥ 0."""
    return [
        E.ExpectColumnValuesToBeInTypeList(column=column, type_list=INTEGER_TYPES),
        E.ExpectColumnValuesToBeBetween(column=column, min_value=0),
    ]


def _name(column: str) -> list:
    """Non-empty text."""
    return [E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1)]


# --------------------------------------------------------------------------- workload tables


@contract("honeybee.doc_roles")
def doc_roles_suite() -> list:
    return [
        *_columns("doc_id", "role"),
        *_id("doc_id"),
        *_name("role"),
        E.ExpectCompoundColumnsToBeUnique(column_list=["doc_id", "role"]),
    ]


@contract("honeybee.user_roles")
def user_roles_suite() -> list:
    return [
        *_columns("user", "role"),
        *_name("user"),
        *_name("role"),
        E.ExpectCompoundColumnsToBeUnique(column_list=["user", "role"]),
    ]


@contract("honeybee.query_users")
def query_users_suite() -> list:
    return [
        *_columns("query_id", "user"),
        *_id("query_id"),
        E.ExpectColumnValuesToBeUnique(column="query_id"),
        *_name("user"),
    ]


# --------------------------------------------------------------------------- profile and results

STRATEGIES = ["honeybee", "rls", "rls_prefilter", "per_role", "per_user"]
PROFILE_COLUMNS = ["kind", "n", "selectivity", "effort", "k", "recall", "latency_s"]
EVALUATION_COLUMNS = [
    "strategy", "partitions", "storage", "build_s", "index_bytes", "qps", "latency_mean_ms", "latency_p50_ms",
    "latency_p99_ms", "recall", "meets_target", "effort_scale", "predicted_latency_mean_ms", "predicted_recall",
    "searches_per_query", "rejected_at_merge", "built",
]


@contract("honeybee.search_profile")
def search_profile_suite() -> list:
    return [
        *_columns(*PROFILE_COLUMNS),
        E.ExpectColumnValuesToBeInSet(column="kind", value_set=["hnsw", "ivf", "flat"]),
        E.ExpectColumnValuesToBeBetween(column="n", min_value=1),
        E.ExpectColumnValuesToBeBetween(column="selectivity", min_value=0, max_value=1, strict_min=True),
        E.ExpectColumnValuesToBeBetween(column="effort", min_value=0),
        E.ExpectColumnValuesToBeBetween(column="k", min_value=1),
        E.ExpectColumnValuesToBeBetween(column="recall", min_value=0, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="latency_s", min_value=0, strict_min=True),
    ]


@contract("honeybee.evaluation")
def evaluation_suite() -> list:
    return [
        E.ExpectTableColumnsToMatchSet(column_set=EVALUATION_COLUMNS, exact_match=True),
        *[E.ExpectColumnValuesToNotBeNull(column=c) for c in ("strategy", "partitions", "storage", "built",
                                                               "rejected_at_merge")],
        E.ExpectColumnValuesToBeInSet(column="strategy", value_set=STRATEGIES),
        E.ExpectColumnValuesToBeUnique(column="strategy"),
        E.ExpectColumnValuesToBeBetween(column="storage", min_value=1.0 - 1e-9),
        E.ExpectColumnValuesToBeBetween(column="recall", min_value=0, max_value=1),  # nulls (not built) are skipped
        E.ExpectColumnValuesToBeBetween(column="rejected_at_merge", min_value=0, max_value=0),
    ]
