"""The LM runtime side by side with transformers, and its KV-cache features against recomputing.

    .venv/bin/python -m benchmarks.lm [--quick] [--batches 1,4,16,64] [--new-tokens 64]
                                      [--only decode,prefix,rollback,server] [--out results/benchmarks/lm]

All on this host's CPU, same process, same weights (SmolLM2-135M-Instruct from the shipped GGUF):

* **decode**: aggregate tokens/s generating ``--new-tokens`` greedy tokens for batches of
  1/4/16/64 prompts of mixed lengths (16–160 tokens, slices of data/moe-corpus.txt), for the
  runtime in its fast ``int4`` format and its exact ``float32`` format, against transformers'
  ``generate`` (float32, left-padded batch, its KV cache) on the same weights and, when the
  ``llama_cpp`` package is importable, llama.cpp on the same GGUF file (its own Q4_1/Q8_0 kernels,
  the same threads, each sequence its own sequence id in one batch, greedy by argmax of its
  logits): end to end (prefill included) and decode only (after every sequence's first token).
  llama-cpp-python is not a dependency: without it the column is skipped and the run says so
  (it builds from source with ``pip install llama-cpp-python --no-binary llama-cpp-python``; on
  CPUs whose AMX faults, with ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ... -DGGML_AMX_TILE=OFF
  -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"``).
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
import logging
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
from tasks.lm.kernels import kernel_status  # noqa: E402
from tasks.lm.sampling import SamplingParams  # noqa: E402
from tasks.lm.weights import default_model_path  # noqa: E402
from tasks.moe.corpus import load_corpus  # noqa: E402

DEFAULT_OUT = "results/benchmarks/lm"
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
            "wall_s": ended - started, "tokens": total, "generated": [r.generated for r in requests]}


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


class LlamaCpp:
    """llama.cpp (through llama-cpp-python's C API) on the shipped GGUF: batched greedy decoding, each
    prompt its own sequence id, the argmax of each row's logits taken in numpy as the runtime's
    sampler takes it."""

    def __init__(self, threads: int, max_sequences: int, context: int):
        import ctypes

        import llama_cpp
        import numpy as np

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its loader prints every tensor
        self.lib, self.np, self.ctypes = llama_cpp, np, ctypes
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(default_model_path()).encode(),
                                                          llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = context, 512, 512
        params.n_seq_max, params.kv_unified = max_sequences, True
        params.n_threads = params.n_threads_batch = threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.system = llama_cpp.llama_print_system_info().decode().strip()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of ``(token, position, sequence, want_logits)`` entries: the argmax token of
        each entry that wants logits."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, position, sequence, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, position, 1, want
            b.seq_id[i][0] = sequence
        if self.lib.llama_decode(self.context, b) != 0:
            raise RuntimeError("llama_decode failed (KV cache too small for the batch?)")
        picks = []
        for i, (*_, want) in enumerate(entries):
            if want:
                row = self.np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.context, i), shape=(self.vocab,))
                picks.append(int(row.argmax()))
        return picks

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)
        started = time.perf_counter()
        entries = [(token, position, s, position == len(p) - 1)
                   for s, p in enumerate(prompts) for position, token in enumerate(p)]
        nexts = []
        for i in range(0, len(entries), 512):  # the prompts, packed 512 tokens a call
            nexts += self._decode(entries[i:i + 512])
        first_tokens_done = time.perf_counter()
        generated = [[t] for t in nexts]
        lengths = [len(p) for p in prompts]
        for _ in range(new_tokens - 1):
            nexts = self._decode([(t, lengths[s], s, True) for s, t in enumerate(nexts)])
            lengths = [n + 1 for n in lengths]
            for tokens, t in zip(generated, nexts):
                tokens.append(t)
        ended = time.perf_counter()
        total = len(prompts) * new_tokens
        return {"tokens_per_s": total / (ended - started),
                "decode_tokens_per_s": (total - len(prompts)) / max(ended - first_tokens_done, 1e-9),
                "wall_s": ended - started, "tokens": total, "generated": generated}

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.context)
        self.lib.llama_model_free(self.model)


def load_llama_cpp(batches: list[int], new_tokens: int) -> tuple[LlamaCpp | None, str]:
    """llama.cpp for the decode comparison, or None and why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None, ("llama_cpp is not importable: the llama.cpp column is skipped "
                      "(pip install llama-cpp-python --no-binary llama-cpp-python to add it)")
    context = max(batches) * (160 + new_tokens + 16)
    runner = LlamaCpp(torch.get_num_threads(), max(batches), context)
    return runner, f"llama-cpp-python {llama_cpp.__version__}: {runner.system}"


def load_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    folder = Path(tempfile.mkdtemp(prefix="tierflow-gguf-"))
    (folder / default_model_path().name).symlink_to(default_model_path())
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=default_model_path().name,
                                                             dtype=torch.float32).eval()


