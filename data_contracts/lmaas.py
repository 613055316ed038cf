"""Contracts for LMaaS's data products (flows/lmaas/, tasks/lmaas/stages.py).

- ``lmaas.training``: one row per fine-tuned adapter: steps ≥ 1, losses and accuracies finite, the
  accuracies in [0, 1], training throughput > 0, and the held-out loss *lower* after training than
  before — an adapter that learned nothing (or a forward that is not differentiable in the
  adapter) fails the stage.
- ``lmaas.evaluation``: one row per strategy replaying the same trace: the served service
  always on (``lmaas``) and from zero (``lmaas_serverless``), and known baselines only, each once; every request served (requests and
  tokens > 0), throughput > 0, latencies ≥ 0 with p99 ≥ p50.
"""

import great_expectations as gx

from data_contracts import contract
from data_contracts.common import exact_columns

E = gx.expectations
TRAINING_COLUMNS = ["task", "steps", "heldout_loss_before", "heldout_loss_after", "accuracy_base", "accuracy_adapter",
                    "seconds", "tokens_per_s", "trainable_params"]
EVALUATION_COLUMNS = ["strategy", "requests", "completion_tokens", "makespan_s", "tokens_per_s", "latency_p50_s",
                      "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "tpot_median_s"]
STRATEGIES = ["lmaas", "lmaas_serverless", "multi_lora", "merged_sequential", "unbatched"]


@contract("lmaas.training")
def training_suite() -> list:
    return [
        *exact_columns(*TRAINING_COLUMNS),
        E.ExpectColumnValuesToBeUnique(column="task"),
        E.ExpectColumnValuesToBeBetween(column="steps", min_value=1),
        *[E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1) for c in ("accuracy_base", "accuracy_adapter")],
        E.ExpectColumnValuesToBeBetween(column="heldout_loss_after", min_value=0),
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="heldout_loss_before", column_B="heldout_loss_after",
                                                  or_equal=False),
        E.ExpectColumnValuesToBeBetween(column="tokens_per_s", min_value=0, strict_min=True),
        E.ExpectColumnValuesToBeBetween(column="trainable_params", min_value=1),
    ]


@contract("lmaas.evaluation")
def evaluation_suite() -> list:
    return [
        *exact_columns(*EVALUATION_COLUMNS),
        E.ExpectColumnValuesToBeInSet(column="strategy", value_set=STRATEGIES),
        E.ExpectColumnValuesToBeUnique(column="strategy"),
        *[E.ExpectColumnValuesToBeBetween(column=c, min_value=1) for c in ("requests", "completion_tokens")],
        E.ExpectColumnValuesToBeBetween(column="tokens_per_s", min_value=0, strict_min=True),
        *[E.ExpectColumnValuesToBeBetween(column=c, min_value=0)
          for c in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "tpot_median_s")],
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="latency_p99_s", column_B="latency_p50_s", or_equal=True),
    ]
