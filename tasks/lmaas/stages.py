"""LMaaS's stages on the tiered cluster: what the flow (flows/lmaas/flow.py) tells in order.

- TRAIN: real LoRA fine-tuning of the base model on tenants' small tasks (tasks/lmaas/finetune.py),
  every tenant's adapter in the same forward passes, one Prefect task on the training pool;
  held-out loss before/after and accuracy;
- REGISTER: the trained adapters and many more (randomly initialised, for scale) go into the
  registry — a real database and the artifact store — under their tenants, each with an API key;
- PROFILE: beside the training, each serving pool's worker decodes batches of distinct adapters in
  each weight format, in-process, to choose the replicas' format; then a replica in that format is
  started on the pool's worker as the service runs it and driven over HTTP by probe traces of the
  workload's shape at a ladder of loads: its capacity is the highest load at which the tightest
  tenant objectives (TTFT and TPOT) held (tasks/lmaas/profile.py);
- OPTIMIZE: the placement MILP (optimizers/lmaas.py) picks the serving workers and each one's
  adapters from the trace's expected load, the capacities as deployed and the catalog's prices;
- DEPLOY + EVALUATE: serving replicas run as services on the chosen workers (tasks/lmaas/serverless.py)
  and the multi-tenant trace is sent to them over HTTP with each tenant's key, always on and then
  serverless (scale from zero, cold starts in latency); the baselines replay the same trace on a
  serving worker;
- RE-PLAN: the load mix shifts (a surge with popularity reversed) and the placement is re-solved.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE

from data_contracts import validate
from infra.catalog import load_catalog
from infra.cluster import TieredCluster, on_pool
from infra.prefect_server import tierflow_home
from infra.spec import InfraSpec, Pool
from infra.store import open_store
from optimizers.lmaas import AdapterPlacement, needs_replan, plan_adapter_placement
from tasks.common.run import RunContext
from tasks.common.tasks import task
from tasks.lmaas.probes import probe_isolation, served_accuracy

TARGETS = ("q_proj", "v_proj")
RANK = 8
MAX_HOST_ADAPTERS = 512
WEIGHT_FORMATS = ("int4", "bfloat16")  # profiled on each serving pool; its replicas run the faster
SIMULATED = [
    "every serving and training worker is a Dask worker process on this host's 2 CPU cores: replicas that run "
    "together share them, so scale-out adds no compute here; prices are the catalog's cpu-small $/hour",
    "the baselines run in-process on a serving worker in bf16 (merging needs dense weights); the deployed "
    "service runs behind HTTP in the weight format its pool's profile chose, with cold starts counted",
]


# --- tasks --------------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE, task_run_name="fine-tune {task_names} on {pool}")
def train_adapters(task_names: list[str], steps: int, lr: float, seed: int, out: str, pool: str) -> list[dict]:
    """Fine-tune one LoRA adapter per task, all in the same forward passes on one engine
    (:func:`~tasks.lmaas.finetune.finetune_together`), and measure each one's held-out accuracy
    before and after (served by the engine)."""
    from tasks.lm.engine import LMEngine
    from tasks.lm.lora import save_adapter
    from tasks.lmaas.finetune import accuracy, finetune_together, make_task

    engine = LMEngine.load(weight_format="bfloat16", kv_cache_mib=128, lora_slots=len(task_names), lora_rank=RANK,
                           lora_targets=TARGETS)
    jobs = [make_task(name, seed) for name in task_names]
    records = []
    for job, (adapter, record) in zip(jobs, finetune_together(engine, jobs, steps=steps, lr=lr, rank=RANK,
                                                              targets=TARGETS, seed=seed)):
        engine.add_adapter(job.name, adapter)
        folder = save_adapter(adapter, Path(out) / "adapters" / job.name)
        records.append({**asdict(record), "folder": str(folder), "test_examples": len(job.test),
                        "train_examples": len(job.train), "accuracy_base": accuracy(engine, None, job.test),
                        "accuracy_adapter": accuracy(engine, job.name, job.test)})
    return records


@task(cache_policy=NO_CACHE, task_run_name="profile serving on {pool}")
def profile_pool(pool: str) -> dict[str, dict]:
    """The serving engine's profile on this worker, per weight format."""
    from tasks.lmaas.profile import profile_serving

    return {fmt: profile_serving(weight_format=fmt, lora_rank=RANK, lora_targets=TARGETS) for fmt in WEIGHT_FORMATS}


