"""The ``tierflow`` command line, built from the system registry (flows/registry.py).

``tierflow list``, ``run``, ``demo`` and ``contracts check`` iterate over the registered systems, and
each system's sub-commands come from its entry (``tierflow <system> …``). Nothing imported here
imports Prefect, torch or cvxpy: a command imports what it runs (see flows/console.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.console import console, ensure_server, fail, user_errors
from flows.lm_cli import lm_app
from flows.registry import PLATFORM_CONTRACTS, SYSTEMS, system as lookup, systems
from flows.system import System

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

app = typer.Typer(help="tierflow: ML-systems designs as Prefect flows on tier-tagged Dask workers.", no_args_is_help=True)
server_app = typer.Typer(help="The local Prefect server tierflow runs against.", no_args_is_help=True)
contracts_app = typer.Typer(help="Data contracts (Great Expectations).", no_args_is_help=True)
cluster_app = typer.Typer(help="The tiered Dask cluster.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(contracts_app, name="contracts")
app.add_typer(cluster_app, name="cluster")
for _system in systems().values():
    app.add_typer(_system.load_cli(), name=_system.name, help=_system.description)
app.add_typer(lm_app, name="lm")


# ----------------------------------------------------------------------------- run


def find_system(name: str) -> System:
    try:
        return lookup(name)
    except ValueError as exc:
        fail(str(exc))


def checked_params(system: System, scale: str, config: Optional[Path], scheduler: Optional[str]):
    """The run's parameters, checked (the config's fields, the files they name, the scale, the
    scheduler) before a server or a cluster starts and before anything is written."""
    if scale not in system.scales:
        fail(f"--scale: {scale!r} is not one of {', '.join(system.scales)} (the sizes of a {system.name} run)")
    with user_errors():
        params = (system.params.from_config(config, scale) if config is not None
                  else system.params.parse({}, f"{system.name} defaults", scale))
    if scheduler is not None:
        from infra.cluster import TieredCluster

        with user_errors(), TieredCluster(params.infra_spec, scheduler=scheduler):
            pass  # reachable, and its workers advertise what the spec needs
    return params


def run_system(system: System, params, *, scale: str, scheduler: Optional[str], results_dir: str,
               store: Optional[str], api_url: str) -> dict:
    """Run one system's flow against the Prefect API at ``api_url``; returns its summary."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.cluster import quiet_logs

    quiet_logs()
    flow = system.load_flow()
    with user_errors(), temporary_settings({PREFECT_API_URL: api_url}):  # even if Prefect was imported earlier
        return flow(**params.flow_kwargs(), scale=scale, scheduler=scheduler, results_dir=results_dir, store=store)


@app.command("list")
def list_systems(as_json: bool = typer.Option(False, "--json", help="one JSON array, one object per system")) -> None:
    """The systems tierflow runs."""
    described = [s.describe() for s in systems().values()]
    if as_json:
        sys.stdout.write(json.dumps(described) + "\n")
        return
    table = Table("system", "what it does", "strategies (system first)")
    for entry in described:
        table.add_row(entry["name"], entry["description"], ", ".join(entry["strategies"]))
    Console().print(table)


@app.command()
def run(
    system: str = typer.Argument(..., help="a system from `tierflow list`"),
    scale: str = typer.Option("small", help="small | medium | large"),
    config: Optional[Path] = typer.Option(None, help="YAML of the system's run parameters (`tierflow list` names them)"),
    scheduler: Optional[str] = typer.Option(None, help="address of an existing Dask scheduler (tcp://host:port)"),
    results_dir: str = typer.Option("results", help="where results/<system>/<run-id>/ is written"),
    store: Optional[str] = typer.Option(None, help="also publish the run's folder to an artifact store: a folder or "
                                                   "s3://bucket/prefix"),
    as_json: bool = typer.Option(False, "--json", help="print the run's summary as one JSON line, last"),
) -> None:
    """Run a system end to end: profile → optimize → deploy → evaluate."""
    from flows.table import print_summaries

    chosen = find_system(system)
    params = checked_params(chosen, scale, config, scheduler)
    url = ensure_server()
    summary = run_system(chosen, params, scale=scale, scheduler=scheduler, results_dir=results_dir, store=store,
                         api_url=url)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        print_summaries([summary])


