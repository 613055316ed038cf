"""LMaaS serving strategies side by side on one multi-tenant trace, with 10, 100 and 1,000 adapters.

    .venv/bin/python -m benchmarks.lmaas [--quick] [--adapters 10,100,1000] [--requests 120] [--rate 6]
                                         [--out results/benchmarks/lmaas]

For each adapter count, one trace (Zipf popularity over the adapters, bursty two-state arrivals,
prompts cut from the shipped corpus) is replayed in real time on this host against:

* ``multi_lora``: LMaaS — every request joins the running batch whatever its adapter;
* ``merged_sequential``: a plain single-model server merging one adapter at a time;
* ``unbatched``: one request at a time.

All three run the base model in bf16 (merging needs dense weights), so the comparison is about
batching across adapters; ``multi_lora_int4`` is the service's own format, for reference.
Adapters are rank-8 LoRA on q_proj and v_proj (PEFT's default targets), randomly initialised:
serving cost does not depend on what they learned.

Also measured: cold start (loading the base model into a fresh engine; fetching an adapter from
the artifact store and loading it into a slot; the first request's time to first token after
both), and COGS ($ per million generated tokens) at this worker's catalog price. COGS on GPU types
is *simulated*: a roofline from the device catalog (weights streamed once per decode step at the
device's memory bandwidth, or its fp16 peak, whichever binds), marked as such in the JSON.

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
from tasks.lmaas.strategies import replay  # noqa: E402
from tasks.lmaas.trace import make_trace  # noqa: E402
from tasks.moe.corpus import load_corpus  # noqa: E402

DEFAULT_OUT = "results/benchmarks/lmaas"
TARGETS = ("q_proj", "v_proj")
RANK = 8
SIMULATED_GPUS = ("t4", "a40", "l40s", "a100", "h100")
console = Console(stderr=True)


def make_adapters(config, n: int) -> dict:
    """``n`` adapters over ``n // 5 + 1`` tenants (model names ``t<k>/a<i>``)."""
    return {f"t{i % (n // 5 + 1)}/a{i}": random_adapter(config, rank=RANK, targets=TARGETS, seed=i, std=0.02)
            for i in range(n)}


def engine_for(weight_format: str, slots: int) -> LMEngine:
    return LMEngine.load(weight_format=weight_format, kv_cache_mib=512, lora_slots=slots, lora_rank=RANK,
                         lora_targets=TARGETS, max_host_adapters=2048)


def bench_strategies(engines: dict, adapter_counts: list[int], n_requests: int, rate: float, seed: int,
                     max_tokens: tuple[int, int] = (16, 48)) -> dict:
    corpus = engines["bf16"].tokenizer.encode(load_corpus()[:200_000])
    results = {}
    for n in adapter_counts:
        adapters = make_adapters(engines["bf16"].config, n)
        models = list(adapters)
        trace = make_trace(models, corpus, n_requests=n_requests, rate=rate, seed=seed + n, max_tokens=max_tokens)
        row = {"adapters": n, "distinct_adapters_in_trace": len({r.model for r in trace}), "requests": n_requests}
        runs = [("multi_lora", "bf16"), ("merged_sequential", "bf16"), ("unbatched", "bf16"), ("multi_lora", "int4")]
        for strategy, fmt in runs:
            engine = engines[fmt]
            engine.cache.clear_prefix_cache()
            result = replay(strategy, engine, adapters, trace)
            name = strategy if fmt == "bf16" else f"{strategy}_int4"
            row[name] = result.summary()
            for adapter in list(engine.adapters):  # the next adapter count starts empty
                engine.remove_adapter(adapter)
            console.print(f"{n} adapters, {name}: {row[name]['tokens_per_s']:.1f} tok/s, "
                          f"p50 {row[name]['latency_p50_s']:.2f} s, p99 {row[name]['latency_p99_s']:.2f} s"
                          + (f", {result.swaps} swaps ({result.swap_s:.1f} s)" if result.swaps else ""))
        ours = row["multi_lora"]["tokens_per_s"]
        row["throughput_ratio"] = {b: ours / row[b]["tokens_per_s"] for b in ("merged_sequential", "unbatched")}
        results[str(n)] = row
    return results


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