@task(cache_policy=NO_CACHE, task_run_name="profile the deployed replica on {machine}")
def profile_replica(cluster: TieredCluster, machine: str, config, keys: dict[str, str], probe: list, rate: float,
                    ttft_slo_s: float, tpot_slo_s: float, load_tokens_per_s: float) -> dict:
    """The capacity of a replica of ``config`` on ``machine``, measured as deployed (over HTTP), on
    a ladder of loads around ``load_tokens_per_s`` (the trace's)."""
    from tasks.lmaas.profile import profile_machine

    return profile_machine(cluster, machine, config, keys, probe, rate, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
                           load_tokens_per_s=load_tokens_per_s)


@task(cache_policy=NO_CACHE, task_run_name="replay the baselines on {pool}")
def replay_baselines(trace: list, db_url: str, store_url: str, strategies: list[str], pool: str) -> dict:
    """The same trace, in-process on one serving worker, for each baseline strategy (bf16)."""
    from tasks.lm.engine import LMEngine
    from tasks.lmaas.registry import Registry
    from tasks.lmaas.strategies import replay

    engine = LMEngine.load(weight_format="bfloat16", kv_cache_mib=256, lora_slots=16, lora_rank=RANK,
                           lora_targets=TARGETS, max_host_adapters=4096)
    registry = Registry(db_url, open_store(store_url), engine.config)
    wanted = {r.model for r in trace}
    adapters = {info.model: registry.fetch_adapter(info) for info in registry.adapters() if info.model in wanted}
    out = {}
    for strategy in strategies:
        engine.cache.clear_prefix_cache()
        result = replay(strategy, engine, adapters, trace)
        out[strategy] = {"summary": result.summary(), "served": [asdict(s) for s in result.served]}
    return out


# --- TRAIN and REGISTER ---------------------------------------------------------------------------

def split_pools(infra: InfraSpec) -> tuple[Pool, list[Pool]]:
    """The training pool (``train``) and the serving pools."""
    train = next((p for p in infra.pools if p.name == "train"), infra.pools[0])
    return train, [p for p in infra.pools if p.name != "train"] or list(infra.pools)


def fine_tune(run: RunContext, pool: Pool, tasks: list[str], steps: int, lr: float) -> list[dict]:
    """TRAIN one adapter per task on the training pool, together (one task, one engine), checked
    against the ``lmaas.training`` contract."""
    with on_pool(pool):
        trained = train_adapters.submit(tasks, steps, lr, run.params.seed, str(run.out.resolve()), pool.name).result()
    training = pd.DataFrame([{k: r[k] for k in ("task", "steps", "heldout_loss_before", "heldout_loss_after",
                                                 "accuracy_base", "accuracy_adapter", "seconds", "tokens_per_s",
                                                 "trainable_params")} for r in trained])
    validate(training, "lmaas.training", "train stage")
    for r in trained:
        get_run_logger().info("fine-tuned %s: held-out loss %.3f → %.3f, accuracy %.2f → %.2f", r["task"],
                              r["heldout_loss_before"], r["heldout_loss_after"], r["accuracy_base"], r["accuracy_adapter"])
    return trained


