"""The tiered Dask cluster, and the one place that routes work to a tier or device.

Embedded: a ``distributed.SpecCluster`` on 127.0.0.1 with one ``Nanny`` worker per pool
of the infrastructure spec, each advertising the Dask resources ``tier-<tier>``,
``device-<device>`` and ``pool-<name>`` (one unit per machine the pool stands for).
External: ``TieredCluster(spec, scheduler="tcp://host:port")`` connects to a running
cluster and checks that its workers advertise the tiers and devices the spec needs.

Machines: an embedded cluster can release one machine's worker (its process ends, as a cloud
machine is given back) and start it again later (:meth:`TieredCluster.release_machine`,
:meth:`TieredCluster.start_machine`); :func:`embedded_at` finds the cluster this process runs at
a scheduler address. An external cluster's machines belong to its own manager.

Routing: ``with on(tier="edge"): future = task.submit(...)`` — prefect-dask and plain
Dask both honour the annotation, so the work runs on a worker with that resource.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import ContextManager, Iterator

import dask
from distributed import Client, Nanny, Scheduler, SpecCluster

from infra.spec import InfraSpec, Pool

MAX_THREADS_PER_WORKER = 4

# Environment every embedded worker gets: one BLAS/torch thread per task thread, so a
# pool's machines do not oversubscribe this host's cores; Prefect settings pass through.
_FORWARDED_ENV = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED")


class ClusterError(RuntimeError):
    """The cluster cannot run the spec (e.g. no worker advertises a needed resource)."""


_EMBEDDED: dict[str, "TieredCluster"] = {}  # scheduler address -> the embedded cluster this process runs there


def embedded_at(address: str) -> "TieredCluster | None":
    """The embedded cluster this process started at ``address``, or None (an external cluster, or
    another process's): what can release and start its machines."""
    return _EMBEDDED.get(address)


def routing_resources(tier: str | None = None, device: str | None = None, pool: str | None = None) -> dict[str, int]:
    """The Dask resources a task asks for to land on that tier / device / pool."""
    wanted = {"tier": tier, "device": device, "pool": pool}
    resources = {f"{kind}-{name}": 1 for kind, name in wanted.items() if name}
    if not resources:
        raise ValueError("on() needs at least one of tier, device or pool")
    return resources


@contextmanager
def on(tier: str | None = None, device: str | None = None, pool: str | None = None) -> Iterator[None]:
    """Route everything submitted inside this block to a worker of that tier/device/pool."""
    with dask.annotate(resources=routing_resources(tier, device, pool)):
        yield


def on_pool(pool: Pool) -> ContextManager[None]:
    """Route to the worker of one pool, by its tier and device (unique per pool in a valid spec,
    and what external clusters advertise)."""
    return on(tier=pool.tier, device=pool.device)


@contextmanager
def on_worker(address: str) -> Iterator[None]:
    """Pin everything submitted inside this block to one worker (by its address).

    For stateful work: a task that reads what an earlier task left in a worker's memory
    (e.g. built index partitions) must run on that same worker, not on any worker of its pool.
    """
    with dask.annotate(workers=[address], allow_other_workers=False):
        yield


def this_worker() -> str:
    """The address of the Dask worker running the caller ("local" outside a worker)."""
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:
        return "local"


def worker_env() -> dict[str, str]:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "DASK_LOGGING__DISTRIBUTED": os.environ.get("DASK_LOGGING__DISTRIBUTED", "warning")}
    env.update({key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ})
    return env


def embedded_cluster(spec: InfraSpec, *, host: str = "127.0.0.1", dashboard: bool = False) -> SpecCluster:
    """Start one Nanny worker per pool (per machine where the pool asks for it), each
    advertising its resources."""
    workers = {}
    for pool in spec.pools:
        options = {"host": host, "env": worker_env(), "memory_limit": 0}
        if pool.worker_per_machine:
            for machine in pool.machine_names():
                workers[machine] = {"cls": Nanny, "options": {**options, "name": machine, "nthreads": 1,
                                                             "resources": {k: 1 for k in pool.resources()}}}
        else:
            workers[pool.name] = {"cls": Nanny, "options": {**options, "name": pool.name,
                                                           "nthreads": min(pool.count, MAX_THREADS_PER_WORKER),
                                                           "resources": pool.resources()}}
    scheduler = {
        "cls": Scheduler,
        # The dashboard always listens somewhere; keep it on a free port of this host only.
        "options": {"host": host, "port": 0, "dashboard_address": f"{host}:0", "dashboard": dashboard},
    }
    return SpecCluster(workers=workers, scheduler=scheduler, name=spec.name, silence_logs=40)


