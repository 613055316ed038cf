"""Contracts for Lazarus's data products.

- ``lazarus.spot_trace``: a spot-instance trace (``data/spot-traces/*.csv``, headerless:
  ``time_ms,event,node``) — time_ms a number ≥ 0 and never decreasing, event ``add`` or
  ``remove``, node a non-empty name. What one column cannot show (a node removed that was
  never added) is checked by :func:`infra.traces.load_spot_trace`.
"""

import great_expectations as gx

from data_contracts import contract
from data_contracts.common import NUMBER_TYPES, exact_columns

E = gx.expectations
SPOT_TRACE_COLUMNS = ["time_ms", "event", "node"]


@contract("lazarus.spot_trace")
def spot_trace_suite() -> list:
    return [
        *exact_columns(*SPOT_TRACE_COLUMNS),
        E.ExpectColumnValuesToBeInTypeList(column="time_ms", type_list=NUMBER_TYPES),
        E.ExpectColumnValuesToBeBetween(column="time_ms", min_value=0),
        E.ExpectColumnValuesToBeIncreasing(column="time_ms", strictly=False),
        E.ExpectColumnValuesToBeInSet(column="event", value_set=["add", "remove"]),
        E.ExpectColumnValueLengthsToBeBetween(column="node", min_value=1),
    ]
