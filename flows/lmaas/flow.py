"""LMaaS as Prefect flows: the whole run, and the scheduled re-plan from metered usage.

``lmaas`` checks its parameters and starts (or connects to) the tiered Dask cluster; ``lmaas_stages``
fine-tunes tenants' adapters on the training pool, registers them with many more, profiles serving,
places the adapters (MILP), deploys the placement as replicas on the serving workers and replays a
multi-tenant trace through them over HTTP — always on, then serverless — against the baselines on the
same trace, and re-plans for a shifted load mix (tasks/lmaas/stages.py tells each stage).
``lmaas_replan`` (the ``hourly-adapter-replan`` deployment) re-plans the current placement from the
registry's metered usage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.lmaas import DEFAULT_INFRA, SCALES, SYSTEM, TRAINED, LMaaSParams
from infra.catalog import load_catalog
from infra.prefect_server import tierflow_home
from infra.spec import load_infra_spec
from infra.store import open_store
from optimizers.lmaas import AdapterPlacement
from tasks.common.run import RunContext, run_flow, stages_flow
from tasks.common.summary import Summary
from tasks.lmaas import report
from tasks.lmaas.stages import (Objectives, compare_weight_formats, fine_tune, keep_current_plan, make_requests, place,
                                plan_dict, profile_serving_pools, register, replan, replan_on_surge, replay_baselines_on,
                                serve_trace, split_pools)


@stages_flow("lmaas-stages")
def lmaas_stages(run: RunContext) -> Summary:
    params, shape = run.params, SCALES[run.scale]
    baselines = [s for s in SYSTEM.baselines if s in params.strategies]
    train_pool, serving = split_pools(params.infra_spec)

    comparing = compare_weight_formats(serving)  # in-process, on the serving workers, while training runs
    trained = fine_tune(run, train_pool, shape["tasks"], shape["steps"], shape["lr"])
    tenancy = register(run, trained, TRAINED, shape["random_adapters"])
    trace = make_requests(tenancy.models, shape, params.seed)
    probe = make_requests(tenancy.models, shape, params.seed + 1, shape["probe_requests"])
    objectives = Objectives.tightest(tenancy.tenants)
    profiled, profiles, formats = profile_serving_pools(run.cluster, serving, comparing, tenancy, probe, shape["rate"],
                                                        objectives, trace)
    plan, loads, workers = place(run.cluster, trace, tenancy, serving, profiles, objectives, shape["rate"])
    run.write_plan(plan_dict(plan))
    keep_current_plan(plan, tenancy, params.infra, objectives.tpot_s, profiles, {w.name: w.host for w in workers})
    service = serve_trace(run.cluster, plan, loads, serving, formats, tenancy, trace, trained, TRAINED, shape,
                          params.seed)
    replayed = replay_baselines_on(serving[0], trace, tenancy, baselines)
    replanned = replan_on_surge(plan, tenancy, workers, shape)
    report.evaluate(run, service, replayed, tenancy, trained, trace, plan, loads, profiled, profiles, formats,
                    objectives, replanned, shape, baselines)
    return run.summary


@flow(name="lmaas", log_prints=True)
def lmaas(
    infra: str = str(DEFAULT_INFRA),
    strategies: list[str] | None = None,
    db: str | None = None,
    seed: int = 0,
    adapter_store: str | None = None,
    scale: str = "small",
    scheduler: str | None = None,
    results_dir: str = "results",
    run_id: str | None = None,
    store: str | None = None,
) -> dict:
    """Fine-tune, register, profile, place, deploy serverless and replay a multi-tenant trace.

    Parameters
    ----------
    infra, strategies, db, seed, adapter_store: see :class:`flows.lmaas.LMaaSParams`.
    scale: tiny | small | medium | large — adapters, training steps, trace (:data:`flows.lmaas.SCALES`).
    scheduler: address of an existing Dask scheduler whose workers are on this host.
    results_dir: where results/lmaas/<run-id>/ is written.
    run_id: name of the run folder (default: a timestamp and a short id).
    store: also publish the run's folder to this artifact store (a folder or s3://bucket/prefix).
    """
    given = {"infra": infra, "db": db, "seed": seed, "adapter_store": adapter_store,
             **({"strategies": strategies} if strategies else {})}
    params = LMaaSParams.parse(given, "lmaas flow parameters", scale)
    run = SYSTEM.open_run(params, scale=scale, scheduler=scheduler, results_dir=results_dir, run_id=run_id, store=store)
    return run_flow(run, lmaas_stages, params.infra_spec)


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
    workers = worker_options(serving, current["profiles"], current["tpot_slo_s"], load_catalog(), current.get("hosts"))
    plan = AdapterPlacement(current["assignment"], current["workers"], current["usd_per_hour"], current["utilisation"],
                            current["active_adapters"], current["memory_bytes"], current["solve_seconds"],
                            current["optimal"], current["inputs"])
    every = {m: counts.get(m, (0, 0)) for m in sizes}  # idle adapters keep a place too
    result = replan(plan, adapter_loads(every, window_s, sizes), workers)
    if result["needed"] and "plan" in result:
        path.write_text(json.dumps({**current, **result["plan"]}, default=str))
        create_markdown_artifact(f"# LMaaS re-plan\n\nReasons: {result['reasons']}\n\nWorkers: {result['workers']}, "
                                 f"{result['moved_adapters']} adapters moved.\n", key="lmaas-replan")
    logger.info("re-plan needed: %s %s", result["needed"], result.get("reasons"))
    return {k: v for k, v in result.items() if k != "plan"}
