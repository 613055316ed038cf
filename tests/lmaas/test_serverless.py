"""Serverless LMaaS on a real Dask cluster: replicas start on demand on the planned machines, a
request waits out the cold start (and it shows in its latency), an idle replica goes away and its
machine's worker process with it, and a replica serves the registry's tenants over HTTP with their keys."""

from __future__ import annotations

import time

import pytest

from infra.cluster import ClusterError, TieredCluster
from infra.spec import InfraSpec
from infra.store import LocalStore
from tasks.lm.lora import random_adapter, save_adapter
from tasks.lm.weights import load_config
from tasks.lmaas.registry import Registry
from tasks.lmaas.profile import profile_machine
from tasks.lmaas.serverless import (Autoscaler, ReplicaConfig, ScalingError, machine_seconds_with_lull,
                                     replay_service)
from tasks.lmaas.strategies import Replay
from tasks.lmaas.trace import TraceRequest

TARGETS = ("q_proj", "v_proj")
SPEC = InfraSpec.model_validate({"name": "serverless-test", "pools": [
    {"name": "serve", "tier": "edge", "device": "cpu-small", "count": 2, "worker_per_machine": True}]})


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serverless")
    config = load_config(None)
    db = f"sqlite:///{tmp / 'lmaas.db'}"
    registry = Registry(db, LocalStore(tmp / "store"), config)
    keys = {}
    for tenant in ("acme", "globex"):
        _, keys[tenant] = registry.add_tenant(tenant)
        folder = save_adapter(random_adapter(config, rank=8, targets=TARGETS, seed=len(keys)), tmp / tenant)
        registry.register_adapter(tenant, "bot", folder)
    with TieredCluster(SPEC) as cluster:
        yield {"cluster": cluster, "keys": keys, "registry": registry,
               "config": ReplicaConfig(db, str(tmp / "store"), 0.096, lora_slots=4, lora_rank=8, lora_targets=TARGETS,
                                       kv_cache_mib=64, preload=("acme/bot",))}


def trace(models_at: list[tuple[float, str]]) -> list[TraceRequest]:
    return [TraceRequest(at, model.split("/")[0], model, tuple(range(100, 120)), 4) for at, model in models_at]


def test_from_zero_a_machine_and_its_replica_start_serve_every_tenant_then_both_go_away(deployment):
    cluster = deployment["cluster"]
    scaler = Autoscaler(cluster, {"g": ["serve-1", "serve-0"]}, {"acme/bot": "g", "globex/bot": "g"},
                        {"g": deployment["config"]}, idle_s=2.0, max_in_flight=8)
    try:
        scaler.release_idle_machines()  # nothing runs yet: both machines are given back
        assert cluster.machine_address("serve-0") is None and cluster.machine_address("serve-1") is None
        assert scaler.running() == {"g": 0}
        replay = replay_service(scaler, trace([(0.0, "acme/bot"), (0.1, "globex/bot"), (0.2, "acme/bot")]),
                                deployment["keys"])
        assert [s.completion_tokens for s in replay.served] == [4, 4, 4]
        # all three arrived before the replica was ready: each waited for its cold start
        assert all(s.cold_start_s > 0 for s in replay.served)
        assert replay.stats["cold_starts"] == 1 and replay.stats["machines_up"] == 1
        up = next(e for e in scaler.events if e["event"] == "machine up")
        ready = next(e for e in scaler.events if e["event"] == "ready")
        assert up["machine"] == ready["machine"] == "serve-1"  # the group's first (planned) machine
        # the first request waited for the machine and the replica: its latency holds both
        assert replay.served[0].latency_s >= ready["cold_start_s"] - 0.5 >= up["machine_start_s"]
        # one machine was up, and only for part of the replay
        assert 0 < replay.stats["machine_seconds"] < replay.makespan_s
        assert scaler.wait_for_zero(60.0), "an idle replica and its machine must scale to zero"
        assert [e["reason"] for e in scaler.events if e["event"] == "stop"] == ["idle 2 s"]
        assert cluster.machine_address("serve-1") is None
        # every tenant was metered by the replica (in the shared registry)
        for tenant in ("acme", "globex"):
            usage = deployment["registry"].usage(deployment["registry"].tenant(tenant))
            assert usage["total"]["completion_tokens"] >= 4
    finally:
        records = scaler.close()
    # closing starts again what it gave back: the cluster is as it was found
    assert cluster.machine_address("serve-0") and cluster.machine_address("serve-1")
    record = next(r for r in records if "base_load_s" in r)
    assert record["worker"] == "serve-1" and record["adapters_preloaded"] == 1
    assert 0 < record["base_load_s"] < record["ready_s"]
    # it decoded once, base and with its adapter, before saying it was ready: the first tenants'
    # requests do not pay a process's first decode
    assert 0 < record["warm_up_s"] < record["ready_s"]


