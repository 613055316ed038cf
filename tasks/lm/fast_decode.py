"""Decode steps in two compiled calls: every layer at once, then the output head.

A decode step of one sequence through :class:`tasks.lm.model.Llama` op by op is ~800 torch
dispatches (27 per layer, the head, the re-scoring of its top tokens), each costing more than the
arithmetic it starts; so one user at a time got half llama.cpp's rate on the same file. Here a step
whose rows are all decoding (no prefill chunk, no LoRA adapter) runs:

- ``torch.ops.tierflow.decode_layers`` (decode_step.cpp): all layers on the same Q4_1 tiles and
  paged attention as the per-op path, keys and values written to the cache as it writes them;
- the final norm, then for up to ``Q8_HEAD_MAX_ROWS`` rows ``torch.ops.tierflow.q8_linear`` on the
  head's int8 codes with a scale per 32 inputs. For the shipped GGUF these are the file's own Q8_0
  codes, so every logit is exact and nothing is re-scored; for a head that is not Q8_0 the int8 codes
  are a rounding and the likeliest tokens are re-scored in fp32, as the bf16 head's are. More rows
  go through the bf16 head, which a GEMM serves better.

Weights are shared with the model, not copied: the layers' packed Q4_1 tensors become views of one
stacked tensor per projection. Where the kernels cannot be built, or a weight is not on the
compiled Q4_1 kernel, :func:`fast_decode_for` returns None and the model runs op by op.
"""

from __future__ import annotations

import torch

from tasks.lm.batch import FlatBatch
from tasks.lm.int4 import INT4_GROUP, Int4Weight
from tasks.lm.kernels import decode_layers, q8_linear
from tasks.lm.kvcache import PagedKVCache

Q8_HEAD_MAX_ROWS = 4  # beyond this, the int8 head's per-row fp32 arithmetic costs more than the bf16 GEMM
PROJECTIONS = (("attn", "wqkv"), ("attn", "wo"), ("ffn", "w_gate_up"), ("ffn", "w_down"))


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Symmetric int8 codes [out, in] and a scale per INT4_GROUP inputs [out, in / group] (ggml's Q8_0),
    and whether they reproduce ``w`` exactly (they do for weights read from Q8_0 blocks)."""
    groups = w.float().reshape(w.shape[0], -1, INT4_GROUP)
    scale = groups.abs().amax(-1) / 127
    codes = (groups / scale.clamp_min(1e-30)[..., None]).round().clamp(-127, 127)
    exact = bool(torch.equal(codes * scale[..., None], groups))
    return codes.to(torch.int8).reshape(w.shape).contiguous(), scale.contiguous(), exact


class FastDecode:
    """The two-call decode step over ``model``'s weights (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        layers = model.layers
        self.n_heads = model.config.n_heads
        self.eps = model.config.norm_eps
        self.norms = torch.stack([torch.stack([layer.attn_norm.weight, layer.ffn_norm.weight]) for layer in layers])
        self.stacked = []
        for owner, name in PROJECTIONS:
            weights = [getattr(getattr(layer, owner), name) for layer in layers]
            parts = [torch.stack([w.four_bit[k] for w in weights]) for k in range(3)]
            for i, w in enumerate(weights):  # the layers read their own slice of the stack
                w.four_bit = tuple(part[i] for part in parts)
            self.stacked += parts
        self.head_codes, self.head_scale, self.head_exact = quantize_q8(model.lm_head_exact)

    def handles(self, batch: FlatBatch, cache: PagedKVCache) -> bool:
        """Whether every row of ``batch`` decodes on the compiled kernels without an adapter."""
        d = batch.decode
        return (d is not None and not batch.groups and not batch.lora_segments and len(d.rows) == len(batch.tokens)
                and batch.int4_rows == len(batch.tokens) and cache.k.dtype == torch.bfloat16)

    @torch.no_grad()
    def __call__(self, batch: FlatBatch, cache: PagedKVCache) -> torch.Tensor:
        """Next-token logits (float32) at ``batch.logit_rows``, as :meth:`Llama.forward` computes them."""
        model, d = self.model, batch.decode
        x = model.tok_embeddings(batch.tokens)
        torch.ops.tierflow.decode_layers(x, self.norms, *self.stacked, model.rope_cos, model.rope_sin, batch.positions,
                                         cache.k, cache.v, batch.slots, d.block_table, d.lengths, self.n_heads,
                                         self.eps)
        x = model.norm(x[batch.logit_rows])
        if len(x) > Q8_HEAD_MAX_ROWS:
            return model.head(x)
        logits = torch.ops.tierflow.q8_linear(x, self.head_codes, self.head_scale)
        return logits if self.head_exact else model.rescore_top(logits, x)


def fast_decode_for(model) -> FastDecode | None:
    """The two-call decode step for ``model``, or None where it cannot run: the kernels did not build,
    the CPU lacks AVX-512 BF16, or a weight is not on the compiled Q4_1 kernel (fp32 and bf16 formats)."""
    if decode_layers() is None or q8_linear() is None or not model.compiled_attention:
        return None
    for layer in model.layers:
        for owner, name in PROJECTIONS:
            weight = getattr(getattr(layer, owner), name)
            if not isinstance(weight, Int4Weight) or weight.kernel != "q4":
                return None
    if model.config.dim % INT4_GROUP or model.config.head_dim % 2:
        return None
    return FastDecode(model)
