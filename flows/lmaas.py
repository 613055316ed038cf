"""LMaaS as a Prefect flow: fine-tune → register → profile → place → deploy (serverless) → replay → report.

``lmaas`` starts (or connects to) the tiered Dask cluster and runs the stages as a subflow:

- TRAIN: real LoRA fine-tuning of the base model on tenants' small tasks (tasks/lmaas/finetune.py),
  one Prefect task per adapter on the training pool; held-out loss before/after and accuracy of
  the base model and of the adapter on held-out examples;
- REGISTER: the trained adapters and many more (randomly initialised, for scale) go into the
  registry — a real database and the artifact store — under their tenants, each with an API key;
- PROFILE: each serving pool's worker loads the serving engine (timed: the cold start's largest part)
  and decodes batches of distinct adapters; capacity = the best throughput meeting the TPOT objective;
- OPTIMIZE: the placement MILP (optimizers/lmaas.py) picks the serving workers and each one's
  adapters from the trace's expected load and the catalog's prices;
- DEPLOY + EVALUATE: serving replicas start on demand on the chosen workers (tasks/lmaas/serverless.py:
  scale from zero, scale out, scale to zero when idle) and the multi-tenant trace is sent to them over
  HTTP with each tenant's key; cold starts count in latency. The trained adapters are then asked
  their held-out questions through the deployed service, and the isolation answers are probed.
  The baselines (``merged_sequential``, ``unbatched``, and ``multi_lora`` in-process for the same
  arithmetic) replay the same trace on a serving worker;
- RE-PLAN: the load mix shifts (a surge with popularity reversed); the plan is checked
  (``needs_replan``) and re-solved; the scheduled deployment ``lmaas-replan`` does the same from the
  registry's metered usage (:func:`lmaas_replan`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402

from data_contracts import validate  # noqa: E402
from infra.catalog import load_catalog  # noqa: E402
from infra.cluster import TieredCluster, on_pool  # noqa: E402
from infra.prefect_server import tierflow_home  # noqa: E402
from infra.spec import load_infra_spec  # noqa: E402
from infra.store import open_store  # noqa: E402
from optimizers.lmaas import AdapterPlacement, needs_replan, plan_adapter_placement  # noqa: E402

DEFAULT_INFRA = Path(__file__).resolve().parents[1] / "data" / "lmaas.infra.yaml"
TARGETS = ("q_proj", "v_proj")
RANK = 8
MAX_HOST_ADAPTERS = 512
TRAINED = {"router": "acme", "owners": "initech", "reviews": "globex"}  # task -> the tenant that owns its adapter
SCALES = {
    "tiny": {"tasks": ["reviews"], "steps": 6, "random_adapters": 6, "requests": 12, "rate": 2.0,
             "max_tokens": (4, 8), "idle_s": 4.0, "quiet_s": 6.0},  # the tests'
    "small": {"tasks": list(TRAINED), "steps": 60, "random_adapters": 100, "requests": 80, "rate": 3.0,
              "max_tokens": (8, 24), "idle_s": 8.0, "quiet_s": 30.0},
    "medium": {"tasks": list(TRAINED), "steps": 80, "random_adapters": 1000, "requests": 200, "rate": 4.0,
               "max_tokens": (8, 32), "idle_s": 10.0, "quiet_s": 30.0},
    "large": {"tasks": list(TRAINED), "steps": 100, "random_adapters": 2000, "requests": 400, "rate": 5.0,
              "max_tokens": (16, 48), "idle_s": 10.0, "quiet_s": 30.0},
}
BASELINES = ("multi_lora", "merged_sequential", "unbatched")
WEIGHT_FORMATS = ("int4", "bfloat16")  # profiled on each serving pool; its replicas run the faster
SIMULATED = [
    "every serving and training worker is a Dask worker process on this host's 2 CPU cores: replicas that run "
    "together share them, so scale-out adds no compute here; prices are the catalog's cpu-small $/hour",
    "the baselines run in-process on a serving worker in bf16 (merging needs dense weights); the deployed "
    "service runs behind HTTP in the weight format its pool's profile chose, with cold starts counted",
]


# --- stages -------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE, task_run_name="fine-tune {task_name} on {pool}")
def train_adapter(task_name: str, steps: int, seed: int, out: str, pool: str) -> dict:
    """Fine-tune one LoRA adapter and measure held-out accuracy before and after (served by the engine)."""
    from tasks.lm.engine import LMEngine
    from tasks.lm.lora import save_adapter
    from tasks.lmaas.finetune import accuracy, finetune, make_task

    engine = LMEngine.load(weight_format="bfloat16", kv_cache_mib=128, lora_slots=2, lora_rank=RANK, lora_targets=TARGETS)
    job = make_task(task_name, seed)
    adapter, record = finetune(engine, job, steps=steps, rank=RANK, targets=TARGETS, seed=seed)
    engine.add_adapter(task_name, adapter)
    folder = save_adapter(adapter, Path(out) / "adapters" / task_name)
    return {**asdict(record), "folder": str(folder), "test_examples": len(job.test), "train_examples": len(job.train),
            "accuracy_base": accuracy(engine, None, job.test), "accuracy_adapter": accuracy(engine, task_name, job.test)}


@task(cache_policy=NO_CACHE, task_run_name="profile serving on {pool}")
def profile_pool(pool: str) -> dict[str, dict]:
    """The serving engine's profile on this worker, per weight format."""
    from tasks.lmaas.profile import profile_serving

    return {fmt: profile_serving(weight_format=fmt, lora_rank=RANK, lora_targets=TARGETS) for fmt in WEIGHT_FORMATS}


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


