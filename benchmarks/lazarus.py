"""Lazarus side by side: real elastic training under failures, exact recovery odds, simulated scale.

    .venv/bin/python -m benchmarks.lazarus [--scale small] [--horizon S] [--repeats 3]
                                           [--io-sweep 0,0.77] [--quick] [--out results/benchmarks/lazarus]

1. Real, here, in the demo's regime (``tasks.lazarus.scales``, default ``small``: the tiny MoE's
   8 experts on 6 node processes with 3 expert slots each — GPT-L's 16 experts per 6 slots —, f = 2,
   a node SIGKILLed every ``fail_every_s`` and replaced ``rejoin_after_s`` later, GPT-L's checkpoint
   cost per failure interval simulated as ``checkpoint_io_s``): each strategy — ``lazarus``,
   ``reconfig_uniform``, ``checkpoint_restart`` — trains for the same horizon under the same
   schedule, ``--repeats`` times, the strategies interleaved so the shared host's load falls on
   each alike. Every strategy checkpoints by the same rule, Young's on the share of failures its own
   plan must restore for (``tasks.lazarus.coordinator.CheckpointRule``). Goodput is the useful
   steps the members hold at the horizon × tokens per step ÷ the horizon. With ``--io-sweep`` the
   same runs repeat for each simulated checkpoint cost (0: this host's real ~30 ms), which is where
   Lazarus's gain over ``reconfig_uniform`` comes from: the crossover, measured. Then the P3 spot
   trace's busiest 80 minutes squeezed into the horizon (capped at ``--trace-nodes``).
2. Exact: the probability that a failure needs a restore, Lazarus (MRO) against DeepSpeed's expert
   parallelism, for 2–12 nodes, one and two nodes at once — the demo's 8 experts in 3 and in 6 slots,
   and the paper's 16 in 6 — where MRO's gain lies; and MRO vs spread vs compact in the paper's
   setting (16 experts, 10 nodes, 6 slots, f = 2, skewed loads).
3. Simulated from the device catalog (``tasks.lazarus.simulate``): GPT-S/M/L on 10 to 1,000
   nodes under the paper's failure rates and the spot trace, throughput ratio vs
   checkpoint_restart next to the paper's; every simulated quantity is listed in the JSON.
4. Measured: re-planning time for 1,000 nodes.

Writes ``<out>/lazarus.json``, ``goodput.png``, ``recovery_probability.png`` and
``simulated_scale.png``. Each run carries the load average around it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from infra.store import open_store  # noqa: E402
from infra.traces import busiest_segment, load_spot_trace  # noqa: E402
from optimizers.lazarus import PlacementError, plan_strategy, recovery_probability, restore_probability  # noqa: E402
from tasks.lazarus.checkpoint import checkpoint_cost  # noqa: E402
from tasks.lazarus.coordinator import POLICIES, CheckpointRule  # noqa: E402
from tasks.lazarus.faults import FaultInjector, failed_at_once, periodic_faults, trace_faults  # noqa: E402
from tasks.lazarus.local import ElasticRun, checkpoint_intervals, summarize_run  # noqa: E402
from tasks.lazarus.node import RunSettings, uninterrupted_losses  # noqa: E402
from tasks.lazarus.scales import SCALES  # noqa: E402
from tasks.lazarus.simulate import headline, plot_simulated, replan_seconds, simulate_all, zipf_loads  # noqa: E402
from tasks.moe.model import CONFIGS  # noqa: E402

DEFAULT_OUT = "results/benchmarks/lazarus"
P3_TRACE = Path(__file__).resolve().parents[1] / "data" / "spot-traces" / "bamboo-p3-trace.csv"


def real_runs(scenario: str, settings: RunSettings, shape: dict, faults: list, horizon_s: float, mtbf_s: float,
              checkpoint_s: float, console: Console, policies=tuple(POLICIES), repeats: int = 1) -> dict:
    """Each of ``policies`` for ``horizon_s`` seconds under the same faults, ``repeats`` rounds of all of
    them; {policy: [record, …]}."""
    rule = CheckpointRule(checkpoint_s + settings.checkpoint_io_s, mtbf_s, failed_at_once(faults))
    records: dict[str, list] = {p: [] for p in policies}
    for round_ in range(repeats):
        for policy in policies:
            run_settings = RunSettings(**{**asdict(settings),
                                          "checkpoint_prefix": f"lazarus/{scenario}/{policy}/{time.time_ns()}"})
            run = ElasticRun(run_settings, policy, slots=shape["slots"], f=shape["f"],
                             rebalance_every=shape["rebalance_every"], checkpoint_rule=rule)
            load_before = os.getloadavg()[0]
            run.start(shape["nodes"] if scenario != "spot_trace" else min(shape["nodes"], _trace_start(faults)))
            injector = FaultInjector(run, faults, seed=round_, min_members=math.ceil(settings.model_config().n_expert
                                                                                     / shape["slots"]))
            injector.start()
            record = run.finish(timeout_s=horizon_s)
            injector.stop()
            records[policy].append({**record, "injected": injector.events, "round": round_,
                                    "checkpoint_every_s": checkpoint_intervals(record),
                                    "checkpoints": len(run.control.checkpoints()),
                                    "load_average": (load_before + os.getloadavg()[0]) / 2})
            console.print(f"{scenario} #{round_} / {policy}: {record['progress']} useful steps in {record['wall_s']:.1f} s, "
                          f"{len(record['recoveries'])} failures, checkpoint every {checkpoint_intervals(record)} s "
                          f"(load {records[policy][-1]['load_average']:.1f})")
    return records


def _trace_start(faults: list) -> int:
    return sum(1 for f in faults if f.kind == "name")


def _moving_average(values: list[float], window: int = 25) -> np.ndarray:
    return np.convolve(np.asarray(values, dtype=float), np.ones(window) / window, mode="valid")


def summarize(records: dict, reference: list[float], tokens_per_step: int) -> dict:
    """{policy: [row per round]}; each row besides :func:`summarize_run`'s carries the largest
    deviation of the 25-step moving average from the reference (float32 reductions in another order
    alone drift a failure-free run's per-step loss by ~0.1 over 400+ steps; a lost or repeated update
    would still move the average), the intervals chosen, and lazarus's goodput over this one's in the
    same round."""
    out: dict[str, list] = {}
    for policy, runs in records.items():
        for record in runs:
            losses = record["losses"]
            useful = [losses[s] for s in range(record["progress"]) if s in losses]
            smoothed = (float(np.max(np.abs(_moving_average(useful) - _moving_average(reference[:len(useful)]))))
                        if len(useful) >= 25 else float("nan"))
            out.setdefault(policy, []).append({
                **summarize_run(record, reference, tokens_per_step), "smoothed_loss_deviation": smoothed,
                "round": record["round"], "checkpoint_every_s": record["checkpoint_every_s"],
                "checkpoints": record["checkpoints"], "errors": record["errors"], "injected": record["injected"],
                "load_average": record["load_average"], "losses": [losses.get(s) for s in range(record["progress"])]})
    if "lazarus" in out:
        for policy, rows in out.items():
            for row, mine in zip(rows, out["lazarus"]):
                row["lazarus_goodput_ratio"] = (mine["goodput_tokens_s"] / row["goodput_tokens_s"]
                                                if row["goodput_tokens_s"] > 0 else float("inf"))
    return out


def exact_recovery(loads: list[float]) -> dict:
    """The paper's setting: 16 experts, 10 nodes, 6 slots, f = 2."""
    curves = {}
    for name in ("lazarus", "spread", "compact", "reconfig_uniform"):
        plan = plan_strategy(name, loads, 10, 6, 2)
        curves[name] = {k: recovery_probability(plan.placement, 10, k) for k in range(11)}
    return curves


