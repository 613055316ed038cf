"""What every ``tierflow`` command shares: the stderr console, the one-line error and exit code 2,
and the Prefect server a run talks to.

Nothing here imports Prefect: it reads PREFECT_API_URL once, at import, and the server's URL is
only known once :func:`ensure_server` has run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on one line and exit with code 2 (bad input, refused request)."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


@contextmanager
def user_errors():
    """Bad input, an infeasible plan or an unusable cluster: a one-line error and exit 2, no traceback."""
    from data_contracts import ContractError
    from infra.errors import InputError
    from optimizers.solve import InfeasibleError, SolverError

    refused = (InputError, ContractError, InfeasibleError, SolverError, OSError)
    try:
        yield
    except refused as exc:
        fail(str(exc))
    except RuntimeError as exc:  # infra.cluster.ClusterError, without importing Dask to name it
        if type(exc).__name__ != "ClusterError":
            raise
        fail(str(exc))


def ensure_server() -> str:
    """The Prefect API a run talks to: the configured one if it answers, else tierflow's own
    server (started if needed). Prefect's settings follow it even if Prefect was imported before."""
    from infra import prefect_server

    configured = os.environ.get("PREFECT_API_URL")
    with console.status("starting the Prefect server (first time: ~20 s)…"):
        try:
            url = prefect_server.ensure_api()
        except RuntimeError as exc:
            fail(str(exc))
    if not configured:
        console.print(f"Prefect API: {url}  (UI: {url.removesuffix('/api')})")
    return url
