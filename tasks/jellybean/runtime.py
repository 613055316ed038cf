"""The JellyBean serving runtime: real models answering real request batches on a worker.

Models are built from their configs with random weights (nothing is downloaded) and kept
per worker process, so profiling and deployment on the same worker build each once.
Each call runs with one torch thread: a Dask worker thread stands for one core.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from tasks.jellybean import models

HOST_DEVICE = "cpu-small"  # one thread here ≈ one core of a Xeon, the catalog's cpu-small
SPEECH_SECONDS = 1.0  # length of a spoken question


_NOISE = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))


def _init_fast(model: nn.Module) -> nn.Module:
    """Give a model materialised with ``to_empty`` sane random weights, quickly.

    Weights are tiled from one block of Gaussian noise scaled by 1/sqrt(fan_in): for
    timing and serving, any well-scaled weights do, and copying is far cheaper than
    drawing 300M fresh random numbers.
    """
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
        for name, param in model.named_parameters():
            if param.dim() > 1:
                flat = param.view(-1)
                for start in range(0, flat.numel(), _NOISE.numel()):
                    chunk = flat[start : start + _NOISE.numel()]
                    chunk.copy_(_NOISE[: chunk.numel()])
                param.mul_(1.0 / math.sqrt(param[0].numel()))
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and not torch.isfinite(buf).all():
                buf.zero_()
    return model


@lru_cache(maxsize=None)
def load_model(operator: str, variant: str, image_variant: str = "resnet18") -> nn.Module:
    """Build (once per process) the model of one operator variant, ready for inference."""
    kw = {"image_variant": image_variant} if operator == "VQA" else {}
    with torch.device("meta"):
        model = models.build_variant(operator, variant, **kw)
    return _init_fast(model.to_empty(device="cpu")).eval()


def check_servable(spec) -> None:
    """Refuse, before anything starts, a workflow this runtime cannot serve (it knows the VQA models).

    ``spec`` is a :class:`tasks.jellybean.workflow.WorkflowSpec`.
    """
    from infra.errors import InputError

    for op, op_spec in spec.operators.items():
        if op not in models.VARIANTS:
            raise InputError(spec.path, "operators", op, f"the runtime serves only {', '.join(models.VARIANTS)}")
        for var in op_spec.variants:
            if var not in models.VARIANTS[op]:
                raise InputError(spec.path, f"operators.{op}.variants", var, f"known variants: {', '.join(models.VARIANTS[op])}")
        expected = SERVED_INPUTS[op]
        kinds = ["source" if u in spec.sources else u for u in op_spec.inputs]
        if sorted(kinds) != sorted(expected):
            raise InputError(spec.path, f"operators.{op}.inputs", op_spec.inputs, f"{op} takes {' and '.join(expected)}")


# What each served operator consumes: a source's raw payload, or named operators' outputs.
SERVED_INPUTS = {
    "ExtractImageFeature": ["source"],
    "SpeechRecognition": ["source"],
    "VQA": ["ExtractImageFeature", "SpeechRecognition"],
}


def request_inputs(operator: str, variant: str, count: int, seed: int, image_variant: str = "resnet18"):
    return models.example_request(operator, variant, batch=count, seconds=SPEECH_SECONDS, seed=seed, image_variant=image_variant)


def measure_latency_ms(operator: str, variant: str, repeats: int = 2) -> float:
    """Median wall time of one request (batch of one), after a warm-up, with one thread."""
    torch.set_num_threads(1)
    model = load_model(operator, variant)
    inputs = request_inputs(operator, variant, 1, seed=0)
    with torch.inference_mode():
        model(*inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


@dataclass
class BatchResult:
    """What one worker did for a batch of requests of one operator."""

    operator: str
    variant: str
    pool: str
    worker: str
    request_ids: list[int]
    outputs: dict[int, object] = field(repr=False)
    out_bytes: dict[int, int]
    ms_per_request: float


def serve(operator: str, variant: str, pool: str, request_ids: list[int], inputs: dict[str, dict[int, object]],
          image_variant: str = "resnet18") -> BatchResult:
    """Run ``operator`` on the given requests, one at a time, as a serving worker would.

    ``inputs`` maps each upstream node to {request id: its output for that request}.
    """
    from infra.cluster import this_worker_name

    torch.set_num_threads(1)
    model = load_model(operator, variant, image_variant if operator == "VQA" else "resnet18")
    with torch.inference_mode():  # a serving worker is warm before traffic arrives
        model(*request_inputs(operator, variant, 1, seed=0, image_variant=image_variant))
    outputs, out_bytes = {}, {}
    start = time.perf_counter()
    with torch.inference_mode():
        for rid in request_ids:
            if operator == "VQA":
                features = inputs["ExtractImageFeature"][rid].unsqueeze(0)
                tokens = models.pad_token_ids([inputs["SpeechRecognition"][rid]], models.QUESTION_TOKENS)
                result = model(features, tokens)
                outputs[rid] = int(result.argmax(-1)[0])
                out_bytes[rid] = 4
            else:
                payload = _single(inputs, rid)
                result = model(payload.unsqueeze(0))
                if operator == "SpeechRecognition":
                    transcript = models.ctc_greedy_decode(result)[0][: models.QUESTION_TOKENS]
                    outputs[rid] = transcript
                    out_bytes[rid] = 4 * len(transcript)
                else:
                    outputs[rid] = result[0].clone()
                    out_bytes[rid] = 4 * result[0].numel()
    elapsed = (time.perf_counter() - start) * 1000
    return BatchResult(operator, variant, pool, this_worker_name(), list(request_ids), outputs, out_bytes,
                       elapsed / max(len(request_ids), 1))


def _single(inputs: dict[str, dict[int, object]], rid: int):
    (upstream,) = inputs.values()
    return upstream[rid]