def bench_decode(engines: dict, batches: list[int], new_tokens: int, repeats: int) -> tuple[dict, str]:
    """Every system on the same prompts, interleaved repeat by repeat (so a noisy spell falls on each);
    per batch and system the median run by end-to-end rate, with every run's rates (their spread); and
    which llama.cpp ran, or why it did not."""
    reference = load_transformers()
    llama_cpp, llama_cpp_note = load_llama_cpp(batches, new_tokens)
    console.print(llama_cpp_note)
    results = {}
    try:
        for batch in batches:
            prompts = mixed_prompts(engines["int4"], batch, seed=batch)
            row = {"prompt_tokens": [len(p) for p in prompts]}
            op_by_op = ["int4_op_by_op"] if engines["int4"].model.fast_decode else []
            runs = {name: [] for name in [*engines, *op_by_op, "transformers", *(["llama_cpp"] if llama_cpp else [])]}
            for repeat in range(repeats):
                slow_too = repeat == 0 or batch < 16  # the float32 runs take minutes at 16 and 64: once
                for name, engine in engines.items():
                    if name == "int4" or slow_too:
                        runs[name].append(time_ours(engine, prompts, new_tokens))
                if op_by_op:  # the same engine with its fast decode path off: what it gains
                    fast, engines["int4"].model.fast_decode = engines["int4"].model.fast_decode, None
                    try:
                        runs["int4_op_by_op"].append(time_ours(engines["int4"], prompts, new_tokens))
                    finally:
                        engines["int4"].model.fast_decode = fast
                if slow_too:
                    runs["transformers"].append(time_transformers(reference, prompts, new_tokens, pad_id=2))
                if llama_cpp:
                    runs["llama_cpp"].append(llama_cpp.generate(prompts, new_tokens))
            if llama_cpp:  # the same file greedily decoded: tokens agree up to where a near-tie rounds apart
                row["same_tokens_as_llama_cpp"] = statistics.median(
                    _common_prefix(ours, theirs)
                    for ours, theirs in zip(runs["int4"][0]["generated"], runs["llama_cpp"][0]["generated"]))
            for name, measured in runs.items():
                for m in measured:
                    m.pop("generated", None)
                row[name] = sorted(measured, key=lambda m: m["tokens_per_s"])[len(measured) // 2]
                row[name]["runs_tokens_per_s"] = [m["tokens_per_s"] for m in measured]
                row[name]["runs_decode_tokens_per_s"] = [m["decode_tokens_per_s"] for m in measured]
            for baseline in ("transformers", "llama_cpp", "int4_op_by_op"):
                if baseline in row:
                    row[f"speedup_vs_{baseline}"] = row["int4"]["tokens_per_s"] / row[baseline]["tokens_per_s"]
                    row[f"decode_speedup_vs_{baseline}"] = (row["int4"]["decode_tokens_per_s"]
                                                            / row[baseline]["decode_tokens_per_s"])
            results[str(batch)] = row
            console.print(" ".join(f"{name} {row[name]['tokens_per_s']:.1f} ({row[name]['decode_tokens_per_s']:.1f} "
                                   "decoding)" for name in runs) + f" tok/s, batch {batch}")
    finally:
        if llama_cpp:
            llama_cpp.close()
    return results, llama_cpp_note


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
        xs = [int(b) for b in batches]
        labels = {"int4": "tierflow int4", "int4_op_by_op": "tierflow int4, op by op", "float32": "tierflow float32",
                  "transformers": "transformers generate (fp32)", "llama_cpp": "llama.cpp (same GGUF)"}
        for name, marker, color in (("int4", "o", "tab:blue"), ("int4_op_by_op", "v", "tab:cyan"),
                                    ("float32", "s", "tab:green"), ("transformers", "^", "tab:grey"),
                                    ("llama_cpp", "D", "tab:red")):
            if name not in decode[batches[0]]:
                continue
            axes[0].plot(xs, [decode[b][name]["decode_tokens_per_s"] for b in batches], marker + "-", color=color,
                         label=f"{labels[name]}, decoding")
            axes[0].plot(xs, [decode[b][name]["tokens_per_s"] for b in batches], marker + ":", color=color, alpha=0.5,
                         label=f"{labels[name]}, with prefill")
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
        batches, new_tokens, repeats = [1, 16], 16, 1
    sections = set(args.only.split(","))
    engines = {"int4": LMEngine.load(weight_format="int4", kv_cache_mib=1024)}
    if "decode" in sections:
        engines["float32"] = LMEngine.load(weight_format="float32", kv_cache_mib=1024)
    result = {"host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "load_average": os.getloadavg()[0]},
              "model": engines["int4"].model_id, "simulated": [], "new_tokens": new_tokens, "repeats": repeats,
              "int4_decode_path": "two compiled calls a step" if engines["int4"].model.fast_decode else "op by op",
              "kernels": kernel_status()}
    if "decode" in sections:
        result["decode"], result["llama_cpp"] = bench_decode(engines, batches, new_tokens, repeats)
    if "prefix" in sections:
        result["prefix"] = bench_prefix(engines["int4"], 4 if args.quick else 8, 256 if args.quick else 1024, repeats)
    if "rollback" in sections:
        result["rollback"] = bench_rollback(engines["int4"], 256 if args.quick else 1024, [16, 64, 256] if not args.quick else [16], repeats)
    if "server" in sections:
        result["server"] = bench_server(engines["int4"], [1, 4] if args.quick else [1, 4, 16],
                                        2 if args.quick else 4, 8 if args.quick else 32)
    result["host"]["load_average_end"] = os.getloadavg()[0]  # the machine is shared: how busy it was
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "lm.png")
    table = Table(title="LM runtime, this host")
    for column in ("figure", "value"):
        table.add_column(column)
    for batch, row in result.get("decode", {}).items():
        for label, key, speedup in (("end to end", "tokens_per_s", "speedup"), ("decoding", "decode_tokens_per_s",
                                                                                 "decode_speedup")):
            versus = [f"{row[f'{speedup}_vs_{b}']:.2f}× {name} ({row[b][key]:.1f})"
                      for b, name in (("llama_cpp", "llama.cpp"), ("transformers", "transformers"),
                                      ("int4_op_by_op", "int4 op by op")) if b in row]
            table.add_row(f"{batch} seq, {label}", f"int4 {row['int4'][key]:.1f} tok/s = " + ", ".join(versus))
        if "same_tokens_as_llama_cpp" in row:
            table.add_row(f"{batch} seq, greedy tokens", f"the same as llama.cpp's for the first "
                          f"{row['same_tokens_as_llama_cpp']:.0f} of {result['new_tokens']} (median)")
    if "llama_cpp" in result:
        table.add_row("llama.cpp", result["llama_cpp"])
    if "prefix" in result:
        table.add_row("prefix cache TTFT", f"{result['prefix']['ttft_speedup']:.2f}× faster")
    for k, row in result.get("rollback", {}).get("by_k", {}).items():
        table.add_row(f"rollback {k} tokens", f"{row['speedup']:.1f}× faster than recomputing")
    console.print(table)
    console.print(f"wrote {out / 'lm.json'} and {out / 'lm.png'}")
    return result


if __name__ == "__main__":
    main()
