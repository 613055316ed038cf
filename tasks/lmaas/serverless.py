"""Serverless LMaaS on Dask: serving replicas that start on demand, scale out, and go away when idle.

A *replica* is the multi-tenant service (tasks/lmaas/service.py) running as a long-lived service
on one worker of the cluster (:func:`run_replica`, started by :meth:`infra.cluster.TieredCluster.start_service`):
it loads the base model, fetches its hot set of adapters from the artifact store, serves HTTP on
127.0.0.1 and publishes its address; it stops when asked and returns what it measured (its cold
start split into base-model load, adapter fetch and server start, the requests it served).

The :class:`Autoscaler` (in the caller's process) owns the replicas of each serving group — the
machines the placement (optimizers/lmaas.py) gave a set of adapters:

- **scale from zero**: a request for an adapter whose group runs no replica starts one and waits for
  it; that wait is the request's cold start and counts in its latency. On the embedded cluster a
  machine given back is started first (its worker process), and that is in the cold start too;
- **scale out**: when every replica of the group has ``max_in_flight`` requests and the group has
  a machine without one, another replica starts there (in the background: the request that noticed
  goes to the least-loaded running replica);
- **scale to zero**: a replica with nothing in flight for ``idle_s`` seconds is stopped, and its
  machine, left with no replica, is given back (its worker process ends). The machine-seconds
  used are counted: what a deployment pays for.

:func:`replay_service` sends a trace to the replicas over HTTP (OpenAI completions, streamed, with
each tenant's API key) at the trace's arrival times; latency counts from arrival, cold starts included.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx

from infra.cluster import ServiceContext, TieredCluster
from tasks.lmaas.strategies import Replay, Served
from tasks.lmaas.trace import TraceRequest

# a replica is full when its continuous batch is (the engine runs up to 64 sequences)
SERVICE_MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class ReplicaConfig:
    """What a replica serves and how (everything a worker needs to build it)."""

    db_url: str
    store_url: str
    price_per_hour: float
    model: str | None = None  # base model: None for the shipped SmolLM2-135M-Instruct
    weight_format: str = "int4"
    lora_slots: int = 16
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    max_host_adapters: int = 256
    kv_cache_mib: int = 256
    max_queue: int = 256
    preload: tuple[str, ...] = ()  # adapter models ("tenant/adapter") fetched into host memory at start
    log_steps: bool = False  # return the engine's step log (what each step computed, and its seconds)


def warm_up(engine, adapters: list[str], new_tokens: int = 4) -> None:
    """Decode a few tokens, with the base model and with each of ``adapters``, before the replica
    says it is ready: a process's first decode pays one-time costs (kernels' first calls, buffers)
    that would otherwise land on the first tenants' requests, in their time to first token."""
    from tasks.lm.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompt = list(range(1000, 1032))
    engine.run([engine.submit(engine.open(prompt, name), params, owns_sequence=True) for name in [None, *adapters]])


def run_replica(service: ServiceContext, config: ReplicaConfig) -> dict:
    """A service on a worker: serve ``config`` until stopped; returns the replica's record."""
    import uvicorn

    from infra.store import open_store
    from tasks.lm.engine import LMEngine
    from tasks.lmaas.registry import Registry
    from tasks.lmaas.service import create_service_app, engine_adapter_name

    name = service.name
    started = time.perf_counter()
    engine = LMEngine.load(config.model, weight_format=config.weight_format, kv_cache_mib=config.kv_cache_mib,
                           lora_slots=config.lora_slots, lora_rank=config.lora_rank,
                           lora_targets=tuple(config.lora_targets), max_host_adapters=config.max_host_adapters)
    base_load_s = time.perf_counter() - started
    registry = Registry(config.db_url, open_store(config.store_url), engine.config)
    fetched = time.perf_counter()
    wanted, loaded = set(config.preload), []
    for info in registry.adapters():
        if info.model in wanted:
            loaded.append(engine_adapter_name(info))
            engine.add_adapter(loaded[-1], registry.fetch_adapter(info))
    adapter_fetch_s = time.perf_counter() - fetched
    warming = time.perf_counter()
    warm_up(engine, loaded[:1])
    warm_up_s = time.perf_counter() - warming
    if config.log_steps:
        engine.step_log = []
    app = create_service_app(registry, engine, price_per_hour=config.price_per_hour, max_queue=config.max_queue)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    listening = time.perf_counter()
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"replica {name}: the HTTP server did not start")
        time.sleep(0.01)
    server_start_s = time.perf_counter() - listening
    url = f"http://127.0.0.1:{port}"
    service.publish(url)
    ready_s = time.perf_counter() - started
    service.wait_until_stopped()
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()
    return {"replica": name, "worker": service.worker, "url": url, "base_load_s": base_load_s,
            "adapter_fetch_s": adapter_fetch_s, "warm_up_s": warm_up_s, "adapters_preloaded": len(wanted),
            "server_start_s": server_start_s,
            "ready_s": ready_s, "served_for_s": time.perf_counter() - started - ready_s,
            "engine": {k: v for k, v in engine.stats.items()}, **({"steps": engine.step_log} if config.log_steps else {})}


