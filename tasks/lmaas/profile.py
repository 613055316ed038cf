"""What the LMaaS placement needs to know: each serving worker's measured capacity, and each
adapter's expected load.

:func:`profile_deployed` measures the capacity the placement plans with, on a replica started the
way the service runs it (a long-lived service on a Dask worker, the multi-tenant HTTP server, its
tenancy and metering; :func:`profile_machine`): it sends the replica probe traces of the workload's
own shape (its adapters, prompt and answer lengths, bursty arrivals; another seed than the trace it
plans for) over HTTP with the tenants' keys, at a ladder of loads, and judges each request against
the tightest tenant objectives (time to first token and time per output token). A worker's capacity
is the highest load at which at least ``target`` of the probe's requests met both: what the deployed
replica delivers within the objectives, its HTTP server's and Dask worker's threads, prefills and
bursts included. (Decoding batches in-process, the capacity planned with before, left all of these
out: the plan promised objectives the deployment then missed.)

:func:`profile_serving` runs on a serving worker: it loads the engine in one weight format and
decodes batches in which every sequence uses a different adapter, measuring tokens/s and the time
per output token (TPOT). The replicas run the format with the higher throughput within the TPOT
objective (:func:`choose_weight_format`); only that one is then profiled as deployed.

:func:`adapter_loads` turns a trace (or the registry's metered usage) into per-adapter arrival
rates and token loads; :func:`worker_options` turns the serving pools of an infrastructure spec and
their profiles into the MILP's workers (price from the device catalog); :func:`plan_within_objectives`
places the load on them, or says that the spec cannot hold it within the objectives.
"""

from __future__ import annotations

import time
from collections import Counter

from optimizers.lmaas import (AdapterLoad, AdapterPlacement, WorkerOption, combined_capacity, plan_adapter_placement,
                              shared_hosts)
from optimizers.solve import InfeasibleError

BASE_RESERVED_BYTES = 2 * 2**30  # base model, KV cache and runtime beside the adapters
# share of a probe's requests that must meet the objectives for its load to count as held: above
# the 90% promised to every tenant, for the noise of a short probe of bursty arrivals
PROBE_TARGET = 0.95
PROBE_FACTORS_UP = (1.0, 1.5, 2.25)  # loads tried, × the workload's, while each is held ...
PROBE_FACTORS_DOWN = (2 / 3, 4 / 9)  # ... and below it, while none is


def profile_serving(*, weight_format: str = "int4", lora_slots: int = 16, lora_rank: int = 8,
                    lora_targets: tuple[str, ...] = ("q_proj", "v_proj"), batches: tuple[int, ...] = (1, 4, 16, 32),
                    new_tokens: int = 16, prompt_tokens: int = 32) -> dict:
    """Load the serving engine and decode batches of distinct adapters; returns the measurements."""
    from tasks.lm.engine import LMEngine
    from tasks.lm.lora import random_adapter
    from tasks.lm.sampling import SamplingParams

    started = time.perf_counter()
    engine = LMEngine.load(weight_format=weight_format, kv_cache_mib=256, lora_slots=lora_slots, lora_rank=lora_rank,
                           lora_targets=tuple(lora_targets), prefix_caching=False)
    base_load_s = time.perf_counter() - started
    n_adapters = min(max(batches), lora_slots)  # larger batches reuse them: distinct up to the slots
    for i in range(n_adapters):
        engine.add_adapter(f"profile/{i}", random_adapter(engine.config, rank=lora_rank, targets=tuple(lora_targets),
                                                          seed=1000 + i, std=0.02))
    adapter = engine.adapters["profile/0"]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompt = list(range(1000, 1000 + prompt_tokens))
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm the kernels
    points = []
    for batch in batches:
        requests = [engine.submit(engine.open(prompt, f"profile/{i % n_adapters}"), params, owns_sequence=True)
                    for i in range(batch)]
        steps_before = engine.stats["steps"]
        tic = time.perf_counter()
        engine.run(requests)
        seconds = time.perf_counter() - tic
        decode_s = min(r.finished_at for r in requests) - max(r.first_token_at for r in requests)
        tpot = decode_s / max(1, new_tokens - 1)
        points.append({"batch": batch, "distinct_adapters": min(batch, n_adapters),
                       "tokens_per_s": batch * new_tokens / seconds, "tpot_s": tpot,
                       "steps": engine.stats["steps"] - steps_before})
    return {"weight_format": weight_format, "base_load_s": base_load_s, "points": points,
            "bytes_per_adapter": adapter.n_params() * 4, "lora_slots": lora_slots}


