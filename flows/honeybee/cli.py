"""``tierflow honeybee …``: HoneyBee's stages from the command line, in this process, on files.

- ``generate``: write a generated workload folder;
- ``profile``: measure filtered search here and write the fitted cost model (JSON);
- ``query``: plan one strategy, build its partitions, run the workload's queries, print
  each query's doc ids with QPS, storage and build time;
- ``update``: apply role/user/document changes to a workload incrementally.

Nothing here imports Prefect (see flows/console.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.console import console, fail, user_errors
from flows.honeybee import HoneyBeeParams

honeybee_app = typer.Typer(help="HoneyBee: role-based access control for vector search by overlapping partitions.",
                           no_args_is_help=True)


def _load_model(model: Optional[Path], workload, recall: float):
    """The cost model from a file, or measured here (with a progress line) when none is given."""
    from optimizers.honeybee_cost import SearchCostModel, fit_cost_model
    from tasks.honeybee.profile import GRIDS, grid_for, measure_search

    if model is not None:
        from infra.errors import InputError

        try:
            data = json.loads(model.read_text())
            return SearchCostModel.from_dict(data).with_floor(recall)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(model, "<file>", str(model), f"not a HoneyBee cost model (cost_model.json): {exc}") from None
    grid = grid_for(len(workload.vectors))
    with console.status(f"profiling filtered search here ({grid} grid)…") as status:
        frame = measure_search(workload.vectors, workload.queries, GRIDS[grid],
                               progress=lambda what: status.update(f"profiling filtered search here: {what}…"))
    return fit_cost_model(frame, recall_floor=recall)


@honeybee_app.command("generate")
def generate(
    out: Path = typer.Option(..., help="folder to write the workload into"),
    scale: str = typer.Option("small", help="tiny | small | medium | large"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Write a generated enterprise-RBAC workload folder (vectors, grants, users, queries)."""
    from tasks.honeybee.workload import SCALES, describe, generate_workload, save_workload

    if scale not in SCALES:
        fail(f"--scale: {scale!r} is not one of {', '.join(SCALES)}")
    with user_errors():
        workload = generate_workload(scale, seed)
        save_workload(workload, out)
    stats = describe(workload)
    Console().print(f"wrote {out}: {stats['n_docs']} documents × {stats['dim']}, {stats['n_roles']} roles, "
                    f"{stats['n_users']} users, {stats['n_queries']} queries")


@honeybee_app.command("profile")
def profile(
    workload: Path = typer.Option(..., help="workload folder"),
    out: Path = typer.Option(Path("cost_model.json"), help="where to write the fitted cost model"),
    grid: Optional[str] = typer.Option(None, help="tiny | small | medium | large (default: by workload size)"),
    recall: float = typer.Option(0.95, help="recall@k floor the model prices searches at"),
) -> None:
    """Measure filtered search on this machine and fit the cost and recall models."""
    from data_contracts import validate
    from optimizers.honeybee_cost import fit_cost_model
    from tasks.honeybee.profile import GRIDS, grid_for, measure_search
    from tasks.honeybee.workload import load_workload

    with user_errors():
        HoneyBeeParams.check_fields({"recall_target": recall}, "--recall")
        loaded = load_workload(workload)
        grid = grid or grid_for(len(loaded.vectors))
        if grid not in GRIDS:
            fail(f"--grid: {grid!r} is not one of {', '.join(GRIDS)}")
        with console.status("profiling…") as status:
            frame = measure_search(loaded.vectors, loaded.queries, GRIDS[grid],
                                   progress=lambda what: status.update(f"profiling: {what}…"))
        validate(frame, "honeybee.search_profile", "honeybee profile")
        model = fit_cost_model(frame, recall_floor=recall)
    out.write_text(json.dumps(model.to_dict(), indent=2))
    frame.to_csv(out.with_suffix(".csv"), index=False)
    Console().print(f"wrote {out} (fit: {model.fit}) and the measurements to {out.with_suffix('.csv')}")


