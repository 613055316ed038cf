"""LMaaS serving strategies side by side on one multi-tenant trace, with 10, 100 and 1,000 adapters.

    .venv/bin/python -m benchmarks.lmaas [--quick] [--adapters 10,100,1000] [--requests 100]
                                         [--rates 6,30] [--out results/benchmarks/lmaas]

For each adapter count and arrival rate, one trace (Zipf popularity over the adapters, bursty
two-state arrivals, prompts cut from the shipped corpus) is replayed in real time on this host against:

* ``multi_lora``: LMaaS — every request joins the running batch whatever its adapter;
* ``merged_sequential``: a plain single-model server merging one adapter at a time;
* ``unbatched``: one request at a time.

The first rate is an interactive load (latency is what differs); the second saturates every
strategy (throughput is then each one's capacity). All three run the base model in bf16 (merging
needs dense weights), so the comparison is about batching across adapters; ``multi_lora_int4`` is
the service's own format, for reference. Adapters are rank-8 LoRA on q_proj and v_proj (PEFT's
default targets), randomly initialised: serving cost does not depend on what they learned.

Also measured: cold start (loading the base model into a fresh engine; fetching an adapter from
the artifact store and loading it into a slot; the first request's time to first token after
both), and COGS ($ per million generated tokens) at this worker's catalog price.

COGS on GPU kinds is *simulated* (tasks/lmaas/simulate.py): each strategy's scheduler replayed in
virtual time with step times from the catalog (a roofline with stated efficiencies and kernel
floors) and the engine's host side measured here. The simulator is first checked on this host:
fitted on the engine's own step log of the first adapter count, it predicts every measured replay,
and the prediction errors are in the JSON.

Writes ``<out>/lmaas.json`` and ``<out>/lmaas.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from infra.catalog import load_catalog  # noqa: E402
from infra.store import LocalStore  # noqa: E402
from tasks.lm.engine import LMEngine  # noqa: E402
from tasks.lm.lora import random_adapter, save_adapter  # noqa: E402
from tasks.lm.sampling import SamplingParams  # noqa: E402
from tasks.lmaas.registry import Registry  # noqa: E402
from tasks.lmaas.service import HOST_DEVICE  # noqa: E402
from tasks.lmaas.simulate import (COMPUTE_EFFICIENCY, KERNEL_FLOOR_S, MEMORY_EFFICIENCY, FittedStepCost,  # noqa: E402
                                  GpuStepCost, HostSide, measure_host_side, simulate)
from tasks.lmaas.strategies import STRATEGIES, replay  # noqa: E402
from tasks.lmaas.trace import make_trace  # noqa: E402
from tasks.moe.corpus import load_corpus  # noqa: E402

DEFAULT_OUT = "results/benchmarks/lmaas"
TARGETS = ("q_proj", "v_proj")
RANK = 8
SIMULATED_GPUS = ("t4", "a10g", "l40s", "a100", "h100")
RUNS = (("multi_lora", "bf16"), ("merged_sequential", "bf16"), ("unbatched", "bf16"), ("multi_lora", "int4"))
console = Console(stderr=True)


def adapter_names(n: int) -> list[str]:
    """``n`` adapters over ``n // 5 + 1`` tenants: model names ``t<k>/a<i>``."""
    return [f"t{i % (n // 5 + 1)}/a{i}" for i in range(n)]


def make_adapters(config, n: int) -> dict:
    return {name: random_adapter(config, rank=RANK, targets=TARGETS, seed=i, std=0.02)
            for i, name in enumerate(adapter_names(n))}


def engine_for(weight_format: str, slots: int) -> LMEngine:
    return LMEngine.load(weight_format=weight_format, kv_cache_mib=512, lora_slots=slots, lora_rank=RANK,
                         lora_targets=TARGETS, max_host_adapters=2048)


