"""Lazarus as a Prefect flow: profile → optimize → deploy → evaluate, with real failures.

``lazarus`` starts (or connects to) the tiered Dask cluster and runs the stages as a subflow:

- PROFILE: the same training in one process on a worker — its loss curve (what every
  elastic run must follow), its step time, the router's expert loads and what a checkpoint
  costs to write;
- OPTIMIZE: each strategy's replicas and placement for the run's nodes from those loads,
  with the exact probability that the survivors still hold every expert for each number of
  failed nodes (MRO against spread and compact too); checkpoint intervals by Young's rule;
- DEPLOY + EVALUATE: for each strategy (``lazarus`` and the baselines ``reconfig_uniform``
  and ``checkpoint_restart``), training nodes run on the Dask workers (one per worker), and
  the same failure schedule — a node killed every ``fail_every_s`` seconds and a replacement
  arriving ``rejoin_after_s`` later, or a spot trace replayed in scaled time — is injected by
  SIGKILL; goodput (useful tokens/s), recoveries and the loss curve are measured.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402

from data_contracts import validate  # noqa: E402
from infra.cluster import TieredCluster, on_pool  # noqa: E402
from infra.prefect_server import tierflow_home  # noqa: E402
from infra.spec import load_infra_spec  # noqa: E402
from infra.store import open_store  # noqa: E402
from infra.traces import busiest_segment, load_spot_trace  # noqa: E402
from optimizers.lazarus import plan_strategy, recovery_probability  # noqa: E402
from tasks.lazarus.checkpoint import checkpoint_cost  # noqa: E402
from tasks.lazarus.coordinator import POLICIES, checkpoint_interval  # noqa: E402
from tasks.lazarus.faults import FaultInjector, periodic_faults, trace_faults  # noqa: E402
from tasks.lazarus.local import ElasticRun, summarize_run  # noqa: E402
from tasks.lazarus.node import RunSettings, uninterrupted_run  # noqa: E402
from tasks.lazarus.tasks import DaskLauncher  # noqa: E402
from tasks.moe.model import CONFIGS  # noqa: E402

DEFAULT_INFRA = Path(__file__).resolve().parents[1] / "data" / "lazarus.infra.yaml"
SCALES = {  # model, steps, nodes, slots per node, f, sequences per step, seconds between failures, rejoin delay,
    # steps between load-driven re-plans (the paper: 200)
    "tiny": {"model": "tiny", "steps": 40, "nodes": 4, "slots": 4, "f": 2, "global_batch": 24,  # the tests'
             "fail_every_s": 4.0, "rejoin_after_s": None, "rebalance_every": 0},
    "small": {"model": "tiny", "steps": 200, "nodes": 4, "slots": 6, "f": 2, "global_batch": 24,
              "fail_every_s": 15.0, "rejoin_after_s": 6.0, "rebalance_every": 60},
    "medium": {"model": "small", "steps": 300, "nodes": 4, "slots": 4, "f": 2, "global_batch": 24,
               "fail_every_s": 20.0, "rejoin_after_s": 8.0, "rebalance_every": 100},
    "large": {"model": "small", "steps": 600, "nodes": 6, "slots": 4, "f": 2, "global_batch": 24,
              "fail_every_s": 30.0, "rejoin_after_s": 10.0, "rebalance_every": 200},
}
STRATEGIES = tuple(POLICIES)
SIMULATED = [
    "every node is a Dask worker process on this host's CPU: step times, all-to-all and checkpoint costs are this "
    "host's (2 cores shared by all nodes), not a GPU cluster's; GPU-scale figures are in benchmarks/lazarus.py",
    "preemptions are SIGKILLs of worker processes at scheduled times (a trace replay squeezes its minutes into seconds)",
]


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


def _plans(loads: list[float], nodes: int, slots: int, f: int) -> dict:
    """Every strategy's plan and recovery curve, plus MRO vs spread vs compact on the same replicas."""
    out = {}
    for name in ("lazarus", "reconfig_uniform", "spread", "compact"):
        plan = plan_strategy(name, loads, nodes, slots, f)
        out[name] = {**plan.to_dict(), "recovery": {k: recovery_probability(plan.placement, nodes, k)
                                                   for k in range(nodes + 1)}}
    return out


def _run_strategy(policy: str, settings: RunSettings, cluster: TieredCluster, host: str, nodes: int, slots: int, f: int,
                  faults: list, seed: int, rebalance_every: int, logger) -> dict:
    """DEPLOY one strategy on the workers with the schedule of failures; returns its record."""
    run = ElasticRun(settings, policy, slots, f, rebalance_every=rebalance_every, launcher=DaskLauncher(cluster, host),
                     host=host)
    run.start(nodes)
    current = tierflow_home() / "lazarus" / "current.json"  # where `tierflow lazarus kill NODE` finds the run
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text(json.dumps({**run.describe(), "started": time.time()}))
    # never fail below the smallest cluster that holds every expert once (a trace may: it is what happened)
    injector = FaultInjector(run, faults, seed=seed, min_members=math.ceil(settings.model_config().n_expert / slots))
    injector.start()
    record = run.finish(timeout_s=max(600.0, settings.steps * 20))
    injector.stop()
    record["injected"] = injector.events
    logger.info("%s: %d steps in %.1f s, %d recoveries", policy, len(record["losses"]), record["wall_s"],
                len(record["recoveries"]))
    return record


