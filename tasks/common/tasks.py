"""The Prefect task every system's work runs in: :func:`task` is ``prefect.task`` and the task also
measures its own busy time.

Each call logs when its body started and ended to the cluster's event log (on the scheduler, so it
outlasts a worker that is killed or released), tagged with its flow run, and while it runs it says
so every :data:`HEARTBEAT_S` seconds: a task whose worker is killed (a Lazarus node) still counts
up to its last heartbeat. The run adds those intervals up (:func:`busy_seconds`): the share of the
run's wall time that no task was doing its own work is the platform's overhead (starting the
cluster, Prefect's orchestration, shipping data, the flow's own bookkeeping).
"""

from __future__ import annotations

import contextvars
import functools
import threading
import time
import uuid

from prefect import task as prefect_task

from infra.cluster import log_event

BUSY_TOPIC = "tierflow-busy"
HEARTBEAT_S = 2.0


def task(fn=None, /, **options):
    """``prefect.task`` (same options), and the task logs its own busy interval."""

    def decorate(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            interval = {"id": uuid.uuid4().hex, "flow_run": current_flow_run(), "task": fn.__name__,
                        "start": time.time()}
            done = threading.Event()
            # the heartbeat thread needs this thread's context: it names the Dask worker running the task
            beat = threading.Thread(target=contextvars.copy_context().run, args=(_heartbeat, interval, done),
                                    daemon=True)
            beat.start()
            try:
                return fn(*args, **kwargs)
            finally:
                done.set()
                log_event(BUSY_TOPIC, {**interval, "end": time.time()})

        return prefect_task(**options)(timed)

    return decorate(fn) if fn is not None else decorate


def _heartbeat(interval: dict, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        log_event(BUSY_TOPIC, {**interval, "end": time.time()})


def busy_intervals(events: list[dict], flow_runs: list[str]) -> list[tuple[float, float]]:
    """Each task call of ``flow_runs`` as (start, end): its end, or its last heartbeat."""
    last: dict[str, tuple[float, float]] = {}
    for event in events:
        if event.get("flow_run") in flow_runs:
            start, end = last.get(event["id"], (event["start"], event["end"]))
            last[event["id"]] = (start, max(end, event["end"]))
    return list(last.values())


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