def bench_strategies(engines: dict, adapter_counts: list[int], rates: list[float], n_requests: int, seed: int,
                     max_tokens: tuple[int, int] = (16, 48)) -> tuple[dict, dict, dict]:
    """Every strategy on one trace per (adapter count, rate). Returns the summaries, the traces and
    each bf16 replay's step log, swaps and slot loads (for the simulator's check)."""
    corpus = engines["bf16"].tokenizer.encode(load_corpus()[:200_000])
    results, traces, logs = {}, {}, {}
    for n in adapter_counts:
        adapters = make_adapters(engines["bf16"].config, n)
        results[str(n)] = {}
        for rate in rates:
            trace = make_trace(list(adapters), corpus, n_requests=n_requests, rate=rate, seed=seed + n,
                               max_tokens=max_tokens)
            traces[n, rate] = trace
            row = {"adapters": n, "rate": rate, "distinct_adapters_in_trace": len({r.model for r in trace}),
                   "requests": n_requests}
            for strategy, fmt in RUNS:
                engine = engines[fmt]
                engine.cache.clear_prefix_cache()
                engine.step_log, loads_before = [], (engine.stats["adapter_loads"], engine.stats["adapter_load_s"])
                result = replay(strategy, engine, adapters, trace)
                name = strategy if fmt == "bf16" else f"{strategy}_int4"
                row[name] = result.summary()
                if fmt == "bf16":
                    logs[n, rate, strategy] = {"steps": engine.step_log, "swaps": result.swaps, "swap_s": result.swap_s,
                                               "slot_loads": engine.stats["adapter_loads"] - loads_before[0],
                                               "slot_load_s": engine.stats["adapter_load_s"] - loads_before[1]}
                engine.step_log = None
                for adapter in list(engine.adapters):  # the next trace starts with no adapter resident
                    engine.remove_adapter(adapter)
                console.print(f"{n} adapters at {rate:g}/s, {name}: {row[name]['tokens_per_s']:.1f} tok/s, "
                              f"p50 {row[name]['latency_p50_s']:.2f} s, p99 {row[name]['latency_p99_s']:.2f} s"
                              + (f", {result.swaps} swaps ({result.swap_s:.1f} s)" if result.swaps else ""))
            ours = row["multi_lora"]["tokens_per_s"]
            row["throughput_ratio"] = {b: ours / row[b]["tokens_per_s"] for b in ("merged_sequential", "unbatched")}
            row["p99_ratio"] = {b: row[b]["latency_p99_s"] / row["multi_lora"]["latency_p99_s"]
                                for b in ("merged_sequential", "unbatched")}
            results[str(n)][f"{rate:g}"] = row
    return results, traces, logs


def check_simulator(results: dict, traces: dict, logs: dict, lora_slots: int) -> dict:
    """Fit the step cost on the first adapter count's bf16 replays, then predict every bf16 replay
    with the mirrored schedulers; returns the fit and each prediction beside its measurement."""
    first = min(n for n, _, _ in logs)
    fit_logs = [log for (n, _, _), log in logs.items() if n == first]
    swaps = sum(log["swaps"] for log in fit_logs)
    loads = sum(log["slot_loads"] for log in fit_logs)
    cost = FittedStepCost.fit([s for log in fit_logs for s in log["steps"]],
                              swap_s=sum(log["swap_s"] for log in fit_logs) / max(1, swaps),
                              slot_load_s=sum(log["slot_load_s"] for log in fit_logs) / max(1, loads))
    checks = []
    for (n, rate), trace in traces.items():
        for strategy in STRATEGIES:
            predicted = simulate(strategy, trace, cost, lora_slots=lora_slots).summary()
            measured = results[str(n)][f"{rate:g}"][strategy]
            checks.append({"adapters": n, "rate": rate, "strategy": strategy, "fitted_on": n == first,
                           "measured_tokens_per_s": measured["tokens_per_s"],
                           "simulated_tokens_per_s": predicted["tokens_per_s"],
                           "tokens_per_s_error": predicted["tokens_per_s"] / measured["tokens_per_s"] - 1,
                           "measured_p99_s": measured["latency_p99_s"], "simulated_p99_s": predicted["latency_p99_s"],
                           "p99_error": predicted["latency_p99_s"] / measured["latency_p99_s"] - 1})
    held_out = [c for c in checks if not c["fitted_on"]] or checks
    return {"fit": cost.describe(), "checks": checks,
            "held_out_mean_abs_tokens_per_s_error": sum(abs(c["tokens_per_s_error"]) for c in held_out) / len(held_out),
            "held_out_mean_abs_p99_error": sum(abs(c["p99_error"]) for c in held_out) / len(held_out)}


def bench_cold_start(tmp: Path) -> dict:
    """A fresh engine (base model) and a cold adapter (artifact store → host → slot), then one request."""
    started = time.perf_counter()
    engine = engine_for("int4", 4)
    base_s = time.perf_counter() - started
    registry = Registry(f"sqlite:///{tmp / 'cold.db'}", LocalStore(tmp / "store"), engine.config)
    registry.add_tenant("acme")
    info = registry.register_adapter("acme", "bot", save_adapter(random_adapter(engine.config, RANK, TARGETS, seed=7),
                                                                 tmp / "bot"))
    started = time.perf_counter()
    adapter = registry.fetch_adapter(info)
    fetch_s = time.perf_counter() - started
    engine.add_adapter(info.model, adapter)
    started = time.perf_counter()
    request = engine.submit(engine.open("Hello, who are you?", info.model), SamplingParams(temperature=0, max_tokens=1),
                            owns_sequence=True)
    engine.run([request])
    first_s = time.perf_counter() - started
    warm = engine.submit(engine.open("Hello, who are you?", info.model), SamplingParams(temperature=0, max_tokens=1),
                         owns_sequence=True)
    started = time.perf_counter()
    engine.run([warm])
    warm_s = time.perf_counter() - started
    return {"base_model_load_s": base_s, "adapter_fetch_from_store_s": fetch_s,
            "first_request_with_slot_load_s": first_s, "slot_load_s": engine.stats["adapter_load_s"],
            "warm_request_s": warm_s, "cold_start_total_s": base_s + fetch_s + first_s}