CROSSOVER_SETTINGS = {"tiny, 3 slots (the demo)": (8, 3), "tiny, 6 slots (the old demo)": (8, 6),
                      "GPT-L, 6 slots (the paper)": (16, 6)}


def restore_table(nodes=range(2, 13), f: int = 2) -> dict:
    """Exact probability that a failure of 1 or of 2 nodes at once needs a checkpoint restore, Lazarus
    against DeepSpeed's expert parallelism (reconfig_uniform), per number of nodes, on flat and
    Zipf-like loads (80% on the top two experts): where MRO's gain over uniform replication lies.
    None where a strategy cannot hold the model at all (uniform needs a whole EP group)."""
    table: dict = {}
    for label, (experts, slots) in CROSSOVER_SETTINGS.items():
        for loads_name, loads in (("flat", [1.0] * experts), ("zipf", list(zipf_loads(experts)))):
            rows = table.setdefault(label, {}).setdefault(loads_name, {})
            for n in nodes:
                row = {}
                for name in ("lazarus", "reconfig_uniform"):
                    try:
                        placement = plan_strategy(name, loads, n, slots, f).placement
                    except PlacementError:
                        row[name] = None
                        continue
                    row[name] = {k: restore_probability(placement, n, {k: 1.0}) for k in (1, 2) if k < n}
                rows[n] = row
    return table