@dataclass
class Replica:
    name: str
    group: str
    machine: str  # the worker's name (a machine of the spec)
    address: str | None = None  # the worker's address, once its machine is up
    service: object = None  # the infra.cluster.Service running run_replica
    url: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    requested_at: float = field(default_factory=time.perf_counter)
    cold_start_s: float | None = None


class ScalingError(RuntimeError):
    pass


class Autoscaler:
    """Replicas per serving group on ``cluster`` (an :class:`infra.cluster.TieredCluster`).

    ``groups``: group → the machines (worker names) that may run its replicas, one replica per
    machine, the planned one first; ``assignment``: adapter model → group (the placement);
    requests for ``base`` or an unplanned model go to ``default_group``. ``configs``: group → its
    :class:`ReplicaConfig` (with the group's adapters to preload).

    ``release_machines`` (default: when the cluster is embedded, whose machines are this process's):
    give a machine back when its last replica scales in and start it again for the next one (scale
    to zero is then of machines, not only of replicas; a cold start includes the machine's start).
    Without it, the machines stay up and only replicas come and go."""

    def __init__(self, cluster: TieredCluster, groups: dict[str, list[str]], assignment: dict[str, str],
                 configs: dict[str, ReplicaConfig], *, release_machines: bool | None = None,
                 default_group: str | None = None,
                 idle_s: float = 20.0, max_in_flight: int = 16, start_timeout_s: float = 300.0):
        if not groups or any(not members for members in groups.values()):
            raise ScalingError(f"every serving group needs at least one machine, got {groups}")
        missing = sorted(set(groups) - set(configs))
        if missing:
            raise ScalingError(f"no replica configuration for group(s) {missing}")
        self.cluster, self.groups, self.assignment, self.configs = cluster, groups, assignment, configs
        self.machines = cluster if (cluster.embedded if release_machines is None else release_machines) else None
        self.default_group = default_group or next(iter(groups))
        self.idle_s, self.max_in_flight, self.start_timeout_s = idle_s, max_in_flight, start_timeout_s
        self.replicas: dict[str, list[Replica]] = {g: [] for g in groups}
        self.pinned = False  # True: no scale to zero (an always-on deployment)
        self.events: list[dict] = []  # cold starts, scale-outs, scale-ins, machines up and given back, in order
        self.records: list[dict] = []  # what stopped replicas returned
        self._collecting = 0  # stopped replicas whose record is still on its way
        self._lock = threading.RLock()
        self._machine_locks = {m: threading.Lock() for members in groups.values() for m in members}
        self._released: set[str] = set()  # machines this autoscaler gave back
        self._up_since: dict[str, float] = {m: time.monotonic() for m in self._machine_locks}
        self._up_total_s = 0.0
        self._origin = time.perf_counter()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True)
        self._reaper.start()

    def group_of(self, model: str) -> str:
        return self.assignment.get(model, self.default_group)

    def _event(self, kind: str, replica: Replica | None = None, **extra) -> None:
        where = {"group": replica.group, "machine": replica.machine, "replica": replica.name} if replica else {}
        self.events.append({"at_s": round(time.perf_counter() - self._origin, 3), "event": kind, **where, **extra})

    def machine_seconds(self) -> float:
        """Seconds of machine time so far, summed over the groups' machines (up from the start
        unless given back): what a serving deployment pays for."""
        with self._lock:
            now = time.monotonic()
            return self._up_total_s + sum(now - since for since in self._up_since.values())

    def machines_up(self) -> int:
        """How many of the groups' machines are up (not given back)."""
        with self._lock:
            return len(self._up_since)

    def _on_machine(self, machine: str) -> bool:
        return any(r.machine == machine and r.error is None for rs in self.replicas.values() for r in rs)

    def _start(self, group: str, machine: str, reason: str) -> Replica:
        replica = Replica(f"replica-{group}-{uuid.uuid4().hex[:8]}", group, machine)
        self.replicas[group].append(replica)
        self._event("start", replica, reason=reason)
        threading.Thread(target=self._launch, args=(replica,), daemon=True).start()
        return replica

    def _launch(self, replica: Replica) -> None:
        """Bring the replica's machine up (if it was given back), run the replica there, wait for its URL."""
        from tasks.lmaas.serverless import run_replica  # the function Dask ships by reference

        try:
            with self._machine_locks[replica.machine]:
                replica.address = self._bring_up(replica)
                replica.service = self.cluster.start_service(run_replica, self.configs[replica.group],
                                                             name=replica.name, worker=replica.address)
            replica.url = replica.service.address(timeout_s=self.start_timeout_s)
            replica.cold_start_s = time.perf_counter() - replica.requested_at
            replica.last_used = time.monotonic()  # idle time counts from when it can serve
            self._event("ready", replica, cold_start_s=round(replica.cold_start_s, 3))
        except Exception as exc:  # noqa: BLE001 - reported to every request waiting on it
            replica.error = f"replica {replica.name} on {replica.machine} did not become ready: {exc}"
        finally:
            replica.ready.set()

    def _bring_up(self, replica: Replica) -> str:
        if self.machines is None:
            address = self.cluster.machine_address(replica.machine)
            if address is None:
                raise ScalingError(f"no worker named {replica.machine!r} is running")
            return address
        if replica.machine not in self._released:
            return self.machines.start_machine(replica.machine)  # running: just its address
        started = time.perf_counter()
        address = self.machines.start_machine(replica.machine)
        with self._lock:
            self._released.discard(replica.machine)
            self._up_since[replica.machine] = time.monotonic()
        self._event("machine up", replica, machine_start_s=round(time.perf_counter() - started, 3))
        return address

    def _release_if_idle(self, machine: str) -> None:
        """Give ``machine`` back if no replica runs or starts on it (a scale-in's last step)."""
        if self.machines is None or machine in self._released:
            return
        with self._machine_locks[machine]:
            with self._lock:
                if self._on_machine(machine):
                    return
            self.machines.release_machine(machine)
            with self._lock:
                self._released.add(machine)
                self._up_total_s += time.monotonic() - self._up_since.pop(machine)
        self._event("machine released", machine=machine)

    def release_idle_machines(self) -> None:
        """Give back every machine of the groups that runs no replica (a serverless deployment's
        starting state: nothing up until a request needs it)."""
        for machine in self._machine_locks:
            self._release_if_idle(machine)

    def acquire(self, model: str) -> tuple[Replica, float]:
        """A ready replica for ``model`` (starting one if its group has none) and the seconds this
        call waited for a cold start (0.0 when the replica was ready). Call :meth:`release` when
        the request is over."""
        group = self.group_of(model)
        waited_from = time.perf_counter()
        with self._lock:
            if self._closed.is_set():
                raise ScalingError("the autoscaler is closed")
            live = [r for r in self.replicas[group] if r.error is None]
            ready = [r for r in live if r.ready.is_set()]
            busy = {r.machine for rs in self.replicas.values() for r in rs if r.error is None}
            spare = [m for m in self.groups[group] if m not in busy]
            if not live:
                replica = self._start(group, (spare or self.groups[group])[0], "scale from zero")
            else:
                if spare and not [r for r in live if not r.ready.is_set()] and \
                        all(r.in_flight >= self.max_in_flight for r in ready):
                    self._start(group, spare[0], "scale out")
                pool = ready or live
                replica = min(pool, key=lambda r: (r.in_flight, r.name))
            replica.in_flight += 1
            replica.last_used = time.monotonic()
            was_ready = replica.ready.is_set()
        if not replica.ready.wait(self.start_timeout_s) or replica.error:
            self.release(replica)
            raise ScalingError(replica.error or f"replica {replica.name} took over {self.start_timeout_s:.0f} s to start")
        return replica, 0.0 if was_ready else time.perf_counter() - waited_from

    def warm(self, group: str) -> Replica:
        """Make sure ``group`` runs a replica, waiting for it (an always-on deployment's start;
        set :attr:`pinned` to keep it from scaling to zero)."""
        with self._lock:
            live = [r for r in self.replicas[group] if r.error is None]
            replica = live[0] if live else self._start(group, self.groups[group][0], "warm start")
        if not replica.ready.wait(self.start_timeout_s) or replica.error:
            raise ScalingError(replica.error or f"replica {replica.name} took over {self.start_timeout_s:.0f} s to start")
        return replica

    def wait_for_zero(self, timeout_s: float) -> bool:
        """Wait until every replica has scaled to zero (and, with ``machines``, every machine is
        given back); False if some still run after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                machines_down = self.machines is None or self._released >= set(self._machine_locks)
                if not any(self.replicas.values()) and not self._collecting and machines_down:
                    return True
            time.sleep(0.2)
        return False

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1
            replica.last_used = time.monotonic()

    def _stop(self, replica: Replica, reason: str) -> None:
        replica.service.stop()
        self._event("stop", replica, reason=reason)

    def _reap_loop(self) -> None:
        while not self._closed.wait(min(1.0, self.idle_s / 4)):
            self.reap()

    def reap(self) -> None:
        """Stop replicas idle for ``idle_s`` (scale to zero) and collect the stopped ones' records;
        a machine left without replicas is given back once its replica has ended."""
        now = time.monotonic()
        with self._lock:
            if self.pinned:
                return
            for group, replicas in self.replicas.items():
                for replica in list(replicas):
                    if replica.ready.is_set() and replica.in_flight == 0 and now - replica.last_used >= self.idle_s:
                        replicas.remove(replica)
                        if replica.error is None:
                            self._stop(replica, f"idle {self.idle_s:g} s")
                        self._collect(replica, release_machine=True)

    def _collect(self, replica: Replica, release_machine: bool = False) -> None:
        with self._lock:
            self._collecting += 1

        def gather():
            try:
                if replica.service is None:
                    raise ScalingError(replica.error or "the replica never started")
                record = replica.service.result(timeout_s=60)
                self.records.append({**record, "cold_start_s": replica.cold_start_s, "group": replica.group})
            except Exception as exc:  # noqa: BLE001 - kept in the report
                self.records.append({"replica": replica.name, "group": replica.group, "error": repr(exc)})
            try:
                if release_machine and not self._closed.is_set():
                    self._release_if_idle(replica.machine)
            finally:
                with self._lock:
                    self._collecting -= 1
        threading.Thread(target=gather, daemon=True).start()

    def running(self) -> dict[str, int]:
        with self._lock:
            return {g: sum(r.ready.is_set() and r.error is None for r in rs) for g, rs in self.replicas.items()}

    def close(self, timeout_s: float = 60.0) -> list[dict]:
        """Stop every replica and start again every machine this autoscaler gave back (the cluster
        as it found it); returns every replica's record."""
        self._closed.set()
        self._reaper.join(timeout=5)
        with self._lock:
            remaining = [r for rs in self.replicas.values() for r in rs]
            for replicas in self.replicas.values():
                replicas.clear()
        for replica in remaining:
            replica.ready.wait(self.start_timeout_s)
            if replica.error is None:
                self._stop(replica, "shutdown")
            self._collect(replica)
        deadline = time.monotonic() + timeout_s
        while self._collecting and time.monotonic() < deadline:
            time.sleep(0.05)
        for machine in sorted(self._released):
            with self._machine_locks[machine]:
                self.machines.start_machine(machine)
                with self._lock:
                    self._released.discard(machine)
                    self._up_since[machine] = time.monotonic()
        return list(self.records)