def _plot(records: dict, reference: list[float], table: pd.DataFrame, plans: dict, out: Path) -> list[str]:
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
    fig.savefig(out / "lazarus.png", dpi=110)
    plt.close(fig)
    return ["lazarus.png"]


@flow(name="lazarus-stages", log_prints=True)
def lazarus_stages(cluster: TieredCluster, infra: str, scale: str, strategies: list[str], trace: str | None,
                   time_scale: float, store_url: str | None, results_dir: str, run_id: str, seed: int) -> dict:
    logger = get_run_logger()
    spec = load_infra_spec(infra)
    validate(spec.pools_frame(), "infra.pools", infra)
    shape = SCALES[scale]
    out = Path(results_dir) / "lazarus" / run_id
    out.mkdir(parents=True, exist_ok=True)
    store_url = store_url or str((out / "store").resolve())
    config = replace(CONFIGS[shape["model"]])
    base = RunSettings(config=asdict(config), steps=shape["steps"], global_batch=shape["global_batch"], seed=seed,
                       store_url=store_url, checkpoint_prefix=f"lazarus/{run_id}", timeout_s=15.0)

    with on_pool(spec.pools[0]):  # PROFILE
        profile = profile_training.submit(base, spec.pools[0].name).result()
    nodes, slots, f = shape["nodes"], shape["slots"], shape["f"]
    plans = _plans(profile["loads"], nodes, slots, f)  # OPTIMIZE
    (out / "plan.json").write_text(json.dumps(plans, indent=2, default=str))

    if trace:
        machines = sum(p.count for p in spec.pools if p.worker_per_machine)
        segment = busiest_segment(load_spot_trace(trace), minutes=80, max_nodes=machines).scaled(time_scale)
        nodes, faults = trace_faults(segment)
        nodes = max(1, min(nodes, machines))
        mtbf_s = segment.duration_s / max(segment.preemptions(), 1)
    else:
        horizon = shape["steps"] * profile["step_s"] * 40 + 600
        faults = periodic_faults(shape["fail_every_s"], horizon, shape["rejoin_after_s"])
        mtbf_s = shape["fail_every_s"]
    step_s = max(profile["step_s"], 1e-3)
    # Young's rule on the measured write; a distributed step on the shared workers takes about 3× the
    # single-process one, and a checkpoint adds a barrier and the manifest (about 0.5 s here)
    restart_every = checkpoint_interval(profile["checkpoint_s"] + 0.5, mtbf_s, step_s * 3)
    intervals = {"checkpoint_restart": restart_every, "lazarus": restart_every * 5, "reconfig_uniform": restart_every * 5}

    host = "127.0.0.1"
    records = {}
    for policy in strategies:
        settings = replace(base, checkpoint_every=intervals[policy], checkpoint_prefix=f"lazarus/{run_id}/{policy}")
        records[policy] = _run_strategy(policy, settings, cluster, host, nodes, slots, f, faults, seed,
                                         shape["rebalance_every"], logger)

    tokens_per_step = base.global_batch * config.block_size
    table = pd.DataFrame([summarize_run(records[p], profile["reference"], tokens_per_step) for p in strategies])
    table.to_csv(out / "strategies.csv", index=False)
    (out / "records.json").write_text(json.dumps(  # kept even when the contract below fails the stage
        {p: {"losses": r["losses"], "reference": profile["reference"], "injected": r["injected"], "errors": r["errors"],
             "epochs": [asdict(e) for e in r["epochs"]], "recoveries": [asdict(x) for x in r["recoveries"]],
             "nodes": r["nodes"]} for p, r in records.items()}, indent=1, default=str))
    validate(table, "lazarus.evaluation", "evaluate stage")
    plots = _plot(records, profile["reference"], table, plans, out)
    by = table.set_index("strategy")
    lazarus_row = by.loc["lazarus"] if "lazarus" in by.index else None
    baselines = [s for s in strategies if s != "lazarus"]
    summary = {
        "system": "lazarus", "run_id": run_id, "workload": f"{shape['model']} × {shape['steps']} steps on {nodes} nodes",
        "key_figure": "goodput_tokens_s", "higher_is_better": True,
        "value": round(float(lazarus_row.goodput_tokens_s), 1) if lazarus_row is not None else None,
        "baselines": {s: round(float(by.loc[s, "goodput_tokens_s"]), 1) for s in baselines},
        "speedup": {s: round(float(lazarus_row.goodput_tokens_s / by.loc[s, "goodput_tokens_s"]), 3)
                    for s in baselines} if lazarus_row is not None else {},
        "failures": {s: int(by.loc[s, "failures"]) for s in strategies},
        "restores": {s: int(by.loc[s, "restores"]) for s in strategies},
        "max_loss_deviation": {s: round(float(by.loc[s, "max_loss_deviation"]), 5) for s in strategies},
        "recovery_probability_at_half": {n: round(plans[n]["recovery"][nodes // 2], 4) for n in ("lazarus", "spread", "compact")},
        "checkpoint_every": intervals, "failure_schedule": "trace " + segment.source if trace else
        f"a node killed every {shape['fail_every_s']:.0f} s" + (f", a replacement {shape['rejoin_after_s']:.0f} s later"
                                                                if shape["rejoin_after_s"] is not None else ""),
        "results": str(out), "simulated": SIMULATED,
    }
    markdown = _report(summary, table, plans, nodes, profile, plots)
    (out / "report.md").write_text(markdown)
    create_table_artifact(table.round(4).to_dict("records"), key="lazarus-strategies", description="strategies side by side")
    create_markdown_artifact(markdown, key="lazarus-report", description="Lazarus report")
    document = {"summary": summary, "strategies": table.to_dict("records"), "profile": profile,
                "records": json.loads((out / "records.json").read_text())}
    (out / "evaluation.json").write_text(json.dumps(document, indent=2, default=str))
    return summary


def _report(summary: dict, table: pd.DataFrame, plans: dict, nodes: int, profile: dict, plots: list[str]) -> str:
    lines = [f"# Lazarus — {summary['workload']}", "", f"Failures: {summary['failure_schedule']}.", "",
             table.round(3).to_markdown(index=False), "",
             "Recovery probability for each number of failed nodes (exact), same loads:", "",
             "| failed | " + " | ".join(("lazarus (MRO)", "reconfig_uniform", "spread", "compact")) + " |",
             "|---" * 5 + "|"]
    for k in range(nodes + 1):
        lines.append(f"| {k} | " + " | ".join(f"{plans[n]['recovery'][k]:.3f}"
                                             for n in ("lazarus", "reconfig_uniform", "spread", "compact")) + " |")
    lines += ["", f"Single-process step time {profile['step_s'] * 1e3:.1f} ms; checkpoint write "
              f"{profile['checkpoint_s'] * 1e3:.1f} ms ({profile['checkpoint_bytes'] / 1e6:.1f} MB).", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "Simulated / what this host stands in for:", *[f"- {s}" for s in summary["simulated"]]]
    return "\n".join(lines) + "\n"


@flow(name="lazarus", log_prints=True)
def lazarus(
    infra: str = str(DEFAULT_INFRA),
    scale: str = "small",
    strategies: list[str] | None = None,
    trace: str | None = None,
    time_scale: float = 0.01,
    store: str | None = None,
    scheduler: str | None = None,
    results_dir: str = "results",
    run_id: str | None = None,
    seed: int = 0,
) -> dict:
    """Train an MoE model elastically under injected failures; compare with the baselines.

    Parameters
    ----------
    infra: infrastructure spec (YAML); one pool (worker process) per training node.
    scale: small | medium | large — model, steps, nodes and failure rate (:data:`SCALES`).
    strategies: which of lazarus, reconfig_uniform, checkpoint_restart to run (default: all).
    trace: a spot trace (``time_ms,add|remove,node``) to replay instead of periodic failures;
        its busiest 80-minute segment, capped at the spec's nodes, squeezed by ``time_scale``.
    store: artifact store for checkpoints (path or s3://…; default: the run's folder).
    scheduler: address of an existing Dask scheduler whose workers are on this host.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    strategies = list(strategies or STRATEGIES)
    unknown = [s for s in strategies if s not in POLICIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; expected some of {', '.join(POLICIES)}")
    if trace:
        load_spot_trace(trace)  # bad input fails here, before the cluster starts
    if not 0 < time_scale <= 1 or not math.isfinite(time_scale):
        raise ValueError(f"time_scale must be in (0, 1], got {time_scale}")
    spec = load_infra_spec(infra)
    machines = sum(p.count for p in spec.pools if p.worker_per_machine)
    if machines < SCALES[scale]["nodes"]:
        raise ValueError(f"{infra}: {machines} machines with a worker each (worker_per_machine); a {scale} run "
                         f"needs {SCALES[scale]['nodes']} (one worker process per training node)")
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    started = time.perf_counter()
    # a task on a killed worker is the survivors' to recover, never Dask's to re-run elsewhere
    with TieredCluster(spec, scheduler=scheduler, rerun_lost_tasks=False) as cluster:
        stages = lazarus_stages.with_options(task_runner=DaskTaskRunner(address=cluster.address))
        summary = stages(cluster, infra, scale, strategies, trace, time_scale, store, results_dir, run_id, seed)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    return summary