@honeybee_app.command("query")
def query(
    workload: Path = typer.Option(..., help="workload folder"),
    strategy: str = typer.Option("honeybee", help="honeybee | rls | rls_prefilter | per_role | per_user"),
    k: int = typer.Option(10, help="results per query"),
    budget: float = typer.Option(1.4, help="storage budget (vector copies / N) for honeybee"),
    recall: float = typer.Option(0.95, help="recall@k target"),
    model: Optional[Path] = typer.Option(None, help="cost model JSON (from `honeybee profile` or a run); default: measure here"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document"),
) -> None:
    """Run the workload's queries with one strategy: each query's doc ids, QPS, storage and build time."""
    from optimizers.honeybee import STRATEGIES
    from tasks.honeybee.local import run_locally
    from tasks.honeybee.workload import load_workload

    if strategy not in STRATEGIES:
        fail(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    with user_errors():
        HoneyBeeParams.check_fields({"storage_budget": budget, "recall_target": recall, "k": k}, "command line")
        loaded = load_workload(workload)
        cost_model = _load_model(model, loaded, recall)
        with console.status(f"planning, building and querying {strategy}…"):
            local = run_locally(loaded, [strategy], cost_model, k=k, storage_budget=budget, recall_target=recall)[strategy]
    result = local.result
    queries = [{"query_id": q, "user": str(loaded.query_users[q]), "ids": [int(i) for i in ids if i >= 0]}
               for q, ids in enumerate(local.run.found)]
    figures = {"strategy": strategy, "method": result.method, "k": k, "qps": round(result.qps, 1),
               "latency_p50_ms": round(result.latency_p50_ms, 4), "latency_p99_ms": round(result.latency_p99_ms, 4),
               "recall": round(result.recall, 4), "recall_target": recall, "storage": round(result.storage, 4),
               "build_s": round(result.build_s, 3), "partitions": result.partitions, "state": loaded.state,
               "qps_note": "per core: 1 / mean latency of one query's partition searches and merge"}
    if as_json:
        sys.stdout.write(json.dumps({**figures, "queries": queries}) + "\n")
        return
    table = Table("query", "user", "doc ids (nearest first)")
    for row in queries[:20]:
        table.add_row(str(row["query_id"]), row["user"], " ".join(map(str, row["ids"])))
    Console().print(table)
    if len(queries) > 20:
        Console().print(f"… {len(queries) - 20} more queries (use --json for all)")
    Console().print(", ".join(f"{key}={value}" for key, value in figures.items() if key not in ("qps_note", "state")))
    if loaded.state:
        Console().print(f"answered from the updated permissions and documents in {loaded.state}")


@honeybee_app.command("update")
def update(
    workload: Path = typer.Option(..., help="workload folder (left unchanged)"),
    changes: Path = typer.Option(..., help="JSON-lines changes: grant, revoke, join, leave, add_doc, delete_doc"),
    state: Optional[Path] = typer.Option(None, help="where the live partitions are kept between updates "
                                                    "(default: <workload>.honeybee-state beside the workload, "
                                                    "which links to a state kept elsewhere)"),
    budget: float = typer.Option(1.4, help="storage budget for the first plan"),
    recall: float = typer.Option(0.95, help="recall@k target for the first plan"),
    model: Optional[Path] = typer.Option(None, help="cost model JSON for the first plan; default: measure here"),
    as_json: bool = typer.Option(False, "--json", help="print the update report as one JSON line"),
) -> None:
    """Apply changes to HoneyBee's partitions incrementally and compare the work with a full rebuild.

    The first update plans and builds the partitions for the workload and keeps them in the
    state folder; later updates start from that state, and every read of the workload
    (``query``, the flow, the deployment) answers from it. The workload folder is never written.
    """
    from tasks.honeybee.changes import read_changes
    from tasks.honeybee.update import update_workload

    with user_errors():
        HoneyBeeParams.check_fields({"storage_budget": budget, "recall_target": recall}, "command line")
        outcome = update_workload(workload, read_changes(changes), lambda loaded: _load_model(model, loaded, recall),
                                  state=state, storage_budget=budget, recall_target=recall, status=console.status)
    report, document = outcome.report, outcome.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(document, default=float) + "\n")
        return
    table = Table("", "incremental", "full rebuild")
    table.add_row("vectors indexed / removed", f"{report.vectors_added} / {report.vectors_removed}",
                  f"{report.full_rebuild_vectors} / 0")
    table.add_row("seconds", f"{report.seconds:.3f}", f"{report.full_rebuild_seconds:.3f}")
    table.add_row("storage (× N)", f"{report.storage:.3f}", f"{report.fresh_plan_storage:.3f}")
    table.add_row("predicted latency (ms)", f"{report.predicted_latency_ms:.4f}", f"{report.fresh_plan_predicted_latency_ms:.4f}")
    Console().print(table)
    Console().print(f"{report.changes} changes; {report.partitions_touched} partitions touched, "
                    f"{report.partitions_created} created, {report.classes_rerouted} user classes re-routed; "
                    f"{outcome.verified_queries} queries re-checked, {outcome.forbidden_results} forbidden results; "
                    f"state kept in {outcome.state} (every read of the workload answers from it)")
    for note in report.notes:
        Console().print(f"note: {note}")