# --- the trace, over HTTP ------------------------------------------------------------------

async def _send(http: httpx.AsyncClient, scaler: Autoscaler, request: TraceRequest, key: str, arrived: float,
                origin: float) -> Served:
    replica, cold_start_s = await asyncio.to_thread(scaler.acquire, request.model)
    try:
        body = {"model": request.model, "prompt": list(request.prompt), "max_tokens": request.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        first = None
        async with http.stream("POST", f"{replica.url}/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                raise ScalingError(f"{request.model}: HTTP {response.status_code} from {replica.name}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = first or time.perf_counter()
        finished = time.perf_counter()
    finally:
        scaler.release(replica)
    first = first or finished
    return Served(request.model, request.tenant, arrived - origin, first - arrived, finished - arrived,
                  len(request.prompt), request.max_tokens, cold_start_s)


async def _replay(scaler: Autoscaler, trace: list[TraceRequest], keys: dict[str, str], time_scale: float) -> Replay:
    origin = time.perf_counter()
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        async def one(request: TraceRequest) -> Served:
            due = origin + request.at_s * time_scale
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            return await _send(http, scaler, request, keys[request.tenant], due, origin)
        served = await asyncio.gather(*(one(r) for r in sorted(trace, key=lambda r: r.at_s)))
    return Replay("multi_lora_serverless", list(served), time.perf_counter() - origin)


def machine_seconds_with_lull(scaler: Autoscaler, replay: Replay, lull_s: float) -> float:
    """The machine-seconds of ``replay`` and of a lull of ``lull_s`` seconds without traffic right
    after it: what a deployment pays for its traffic and the quiet that follows.

    Pinned (always on), nothing changes without traffic: every machine up stays up the whole lull,
    so it costs (machines up) × ``lull_s``, counted without waiting it out. Serverless, the lull is
    watched until every machine has been given back (idle replicas stop, then their machines go) or
    the lull is over, whichever comes first; from then on nothing runs, and the rest costs nothing."""
    if lull_s < 0:
        raise ValueError(f"lull_s must be ≥ 0, got {lull_s}")
    if scaler.pinned:
        return replay.stats["machine_seconds"] + scaler.machines_up() * lull_s
    before, deadline = scaler.machine_seconds(), time.monotonic() + lull_s
    while scaler.machines_up() and time.monotonic() < deadline:
        time.sleep(0.1)
    return replay.stats["machine_seconds"] + scaler.machine_seconds() - before


def replay_service(scaler: Autoscaler, trace: list[TraceRequest], keys: dict[str, str], *,
                   time_scale: float = 1.0, strategy: str = "lmaas_serverless") -> Replay:
    """Send ``trace`` to the replicas at its arrival times (each tenant with its key from ``keys``);
    latency and time to first token count from arrival, so a cold start's wait is in them."""
    unknown = sorted({r.tenant for r in trace} - set(keys))
    if unknown:
        raise ValueError(f"no API key for tenant(s) {unknown}")
    first_event, machine_s = len(scaler.events), scaler.machine_seconds()
    replay = asyncio.run(_replay(scaler, trace, keys, time_scale))
    replay.strategy = strategy
    events = scaler.events[first_event:]
    cold = [e for e in events if e["event"] == "ready"]
    replay.stats = {"cold_starts": len(cold), "cold_start_s_max": max((e["cold_start_s"] for e in cold), default=0.0),
                    "scale_outs": sum(e.get("reason") == "scale out" for e in events if e["event"] == "start"),
                    "scale_ins": sum(e["event"] == "stop" for e in events),
                    "machines_up": sum(e["event"] == "machine up" for e in events),
                    "machines_released": sum(e["event"] == "machine released" for e in events),
                    "machine_seconds": scaler.machine_seconds() - machine_s}
    return replay