def trace_seconds(trace, rate: float) -> float:
    """The span a trace's load is spread over: to its last arrival, and one mean gap after it."""
    return max(r.at_s for r in trace) + 1.0 / rate


def planned_load(trace, rate: float) -> float:
    """A trace's load in tokens/s as the placement counts it: every request's ``max_tokens`` (the
    replays ignore end-of-sequence) over :func:`trace_seconds`."""
    return sum(r.max_tokens for r in trace) / trace_seconds(trace, rate)


def probe_load(scaler, keys: dict[str, str], trace, rate: float, factor: float, ttft_slo_s: float,
               tpot_slo_s: float) -> dict:
    """Send ``trace`` (arriving at ``rate``) to ``scaler``'s replicas compressed in time by ``factor``;
    returns what it measured: offered and delivered tokens/s, the attainment of the objectives
    (each and both), TTFT and TPOT percentiles."""
    from tasks.lmaas.registry import slo_attainment
    from tasks.lmaas.serverless import replay_service

    replay = replay_service(scaler, trace, keys, time_scale=1.0 / factor, strategy=f"probe x{factor:.2f}")
    tokens = sum(s.completion_tokens for s in replay.served)
    slo = slo_attainment([(s.ttft_s, s.latency_s, s.completion_tokens) for s in replay.served], ttft_slo_s,
                         tpot_slo_s)
    return {"factor": factor, "requests": len(replay.served),
            "offered_tokens_per_s": tokens / (trace_seconds(trace, rate) / factor),
            "tokens_per_s": replay.summary()["tokens_per_s"], "attainment": slo["attainment"],
            "ttft_attainment": slo["ttft_attainment"], "tpot_attainment": slo["tpot_attainment"],
            "ttft_p99_s": slo["ttft_p99_s"], "tpot_p50_s": slo["tpot_p50_s"], "tpot_p99_s": slo["tpot_p99_s"]}


