"""One run of one system: its context, the cluster it runs on, and the one writer of its results.

A system's flow is two Prefect flows: the outer one (what a deployment or ``tierflow run`` calls)
checks the parameters and calls :func:`run_flow`, which opens the tiered cluster for the run's
infrastructure spec and runs the inner *stages* flow (:func:`stages_flow`) on it, with the
:class:`RunContext` as its one parameter. The stages read profile → optimize → deploy → evaluate and
write everything through the context, so every system's results mean the same:

    results/<system>/<run-id>/   plan.json, evaluation.json (its "summary" is the run's Summary),
                                 report.md and its PNG plots, the tables as CSV
    Prefect artifacts            <system>-report (markdown, plots embedded), one table per table
    --store URL                  the run's folder published to the artifact store (files at its top
                                 level; a system's own stores — checkpoints, adapters — are parameters
                                 of their own)
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
from prefect import flow

from data_contracts import validate
from infra.cluster import TieredCluster, preload_on_workers
from infra.spec import InfraSpec
from infra.store import open_store
from tasks.common.params import RunParams
from tasks.common.summary import Summary
from tasks.common.tasks import BUSY_TOPIC, busy_intervals, busy_seconds, current_flow_run

IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class RunContext:
    """Everything a run's stages share: its id and folder, its checked parameters, the cluster,
    the summary being filled, and the writer of its results.

    On a Dask worker (Prefect ships the stages flow's parameters with each task) a context
    carries only its system, run id and folder."""

    def __init__(self, system: str, params: RunParams, *, scale: str, regime: str, results_dir: str = "results",
                 run_id: str | None = None, store: str | None = None, scheduler: str | None = None,
                 out: Path | None = None, worker_modules: tuple[str, ...] = ()):
        self.system, self.params, self.scale = system, params, scale
        self.worker_modules = worker_modules  # what the cluster's workers import (preloaded where they fork)
        self.run_id = run_id or new_run_id()
        self.out = Path(out) if out is not None else Path(results_dir) / system / self.run_id
        self.store, self.scheduler = store, scheduler
        self.summary = Summary(system, self.run_id, str(self.out), regime)
        self.cluster: TieredCluster | None = None
        self.flow_runs: list[str] = []  # the stages flow's run: whose tasks' busy time counts
        self.started = time.perf_counter()

    def __getstate__(self) -> dict:
        return {"system": self.system, "run_id": self.run_id, "out": self.out}

    def __repr__(self) -> str:
        return f"RunContext({self.system}/{self.run_id})"

    # --- the writer -------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / name

    def write_json(self, name: str, document: object) -> Path:
        path = self.path(name)
        path.write_text(json.dumps(document, indent=2, default=str))
        return path

    def write_plan(self, plan: object) -> Path:
        """The decision the system's optimizer made (``plan.json``)."""
        return self.write_json("plan.json", plan)

    def write_table(self, name: str, frame: pd.DataFrame, description: str | None = None) -> Path:
        """``<name>.csv``, and a Prefect table artifact ``<system>-<name>`` when ``description`` is given."""
        path = self.path(f"{name}.csv")
        frame.to_csv(path, index=False)
        if description is not None:
            from prefect.artifacts import create_table_artifact

            records = json.loads(frame.round(4).to_json(orient="records"))  # NaN → null, numpy → JSON
            create_table_artifact(records, key=artifact_key(self.system, name), description=description)
        return path

    def save_plot(self, figure, name: str, dpi: int = 110) -> Path:
        """Save a matplotlib figure as ``<name>.png`` (and close it)."""
        import matplotlib.pyplot as plt

        path = self.path(f"{name}.png")
        figure.savefig(path, dpi=dpi)
        plt.close(figure)
        return path

    def write_report(self, markdown: str, description: str | None = None) -> Path:
        """``report.md`` (plots linked beside it), and the Prefect artifact ``<system>-report`` with
        every plot embedded, so that the UI shows it."""
        from prefect.artifacts import create_markdown_artifact

        path = self.path("report.md")
        path.write_text(markdown)
        create_markdown_artifact(embed_images(markdown, self.out), key=artifact_key(self.system, "report"),
                                 description=description or f"{self.system} report, run {self.run_id}")
        return path

    def write_evaluation(self, document: dict) -> Path:
        """``evaluation.json``: the system's evaluation with the run's summary under ``summary``."""
        return self.write_json("evaluation.json", {"summary": self.summary.to_dict(), **document})

    def publish(self) -> str:
        """Copy the run's files (its folder's top level) into the artifact store ``--store``,
        content-hashed; returns the store's URL of the run."""
        store = open_store(self.store)
        prefix = f"{self.system}/{self.run_id}"
        for path in sorted(self.out.iterdir()):
            if path.is_file():
                store.put_file(f"{prefix}/{path.name}", path)
        return store.url(prefix)


def artifact_key(system: str, name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{system}-{name}".lower()).strip("-")


def embed_images(markdown: str, folder: Path) -> str:
    """The markdown with every ``![alt](plot.png)`` of ``folder`` as a data URI: the Prefect UI
    cannot load a file beside the report, and its markdown renderer keeps ``data:image/png``."""

    def inline(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return IMAGE_LINK.sub(inline, markdown)


def stages_flow(name: str):
    """A system's stages as a Prefect flow taking the :class:`RunContext` and returning its Summary."""

    def decorate(fn):
        @functools.wraps(fn)
        def stages(run: RunContext) -> Summary:
            run.flow_runs.append(current_flow_run())
            return fn(run)

        return flow(name=name, log_prints=True)(stages)

    return decorate


def run_flow(run: RunContext, stages, infra: InfraSpec, *, rerun_lost_tasks: bool = True) -> dict:
    """Run ``stages`` on the tiered cluster for ``infra`` (embedded, or ``run.scheduler``'s); then
    the run's wall time, its tasks' busy time, evaluation.json's summary and ``--store``.
    Returns the summary as a dict (what ``tierflow run --json`` prints)."""
    from prefect_dask import DaskTaskRunner

    # the spec's contract is checked while the cluster starts: its first check loads Great Expectations
    # (seconds), the cluster's start is mostly waiting for worker processes; a failed check stops both
    preload_on_workers(*run.worker_modules)
    with ExitStack() as running:
        checked = running.enter_context(ThreadPoolExecutor(1, thread_name_prefix="check-infra")).submit(
            validate, infra.pools_frame(), "infra.pools", f"infrastructure spec {infra.name!r}")
        cluster = running.enter_context(TieredCluster(infra, scheduler=run.scheduler, rerun_lost_tasks=rerun_lost_tasks))
        checked.result()
        run.cluster = cluster
        try:
            summary = stages.with_options(task_runner=DaskTaskRunner(address=cluster.address))(run)
            busy = busy_intervals(cluster.events(BUSY_TOPIC), run.flow_runs)
        finally:
            run.cluster = None
    summary.timed(time.perf_counter() - run.started, busy_seconds(busy))
    _update_evaluation(run, summary)
    if run.store:
        summary.store = run.publish()
        _update_evaluation(run, summary)  # the local copy also says where the run was published
    return summary.to_dict()


def _update_evaluation(run: RunContext, summary: Summary) -> None:
    evaluation = run.out / "evaluation.json"
    if evaluation.is_file():
        run.write_json("evaluation.json", {**json.loads(evaluation.read_text()), "summary": summary.to_dict()})
