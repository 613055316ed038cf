"""JellyBean side by side: what the MILP saves, how it scales, what the platform costs.

    .venv/bin/python -m benchmarks.jellybean [--quick] [--out results/benchmarks/jellybean] [--summary FILE]

Three parts, each a function that returns its section of ``<out>/jellybean.json``:

* :func:`vqa_savings` — the authors' measured VQA inputs: the MILP against every
  strategy in :data:`optimizers.jellybean_baselines.STRATEGIES` at the shipped setting
  (40 req/s per source, accuracy ≥ 56.0) for the mean, p50 and p90 execution profiles,
  then sweeps of the source rate and of the accuracy target, with each saving split
  into the part that comes from compute and the part that comes from the network.
  Figures: ``vqa_costs.png`` (compute/network stacked per strategy) and
  ``vqa_savings_vs_rate.png`` (savings against rate and against target).
* :func:`solver_scaling` — generated instances from 10 to 1,000 machines and 3 to 20
  operators: the MILP, the paper's heuristic and the MILP seeded (capped) by the
  heuristic's plan (:func:`optimizers.jellybean_baselines.plan_milp_seeded`, its time
  including the heuristic's) timed side by side, each in its own process with a time
  limit, plus the check that the medium instance (100 machines, 8 operators) solves to
  optimality in under 10 s. Figure: ``solver_scaling.png``.
* :func:`platform_overhead` — the share of a ``tierflow run jellybean --json`` run's
  wall time spent outside the tasks' own work, from its summary line: a run started
  here (``.venv/bin/tierflow run jellybean --json``, the default embedded run), or the
  one saved in ``--summary FILE``. ``--quick`` skips it.

Timings are wall-clock on whatever else this machine is doing at the time; each scaling
case also records its CPU seconds and the load average around it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from optimizers.jellybean import Plan, check_feasible_inputs, plan_milp, plan_violations  # noqa: E402
from optimizers.jellybean_baselines import STRATEGIES, plan_jellybean_heuristic, plan_milp_seeded  # noqa: E402
from optimizers.solve import InfeasibleError, SolverError  # noqa: E402
from tasks.jellybean.generate import generate_problem  # noqa: E402
from tasks.jellybean.inputs import load_repository_inputs  # noqa: E402

VQA_INPUTS = "data/jellybean-vqa"
DEFAULT_OUT = "results/benchmarks/jellybean"
RESULTS_FILE = "jellybean.json"

PROFILES = ("execution_profile.csv", "execution_profile_p50.csv", "execution_profile_p90.csv")
RATES = (10.0, 20.0, 40.0, 60.0, 80.0)
TARGETS = (54.0, 55.0, 56.0, 57.0, 58.0)
SWEEP_RATE = 40.0
QUICK_PROFILES = ("execution_profile.csv",)
QUICK_RATES = (20.0, 40.0)
QUICK_TARGETS = (56.0,)

MACHINES = (10, 30, 100, 300, 1000)
OPERATORS = (3, 8, 20)
QUICK_MACHINES = (10, 100)
QUICK_OPERATORS = (3, 8)
TIERS = 4
VARIANTS = 3
SEED = 0
MILP_TIME_LIMIT_S = 60.0
MILP_BUILD_ALLOWANCE_S = 120.0  # on top of the solver's limit, for model building and compilation
HEURISTIC_LIMIT_S = 120.0
SCALING_BUDGET_S = 1200.0  # cases not started within this many seconds are recorded as skipped (three solvers per case)
SOLVERS = ("milp", "heuristic", "milp_seeded")

MEDIUM = {"machines": 100, "operators": 8}
MEDIUM_SEEDS = (0, 1, 2, 3)  # the first is the grid's instance, the others check it is not a lucky one
MEDIUM_REPEATS = 3  # runs of the first seed; the fastest counts (timings share the machine)
MEDIUM_TARGET_S = 10.0

SYNTHETIC = "solver_scaling: generated instances (tasks.jellybean.generate) — synthetic workflows, fleets, latencies, prices and accuracies, not measured profiles"

ROOT = Path(__file__).resolve().parent.parent
TIERFLOW = ROOT / ".venv" / "bin" / "tierflow"
RUN_COMMAND = (str(TIERFLOW), "run", "jellybean", "--json")
RUN_TIMEOUT_S = 900.0

console = Console(width=None if sys.stdout.isatty() else 150)


# --------------------------------------------------------------------------- shared helpers


def pools_for(machines: int, tiers: int = TIERS) -> int:
    """Pools of identical machines in a generated fleet of ``machines``.

    At least four pools per tier (so every tier has a choice of prices), one pool per five
    machines beyond that, at most 40: a fleet is bought in batches, and the MILP aggregates
    a pool's identical machines exactly, so its size stops growing with the fleet.
    """
    return min(machines, max(4 * tiers, min(machines // 5, 40)))


def _plan_record(problem, plan: Plan) -> dict:
    return {
        "compute_usd_per_hour": plan.compute_cost_per_hour,
        "network_usd_per_hour": plan.network_cost_per_hour,
        "total_usd_per_hour": plan.total_cost_per_hour,
        "accuracy": plan.accuracy,
        "meets_target": plan.accuracy >= problem.accuracy_target - 1e-9,
        "variants": plan.variants,
        "machines_used": sum(a.machines for a in plan.assignment),
        "solve_seconds": plan.solve_seconds,
        "optimal": plan.optimal,
        "gap": plan.gap,
        "violations": plan_violations(problem, plan),
        "notes": plan.notes,
    }


def _save_section(out: str | Path, name: str, section: dict) -> Path:
    """Merge one part's section into ``<out>/jellybean.json`` (the other parts' stay as they are)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    results = json.loads(path.read_text()) if path.is_file() else {"benchmark": "jellybean"}
    results[name] = section
    results["simulated"] = sorted({s for part in results.values() if isinstance(part, dict) for s in part.get("simulated", [])})
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