@app.command()
def demo(
    only: Optional[str] = typer.Option(None, help="run only these systems: NAME[,NAME]"),
    scale: str = typer.Option("small", help="small | medium | large"),
    results_dir: str = typer.Option("results", help="where results/<system>/<run-id>/ is written"),
) -> None:
    """Run the systems one after another on their default inputs and print the side-by-side summary."""
    from flows.table import print_summaries
    from infra.cluster import preload_on_workers

    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(SYSTEMS)
    chosen = [find_system(name) for name in names]
    params = {s.name: checked_params(s, scale, None, None) for s in chosen}
    url = ensure_server()
    preload_on_workers(*(s.flow_module for s in chosen))  # the first cluster's fork server imports them all once
    out = Console()
    summaries, failed, started = [], [], time.perf_counter()
    for i, s in enumerate(chosen, 1):
        out.print(f"[bold]▶ {s.name}[/bold] ({i}/{len(chosen)}): {s.regime} — budget {s.demo_budget_s:.0f} s")
        began = time.perf_counter()
        try:
            summaries.append(run_system(s, params[s.name], scale=scale, scheduler=None, results_dir=results_dir,
                                        store=None, api_url=url))
        except (typer.Exit, Exception) as exc:  # noqa: BLE001 - one system failing leaves the others to run
            failed.append(s.name)
            out.print(f"[red]✗ {s.name}[/red] failed after {time.perf_counter() - began:.0f} s"
                      + ("" if isinstance(exc, typer.Exit) else f": {type(exc).__name__}: {exc}"))
            continue
        wall = time.perf_counter() - began
        verdict = "[green]within[/green]" if wall <= s.demo_budget_s else "[red]over[/red]"
        out.print(f"[bold]✓ {s.name}[/bold] {wall:.0f} s, {verdict} its {s.demo_budget_s:.0f} s budget")
    if summaries:
        print_summaries(summaries, out)
    out.print(f"total {time.perf_counter() - started:.0f} s for {len(chosen)} systems"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    out.print(f"Browse the runs in the Prefect UI: {url.removesuffix('/api')}/runs "
              "(the server keeps running; stop it with `tierflow server stop`)")
    if failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- server


@server_app.command("start")
def server_start(port: int = typer.Option(4200, help="port on 127.0.0.1")) -> None:
    """Start the local Prefect server (UI included) in the background."""
    from infra import prefect_server

    with console.status("starting the Prefect server…"):
        info = prefect_server.start(port=port)
    Console().print(f"Prefect server up: UI {info.ui_url}  API {info.api_url}  (pid {info.pid})")
    Console().print(f"Use it from other shells with: export PREFECT_API_URL={info.api_url}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the Prefect server tierflow started."""
    from infra import prefect_server

    Console().print("stopped" if prefect_server.stop() else "no tierflow Prefect server is running")


@server_app.command("status")
def server_status() -> None:
    """Whether the Prefect server is up, and where."""
    from infra import prefect_server

    info = prefect_server.running()
    if info is None:
        Console().print("not running")
        raise typer.Exit(1)
    Console().print(f"running: UI {info.ui_url}  API {info.api_url}  (pid {info.pid})")


# ----------------------------------------------------------------------------- contracts


def contract_owners() -> dict[str, str]:
    """Data product → the system that declares it (or ``platform``)."""
    owners = {product: "platform" for product in PLATFORM_CONTRACTS}
    for s in systems().values():
        owners.update({product: s.name for product in s.contracts})
    return owners


@contracts_app.command("check")
def contracts_check(root: Path = typer.Option(Path(__file__).resolve().parents[1], help="project root")) -> None:
    """Validate every shipped dataset against its contract, system by system."""
    from data_contracts.shipped import check_shipped

    owners = contract_owners()
    results = sorted(check_shipped(root), key=lambda r: (list(owners.values()).index(owners[r[1]])
                                                         if r[1] in owners else len(owners), r[0]))
    table = Table("system", "dataset", "contract", "result")
    failed = 0
    for path, product, failures in results:
        if product not in owners:
            failures = [*failures, "no registered system declares this contract"]
        result = "[green]ok[/green]" if not failures else "[red]" + "; ".join(failures) + "[/red]"
        table.add_row(owners.get(product, "?"), str(path), product, result)
        failed += bool(failures)
    Console().print(table)
    if failed:
        fail(f"{failed} of {len(results)} datasets break their contract")
    Console().print(f"{len(results)} datasets meet their contracts")


# ----------------------------------------------------------------------------- cluster


@cluster_app.command("up")
def cluster_up(infra: Path = typer.Option(..., help="infrastructure spec (YAML)")) -> None:
    """Start the tiered cluster for a spec, print the scheduler address, serve until Ctrl-C."""
    from infra.cluster import TieredCluster, quiet_logs
    from infra.spec import load_infra_spec

    with user_errors():
        spec = load_infra_spec(infra)
    quiet_logs()
    with TieredCluster(spec) as cluster:
        Console().print(f"scheduler: {cluster.address}")
        for address, resources in cluster.worker_pools().items():
            Console().print(f"  worker {address}: {resources}")
        Console().print(f"use it with: tierflow run <system> --scheduler {cluster.address}")
        sys.stdout.flush()
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


def main() -> None:  # pragma: no cover - console entry point
    app()