def missing_resources(spec: InfraSpec, client: Client) -> dict[str, list[str]]:
    """For each pool, the tier/device resources the cluster's workers do not advertise enough of.

    A pool of ``count`` machines needs ``count`` units of its tier and device resources
    (added up over pools that share them); an entry is the bare name when nobody advertises
    it, ``name=needed (advertised n)`` when too little is.
    """
    advertised: dict[str, float] = {}
    for worker in client.scheduler_info(n_workers=-1)["workers"].values():
        for name, amount in (worker.get("resources") or {}).items():
            advertised[name] = advertised.get(name, 0) + amount
    needed = spec.required_resources()
    missing = {}
    for pool in spec.pools:
        short = []
        for name in (f"tier-{pool.tier}", f"device-{pool.device}"):
            have = advertised.get(name, 0)
            if have <= 0:
                short.append(name)
            elif have < needed[name]:
                short.append(f"{name}={needed[name]:g} (advertised {have:g})")
        if short:
            missing[pool.name] = short
    return missing


class TieredCluster:
    """A Dask cluster fit for a spec: embedded by default, or an existing one by address.

    Use as a context manager; ``address`` is what a Prefect ``DaskTaskRunner`` connects to.
    """

    def __init__(self, spec: InfraSpec, scheduler: str | None = None):
        self.spec = spec
        self.scheduler = scheduler
        self.cluster: SpecCluster | None = None
        self.client: Client | None = None
        self.released: dict[str, dict] = {}  # machine -> its worker spec, while released
        self._machines = threading.Lock()

    @property
    def address(self) -> str:
        return self.scheduler or self.cluster.scheduler_address

    @property
    def embedded(self) -> bool:
        return self.scheduler is None

    def __enter__(self) -> "TieredCluster":
        if self.scheduler is None:
            self.cluster = embedded_cluster(self.spec)
            try:
                self.client = Client(self.cluster)
            except Exception:
                self.cluster.close()
                raise
            _EMBEDDED[self.cluster.scheduler_address] = self
        else:
            try:
                self.client = Client(self.scheduler, timeout="10s")
            except OSError as exc:
                raise ClusterError(f"cannot reach the Dask scheduler at {self.scheduler}: {exc}") from None
            try:
                missing = missing_resources(self.spec, self.client)
            except Exception:
                self.client.close()
                raise
            if missing:
                self.client.close()
                lines = [f"  - pool {pool!r} needs {', '.join(names)}" for pool, names in missing.items()]
                raise ClusterError(
                    f"the Dask cluster at {self.scheduler} has no worker advertising these resources:\n"
                    + "\n".join(lines)
                    + "\nstart workers with e.g. `dask worker ADDR --resources \"tier-edge=1,device-t4=1\"`"
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            _EMBEDDED.pop(self.cluster.scheduler_address, None)
            self.cluster.close()

    # --- machines ------------------------------------------------------------------------------
    def machine_address(self, name: str) -> str | None:
        """The address of the worker named ``name``, or None if no such worker runs."""
        for address, worker in self.client.scheduler_info(n_workers=-1)["workers"].items():
            if worker.get("name") == name:
                return address
        return None

    def release_machine(self, name: str) -> None:
        """Give one machine back: its worker retires and its process ends. Its spec is kept, so
        :meth:`start_machine` can start it again. Nothing should be running on it."""
        if not self.embedded:
            raise ClusterError(f"cannot release machine {name!r}: the cluster at {self.scheduler} is not this "
                               f"process's; its own manager starts and stops its machines")
        with self._machines:
            if name not in self.cluster.worker_spec:
                raise ClusterError(f"no running machine named {name!r}; running: {sorted(self.cluster.worker_spec)}")
            self.released[name] = self.cluster.worker_spec.pop(name)
            self.cluster.sync(self.cluster._correct_state)  # SpecCluster: align the workers with the spec

    def start_machine(self, name: str, timeout_s: float = 120.0) -> str:
        """Start a released machine's worker again (a no-op for a running one); returns its
        address once it has joined the scheduler."""
        with self._machines:
            if name in self.released:
                self.cluster.worker_spec[name] = self.released.pop(name)
                self.cluster.sync(self.cluster._correct_state)
            elif self.embedded and name not in self.cluster.worker_spec:
                raise ClusterError(f"no machine named {name!r}; machines: "
                                   f"{sorted([*self.cluster.worker_spec, *self.released])}")
        deadline = time.monotonic() + timeout_s
        while (address := self.machine_address(name)) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"machine {name!r} did not join the scheduler within {timeout_s:.0f} s")
            time.sleep(0.05)
        return address

    def worker_pools(self) -> dict[str, str]:
        """Worker address → the resources it advertises, for reports."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {addr: ",".join(sorted(w.get("resources") or {})) for addr, w in info.items()}