def test_a_pinned_deployment_stays_up_and_a_busy_group_scales_out_to_its_spare_machine(deployment):
    scaler = Autoscaler(deployment["cluster"], {"g": ["serve-0", "serve-1"]}, {}, {"g": deployment["config"]},
                        release_machines=False, idle_s=0.5, max_in_flight=1)
    try:
        scaler.pinned = True
        first = scaler.warm("g")
        time.sleep(1.5)
        assert scaler.running() == {"g": 1}  # pinned: not reaped although idle
        held, waited = scaler.acquire("base")  # one request in flight: the replica is at max_in_flight
        assert waited == 0.0  # it was ready: no cold start
        second, _ = scaler.acquire("base")  # so this one starts a replica on the spare machine
        assert held is first and second is first
        starts = [e for e in scaler.events if e["event"] == "start"]
        assert [e["reason"] for e in starts] == ["warm start", "scale out"]
        assert starts[1]["machine"] == "serve-1"
        scaler.release(held)
        scaler.release(second)
    finally:
        scaler.close()


def test_bad_configurations_and_unknown_tenants_are_refused(deployment):
    with pytest.raises(ScalingError, match="at least one machine"):
        Autoscaler(deployment["cluster"], {"g": []}, {}, {"g": deployment["config"]})
    with pytest.raises(ScalingError, match=r"no replica configuration for group\(s\) \['h'\]"):
        Autoscaler(deployment["cluster"], {"g": ["x"], "h": ["y"]}, {}, {"g": deployment["config"]})
    scaler = Autoscaler(deployment["cluster"], {"g": ["x"]}, {}, {"g": deployment["config"]}, release_machines=False)
    try:
        with pytest.raises(ValueError, match=r"no API key for tenant\(s\) \['initech'\]"):
            replay_service(scaler, trace([(0.0, "initech/bot")]), deployment["keys"])
        with pytest.raises(ScalingError, match="no worker named 'x' is running"):
            scaler.acquire("base")
    finally:
        scaler.close()


def test_an_external_clusters_machines_are_not_ours_to_release(deployment):
    with TieredCluster(SPEC, scheduler=deployment["cluster"].address) as external:
        with pytest.raises(ClusterError, match="its own manager starts and stops its machines"):
            external.release_machine("serve-0")
        scaler = Autoscaler(external, {"g": ["serve-0"]}, {}, {"g": deployment["config"]})
        try:
            assert scaler.machines is None, "on an external cluster only replicas come and go"
        finally:
            scaler.close()


def test_a_lull_costs_an_always_on_deployment_every_machine_and_a_serverless_one_what_stays_up(deployment):
    replay = Replay("x", [], 1.0, stats={"machine_seconds": 5.0})
    scaler = Autoscaler(deployment["cluster"], {"g": ["serve-0", "serve-1"]}, {}, {"g": deployment["config"]})
    try:
        scaler.pinned = True  # both machines stay up: the lull's cost is known without waiting it out
        tic = time.monotonic()
        assert machine_seconds_with_lull(scaler, replay, 30.0) == 5.0 + 2 * 30.0 and time.monotonic() - tic < 1.0
        scaler.pinned = False  # serverless: the lull is watched while machines are up ...
        tic = time.monotonic()
        assert machine_seconds_with_lull(scaler, replay, 1.0) == pytest.approx(5.0 + 2 * 1.0, abs=0.3)
        assert time.monotonic() - tic >= 1.0
        scaler.release_idle_machines()  # ... and once every machine is given back, the rest costs nothing
        tic = time.monotonic()
        assert machine_seconds_with_lull(scaler, replay, 30.0) == pytest.approx(5.0, abs=0.01)
        assert time.monotonic() - tic < 1.0
        with pytest.raises(ValueError, match="lull_s must be ≥ 0"):
            machine_seconds_with_lull(scaler, replay, -1.0)
    finally:
        scaler.close()


def test_a_replica_profiled_as_deployed_serves_the_probe_over_http_and_is_stopped(deployment):
    probe = trace([(0.0, "acme/bot"), (0.2, "globex/bot"), (0.4, "acme/bot"), (0.6, "acme/bot")])
    profile = profile_machine(deployment["cluster"], "serve-0", deployment["config"], deployment["keys"], probe, 5.0,
                              ttft_slo_s=120.0, tpot_slo_s=30.0, factors_up=(1.0,))
    (point,) = profile["points"]  # objectives this loose hold at the workload's own load
    assert point["held"] and point["requests"] == 4 and point["attainment"] == 1.0
    # 16 tokens over the probe's 0.6 s + one mean gap (0.2 s)
    assert point["offered_tokens_per_s"] == pytest.approx(20.0) == profile["capacity_tokens_per_s"]
    assert profile["kind"] == "deployed" and profile["weight_format"] == "int4" and profile["lora_slots"] == 4
    assert profile["replica"]["worker"] == "serve-0" and profile["replica"]["base_load_s"] > 0
    # every tenant's probe requests went through the service's tenancy, and were metered
    for tenant in ("acme", "globex"):
        assert deployment["registry"].usage(deployment["registry"].tenant(tenant))["total"]["requests"] >= 1
