"""The Prefect task every system's work runs in: :func:`task` is ``prefect.task`` and the task also
measures its own busy time.

Each call logs when its body started and ended to the cluster's event log (on the scheduler, so it
outlasts a worker that is killed or released), tagged with its flow run. The run adds those
intervals up (:func:`busy_seconds`): the share of the run's wall time that no task was doing its
own work is the platform's overhead (starting the cluster, Prefect's orchestration, shipping data).
"""

from __future__ import annotations

import functools
import time

from prefect import task as prefect_task

from infra.cluster import log_event

BUSY_TOPIC = "tierflow-busy"


def task(fn=None, /, **options):
    """``prefect.task`` (same options), and the task logs its own busy interval."""

    def decorate(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            started = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                record_busy(fn.__name__, started, time.time())

        return prefect_task(**options)(timed)

    return decorate(fn) if fn is not None else decorate


def record_busy(name: str, start: float, end: float) -> None:
    """Log that ``name`` did its own work from ``start`` to ``end`` (wall-clock seconds)."""
    log_event(BUSY_TOPIC, {"flow_run": current_flow_run(), "task": name, "start": start, "end": end})


def current_flow_run() -> str | None:
    """The id of the Prefect flow run the caller belongs to (None outside one)."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_run = TaskRunContext.get()
    if task_run is not None:
        return str(task_run.task_run.flow_run_id)
    flow_run = FlowRunContext.get()
    return str(flow_run.flow_run.id) if flow_run is not None and flow_run.flow_run else None


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall-clock time during which at least one task was doing its own work."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total
