"""A Llama-architecture decoder in plain torch, reading and writing a paged KV cache.

RMSNorm, rotary position embeddings (rotate-half form), grouped-query attention and a SwiGLU
feed-forward; weights from :mod:`tasks.lm.weights`. One forward takes a *flat* batch
(:mod:`tasks.lm.batch`): the new tokens of many sequences side by side. The linear layers see all
tokens at once; attention runs per group of sequences against the keys and values the cache holds
for them: decoding sequences in the compiled paged-attention kernel (paged_attention.cpp) where it
builds, reading keys and values where they lie in the cache; prefill chunks, and decoding where the
kernel is absent, gather their blocks and attend with bmm.

Weights come in three formats (``weight_format``):

- ``float32``: everything in fp32, the reference the correctness tests compare at tight tolerance;
- ``bfloat16``: the matrix multiplies in bf16, the residual stream and norms in fp32 (all-bf16
  overflows this model's residual stream; see ../shared/facts/smollm2-on-this-cpu.md);
- ``int4``: the linear layers run on 4-bit codes (:mod:`tasks.lm.int4`); the output head stays bf16.

A step whose rows all decode without an adapter skips the per-op path below: with the int4 format
on the compiled kernels, :mod:`tasks.lm.fast_decode` runs the same layers in one compiled call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.lm.batch import FlatBatch, build_flat_batch
from tasks.lm.fast_decode import fast_decode_for
from tasks.lm.int4 import INT4_MAX_ROWS, Int4Weight, fused_int4_weight, int4_linear
from tasks.lm.kernels import paged_decode_attention
from tasks.lm.kvcache import PagedKVCache
from tasks.lm.lora import LoraPool
from tasks.lm.weights import LlamaConfig

WEIGHT_FORMATS = ("float32", "bfloat16", "int4")
EXACT_TOP_LOGITS = 64  # tokens whose logits are recomputed in float32 after a bf16 output head


def linear(x, weight, int4_rows: int | None = None):
    """x @ weight.T with the weight in its own format; the result is float32. An int4 weight runs
    its first ``int4_rows`` rows (all by default) on the int4 kernel and the rest on its bf16 copy."""
    if isinstance(weight, Int4Weight):
        return int4_linear(x, weight, int4_rows)
    if weight.dtype == x.dtype:
        return F.linear(x, weight)
    return F.linear(x.to(weight.dtype), weight).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, index: int):
        super().__init__()
        self.index = index
        self.lora: LoraPool | None = None
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wqkv = None  # q, k and v projections fused: [(H + 2 * KV) * head_dim, dim]
        self.wo = None
        self.kernel = None  # the compiled paged decode attention, when built (tasks.lm.kernels)

    def forward(self, x, batch: FlatBatch, rope, k_pool, v_pool):
        n, h, kvh, hd = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qkv = linear(x, self.wqkv, batch.int4_rows)
        if batch.lora_segments:
            qkv = self.lora.add(qkv, x, self.index, "wqkv", batch)
        qkv = qkv.view(n, h + 2 * kvh, hd)
        cos, sin = rope
        qk = qkv[:, : h + kvh] * cos + rotate_half(qkv[:, : h + kvh]) * sin
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kvh:]
        # the pool is [KV head, block, slot, head_dim], so gathering a group's blocks gives each
        # KV head's keys contiguous: [KV head * sequence, length, head_dim], ready for bmm
        k_pool.view(kvh, -1, hd)[:, batch.slots] = k.transpose(0, 1).to(k_pool.dtype)
        v_pool.view(kvh, -1, hd)[:, batch.slots] = v.transpose(0, 1).to(v_pool.dtype)
        out = torch.empty(n, h * hd, dtype=x.dtype)
        if batch.decode is not None:
            d = batch.decode
            self.kernel(q.contiguous(), d.rows, k_pool, v_pool, d.block_table, d.lengths, out, hd ** -0.5)
        groups = h // kvh
        for g in batch.groups:
            b, t = g.batch, g.tokens
            length = g.block_table.shape[1] * k_pool.shape[2]
            # scores in float32 (bf16 scores round away the differences softmax amplifies);
            # the probability-weighted sum of values may run in the cache's dtype
            keys = k_pool[:, g.block_table].view(kvh * b, length, hd).float()
            values = v_pool[:, g.block_table].view(kvh * b, length, hd)
            # grouped-query attention without repeating keys: a KV head's G query heads become
            # G query rows, so each (KV head, sequence) is one small attention of T*G rows
            qg = q[g.rows].view(b, t, kvh, groups, hd).permute(2, 0, 1, 3, 4).reshape(kvh * b, t * groups, hd)
            scores = torch.bmm(qg, keys.transpose(1, 2)).view(kvh, b, t * groups, length)
            probs = torch.softmax(scores * self.head_dim ** -0.5 + g.bias, dim=-1).view(kvh * b, t * groups, length)
            y = torch.bmm(probs.to(values.dtype), values)
            out[g.rows] = y.view(kvh, b, t, groups, hd).permute(1, 2, 0, 3, 4).reshape(b * t, h * hd).to(out.dtype)
        y = linear(out, self.wo, batch.int4_rows)
        return self.lora.add(y, out, self.index, "wo", batch) if batch.lora_segments else y


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig, index: int):
        super().__init__()
        self.index = index
        self.lora: LoraPool | None = None
        self.w_gate_up = None  # gate and up projections fused: [2 * ffn_dim, dim]
        self.w_down = None

    def forward(self, x, batch: FlatBatch):
        gate_up = linear(x, self.w_gate_up, batch.int4_rows)
        if batch.lora_segments:
            gate_up = self.lora.add(gate_up, x, self.index, "w_gate_up", batch)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        y = linear(hidden, self.w_down, batch.int4_rows)
        return self.lora.add(y, hidden, self.index, "w_down", batch) if batch.lora_segments else y


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, index)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config, index)

    def forward(self, x, batch, rope, k_pool, v_pool):
        x = x + self.attn(self.attn_norm(x), batch, rope, k_pool, v_pool)
        return x + self.ffn(self.ffn_norm(x), batch)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
        angles = torch.outer(torch.arange(config.context_length).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.lm_head_weight = None  # set by load_weights: the output (or tied embedding) in compute dtype
        self.lm_head_exact = None  # the same in float32, to recompute the likeliest tokens' logits
        self.weight_format = None  # set by load_weights
        self.fast_decode = None  # decode-only steps in two compiled calls (tasks.lm.fast_decode), where it runs

    @classmethod
    def from_weights(cls, config: LlamaConfig, weights: dict[str, torch.Tensor], weight_format: str = "float32",
                     q4_1: dict | None = None, compiled_kernels: bool = True) -> "Llama":
        """The model with ``weights`` (from :func:`tasks.lm.weights.load_checkpoint`) in ``weight_format``;
        ``q4_1`` (the checkpoint's stored 4-bit blocks) makes ``int4`` use the file's own codes;
        ``compiled_kernels`` decodes with the compiled kernels (tasks.lm.kernels) where they build."""
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format {weight_format!r} is not one of {WEIGHT_FORMATS}")
        model = cls(config)
        model.load_weights(weights, weight_format, q4_1 or {}, compiled_kernels)
        kernel = paged_decode_attention() if compiled_kernels else None
        for layer in model.layers:
            layer.attn.kernel = kernel
        model.fast_decode = fast_decode_for(model) if compiled_kernels else None
        return model.eval()

    @property
    def compiled_attention(self) -> bool:
        return self.layers[0].attn.kernel is not None

    def attach_lora(self, pool: LoraPool | None) -> None:
        """Serve the adapters in ``pool``'s slots (rows name their slot through the flat batch)."""
        for layer in self.layers:
            layer.attn.lora = layer.ffn.lora = pool

    @property
    def int4_max_rows(self) -> int | None:
        """Decoding rows beyond which int4 weights run on their bf16 copy: none for the compiled
        kernel (as fast per row as a bf16 GEMM, and a row's result then never depends on the batch)."""
        weight = self.layers[0].ffn.w_down
        return None if isinstance(weight, Int4Weight) and weight.kernel == "q4" else INT4_MAX_ROWS

    def flat_batch(self, cache: PagedKVCache, work: list[tuple], adapter_slots: list[int] | None = None) -> FlatBatch:
        """:func:`build_flat_batch` for this model's attention shape and kernels."""
        return build_flat_batch(cache, work, self.config.n_heads // self.config.n_kv_heads,
                                self.compiled_attention, self.int4_max_rows, adapter_slots)

    @torch.no_grad()
    def load_weights(self, weights, weight_format, q4_1, compiled_kernels: bool = True) -> None:
        self.weight_format = weight_format
        self.tok_embeddings.weight.copy_(weights["tok_embeddings"])
        self.norm.weight.copy_(weights["norm"])

        def fused(i: int, names: tuple[str, ...]):
            keys = [f"layers.{i}.{name}" for name in names]
            if weight_format == "int4":
                return fused_int4_weight(keys, weights, q4_1, compiled_kernels)
            dtype = torch.float32 if weight_format == "float32" else torch.bfloat16
            return torch.cat([weights[key] for key in keys]).to(dtype).contiguous()

        for i, layer in enumerate(self.layers):
            layer.attn_norm.weight.copy_(weights[f"layers.{i}.attn_norm"])
            layer.ffn_norm.weight.copy_(weights[f"layers.{i}.ffn_norm"])
            layer.attn.wqkv = fused(i, ("wq", "wk", "wv"))
            layer.attn.wo = fused(i, ("wo",))
            layer.ffn.w_gate_up = fused(i, ("w_gate", "w_up"))
            layer.ffn.w_down = fused(i, ("w_down",))
        head = weights["output"] if "output" in weights else weights["tok_embeddings"]
        self.lm_head_weight = head.to(torch.float32 if weight_format == "float32" else torch.bfloat16).contiguous()
        self.lm_head_exact = self.tok_embeddings.weight if "output" not in weights else head.float().contiguous()
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, batch: FlatBatch, cache: PagedKVCache) -> torch.Tensor:
        """Next-token logits (float32) at ``batch.logit_rows``; writes every token's K/V to the cache."""
        if self.fast_decode is not None and self.fast_decode.handles(batch, cache):
            return self.fast_decode(batch, cache)
        x = self.tok_embeddings(batch.tokens)
        rope = (self.rope_cos[batch.positions].unsqueeze(1), self.rope_sin[batch.positions].unsqueeze(1))
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, rope, cache.k[i], cache.v[i])
        return self.head(self.norm(x[batch.logit_rows]))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of normed hidden states ``x``."""
        logits = linear(x, self.lm_head_weight)
        return logits if self.lm_head_weight.dtype == torch.float32 else self.rescore_top(logits, x)

    def rescore_top(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``logits`` from a rounded head with the likeliest tokens' logits recomputed in float32: bf16
        logits are rounded to 1/8 near 25, which ties this model's top answers, so greedy and top-p
        see true values."""
        top = logits.topk(EXACT_TOP_LOGITS, dim=-1).indices
        return logits.scatter_(1, top, torch.bmm(self.lm_head_exact[top], x.unsqueeze(-1)).squeeze(-1))

