"""Lazarus's stages on the tiered cluster: what the flow (flows/lazarus/flow.py) tells in order.

- PROFILE: the same training in one process on a worker — its loss curve (what every elastic run
  must follow), its step time, the router's expert loads and what a checkpoint costs to write;
- OPTIMIZE: each strategy's replicas and placement for the run's nodes from those loads, with the
  exact probability that the survivors still hold every expert for each number of failed nodes (MRO
  against spread and compact too); one checkpoint rule for every strategy (Young's on the share of
  failures its plan must restore for, ``tasks.lazarus.coordinator.CheckpointRule``);
- DEPLOY: for each strategy, training nodes run on the Dask workers (one per worker) and the same
  failure schedule — a node killed every ``fail_every_s`` seconds and a replacement arriving
  ``rejoin_after_s`` later, or a spot trace replayed in scaled time — is injected by SIGKILL;
- EVALUATE: goodput (useful tokens/s), recoveries and the loss curve, side by side.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import get_run_logger  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from data_contracts import validate  # noqa: E402
from infra.cluster import TieredCluster, on_pool  # noqa: E402
from infra.prefect_server import tierflow_home  # noqa: E402
from infra.spec import Pool  # noqa: E402
from infra.store import open_store  # noqa: E402
from infra.traces import SpotTrace, busiest_segment  # noqa: E402
from optimizers.lazarus import plan_strategy, recovery_probability  # noqa: E402
from tasks.common.run import RunContext  # noqa: E402
from tasks.common.tasks import task  # noqa: E402
from tasks.lazarus.checkpoint import checkpoint_cost  # noqa: E402
from tasks.lazarus.coordinator import CheckpointRule  # noqa: E402
from tasks.lazarus.faults import FaultInjector, failed_at_once, periodic_faults, trace_faults  # noqa: E402
from tasks.lazarus.local import ElasticRun, checkpoint_intervals, summarize_run  # noqa: E402
from tasks.lazarus.node import RunSettings, uninterrupted_run  # noqa: E402
from tasks.lazarus.tasks import DaskLauncher  # noqa: E402
from tasks.moe.model import CONFIGS  # noqa: E402

SIMULATED = [
    "every node is a Dask worker process on this host's CPU: step times, all-to-all and checkpoint costs are this "
    "host's (2 cores shared by all nodes), not a GPU cluster's; GPU-scale figures are in benchmarks/lazarus.py",
    "checkpoint write and restore: this host's real I/O plus checkpoint_io_s, GPT-L's 19.2 s per 5-minute failure "
    "interval scaled to the run's (tasks/lazarus/scales.py)",
    "preemptions are SIGKILLs of worker processes at scheduled times (a trace replay squeezes its minutes into seconds)",
]
PLACEMENTS = ("lazarus", "reconfig_uniform", "spread", "compact")  # compared on the same replicas
HOST = "127.0.0.1"  # the nodes' control plane (the workers are processes of this host)


@task(cache_policy=NO_CACHE, task_run_name="profile training on {pool}")
def profile_training(settings: RunSettings, pool: str) -> dict:
    """One process, no failures: the reference loss curve, step time, expert loads, checkpoint cost."""
    start = time.perf_counter()
    losses, loads = uninterrupted_run(settings)
    step_s = (time.perf_counter() - start) / settings.steps
    checkpoint_s, nbytes = checkpoint_cost(open_store(settings.store_url), f"{settings.checkpoint_prefix}-profile",
                                           settings.model_config())
    return {"reference": losses, "step_s": step_s, "checkpoint_s": checkpoint_s, "checkpoint_bytes": nbytes,
            "loads": loads}


def run_settings(run: RunContext, shape: dict) -> RunSettings:
    """The training every strategy runs: the scale's model, steps and batch; checkpoints in the run's
    checkpoint store (default: its folder)."""
    store_url = run.params.checkpoint_store or str(run.path("store").resolve())
    return RunSettings(config=asdict(replace(CONFIGS[shape["model"]])), steps=shape["steps"],
                       global_batch=shape["global_batch"], seed=run.params.seed, store_url=store_url,
                       checkpoint_prefix=f"lazarus/{run.run_id}", timeout_s=shape["timeout_s"],
                       checkpoint_io_s=shape["checkpoint_io_s"])


def for_strategy(settings: RunSettings, policy: str) -> RunSettings:
    """The run's training for one strategy, with checkpoints of its own."""
    return replace(settings, checkpoint_prefix=f"{settings.checkpoint_prefix}/{policy}")


