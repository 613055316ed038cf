"""Specification of the tiered Dask cluster and of routing work to a tier, device or pool.

Embedded: one Nanny worker per pool, named after the pool and advertising its resources;
plain Dask tasks and Prefect tasks submitted inside ``on(...)`` run on that worker.
External: ``TieredCluster(spec, scheduler=ADDR)`` joins workers started with
``dask worker ADDR --resources ...`` and names the pools whose resources nobody advertises.

Workers are started by fixtures only (Nanny spawns processes; nothing starts at import).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client, get_worker

from infra.cluster import (
    ClusterError, TieredCluster, log_event, on, on_worker, routing_resources, this_worker, this_worker_name,
)
from infra.spec import InfraSpec, parse_infra_spec

REPO = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).with_name("dask")

# Each pool in its own tier and of its own device, so every kind of routing has one answer.
EMBEDDED_SPEC = parse_infra_spec({
    "name": "test-tiers",
    "pools": [
        {"name": "hub-gw", "tier": "hub", "device": "cpu-small", "count": 2},
        {"name": "edge-orin", "tier": "edge", "device": "jetson-agx-orin", "count": 1},
        {"name": "cloud-t4", "tier": "cloud", "device": "t4", "count": 3},
    ],
})

# What the external workers below advertise (tier and device only, as a site would).
EXTERNAL_WORKER_RESOURCES = {
    "edge": "tier-edge=1,device-cpu-medium=1",
    "cloud": "tier-cloud=1,device-t4=1",
}
EXTERNAL_SPEC = parse_infra_spec({
    "name": "site",
    "pools": [
        {"name": "edge-cpu", "tier": "edge", "device": "cpu-medium", "count": 1},
        {"name": "cloud-t4", "tier": "cloud", "device": "t4", "count": 1},
    ],
})


def worker_name() -> str:
    return get_worker().name


def worker_address() -> str:
    return get_worker().address


def where_am_i() -> tuple[str, str]:
    return this_worker_name(), this_worker()


def log_here(topic: str) -> bool:
    return log_event(topic, {"from": this_worker_name()})


def echo_service(service, greeting: str) -> dict:
    service.publish(f"echo://{service.worker}/{greeting}")
    service.wait_until_stopped()
    return {"worker": service.worker, "greeting": greeting}


def slow_service(service, seconds: float) -> None:
    time.sleep(seconds)  # loading a model, say
    service.publish("slow://ready")
    service.wait_until_stopped()


def broken_service(service) -> None:
    raise RuntimeError("port 80 is taken")


# --- routing_resources -------------------------------------------------------------------


def test_routing_resources_ask_for_one_unit_of_each_named_resource():
    assert routing_resources(tier="edge") == {"tier-edge": 1}
    assert routing_resources(tier="cloud", device="t4", pool="cloud-t4") == {
        "tier-cloud": 1, "device-t4": 1, "pool-cloud-t4": 1,
    }


def test_routing_resources_without_a_target_is_an_error():
    with pytest.raises(ValueError, match="at least one of tier, device or pool"):
        routing_resources()
    with pytest.raises(ValueError):
        with on():
            pass


# --- embedded cluster --------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(prefect_api: str) -> TieredCluster:
    # Workers copy PREFECT_API_URL when they start, so the Prefect server must be up first.
    with TieredCluster(EMBEDDED_SPEC) as cluster:
        cluster.client.wait_for_workers(len(EMBEDDED_SPEC.pools), timeout=60)
        yield cluster


def test_embedded_cluster_starts_one_worker_per_pool_named_after_it(embedded):
    workers = embedded.client.scheduler_info(n_workers=-1)["workers"].values()

    assert embedded.embedded
    assert embedded.address.startswith("tcp://127.0.0.1:")
    assert sorted(w["name"] for w in workers) == sorted(p.name for p in EMBEDDED_SPEC.pools)
    assert all(w["host"] == "127.0.0.1" for w in workers)


def test_embedded_workers_advertise_tier_device_and_pool_resources_per_machine(embedded):
    workers = embedded.client.scheduler_info(n_workers=-1)["workers"].values()
    advertised = {w["name"]: w["resources"] for w in workers}

    for pool in EMBEDDED_SPEC.pools:
        assert advertised[pool.name] == {
            f"tier-{pool.tier}": pool.count,
            f"device-{pool.device}": pool.count,
            f"pool-{pool.name}": pool.count,
        }


def test_a_released_machine_leaves_the_cluster_and_comes_back_with_its_resources(embedded):
    before = embedded.machine_address("edge-orin")
    embedded.release_machine("edge-orin")
    names = {w["name"] for w in embedded.client.scheduler_info(n_workers=-1)["workers"].values()}
    assert "edge-orin" not in names and embedded.machine_address("edge-orin") is None
    with pytest.raises(ClusterError, match=r"no running machine named 'edge-orin'"):
        embedded.release_machine("edge-orin")
    address = embedded.start_machine("edge-orin")
    assert address != before  # a new worker process
    worker = embedded.client.scheduler_info(n_workers=-1)["workers"][address]
    assert worker["resources"]["tier-edge"] == 1 and worker["name"] == "edge-orin"
    assert embedded.start_machine("edge-orin") == address  # already running: nothing to do
    with pytest.raises(ClusterError, match=r"no machine named 'nope'"):
        embedded.start_machine("nope")


def test_every_machine_of_an_embedded_cluster_is_on_this_host_and_an_external_ones_on_its_address(embedded):
    """Worker processes on one host share its cores: what LMaaS's placement counts once."""
    assert {embedded.host_of(name) for name in ("edge-orin", "cloud-t4", "released-or-not")} == {socket.gethostname()}


