"""``tierflow lazarus …``: Lazarus's decisions from the command line, in this process.

- ``plan``: replica counts and placement for a cluster and the experts' loads, with the
  exact probability that the survivors still hold every expert for each number of failed
  nodes;
- ``kill``: preempt a training node of the running ``tierflow run lazarus`` (SIGKILL).

Nothing here imports Prefect (see flows/console.py).
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from flows.console import fail

lazarus_app = typer.Typer(help="Lazarus: resilient, elastic Mixture-of-Experts training.", no_args_is_help=True)


def parse_loads(text: str) -> list[float]:
    """``"L1,L2,..."`` → floats; a bad entry fails naming ``--loads`` and the entry."""
    loads = []
    for i, part in enumerate(text.split(",")):
        try:
            loads.append(float(part))
        except ValueError:
            fail(f"--loads: entry {i + 1} is {part.strip()!r}, not a number (expected e.g. 120,80,40,10)")
    return loads


def recovery_table(placement, n_nodes: int) -> dict[int, float | None]:
    """Exact recovery probability for each number of failed nodes 0..N (None where exact is infeasible)."""
    from optimizers.lazarus import PlacementError, recovery_probability

    out = {}
    for failed in range(n_nodes + 1):
        try:
            out[failed] = recovery_probability(placement, n_nodes, failed)
        except PlacementError:
            out[failed] = None
    return out


@lazarus_app.command("plan")
def plan(
    nodes: int = typer.Option(..., help="N, training nodes"),
    slots: int = typer.Option(..., help="c, expert slots per node"),
    f: int = typer.Option(2, "--f", help="at least this many replicas of every expert"),
    loads: str = typer.Option(..., help="tokens routed to each expert, comma-separated: L1,L2,..."),
    strategy: str = typer.Option("lazarus", help="lazarus | reconfig_uniform | spread | compact | all"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document"),
) -> None:
    """Replicas and placement (node → experts) with the exact recovery probability per failed-node count."""
    from optimizers.lazarus import STRATEGIES, PlacementError, allocate_replicas, plan_strategy

    names = list(STRATEGIES) if strategy == "all" else [strategy]
    if names[0] not in STRATEGIES:
        fail(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)} or all")
    parsed = parse_loads(loads)
    try:  # the request itself must be satisfiable (a re-plan after failures may lower f; a request may not)
        allocate_replicas(parsed, nodes, slots, f)
    except PlacementError as exc:
        fail(f"lazarus plan: {exc}")
    plans = {}
    for name in names:
        try:
            result = plan_strategy(name, parsed, nodes, slots, f)
        except PlacementError as exc:
            fail(f"lazarus plan: {exc}")
        plans[name] = {"strategy": name, "nodes": nodes, "slots": slots, "f": f, "loads": parsed,
                       "replicas": [int(r) for r in result.replicas],
                       "placement": {str(n): held for n, held in enumerate(result.placement.nodes)},
                       "recovery_probability": {str(k): p for k, p in recovery_table(result.placement, nodes).items()},
                       "solve_seconds": result.solve_seconds, "notes": result.notes}
    if as_json:
        sys.stdout.write(json.dumps(plans[names[0]] if len(names) == 1 else plans) + "\n")
        return
    console = Console()
    for name, p in plans.items():
        table = Table("node", "experts", title=f"{name}: replicas {p['replicas']}")
        for node, held in p["placement"].items():
            table.add_row(node, ", ".join(map(str, held)))
        console.print(table)
    curve = Table("failed nodes", *names, title="probability the survivors hold every expert (exact)")
    for k in range(nodes + 1):
        row = [plans[n]["recovery_probability"][str(k)] for n in names]
        curve.add_row(str(k), *("—" if v is None else f"{v:.4f}" for v in row))
    console.print(curve)


@lazarus_app.command("kill")
def kill(node: str = typer.Argument(..., help="a node of the running run, e.g. node2")) -> None:
    """Kill a training node of the running Lazarus run (SIGKILL, like a spot preemption)."""
    import os
    import signal

    from infra.prefect_server import tierflow_home
    from tasks.lazarus.control import ControlPlane

    current = tierflow_home() / "lazarus" / "current.json"
    try:
        run = json.loads(current.read_text())
        control = ControlPlane.connect(run["host"], int(run["port"]), timeout_s=5)
        registered = control.registered()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        fail(f"no running Lazarus run to kill a node of ({current}: {exc})")
    if node not in registered:
        fail(f"NODE: {node!r} is not a node of the running run; its nodes: {', '.join(sorted(registered))}")
    control.record_kill(node)
    try:
        os.kill(int(registered[node]["pid"]), signal.SIGKILL)
    except ProcessLookupError:
        fail(f"NODE: {node!r} is not running any more (pid {registered[node]['pid']})")
    Console().print(f"killed {node} (pid {registered[node]['pid']}); the survivors re-plan and go on")