def cogs_on_this_host(results: dict, rate: str) -> dict:
    """$ per million generated tokens at the catalog price of this host's kind, at ``rate`` (the
    saturating one: each strategy's capacity), for every adapter count."""
    host = load_catalog().device(HOST_DEVICE)
    return {"host_device": HOST_DEVICE, "usd_per_hour": host.usd_per_hour, "rate": float(rate),
            "usd_per_million_tokens": {n: {name: host.usd_per_hour / 3600 / rows[rate][name]["tokens_per_s"] * 1e6
                                           for name in ("multi_lora", "merged_sequential", "unbatched", "multi_lora_int4")}
                                       for n, rows in results.items()}}


def cogs_on_gpus(config, host: HostSide, adapter_counts: list[int], corpus: list[int], n_requests: int,
                 seed: int, lora_slots: int, max_tokens: tuple[int, int]) -> dict:
    """Simulated: each strategy's capacity and $ per million tokens on each GPU kind of the catalog,
    on a trace that saturates them all (``n_requests`` arriving within a few seconds), with the
    host side measured here ("eager") and without it (a bound for CUDA-graph decoding)."""
    catalog = load_catalog()
    out = {}
    idle = HostSide(0.0, 0.0, 0.0, 0.0)
    for n in adapter_counts:
        trace = make_trace(adapter_names(n), corpus, n_requests=n_requests, rate=n_requests / 2.0, seed=seed + n,
                           max_tokens=max_tokens)
        for device in SIMULATED_GPUS:
            kind = catalog.device(device)
            for mode, side in (("eager", host), ("device_only", idle)):
                cost = GpuStepCost(kind, config, RANK, TARGETS, side)
                for strategy in STRATEGIES:
                    summary = simulate(strategy, trace, cost, lora_slots=lora_slots).summary()
                    out.setdefault(str(n), {}).setdefault(device, {}).setdefault(mode, {})[strategy] = {
                        "tokens_per_s": summary["tokens_per_s"], "usd_per_hour": kind.usd_per_hour,
                        "usd_per_million_tokens": kind.usd_per_hour / 3600 / summary["tokens_per_s"] * 1e6,
                        "swaps": summary["swaps"]}
    return out


