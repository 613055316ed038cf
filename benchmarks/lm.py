"""The LM runtime side by side with transformers, and its KV-cache features against recomputing.

    .venv/bin/python -m benchmarks.lm [--quick] [--batches 1,4,16,64] [--new-tokens 64]
                                      [--only decode,prefix,rollback,server] [--out results/benchmarks/lm]

All on this host's CPU, same process, same weights (SmolLM2-135M-Instruct from the shipped GGUF):

* **decode**: aggregate tokens/s generating ``--new-tokens`` greedy tokens for batches of
  1/4/16/64 prompts of mixed lengths (16–160 tokens, slices of data/moe-corpus.txt), for the
  runtime in its fast ``int4`` format and its exact ``float32`` format, against transformers'
  ``generate`` (float32, left-padded batch, its KV cache) on the same weights: end to end (prefill
  included) and decode only (after every sequence's first token).
* **prefix**: time to first token of N requests that share a long document prefix and differ in
  the question, submitted together, with and without the prefix cache.
* **rollback**: rolling a sequence back k tokens and taking the next token, against computing the
  kept prefix again from scratch.
* **server**: the OpenAI-compatible server under C concurrent clients on loopback (a bounded load
  generator: each client sends its requests one after another): completion tokens/s, request
  latency p50/p99 and streamed time to first token p50.

Writes ``<out>/lm.json`` and ``<out>/lm.png``. Ratios are between runs measured here in one process;
the machine is shared, so each measurement is repeated (``--repeats``) and the median kept.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tasks.lm.engine import LMEngine  # noqa: E402
from tasks.lm.sampling import SamplingParams  # noqa: E402
from tasks.lm.weights import default_model_path  # noqa: E402
from tasks.moe.corpus import load_corpus  # noqa: E402

DEFAULT_OUT = "results/benchmarks/lm"
LLAMA_CPP_REFERENCE = {"1": 64, "16": 164, "source": "../shared/facts/smollm2-on-this-cpu.md (another host of this kind)"}
console = Console(stderr=True)


def mixed_prompts(engine: LMEngine, n: int, low: int = 16, high: int = 160, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of random lengths in [low, high] tokens, cut from the shipped corpus."""
    rng = random.Random(seed)
    tokens = engine.tokenizer.encode(load_corpus()[:200_000])
    prompts = []
    for _ in range(n):
        length = rng.randint(low, high)
        start = rng.randrange(0, len(tokens) - length)
        prompts.append(tokens[start:start + length])
    return prompts