def cogs(strategies: dict) -> dict:
    """$ per million generated tokens: measured on this host at the catalog price of its kind, and
    simulated on GPU kinds by a roofline (decode steps stream the bf16 weights once; 64 sequences)."""
    catalog = load_catalog()
    host = catalog.device(HOST_DEVICE)
    out = {"host_device": HOST_DEVICE, "usd_per_hour": host.usd_per_hour, "measured": {}, "simulated": {}}
    largest = strategies[max(strategies, key=int)]
    for name in ("multi_lora", "merged_sequential", "unbatched", "multi_lora_int4"):
        rate = largest[name]["tokens_per_s"]
        out["measured"][name] = host.usd_per_hour / 3600 / rate * 1e6
    weights_gb, flops_per_token, batch = 0.27, 2 * 135e6, 64
    for device in SIMULATED_GPUS:
        kind = catalog.device(device)
        step_s = max(weights_gb / kind.memory_gbps, batch * flops_per_token / (kind.tflops_fp16 * 1e12))
        tokens_per_s = batch / step_s
        out["simulated"][device] = {"tokens_per_s": tokens_per_s, "usd_per_hour": kind.usd_per_hour,
                                    "usd_per_million_tokens": kind.usd_per_hour / 3600 / tokens_per_s * 1e6}
    return out


def plot(result: dict, path: Path) -> None:
    rows = result["strategies"]
    counts = sorted(rows, key=int)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("multi_lora", "multi_lora_int4", "merged_sequential", "unbatched"):
        axes[0].plot([int(c) for c in counts], [rows[c][name]["tokens_per_s"] for c in counts], marker="o", label=name)
        axes[1].plot([int(c) for c in counts], [rows[c][name]["latency_p99_s"] for c in counts], marker="o", label=name)
    for ax, title, label in ((axes[0], "Throughput", "generated tokens/s"), (axes[1], "p99 latency", "seconds")):
        ax.set_xscale("log")
        ax.set_xlabel("adapters registered")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("LMaaS on one 2-core CPU worker: one Zipf, bursty trace per adapter count")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 adapters, 8 short requests: a smoke run")
    parser.add_argument("--adapters", default="10,100,1000")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=6.0, help="mean arrivals/s outside bursts (bursts: 4×)")
    parser.add_argument("--slots", type=int, default=32, help="LoRA slots of the multi-adapter engines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.adapters.split(",")]
    n_requests, max_tokens = args.requests, (16, 48)
    if args.quick:
        counts, n_requests, max_tokens = [10], 8, (4, 8)
    engines = {"bf16": engine_for("bfloat16", args.slots), "int4": engine_for("int4", args.slots)}
    result = {"simulated": [f"COGS on {', '.join(SIMULATED_GPUS)}: roofline from the device catalog"],
              "trace": {"requests": n_requests, "rate": args.rate, "burst_factor": 4.0, "zipf_s": 1.0,
                        "max_tokens": list(max_tokens), "prompt_tokens": [16, 96]},
              "adapter": {"rank": RANK, "targets": list(TARGETS)}}
    result["strategies"] = bench_strategies(engines, counts, n_requests, args.rate, args.seed, max_tokens)
    with tempfile.TemporaryDirectory(prefix="tierflow-lmaas-bench-") as tmp:
        result["cold_start"] = bench_cold_start(Path(tmp))
    result["cogs"] = cogs(result["strategies"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lmaas.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "lmaas.png")
    table = Table(title="LMaaS strategies, this host")
    for column in ("adapters", "strategy", "tok/s", "p50 s", "p99 s", "vs multi_lora"):
        table.add_column(column)
    for n, row in result["strategies"].items():
        for name in ("multi_lora", "merged_sequential", "unbatched", "multi_lora_int4"):
            s = row[name]
            ratio = row["multi_lora"]["tokens_per_s"] / s["tokens_per_s"]
            table.add_row(n, name, f"{s['tokens_per_s']:.1f}", f"{s['latency_p50_s']:.2f}", f"{s['latency_p99_s']:.2f}",
                          f"{ratio:.2f}×")
    console.print(table)
    console.print(f"cold start: {json.dumps({k: round(v, 3) for k, v in result['cold_start'].items()})}")
    console.print(f"wrote {out / 'lmaas.json'} and {out / 'lmaas.png'}")
    return result


if __name__ == "__main__":
    main()