def profile(pool: Pool, settings: RunSettings) -> dict:
    """PROFILE on one pool's worker."""
    with on_pool(pool):
        return profile_training.submit(settings, pool.name).result()


def plan_placements(loads: list[float], nodes: int, slots: int, f: int) -> dict:
    """OPTIMIZE: every strategy's plan and recovery curve, plus MRO vs spread vs compact on the same replicas."""
    out = {}
    for name in PLACEMENTS:
        plan = plan_strategy(name, loads, nodes, slots, f)
        out[name] = {**plan.to_dict(), "recovery": {k: recovery_probability(plan.placement, nodes, k)
                                                   for k in range(nodes + 1)}}
    return out


@dataclass(frozen=True)
class FailureSchedule:
    nodes: int  # nodes the run starts with
    faults: list
    mtbf_s: float
    description: str


def failure_schedule(shape: dict, trace: SpotTrace | None, time_scale: float, machines: int, step_s: float) -> FailureSchedule:
    """The same failures for every strategy: the busiest segment of a spot trace (capped at the spec's
    machines, squeezed in time), or a node killed every ``fail_every_s`` seconds."""
    if trace is not None:
        segment = busiest_segment(trace, minutes=80, max_nodes=machines).scaled(time_scale)
        nodes, faults = trace_faults(segment)
        return FailureSchedule(max(1, min(nodes, machines)), faults, segment.duration_s / max(segment.preemptions(), 1),
                               "trace " + segment.source)
    horizon = shape["steps"] * step_s * 40 + 600
    rejoin = shape["rejoin_after_s"]
    return FailureSchedule(shape["nodes"], periodic_faults(shape["fail_every_s"], horizon, rejoin), shape["fail_every_s"],
                           f"a node killed every {shape['fail_every_s']:.0f} s"
                           + (f", a replacement {rejoin:.0f} s later" if rejoin is not None else ""))


def checkpoint_rule(profiled: dict, schedule: FailureSchedule, shape: dict) -> CheckpointRule:
    """The one checkpoint rule every strategy follows: a checkpoint costs the measured write plus the
    scale's simulated I/O, failures come at the schedule's rate and in its sizes; each epoch's interval
    follows from its own plan's restore probability (:class:`CheckpointRule`)."""
    return CheckpointRule(profiled["checkpoint_s"] + shape["checkpoint_io_s"], schedule.mtbf_s,
                          failed_at_once(schedule.faults))


def train_under_failures(run: RunContext, policy: str, settings: RunSettings, cluster: TieredCluster, shape: dict,
                         schedule: FailureSchedule, rule: CheckpointRule) -> dict:
    """DEPLOY one strategy on the workers with the schedule of failures, for the scale's horizon;
    returns its record."""
    elastic = ElasticRun(settings, policy, shape["slots"], shape["f"], rebalance_every=shape["rebalance_every"],
                         launcher=DaskLauncher(cluster, HOST), host=HOST, checkpoint_rule=rule)
    elastic.start(schedule.nodes)
    current = tierflow_home() / "lazarus" / "current.json"  # where `tierflow lazarus kill NODE` finds the run
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text(json.dumps({**elastic.describe(), "started": time.time()}))
    # never fail below the smallest cluster that holds every expert once (a trace may: it is what happened)
    injector = FaultInjector(elastic, schedule.faults, seed=run.params.seed,
                             min_members=math.ceil(settings.model_config().n_expert / shape["slots"]))
    injector.start()
    record = elastic.finish(timeout_s=shape["horizon_s"] or max(600.0, settings.steps * 20))
    injector.stop()
    record["injected"] = injector.events
    get_run_logger().info("%s: %d steps in %.1f s, %d recoveries", policy, len(record["losses"]), record["wall_s"],
                          len(record["recoveries"]))
    return record