@dataclass
class Tenancy:
    """The registry and what was registered: tenants' keys and each adapter's size."""

    registry: object  # tasks.lmaas.registry.Registry
    db_url: str
    store_url: str
    keys: dict[str, str]  # tenant -> API key
    sizes: dict[str, int]  # adapter model -> bytes

    @property
    def models(self) -> list[str]:
        return sorted(self.sizes)

    @property
    def tenants(self) -> dict:
        return {t.name: t for t in self.registry.tenants()}


def register(run: RunContext, trained: list[dict], owners: dict[str, str], n_random: int) -> Tenancy:
    """REGISTER tenants with API keys, the trained adapters (task → owning tenant in ``owners``) and
    ``n_random`` random ones, in the run's registry (``db``, default SQLite in the run's folder) and
    adapter store."""
    from tasks.lm.lora import random_adapter, save_adapter
    from tasks.lm.weights import load_config
    from tasks.lmaas.registry import Registry

    params, seed = run.params, run.params.seed
    store_url = params.adapter_store or str(run.path("store").resolve())
    db_url = params.db or f"sqlite:///{run.path('lmaas.db').resolve()}"
    config = load_config(None)
    registry = Registry(db_url, open_store(store_url), config)
    keys, sizes = {}, {}
    for record in trained:
        tenant = owners[record["task"]]
        _, keys[tenant] = registry.add_tenant(tenant, max_concurrent=64, tokens_per_minute=10_000_000,
                                              ttft_slo_s=3.0, tpot_slo_s=0.25)
        info = registry.register_adapter(tenant, record["task"], record["folder"])
        sizes[info.model] = info.n_params * 4
    n_tenants = max(1, n_random // 10)
    for k in range(n_tenants):
        # a mix of objectives: interactive tenants (tight TTFT) and batch-like ones
        tight = k % 2 == 0
        _, keys[f"t{k}"] = registry.add_tenant(f"t{k}", max_concurrent=64, tokens_per_minute=10_000_000,
                                               ttft_slo_s=2.0 if tight else 6.0, tpot_slo_s=0.2 if tight else 0.5)
    for i in range(n_random):
        folder = save_adapter(random_adapter(config, rank=RANK, targets=TARGETS, seed=seed * 100_000 + i, std=0.02),
                              run.path("random-adapters") / f"a{i}")
        info = registry.register_adapter(f"t{i % n_tenants}", f"a{i}", folder)
        sizes[info.model] = info.n_params * 4
    return Tenancy(registry, db_url, store_url, keys, sizes)


def make_requests(models: list[str], shape: dict, seed: int, n_requests: int | None = None) -> list:
    """The multi-tenant trace every strategy replays (Zipf over the adapters, bursty arrivals):
    ``shape``'s requests, or ``n_requests`` of the same shape (the profile's probe, another seed)."""
    from tasks.lmaas.trace import make_trace

    return make_trace(models, list(_corpus_tokens()), n_requests=n_requests or shape["requests"], rate=shape["rate"],
                      seed=seed, max_tokens=shape["max_tokens"])


@functools.cache
def _corpus_tokens() -> tuple[int, ...]:
    """The prompts' source text, tokenized once per process (building the tokenizer takes seconds)."""
    from tasks.lm.tokenizer import build_tokenizer
    from tasks.lm.weights import load_metadata
    from tasks.moe.corpus import load_corpus

    return tuple(build_tokenizer(load_metadata(None)).encode(load_corpus()[:200_000]))


# --- PROFILE and OPTIMIZE -------------------------------------------------------------------------

def compare_weight_formats(serving: list[Pool]) -> dict:
    """Start each serving pool's in-process comparison of the weight formats (its worker runs it
    while the training pool trains); returns the futures, per pool."""
    comparing = {}
    for pool in serving:
        with on_pool(pool):
            comparing[pool.name] = profile_pool.submit(pool.name)
    return comparing


@dataclass
class Objectives:
    """The tightest tenant objectives: what every serving machine is profiled and planned against."""

    ttft_s: float
    tpot_s: float

    @classmethod
    def tightest(cls, tenants: dict) -> "Objectives":
        return cls(min(t.ttft_slo_s for t in tenants.values()), min(t.tpot_slo_s for t in tenants.values()))


def replica_config(tenancy: Tenancy, price_per_hour: float, weight_format: str, preload: tuple[str, ...]):
    """What a serving replica runs: the registry, the chosen format and its hot set of adapters."""
    from tasks.lmaas.serverless import ReplicaConfig

    return ReplicaConfig(tenancy.db_url, tenancy.store_url, price_per_hour, weight_format=weight_format, lora_slots=16,
                         lora_rank=RANK, lora_targets=TARGETS, max_host_adapters=MAX_HOST_ADAPTERS, preload=preload)


def profile_serving_pools(cluster: TieredCluster, serving: list[Pool], comparing: dict, tenancy: Tenancy, probe: list,
                          rate: float, objectives: Objectives, trace: list) -> tuple[dict, dict, dict]:
    """PROFILE each serving pool: the weight format its comparison chose, then a replica in it on the
    pool's first machine, probed over HTTP with ``probe`` (arriving at ``rate``, sent at loads
    around ``trace``'s) against ``objectives``; returns every format's in-process profile, the
    deployed profile and the chosen format, per pool."""
    from tasks.lmaas.profile import capacity, choose_weight_format, planned_load
    from tasks.lmaas.service import default_price_per_hour

    running = set(cluster.workers().values())
    profiled, profiles, formats = {}, {}, {}
    for pool in serving:
        # the future is let go once read: Dask would recompute a result it still holds on a machine the
        # service later gives back, beside the replays it would then slow down
        profiled[pool.name] = comparing.pop(pool.name).result()
        formats[pool.name] = choose_weight_format(profiled[pool.name], objectives.tpot_s)
        config = replica_config(tenancy, default_price_per_hour(pool.device), formats[pool.name],
                                tuple(tenancy.models[:MAX_HOST_ADAPTERS]))
        # a pool without a worker per machine runs one worker, named after the pool
        machine = next(m if m in running else pool.name for m in pool.machine_names())
        profiles[pool.name] = profile_replica(cluster, machine, config, tenancy.keys, probe, rate, objectives.ttft_s,
                                              objectives.tpot_s, planned_load(trace, rate))
        get_run_logger().info(
            "%s serves in %s (in-process %s tokens/s at TPOT ≤ %.2f s); as deployed it holds %.1f tokens/s within "
            "TTFT ≤ %.1f s and TPOT ≤ %.2f s", pool.name, formats[pool.name],
            {f: round(capacity(p, objectives.tpot_s), 1) for f, p in profiled[pool.name].items()}, objectives.tpot_s,
            profiles[pool.name]["capacity_tokens_per_s"], objectives.ttft_s, objectives.tpot_s)
    return profiled, profiles, formats


def place(cluster: TieredCluster, trace: list, tenancy: Tenancy, serving: list[Pool], profiles: dict,
          objectives: Objectives, rate: float):
    """OPTIMIZE: every registered adapter gets a place (the ones the trace does not use with no load),
    within the capacities measured as deployed (machines on one host counted once: they share its
    cores); returns the placement, the adapters' loads and the worker options it chose from."""
    from tasks.lmaas.profile import adapter_loads, plan_within_objectives, trace_counts, trace_seconds, worker_options

    counts = trace_counts(trace)
    loads = adapter_loads({m: counts.get(m, (0, 0)) for m in tenancy.models}, trace_seconds(trace, rate), tenancy.sizes)
    hosts = {m: cluster.host_of(m) for p in serving for m in p.machine_names()}
    workers = worker_options(serving, profiles, objectives.tpot_s, load_catalog(), hosts)
    plan = plan_within_objectives(loads, workers, ttft_slo_s=objectives.ttft_s, tpot_slo_s=objectives.tpot_s)
    get_run_logger().info("placement: run %s at $%.3f/hour", plan.workers, plan.usd_per_hour)
    return plan, loads, workers


def keep_current_plan(plan: AdapterPlacement, tenancy: Tenancy, infra: str, tightest_tpot: float, profiles: dict,
                      hosts: dict[str, str | None]) -> None:
    """What the scheduled re-plan (``lmaas-replan``) starts from: ``$TIERFLOW_HOME/lmaas/plan.json``."""
    current = tierflow_home() / "lmaas" / "plan.json"
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text(json.dumps({**plan_dict(plan), "db": tenancy.db_url, "store": tenancy.store_url, "infra": infra,
                                   "tpot_slo_s": tightest_tpot, "profiles": profiles, "hosts": hosts}, default=str))


def plan_dict(plan: AdapterPlacement) -> dict:
    return {"workers": plan.workers, "usd_per_hour": plan.usd_per_hour, "utilisation": plan.utilisation,
            "active_adapters": plan.active_adapters, "memory_bytes": plan.memory_bytes,
            "solve_seconds": plan.solve_seconds, "optimal": plan.optimal, "inputs": plan.inputs,
            "assignment": plan.assignment}


# --- DEPLOY + EVALUATE ----------------------------------------------------------------------------

@dataclass
class ServiceReplays:
    """What the deployed service did: the trace always on and serverless, and the probes."""

    always_on: object  # tasks.lmaas.strategies.Replay
    serverless: object
    machine_seconds_with_quiet: dict[str, float]
    served_accuracy: dict
    isolation: dict
    scaled_to_zero: bool
    events: list[dict]
    replicas: list[dict]
    price_per_hour: float
    deployed_at: float  # epoch seconds: the registry meters what came before (the profile's probes) apart


@task(cache_policy=NO_CACHE, task_run_name="replay the trace through the deployed service")
def serve_trace(cluster: TieredCluster, plan: AdapterPlacement, loads: list, serving: list[Pool], formats: dict,
                tenancy: Tenancy, trace: list, trained: list[dict], owners: dict[str, str], shape: dict,
                seed: int) -> ServiceReplays:
    """DEPLOY the placement as replicas on its workers (one group per planned worker, the pool's other
    machines as spares) and replay the trace over HTTP: always on, then serverless from zero."""
    from tasks.lmaas.serverless import SERVICE_MAX_IN_FLIGHT, Autoscaler, machine_seconds_with_lull, replay_service
    from tasks.lmaas.service import default_price_per_hour

    deployed_at = time.time()
    price = default_price_per_hour(serving[0].device)
    running = set(cluster.workers().values())
    machine_pool = {m: p for p in serving for m in p.machine_names()}
    rate = {x.name: x.requests_per_s for x in loads}
    groups, configs, assignment = {}, {}, {}
    for machine in plan.workers:
        spares = [m for m in machine_pool[machine].machine_names() if m not in plan.workers]
        # a pool without a worker per machine runs one worker, named after the pool
        members = [m if m in running else machine_pool[m].name for m in [machine, *spares]]
        groups[machine] = list(dict.fromkeys(members))
        # a replica holds its adapters in host memory from the start (S-LoRA's host tier): their
        # fetch is part of its cold start; beyond MAX_HOST_ADAPTERS the busiest are preloaded
        hot = sorted(plan.adapters_on(machine), key=lambda a: -rate[a])[:MAX_HOST_ADAPTERS]
        configs[machine] = replica_config(tenancy, price, formats[machine_pool[machine].name], tuple(hot))
        assignment.update({a: machine for a in plan.adapters_on(machine)})
    # on the embedded cluster, machines without a replica are given back and started on demand
    scaler = Autoscaler(cluster, groups, assignment, configs, idle_s=shape["idle_s"],
                        max_in_flight=SERVICE_MAX_IN_FLIGHT)
    try:
        # always on: every planned worker's replica is up before the trace, none scales to zero;
        # the machines the plan does not use are given back (a scale-out starts one again)
        scaler.pinned = True
        for group in groups:
            scaler.warm(group)
        scaler.release_idle_machines()
        always_on = replay_service(scaler, trace, tenancy.keys, strategy="lmaas")
        paid = {"lmaas": machine_seconds_with_lull(scaler, always_on, shape["quiet_s"])}
        accuracy = served_accuracy(scaler, tenancy.keys, trained, owners, seed)
        replica, _ = scaler.acquire(tenancy.models[0])
        try:
            isolation = probe_isolation(replica.url, tenancy.keys, tenancy.models)
        finally:
            scaler.release(replica)
        # serverless: the replicas scale to zero when idle; the same trace then starts from zero
        scaler.pinned = False
        scaled_to_zero = scaler.wait_for_zero(shape["idle_s"] + 60)
        serverless = replay_service(scaler, trace, tenancy.keys, strategy="lmaas_serverless")
        paid["lmaas_serverless"] = machine_seconds_with_lull(scaler, serverless, shape["quiet_s"])
    finally:
        replicas = scaler.close()
    for result in (always_on, serverless):
        get_run_logger().info("%s: %.1f tokens/s, p99 %.2f s, %d cold starts", result.strategy,
                              result.summary()["tokens_per_s"], result.summary()["latency_p99_s"],
                              result.stats["cold_starts"])
    return ServiceReplays(always_on, serverless, paid, accuracy, isolation, scaled_to_zero, list(scaler.events),
                          replicas, price, deployed_at)


def replay_baselines_on(pool: Pool, trace: list, tenancy: Tenancy, strategies: list[str]) -> dict:
    """The baselines replay the same trace on one serving pool's worker."""
    with on_pool(pool):
        return replay_baselines.submit(trace, tenancy.db_url, tenancy.store_url, strategies, pool.name).result()


# --- RE-PLAN ------------------------------------------------------------------------------------

def replan_on_surge(plan: AdapterPlacement, tenancy: Tenancy, workers: list, shape: dict) -> dict:
    """RE-PLAN on a shifted mix: popularity reversed (Zipf over the adapters in reverse order), and a
    surge to half a worker beyond what the plan's workers take within the latency objective (1.5× one
    worker's when the plan has one), so the plan must grow, or say that the spec cannot hold it."""
    from tasks.lmaas.profile import zipf_loads

    target = (len(plan.workers) + 0.5) * plan.inputs["max_utilisation"] * min(w.tokens_per_s for w in workers)
    surge = zipf_loads(list(reversed(tenancy.models)), target, sum(shape["max_tokens"]) / 2, tenancy.sizes)
    return replan(plan, surge, workers)


def replan(plan: AdapterPlacement, loads, workers) -> dict:
    """Whether ``plan`` still holds for ``loads``; if not, the cheapest placement for them that moves
    the fewest adapters (or which constraints the spec cannot meet)."""
    from optimizers.solve import InfeasibleError

    reasons = needs_replan(plan, loads, workers)
    if not reasons:
        return {"needed": False, "reasons": [], "workers": plan.workers, "moved_adapters": 0}
    try:
        # at the plan's own utilisation bound (all of a capacity measured as deployed)
        new = plan_adapter_placement(loads, workers, max_utilisation=plan.inputs.get("max_utilisation", 0.7),
                                     current=plan.assignment)
    except InfeasibleError as exc:
        return {"needed": True, "reasons": reasons, "infeasible": str(exc), "workers": plan.workers, "moved_adapters": 0}
    return {"needed": True, "reasons": reasons, "workers_before": plan.workers, "workers": new.workers,
            "usd_per_hour_before": plan.usd_per_hour, "usd_per_hour": new.usd_per_hour, "moved_adapters": new.moved,
            "solve_seconds": new.solve_seconds, "surge_tokens_per_s": round(sum(a.tokens_per_s for a in loads), 1),
            "plan": plan_dict(new)}