def _register(registry, trained: list[dict], n_random: int, out: Path, config, seed: int) -> tuple[dict, dict]:
    """Tenants with API keys; the trained adapters and ``n_random`` random ones. Returns
    (tenant → key, model → adapter size in bytes)."""
    from tasks.lm.lora import random_adapter, save_adapter

    keys, sizes = {}, {}
    for record in trained:
        tenant = TRAINED[record["task"]]
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
                              out / "random-adapters" / f"a{i}")
        info = registry.register_adapter(f"t{i % n_tenants}", f"a{i}", folder)
        sizes[info.model] = info.n_params * 4
    return keys, sizes


def _machine_seconds_with_quiet(scaler, replay, quiet_s: float) -> float:
    """The machine-seconds of ``replay`` and of ``quiet_s`` seconds without traffic after it: what a
    deployment pays for its traffic and the lull that follows (always on: every machine stays up;
    serverless: idle replicas and their machines go away)."""
    before = scaler.machine_seconds()
    time.sleep(quiet_s)
    return replay.stats["machine_seconds"] + scaler.machine_seconds() - before


def _probe_isolation(url: str, keys: dict, models: list[str]) -> dict:
    """What the deployed service answers a tenant for: its own adapter, another tenant's, an
    unknown one of its own, and a wrong key (each a one-token completion)."""
    tenants = sorted({m.split("/")[0] for m in models})
    mine = next(m for m in models if m.startswith(tenants[0] + "/"))
    other = next(m for m in models if not m.startswith(tenants[0] + "/"))
    cases = {"own adapter": (keys[tenants[0]], mine), "another tenant's adapter": (keys[tenants[0]], other),
             "unknown adapter of one's own": (keys[tenants[0]], f"{tenants[0]}/no-such-adapter"),
             "wrong API key": ("tfk-not-a-key", mine)}
    answers = {}
    for case, (key, model) in cases.items():
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        answers[case] = r.status_code
    return answers