def test_work_pinned_to_a_worker_by_name_runs_there_and_knows_where_it_runs(embedded):
    with on_worker("cloud-t4"):
        placed = embedded.client.gather([embedded.client.submit(where_am_i, pure=False) for _ in range(3)])
    assert placed == [("cloud-t4", embedded.machine_address("cloud-t4"))] * 3
    assert where_am_i() == ("local", "local")  # the caller here is no worker


def test_a_service_runs_on_its_worker_publishes_its_address_and_returns_when_stopped(embedded):
    service = embedded.start_service(echo_service, "hi", name="echo-test", worker="edge-orin")
    assert service.address(timeout_s=60) == "echo://edge-orin/hi"
    with on_worker("edge-orin"):  # the service gave its thread back: its one-thread worker still runs tasks
        assert embedded.client.submit(where_am_i, pure=False).result(timeout=60)[0] == "edge-orin"
    service.stop()
    assert service.result(timeout_s=60) == {"worker": "edge-orin", "greeting": "hi"}


def test_waiting_for_a_slow_service_to_be_ready_logs_no_errors(embedded, caplog):
    service = embedded.start_service(slow_service, 2.5, name="slow-test", worker="edge-orin")
    with caplog.at_level(logging.ERROR):
        assert service.address(timeout_s=60) == "slow://ready"
    service.stop()
    service.result(timeout_s=60)
    # each second of waiting once logged "Exception while handling op variable_get" with a traceback
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_service_that_fails_before_it_is_ready_says_why(embedded):
    service = embedded.start_service(broken_service, name="broken-test", worker="hub-gw")
    with pytest.raises(ClusterError, match="service broken-test ended before it was ready: port 80 is taken"):
        service.address(timeout_s=60)


def test_events_logged_on_a_worker_and_by_the_client_reach_the_scheduler(embedded):
    with on(tier="edge"):
        assert embedded.client.submit(log_here, "test-events", pure=False).result(timeout=60)
    assert log_event("test-events", {"from": "client"})
    assert sorted(message["from"] for message in embedded.events("test-events")) == ["client", "edge-orin"]


def test_a_workers_pid_is_its_own_process(embedded):
    pid = embedded.worker_pid(embedded.machine_address("hub-gw"))
    assert pid != os.getpid() and Path(f"/proc/{pid}").exists()
    assert sorted(embedded.workers().values()) == sorted(p.name for p in EMBEDDED_SPEC.pools)


def _worker_start() -> dict:
    import multiprocessing

    from prefect.settings import get_current_settings

    return {"start_method": multiprocessing.get_start_method(allow_none=True), "torch_preloaded": "torch" in sys.modules,
            "api_url": str(get_current_settings().api.url), "omp": os.environ.get("OMP_NUM_THREADS")}


