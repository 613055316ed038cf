"""Contracts for Lazarus's data products.

- ``lazarus.spot_trace``: a spot-instance trace (``data/spot-traces/*.csv``, headerless:
  ``time_ms,event,node``) — time_ms a number ≥ 0 and never decreasing, event ``add`` or
  ``remove``, node a non-empty name. What one column cannot show (a node removed that was
  never added) is checked by :func:`infra.traces.load_spot_trace`.
- ``moe.corpus``: the MoE runtime's training text (``data/moe-corpus.txt``), one row per
  non-blank line: printable ASCII only (the character-level tokenizer's vocabulary stays
  small and every run builds the same one), and enough of it (≥ 1,000 lines) that a model
  cannot memorize it in the steps a run trains.
- ``lazarus.evaluation``: one row per strategy of a run (``flows.lazarus``): goodput ≥ 0 (a
  checkpoint-restart job whose relaunch takes longer than the time between failures makes no useful
  progress in a horizon — the paper says as much of DS at 5-minute failures, §6.2),
  steps ≥ 0, failures/restores/lost steps ≥ 0, and the loss curve's largest deviation from
  the uninterrupted run below 0.1. Float32 reductions in another order alone move a
  200-step curve by up to ~0.04 (measured with no failure at all); a run that lost or
  repeated an update, or dropped optimizer state, drifts further and fails the stage.
"""

import great_expectations as gx

from data_contracts import contract
from data_contracts.common import NUMBER_TYPES, exact_columns

E = gx.expectations
SPOT_TRACE_COLUMNS = ["time_ms", "event", "node"]


CORPUS_COLUMNS = ["line_no", "line"]


@contract("moe.corpus")
def moe_corpus_suite() -> list:
    return [
        *exact_columns(*CORPUS_COLUMNS),
        E.ExpectTableRowCountToBeBetween(min_value=1000),
        E.ExpectColumnValuesToMatchRegex(column="line", regex=r"^[ -~]+$"),
    ]


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


EVALUATION_COLUMNS = ["strategy", "wall_s", "steps", "goodput_tokens_s", "failures", "restores", "lost_steps", "joins",
                      "detect_s", "replan_s", "relaunch_s", "setup_s", "fetch_s", "restore_s", "final_loss",
                      "max_loss_deviation", "completed"]


@contract("lazarus.evaluation")
def evaluation_suite() -> list:
    return [
        E.ExpectTableColumnsToMatchSet(column_set=EVALUATION_COLUMNS, exact_match=True),
        E.ExpectColumnValuesToBeInSet(column="strategy", value_set=["lazarus", "reconfig_uniform", "checkpoint_restart"]),
        E.ExpectColumnValuesToBeUnique(column="strategy"),
        E.ExpectColumnValuesToBeBetween(column="goodput_tokens_s", min_value=0),
        *[E.ExpectColumnValuesToBeBetween(column=c, min_value=0) for c in ("steps", "failures", "restores", "lost_steps")],
        E.ExpectColumnValuesToBeBetween(column="max_loss_deviation", min_value=0, max_value=0.1),
    ]