def _served_accuracy(scaler, keys: dict, trained: list[dict], seed: int) -> dict:
    """Each trained adapter's held-out accuracy, asked through the deployed service (and the base's)."""
    from tasks.lmaas.finetune import make_task

    out = {}
    for record in trained:
        job, tenant = make_task(record["task"], seed), TRAINED[record["task"]]
        scores = {}
        for model in (f"{tenant}/{record['task']}", "base"):
            replica, _ = scaler.acquire(model)
            try:
                right = 0
                for e in job.test:
                    r = httpx.post(f"{replica.url}/v1/completions", timeout=120,
                                   json={"model": model, "prompt": e.prompt, "max_tokens": 4, "temperature": 0},
                                   headers={"Authorization": f"Bearer {keys[tenant]}"})
                    r.raise_for_status()
                    words = r.json()["choices"][0]["text"].strip().split()
                    right += bool(words) and words[0].strip(".,:;!") == e.answer
                scores["adapter" if model != "base" else "base"] = right / len(job.test)
            finally:
                scaler.release(replica)
        out[record["task"]] = scores
    return out


def _slo_table(served: dict[str, list[dict]], tenants: dict) -> pd.DataFrame:
    """Per strategy and tenant: share of requests meeting the tenant's TTFT and TPOT objectives."""
    from tasks.lmaas.registry import slo_attainment

    rows = []
    for strategy, requests in served.items():
        for tenant, info in sorted(tenants.items()):
            mine = [(s["ttft_s"], s["latency_s"], s["completion_tokens"]) for s in requests if s["tenant"] == tenant]
            if mine:
                slo = slo_attainment(mine, info.ttft_slo_s, info.tpot_slo_s)
                rows.append({"strategy": strategy, "tenant": tenant, "requests": len(mine),
                             **{k: slo[k] for k in ("ttft_slo_s", "tpot_slo_s", "ttft_attainment", "tpot_attainment")},
                             "slo_attainment": slo["attainment"]})
    return pd.DataFrame(rows)


def _replan(plan: AdapterPlacement, loads, workers) -> dict:
    from optimizers.solve import InfeasibleError

    reasons = needs_replan(plan, loads, workers)
    if not reasons:
        return {"needed": False, "reasons": [], "workers": plan.workers, "moved_adapters": 0}
    try:  # the cheapest placement for the new mix that moves the fewest adapters
        new = plan_adapter_placement(loads, workers, current=plan.assignment)
    except InfeasibleError as exc:  # the new mix needs more than the spec has: say which constraints conflict
        return {"needed": True, "reasons": reasons, "infeasible": str(exc), "workers": plan.workers, "moved_adapters": 0}
    moved = new.moved
    return {"needed": True, "reasons": reasons, "workers_before": plan.workers, "workers": new.workers,
            "usd_per_hour_before": plan.usd_per_hour, "usd_per_hour": new.usd_per_hour, "moved_adapters": moved,
            "solve_seconds": new.solve_seconds, "surge_tokens_per_s": round(sum(a.tokens_per_s for a in loads), 1),
            "plan": _plan_dict(new)}


def _plan_dict(plan: AdapterPlacement) -> dict:
    return {"workers": plan.workers, "usd_per_hour": plan.usd_per_hour, "utilisation": plan.utilisation,
            "active_adapters": plan.active_adapters, "memory_bytes": plan.memory_bytes,
            "solve_seconds": plan.solve_seconds, "optimal": plan.optimal, "inputs": plan.inputs,
            "assignment": plan.assignment}


def _plot(table: pd.DataFrame, trained: list[dict], events: list[dict], out: Path) -> list[str]:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = ["tab:green", "tab:olive", "tab:cyan", "tab:blue", "tab:red"][: len(table)]
    axes[0].bar(table.strategy, table.tokens_per_s, color=colors)
    axes[0].set(ylabel="generated tokens / s", title="throughput, same multi-tenant trace")
    axes[0].tick_params(axis="x", labelrotation=15)
    axes[1].bar(table.strategy, table.latency_p99_s, color=colors, label="p99")
    axes[1].bar(table.strategy, table.latency_p50_s, color="black", alpha=0.35, label="p50")
    axes[1].set(ylabel="latency from arrival (s)", title="latency (cold starts included)")
    axes[1].tick_params(axis="x", labelrotation=15)
    axes[1].legend(fontsize=8)
    for record in trained:
        axes[2].plot(range(1, len(record["losses"]) + 1), record["losses"], label=f"{record['task']}")
    axes[2].set(xlabel="step", ylabel="answer loss", title="LoRA fine-tuning (real training)", yscale="log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lmaas.png", dpi=110)
    plt.close(fig)
    return ["lmaas.png"]


