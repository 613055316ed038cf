"""JellyBean's evaluation: every strategy side by side, a plot and a Markdown report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from optimizers.jellybean import JellyBeanProblem, Plan  # noqa: E402


def evaluation_table(problem: JellyBeanProblem, plans: dict[str, Plan]) -> pd.DataFrame:
    """One row per strategy: costs, accuracy and what the MILP saves against it."""
    milp = plans["milp"].total_cost_per_hour
    rows = []
    for name, plan in plans.items():
        rows.append({
            "strategy": name,
            "compute_cost_per_hour": plan.compute_cost_per_hour,
            "network_cost_per_hour": plan.network_cost_per_hour,
            "total_cost_per_hour": plan.total_cost_per_hour,
            "accuracy": plan.accuracy,
            "meets_target": bool(plan.accuracy >= problem.accuracy_target - 1e-9),
            "savings": 0.0 if name == "milp" else 1.0 - milp / plan.total_cost_per_hour,
            "solve_seconds": plan.solve_seconds,
        })
    return pd.DataFrame(rows)


def assignment_table(plans: dict[str, Plan]) -> pd.DataFrame:
    rows = []
    for name, plan in plans.items():
        for a in plan.assignment:
            rows.append({"strategy": name, "operator": a.operator, "worker": a.worker, "variant": a.variant,
                         "machines": a.machines, "rate": a.rate, "capacity": a.capacity})
    return pd.DataFrame(rows)


def cost_plot(evaluation: pd.DataFrame, path: Path, title: str) -> Path:
    """Stacked bars: compute and network $/hour per strategy."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(evaluation))
    ax.bar(x, evaluation.compute_cost_per_hour, label="compute")
    ax.bar(x, evaluation.network_cost_per_hour, bottom=evaluation.compute_cost_per_hour, label="network (cross-tier)")
    ax.set_xticks(list(x), evaluation.strategy, rotation=15)
    ax.set_ylabel("$ per hour")
    ax.set_title(title)
    for i, total in enumerate(evaluation.total_cost_per_hour):
        ax.annotate(f"{total:.2f}", (i, total), ha="center", va="bottom", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_report(problem: JellyBeanProblem, evaluation: pd.DataFrame, deploy: pd.DataFrame,
                    crossing: pd.DataFrame, infeasible: dict[str, str], simulated: list[str], plot_name: str) -> str:
    milp = evaluation.set_index("strategy").loc["milp"]
    lines = [
        f"# JellyBean — {problem.name}",
        "",
        f"Sources {', '.join(f'{s} {r:g} req/s' for s, r in problem.sources.items())}; accuracy target "
        f"{problem.accuracy_target}; {problem.machines()} machines in {len(problem.pools)} pools.",
        "",
        f"The MILP plan costs **{milp.total_cost_per_hour:.3f} $/h** "
        f"({milp.compute_cost_per_hour:.3f} compute + {milp.network_cost_per_hour:.3f} network) at accuracy {milp.accuracy:.2f}.",
        "",
        "## Strategies (same cost model, same run)",
        "",
        evaluation.to_markdown(index=False, floatfmt=".4f"),
        "",
        *[f"- `{name}` cannot serve this workflow: {why.splitlines()[-1].strip(' -')}" for name, why in infeasible.items()],
        "",
        f"![cost by strategy]({plot_name})",
        "",
        "## Deployed on the tiered cluster",
        "",
        "Each worker served its share of a real request stream with the real models; `achieved_rate` is what "
        "its machines sustain on their device (time measured here, scaled by the catalog).",
        "",
        deploy.to_markdown(index=False, floatfmt=".2f"),
        "",
        "## Traffic crossing tiers (KiB per request): planned vs measured",
        "",
        crossing.to_markdown(index=False, floatfmt=".2f"),
        "",
        "## Simulated",
        "",
        *[f"- {s}" for s in simulated],
    ]
    return "\n".join(lines)