def profile_deployed(scaler, keys: dict[str, str], trace, rate: float, *, ttft_slo_s: float, tpot_slo_s: float,
                     target: float = PROBE_TARGET, factors_up: tuple[float, ...] = PROBE_FACTORS_UP,
                     factors_down: tuple[float, ...] = PROBE_FACTORS_DOWN, load_tokens_per_s: float | None = None,
                     probe=probe_load, **facts) -> dict:
    """The capacity of a deployed replica (``scaler``'s, ready): ``trace`` — the workload's shape,
    arriving at ``rate`` — is sent at ``factors_up`` × the workload's load while each load is held
    (at least ``target`` of its requests within ``ttft_slo_s`` and ``tpot_slo_s``), or at
    ``factors_down`` while none is. The workload's load is ``load_tokens_per_s`` (the trace the
    plan is for: the probe, another draw of its shape, is compressed or stretched in time to offer
    exactly that at 1×) or the probe's own. The capacity is the highest load held (tokens/s; 0 if
    none was: the objectives are out of reach at these loads). ``probe`` measures one load
    (:func:`probe_load`); ``facts`` (weight format, LoRA slots, …) go into the profile."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    started = time.perf_counter()
    points, held = [], []
    # the probe's time compression that offers the workload's load (1 where the probe's own is it)
    unit = load_tokens_per_s / planned_load(trace, rate) if load_tokens_per_s and trace else 1.0

    def measure(factor: float) -> bool:
        point = probe(scaler, keys, trace, rate, factor * unit, ttft_slo_s, tpot_slo_s)
        point.update(factor=factor, compression=factor * unit)
        point["held"] = point["attainment"] >= target
        points.append(point)
        if point["held"]:
            held.append(point["offered_tokens_per_s"])
        return point["held"]

    for factor in factors_up:
        if not measure(factor):
            break
    if not held:
        for factor in factors_down:
            if measure(factor):
                break
    return {"kind": "deployed", "objectives": {"ttft_s": ttft_slo_s, "tpot_s": tpot_slo_s}, "target_attainment": target,
            "load_tokens_per_s": load_tokens_per_s, "points": points, "capacity_tokens_per_s": max(held, default=0.0),
            "seconds": time.perf_counter() - started, **facts}


def profile_machine(cluster, machine: str, config, keys: dict[str, str], trace, rate: float, *,
                    ttft_slo_s: float, tpot_slo_s: float, **options) -> dict:
    """:func:`profile_deployed` on a replica of ``config`` (a :class:`ReplicaConfig`) started on
    ``cluster``'s worker ``machine`` the way the service starts one (an
    :class:`~tasks.lmaas.serverless.Autoscaler`, as many requests in flight as the service's); the
    replica is stopped afterwards, and its cold start is kept in the profile (``replica``)."""
    from tasks.lmaas.serverless import SERVICE_MAX_IN_FLIGHT, Autoscaler

    scaler = Autoscaler(cluster, {"profile": [machine]}, {}, {"profile": config}, release_machines=False,
                        max_in_flight=SERVICE_MAX_IN_FLIGHT)
    scaler.pinned = True  # no scale to zero between probes
    try:
        scaler.warm("profile")
        profile = profile_deployed(scaler, keys, trace, rate, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
                                   weight_format=config.weight_format, lora_slots=config.lora_slots, **options)
    finally:
        records = scaler.close()
    record = next((r for r in records if "base_load_s" in r), {})
    profile["replica"] = {k: record.get(k) for k in ("worker", "base_load_s", "adapter_fetch_s", "ready_s")}
    return profile


def choose_weight_format(profiles: dict[str, dict], tpot_slo_s: float) -> str:
    """The weight format (a key of ``profiles``, one :func:`profile_serving` each) with the highest
    :func:`capacity` at ``tpot_slo_s``: which is faster depends on the host (on AMX, bf16 GEMMs
    overtake the int4 kernel at a few rows) and on the batch the objective allows."""
    if not profiles:
        raise ValueError("no weight format was profiled")
    return max(profiles, key=lambda fmt: capacity(profiles[fmt], tpot_slo_s))


def capacity(profile: dict, tpot_slo_s: float) -> float:
    """A profile's tokens/s within the TPOT objective ``tpot_slo_s``.

    Deployed (:func:`profile_deployed`): the highest load held, measured at the profile's own
    objectives (a tighter ``tpot_slo_s`` than those needs a new profile). In-process batches
    (:func:`profile_serving`): the best batch size's throughput whose TPOT meets ``tpot_slo_s``
    (the smallest batch's if none does: the objective is then out of reach at any load)."""
    if profile.get("kind") == "deployed":
        measured_at = profile["objectives"]["tpot_s"]
        if tpot_slo_s < measured_at - 1e-9:
            raise ValueError(f"the profile was measured at TPOT ≤ {measured_at:g} s; a {tpot_slo_s:g} s objective "
                             "needs the replica profiled again")
        return profile["capacity_tokens_per_s"]
    meeting = [p["tokens_per_s"] for p in profile["points"] if p["tpot_s"] <= tpot_slo_s]
    return max(meeting) if meeting else min(p["tokens_per_s"] for p in profile["points"])


def adapter_loads(counts: dict[str, tuple[int, int]], seconds: float, size_bytes: dict[str, int]) -> list[AdapterLoad]:
    """Per adapter: ``counts`` (requests, completion tokens) over ``seconds`` → rates for the MILP."""
    if seconds <= 0:
        raise ValueError(f"the load window must be positive, got {seconds} s")
    return [AdapterLoad(model, tokens / seconds, requests / seconds, size_bytes[model])
            for model, (requests, tokens) in sorted(counts.items())]


def zipf_loads(models: list[str], tokens_per_s: float, tokens_per_request: float, size_bytes: dict[str, int],
               zipf_s: float = 1.0) -> list[AdapterLoad]:
    """A load mix of ``tokens_per_s`` in all, spread over ``models`` (most popular first) by Zipf's
    law, each request ``tokens_per_request`` tokens: a what-if for re-planning."""
    from tasks.lmaas.trace import zipf_weights

    if tokens_per_s < 0 or tokens_per_request <= 0:
        raise ValueError(f"tokens_per_s must be ≥ 0 and tokens_per_request > 0 (got {tokens_per_s}, {tokens_per_request})")
    return [AdapterLoad(m, tokens_per_s * w, tokens_per_s * w / tokens_per_request, size_bytes[m])
            for m, w in zip(models, zipf_weights(len(models), zipf_s))]


def trace_counts(trace) -> dict[str, tuple[int, int]]:
    requests, tokens = Counter(), Counter()
    for r in trace:
        requests[r.model] += 1
        tokens[r.model] += r.max_tokens
    return {m: (requests[m], tokens[m]) for m in requests}


def worker_options(pools, profiles: dict[str, dict], tpot_slo_s: float, catalog,
                   hosts: dict[str, str | None] | None = None) -> list[WorkerOption]:
    """One option per machine of each serving pool, with its pool's profiled capacity, its device's
    catalog price and memory, and the host it runs on (``hosts``: machine → host; machines on one
    host share its cores, so the placement counts their capacity once)."""
    options = []
    for pool in pools:
        device = catalog.device(pool.device)
        profile = profiles[pool.name]
        memory = max(0, int(device.memory_gib * 2**30) - BASE_RESERVED_BYTES)
        for machine in pool.machine_names():
            options.append(WorkerOption(machine, pool.device, device.usd_per_hour, capacity(profile, tpot_slo_s),
                                        memory, profile["lora_slots"], (hosts or {}).get(machine)))
    return options


class CapacityError(ValueError):
    """The load needs more serving capacity within the objectives than the spec has."""


def plan_within_objectives(loads: list[AdapterLoad], workers: list[WorkerOption], *, ttft_slo_s: float,
                           tpot_slo_s: float) -> AdapterPlacement:
    """The placement for ``loads`` on ``workers`` whose capacities were measured as deployed
    (:func:`profile_deployed`): they already hold the objectives at that load, so the plan may load
    a worker up to all of its capacity. Raises :class:`CapacityError` when the spec's workers cannot
    hold the load within the objectives (the plan would promise what no deployment keeps); workers
    on one host count once (they share its cores)."""
    try:
        return plan_adapter_placement(loads, workers, max_utilisation=1.0)
    except InfeasibleError as exc:
        load, have = sum(a.tokens_per_s for a in loads), combined_capacity(workers)
        shared = sum(len(members) for members in shared_hosts(workers).values())
        sharing = f" ({shared} of them share one host's cores and count once)" if shared else ""
        raise CapacityError(
            f"the load of {load:.1f} tokens/s needs more than the spec's {len(workers)} serving machine(s){sharing}, which hold "
            f"{have:.1f} tokens/s together within TTFT ≤ {ttft_slo_s:g} s and TPOT ≤ {tpot_slo_s:g} s (measured as "
            f"deployed): lower the rate or add machines; nothing was deployed ({exc})") from None