# --------------------------------------------------------------------------- 1. VQA savings


def _compare(problem) -> dict:
    """The MILP and every baseline on one problem; savings = 1 − milp_total / baseline_total."""
    setting = {"rate": dict(problem.sources), "accuracy_target": problem.accuracy_target}
    try:
        check_feasible_inputs(problem)
        milp = plan_milp(problem)
    except (InfeasibleError, SolverError) as exc:
        return {"setting": setting, "feasible": False, "reason": str(exc)}
    strategies = {"milp": _plan_record(problem, milp)}
    savings, failures = {}, {}
    for name, strategy in STRATEGIES.items():
        try:
            plan = strategy(problem)
        except (InfeasibleError, SolverError) as exc:
            failures[name] = str(exc)
            savings[name] = None
            continue
        strategies[name] = _plan_record(problem, plan)
        total = plan.total_cost_per_hour
        savings[name] = {
            "savings": 1 - milp.total_cost_per_hour / total,
            "from_compute": (plan.compute_cost_per_hour - milp.compute_cost_per_hour) / total,
            "from_network": (plan.network_cost_per_hour - milp.network_cost_per_hour) / total,
            "milp_over_baseline": milp.total_cost_per_hour / total,
            "same_variants": plan.variants == milp.variants,
            "baseline_feasible": not strategies[name]["violations"],
        }
    return {"setting": setting, "feasible": True, "strategies": strategies, "savings": savings, "baseline_failures": failures}


def vqa_savings(
    inputs: str | Path = VQA_INPUTS,
    *,
    quick: bool = False,
    out: str | Path | None = None,
) -> dict:
    """MILP savings over every baseline on the authors' measured VQA inputs.

    Parameters
    ----------
    inputs: the JellyBean optimizer-input folder (the shipped VQA one by default).
    quick: only the mean profile, rates 20 and 40 req/s and the shipped target.
    out: when given, write ``vqa_costs.png``, ``vqa_savings_vs_rate.png`` and this
        section of ``jellybean.json`` there.
    """
    profiles = QUICK_PROFILES if quick else PROFILES
    rates = QUICK_RATES if quick else RATES
    targets = QUICK_TARGETS if quick else TARGETS
    start = time.perf_counter()

    done: dict[tuple, dict] = {}

    def compare(profile: str = PROFILES[0], **overrides) -> dict:
        problem = load_repository_inputs(inputs, profile_file=profile, **overrides)
        key = (profile, tuple(sorted(problem.sources.items())), problem.accuracy_target)
        if key not in done:  # the sweeps pass through the shipped setting; solve it once
            done[key] = _compare(problem)
        return done[key]

    by_profile = {p: compare(p) for p in profiles}
    by_rate = {str(r): compare(rate=r) for r in rates}
    by_target = {str(t): compare(rate=SWEEP_RATE, accuracy_target=t) for t in targets}
    section = {
        "inputs": str(inputs),
        "simulated": [],
        "notes": [
            "the shipped inputs are the JellyBean authors' measured profiles (data/jellybean-vqa/PROVENANCE.md); nothing is simulated",
            "savings = 1 − milp_total / baseline_total; from_compute + from_network = savings",
            "rate sweep uses the mean profile and the shipped target; target sweep uses the mean profile at "
            f"{SWEEP_RATE:g} req/s per source",
            "baseline_feasible is false where a baseline's plan breaks a rule (e.g. misses the accuracy target); "
            "its saving is then not like for like",
        ],
        "quick": quick,
        "default_setting": by_profile[PROFILES[0]],
        "profiles": by_profile,
        "rate_sweep": by_rate,
        "target_sweep": by_target,
        "seconds": time.perf_counter() - start,
    }
    _print_vqa(section)
    if out is not None:
        section["figures"] = [str(_plot_vqa_costs(section, Path(out))), str(_plot_vqa_savings(section, Path(out)))]
        _save_section(out, "vqa_savings", section)
    return section


