"""What the LMaaS placement needs to know: each serving worker's measured capacity, and each
adapter's expected load.

:func:`profile_serving` runs on a serving worker: it loads the engine the replicas run (timing
the base model's load, the largest part of a cold start) and decodes batches in which every
sequence uses a different adapter, at several batch sizes, measuring tokens/s and the time per
output token (TPOT). A worker's capacity for the placement is the best throughput among batch
sizes whose TPOT meets the tightest tenant objective. Each weight format is profiled, and the
replicas run the one with the higher capacity (:func:`choose_weight_format`).

:func:`adapter_loads` turns a trace (or the registry's metered usage) into per-adapter arrival
rates and token loads; :func:`worker_options` turns the serving pools of an infrastructure spec and
their profiles into the MILP's workers (price from the device catalog).
"""

from __future__ import annotations

import time
from collections import Counter

from optimizers.lmaas import AdapterLoad, WorkerOption

BASE_RESERVED_BYTES = 2 * 2**30  # base model, KV cache and runtime beside the adapters


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


def choose_weight_format(profiles: dict[str, dict], tpot_slo_s: float) -> str:
    """The weight format (a key of ``profiles``, one :func:`profile_serving` each) with the highest
    :func:`capacity` at ``tpot_slo_s``: which is faster depends on the host (on AMX, bf16 GEMMs
    overtake the int4 kernel at a few rows) and on the batch the objective allows."""
    if not profiles:
        raise ValueError("no weight format was profiled")
    return max(profiles, key=lambda fmt: capacity(profiles[fmt], tpot_slo_s))


def capacity(profile: dict, tpot_slo_s: float) -> float:
    """Tokens/s at the best batch size whose time per output token meets ``tpot_slo_s`` (the
    smallest batch's throughput if none does: the objective is then out of reach at any load)."""
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


def worker_options(pools, profiles: dict[str, dict], tpot_slo_s: float, catalog) -> list[WorkerOption]:
    """One option per machine of each serving pool, with its pool's profiled capacity and its
    device's catalog price and memory."""
    options = []
    for pool in pools:
        device = catalog.device(pool.device)
        profile = profiles[pool.name]
        memory = max(0, int(device.memory_gib * 2**30) - BASE_RESERVED_BYTES)
        for machine in pool.machine_names():
            options.append(WorkerOption(machine, pool.device, device.usd_per_hour, capacity(profile, tpot_slo_s),
                                        memory, profile["lora_slots"]))
    return options
