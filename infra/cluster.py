"""The tiered Dask cluster, and the one place that routes work to a tier or device.

Embedded: a ``distributed.SpecCluster`` on 127.0.0.1 with one ``Nanny`` worker per pool
of the infrastructure spec, each advertising the Dask resources ``tier-<tier>``,
``device-<device>`` and ``pool-<name>`` (one unit per machine the pool stands for).
External: ``TieredCluster(spec, scheduler="tcp://host:port")`` connects to a running
cluster and checks that its workers advertise the tiers and devices the spec needs.

Machines: a pool with ``worker_per_machine`` gets one worker process per machine (named after
the machine), so a machine can fail alone. An embedded cluster can release one machine's worker
(its process ends, as a cloud machine is given back) and start it again later
(:meth:`TieredCluster.release_machine`, :meth:`TieredCluster.start_machine`). An external
cluster's machines belong to its own manager.

Routing: ``with on(tier="edge"): future = task.submit(...)`` — prefect-dask and plain
Dask both honour the annotation, so the work runs on a worker with that resource;
``with on_worker(name_or_address)`` pins work to one worker.

Worker processes start by forking a server process that has already imported what every
worker imports (Dask, Prefect, torch, numpy, pandas, and the flow modules of the systems about to
run, :func:`preload_on_workers`): a spawned worker would import them again, a few seconds of both
cores each, before its first task (``TIERFLOW_WORKER_START=spawn`` restores
spawning, which ``benchmarks/platform.py`` compares against).

Services: :meth:`TieredCluster.start_service` runs a long-lived function (a server) on one
worker; the function publishes its address through the :class:`ServiceContext` it is given and
serves until :meth:`Service.stop`.

Nothing outside ``infra/`` imports ``distributed``: what the flows and tasks need of Dask is here.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import ContextManager, Iterator
from urllib.parse import urlparse

import dask
from distributed import Client, Event, Nanny, Scheduler, SpecCluster, Variable, get_worker, secede

from infra.spec import InfraSpec, Pool

MAX_THREADS_PER_WORKER = 4

# Environment every embedded worker gets: one BLAS/torch thread per task thread, so a
# pool's machines do not oversubscribe this host's cores; Prefect settings pass through.
_FORWARDED_ENV = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED")


class ClusterError(RuntimeError):
    """The cluster cannot run the spec (e.g. no worker advertises a needed resource)."""


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
def on_worker(worker: str) -> Iterator[None]:
    """Pin everything submitted inside this block to one worker (by its address or its name,
    e.g. a machine's name).

    For stateful work: a task that reads what an earlier task left in a worker's memory
    (e.g. built index partitions) must run on that same worker, not on any worker of its pool.
    """
    with dask.annotate(workers=[worker], allow_other_workers=False):
        yield


def this_worker() -> str:
    """The address of the Dask worker running the caller ("local" outside a worker)."""
    try:
        return str(get_worker().address)
    except ValueError:
        return "local"


def this_worker_name() -> str:
    """The name of the Dask worker running the caller (its pool or machine; "local" outside a worker)."""
    try:
        return str(get_worker().name)
    except ValueError:
        return "local"


def log_event(topic: str, message: dict) -> bool:
    """Append ``message`` to the cluster's event log under ``topic``, from a task on a worker or
    from a process holding a client; False when the caller is in neither (nothing is logged).

    The log lives on the scheduler, so it outlasts a worker that is killed or released."""
    try:
        get_worker().log_event(topic, message)
        return True
    except ValueError:
        pass
    try:
        from distributed import default_client

        default_client().log_event(topic, message)
        return True
    except ValueError:
        return False


def quiet_logs() -> None:
    """Only Dask's errors on the console (its workers inherit the setting)."""
    import logging

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker", "distributed.core"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --- long-lived services on a worker -------------------------------------------------------------


class ServiceContext:
    """What a service function gets, on its worker: where to publish its address, and when to stop."""

    def __init__(self, name: str):
        self.name = name

    @property
    def worker(self) -> str:
        """The name of the worker (machine) the service runs on."""
        return this_worker_name()

    def publish(self, address: str) -> None:
        """Tell the caller where the service listens (e.g. ``http://127.0.0.1:PORT``)."""
        Variable(f"{self.name}-address").set(address)
        Event(f"{self.name}-ready").set()

    def wait_until_stopped(self) -> None:
        """Block until the caller stops the service."""
        Event(f"{self.name}-stop").wait()


def _serve(fn, name: str, args: tuple, kwargs: dict):
    secede()  # long-lived: give the worker's thread back to its pool, so other tasks still run there
    return fn(ServiceContext(name), *args, **kwargs)


class Service:
    """A service running on a worker, seen from the process that started it."""

    def __init__(self, client: Client, name: str, future):
        self.client, self.name, self.future = client, name, future

    def address(self, timeout_s: float) -> str:
        """The address the service published once it was ready (waits up to ``timeout_s``);
        the service's own error if it failed before."""
        deadline = time.monotonic() + timeout_s
        ready = Event(f"{self.name}-ready", client=self.client)
        # waited for on an Event, whose wait times out quietly; a Variable's get that times out is
        # logged by the scheduler as an error with its traceback, once a poll
        while not ready.wait(timeout=min(1.0, max(deadline - time.monotonic(), 0.01))):
            if self.future.done():
                raise ClusterError(f"service {self.name} ended before it was ready: "
                                   f"{self.future.exception() or 'it returned'}")
            if time.monotonic() > deadline:
                raise ClusterError(f"service {self.name} published no address within {timeout_s:.0f} s")
        return Variable(f"{self.name}-address", client=self.client).get(timeout=max(deadline - time.monotonic(), 1.0))

    def stop(self) -> None:
        """Ask the service to stop (it returns from :meth:`ServiceContext.wait_until_stopped`)."""
        Event(f"{self.name}-stop", client=self.client).set()

    def result(self, timeout_s: float):
        """What the service function returned once it stopped."""
        return self.future.result(timeout=timeout_s)


def worker_env() -> dict[str, str]:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "DASK_LOGGING__DISTRIBUTED": os.environ.get("DASK_LOGGING__DISTRIBUTED", "warning")}
    env.update({key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ})
    return env