def crossover(table: dict) -> dict:
    """Per setting and loads: the node counts where Lazarus needs fewer restores than uniform for a
    single failure and for two at once, and where uniform needs fewer."""
    out: dict = {}
    for label, by_loads in table.items():
        for loads_name, rows in by_loads.items():
            entry = {}
            for k in (1, 2):
                better, worse = [], []
                for n, row in rows.items():
                    lz, un = row["lazarus"], row["reconfig_uniform"]
                    if lz is None or k not in lz:
                        continue
                    u = 1.0 if un is None else un.get(k, 1.0)
                    (better if lz[k] < u - 1e-12 else worse if lz[k] > u + 1e-12 else []).append(n)
                entry[f"{k}_failed"] = {"lazarus_fewer_restores_at": better, "uniform_fewer_restores_at": worse}
            out.setdefault(label, {})[loads_name] = entry
    return out


def _plot_goodput(real: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    scenarios = list(real)
    width = 0.25
    for i, policy in enumerate(POLICIES):
        values = [[r["goodput_tokens_s"] for r in real[s].get(policy, [])] for s in scenarios]
        axes[0].bar(np.arange(len(scenarios)) + i * width, [np.mean(v) if v else 0.0 for v in values], width,
                    yerr=[np.std(v) if len(v) > 1 else 0.0 for v in values], label=policy, capsize=3)
    axes[0].set_xticks(np.arange(len(scenarios)) + width, scenarios, fontsize=8)
    axes[0].set(ylabel="useful tokens / s (this host)", title="goodput under the same failures (real; mean ± sd)")
    axes[0].legend(fontsize=8)
    first = next(s for s in scenarios if len(real[s]) > 1)
    for policy in POLICIES:
        losses = real[first][policy][0]["losses"]
        axes[1].plot([s for s, v in enumerate(losses) if v is not None], [v for v in losses if v is not None],
                     label=policy, lw=1)
    axes[1].set(xlabel="step", ylabel="loss", title=f"loss curves across failures ({first}, round 0)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_recovery(curves: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", label="MRO (lazarus)" if name == "lazarus" else name)
    ax.axvline(4, color="gray", ls=":", lw=1)
    ax.set(xlabel="failed nodes (of 10)", ylabel="P(survivors hold every expert)",
           title="exact recovery probability: 16 experts, 6 slots, f = 2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, scale: str, horizon_s: float | None, repeats: int, io_sweep: list[float] | None, trace_nodes: int,
        quick: bool) -> dict:
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    shape = SCALES[scale]
    horizon_s = horizon_s or shape["horizon_s"]
    settings = RunSettings(config=asdict(CONFIGS[shape["model"]]),
                           steps=100_000, global_batch=shape["global_batch"], timeout_s=shape["timeout_s"],
                           checkpoint_io_s=shape["checkpoint_io_s"],
                           store_url=str((out / "store").resolve()))  # never finishes: the horizon ends each run
    checkpoint_s, checkpoint_bytes = checkpoint_cost(open_store(settings.store_url), "lazarus/cost",
                                                     settings.model_config())
    faults = periodic_faults(shape["fail_every_s"], horizon_s, shape["rejoin_after_s"])
    records: dict = {}
    for io in (io_sweep if io_sweep is not None else [shape["checkpoint_io_s"]]):
        swept = RunSettings(**{**asdict(settings), "checkpoint_io_s": io})
        records[f"periodic, checkpoint +{io:g} s"] = real_runs(
            "periodic", swept, shape, faults, horizon_s, shape["fail_every_s"], checkpoint_s, console,
            repeats=repeats)
    segment = busiest_segment(load_spot_trace(P3_TRACE), minutes=80, max_nodes=trace_nodes)
    squeezed = segment.scaled(horizon_s / segment.duration_s)
    _, trace = trace_faults(squeezed)
    if not quick:
        records["spot_trace"] = real_runs("spot_trace", settings, shape, trace, horizon_s,
                                          horizon_s / max(squeezed.preemptions(), 1), checkpoint_s, console)
    longest = max(r["progress"] for by in records.values() for runs in by.values() for r in runs)
    reference = uninterrupted_losses(settings, steps=max(longest, 1))
    tokens_per_step = settings.global_batch * settings.model_config().block_size
    real = {scenario: summarize(by, reference, tokens_per_step) for scenario, by in records.items()}
    loads = list(zipf_loads(16))
    curves = exact_recovery(loads)
    restores = restore_table()
    simulated = simulate_all(models=("gpt-s", "gpt-m", "gpt-l"), node_counts=(10, 100, 1000) if quick else (10, 32, 100, 316, 1000))
    replan = replan_seconds(1000)
    results = {
        "real": {"scenarios": real, "scale": scale, "shape": shape, "horizon_s": horizon_s, "repeats": repeats,
                 "checkpoint_s": checkpoint_s, "checkpoint_bytes": checkpoint_bytes,
                 "trace": {"source": segment.source, "scaled_to_s": horizon_s, "preemptions": segment.preemptions(),
                           "max_nodes": trace_nodes},
                 "measured_on": "this host (2 cores): node processes, gloo over 127.0.0.1, SIGKILL failures",
                 "simulated": ["checkpoint_io_s: extra seconds per checkpoint write and restore (GPT-L's 19.2 s "
                               "per 5-minute failure interval, scaled to the schedule's)"]},
        "exact_restore_probability": {"table": restores, "crossover": crossover(restores)},
        "exact_recovery_paper_setting": {"loads": loads, "curves": curves,
                                         "at_4_failed": {n: c[4] for n, c in curves.items()},
                                         "paper_at_4_failed": {"lazarus": 0.41, "spread": 0.12, "compact": 0.0}},
        "simulated": {"headline": headline(simulated), "replan_seconds_1000_nodes_sim": simulated["replan_seconds_1000_nodes"],
                      "simulated": simulated["simulated"], "constants": simulated["constants"], "runs": simulated["runs"]},
        "replan_seconds_1000_nodes": replan,
    }
    (out / "lazarus.json").write_text(json.dumps(results, indent=2, default=float))
    _plot_goodput(real, out / "goodput.png")
    _plot_recovery(curves, out / "recovery_probability.png")
    plot_simulated(simulated, out / "simulated_scale.png")
    table = Table("scenario", "#", "strategy", "useful steps", "goodput tok/s", "failures", "restores", "lost steps",
                  "ckpts", "ckpt every s (by nodes)", "load", "lazarus ÷ this")
    for scenario, by in real.items():
        for policy, rows in by.items():
            for r in rows:
                table.add_row(scenario, str(r["round"]), policy, str(r["steps"]), f"{r['goodput_tokens_s']:.0f}",
                              str(r["failures"]), str(r["restores"]), str(r["lost_steps"]), str(r["checkpoints"]),
                              ", ".join(f"{n}: {'never' if v is None else v}" for n, v in r["checkpoint_every_s"].items()),
                              f"{r['load_average']:.1f}", f"{r.get('lazarus_goodput_ratio', float('nan')):.2f}")
    console.print(table)
    console.print({"crossover": results["exact_restore_probability"]["crossover"],
                   "exact at 4 failed": results["exact_recovery_paper_setting"]["at_4_failed"],
                   "replan 1000 nodes s": replan})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="small", choices=[s for s in SCALES if SCALES[s]["horizon_s"]])
    parser.add_argument("--horizon", type=float, default=None, help="seconds each strategy trains (default: the scale's)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every strategy, interleaved")
    parser.add_argument("--io-sweep", default=None,
                        help="simulated checkpoint costs to repeat the periodic runs for, e.g. 0,0.77 (default: the scale's)")
    parser.add_argument("--trace-nodes", type=int, default=6, help="cap on the trace's nodes (this host: 2 cores)")
    parser.add_argument("--quick", action="store_true", help="one round, no trace replay, a smaller simulated grid")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    sweep = [float(x) for x in args.io_sweep.split(",")] if args.io_sweep else None
    run(Path(args.out), args.scale, args.horizon, 1 if args.quick else args.repeats, sweep, args.trace_nodes, args.quick)


if __name__ == "__main__":
    main()
