"""JellyBean's Prefect tasks: profile on the tier workers, plan, serve a request stream."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from infra.catalog import load_catalog
from infra.cluster import this_worker_name
from optimizers.jellybean import JellyBeanProblem, Plan, check_feasible_inputs, plan_milp
from optimizers.jellybean_baselines import STRATEGIES
from optimizers.solve import InfeasibleError
from tasks.common.tasks import task
from tasks.jellybean import runtime


def simulated_speedup(device: str) -> float:
    """How much faster ``device`` serves a request than this host's core (catalog roofline).

    The smaller of the peak-compute and memory-bandwidth ratios: batch-1 inference on a
    big accelerator is rarely compute-bound.
    """
    catalog = load_catalog()
    return min(catalog.speedup(runtime.HOST_DEVICE, device, "compute"), catalog.speedup(runtime.HOST_DEVICE, device, "memory"))


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="profile {pool}")
def profile_pool(pool: str, tier: str, device: str, variants: list[tuple[str, str]], repeats: int = 2) -> list[dict]:
    """Measure every (operator, variant) on this worker and scale it to the pool's device: the profile rows."""
    speedup = simulated_speedup(device)
    rows = []
    for operator, variant in variants:
        measured = runtime.measure_latency_ms(operator, variant, repeats)
        rows.append({
            "pool": pool, "tier": tier, "device": device, "operator": operator, "variant": variant,
            "measured_ms": measured, "latency_ms": measured / speedup, "simulated": device != runtime.HOST_DEVICE,
            "worker": this_worker_name(),
        })
    return rows


@task(cache_policy=NO_CACHE, task_run_name="plan {strategy}")
def plan_strategy(problem: JellyBeanProblem, strategy: str, incumbent: Plan | None = None) -> dict:
    """One strategy's plan: the MILP (whose infeasibility fails the run), or a named baseline.

    The MILP is capped by ``incumbent`` (the heuristic's plan, when it has one), so it is
    never dearer than it. Returns {"plan": Plan | None, "infeasible": why | None}: a baseline
    that cannot serve the workflow is recorded as such, not a failure.
    """
    if strategy == "milp":
        check_feasible_inputs(problem)
        return {"plan": plan_milp(problem, incumbent=incumbent), "infeasible": None}
    try:
        plan, why = STRATEGIES[strategy](problem), None
    except InfeasibleError as exc:
        plan, why = None, str(exc)
    return {"plan": plan, "infeasible": why}


@task(retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE, task_run_name="serve {operator} on {pool}")
def serve_batch(operator: str, variant: str, pool: str, request_ids: list[int],
                upstream: dict[str, list], image_variant: str = "resnet18") -> runtime.BatchResult:
    """Serve a share of the request stream on this worker; ``upstream`` holds the inputs."""
    inputs: dict[str, dict[int, object]] = {}
    for node, parts in upstream.items():
        merged: dict[int, object] = {}
        for part in parts:
            merged.update(part.outputs if isinstance(part, runtime.BatchResult) else part)
        inputs[node] = {rid: merged[rid] for rid in request_ids}
    return runtime.serve(operator, variant, pool, request_ids, inputs, image_variant)
