"""HoneyBee's Prefect tasks: they run on the tier workers and keep partitions in worker memory.

Each worker process holds one :class:`PartitionServer` per workload folder (loaded the
first time a task needs it), so the partitions a build task makes are there for the
search tasks that follow on the same worker.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from prefect.cache_policies import NO_CACHE

from infra.cluster import this_worker
from tasks.common.tasks import task
from tasks.honeybee.profile import GRIDS, measure_search
from tasks.honeybee.rbac import Rbac
from tasks.honeybee.serve import PartitionServer, PartitionSpec, SearchJob
from tasks.honeybee.workload import STATE_META, current_state, load_workload

_SERVERS: dict[tuple[str, int, int | None], PartitionServer] = {}
_LOCK = threading.Lock()


def server_for(workload_dir: str) -> PartitionServer:
    """This process's server for a workload folder, re-read when the folder's vectors change or an
    update writes its state (so a worker never serves permissions an update has replaced)."""
    folder = Path(workload_dir).resolve()
    state = current_state(folder)
    key = (str(folder), os.stat(folder / "vectors.npy").st_mtime_ns,
           os.stat(state / STATE_META).st_mtime_ns if state else None)
    with _LOCK:
        if key not in _SERVERS:
            for old in [k for k in _SERVERS if k[0] == key[0]]:
                del _SERVERS[old]
            workload = load_workload(folder)
            _SERVERS[key] = PartitionServer(workload.vectors, workload.queries, Rbac.of(workload))
        return _SERVERS[key]


@task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="profile search on {pool}")
def profile_search(workload_dir: str, grid: str, pool: str, seed: int = 0) -> dict:
    """Measure filtered search on this worker (see :mod:`tasks.honeybee.profile`)."""
    server = server_for(workload_dir)
    frame = measure_search(server.vectors, server.queries, GRIDS[grid], seed=seed)
    return {"rows": frame.to_dict("records"), "worker": this_worker()}


@task(cache_policy=NO_CACHE, task_run_name="build {strategy} partitions on {pool}")
def build_partitions(workload_dir: str, strategy: str, specs: list[PartitionSpec], pool: str) -> dict:
    """Build this pool's share of a strategy's partitions in the worker's memory."""
    built = server_for(workload_dir).build(strategy, specs)
    return {"partitions": built, "worker": this_worker()}


@task(cache_policy=NO_CACHE, task_run_name="search {strategies} on {pool}")
def search_partitions(workload_dir: str, strategies: list[str], jobs: dict[str, list[SearchJob]], k: int, pool: str,
                      passes: int = 1) -> dict[str, dict]:
    """Search jobs against this worker's partitions of each of ``strategies``, one strategy after
    another in that order (each timed over ``passes`` passes)."""
    server = server_for(workload_dir)
    out = {}
    for strategy in strategies:
        D, I, seconds = server.search(strategy, jobs[strategy], k, passes=passes)
        out[strategy] = {"D": D, "I": I, "seconds": seconds}
    return out


@task(cache_policy=NO_CACHE, task_run_name="drop {strategy} partitions on {pool}")
def drop_partitions(workload_dir: str, strategy: str, pool: str) -> None:
    """Free a strategy's partitions on this worker once it has been measured."""
    server_for(workload_dir).drop(strategy)
