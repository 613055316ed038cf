"""HoneyBee side by side: QPS, latency, recall and storage of every strategy on one workload.

    .venv/bin/python -m benchmarks.honeybee [--scale medium] [--quick] [--budgets 1.1,1.2,1.4,1.7,2.0]
                                            [--build-threads 1] [--out results/benchmarks/honeybee]
    .venv/bin/python -m benchmarks.honeybee --sweep 5000,20000,50000,100000 [--shape small]

On a generated enterprise-RBAC workload (``--scale``: small 20k × 64, medium 100k × 128,
large 1M × 128 vectors; ``--quick``: the tiny one, for a smoke run) at recall@10 ≥ 0.95:

* every strategy (:data:`optimizers.honeybee.STRATEGIES`) is planned, built and run on
  the same queries in this process, one core, at the same recall target; ``per_user``
  is planned but not built when its indexes would not fit (``--max-index-gib``);
* HoneyBee is re-planned at each storage budget in ``--budgets`` — how the QPS ratio
  against ``rls`` moves with the budget;
* every query is put in a bucket by its user's selectivity (the share of documents the
  user may see) — how the ratio moves with selectivity.

``--sweep`` instead measures every strategy on the ``--shape`` workload (its roles, users,
queries and dimension) at each collection size: where HoneyBee enters the regime its claim
is about (``<out>/honeybee_sweep_<shape>.json``, ``crossover_by_size_<shape>.png``).

Writes ``<out>/honeybee.json`` and two figures: ``latency_vs_storage.png`` (every
strategy, and HoneyBee's budget curve) and ``speedup_by_selectivity.png``. Ratios are
between runs measured here, in the same process: every strategy (and every budget's plan)
is built and calibrated first, then all are measured interleaved, chunk by chunk of the
queries in rotating order, so a noisy spell on this shared machine falls on all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from optimizers.honeybee import STRATEGIES  # noqa: E402
from tasks.honeybee.local import profile_locally, run_locally  # noqa: E402
from tasks.honeybee.plans import index_gib  # noqa: E402
from tasks.honeybee.profile import grid_for  # noqa: E402
from tasks.honeybee.rbac import Rbac  # noqa: E402
from tasks.honeybee.report import COLORS  # noqa: E402
from tasks.honeybee.index import TIMED_PASSES  # noqa: E402
from tasks.honeybee.workload import SCALES, describe, generate_workload  # noqa: E402

DEFAULT_OUT = "results/benchmarks/honeybee"
BUCKETS = [(0.0, 0.01), (0.01, 0.05), (0.05, 0.2), (0.2, 1.0)]
HEADLINE_BUDGET = 1.4


def _figures(local) -> dict:
    r = local.result
    return {"qps": r.qps, "latency_mean_ms": r.latency_mean_ms, "latency_p50_ms": r.latency_p50_ms,
            "latency_p99_ms": r.latency_p99_ms, "recall": r.recall, "meets_target": r.meets_target,
            "storage": r.storage, "build_s": r.build_s, "partitions": r.partitions, "method": r.method,
            "effort_scale": r.effort_scale, "searches_per_query": r.searches_per_query,
            "predicted_latency_mean_ms": r.predicted_latency_mean_ms, "predicted_recall": r.predicted_recall,
            "rejected_at_merge": r.rejected_at_merge, "load_average": os.getloadavg()[0], "notes": r.notes[:5]}


def run(scale: str, budgets: list[float], out: Path, *, target: float = 0.95, k: int = 10,
        max_index_gib: float = 4.0, seed: int = 0, build_threads: int = 1) -> dict:
    """Measure every strategy and HoneyBee's budget sweep; write JSON and figures; return the results."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    workload = generate_workload(scale, seed)
    stats = describe(workload)
    console.print(f"workload {scale}: {stats['n_docs']} × {stats['dim']}, {stats['n_roles']} roles, "
                  f"{stats['n_users']} users, {stats['n_queries']} queries")
    start = time.perf_counter()
    model = profile_locally(workload, grid_for(len(workload.vectors)), target, seed=seed)
    profile_s = time.perf_counter() - start
    rbac = Rbac.of(workload)
    selectivity = np.array([rbac.user_mask(u).mean() for u in workload.query_users])

    strategies, latencies, not_built, to_build = {}, {}, {}, []
    for strategy in STRATEGIES:
        if strategy == "per_user" and index_gib(stats["per_user_storage"], len(workload.vectors),
                                                 workload.vectors.shape[1]) > max_index_gib:
            not_built[strategy] = {"storage": stats["per_user_storage"],
                                   "reason": f"its indexes would need more than max_index_gib = {max_index_gib}"}
            console.print(f"{strategy}: not built ({stats['per_user_storage']:.1f}× storage)")
            continue
        to_build.append(strategy)
    extra = tuple(b for b in budgets if b != HEADLINE_BUDGET)
    console.print(f"building and calibrating {', '.join(to_build)} and honeybee at budgets {list(extra)}; "
                  "then measuring all of them interleaved")
    local = run_locally(workload, to_build, model, k=k, storage_budget=HEADLINE_BUDGET, recall_target=target,
                        build_threads=build_threads, extra_budgets=extra)
    for strategy in to_build:
        strategies[strategy] = _figures(local[strategy])
        latencies[strategy] = local[strategy].run.latency_s
        console.print(f"{strategy}: {strategies[strategy]['qps']:.0f} QPS, recall {strategies[strategy]['recall']:.3f}, "
                      f"storage {strategies[strategy]['storage']:.2f}×")

    sweep = {}
    for budget in budgets:
        sweep[str(budget)] = _figures(local["honeybee" if budget == HEADLINE_BUDGET else f"honeybee@{budget:g}"])
        sweep[str(budget)]["qps_vs_rls"] = sweep[str(budget)]["qps"] / strategies["rls"]["qps"]
        console.print(f"honeybee at budget {budget}: {sweep[str(budget)]['qps']:.0f} QPS "
                      f"({sweep[str(budget)]['qps_vs_rls']:.1f}× rls), storage {sweep[str(budget)]['storage']:.2f}×")

    buckets = []
    for lo, hi in BUCKETS:
        rows = (selectivity >= lo) & (selectivity < hi)
        if not rows.any():
            continue
        mean = {s: float(latencies[s][rows].mean() * 1e3) for s in latencies}
        buckets.append({"selectivity": [lo, hi], "queries": int(rows.sum()), "latency_mean_ms": mean,
                        "honeybee_speedup": {s: mean[s] / mean["honeybee"] for s in mean if s != "honeybee"}})

    hb = strategies["honeybee"]
    headline = {
        "honeybee_qps_vs_rls": hb["qps"] / strategies["rls"]["qps"],
        "honeybee_qps_vs_rls_prefilter": hb["qps"] / strategies["rls_prefilter"]["qps"],
        "honeybee_latency_vs_per_role": hb["latency_mean_ms"] / strategies["per_role"]["latency_mean_ms"],
        "honeybee_storage": hb["storage"], "per_role_storage": strategies["per_role"]["storage"],
        "honeybee_storage_share_of_per_role": hb["storage"] / strategies["per_role"]["storage"],
        "recall_target": target, "all_meet_target": all(s["meets_target"] for s in strategies.values()),
        "forbidden_results": sum(s["rejected_at_merge"] for s in strategies.values()),
    }
    results = {"scale": scale, "workload": stats, "profile_seconds": profile_s, "cost_model_fit": model.fit,
               "headline": headline, "strategies": strategies, "not_built": not_built, "budget_sweep": sweep,
               "selectivity_buckets": buckets,
               "simulated": [],
               "measured_on": "this host, one core per query, every strategy built in one process and measured interleaved in chunks of 250 queries (rotating order), "
                              f"{TIMED_PASSES} timed passes per search (median kept)",
               "build_threads": build_threads}
    (out / "honeybee.json").write_text(json.dumps(results, indent=2, default=float))
    _plot_storage(strategies, not_built, sweep, out / "latency_vs_storage.png", scale)
    _plot_buckets(buckets, out / "speedup_by_selectivity.png", scale)
    _print(console, results)
    return results