def _print_vqa(section: dict) -> None:
    for profile, result in section["profiles"].items():
        if not result["feasible"]:
            console.print(f"[red]{profile}: infeasible[/red] — {result['reason']}")
            continue
        rates = "/".join(f"{r:g}" for r in result["setting"]["rate"].values())
        table = Table(title=f"VQA, {profile}: {rates} req/s per source, accuracy ≥ {result['setting']['accuracy_target']:g}")
        for col in ("strategy", "compute $/h", "network $/h", "total $/h", "accuracy", "MILP saves", "MILP/strategy"):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for name, rec in result["strategies"].items():
            s = result["savings"].get(name)
            table.add_row(
                name, f"{rec['compute_usd_per_hour']:.3f}", f"{rec['network_usd_per_hour']:.3f}",
                f"{rec['total_usd_per_hour']:.3f}", f"{rec['accuracy']:.2f}",
                _pct(s["savings"]) if s else "—", f"{s['milp_over_baseline']:.3f}" if s else "—",
            )
        console.print(table)
    for title, sweep, key in (("source rate (req/s)", section["rate_sweep"], "rate"), ("accuracy target", section["target_sweep"], "target")):
        table = Table(title=f"MILP savings vs {title} (compute part / network part)")
        table.add_column(key)
        for name in STRATEGIES:
            table.add_column(name, justify="right")
        for value, result in sweep.items():
            if not result["feasible"]:
                table.add_row(value, *["infeasible"] * len(STRATEGIES))
                continue
            cells = []
            for name in STRATEGIES:
                s = result["savings"].get(name)
                cells.append("failed" if s is None else f"{_pct(s['savings'])} ({_pct(s['from_compute'])}/{_pct(s['from_network'])})")
            table.add_row(value, *cells)
        console.print(table)


def _save_figure(fig, path: Path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_vqa_costs(section: dict, out: Path) -> Path:
    feasible = {p: r for p, r in section["profiles"].items() if r["feasible"]}
    fig, axes = plt.subplots(1, max(len(feasible), 1), figsize=(4.5 * max(len(feasible), 1), 4.2), sharey=True, squeeze=False)
    for ax, (profile, result) in zip(axes[0], feasible.items()):
        names = list(result["strategies"])
        compute = [result["strategies"][n]["compute_usd_per_hour"] for n in names]
        network = [result["strategies"][n]["network_usd_per_hour"] for n in names]
        ax.bar(names, compute, label="compute", color="#4C72B0")
        ax.bar(names, network, bottom=compute, label="network", color="#DD8452")
        for i, n in enumerate(names):
            s = result["savings"].get(n)
            if s:
                ax.annotate(f"MILP −{100 * s['savings']:.1f}%", (i, compute[i] + network[i]), ha="center", va="bottom", fontsize=8)
        ax.set_title({"execution_profile.csv": "mean latency profile"}.get(profile, profile.removesuffix(".csv").replace("execution_profile_", "") + " latency profile"), fontsize=10)
        ax.tick_params(axis="x", rotation=25, labelsize=8)
    axes[0][0].set_ylabel("$ / hour")
    axes[0][0].legend()
    setting = section["default_setting"]["setting"]
    rates = "/".join(f"{r:g}" for r in setting["rate"].values())
    fig.suptitle(f"JellyBean VQA (measured inputs): {rates} req/s per source, accuracy ≥ {setting['accuracy_target']:g}", fontsize=11)
    return _save_figure(fig, out / "vqa_costs.png")


def _plot_vqa_savings(section: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (sweep, label) in zip(axes, ((section["rate_sweep"], "source rate (req/s each)"), (section["target_sweep"], "accuracy target"))):
        for name in STRATEGIES:
            xs, ys = [], []
            for value, result in sweep.items():
                s = result["savings"].get(name) if result["feasible"] else None
                if s:
                    xs.append(float(value))
                    ys.append(100 * s["savings"])
            ax.plot(xs, ys, marker="o", label=name)
        skipped = [f"{v}: infeasible" for v, r in sweep.items() if not r["feasible"]]
        skipped += [f"{v}: no {', '.join(r['baseline_failures'])} plan" for v, r in sweep.items() if r["feasible"] and r["baseline_failures"]]
        if skipped:
            ax.text(0.02, 0.02, "\n".join(skipped), transform=ax.transAxes, fontsize=8, va="bottom")
        ax.set_xlabel(label)
        ax.set_ylabel("MILP savings (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"vs rate (target {section['default_setting']['setting']['accuracy_target']:g})", fontsize=10)
    axes[1].set_title(f"vs target ({SWEEP_RATE:g} req/s)", fontsize=10)
    axes[0].legend(fontsize=8)
    return _save_figure(fig, out / "vqa_savings_vs_rate.png")


# --------------------------------------------------------------------------- 2. solver scaling


def _scaling_case(solver: str, machines: int, operators: int, pools: int, seed: int, milp_time_limit: float) -> dict:
    """One solver on one generated instance (runs in its own process).

    ``solver`` is ``milp``, ``heuristic`` or ``milp_seeded`` (the MILP capped by the
    heuristic's plan; its ``seconds`` include the heuristic's run).
    """
    t0 = time.perf_counter()
    problem = generate_problem(seed, operators=operators, machines=machines, pools=pools, tiers=TIERS, variants=VARIANTS)
    record = {"generate_seconds": time.perf_counter() - t0, "source_rates": dict(problem.sources)}
    cpu0 = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t1 = time.perf_counter()
        if solver == "milp":
            plan = plan_milp(problem, time_limit=milp_time_limit)
        elif solver == "milp_seeded":
            plan = plan_milp_seeded(problem, time_limit=milp_time_limit)
        elif solver == "heuristic":
            plan = plan_jellybean_heuristic(problem)
        else:
            raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
        wall = time.perf_counter() - t1
    record.update(
        # the seeded MILP's own solve_seconds start after the heuristic: time the whole call instead
        seconds=wall if solver == "milp_seeded" else plan.solve_seconds,
        cpu_seconds=time.process_time() - cpu0,
        optimal=plan.optimal,
        gap=plan.gap,
        total_usd_per_hour=plan.total_cost_per_hour,
        compute_usd_per_hour=plan.compute_cost_per_hour,
        network_usd_per_hour=plan.network_cost_per_hour,
        machines_used=sum(a.machines for a in plan.assignment),
        violations=plan_violations(problem, plan),
        notes=list(plan.notes),
        warnings=sorted({str(w.message) for w in caught}),
    )
    if solver == "milp_seeded":
        record["milp_part_seconds"] = plan.solve_seconds
        record["heuristic_part_seconds"] = wall - plan.solve_seconds
        # plan_milp returns the incumbent, with this note, when nothing cheaper was found in time
        record["kept_heuristic_plan"] = any(n.startswith("nothing cheaper than") for n in plan.notes)
    return record


def _child(conn, fn: Callable, args: tuple) -> None:
    try:
        conn.send({"ok": fn(*args)})
    except BaseException as exc:  # everything goes back to the parent as a record
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)})
    finally:
        conn.close()


