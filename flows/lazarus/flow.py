"""Lazarus as a Prefect flow: profile → optimize → deploy → evaluate, with real failures.

``lazarus`` checks its parameters and starts (or connects to) the tiered Dask cluster, one worker
process per training node, where a task on a killed worker is never re-run by Dask (recovering is
the survivors' job); ``lazarus_stages`` profiles the training, plans every strategy's replicas and
placement, trains each strategy under the same injected failures and compares their goodput.
"""

from __future__ import annotations

from prefect import flow

from flows.lazarus import DEFAULT_INFRA, SYSTEM, LazarusParams
from tasks.common.run import RunContext, run_flow, stages_flow
from tasks.common.summary import Summary
from tasks.lazarus.scales import SCALES
from tasks.lazarus.stages import (checkpoint_rule, evaluate, failure_schedule, for_strategy, plan_placements, profile,
                                  run_settings, train_under_failures)


@stages_flow("lazarus-stages")
def lazarus_stages(run: RunContext) -> Summary:
    params, shape = run.params, SCALES[run.scale]
    strategies = [s for s in (SYSTEM.strategy, *SYSTEM.baselines) if s in params.strategies]
    settings = run_settings(run, shape)

    profiled = profile(params.infra_spec.pools[0], settings)
    plans = plan_placements(profiled["loads"], shape["nodes"], shape["slots"], shape["f"])
    run.write_plan(plans)
    machines = sum(p.count for p in params.infra_spec.pools if p.worker_per_machine)
    schedule = failure_schedule(shape, params.spot_trace, params.time_scale, machines, profiled["step_s"])
    rule = checkpoint_rule(profiled, schedule, shape)  # the same for every strategy
    records = {policy: train_under_failures(run, policy, for_strategy(settings, policy), run.cluster, shape, schedule,
                                            rule)
               for policy in strategies}
    evaluate(run, records, profiled, plans, schedule, shape, strategies)
    return run.summary


@flow(name="lazarus", log_prints=True)
def lazarus(
    infra: str = str(DEFAULT_INFRA),
    strategies: list[str] | None = None,
    trace: str | None = None,
    time_scale: float = 0.01,
    seed: int = 0,
    checkpoint_store: str | None = None,
    scale: str = "small",
    scheduler: str | None = None,
    results_dir: str = "results",
    run_id: str | None = None,
    store: str | None = None,
) -> dict:
    """Train an MoE model elastically under injected failures; compare with the baselines.

    Parameters
    ----------
    infra, strategies, trace, time_scale, seed, checkpoint_store: see :class:`flows.lazarus.LazarusParams`.
    scale: tiny | small | medium | large — model, steps, nodes and failure rate (:data:`tasks.lazarus.scales.SCALES`).
    scheduler: address of an existing Dask scheduler whose workers are on this host.
    results_dir: where results/lazarus/<run-id>/ is written.
    run_id: name of the run folder (default: a timestamp and a short id).
    store: also publish the run's folder to this artifact store (a folder or s3://bucket/prefix).
    """
    given = {"infra": infra, "trace": trace, "time_scale": time_scale, "seed": seed, "checkpoint_store": checkpoint_store,
             **({"strategies": strategies} if strategies else {})}
    params = LazarusParams.parse(given, "lazarus flow parameters", scale)
    run = SYSTEM.open_run(params, scale=scale, scheduler=scheduler, results_dir=results_dir, run_id=run_id, store=store)
    return run_flow(run, lazarus_stages, params.infra_spec, rerun_lost_tasks=False)
