"""Lazarus's Prefect tasks and the Dask launcher: one training node per tier-tagged worker.

``train_node`` runs :func:`tasks.lazarus.node.run_node` inside a Dask worker process, so
killing that process (SIGKILL, as a spot preemption does) kills the node. The embedded
cluster's Nanny then starts a fresh worker in its place, which the run may admit again
as a new node — a preempted machine coming back. The scheduler must not re-run a task
whose worker died (``distributed.scheduler.allowed-failures: 0``, set by the flow): a
dead node's work is the survivors' to recover, not Dask's to retry.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from distributed import Client
from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.cluster import on_worker, this_worker
from tasks.lazarus.node import RunSettings, run_node


@task(cache_policy=NO_CACHE, retries=0, task_run_name="train as {node}")
def train_node(node: str, host: str, port: int, settings: RunSettings) -> dict:
    """Be training node ``node`` of the run whose control plane is at ``host:port``."""
    report = run_node(node, host, port, settings)
    return {**report, "worker": this_worker()}


class DaskLauncher:
    """Starts nodes as ``train_node`` tasks, one per idle worker of ``client``'s cluster.

    Worker processes on this host are watched and killed by pid; a node's worker is idle
    again once its task ends or its process dies (the Nanny restarts it under a new address).
    """

    def __init__(self, client: Client, host: str):
        self.client, self.host = client, host
        self.futures: dict[str, object] = {}
        self.workers: dict[str, str] = {}  # node → worker address
        self.pids: dict[str, int] = {}
        self._reports: dict[str, dict] = {}
        self._lock = threading.Lock()

    def _idle_worker(self) -> str:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        busy = {self.workers[n] for n, f in self.futures.items() if not _done(f) and self.alive(n)}
        idle = sorted(a for a in info if a not in busy)
        if not idle:
            raise RuntimeError(f"no idle Dask worker for a new node ({len(info)} workers, all training)")
        return idle[0]

    def start(self, node: str, port: int, settings: RunSettings) -> None:
        with self._lock:
            worker = self._idle_worker()
            pid = self.client.run(os.getpid, workers=[worker])[worker]
            with on_worker(worker):
                self.futures[node] = train_node.submit(node, self.host, port, settings)
            self.workers[node], self.pids[node] = worker, pid

    def alive(self, node: str) -> bool:
        pid = self.pids.get(node)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not _done(self.futures[node])

    def kill(self, node: str, pid: int) -> None:
        if node not in self.pids:
            raise RuntimeError(f"cannot kill {node}: no worker of this launcher runs it")
        os.kill(self.pids[node], signal.SIGKILL)

    def reports(self, timeout_s: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        for node, future in self.futures.items():
            if node in self._reports:
                continue
            while not _done(future) and time.monotonic() < deadline and self.alive(node):
                time.sleep(0.05)
            if _done(future):
                try:
                    self._reports[node] = future.result()
                except BaseException as exc:  # noqa: BLE001 - a killed worker's task fails; say how
                    self._reports[node] = {"node": node, "outcome": f"killed: {type(exc).__name__}"}
            elif not self.alive(node):
                self._reports[node] = {"node": node, "outcome": "killed"}
        return dict(self._reports)

    def close(self) -> None:
        """Nodes exit on the run's stop record; a node still running is killed."""
        self.reports(15)
        for node in self.futures:
            if self.alive(node):
                os.kill(self.pids[node], signal.SIGKILL)


def _done(future) -> bool:
    """Whether a node's task ended (its Dask future, or the Prefect state of another runner's future)."""
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped.done() if wrapped is not None else future.state.is_final()
