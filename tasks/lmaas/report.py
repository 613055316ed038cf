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
from tasks.lmaas.stages import SIMULATED, Objectives, ServiceReplays, Tenancy, plan_dict  # noqa: E402
from tasks.lmaas.strategies import slo_rows  # noqa: E402

COLUMNS = ["strategy", "requests", "completion_tokens", "makespan_s", "tokens_per_s", "latency_p50_s",
           "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "tpot_median_s"]


def replan_text(replan: dict) -> str:
    """The surge re-plan in words: why it was needed, and what it chose or which constraints conflict."""
    if not replan["needed"]:
        return f"not needed; the plan's workers {replan['workers']} still hold it."
    why = "; ".join(replan["reasons"])
    if "infeasible" in replan:
        return f"needed ({why}), and the spec cannot hold it: {replan['infeasible']}"
    return (f"needed ({why}): {replan['workers_before']} → {replan['workers']}, ${replan['usd_per_hour_before']:.3f} → "
            f"${replan['usd_per_hour']:.3f}/hour, {replan['moved_adapters']} adapters moved.")


def slo_table(served: dict[str, list[dict]], tenants: dict) -> pd.DataFrame:
    """Per strategy and tenant: share of requests meeting the tenant's TTFT and TPOT objectives, and
    apart from those that met a cold start (:func:`tasks.lmaas.strategies.slo_rows`)."""
    objectives = {name: (t.ttft_slo_s, t.tpot_slo_s) for name, t in tenants.items()}
    return pd.DataFrame([row for strategy, requests in served.items() for row in slo_rows(strategy, requests, objectives)])


def cold_share(served: list[dict], slo: pd.DataFrame) -> dict:
    """How many of a replay's ``served`` requests met a cold start (waited for a replica to start),
    what that cost them, and the objectives' attainment over the others (from its ``slo`` rows)."""
    cold = sorted(s["cold_start_s"] for s in served if s["cold_start_s"] > 0)
    warm = slo[slo.warm_requests > 0]
    return {"requests_with_cold_start": len(cold), "cold_start_share": round(len(cold) / len(served), 3),
            "cold_wait_s": {"median": round(cold[len(cold) // 2], 2) if cold else 0.0,
                            "max": round(cold[-1], 2) if cold else 0.0},
            "warm_attainment": round(float((warm.warm_attainment * warm.warm_requests).sum()
                                           / warm.warm_requests.sum()), 3) if len(warm) else None}


def regime(n_adapters: int, trace_load: float, held: float, n_machines: int) -> str:
    """The run's regime in one short phrase: how many adapters, and the trace's load against what
    the plan's machines held within the objectives as deployed."""
    replicas = "1 replica" if n_machines == 1 else f"{n_machines} replicas"
    share = f"{trace_load / held:.0%} of" if held else "beyond"
    return f"{n_adapters} adapters, {replicas}, bursty Zipf load at {share} capacity as deployed"


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


def markdown_report(workload: str, regime_phrase: str, details: dict, table: pd.DataFrame, slo: pd.DataFrame,
                    plots: list[str]) -> str:
    lines = [f"# LMaaS — {workload}", "", f"Regime: {regime_phrase}.", "", table.round(3).to_markdown(index=False), "",
             "## Fine-tuned adapters (held-out examples)", "",
             "| task | loss before → after | base accuracy | adapter accuracy | through the service (adapter / base) |",
             "|---|---|---|---|---|"]
    for task_name, f in details["fine_tuning"].items():
        lines.append(f"| {task_name} | {f['heldout_loss'][0]} → {f['heldout_loss'][1]} | {f['accuracy_base']:.2f} | "
                     f"{f['accuracy_adapter']:.2f} | {f['served_accuracy']['adapter']:.2f} / "
                     f"{f['served_accuracy']['base']:.2f} |")
    lines += ["", "## SLO attainment per tenant", "", slo.round(3).to_markdown(index=False), "",
              f"Capacity as deployed (probes of the trace's shape over HTTP): {details['capacity_as_deployed']}", "",
              f"Placement: {details['placement']}", "", f"Serverless: {details['serverless']}", "",
              f"Isolation probe (HTTP status): {details['isolation']}", "",
              f"Re-plan on a shifted mix: {replan_text(details['replan'])}", "", *[f"![{p}]({p})" for p in plots], "",
              "Simulated / what this host stands in for:", *[f"- {s}" for s in SIMULATED]]
    return "\n".join(lines) + "\n"


def evaluate(run: RunContext, service: ServiceReplays, baselines: dict, tenancy: Tenancy, trained: list[dict],
             trace: list, plan, loads: list, profiled: dict, profiles: dict, formats: dict, objectives: Objectives,
             replan: dict, shape: dict, strategies: list[str]) -> None:
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
    # the tenants' usage of the deployed service; the profile's probes (sent with the tenants' keys
    # before it was deployed) are metered too, and counted apart
    usage = {t: tenancy.registry.usage(info, since=service.deployed_at)["total"] for t, info in tenants.items()}
    probe_tokens = sum(tenancy.registry.usage(info)["total"]["completion_tokens"] for info in tenants.values()) \
        - sum(u["completion_tokens"] for u in usage.values())
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
    machine_pool = {m: name for name in profiles for m in run.params.infra_spec.pool(name).machine_names()}
    held = sum(profiles[machine_pool[w]]["capacity_tokens_per_s"] for w in plan.workers)
    trace_load = sum(a.tokens_per_s for a in loads)
    summary = run.summary
    summary.simulated = SIMULATED
    summary.regime = regime(len(tenancy.models), trace_load, held, len(plan.workers))
    summary.compare("throughput", "tok/s", "higher", by.tokens_per_s.to_dict(), "lmaas", strategies, digits=2)
    summary.details = {
        "workload": workload,
        "latency_p99_s": {s: round(float(by.loc[s, "latency_p99_s"]), 3) for s in by.index},
        "slo_attainment": {s: round(v, 3) for s, v in attainment.items()},
        "slo_attainment_by_tenant": {s: {r.tenant: round(r.slo_attainment, 3) for r in g.itertuples()}
                                     for s, g in slo.groupby("strategy", sort=False)},
        "trace_load_tokens_per_s": round(trace_load, 1),
        "capacity_as_deployed": {pool: {"tokens_per_s": round(p["capacity_tokens_per_s"], 1),
                                        "objectives": p["objectives"], "target_attainment": p["target_attainment"],
                                        "probes": [{k: round(v, 3) if isinstance(v, float) else v for k, v in x.items()}
                                                   for x in p["points"]], "seconds": round(p["seconds"], 1),
                                        "replica": p["replica"]}
                                 for pool, p in profiles.items()},
        "fine_tuning": {r["task"]: {"heldout_loss": [round(r["heldout_loss_before"], 3), round(r["heldout_loss_after"], 3)],
                                    "accuracy_base": r["accuracy_base"], "accuracy_adapter": r["accuracy_adapter"],
                                    "served_accuracy": service.served_accuracy[r["task"]], "seconds": round(r["seconds"], 1)}
                        for r in trained},
        "placement": {"workers": plan.workers, "usd_per_hour": plan.usd_per_hour, "optimal": plan.optimal,
                      "solve_seconds": round(plan.solve_seconds, 3)},
        "serving_format": {pool: {"chosen": fmt, **{f: round(capacity(p, objectives.tpot_s), 1)
                                                     for f, p in profiled[pool].items()}}
                           for pool, fmt in formats.items()},
        "serverless": {"scaled_to_zero_between_runs": service.scaled_to_zero,
                       **cold_share(served["lmaas_serverless"], slo[slo.strategy == "lmaas_serverless"]),
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
                    "usd_per_million_tokens": round(metered_cost / metered_tokens * 1e6, 4) if metered_tokens else None,
                    "profile_probe_tokens_apart": probe_tokens},
        "replan": {k: v for k, v in replan.items() if k != "plan"},
    }
    run.write_report(markdown_report(workload, summary.regime, summary.details, table, slo, ["lmaas.png"]))
    run.write_evaluation({"strategies": table.to_dict("records"), "slo": slo.to_dict("records"), "profiles": profiled,
                          "profiles_as_deployed": profiles,
                          "plan": plan_dict(plan), "replan": replan, "events": events})