# What every worker imports before its first task; the fork server imports it once (distributed
# brings dask, cloudpickle, msgpack, tornado and toolz; a module that fails to import is skipped).
WORKER_PRELOAD = ("distributed", "numpy", "pandas", "torch", "prefect", "prefect.task_engine", "prefect_dask")
WORKER_START_METHODS = ("forkserver", "spawn")
_system_preload: list[str] = []  # what the systems about to run add (preload_on_workers)


def preload_on_workers(*modules: str) -> None:
    """Have the fork server also import ``modules`` (a system's flow module, which brings its tasks):
    every worker it forks then starts with them instead of importing them before its first task, a
    second or more each on these cores. Only a fork server that has not started yet takes them; after
    that, workers import what they need as before."""
    _system_preload.extend(m for m in modules if m not in _system_preload)


def worker_start_method() -> str:
    """How embedded workers start: ``forkserver`` (default) or ``spawn`` (``TIERFLOW_WORKER_START``)."""
    method = os.environ.get("TIERFLOW_WORKER_START", "forkserver")
    if method not in WORKER_START_METHODS:
        raise ClusterError(f"TIERFLOW_WORKER_START={method!r}: expected one of {', '.join(WORKER_START_METHODS)}")
    return method


def _prepare_worker_start() -> None:
    """Point Dask's Nanny at the start method; for ``forkserver``, start the fork server with the
    workers' environment (torch reads its thread settings from it) and the preloaded modules."""
    method = worker_start_method()
    dask.config.set({"distributed.worker.multiprocessing-method": method})
    if method == "forkserver":
        from distributed.utils import get_mp_context

        context = get_mp_context()  # Dask sets its own preload once; ours replaces it before the server starts
        context.set_forkserver_preload([*WORKER_PRELOAD, *_system_preload])
        saved = dict(os.environ)
        os.environ.update(worker_env())
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)


