"""Lazarus's Prefect tasks and the Dask launcher: one training node per tier-tagged worker.

``train_node`` runs :func:`tasks.lazarus.node.run_node` inside a Dask worker process, so
killing that process (SIGKILL, as a spot preemption does) kills the node. The embedded
cluster's Nanny then starts a fresh worker in its place, which the run may admit again
as a new node — a preempted machine coming back. The scheduler must not re-run a task
whose worker died (the flow's cluster is started with ``rerun_lost_tasks=False``): a
dead node's work is the survivors' to recover, not Dask's to retry.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from prefect.cache_policies import NO_CACHE

from infra.cluster import TieredCluster, on_worker, this_worker
from tasks.common.tasks import task
from tasks.lazarus.node import RunSettings, run_node


@task(cache_policy=NO_CACHE, retries=0, task_run_name="train as {node}")
def train_node(node: str, host: str, port: int, settings: RunSettings) -> dict:
    """Be training node ``node`` of the run whose control plane is at ``host:port``."""
    report = run_node(node, host, port, settings)
    return {**report, "worker": this_worker()}


class DaskLauncher:
    """Starts nodes as ``train_node`` tasks, one per idle worker of ``cluster``.

    Worker processes on this host are watched and killed by pid; a node's worker is idle
    again once its task ends or its process dies (the Nanny restarts it under a new address).
    """

    def __init__(self, cluster: TieredCluster, host: str):
        self.cluster, self.host = cluster, host
        self.futures: dict[str, object] = {}
        self.workers: dict[str, str] = {}  # node → worker address
        self.pids: dict[str, int] = {}
        self._reports: dict[str, dict] = {}
        self._dead: set[str] = set()  # addresses of workers this launcher killed
        self._lock = threading.Lock()

    def _idle_workers(self) -> list[str]:
        info = self.cluster.workers()
        busy = {self.workers[n] for n, f in self.futures.items() if not _done(f) and self.alive(n)}
        return sorted(a for a in info if a not in busy and a not in self._dead)

    def start(self, node: str, port: int, settings: RunSettings, wait_s: float = 60.0) -> None:
        """Run ``node`` on an idle worker; a worker killed a moment ago may still be listed, and the
        Nanny's replacement takes a few seconds to appear, so wait up to ``wait_s`` for one."""
        with self._lock:
            deadline = time.monotonic() + wait_s
            while True:
                idle = self._idle_workers()
                if idle:
                    worker = idle[0]
                    try:
                        pid = self.cluster.worker_pid(worker)
                        break
                    except Exception:  # noqa: BLE001 - the worker died since the scheduler listed it
                        self._dead.add(worker)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no idle Dask worker for node {node} within {wait_s:.0f} s "
                                       f"({len(self.workers)} nodes started so far, all workers busy or gone)")
                time.sleep(0.2)
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
        self._dead.add(self.workers[node])
        self._reports.pop(node, None)

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