def test_workers_fork_from_a_server_that_imported_torch_and_read_prefect_settings_from_their_own_env(embedded):
    seen = embedded.client.run(_worker_start)

    assert len(seen) == len(EMBEDDED_SPEC.pools)
    for worker in seen.values():
        assert worker["start_method"] == "forkserver"
        assert worker["torch_preloaded"]  # nothing here imports it: the fork server did
        assert worker["api_url"] == os.environ["PREFECT_API_URL"]
        assert worker["omp"] == "1"


PRELOAD_SCRIPT = """
import sys
from infra.cluster import TieredCluster, preload_on_workers
from infra.spec import parse_infra_spec

def seen():
    import sys
    return "xml.dom.minidom" in sys.modules

if __name__ == "__main__":
    preload_on_workers("xml.dom.minidom")  # a module nothing in a worker imports
    spec = parse_infra_spec({"name": "one", "pools": [{"name": "hub-gw", "tier": "hub", "device": "cpu-small"}]})
    with TieredCluster(spec) as cluster:
        print(list(cluster.client.run(seen).values()), "xml.dom.minidom" in sys.modules)
"""


def test_a_systems_modules_given_before_the_cluster_starts_are_imported_by_the_fork_server(tmp_path):
    """What a run's workers would import before their first task is already there when they fork."""
    script = tmp_path / "preload.py"
    script.write_text(PRELOAD_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONPATH": "."})
    assert done.stdout.strip().splitlines()[-1] == "[True] False", done.stderr[-2000:]


def test_an_unknown_worker_start_method_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("TIERFLOW_WORKER_START", "fork")

    with pytest.raises(ClusterError, match="TIERFLOW_WORKER_START='fork'.*forkserver, spawn"):
        TieredCluster(EMBEDDED_SPEC).__enter__()


@pytest.mark.parametrize(
    "target, pool",
    [
        ({"tier": "hub"}, "hub-gw"),
        ({"tier": "edge"}, "edge-orin"),
        ({"tier": "cloud"}, "cloud-t4"),
        ({"device": "cpu-small"}, "hub-gw"),
        ({"device": "t4"}, "cloud-t4"),
        ({"pool": "edge-orin"}, "edge-orin"),
        ({"pool": "cloud-t4"}, "cloud-t4"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value,
)
def test_dask_task_inside_on_runs_on_that_pools_worker(embedded, target, pool):
    with on(**target):
        # pure=False: every submit is a new task, so none is served from an earlier result.
        futures = [embedded.client.submit(worker_name, pure=False) for _ in range(4)]

    assert embedded.client.gather(futures) == [pool] * 4


def test_prefect_task_inside_on_runs_on_that_tiers_worker(embedded, prefect_api):
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    @task
    def where_am_i() -> str:
        return get_worker().name

    @flow
    def route_by_tier(tiers: list[str]) -> dict[str, str]:
        futures = {}
        for tier in tiers:
            with on(tier=tier):
                futures[tier] = where_am_i.submit()
        return {tier: future.result() for tier, future in futures.items()}

    runner = DaskTaskRunner(address=embedded.address)
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        placed = route_by_tier.with_options(task_runner=runner)(["edge", "cloud", "hub"])

    assert placed == {"edge": "edge-orin", "cloud": "cloud-t4", "hub": "hub-gw"}


# --- external scheduler ------------------------------------------------------------------


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))  # workers unpickle test functions by reference
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(DASK), *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=REPO, start_new_session=True,
        )


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM in reverse start order (workers before their scheduler, so none waits to
    reconnect), then SIGKILL whatever has not exited after 10 s."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _scheduler_address(scheduler_file: Path, scheduler: subprocess.Popen, log: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scheduler.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with code {scheduler.returncode}:\n{log.read_text()}")
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.1)
    raise RuntimeError(f"dask scheduler wrote no {scheduler_file} within {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def external_scheduler(tmp_path_factory) -> str:
    """A `dask scheduler` and two `dask worker`s on 127.0.0.1, one per tier; yields the address."""
    logs = tmp_path_factory.mktemp("external-dask")
    processes: list[subprocess.Popen] = []
    try:
        scheduler_file = logs / "scheduler.json"
        scheduler_log = logs / "scheduler.log"
        scheduler = _start(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(scheduler_file),
             "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
            scheduler_log,
        )
        processes.append(scheduler)
        address = _scheduler_address(scheduler_file, scheduler, scheduler_log)
        for tier, resources in EXTERNAL_WORKER_RESOURCES.items():
            processes.append(_start(
                ["worker", address, "--nthreads", "1", "--resources", resources, "--no-nanny",
                 "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
                logs / f"worker-{tier}.log",
            ))
        with Client(address, timeout="10s") as client:
            try:
                client.wait_for_workers(len(EXTERNAL_WORKER_RESOURCES), timeout=60)
            except TimeoutError:
                logs_text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.glob("*.log")))
                raise RuntimeError(f"external dask workers did not join:\n{logs_text}") from None
        yield address
    finally:
        _stop(processes)


