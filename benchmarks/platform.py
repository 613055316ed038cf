"""The platform's overhead per system: the share of a small run's wall time that no task spent on
its own work (``overhead_share`` of the run's summary), with workers spawned (before) and forked
from the fork server (after, the default), in one run.

    .venv/bin/python -m benchmarks.platform [--only jellybean,honeybee] [--rounds 1] [--scale small]
                                            [--out results/benchmarks/platform]

Each round runs every chosen system once per start method, alternating which goes first, as
``tierflow run NAME --json`` in a process of its own (``TIERFLOW_WORKER_START`` set), against the
Prefect server ``tierflow`` starts or finds. Writes ``<out>/platform.json`` and
``<out>/overhead.png``. The machine is shared: compare only the two columns of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from flows.registry import systems  # noqa: E402

DEFAULT_OUT = "results/benchmarks/platform"
METHODS = ("spawn", "forkserver")  # before, after
TARGET = 0.20


def run_once(system: str, method: str, scale: str, results_dir: str) -> dict:
    """One ``tierflow run`` with workers started by ``method``; its summary, or ``{"failed": why}``
    (the run's last error line: a failed run is recorded and the benchmark goes on)."""
    env = {**os.environ, "TIERFLOW_WORKER_START": method}
    done = subprocess.run([str(Path(sys.executable).with_name("tierflow")), "run", system, "--scale", scale, "--json",
                           "--results-dir", results_dir], env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        why = next((line for line in reversed(errors) if "Error" in line), errors[-1] if errors else "no output")
        return {"failed": f"exit {done.returncode}: {why}"}
    summary = json.loads(lines[-1])
    return {key: summary[key] for key in ("wall_seconds", "task_seconds", "overhead_share", "results")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="NAME[,NAME] (default: every system)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scale", default="small")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(systems())
    unknown = sorted(set(names) - set(systems()))
    if unknown:
        raise SystemExit(f"--only: unknown system(s) {', '.join(unknown)}; known: {', '.join(systems())}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    runs: dict[str, dict[str, list[dict]]] = {name: {m: [] for m in METHODS} for name in names}
    for round_ in range(args.rounds):
        for i, name in enumerate(names):
            order = METHODS if (round_ + i) % 2 == 0 else METHODS[::-1]
            for method in order:
                console.print(f"round {round_ + 1}/{args.rounds}: {name} with workers by {method} …")
                run = run_once(name, method, args.scale, str(out / "runs"))
                if "failed" in run:
                    console.print(f"  [red]failed[/red] {run['failed']}")
                runs[name][method].append(run)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None  # None: every run of it failed

    def cell(value: float | None, scale: float = 1.0, unit: str = "") -> str:
        return "failed" if value is None else f"{scale * value:.0f}{unit}"

    table = Table("system", "wall s (spawn)", "overhead (spawn)", "wall s (fork)", "overhead (fork)", "< 20%")
    figures = {}
    for name in names:
        ok = {m: [r for r in runs[name][m] if "failed" not in r] for m in METHODS}
        row = {m: {"wall_seconds": mean([r["wall_seconds"] for r in ok[m]]),
                   "overhead_share": mean([r["overhead_share"] for r in ok[m]]),
                   "failed": len(runs[name][m]) - len(ok[m])} for m in METHODS}
        figures[name] = row
        after = row["forkserver"]["overhead_share"]
        table.add_row(name, cell(row["spawn"]["wall_seconds"]), cell(row["spawn"]["overhead_share"], 100, "%"),
                      cell(row["forkserver"]["wall_seconds"]), cell(after, 100, "%"),
                      "—" if after is None else "yes" if after < TARGET else "no")
    console.print(table)
    document = {"scale": args.scale, "rounds": args.rounds, "before": "spawn", "after": "forkserver",
                "figures": figures, "runs": runs, "load_average": os.getloadavg()}
    (out / "platform.json").write_text(json.dumps(document, indent=2))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for k, method in enumerate(METHODS):
        ax.bar([i + (k - 0.5) * width for i in range(len(names))],
               [100 * (figures[n][method]["overhead_share"] or 0.0) for n in names], width, label=f"workers by {method}")
    ax.axhline(100 * TARGET, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("overhead share of wall time (%)")
    ax.set_title(f"Platform overhead per system ({args.scale} runs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=110)
    console.print(f"wrote {out / 'platform.json'} and {out / 'overhead.png'}")
    return document


if __name__ == "__main__":
    main()