def _isolated(fn: Callable, args: tuple, timeout: float) -> dict:
    """Run ``fn(*args)`` in a fresh process; a case that overruns ``timeout`` is stopped and recorded."""
    # Not plain fork: HiGHS keeps a thread pool once it has solved anything, and a forked
    # copy of it can hang. The fork server starts clean and forks each case from there.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cvxpy", "optimizers.jellybean", "optimizers.jellybean_baselines", "tasks.jellybean.generate"])
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args), daemon=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc.start()
    child.close()
    got = parent.recv() if parent.poll(timeout) else None
    wall = time.perf_counter() - t0
    if proc.is_alive():
        proc.terminate()
    proc.join(5)
    meta = {"process_seconds": wall, "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
    if got is None:
        return {"status": "timeout", "reason": f"stopped after {timeout:.0f} s without a result", **meta}
    if "error" in got:
        return {"status": "error", "reason": got["error"], "traceback": got["traceback"], **meta}
    return {"status": "ok", **got["ok"], **meta}


def _run_case(machines: int, operators: int, seed: int, milp_time_limit: float, heuristic_limit: float,
              solvers: tuple[str, ...] = SOLVERS) -> dict:
    pools = pools_for(machines)
    case = {"machines": machines, "pools": pools, "operators": operators, "tiers": TIERS, "variants": VARIANTS, "seed": seed}
    if operators > machines:  # a machine serves one operator: no generated instance can be feasible
        case.update(status="impossible", reason=f"{operators} operators need at least {operators} machines (one operator per machine)")
        return case
    limits = {
        "milp": milp_time_limit + MILP_BUILD_ALLOWANCE_S,
        "heuristic": heuristic_limit,
        "milp_seeded": heuristic_limit + milp_time_limit + MILP_BUILD_ALLOWANCE_S,
    }
    for solver in solvers:
        heur = case.get("heuristic") or {}
        if solver == "milp_seeded" and heur.get("status") == "timeout":
            # the seeded MILP runs the heuristic first: it cannot finish where the heuristic alone did not
            case[solver] = {"status": "skipped", "reason": f"the heuristic alone ran past its {heuristic_limit:.0f} s limit"}
            continue
        case[solver] = _isolated(_scaling_case, (solver, machines, operators, pools, seed, milp_time_limit), limits[solver])
    milp, heur, seeded = (case.get(k, {}) for k in SOLVERS)
    if heur.get("status") == "ok":
        if milp.get("status") == "ok":
            case["milp_over_heuristic_cost"] = milp["total_usd_per_hour"] / heur["total_usd_per_hour"]
            case["heuristic_over_milp_seconds"] = heur["seconds"] / milp["seconds"]
        if seeded.get("status") == "ok":
            case["seeded_over_heuristic_cost"] = seeded["total_usd_per_hour"] / heur["total_usd_per_hour"]
    return case


def _medium_verdict(runs: list[dict], seed: int) -> dict:
    """Optimal in under MEDIUM_TARGET_S wall seconds; with repeats, the fastest run counts."""
    done = [r for r in runs if r.get("status") == "ok"]
    best = min(done, key=lambda r: r["seconds"]) if done else runs[0]
    ok = best.get("status") == "ok"
    return {
        "seed": seed,
        "status": best.get("status"),
        "optimal": bool(ok and best.get("optimal")),
        "seconds": best.get("seconds"),
        "cpu_seconds": best.get("cpu_seconds"),
        "gap": best.get("gap"),
        "all_seconds": [r.get("seconds") for r in runs],
        "load_average_before": [r.get("load_average_before") for r in runs],
        "pass": bool(ok and best.get("optimal") and best["seconds"] < MEDIUM_TARGET_S),
        "pass_on_cpu_seconds": bool(ok and best.get("optimal") and best["cpu_seconds"] < MEDIUM_TARGET_S),
    }


def solver_scaling(
    *,
    quick: bool = False,
    machines: tuple[int, ...] | None = None,
    operators: tuple[int, ...] | None = None,
    seed: int = SEED,
    milp_time_limit: float = MILP_TIME_LIMIT_S,
    heuristic_limit: float = HEURISTIC_LIMIT_S,
    budget_s: float = SCALING_BUDGET_S,
    medium_seeds: tuple[int, ...] = MEDIUM_SEEDS,
    out: str | Path | None = None,
) -> dict:
    """Time the MILP, the paper's heuristic and the heuristic-seeded MILP on generated instances of growing size.

    Parameters
    ----------
    quick: only machines {10, 100} × operators {3, 8}, and the medium check on one seed.
    machines, operators: the grid (default 10–1,000 machines × 3, 8, 20 operators).
    seed: the generator's seed for the grid.
    milp_time_limit: HiGHS's limit per solve (the plan is then the best found, not proven optimal).
    heuristic_limit: seconds after which a heuristic run is stopped and recorded as such.
    budget_s: cases not started within this many seconds of the start are recorded as skipped.
    medium_seeds: seeds on which the medium instance (100 machines, 8 operators) must
        solve to optimality in under 10 s (the plain MILP; empty: no medium check).
    out: when given, write ``solver_scaling.png`` and this section of ``jellybean.json`` there.
    """
    machines = machines or (QUICK_MACHINES if quick else MACHINES)
    operators = operators or (QUICK_OPERATORS if quick else OPERATORS)
    medium_seeds = medium_seeds[:1] if quick else medium_seeds
    start = time.perf_counter()
    cases = []
    for m in machines:
        for o in operators:
            if time.perf_counter() - start > budget_s:
                cases.append({"machines": m, "pools": pools_for(m), "operators": o, "seed": seed,
                              "status": "skipped", "reason": f"the scaling budget of {budget_s:.0f} s was spent"})
                continue
            case = _run_case(m, o, seed, milp_time_limit, heuristic_limit)
            cases.append(case)
            cells = (f"milp {_case_cell(case.get('milp'))}, heuristic {_case_cell(case.get('heuristic'))}, "
                     f"seeded {_case_cell(case.get('milp_seeded'))}") if "status" not in case else f"{case['status']} ({case['reason']})"
            console.print(f"  {m:>5} machines / {case['pools']:>2} pools × {o:>2} operators: {cells}")

    medium = []
    for i, s in enumerate(medium_seeds):
        runs = [c["milp"] for c in cases if c.get("milp") and c["machines"] == MEDIUM["machines"]
                and c["operators"] == MEDIUM["operators"] and c["seed"] == s]
        while len(runs) < (1 if quick or i else MEDIUM_REPEATS):
            runs.append(_run_case(MEDIUM["machines"], MEDIUM["operators"], s, milp_time_limit, heuristic_limit, ("milp",))["milp"])
        medium.append(_medium_verdict(runs, s))
    section = {
        "simulated": [SYNTHETIC],
        "notes": [
            "instances come from tasks.jellybean.generate.generate_problem: synthetic, not measured",
            f"pools = min(machines, max(4·tiers, min(machines // 5, 40))); tiers={TIERS}, variants={VARIANTS}, "
            "source rate 10 req/s (scaled down by the generator when the fleet cannot carry it)",
            "the MILP aggregates a pool's identical machines exactly, so its size follows pools, not machines; "
            "the heuristic enumerates individual machines",
            "each solver runs in its own process; seconds = the strategy's own timing (model building, solve and "
            "reading the plan back), cpu_seconds = the process's CPU time",
            "gap = Plan.gap: 0 when proven optimal, HiGHS's relative MIP gap when stopped at the time limit, None if unknown",
            "milp_seeded = optimizers.jellybean_baselines.plan_milp_seeded: the heuristic, then the MILP capped by its plan; "
            "its seconds include the heuristic's run (heuristic_part_seconds + milp_part_seconds); kept_heuristic_plan "
            "is true where nothing cheaper was found within the time limit and the heuristic's plan came back; "
            "not run (skipped) where the heuristic alone ran past its limit",
            f"MILP time limit {milp_time_limit:g} s (HiGHS, plain and seeded), heuristic stopped after {heuristic_limit:g} s",
            f"timings share a {os.cpu_count()}-core machine with other work: see load_average_* per case",
        ],
        "quick": quick,
        "milp_time_limit_s": milp_time_limit,
        "heuristic_limit_s": heuristic_limit,
        "cases": cases,
        "medium_requirement": {
            "instance": {**MEDIUM, "pools": pools_for(MEDIUM["machines"]), "tiers": TIERS, "variants": VARIANTS},
            "target_seconds": MEDIUM_TARGET_S,
            "rule": f"the plain MILP optimal in under {MEDIUM_TARGET_S:g} s wall time; seed {medium_seeds[0]} is the requirement "
                    f"(fastest of {1 if quick else MEDIUM_REPEATS} runs), further seeds say how typical it is"
                    if medium_seeds else "not checked (no seeds given)",
            "runs": medium,
            "pass": medium[0]["pass"] if medium else None,
            "all_seeds_pass": all(r["pass"] for r in medium) if medium else None,
        },
        "seconds": time.perf_counter() - start,
    }
    _print_scaling(section)
    if out is not None:
        section["figures"] = [str(_plot_scaling(section, Path(out)))]
        _save_section(out, "solver_scaling", section)
    return section


def _case_cell(result: dict | None) -> str:
    if not result:
        return "—"
    if result["status"] != "ok":
        return f"{result['status']} ({result['reason']})"
    if result.get("kept_heuristic_plan"):
        extra = " (kept the heuristic's plan)"
    elif result.get("optimal") in (True, None):
        extra = ""
    else:
        extra = f" (gap {_gap(result.get('gap'))})"
    return f"{result['seconds']:.2f} s{extra}"


def _gap(gap: float | None) -> str:
    return "—" if gap is None else f"{100 * gap:.2f}%"


def _seconds_cell(result: dict, case: dict) -> str:
    if result.get("status") == "ok":
        return f"{result['seconds']:.2f}"
    return result.get("status", case.get("status", "—"))


def _print_scaling(section: dict) -> None:
    table = Table(title="JellyBean solver scaling (generated instances)")
    for col in ("machines", "pools", "operators", "milp s", "optimal", "gap", "seeded s", "seeded optimal",
                "heuristic s", "milp/heuristic cost", "seeded/heuristic cost"):
        table.add_column(col, justify="right")
    for c in section["cases"]:
        milp, heur, seeded = (c.get(k) or {} for k in SOLVERS)
        ratio, seeded_ratio = c.get("milp_over_heuristic_cost"), c.get("seeded_over_heuristic_cost")
        seeded_optimal = str(seeded.get("optimal", "—"))
        if seeded.get("kept_heuristic_plan"):
            seeded_optimal += " (kept heuristic)"
        table.add_row(
            str(c["machines"]), str(c["pools"]), str(c["operators"]),
            _seconds_cell(milp, c),
            str(milp.get("optimal", "—")),
            _gap(milp.get("gap")) if milp.get("status") == "ok" else "—",
            _seconds_cell(seeded, c),
            seeded_optimal,
            _seconds_cell(heur, c),
            f"{ratio:.3f}" if ratio is not None else "—",
            f"{seeded_ratio:.3f}" if seeded_ratio is not None else "—",
        )
    console.print(table)
    req = section["medium_requirement"]
    for r in req["runs"]:
        seconds = ", ".join("—" if t is None else f"{t:.2f}" for t in r["all_seconds"])
        console.print(f"medium (100 machines, 8 operators) seed {r['seed']}: optimal={r['optimal']}, "
                      f"gap {_gap(r['gap'])}, wall {seconds} s, cpu {r['cpu_seconds'] or math.nan:.2f} s "
                      f"(target < {req['target_seconds']:g} s) → {'PASS' if r['pass'] else 'FAIL'}")
    if req["runs"]:
        verdict = "PASS" if req["pass"] else "FAIL"
        console.print(f"medium requirement (seed {req['runs'][0]['seed']}): [{'green' if req['pass'] else 'red'}]{verdict}[/]; "
                      f"every seed: {'PASS' if req['all_seeds_pass'] else 'FAIL'}")


def _plot_scaling(section: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ops = sorted({c["operators"] for c in section["cases"]})
    colors = dict(zip(ops, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {"milp": "-o", "heuristic": "--s", "milp_seeded": ":D"}
    for o in ops:
        rows = [c for c in section["cases"] if c["operators"] == o]
        for solver, style in styles.items():
            pts = [(c["machines"], c[solver]["seconds"]) for c in rows if (c.get(solver) or {}).get("status") == "ok"]
            if pts:
                axes[0].plot(*zip(*pts), style, color=colors[o], label=f"{solver}, {o} ops", markersize=4)
            for c in rows:
                res = c.get(solver) or {}
                if res.get("status") == "ok" and solver != "heuristic" and not res.get("optimal"):
                    axes[0].plot(c["machines"], res["seconds"], "x", color="black", markersize=9)
                elif res.get("status") == "timeout":
                    axes[0].plot(c["machines"], res["process_seconds"], "^", color=colors[o], markersize=9)
        for key, style, label in (("milp_over_heuristic_cost", "-o", "milp"), ("seeded_over_heuristic_cost", ":D", "seeded")):
            pts = [(c["machines"], c[key]) for c in rows if key in c]
            if pts:
                axes[1].plot(*zip(*pts), style, color=colors[o], label=f"{label}, {o} operators", markersize=4)
    axes[0].axhline(section["milp_time_limit_s"], color="grey", lw=0.8, ls=":")
    axes[0].set(xscale="log", yscale="log", xlabel="machines (workers)", ylabel="solve seconds",
                title="solve time (× = MILP not proven optimal, ▲ = stopped)")
    axes[0].legend(fontsize=6, ncol=3)
    axes[1].set(xscale="log", xlabel="machines (workers)", ylabel="cost / heuristic cost",
                title="plan cost relative to the paper's heuristic")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[1].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("JellyBean solver scaling — generated (synthetic) instances; seeded = MILP capped by the heuristic's plan "
                 "(time includes the heuristic)", fontsize=10)
    return _save_figure(fig, out / "solver_scaling.png")


# --------------------------------------------------------------------------- 3. platform overhead


def _last_json_dict(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _run_tierflow(command: tuple[str, ...] = RUN_COMMAND, timeout: float = RUN_TIMEOUT_S) -> tuple[str | None, dict]:
    """Run ``tierflow run jellybean --json`` (the default embedded run); its stdout and what happened.

    TIERFLOW_HOME (where the local Prefect server keeps its state) is passed on when it is set.
    """
    env = dict(os.environ)
    meta: dict = {"command": " ".join(command), "cwd": str(ROOT), "timeout_s": timeout,
                  "tierflow_home": env.get("TIERFLOW_HOME"), "load_average_before": os.getloadavg()[0]}
    if not Path(command[0]).is_file():
        meta["error"] = f"{command[0]}: no such program"
        return None, meta
    console.print(f"platform overhead: running `{meta['command']}` (at most {timeout:.0f} s)…")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        meta.update(process_seconds=time.perf_counter() - t0, load_average_after=os.getloadavg()[0],
                    error=f"stopped after {timeout:.0f} s without finishing",
                    stderr_tail=_tail(exc.stderr))
        return None, meta
    meta.update(process_seconds=time.perf_counter() - t0, load_average_after=os.getloadavg()[0], returncode=done.returncode)
    if done.returncode != 0:
        meta.update(error=f"exited with status {done.returncode}", stderr_tail=_tail(done.stderr), stdout_tail=_tail(done.stdout))
        return None, meta
    return done.stdout, meta


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def platform_overhead(
    run_summary_path: str | Path | None = None,
    *,
    quick: bool = False,
    out: str | Path | None = None,
    command: tuple[str, ...] = RUN_COMMAND,
    timeout: float = RUN_TIMEOUT_S,
) -> dict:
    """Share of a run's wall time spent outside the tasks' own work.

    Parameters
    ----------
    run_summary_path: a file holding the stdout of ``tierflow run jellybean --json`` (or
        just its last line, the summary dict). Without one, the run is started here
        (``command``, by default ``.venv/bin/tierflow run jellybean --json``, stopped after
        ``timeout`` seconds) and its last stdout line is the summary — unless ``quick``.
    quick: without a summary file, skip the run and record the overhead as not measured.
    out: when given, write this section of ``jellybean.json`` there.

    The summary's ``wall_seconds`` (the whole flow, cluster start and stop included) and
    ``task_seconds`` (the union of the intervals in which tasks did their own work) give
    ``overhead_share`` = 1 − task/wall; the run's savings over each baseline come with them.
    """
    section: dict = {"simulated": [], "summary_file": None if run_summary_path is None else str(run_summary_path)}
    summary, where = None, None
    if run_summary_path is None and quick:
        section.update(status="not measured (quick)", reason="--quick skips the end-to-end `tierflow run jellybean --json`")
    elif run_summary_path is None:
        stdout, meta = _run_tierflow(command, timeout)
        section.update(source="run started by the benchmark", run=meta)
        where = f"`{meta['command']}`"
        if stdout is None:
            section.update(status="not measured", reason=f"{where}: {meta['error']}")
        else:
            summary = _last_json_dict(stdout)
            if summary is None:
                section.update(status="not measured", reason=f"{where}: no JSON dict on its last stdout line",
                               stdout_tail=_tail(stdout))
    elif not Path(run_summary_path).is_file():
        section.update(status="not measured", reason=f"{run_summary_path}: no such file")
    else:
        section["source"] = "summary file"
        where = str(run_summary_path)
        summary = _last_json_dict(Path(run_summary_path).read_text())
        if summary is None:
            section.update(status="not measured", reason=f"{run_summary_path}: no JSON dict on any line")
    if summary is not None:
        section.update(_overhead_from_summary(summary, where))
    if section["status"] == "measured":
        console.print(f"platform overhead: {100 * section['overhead_share']:.1f}% of {section['wall_seconds']:.1f} s wall time "
                      f"({section['task_seconds']:.1f} s of task work); run savings: "
                      + ", ".join(f"{n} {_pct(v)}" for n, v in (section.get("savings") or {}).items()))
    elif section["status"] == "not measured (quick)":
        console.print("platform overhead: not measured (quick)")
    else:
        console.print(f"platform overhead: not measured ({section['reason']})")
    if out is not None:
        _save_section(out, "platform_overhead", section)
    return section


def _overhead_from_summary(summary: dict, where: str | None) -> dict:
    """The overhead figures (and the run's savings) from one run summary dict."""
    missing = [k for k in ("wall_seconds", "task_seconds") if not isinstance(summary.get(k), (int, float))]
    if missing:
        return {"status": "not measured", "reason": f"{where}: the summary has no numeric {', '.join(missing)}",
                "summary_keys": sorted(summary)}
    if summary["wall_seconds"] <= 0:
        return {"status": "not measured", "reason": f"{where}: wall_seconds = {summary['wall_seconds']!r} is not positive"}
    wall, task = float(summary["wall_seconds"]), float(summary["task_seconds"])
    reported = summary.get("overhead_share")
    figures = {
        "status": "measured",
        "wall_seconds": wall,
        "task_seconds": task,
        "overhead_seconds": wall - task,
        # the run's own figure (rounded to 3 places) when it reports one, else 1 − task/wall
        "overhead_share": float(reported) if isinstance(reported, (int, float)) else (wall - task) / wall,
        "overhead_share_reported": reported,
        "savings": summary.get("savings"),
        "milp_usd_per_hour": summary.get("milp"),
        "baselines_usd_per_hour": summary.get("baselines"),
        "infeasible_baselines": summary.get("infeasible_baselines"),
        "solve_seconds": summary.get("solve_seconds"),
        "throughput_met": summary.get("throughput_met"),
        "run_id": summary.get("run_id"),
        "results": summary.get("results"),
    }
    run_simulated = summary.get("simulated") or []
    if run_simulated:
        figures["simulated"] = [f"platform_overhead run: {s}" for s in run_simulated]
    return figures


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jellybean", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of every part")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--inputs", default=VQA_INPUTS, help="JellyBean optimizer-input folder for the VQA part")
    parser.add_argument("--summary", default=None,
                        help="stdout of `tierflow run jellybean --json`, for the overhead part (default: start that run here, "
                             "unless --quick)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (out / RESULTS_FILE).is_file():
        (out / RESULTS_FILE).unlink()  # a fresh run, not a merge with an old one
    vqa_savings(args.inputs, quick=args.quick, out=out)
    solver_scaling(quick=args.quick, out=out)
    platform_overhead(args.summary, quick=args.quick, out=out)
    results = json.loads((out / RESULTS_FILE).read_text())
    results["quick"] = args.quick
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))
    console.print(f"wrote {out / RESULTS_FILE} and {', '.join(sorted(p.name for p in out.glob('*.png')))}")
    return results


if __name__ == "__main__":
    main()