def time_ours(engine: LMEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.cache.clear_prefix_cache()
    started = time.perf_counter()
    requests = [engine.submit(engine.open(p), params, owns_sequence=True) for p in prompts]
    while not all(r.first_token_at for r in requests):
        engine.step()
    first_tokens_done = time.perf_counter()
    decoded_before = sum(r.completion_tokens for r in requests)
    engine.run(requests)
    ended = time.perf_counter()
    total = sum(r.completion_tokens for r in requests)
    return {"tokens_per_s": total / (ended - started),
            "decode_tokens_per_s": (total - decoded_before) / max(ended - first_tokens_done, 1e-9),
            "wall_s": ended - started, "tokens": total}


def time_transformers(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> dict:
    """``generate`` on the left-padded batch; its decode-only rate subtracts a run that stops at the
    first token (the prefill)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n: int) -> tuple[float, int]:
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=pad_id)
        return time.perf_counter() - started, (out.shape[1] - width) * len(prompts)

    first_s, _ = run(1)
    wall, total = run(new_tokens)
    return {"tokens_per_s": total / wall, "decode_tokens_per_s": (total - len(prompts)) / max(wall - first_s, 1e-9),
            "wall_s": wall, "tokens": total}


def load_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    folder = Path(tempfile.mkdtemp(prefix="tierflow-gguf-"))
    (folder / default_model_path().name).symlink_to(default_model_path())
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=default_model_path().name,
                                                             dtype=torch.float32).eval()


def bench_decode(engines: dict, batches: list[int], new_tokens: int, repeats: int) -> dict:
    reference = load_transformers()
    results = {}
    for batch in batches:
        prompts = mixed_prompts(engines["int4"], batch, seed=batch)
        row = {"prompt_tokens": [len(p) for p in prompts]}
        runs = {name: [] for name in [*engines, "transformers"]}
        for repeat in range(repeats):  # interleaved, so a noisy spell falls on every system
            slow_too = repeat == 0 or batch < 16  # the float32 runs take minutes at 16 and 64: once
            for name, engine in engines.items():
                if name == "int4" or slow_too:
                    runs[name].append(time_ours(engine, prompts, new_tokens))
            if slow_too:
                runs["transformers"].append(time_transformers(reference, prompts, new_tokens, pad_id=2))
        for name, measured in runs.items():
            best = sorted(measured, key=lambda m: m["tokens_per_s"])[len(measured) // 2]
            row[name] = best
        row["speedup_vs_transformers"] = row["int4"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        results[str(batch)] = row
        row["decode_speedup_vs_transformers"] = (row["int4"]["decode_tokens_per_s"]
                                                 / row["transformers"]["decode_tokens_per_s"])
        console.print(" ".join(f"{name} {row[name]['tokens_per_s']:.1f} ({row[name]['decode_tokens_per_s']:.1f} decoding)"
                               for name in runs) + f" tok/s, batch {batch}")
    return results


def bench_prefix(engine: LMEngine, n_requests: int, document_tokens: int, repeats: int) -> dict:
    document = engine.tokenizer.decode(mixed_prompts(engine, 1, document_tokens, document_tokens, seed=99)[0])
    prompts = [engine.tokenizer.render_chat([{"role": "user", "content": f"{document}\n\nQuestion {i}: what is this about?"}])
               for i in range(n_requests)]
    uncached = LMEngine(engine.model, engine.tokenizer, kv_cache_mib=512, prefix_caching=False)
    out = {"n_requests": n_requests, "prompt_tokens": len(engine.tokenizer.encode(prompts[0]))}
    for name, runner in (("prefix_cache", engine), ("no_prefix_cache", uncached)):
        ttfts, walls, prefill = [], [], []
        for _ in range(repeats):
            runner.cache.clear_prefix_cache()
            before = runner.stats["prefill_tokens"]
            started = time.perf_counter()
            results = runner.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
            walls.append(time.perf_counter() - started)
            ttfts.append(statistics.mean(r.time_to_first_token_s for r in results))
            prefill.append(runner.stats["prefill_tokens"] - before)
        out[name] = {"mean_ttft_s": statistics.median(ttfts), "all_first_tokens_s": statistics.median(walls),
                     "prefill_tokens": prefill[0]}
    out["ttft_speedup"] = out["no_prefix_cache"]["mean_ttft_s"] / out["prefix_cache"]["mean_ttft_s"]
    console.print(f"prefix: mean TTFT {out['prefix_cache']['mean_ttft_s']:.2f} s with the cache, "
                  f"{out['no_prefix_cache']['mean_ttft_s']:.2f} s without ({out['ttft_speedup']:.1f}×)")
    return out


def bench_rollback(engine: LMEngine, length: int, ks: list[int], repeats: int) -> dict:
    prompt = mixed_prompts(engine, 1, length, length, seed=7)[0]
    one = SamplingParams(temperature=0, max_tokens=1)
    uncached = LMEngine(engine.model, engine.tokenizer, kv_cache_mib=256, prefix_caching=False)
    out = {"sequence_tokens": length, "by_k": {}}
    for k in ks:
        rollback_s, recompute_s = [], []
        for _ in range(repeats):
            seq = engine.open(prompt)
            engine.run([engine.submit(seq, one)])
            started = time.perf_counter()
            engine.rollback(seq, len(seq.tokens) - k)
            engine.run([engine.submit(seq, one)])
            rollback_s.append(time.perf_counter() - started)
            engine.close(seq)
            kept = prompt[:length + 1 - k]
            started = time.perf_counter()
            uncached.generate([kept], one)
            recompute_s.append(time.perf_counter() - started)
        out["by_k"][str(k)] = {"rollback_and_next_token_s": statistics.median(rollback_s),
                               "recompute_and_next_token_s": statistics.median(recompute_s),
                               "speedup": statistics.median(recompute_s) / statistics.median(rollback_s)}
        console.print(f"rollback {k}: {out['by_k'][str(k)]['rollback_and_next_token_s'] * 1000:.1f} ms vs recompute "
                      f"{out['by_k'][str(k)]['recompute_and_next_token_s'] * 1000:.1f} ms")
    return out


def load_test(base_url: str, concurrency: int, requests_per_client: int, max_tokens: int, model: str) -> dict:
    """``concurrency`` clients on loopback, each sending ``requests_per_client`` chat requests in turn."""
    import httpx

    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
                 "What does a CPU do?", "Give me a tip for learning Python.", "Why is the sky blue?"]
    latencies, ttfts, tokens = [], [], []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=base_url, timeout=300) as http:
            for j in range(requests_per_client):
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": j % 2 == 1,
                        "messages": [{"role": "user", "content": questions[(index + j) % len(questions)]}]}
                started = time.perf_counter()
                if body["stream"]:
                    first, used = None, 0
                    with http.stream("POST", "/chat/completions", json=body) as response:
                        for line in response.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                                first = time.perf_counter() - started
                            if event.get("usage"):
                                used = event["usage"]["completion_tokens"]
                    with lock:
                        ttfts.append(first if first is not None else time.perf_counter() - started)
                else:
                    reply = http.post("/chat/completions", json=body).json()
                    used = reply["usage"]["completion_tokens"]
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens.append(used)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(latencies), "tokens_per_s": sum(tokens) / wall,
            "requests_per_s": len(latencies) / wall, "latency_p50_s": ordered[len(ordered) // 2],
            "latency_p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "stream_ttft_p50_s": statistics.median(ttfts) if ttfts else None}


def bench_server(engine: LMEngine, concurrencies: list[int], requests_per_client: int, max_tokens: int) -> dict:
    import uvicorn

    from tasks.lm.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(engine, max_queue=256), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    try:
        results = {}
        for c in concurrencies:
            results[str(c)] = load_test(url, c, requests_per_client, max_tokens, engine.model_id)
            r = results[str(c)]
            console.print(f"server, {c} clients: {r['tokens_per_s']:.1f} tok/s, p50 {r['latency_p50_s']:.2f} s, "
                          f"p99 {r['latency_p99_s']:.2f} s")
        return results
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def plot(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    decode = result.get("decode", {})
    if decode:
        batches = sorted(decode, key=int)
        for name, marker, color in (("int4", "o", "tab:blue"), ("float32", "s", "tab:green"), ("transformers", "^", "tab:grey")):
            label = f"tierflow {name}" if name != "transformers" else "transformers generate (fp32)"
            xs = [int(b) for b in batches]
            axes[0].plot(xs, [decode[b][name]["decode_tokens_per_s"] for b in batches], marker + "-", color=color,
                         label=f"{label}, decoding")
            axes[0].plot(xs, [decode[b][name]["tokens_per_s"] for b in batches], marker + ":", color=color, alpha=0.5,
                         label=f"{label}, with prefill")
        axes[0].axhline(LLAMA_CPP_REFERENCE["16"], color="grey", lw=0.8, ls=":", label="llama.cpp, 16 seq (facts file, other host)")
        axes[0].set(xscale="log", xlabel="concurrent sequences", ylabel="aggregate tokens/s",
                    title="Decode throughput, mixed prompt lengths")
        axes[0].set_xticks([int(b) for b in batches], batches)
        axes[0].legend(fontsize=7)
    if "prefix" in result:
        p = result["prefix"]
        axes[1].bar(["prefix cache", "no prefix cache"], [p["prefix_cache"]["mean_ttft_s"], p["no_prefix_cache"]["mean_ttft_s"]],
                    color=["tab:blue", "tab:grey"])
        axes[1].set(ylabel="mean time to first token (s)",
                    title=f"{p['n_requests']} requests sharing a {p['prompt_tokens']}-token prompt prefix")
    if "server" in result:
        s = result["server"]
        cs = sorted(s, key=int)
        ax = axes[2]
        ax.plot([int(c) for c in cs], [s[c]["tokens_per_s"] for c in cs], "o-", label="completion tokens/s")
        ax.set(xlabel="concurrent clients", ylabel="tokens/s", title="OpenAI-compatible server on loopback")
        twin = ax.twinx()
        twin.plot([int(c) for c in cs], [s[c]["latency_p50_s"] for c in cs], "s--", color="tab:orange", label="p50 latency")
        twin.plot([int(c) for c in cs], [s[c]["latency_p99_s"] for c in cs], "v--", color="tab:red", label="p99 latency")
        twin.set_ylabel("request latency (s)")
        ax.legend(loc="upper left", fontsize=7)
        twin.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="decode,prefix,rollback,server")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    new_tokens, repeats = args.new_tokens, args.repeats
    if args.quick:
        batches, new_tokens, repeats = [1, 4], 8, 1
    sections = set(args.only.split(","))
    engines = {"int4": LMEngine.load(weight_format="int4", kv_cache_mib=1024)}
    if "decode" in sections:
        engines["float32"] = LMEngine.load(weight_format="float32", kv_cache_mib=1024)
    result = {"host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "load_average": os.getloadavg()[0]},
              "model": engines["int4"].model_id, "simulated": [],
              "llama_cpp_reference_tokens_per_s": LLAMA_CPP_REFERENCE}
    if "decode" in sections:
        result["decode"] = bench_decode(engines, batches, new_tokens, repeats)
    if "prefix" in sections:
        result["prefix"] = bench_prefix(engines["int4"], 4 if args.quick else 8, 256 if args.quick else 1024, repeats)
    if "rollback" in sections:
        result["rollback"] = bench_rollback(engines["int4"], 256 if args.quick else 1024, [16, 64, 256] if not args.quick else [16], repeats)
    if "server" in sections:
        result["server"] = bench_server(engines["int4"], [1, 4] if args.quick else [1, 4, 16],
                                        2 if args.quick else 4, 8 if args.quick else 32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "lm.png")
    table = Table(title="LM runtime, this host")
    for column in ("figure", "value"):
        table.add_column(column)
    for batch, row in result.get("decode", {}).items():
        table.add_row(f"{batch} seq, end to end", f"int4 {row['int4']['tokens_per_s']:.1f} tok/s = "
                      f"{row['speedup_vs_transformers']:.2f}× transformers ({row['transformers']['tokens_per_s']:.1f})")
        table.add_row(f"{batch} seq, decoding", f"int4 {row['int4']['decode_tokens_per_s']:.1f} tok/s = "
                      f"{row['decode_speedup_vs_transformers']:.2f}× transformers ({row['transformers']['decode_tokens_per_s']:.1f})")
    if "prefix" in result:
        table.add_row("prefix cache TTFT", f"{result['prefix']['ttft_speedup']:.2f}× faster")
    for k, row in result.get("rollback", {}).get("by_k", {}).items():
        table.add_row(f"rollback {k} tokens", f"{row['speedup']:.1f}× faster than recomputing")
    console.print(table)
    console.print(f"wrote {out / 'lm.json'} and {out / 'lm.png'}")
    return result


if __name__ == "__main__":
    main()