def test_tiered_cluster_joins_external_workers_and_routes_by_tier(external_scheduler):
    with TieredCluster(EXTERNAL_SPEC, scheduler=external_scheduler) as cluster:
        workers = cluster.client.scheduler_info(n_workers=-1)["workers"]
        address_of_tier = {
            tier: next(addr for addr, w in workers.items() if w["resources"].get(f"tier-{tier}"))
            for tier in EXTERNAL_WORKER_RESOURCES
        }
        placed = {}
        for tier in EXTERNAL_WORKER_RESOURCES:
            with on(tier=tier):
                placed[tier] = cluster.client.gather(
                    [cluster.client.submit(worker_address, pure=False) for _ in range(3)]
                )

        assert not cluster.embedded and cluster.address == external_scheduler
        names = set(cluster.workers().values())
        assert {cluster.host_of(name) for name in names} == {"127.0.0.1"} and cluster.host_of("nope") is None
        assert address_of_tier["edge"] != address_of_tier["cloud"]
        assert placed == {tier: [address_of_tier[tier]] * 3 for tier in EXTERNAL_WORKER_RESOURCES}
        with on(device="t4"):
            assert cluster.client.submit(worker_address, pure=False).result() == address_of_tier["cloud"]


def test_tiered_cluster_names_pools_whose_resources_no_external_worker_advertises(external_scheduler):
    spec = InfraSpec.model_validate({
        "pools": [
            {"name": "edge-cpu", "tier": "edge", "device": "cpu-medium"},
            {"name": "gateways", "tier": "hub", "device": "cpu-small", "count": 4},
            {"name": "cloud-a100", "tier": "cloud", "device": "a100"},
        ],
    })

    with pytest.raises(ClusterError) as caught:
        with TieredCluster(spec, scheduler=external_scheduler, wait_for_workers_s=1.0):
            pass

    message = str(caught.value)
    assert external_scheduler in message
    assert "pool 'gateways' needs tier-hub, device-cpu-small" in message
    assert "pool 'cloud-a100' needs device-a100" in message
    assert "edge-cpu" not in message


def test_tiered_cluster_says_when_workers_advertise_too_few_machines(external_scheduler):
    spec = InfraSpec.model_validate({"pools": [{"name": "cloud-t4", "tier": "cloud", "device": "t4", "count": 3}]})
    with pytest.raises(ClusterError) as caught:
        with TieredCluster(spec, scheduler=external_scheduler, wait_for_workers_s=1.0):
            pass
    assert "pool 'cloud-t4' needs tier-cloud=3 (advertised 1), device-t4=3 (advertised 1)" in str(caught.value)


def test_tiered_cluster_waits_for_a_worker_that_joins_late(external_scheduler, tmp_path):
    """A worker restarting after a kill, or started beside the scheduler, joins within the wait: the run goes on."""
    spec = InfraSpec.model_validate({"pools": [{"name": "late-gpu", "tier": "cloud", "device": "l40s"}]})
    late = _start(["worker", external_scheduler, "--nthreads", "1", "--resources", "tier-cloud=1,device-l40s=1",
                   "--no-nanny", "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
                  tmp_path / "late-worker.log")  # joins a few seconds from now, after the check began
    try:
        with TieredCluster(spec, scheduler=external_scheduler, wait_for_workers_s=60.0) as cluster:
            workers = cluster.client.scheduler_info(n_workers=-1)["workers"].values()
            assert any(w["resources"].get("device-l40s") == 1 for w in workers)
    finally:
        _stop([late])