def plot(records: dict, reference: list[float], table: pd.DataFrame, plans: dict):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(range(len(reference)), reference, color="black", lw=2, label="uninterrupted (1 process)")
    for policy, record in records.items():
        losses = record["losses"]
        axes[0].plot(list(losses), list(losses.values()), "--", label=policy)
    axes[0].set(xlabel="step", ylabel="training loss", title="loss across failures")
    axes[0].legend(fontsize=8)
    axes[1].bar(table.strategy, table.goodput_tokens_s, color=["tab:green", "tab:blue", "tab:red"][: len(table)])
    axes[1].set(ylabel="useful tokens / s", title="goodput under the same failures")
    for name in ("lazarus", "spread", "compact"):
        curve = plans[name]["recovery"]
        axes[2].plot(list(curve), list(curve.values()), marker="o", label="MRO (lazarus)" if name == "lazarus" else name)
    axes[2].set(xlabel="failed nodes", ylabel="P(survivors hold every expert)", title="recovery probability (exact)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


def markdown_report(workload: str, regime: str, schedule: FailureSchedule, table: pd.DataFrame, plans: dict,
                    profiled: dict, intervals: dict, plots: list[str]) -> str:
    nodes = max(plans["lazarus"]["recovery"])  # the nodes the placements were planned for
    lines = [f"# Lazarus — {workload}", "", f"Regime: {regime}.", "", f"Failures: {schedule.description}.", "",
             table.round(3).to_markdown(index=False), "",
             "Checkpoint interval each strategy chose, seconds per number of nodes (Young's rule on its plan's "
             "restore probability; None: no periodic checkpoint): "
             + "; ".join(f"{p} {iv}" for p, iv in intervals.items()), "",
             "Recovery probability for each number of failed nodes (exact), same loads:", "",
             "| failed | " + " | ".join(("lazarus (MRO)", *PLACEMENTS[1:])) + " |", "|---" * 5 + "|"]
    for k in range(nodes + 1):
        lines.append(f"| {k} | " + " | ".join(f"{plans[n]['recovery'][k]:.3f}" for n in PLACEMENTS) + " |")
    lines += ["", f"Single-process step time {profiled['step_s'] * 1e3:.1f} ms; checkpoint write "
              f"{profiled['checkpoint_s'] * 1e3:.1f} ms ({profiled['checkpoint_bytes'] / 1e6:.1f} MB).", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "Simulated / what this host stands in for:", *[f"- {s}" for s in SIMULATED]]
    return "\n".join(lines) + "\n"


def evaluate(run: RunContext, records: dict, profiled: dict, plans: dict, schedule: FailureSchedule, shape: dict,
             strategies: list[str]) -> None:
    """EVALUATE: goodput, recoveries and loss deviation side by side; the run's rows, files and artifacts."""
    ran = [s for s in strategies if s in records]
    tokens_per_step = shape["global_batch"] * CONFIGS[shape["model"]].block_size
    table = pd.DataFrame([summarize_run(records[p], profiled["reference"], tokens_per_step) for p in ran])
    run.write_table("strategies", table, "strategies side by side")
    run.write_json("records.json", {  # kept even when the contract below fails the stage
        p: {"losses": r["losses"], "reference": profiled["reference"], "injected": r["injected"], "errors": r["errors"],
            "epochs": [asdict(e) for e in r["epochs"]], "recoveries": [asdict(x) for x in r["recoveries"]],
            "nodes": r["nodes"]} for p, r in records.items()})
    validate(table, "lazarus.evaluation", "evaluate stage")
    run.save_plot(plot(records, profiled["reference"], table, plans), "lazarus")
    workload = f"{shape['model']} × {shape['steps']} steps on {schedule.nodes} nodes"
    intervals = {p: checkpoint_intervals(records[p]) for p in ran}
    # the scale's regime is its periodic failures'; a replayed trace is its own
    regime = f"{schedule.nodes} nodes, f={shape['f']}, {schedule.description}" if run.params.spot_trace else shape["regime"]
    run.write_report(markdown_report(workload, regime, schedule, table, plans, profiled, intervals, ["lazarus.png"]))

    by = table.set_index("strategy")
    summary = run.summary
    summary.regime = regime
    summary.simulated = SIMULATED
    summary.compare("goodput", "tok/s", "higher", by.goodput_tokens_s.to_dict(), strategies[0], strategies[1:], digits=1)
    summary.details = {
        "workload": workload,
        "failures": {s: int(by.loc[s, "failures"]) for s in ran},
        "restores": {s: int(by.loc[s, "restores"]) for s in ran},
        "max_loss_deviation": {s: round(float(by.loc[s, "max_loss_deviation"]), 5) for s in ran},
        "recovery_probability_at_half": {n: round(plans[n]["recovery"][schedule.nodes // 2], 4)
                                         for n in ("lazarus", "spread", "compact")},
        "checkpoint_every_s": intervals,
        "restore_probability": {s: [round(e.restore_probability, 3) for e in records[s]["epochs"]
                                    if e.restore_probability is not None] for s in ran},
        "failure_schedule": schedule.description,
    }
    run.write_evaluation({"strategies": table.to_dict("records"), "profile": profiled,
                          "records": json.loads(run.path("records.json").read_text())})