def plot(result: dict, path: Path) -> None:
    rows = result["strategies"]
    counts = sorted(rows, key=int)
    interactive, saturating = result["trace"]["rates"][0], result["trace"]["rates"][-1]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name in ("multi_lora", "multi_lora_int4", "merged_sequential", "unbatched"):
        xs = [int(c) for c in counts]
        axes[0].plot(xs, [rows[c][f"{saturating:g}"][name]["tokens_per_s"] for c in counts], marker="o", label=name)
        axes[1].plot(xs, [rows[c][f"{interactive:g}"][name]["latency_p99_s"] for c in counts], marker="o", label=name)
    axes[0].set(title=f"throughput at saturation ({saturating:g} req/s)", ylabel="generated tokens/s")
    axes[1].set(title=f"p99 latency at {interactive:g} req/s", ylabel="seconds")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("adapters registered")
        ax.legend(fontsize=8)
    largest = str(max(int(c) for c in result["cogs_gpu_simulated"]))
    gpus = result["cogs_gpu_simulated"][largest]
    width = 0.13
    for k, strategy in enumerate(STRATEGIES):
        for m, (mode, label) in enumerate((("eager", "this engine"), ("device_only", "device bound"))):
            axes[2].bar([i + (2 * k + m - 2.5) * width for i in range(len(gpus))],
                        [gpus[d][mode][strategy]["usd_per_million_tokens"] for d in gpus], width,
                        color=f"C{k}", alpha=1.0 if m == 0 else 0.45, hatch=None if m == 0 else "//",
                        label=f"{strategy} ({label})")
    axes[2].set_xticks(range(len(gpus)), list(gpus))
    axes[2].set(yscale="log", ylabel="$ per million tokens", title=f"SIMULATED GPU COGS at saturation, {largest} adapters")
    highest = max(gpus[d][m][s]["usd_per_million_tokens"] for d in gpus for m in ("eager", "device_only") for s in STRATEGIES)
    axes[2].set_ylim(top=highest * 60)  # room for the legend above the bars
    axes[2].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle("LMaaS on this 2-core CPU host (measured) and on catalog GPUs (simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 adapters, 8 short requests: a smoke run")
    parser.add_argument("--adapters", default="10,100,1000")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rates", default="6,30", help="mean arrivals/s outside bursts (bursts: 4×): interactive, saturating")
    parser.add_argument("--slots", type=int, default=32, help="LoRA slots of the multi-adapter engines")
    parser.add_argument("--gpu-requests", type=int, default=1000, help="requests in each simulated GPU trace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.adapters.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    n_requests, max_tokens, gpu_requests = args.requests, (16, 48), args.gpu_requests
    if args.quick:
        counts, n_requests, max_tokens, gpu_requests = [10], 8, (4, 8), 40
    engines = {"bf16": engine_for("bfloat16", args.slots), "int4": engine_for("int4", args.slots)}
    result = {"trace": {"requests": n_requests, "rates": rates, "burst_factor": 4.0, "zipf_s": 1.0,
                        "max_tokens": list(max_tokens), "prompt_tokens": [16, 96]},
              "adapter": {"rank": RANK, "targets": list(TARGETS)}}
    result["strategies"], traces, logs = bench_strategies(engines, counts, rates, n_requests, args.seed, max_tokens)
    result["simulator_check"] = check_simulator(result["strategies"], traces, logs, args.slots)
    with tempfile.TemporaryDirectory(prefix="tierflow-lmaas-bench-") as tmp:
        result["cold_start"] = bench_cold_start(Path(tmp))
    result["cogs_this_host"] = cogs_on_this_host(result["strategies"], f"{rates[-1]:g}")
    engine = engines["bf16"]
    host = measure_host_side(engine.config, engine.tokenizer, rank=RANK, targets=TARGETS)
    corpus = engine.tokenizer.encode(load_corpus()[:200_000])
    result["gpu_model"] = {"host_side_measured_here": host.__dict__, "memory_efficiency": MEMORY_EFFICIENCY,
                           "compute_efficiency": COMPUTE_EFFICIENCY, "kernel_floor_s": KERNEL_FLOOR_S,
                           "devices": {d: GpuStepCost(load_catalog().device(d), engine.config, RANK, TARGETS,
                                                      host).describe() for d in SIMULATED_GPUS}}
    result["cogs_gpu_simulated"] = cogs_on_gpus(engine.config, host, counts, corpus, gpu_requests, args.seed,
                                                args.slots, max_tokens)
    result["simulated"] = [f"GPU COGS on {', '.join(SIMULATED_GPUS)} (cogs_gpu_simulated): the strategies' schedulers "
                           "in virtual time, device step times from the catalog (roofline at "
                           f"{MEMORY_EFFICIENCY:.0%} of peak bandwidth / {COMPUTE_EFFICIENCY:.0%} of fp16 peak, "
                           f"{KERNEL_FLOOR_S * 1e6:g} µs per kernel), host side measured on this host"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lmaas.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "lmaas.png")
    _print(result, out)
    return result


def _print(result: dict, out: Path) -> None:
    table = Table(title="LMaaS strategies, this host (measured)")
    for column in ("adapters", "rate", "strategy", "tok/s", "p50 s", "p99 s", "multi_lora vs"):
        table.add_column(column)
    for n, by_rate in result["strategies"].items():
        for rate, row in by_rate.items():
            for name in ("multi_lora", "merged_sequential", "unbatched", "multi_lora_int4"):
                s = row[name]
                table.add_row(n, rate, name, f"{s['tokens_per_s']:.1f}", f"{s['latency_p50_s']:.2f}",
                              f"{s['latency_p99_s']:.2f}", f"{row['multi_lora']['tokens_per_s'] / s['tokens_per_s']:.2f}×")
    console.print(table)
    check = result["simulator_check"]
    console.print(f"simulator on held-out replays: tokens/s off by {check['held_out_mean_abs_tokens_per_s_error']:.1%}, "
                  f"p99 by {check['held_out_mean_abs_p99_error']:.1%} (mean absolute)")
    gpus = Table(title="SIMULATED: $ per million tokens at saturation (eager host side)")
    for column in ("adapters", "device", *STRATEGIES):
        gpus.add_column(column)
    for n, devices in result["cogs_gpu_simulated"].items():
        for device, modes in devices.items():
            gpus.add_row(n, device, *[f"{modes['eager'][s]['usd_per_million_tokens']:.3f}" for s in STRATEGIES])
    console.print(gpus)
    console.print(f"cold start: {json.dumps({k: round(v, 3) for k, v in result['cold_start'].items()})}")
    console.print(f"wrote {out / 'lmaas.json'} and {out / 'lmaas.png'}")


if __name__ == "__main__":
    main()
