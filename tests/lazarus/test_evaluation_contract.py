"""The evaluation table's contract: a baseline that made no useful progress is a result, a negative
goodput or a loss curve that strayed is not."""

import pandas as pd
import pytest

from data_contracts import ContractError, validate
from data_contracts.lazarus import EVALUATION_COLUMNS


def row(strategy: str, goodput: float, deviation: float = 0.01) -> dict:
    values = {c: 0.0 for c in EVALUATION_COLUMNS}
    return {**values, "strategy": strategy, "goodput_tokens_s": goodput, "max_loss_deviation": deviation,
            "steps": 0 if goodput == 0 else 100, "completed": False}


def test_a_checkpoint_restart_job_that_never_got_going_is_a_valid_result():
    table = pd.DataFrame([row("lazarus", 2000.0), row("checkpoint_restart", 0.0)])
    validate(table, "lazarus.evaluation", "test")


@pytest.mark.parametrize("bad", [row("lazarus", -1.0), row("lazarus", 2000.0, deviation=0.5)])
def test_negative_goodput_or_a_strayed_loss_curve_breaks_it(bad):
    with pytest.raises(ContractError):
        validate(pd.DataFrame([bad]), "lazarus.evaluation", "test")
