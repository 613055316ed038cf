"""The sizes a Lazarus run comes in, as data: model, cluster, failures, and the regime each stands for.

The paper's claim (Wu et al., arXiv:2407.04656v2, §6.2) is goodput under frequent failures on a
cluster that a failure leaves mostly whole, for a model whose checkpoint restore is expensive:
GPT-L, 16 experts in 6 slots per GPU — so DeepSpeed's expert parallelism needs EP groups of 4 and
holds each expert on few nodes — with a 24 GB checkpoint (19 s to NFS at 10 Gb/s) against a failure
every 5 minutes. ``small`` (the demo) keeps those ratios at a size this host trains in seconds:

- 8 experts in 3 slots per node is GPT-L's 16 in 6 (EP groups of 4, 2 slots used, as GPT-L uses 4
  of 6); on 6 nodes Lazarus survives any single failure, DeepSpeed's one EP group 1 time in 3
  (exact: ``optimizers.lazarus.restore_probability``; the README has the whole table);
- a node killed every ``fail_every_s`` and replaced ``rejoin_after_s`` later (a spot market's churn;
  the cluster is back to 6 before the next failure);
- every checkpoint write and restore takes the paper's checkpoint time per failure interval
  (:func:`paper_checkpoint_io_s`, *simulated*: this host writes the tiny model's 7 MB in ~30 ms,
  which makes a restore almost free and hides what Lazarus avoids);
- the collective timeout — how long a survivor gloo leaves waiting takes to notice — is 8 s: under
  a shared host's load (10+ on 2 cores) a 3 s timeout fired on healthy collectives; each strategy
  trains for the same ``horizon_s`` under the same schedule.

Keys per scale: model (``tasks.moe.model.CONFIGS``), steps (the run's length; the learning-rate
schedule and the reference curve), nodes, slots, f, global_batch, fail_every_s, rejoin_after_s (None:
no replacement), rebalance_every (steps between load re-plans; the paper: 200), horizon_s (seconds
each strategy trains; None: until ``steps``), timeout_s, checkpoint_io_s, regime (one phrase for the
summary row).
"""

from __future__ import annotations

from tasks.lazarus.simulate import STORAGE_GBPS, checkpoint_bytes

PAPER_MTBF_S = 5 * 60.0  # §6.2: a node fails every 5 minutes (the "high frequency" runs)
# GPT-L's weights and optimizer state (§6.3's 112 MB per expert reproduced) over the 10 Gb/s NFS link (§6.1)
PAPER_CHECKPOINT_S = checkpoint_bytes("gpt-l") / (STORAGE_GBPS * 1e9 / 8)


def paper_checkpoint_io_s(mtbf_s: float) -> float:
    """Seconds a checkpoint write (and a restore) takes so that, against failures every ``mtbf_s``,
    it costs what GPT-L's did against §6.2's 5 minutes: 19.2 s / 300 s × mtbf_s."""
    return PAPER_CHECKPOINT_S / PAPER_MTBF_S * mtbf_s


def _regime(nodes: int, fail_every_s: float) -> str:
    return f"frequent failures, GPT-L ratios: 1 of {nodes} nodes lost/{fail_every_s:g} s"


SCALES = {
    "tiny": {"model": "tiny", "steps": 40, "nodes": 4, "slots": 4, "f": 2, "global_batch": 24,  # the tests'
             "fail_every_s": 4.0, "rejoin_after_s": None, "rebalance_every": 0, "horizon_s": None,
             "timeout_s": 15.0, "checkpoint_io_s": 0.0, "regime": "test size: 4 nodes, a failure every 4 s, no replacement"},
    "small": {"model": "tiny", "steps": 240, "nodes": 6, "slots": 3, "f": 2, "global_batch": 24,
              "fail_every_s": 12.0, "rejoin_after_s": 4.0, "rebalance_every": 60, "horizon_s": 40.0,
              "timeout_s": 8.0, "checkpoint_io_s": paper_checkpoint_io_s(12.0), "regime": _regime(6, 12.0)},
    "medium": {"model": "small", "steps": 600, "nodes": 6, "slots": 3, "f": 2, "global_batch": 24,
               "fail_every_s": 20.0, "rejoin_after_s": 6.0, "rebalance_every": 100, "horizon_s": 120.0,
               "timeout_s": 10.0, "checkpoint_io_s": paper_checkpoint_io_s(20.0), "regime": _regime(6, 20.0)},
    "large": {"model": "small", "steps": 1200, "nodes": 6, "slots": 3, "f": 2, "global_batch": 24,
              "fail_every_s": 30.0, "rejoin_after_s": 10.0, "rebalance_every": 200, "horizon_s": 300.0,
              "timeout_s": 10.0, "checkpoint_io_s": paper_checkpoint_io_s(30.0), "regime": _regime(6, 30.0)},
}
