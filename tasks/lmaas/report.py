"""LMaaS's EVALUATE stage: the strategies side by side, per-tenant SLO attainment, the plot, the
report and the run's rows, written through the run's :class:`RunContext`."""

from __future__ import annotations

from dataclasses import asdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from data_contracts import validate  # noqa: E402
from tasks.common.run import RunContext  # noqa: E402
from tasks.lmaas.stages import SIMULATED, ServiceReplays, Tenancy, plan_dict  # noqa: E402

COLUMNS = ["strategy", "requests", "completion_tokens", "makespan_s", "tokens_per_s", "latency_p50_s",
           "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "tpot_median_s"]


def slo_table(served: dict[str, list[dict]], tenants: dict) -> pd.DataFrame:
    """Per strategy and tenant: share of requests meeting the tenant's TTFT and TPOT objectives."""
    from tasks.lmaas.registry import slo_attainment

    rows = []
    for strategy, requests in served.items():
        for tenant, info in sorted(tenants.items()):
            mine = [(s["ttft_s"], s["latency_s"], s["completion_tokens"]) for s in requests if s["tenant"] == tenant]
            if mine:
                slo = slo_attainment(mine, info.ttft_slo_s, info.tpot_slo_s)
                rows.append({"strategy": strategy, "tenant": tenant, "requests": len(mine),
                             **{k: slo[k] for k in ("ttft_slo_s", "tpot_slo_s", "ttft_attainment", "tpot_attainment")},
                             "slo_attainment": slo["attainment"]})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, trained: list[dict]):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = ["tab:green", "tab:olive", "tab:cyan", "tab:blue", "tab:red"][: len(table)]
    axes[0].bar(table.strategy, table.tokens_per_s, color=colors)
    axes[0].set(ylabel="generated tokens / s", title="throughput, same multi-tenant trace")
    axes[0].tick_params(axis="x", labelrotation=15)
    axes[1].bar(table.strategy, table.latency_p99_s, color=colors, label="p99")
    axes[1].bar(table.strategy, table.latency_p50_s, color="black", alpha=0.35, label="p50")
    axes[1].set(ylabel="latency from arrival (s)", title="latency (cold starts included)")
    axes[1].tick_params(axis="x", labelrotation=15)
    axes[1].legend(fontsize=8)
    for record in trained:
        axes[2].plot(range(1, len(record["losses"]) + 1), record["losses"], label=f"{record['task']}")
    axes[2].set(xlabel="step", ylabel="answer loss", title="LoRA fine-tuning (real training)", yscale="log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


def markdown_report(workload: str, details: dict, table: pd.DataFrame, slo: pd.DataFrame, plots: list[str]) -> str:
    lines = [f"# LMaaS — {workload}", "", table.round(3).to_markdown(index=False), "",
             "## Fine-tuned adapters (held-out examples)", "",
             "| task | loss before → after | base accuracy | adapter accuracy | through the service (adapter / base) |",
             "|---|---|---|---|---|"]
    for task_name, f in details["fine_tuning"].items():
        lines.append(f"| {task_name} | {f['heldout_loss'][0]} → {f['heldout_loss'][1]} | {f['accuracy_base']:.2f} | "
                     f"{f['accuracy_adapter']:.2f} | {f['served_accuracy']['adapter']:.2f} / "
                     f"{f['served_accuracy']['base']:.2f} |")
    lines += ["", "## SLO attainment per tenant", "", slo.round(3).to_markdown(index=False), "",
              f"Placement: {details['placement']}", "", f"Serverless: {details['serverless']}", "",
              f"Isolation probe (HTTP status): {details['isolation']}", "",
              f"Re-plan on a shifted mix: {details['replan']}", "", *[f"![{p}]({p})" for p in plots], "",
              "Simulated / what this host stands in for:", *[f"- {s}" for s in SIMULATED]]
    return "\n".join(lines) + "\n"


def evaluate(run: RunContext, service: ServiceReplays, baselines: dict, tenancy: Tenancy, trained: list[dict],
             trace: list, plan, profiled: dict, formats: dict, tightest_tpot: float, replan: dict, shape: dict,
             strategies: list[str]) -> None:
    """EVALUATE: the service (always on, serverless) and the baselines on the same trace."""
    from tasks.lmaas.profile import capacity

    always_on, serverless = service.always_on, service.serverless
    table = pd.DataFrame([always_on.summary(), serverless.summary()] + [baselines[s]["summary"] for s in strategies])[COLUMNS]
    run.write_table("strategies", table, "strategies side by side")
    served = {"lmaas": [asdict(s) for s in always_on.served], "lmaas_serverless": [asdict(s) for s in serverless.served],
              **{s: baselines[s]["served"] for s in strategies}}
    tenants = tenancy.tenants
    slo = slo_table(served, tenants)
    run.write_table("slo", slo)
    usage = {t: tenancy.registry.usage(info)["total"] for t, info in tenants.items()}
    run.write_json("records.json", {"served": served, "events": service.events, "replicas": service.replicas,
                                    "training": trained, "usage": usage})
    validate(table, "lmaas.evaluation", "evaluate stage")
    run.save_plot(plot(table, trained), "lmaas")

    by = table.set_index("strategy")
    events, cold = service.events, [r for r in service.replicas if "base_load_s" in r]
    attainment = slo.groupby("strategy").apply(lambda g: float((g.slo_attainment * g.requests).sum() / g.requests.sum()),
                                               include_groups=False).to_dict()
    metered_tokens = sum(u["completion_tokens"] for u in usage.values())
    metered_cost = sum(u["cost_usd"] for u in usage.values())
    workload = (f"{len(tenancy.models)} adapters ({len(trained)} fine-tuned) of {len(tenants)} tenants, "
                f"{len(trace)} requests at {shape['rate']:g}/s (Zipf, bursty)")
    summary = run.summary
    summary.simulated = SIMULATED
    summary.compare("throughput", "tok/s", "higher", by.tokens_per_s.to_dict(), "lmaas", strategies, digits=2)
    summary.details = {
        "workload": workload,
        "latency_p99_s": {s: round(float(by.loc[s, "latency_p99_s"]), 3) for s in by.index},
        "slo_attainment": {s: round(v, 3) for s, v in attainment.items()},
        "fine_tuning": {r["task"]: {"heldout_loss": [round(r["heldout_loss_before"], 3), round(r["heldout_loss_after"], 3)],
                                    "accuracy_base": r["accuracy_base"], "accuracy_adapter": r["accuracy_adapter"],
                                    "served_accuracy": service.served_accuracy[r["task"]], "seconds": round(r["seconds"], 1)}
                        for r in trained},
        "placement": {"workers": plan.workers, "usd_per_hour": plan.usd_per_hour, "optimal": plan.optimal,
                      "solve_seconds": round(plan.solve_seconds, 3)},
        "serving_format": {pool: {"chosen": fmt, **{f: round(capacity(p, tightest_tpot), 1)
                                                     for f, p in profiled[pool].items()}}
                           for pool, fmt in formats.items()},
        "serverless": {"scaled_to_zero_between_runs": service.scaled_to_zero,
                       "cold_starts": serverless.stats["cold_starts"], "scale_outs": serverless.stats["scale_outs"],
                       "scale_ins": sum(e["event"] == "stop" and e["reason"].startswith("idle") for e in events),
                       "cold_start_s_max": round(serverless.stats["cold_start_s_max"], 2),
                       "machine_start_s": [e["machine_start_s"] for e in events if e["event"] == "machine up"],
                       "machines_released": sum(e["event"] == "machine released" for e in events),
                       "machine_seconds": {r.strategy: round(r.stats["machine_seconds"], 1) for r in (always_on, serverless)},
                       # the replay and a lull of quiet_s after it, at the serving machines' catalog price
                       "quiet_s": shape["quiet_s"],
                       "machine_seconds_with_quiet": {k: round(v, 1) for k, v in service.machine_seconds_with_quiet.items()},
                       "usd_per_million_tokens_with_quiet": {
                           k: round(float(v * service.price_per_hour / 3600 / (by.loc[k, "completion_tokens"] / 1e6)), 4)
                           for k, v in service.machine_seconds_with_quiet.items()},
                       "latency_p99_s_vs_always_on": round(float(by.loc["lmaas_serverless", "latency_p99_s"]
                                                                 / by.loc["lmaas", "latency_p99_s"]), 3),
                       "base_load_s": [round(r["base_load_s"], 2) for r in cold],
                       "adapter_fetch_s": [round(r["adapter_fetch_s"], 3) for r in cold]},
        "isolation": service.isolation,
        "metered": {"completion_tokens": metered_tokens, "cost_usd": round(metered_cost, 6),
                    "usd_per_million_tokens": round(metered_cost / metered_tokens * 1e6, 4) if metered_tokens else None},
        "replan": {k: v for k, v in replan.items() if k != "plan"},
    }
    run.write_report(markdown_report(workload, summary.details, table, slo, ["lmaas.png"]))
    run.write_evaluation({"strategies": table.to_dict("records"), "slo": slo.to_dict("records"), "profiles": profiled,
                          "plan": plan_dict(plan), "replan": replan, "events": events})