def _plot_storage(strategies: dict, not_built: dict, sweep: dict, path: Path, scale: str) -> None:
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    for name, s in strategies.items():
        ax.scatter(s["storage"], s["latency_mean_ms"], s=70, zorder=3, label=name, color=COLORS.get(name, "gray"))
        ax.annotate(name, (s["storage"], s["latency_mean_ms"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    points = sorted((v["storage"], v["latency_mean_ms"]) for v in sweep.values())
    if points:
        ax.plot(*zip(*points), "--", color="tab:orange", alpha=0.7, label="honeybee, budget sweep")
    for name, s in not_built.items():
        ax.axvline(s["storage"], color="gray", ls=":", lw=1)
        ax.annotate(f"{name} (not built)", (s["storage"], ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("storage (vector copies / N)")
    ax.set_ylabel("mean query latency (ms, one core)")
    ax.set_title(f"HoneyBee vs baselines ({scale}, recall@10 ≥ 0.95)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_buckets(buckets: list[dict], path: Path, scale: str) -> None:
    fig, ax = plt.subplots(figsize=(6.6, 4.0))
    labels = [f"{b['selectivity'][0]:.0%}–{b['selectivity'][1]:.0%}\n({b['queries']} q)" for b in buckets]
    baselines = sorted({s for b in buckets for s in b["honeybee_speedup"]})
    width = 0.8 / max(len(baselines), 1)
    for i, name in enumerate(baselines):
        ax.bar(np.arange(len(buckets)) + i * width, [b["honeybee_speedup"].get(name, np.nan) for b in buckets],
               width, label=f"vs {name}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(buckets)) + width * (len(baselines) - 1) / 2, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("HoneyBee speed-up (mean latency ratio)")
    ax.set_xlabel("user selectivity (share of documents the user may see)")
    ax.set_title(f"HoneyBee speed-up by selectivity ({scale})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print(console: Console, results: dict) -> None:
    table = Table("strategy", "QPS", "p50 ms", "p99 ms", "recall@10", "storage ×N", "build s", "QPS ratio honeybee/x")
    hb = results["strategies"]["honeybee"]["qps"]
    for name, s in results["strategies"].items():
        table.add_row(name, f"{s['qps']:.0f}", f"{s['latency_p50_ms']:.3f}", f"{s['latency_p99_ms']:.3f}",
                      f"{s['recall']:.3f}", f"{s['storage']:.2f}", f"{s['build_s']:.1f}", f"{hb / s['qps']:.2f}")
    for name, s in results["not_built"].items():
        table.add_row(name, "—", "—", "—", "—", f"{s['storage']:.1f}", "—", "not built")
    console.print(table)
    console.print(json.dumps(results["headline"], indent=1, default=float))


def sweep(shape: str, sizes: list[int], out: Path, *, target: float = 0.95, k: int = 10, budget: float = HEADLINE_BUDGET,
          max_index_gib: float = 4.0, seed: int = 0) -> dict:
    """Where HoneyBee enters its claim's regime: the ``shape`` workload (roles, users, queries,
    dimension) at each collection size in ``sizes``, every strategy measured as in :func:`run`
    (same settings for all, profiled at each size, built together, interleaved)."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for n_docs in sizes:
        workload = generate_workload(replace(SCALES[shape], n_docs=n_docs), seed)
        stats = describe(workload)
        started = time.perf_counter()
        model = profile_locally(workload, grid_for(n_docs), target, seed=seed)
        profile_s = time.perf_counter() - started
        to_build = [s for s in STRATEGIES if not (s == "per_user" and index_gib(
            stats["per_user_storage"], n_docs, workload.vectors.shape[1]) > max_index_gib)]
        local = run_locally(workload, to_build, model, k=k, storage_budget=budget, recall_target=target)
        figures = {s: _figures(local[s]) for s in to_build}
        hb = figures["honeybee"]
        point = {
            "n_docs": n_docs, "dim": stats["dim"], "n_queries": stats["n_queries"], "profile_seconds": profile_s,
            "seconds": time.perf_counter() - started, "strategies": figures,
            "not_built": {"per_user": stats["per_user_storage"]} if "per_user" not in figures else {},
            "honeybee_qps_vs": {s: hb["qps"] / f["qps"] for s, f in figures.items() if s != "honeybee"},
            "honeybee_latency_vs_per_role": hb["latency_mean_ms"] / figures["per_role"]["latency_mean_ms"],
            "honeybee_storage_vs_per_role": hb["storage"] / figures["per_role"]["storage"],
            "all_meet_target": all(f["meets_target"] for f in figures.values()),
        }
        points.append(point)
        console.print(f"{n_docs} docs: honeybee {hb['qps']:.0f} QPS = "
                      + ", ".join(f"{r:.2f}× {s}" for s, r in point["honeybee_qps_vs"].items())
                      + f"; latency {point['honeybee_latency_vs_per_role']:.2f}× per_role at "
                      f"{point['honeybee_storage_vs_per_role']:.0%} of its storage ({point['seconds']:.0f} s)")
    results = {"shape": shape, "sizes": sizes, "recall_target": target, "storage_budget": budget, "points": points,
               "crossover": _crossover(points),
               "measured_on": "this host, one core per query; at each size every strategy built in one process, "
                              f"calibrated, then measured interleaved in chunks of 250 queries, {TIMED_PASSES} timed "
                              "passes per search (median kept)"}
    (out / f"honeybee_sweep_{shape}.json").write_text(json.dumps(results, indent=2, default=float))
    _plot_sweep(points, out / f"crossover_by_size_{shape}.png", shape)
    table = Table("docs", "honeybee QPS", *(f"vs {s}" for s in STRATEGIES if s != "honeybee"), "latency / per_role",
                  "storage hb / per_role", "s")
    for pt in points:
        table.add_row(f"{pt['n_docs']:,}", f"{pt['strategies']['honeybee']['qps']:.0f}",
                      *(f"{pt['honeybee_qps_vs'][s]:.2f}×" if s in pt["honeybee_qps_vs"] else "not built"
                        for s in STRATEGIES if s != "honeybee"),
                      f"{pt['honeybee_latency_vs_per_role']:.2f}×", f"{pt['honeybee_storage_vs_per_role']:.2f}",
                      f"{pt['seconds']:.0f}")
    console.print(table)
    console.print(json.dumps(results["crossover"], indent=1))
    return results


def _crossover(points: list[dict]) -> dict:
    """The smallest measured size from which on each claim held at every larger measured size."""
    def from_on(holds) -> int | None:
        first = None
        for pt in points:
            first = (first or pt["n_docs"]) if holds(pt) else None
        return first

    return {
        "qps_ge_6x_rls": from_on(lambda pt: pt["honeybee_qps_vs"]["rls"] >= 6.0),
        "qps_above_rls_prefilter": from_on(lambda pt: pt["honeybee_qps_vs"]["rls_prefilter"] > 1.0),
        "latency_within_1.5x_per_role": from_on(lambda pt: pt["honeybee_latency_vs_per_role"] <= 1.5),
    }


def _plot_sweep(points: list[dict], path: Path, shape: str) -> None:
    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    sizes = [pt["n_docs"] for pt in points]
    for name in STRATEGIES:
        if name == "honeybee":
            continue
        ax.plot(sizes, [pt["honeybee_qps_vs"].get(name, np.nan) for pt in points], "o-", label=f"QPS vs {name}",
                color=COLORS.get(name, "gray"))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(6.0, color="tab:blue", lw=0.8, ls=":", label="claim: 6× rls")
    ax.axhline(1 / 1.5, color="tab:green", lw=0.8, ls=":", label="claim: within 1.5× per_role")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("documents in the collection")
    ax.set_ylabel("HoneyBee QPS / baseline QPS")
    ax.set_title(f"HoneyBee vs baselines by collection size ({shape} workload shape, recall@10 ≥ 0.95)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="medium", choices=["small", "medium", "large"])
    parser.add_argument("--quick", action="store_true", help="the tiny workload and two budgets (a smoke run)")
    parser.add_argument("--budgets", default="1.1,1.2,1.4,1.7,2.0", help="HoneyBee storage budgets to sweep")
    parser.add_argument("--max-index-gib", type=float, default=4.0)
    parser.add_argument("--build-threads", type=int, default=1, help="faiss threads for building indexes (queries: one)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--sweep", default=None, metavar="N,N,…",
                        help="instead: the --shape workload at these collection sizes (e.g. 5000,20000,50000,100000)")
    parser.add_argument("--shape", default="small", choices=list(SCALES),
                        help="workload shape (roles, users, queries, dimension) of --sweep")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.shape, [int(n) for n in args.sweep.split(",")], Path(args.out), max_index_gib=args.max_index_gib)
        return
    budgets = [1.2, 2.0] if args.quick else [float(b) for b in args.budgets.split(",")]
    run("tiny" if args.quick else args.scale, budgets, Path(args.out), max_index_gib=args.max_index_gib,
        build_threads=args.build_threads)


if __name__ == "__main__":
    main()