@flow(name="lmaas-stages", log_prints=True)
def lmaas_stages(cluster: TieredCluster, infra: str, scale: str, strategies: list[str], store_url: str | None, db: str | None,
                 results_dir: str, run_id: str, seed: int) -> dict:
    from tasks.lm.tokenizer import build_tokenizer
    from tasks.lm.weights import load_config, load_metadata
    from tasks.lmaas.profile import (adapter_loads, capacity, choose_weight_format, trace_counts, worker_options,
                                     zipf_loads)
    from tasks.lmaas.registry import Registry
    from tasks.lmaas.serverless import Autoscaler, ReplicaConfig, replay_service
    from tasks.lmaas.service import default_price_per_hour
    from tasks.lmaas.trace import make_trace
    from tasks.moe.corpus import load_corpus

    logger = get_run_logger()
    spec = load_infra_spec(infra)
    validate(spec.pools_frame(), "infra.pools", infra)
    shape = SCALES[scale]
    out = Path(results_dir) / "lmaas" / run_id
    out.mkdir(parents=True, exist_ok=True)
    store_url = store_url or str((out / "store").resolve())
    db_url = db or f"sqlite:///{(out / 'lmaas.db').resolve()}"
    train_pool = next((p for p in spec.pools if p.name == "train"), spec.pools[0])
    serving = [p for p in spec.pools if p.name != "train"] or spec.pools

    # TRAIN
    with on_pool(train_pool):
        futures = [train_adapter.submit(name, shape["steps"], seed, str(out.resolve()), train_pool.name)
                   for name in shape["tasks"]]
    trained = [f.result() for f in futures]
    training = pd.DataFrame([{k: r[k] for k in ("task", "steps", "heldout_loss_before", "heldout_loss_after",
                                                 "accuracy_base", "accuracy_adapter", "seconds", "tokens_per_s",
                                                 "trainable_params")} for r in trained])
    validate(training, "lmaas.training", "train stage")
    for r in trained:
        logger.info("fine-tuned %s: held-out loss %.3f → %.3f, accuracy %.2f → %.2f", r["task"], r["heldout_loss_before"],
                    r["heldout_loss_after"], r["accuracy_base"], r["accuracy_adapter"])

    # REGISTER
    config = load_config(None)
    registry = Registry(db_url, open_store(store_url), config)
    keys, sizes = _register(registry, trained, shape["random_adapters"], out, config, seed)
    models = sorted(sizes)
    corpus = build_tokenizer(load_metadata(None)).encode(load_corpus()[:200_000])
    trace = make_trace(models, corpus, n_requests=shape["requests"], rate=shape["rate"],
                       seed=seed, max_tokens=shape["max_tokens"])

    # PROFILE
    tenants = {t.name: t for t in registry.tenants()}
    tightest_tpot = min(t.tpot_slo_s for t in tenants.values())
    profiled, profiles, formats = {}, {}, {}
    for pool in serving:
        with on_pool(pool):
            profiled[pool.name] = profile_pool.submit(pool.name).result()
        formats[pool.name] = choose_weight_format(profiled[pool.name], tightest_tpot)
        profiles[pool.name] = profiled[pool.name][formats[pool.name]]
        logger.info("%s serves in %s: capacity %s tokens/s at TPOT ≤ %.2f s", pool.name, formats[pool.name],
                    {f: round(capacity(p, tightest_tpot), 1) for f, p in profiled[pool.name].items()}, tightest_tpot)

    # OPTIMIZE
    duration = max(r.at_s for r in trace) + 1.0 / shape["rate"]
    counts = trace_counts(trace)
    # every registered adapter gets a place, the ones the trace does not use with no load
    loads = adapter_loads({m: counts.get(m, (0, 0)) for m in models}, duration, sizes)
    workers = worker_options(serving, profiles, tightest_tpot, load_catalog())
    plan = plan_adapter_placement(loads, workers)
    (out / "plan.json").write_text(json.dumps(_plan_dict(plan), indent=1))
    current = tierflow_home() / "lmaas" / "plan.json"  # what the scheduled re-plan starts from
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text(json.dumps({**_plan_dict(plan), "db": db_url, "store": store_url, "infra": infra,
                                   "tpot_slo_s": tightest_tpot, "profiles": profiles}, default=str))
    logger.info("placement: run %s at $%.3f/hour", plan.workers, plan.usd_per_hour)

    # DEPLOY + EVALUATE (serverless service)
    price = default_price_per_hour(serving[0].device)
    running = set(cluster.workers().values())
    machine_pool = {m: p for p in serving for m in p.machine_names()}
    groups, configs, assignment = {}, {}, {}
    for machine in plan.workers:
        spares = [m for m in machine_pool[machine].machine_names() if m not in plan.workers]
        # a pool without a worker per machine runs one worker, named after the pool
        members = [m if m in running else machine_pool[m].name for m in [machine, *spares]]
        groups[machine] = list(dict.fromkeys(members))
        # a replica holds its adapters in host memory from the start (S-LoRA's host tier): their
        # fetch is part of its cold start; beyond MAX_HOST_ADAPTERS the busiest are preloaded
        rate = {x.name: x.requests_per_s for x in loads}
        hot = sorted(plan.adapters_on(machine), key=lambda a: -rate[a])[:MAX_HOST_ADAPTERS]
        configs[machine] = ReplicaConfig(db_url, store_url, price, weight_format=formats[machine_pool[machine].name],
                                         lora_slots=16, lora_rank=RANK, lora_targets=TARGETS,
                                         max_host_adapters=MAX_HOST_ADAPTERS, preload=tuple(hot))
        assignment.update({a: machine for a in plan.adapters_on(machine)})
    # a replica is full when its continuous batch is (the engine runs up to 64 sequences)
    # on the embedded cluster, machines without a replica are given back and started on demand
    scaler = Autoscaler(cluster, groups, assignment, configs, idle_s=shape["idle_s"], max_in_flight=64)
    try:
        # always on: every planned worker's replica is up before the trace, none scales to zero;
        # the machines the plan does not use are given back (a scale-out starts one again)
        scaler.pinned = True
        for group in groups:
            scaler.warm(group)
        scaler.release_idle_machines()
        service = replay_service(scaler, trace, keys, strategy="lmaas")
        paid = {"lmaas": _machine_seconds_with_quiet(scaler, service, shape["quiet_s"])}
        served_accuracy = _served_accuracy(scaler, keys, trained, seed)
        replica, _ = scaler.acquire(models[0])
        try:
            isolation = _probe_isolation(replica.url, keys, models)
        finally:
            scaler.release(replica)
        # serverless: the replicas scale to zero when idle; the same trace then starts from zero
        scaler.pinned = False
        scaled_to_zero = scaler.wait_for_zero(shape["idle_s"] + 60)
        serverless = replay_service(scaler, trace, keys, strategy="lmaas_serverless")
        paid["lmaas_serverless"] = _machine_seconds_with_quiet(scaler, serverless, shape["quiet_s"])
    finally:
        replicas = scaler.close()
    events = list(scaler.events)
    for result in (service, serverless):
        logger.info("%s: %.1f tokens/s, p99 %.2f s, %d cold starts", result.strategy, result.summary()["tokens_per_s"],
                    result.summary()["latency_p99_s"], result.stats["cold_starts"])
    with on_pool(serving[0]):
        baselines = replay_baselines.submit(trace, db_url, store_url, strategies, serving[0].name).result()

    # RE-PLAN on a shifted mix: popularity reversed (Zipf over the adapters in reverse order), and
    # a surge to half a worker beyond what the plan's workers take within the latency objective (1.5×
    # one worker's when the plan has one), so the plan must grow, or say that the spec cannot hold it
    target = (len(plan.workers) + 0.5) * plan.inputs["max_utilisation"] * min(w.tokens_per_s for w in workers)
    surge_loads = zipf_loads(list(reversed(models)), target, sum(shape["max_tokens"]) / 2, sizes)
    replan = _replan(plan, surge_loads, workers)

    # REPORT
    rows = [service.summary(), serverless.summary()] + [baselines[s]["summary"] for s in strategies]
    columns = ["strategy", "requests", "completion_tokens", "makespan_s", "tokens_per_s", "latency_p50_s",
               "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "tpot_median_s"]
    table = pd.DataFrame(rows)[columns]
    table.to_csv(out / "strategies.csv", index=False)
    served = {"lmaas": [asdict(s) for s in service.served], "lmaas_serverless": [asdict(s) for s in serverless.served],
              **{s: baselines[s]["served"] for s in strategies}}
    slo = _slo_table(served, tenants)
    slo.to_csv(out / "slo.csv", index=False)
    usage = {t: registry.usage(info)["total"] for t, info in tenants.items()}
    (out / "records.json").write_text(json.dumps({"served": served, "events": events, "replicas": replicas,
                                                  "training": trained, "usage": usage}, indent=1, default=str))
    validate(table, "lmaas.evaluation", "evaluate stage")
    plots = _plot(table, trained, events, out)
    by = table.set_index("strategy")
    mine = by.loc["lmaas"]
    cold = [r for r in replicas if "base_load_s" in r]
    attainment = slo.groupby("strategy").apply(lambda g: float((g.slo_attainment * g.requests).sum() / g.requests.sum()),
                                               include_groups=False).to_dict()
    metered_tokens = sum(u["completion_tokens"] for u in usage.values())
    metered_cost = sum(u["cost_usd"] for u in usage.values())
    summary = {
        "system": "lmaas", "run_id": run_id,
        "workload": f"{len(models)} adapters ({len(trained)} fine-tuned) of {len(tenants)} tenants, "
                    f"{len(trace)} requests at {shape['rate']:g}/s (Zipf, bursty)",
        "key_figure": "tokens_per_s", "higher_is_better": True, "value": round(float(mine.tokens_per_s), 2),
        "baselines": {s: round(float(by.loc[s, "tokens_per_s"]), 2) for s in strategies},
        "speedup": {s: round(float(mine.tokens_per_s / by.loc[s, "tokens_per_s"]), 3) for s in strategies},
        "latency_p99_s": {s: round(float(by.loc[s, "latency_p99_s"]), 3) for s in by.index},
        "slo_attainment": {s: round(v, 3) for s, v in attainment.items()},
        "fine_tuning": {r["task"]: {"heldout_loss": [round(r["heldout_loss_before"], 3), round(r["heldout_loss_after"], 3)],
                                    "accuracy_base": r["accuracy_base"], "accuracy_adapter": r["accuracy_adapter"],
                                    "served_accuracy": served_accuracy[r["task"]], "seconds": round(r["seconds"], 1)}
                        for r in trained},
        "placement": {"workers": plan.workers, "usd_per_hour": plan.usd_per_hour, "optimal": plan.optimal,
                      "solve_seconds": round(plan.solve_seconds, 3)},
        "serving_format": {pool: {"chosen": fmt, **{f: round(capacity(p, tightest_tpot), 1)
                                                     for f, p in profiled[pool].items()}}
                           for pool, fmt in formats.items()},
        "serverless": {"scaled_to_zero_between_runs": scaled_to_zero,
                       "cold_starts": serverless.stats["cold_starts"], "scale_outs": serverless.stats["scale_outs"],
                       "scale_ins": sum(e["event"] == "stop" and e["reason"].startswith("idle") for e in events),
                       "cold_start_s_max": round(serverless.stats["cold_start_s_max"], 2),
                       "machine_start_s": [e["machine_start_s"] for e in events if e["event"] == "machine up"],
                       "machines_released": sum(e["event"] == "machine released" for e in events),
                       "machine_seconds": {r.strategy: round(r.stats["machine_seconds"], 1) for r in (service, serverless)},
                       # the replay and a lull of quiet_s after it, at the serving machines' catalog price
                       "quiet_s": shape["quiet_s"],
                       "machine_seconds_with_quiet": {k: round(v, 1) for k, v in paid.items()},
                       "usd_per_million_tokens_with_quiet": {
                           k: round(float(v * price / 3600 / (by.loc[k, "completion_tokens"] / 1e6)), 4)
                           for k, v in paid.items()},
                       "latency_p99_s_vs_always_on": round(float(by.loc["lmaas_serverless", "latency_p99_s"]
                                                                 / by.loc["lmaas", "latency_p99_s"]), 3),
                       "base_load_s": [round(r["base_load_s"], 2) for r in cold],
                       "adapter_fetch_s": [round(r["adapter_fetch_s"], 3) for r in cold]},
        "isolation": isolation,
        "metered": {"completion_tokens": metered_tokens, "cost_usd": round(metered_cost, 6),
                    "usd_per_million_tokens": round(metered_cost / metered_tokens * 1e6, 4) if metered_tokens else None},
        "replan": {k: v for k, v in replan.items() if k != "plan"},
        "results": str(out), "simulated": SIMULATED,
    }
    markdown = _report(summary, table, slo, plots)
    (out / "report.md").write_text(markdown)
    create_table_artifact(table.round(4).to_dict("records"), key="lmaas-strategies", description="strategies side by side")
    create_markdown_artifact(markdown, key="lmaas-report", description="LMaaS report")
    document = {"summary": summary, "strategies": table.to_dict("records"), "slo": slo.to_dict("records"),
                "profiles": profiled, "plan": _plan_dict(plan), "replan": replan, "events": events}
    (out / "evaluation.json").write_text(json.dumps(document, indent=2, default=str))
    return summary


def _report(summary: dict, table: pd.DataFrame, slo: pd.DataFrame, plots: list[str]) -> str:
    lines = [f"# LMaaS — {summary['workload']}", "", table.round(3).to_markdown(index=False), "",
             "## Fine-tuned adapters (held-out examples)", "",
             "| task | loss before → after | base accuracy | adapter accuracy | through the service (adapter / base) |",
             "|---|---|---|---|---|"]
    for task_name, f in summary["fine_tuning"].items():
        lines.append(f"| {task_name} | {f['heldout_loss'][0]} → {f['heldout_loss'][1]} | {f['accuracy_base']:.2f} | "
                     f"{f['accuracy_adapter']:.2f} | {f['served_accuracy']['adapter']:.2f} / {f['served_accuracy']['base']:.2f} |")
    lines += ["", "## SLO attainment per tenant", "", slo.round(3).to_markdown(index=False), "",
              f"Placement: {summary['placement']}", "", f"Serverless: {summary['serverless']}", "",
              f"Isolation probe (HTTP status): {summary['isolation']}", "", f"Re-plan on a shifted mix: {summary['replan']}",
              "", *[f"![{p}]({p})" for p in plots], "", "Simulated / what this host stands in for:",
              *[f"- {s}" for s in summary["simulated"]]]
    return "\n".join(lines) + "\n"


@flow(name="lmaas", log_prints=True)
def lmaas(
    infra: str = str(DEFAULT_INFRA),
    scale: str = "small",
    strategies: list[str] | None = None,
    store: str | None = None,
    db: str | None = None,
    scheduler: str | None = None,
    results_dir: str = "results",
    run_id: str | None = None,
    seed: int = 0,
) -> dict:
    """Fine-tune, register, profile, place, deploy serverless and replay a multi-tenant trace.

    Parameters
    ----------
    infra: infrastructure spec (YAML): a pool named ``train`` for fine-tuning; the others serve.
    scale: tiny | small | medium | large — adapters, training steps, trace (:data:`SCALES`).
    strategies: baselines to replay beside the service (default: multi_lora, merged_sequential, unbatched).
    store: artifact store for adapters (path or s3://…; default: the run's folder).
    db: the registry's database URL (default: SQLite in the run's folder).
    scheduler: address of an existing Dask scheduler whose workers are on this host.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    strategies = list(strategies or BASELINES)
    unknown = [s for s in strategies if s not in BASELINES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; expected some of {', '.join(BASELINES)}")
    spec = load_infra_spec(infra)
    if len(spec.pools) < 2 or not any(p.name == "train" for p in spec.pools):
        raise ValueError(f"{infra}: LMaaS needs a pool named 'train' and at least one serving pool, "
                         f"got {[p.name for p in spec.pools]}")
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    started = time.perf_counter()
    with TieredCluster(spec, scheduler=scheduler) as cluster:
        stages = lmaas_stages.with_options(task_runner=DaskTaskRunner(address=cluster.address))
        summary = stages(cluster, infra, scale, strategies, store, db, results_dir, run_id, seed)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    return summary


@flow(name="lmaas-replan", log_prints=True)
def lmaas_replan(plan_path: str | None = None, window_s: float = 3600.0) -> dict:
    """Re-plan the adapter placement from the registry's metered usage of the last ``window_s``
    seconds, when the current plan (written by ``lmaas``) no longer holds for that load mix."""
    from tasks.lmaas.profile import adapter_loads, worker_options
    from tasks.lmaas.registry import Registry
    from tasks.lm.weights import load_config

    logger = get_run_logger()
    path = Path(plan_path) if plan_path else tierflow_home() / "lmaas" / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no LMaaS plan to re-plan; run `tierflow run lmaas` first")
    current = json.loads(path.read_text())
    registry = Registry(current["db"], open_store(current["store"]), load_config(None))
    counts = registry.load_since(time.time() - window_s)
    sizes = {a.model: a.n_params * 4 for a in registry.adapters()}
    if not any(m in sizes for m in counts):
        logger.info("no metered requests for adapters in the last %.0f s: the plan stands", window_s)
        return {"needed": False, "reasons": ["no load in the window"], "workers": current["workers"]}
    spec = load_infra_spec(current["infra"])
    serving = [p for p in spec.pools if p.name != "train"]
    workers = worker_options(serving, current["profiles"], current["tpot_slo_s"], load_catalog())
    plan = AdapterPlacement(current["assignment"], current["workers"], current["usd_per_hour"], current["utilisation"],
                            current["active_adapters"], current["memory_bytes"], current["solve_seconds"],
                            current["optimal"], current["inputs"])
    every = {m: counts.get(m, (0, 0)) for m in sizes}  # idle adapters keep a place too
    result = _replan(plan, adapter_loads(every, window_s, sizes), workers)
    if result["needed"] and "plan" in result:
        path.write_text(json.dumps({**current, **result["plan"]}, default=str))
        create_markdown_artifact(f"# LMaaS re-plan\n\nReasons: {result['reasons']}\n\nWorkers: {result['workers']}, "
                                 f"{result['moved_adapters']} adapters moved.\n", key="lmaas-replan")
    logger.info("re-plan needed: %s %s", result["needed"], result.get("reasons"))
    return {k: v for k, v in result.items() if k != "plan"}
