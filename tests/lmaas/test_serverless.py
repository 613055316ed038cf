"""Serverless LMaaS on a real Dask cluster: replicas start on demand on the planned workers, a
request waits out the cold start (and it shows in its latency), an idle replica goes away, and a
replica serves the registry's tenants over HTTP with their keys."""

from __future__ import annotations

import time

import pytest

from infra.cluster import TieredCluster
from infra.spec import InfraSpec
from infra.store import LocalStore
from tasks.lm.lora import random_adapter, save_adapter
from tasks.lm.weights import load_config
from tasks.lmaas.registry import Registry
from tasks.lmaas.serverless import Autoscaler, ReplicaConfig, ScalingError, replay_service
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
        workers = {w["name"]: addr for addr, w in cluster.client.scheduler_info(n_workers=-1)["workers"].items()}
        yield {"client": cluster.client, "workers": workers, "keys": keys, "registry": registry,
               "config": ReplicaConfig(db, str(tmp / "store"), 0.096, lora_slots=4, lora_rank=8, lora_targets=TARGETS,
                                       kv_cache_mib=64, preload=("acme/bot",))}


def trace(models_at: list[tuple[float, str]]) -> list[TraceRequest]:
    return [TraceRequest(at, model.split("/")[0], model, tuple(range(100, 120)), 4) for at, model in models_at]


def test_a_replica_starts_from_zero_serves_every_tenant_then_scales_to_zero(deployment):
    workers = deployment["workers"]
    scaler = Autoscaler(deployment["client"], {"g": [workers["serve-1"], workers["serve-0"]]},
                        {"acme/bot": "g", "globex/bot": "g"}, {"g": deployment["config"]}, idle_s=2.0, max_in_flight=8)
    try:
        assert scaler.running() == {"g": 0}
        replay = replay_service(scaler, trace([(0.0, "acme/bot"), (0.1, "globex/bot"), (0.2, "acme/bot")]),
                                deployment["keys"])
        assert [s.completion_tokens for s in replay.served] == [4, 4, 4]
        assert replay.stats["cold_starts"] == 1
        ready = next(e for e in scaler.events if e["event"] == "ready")
        assert ready["worker"] == workers["serve-1"]  # the group's first (planned) worker
        # the first request waited for the cold start: its latency holds it
        assert replay.served[0].latency_s >= ready["cold_start_s"] - 0.5
        assert scaler.wait_for_zero(30.0), "an idle replica must scale to zero"
        assert [e["reason"] for e in scaler.events if e["event"] == "stop"] == ["idle 2 s"]
        # every tenant was metered by the replica (in the shared registry)
        for tenant in ("acme", "globex"):
            usage = deployment["registry"].usage(deployment["registry"].tenant(tenant))
            assert usage["total"]["completion_tokens"] >= 4
    finally:
        records = scaler.close()
    record = next(r for r in records if "base_load_s" in r)
    assert record["worker"] == "serve-1" and record["adapters_preloaded"] == 1
    assert 0 < record["base_load_s"] < record["ready_s"]


def test_a_pinned_deployment_stays_up_and_a_busy_group_scales_out_to_its_spare_worker(deployment):
    workers = deployment["workers"]
    scaler = Autoscaler(deployment["client"], {"g": [workers["serve-0"], workers["serve-1"]]}, {},
                        {"g": deployment["config"]}, idle_s=0.5, max_in_flight=1)
    try:
        scaler.pinned = True
        first = scaler.warm("g")
        time.sleep(1.5)
        assert scaler.running() == {"g": 1}  # pinned: not reaped although idle
        held, _ = scaler.acquire("base")  # one request in flight: the replica is at max_in_flight
        second, _ = scaler.acquire("base")  # so this one starts a replica on the spare worker
        assert held is first and second is first
        starts = [e for e in scaler.events if e["event"] == "start"]
        assert [e["reason"] for e in starts] == ["warm start", "scale out"]
        assert starts[1]["worker"] == workers["serve-1"]
        scaler.release(held)
        scaler.release(second)
    finally:
        scaler.close()


def test_bad_configurations_and_unknown_tenants_are_refused(deployment):
    with pytest.raises(ScalingError, match="at least one worker"):
        Autoscaler(deployment["client"], {"g": []}, {}, {"g": deployment["config"]})
    with pytest.raises(ScalingError, match=r"no replica configuration for group\(s\) \['h'\]"):
        Autoscaler(deployment["client"], {"g": ["x"], "h": ["y"]}, {}, {"g": deployment["config"]})
    scaler = Autoscaler(deployment["client"], {"g": ["x"]}, {}, {"g": deployment["config"]})
    try:
        with pytest.raises(ValueError, match=r"no API key for tenant\(s\) \['initech'\]"):
            replay_service(scaler, trace([(0.0, "initech/bot")]), deployment["keys"])
    finally:
        scaler.close()
