"""HoneyBee's results: the strategy table, the latency-vs-storage plot and the markdown report."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from tasks.honeybee.evaluate import StrategyResult

COLORS = {"honeybee": "tab:orange", "rls": "tab:blue", "rls_prefilter": "tab:cyan", "per_role": "tab:green",
          "per_user": "tab:purple"}


def results_table(results: list[StrategyResult]) -> pd.DataFrame:
    """One row per strategy (notes left out)."""
    return pd.DataFrame([{k: v for k, v in asdict(r).items() if k != "notes"} for r in results])


def latency_storage_plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Mean query latency against storage, one point per measured strategy (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in table[table.built].itertuples():
        ax.scatter(row.storage, row.latency_mean_ms, s=70, color=COLORS.get(row.strategy, "gray"), zorder=3)
        ax.annotate(f"{row.strategy}\nrecall {row.recall:.3f}", (row.storage, row.latency_mean_ms),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("storage (vector copies / N)")
    ax.set_ylabel("mean query latency (ms, one core)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_report(name: str, stats: dict, table: pd.DataFrame, target: float, budget: float, model_fit: dict,
                    placement: dict, simulated: list[str], plot: str, notes: dict[str, list[str]]) -> str:
    """The run's report: workload, strategies side by side, predicted vs measured, what is simulated."""
    shown = table[["strategy", "method", "built", "partitions", "storage", "qps", "latency_p50_ms", "latency_p99_ms",
                   "recall", "meets_target", "build_s", "predicted_latency_mean_ms", "latency_mean_ms",
                   "predicted_recall", "effort_scale", "searches_per_query", "rejected_at_merge"]]
    lines = [
        f"# HoneyBee on {name}",
        "",
        f"{stats.get('n_docs')} documents × {stats.get('dim')} dims, {stats.get('n_roles')} roles, "
        f"{stats.get('n_users')} users, {stats.get('n_queries')} queries; user selectivity "
        f"{stats.get('user_selectivity_min', 0):.4%} … {stats.get('user_selectivity_max', 0):.1%}. "
        f"Recall@k target {target}, storage budget {budget}× N.",
        "",
        *([f"Permissions and documents as `tierflow honeybee update` left them, read from its state "
           f"`{stats['state']}` (the workload folder itself is never written).", ""] if stats.get("state") else []),
        "## Strategies (same queries, same recall target)",
        "",
        shown.round(4).to_markdown(index=False),
        "",
        "QPS is per core (1 / mean latency; a query's latency is its partition searches plus the merge).",
        "`predicted_*` come from the cost and recall models fitted on the worker; `effort_scale` is how far "
        "HNSW efforts were raised above the model's to meet the target on a calibration sample.",
        "",
        f"![latency vs storage]({plot})",
        "",
        "## Cost model fit",
        "",
        *[f"- {k}: {v}" for k, v in model_fit.items()],
        "",
        "## Placement (partitions per pool)",
        "",
        *[f"- {strategy}: {pools}" for strategy, pools in placement.items()],
        "",
        "## Simulated",
        "",
        *[f"- {s}" for s in simulated],
    ]
    for strategy, said in notes.items():
        if said:
            lines += ["", f"### Notes: {strategy}", "", *[f"- {n}" for n in said]]
    return "\n".join(lines) + "\n"


def regime(stats: dict) -> str:
    """The regime a run measured, in one phrase: the collection (documents × dimension) and the
    RBAC it is under (roles, users) — HoneyBee's claim is about many roles over a collection
    where filtered search is dear (README: where the crossover lies)."""
    return f"{stats['n_docs'] / 1000:g}k docs × {stats['dim']}-d, {stats['n_roles']} roles, {stats['n_users']:,} users"


def summary_rows(table: pd.DataFrame, regime_phrase: str, simulated: list[str]) -> list[dict]:
    """The rows HoneyBee's claim is judged by, each against the baseline it is about.

    - QPS vs ``rls`` and ``rls_prefilter`` (the claim: ≥ 6× ``rls`` at ≤ 1.4× storage);
    - mean latency vs ``per_role`` and storage vs ``per_role`` (the claim: within ~1.5× of its
      latency at a fraction of its storage);
    - storage vs ``per_user``, the storage-hungry upper bound (planned even where not built),
      and its latency where it was built (faster by construction).

    Keys are the same for every system: system, metric, unit, better, value, baseline,
    baseline_value, ratio (value / baseline_value), regime, simulated.
    """
    by = table.set_index("strategy")
    hb = by.loc["honeybee"]
    rows = []

    def add(metric: str, unit: str, better: str, column: str, baseline: str) -> None:
        if baseline not in by.index or (column != "storage" and not by.loc[baseline, "built"]):
            return
        value, base = float(hb[column]), float(by.loc[baseline, column])
        rows.append({"system": "honeybee", "metric": metric, "unit": unit, "better": better, "value": round(value, 4),
                     "baseline": baseline, "baseline_value": round(base, 4),
                     "ratio": round(value / base, 4) if base and math.isfinite(base) else None,
                     "regime": regime_phrase, "simulated": list(simulated)})

    add("QPS", "q/s/core", "higher", "qps", "rls")
    add("QPS", "q/s/core", "higher", "qps", "rls_prefilter")
    add("latency", "ms", "lower", "latency_mean_ms", "per_role")
    add("storage", "×N", "lower", "storage", "per_role")
    add("storage", "×N", "lower", "storage", "per_user")
    add("latency", "ms", "lower", "latency_mean_ms", "per_user")
    return rows