def embedded_cluster(spec: InfraSpec, *, host: str = "127.0.0.1", dashboard: bool = False,
                     rerun_lost_tasks: bool = True) -> SpecCluster:
    """Start one Nanny worker per pool (per machine where the pool asks for it), each
    advertising its resources. ``rerun_lost_tasks=False``: a task whose worker died is not run
    again elsewhere (it fails)."""
    _prepare_worker_start()
    workers = {}
    for pool in spec.pools:
        # a forked worker's Prefect read its settings in the fork server: the preload re-reads them
        # from the environment this worker was given
        options = {"host": host, "env": worker_env(), "memory_limit": 0, "preload": ["infra.worker_setup"]}
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
        "options": {"host": host, "port": 0, "dashboard_address": f"{host}:0", "dashboard": dashboard,
                    **({} if rerun_lost_tasks else {"allowed_failures": 0})},
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

    Use as a context manager; ``address`` is what a Prefect ``DaskTaskRunner`` connects to, and
    ``client`` a Dask client of this cluster. ``rerun_lost_tasks=False``: a task on a worker that
    dies is not re-run on another (for work whose recovery is the system's own, e.g. Lazarus's;
    an external cluster's scheduler keeps its own setting).
    """

    def __init__(self, spec: InfraSpec, scheduler: str | None = None, *, rerun_lost_tasks: bool = True,
                 wait_for_workers_s: float = 20.0):
        self.spec = spec
        self.scheduler = scheduler
        self.rerun_lost_tasks = rerun_lost_tasks
        # an existing cluster may be short of workers for a moment (a Nanny restarting a killed worker,
        # workers started beside the scheduler): how long to wait for them before refusing it
        self.wait_for_workers_s = wait_for_workers_s
        self.cluster: SpecCluster | None = None
        self.client: Client | None = None
        self.released: dict[str, dict] = {}  # machine -> its worker spec, while released
        self._machines = threading.Lock()

    @property
    def address(self) -> str:
        return self.scheduler or self.cluster.scheduler_address

    def __getstate__(self) -> dict:
        # Prefect sends a flow's parameters along with every task it ships to a worker: there the
        # cluster travels as a description (spec and address), without this process's connection.
        return {"spec": self.spec, "scheduler": self.address if (self.scheduler or self.cluster) else None,
                "rerun_lost_tasks": self.rerun_lost_tasks, "cluster": None, "client": None, "released": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _machines=threading.Lock())

    @property
    def embedded(self) -> bool:
        return self.scheduler is None

    def __enter__(self) -> "TieredCluster":
        if self.scheduler is None:
            self.cluster = embedded_cluster(self.spec, rerun_lost_tasks=self.rerun_lost_tasks)
            try:
                self.client = Client(self.cluster)
            except Exception:
                self.cluster.close()
                raise
        else:
            try:
                self.client = Client(self.scheduler, timeout="10s")
            except (OSError, ValueError) as exc:  # nobody listening, or not an address at all
                raise ClusterError(f"--scheduler {self.scheduler}: no Dask scheduler answers there ({exc})") from None
            try:
                deadline = time.monotonic() + self.wait_for_workers_s
                while (missing := missing_resources(self.spec, self.client)) and time.monotonic() < deadline:
                    time.sleep(0.5)
            except Exception:
                self.client.close()
                raise
            if missing:
                self.client.close()
                lines = [f"  - pool {pool!r} needs {', '.join(names)}" for pool, names in missing.items()]
                raise ClusterError(
                    f"the Dask cluster at {self.scheduler} has no worker advertising these resources "
                    f"(waited {self.wait_for_workers_s:g} s):\n"
                    + "\n".join(lines)
                    + "\nstart workers with e.g. `dask worker ADDR --resources \"tier-edge=1,device-t4=1\"`"
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    # --- workers and machines ---------------------------------------------------------------------
    def workers(self) -> dict[str, str]:
        """Address → name of every worker now in the cluster."""
        return {address: str(w.get("name")) for address, w in self.client.scheduler_info(n_workers=-1)["workers"].items()}

    def machine_address(self, name: str) -> str | None:
        """The address of the worker named ``name``, or None if no such worker runs."""
        return next((address for address, worker in self.workers().items() if worker == name), None)

    def host_of(self, machine: str) -> str | None:
        """The host ``machine``'s worker runs on: this host for every machine of an embedded cluster
        (its worker processes share this host's cores, released or not), the host part of the running
        worker's address on an external cluster (None where no worker of that name runs)."""
        if self.embedded:
            return socket.gethostname()
        address = self.machine_address(machine)
        return urlparse(address).hostname if address else None

    def worker_pid(self, address: str) -> int:
        """The process id of the worker at ``address`` (on its own host); raises if it is gone."""
        return int(self.client.run(os.getpid, workers=[address])[address])

    def events(self, topic: str) -> list:
        """The messages :func:`log_event` logged under ``topic`` on this cluster, oldest first."""
        return [message for _, message in self.client.get_events(topic)]

    def start_service(self, fn, *args, name: str, worker: str, **kwargs) -> Service:
        """Run ``fn(ServiceContext, *args, **kwargs)`` on ``worker`` (address or name) as a long-lived
        task; ``name`` must be unique among this cluster's services. Ship ``fn`` by reference (a
        module-level function)."""
        Event(f"{name}-stop", client=self.client).clear()
        Event(f"{name}-ready", client=self.client).clear()
        future = self.client.submit(_serve, fn, name, args, kwargs, workers=[worker], allow_other_workers=False,
                                    pure=False, key=name)
        return Service(self.client, name, future)

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
