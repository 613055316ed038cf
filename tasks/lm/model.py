"""A Llama-architecture decoder in plain torch, reading and writing a paged KV cache.

RMSNorm, rotary position embeddings (rotate-half form), grouped-query attention and a SwiGLU
feed-forward; weights from :mod:`tasks.lm.weights`. One forward takes a *flat* batch: the new
tokens of many sequences side by side, each with its position and the cache slot its key and
value go to. The linear layers see all tokens at once; attention runs per group of sequences
(all decoding sequences together, each prefill chunk on its own) against the keys and values
the cache holds for them.

Weights come in three formats (``weight_format``):

- ``float32``: everything in fp32, the reference the correctness tests compare at tight tolerance;
- ``bfloat16``: the matrix multiplies in bf16, the residual stream and norms in fp32 (all-bf16
  overflows this model's residual stream; see ../shared/facts/smollm2-on-this-cpu.md);
- ``int4``: the linear layers run on 4-bit codes with a scale and minimum per 32 inputs. For a
  Q4_1 GGUF these are the file's own codes, so nothing is re-quantized; other checkpoints are
  quantized min/max per group. Decoding rows run on the compiled Q4_1 kernel (q4_linear.cpp,
  AVX-512 BF16 dot products; on CPUs without them, torch's int4 kernel while the rows are fewer
  than ``INT4_MAX_ROWS``); prefill rows run on the same values dequantized to bf16 through a GEMM,
  which reuses each weight across many rows. The output head stays bf16.

Decode attention runs in the compiled paged-attention kernel (paged_attention.cpp) where it
builds, reading keys and values where they lie in the cache; prefill chunks, and decoding where the
kernel is absent, gather their blocks and attend with bmm.

A step whose rows all decode without an adapter skips the per-op path below: with the int4 format
on the compiled kernels, :mod:`tasks.lm.fast_decode` runs the same layers in one compiled call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.lm.kernels import paged_decode_attention, q4_linear
from tasks.lm.kvcache import PagedKVCache
from tasks.lm.lora import LoraPool, segments_of
from tasks.lm.weights import LlamaConfig


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one padded call: B sequences × T new tokens each."""

    rows: torch.Tensor  # [B*T] indices into the flat batch, sequence-major
    block_table: torch.Tensor  # [B, n_blocks] cache blocks per sequence (padded with the null block)
    bias: torch.Tensor  # [B, T*G, n_blocks*block_size]: 0 where a query may attend a key, -inf elsewhere
    batch: int
    tokens: int


@dataclass
class DecodeGroup:
    """Decoding sequences (one new token each) for the compiled kernel, which reads the cache's
    blocks in place: no padding, no mask."""

    rows: torch.Tensor  # [B] each sequence's row in the flat batch
    block_table: torch.Tensor  # [B, n_blocks] cache blocks per sequence (padded with the null block)
    lengths: torch.Tensor  # [B] keys each sequence attends: its position + 1


@dataclass
class FlatBatch:
    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot of each token's key/value
    groups: list[AttentionGroup]
    logit_rows: torch.Tensor  # [M] rows whose next-token logits are wanted
    int4_rows: int = 0  # leading rows (decoding sequences) that int4 weights run on their int4 kernel
    decode: DecodeGroup | None = None  # decoding sequences, when the compiled kernel attends them
    lora_segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, LoRA pool slot)
    # for the compiled LoRA kernel: segments long enough for two matmuls, and every other row's slot
    lora_long_segments: list[tuple[int, int, int]] = field(default_factory=list)
    lora_short_row_slots: torch.Tensor | None = None  # [N] (0: no adapter, or in a long segment)


WEIGHT_FORMATS = ("float32", "bfloat16", "int4")
INT4_GROUP = 32
EXACT_TOP_LOGITS = 64  # tokens whose logits are recomputed in float32 after a bf16 output head


INT4_MAX_ROWS = 24  # torch's int4 kernel costs grow linearly with rows: from here a bf16 GEMM is faster
Q4_TILE = 16  # outputs per tile of the compiled Q4_1 kernel
LORA_GEMM_ROWS = 8  # a run of this many rows with one adapter goes through two matmuls, not the LoRA kernel


@dataclass
class Int4Weight:
    """A linear layer's weight as 4-bit codes with a scale and minimum per group of INT4_GROUP inputs
    (w = scale * code + minimum), laid out for the kernel that runs them, and the same weight
    dequantized to bf16 for prefill."""

    kernel: str  # "q4": the compiled AVX-512 BF16 kernel (q4_linear.cpp); "torch": torch's int4 kernel
    four_bit: tuple[torch.Tensor, ...]  # q4: (codes, scale, offset) from q4_pack; torch: (packed, scales_zeros)
    dense: torch.Tensor  # [out, in] bf16


def q4_pack(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Codes [out, in] in 0..15 and scale, minimum [out, in / group] in q4_linear.cpp's layout: per tile of
    16 outputs and group, 8 runs of 32 bytes, byte 2n + h of run j holding output n's codes for inputs
    4j + h (low nibble) and 4j + 2 + h (high nibble); and the offset minimum - 128 * scale."""
    n_out, n_in = codes.shape
    tiles, groups = n_out // Q4_TILE, n_in // INT4_GROUP
    c = codes.to(torch.uint8).reshape(tiles, Q4_TILE, groups, 8, 2, 2).permute(0, 2, 3, 1, 5, 4)  # tile, group, j, n, h, nibble
    packed = (c[..., 0] | (c[..., 1] << 4)).reshape(tiles, groups, Q4_TILE * INT4_GROUP // 2).contiguous()
    per_tile = lambda t: t.float().reshape(tiles, Q4_TILE, groups).transpose(1, 2).contiguous()  # noqa: E731
    return packed, per_tile(scale), per_tile(minimum - 128 * scale)


def int4_weight(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, compiled: bool = True) -> Int4Weight:
    """From codes in 0..15 [out, in] and a scale and minimum per group [out, in / group]
    (w = scale * code + minimum, the Q4_1 form); ``compiled`` runs them on the compiled kernel where
    this CPU has AVX-512 BF16 and the outputs come in whole tiles."""
    dense = codes.float().view(codes.shape[0], -1, INT4_GROUP) * scale[..., None] + minimum[..., None]
    dense = dense.view(codes.shape).to(torch.bfloat16)
    if compiled and codes.shape[0] % Q4_TILE == 0 and q4_linear() is not None:
        return Int4Weight("q4", q4_pack(codes, scale, minimum), dense)
    zero = minimum + 8 * scale  # torch's kernel centres the codes: (code - 8) * scale + zero
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return Int4Weight("torch", (packed, scales_zeros), dense)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max 4-bit quantization per group of INT4_GROUP inputs: (codes, scale, minimum)."""
    groups = w.reshape(w.shape[0], -1, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-12)
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return codes.reshape(w.shape), scale, low


def linear(x, weight, int4_rows: int | None = None):
    """x @ weight.T with the weight in its own format; the result is float32. An int4 weight runs
    its first ``int4_rows`` rows (all by default) on the int4 kernel and the rest on its bf16 copy."""
    if isinstance(weight, Int4Weight):
        split = x.shape[0] if int4_rows is None else int4_rows
        parts = []
        if split and weight.kernel == "q4":
            parts.append(torch.ops.tierflow.q4_linear(x[:split].contiguous(), *weight.four_bit))
        elif split:
            packed, scales_zeros = weight.four_bit
            parts.append(torch._weight_int4pack_mm_for_cpu(x[:split].to(torch.bfloat16), packed, INT4_GROUP,
                                                           scales_zeros).float())
        if split < x.shape[0]:
            parts.append(F.linear(x[split:].to(torch.bfloat16), weight.dense).float())
        return parts[0] if len(parts) == 1 else torch.cat(parts)
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
        if compiled_kernels:
            from tasks.lm.fast_decode import fast_decode_for  # it reads this module's weight types

            model.fast_decode = fast_decode_for(model)
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
                if all(key in q4_1 for key in keys):
                    parts = [q4_1[key] for key in keys]
                    codes, scale, minimum = (torch.from_numpy(np.concatenate([getattr(p, f) for p in parts]))
                                             for f in ("codes", "scale", "minimum"))
                else:
                    codes, scale, minimum = quantize_int4(torch.cat([weights[key] for key in keys]))
                return int4_weight(codes, scale, minimum, compiled_kernels)
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


def build_flat_batch(cache: PagedKVCache, work: list[tuple], n_query_groups: int,
                     compiled_attention: bool = False, int4_max_rows: int | None = INT4_MAX_ROWS,
                     adapter_slots: list[int] | None = None) -> FlatBatch:
    """The flat batch for ``work``: ``(sequence, start, end, want_logits)`` entries, each computing
    the sequence's tokens ``start .. end-1`` (cache blocks already reserved). Entries of one token
    (decoding sequences; put them first) go to the compiled kernel (``compiled_attention``) or
    share padded attention groups; each longer chunk (a prefill) gets its own group. Int4 weights
    run the decoding rows on their 4-bit kernel (while fewer than ``int4_max_rows``, when given).
    ``adapter_slots`` (one per entry; 0 for none) names each entry's LoRA pool slot. Logit rows
    follow the order of ``work``."""
    tokens, positions, slots, logit_rows = [], [], [], []
    decode, chunks = [], []
    for seq, start, end, want_logits in work:
        row = len(tokens)
        tokens += seq.tokens[start:end]
        positions += range(start, end)
        slots += cache.slots(seq, start, end)
        if want_logits:
            logit_rows.append(row + end - start - 1)
        (decode if end - start == 1 else chunks).append((seq, row, start, end))
    decode_group = _decode_group(cache, decode) if compiled_attention and decode else None
    groups = [] if compiled_attention else [_attention_group(cache, members, 1, n_query_groups)
                                            for members in _split_by_length(decode, cache.block_size)]
    groups += [_attention_group(cache, [chunk], chunk[3] - chunk[2], n_query_groups) for chunk in chunks]
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    # int4 weights: decoding rows on the 4-bit kernel, prefill rows always on the bf16 copy (so a
    # prompt computes the same however it is chunked)
    leading = next((i for i, (_, start, end, _) in enumerate(work) if end - start > 1), len(work))
    int4_rows = leading if int4_max_rows is None or leading < int4_max_rows else 0
    row_slots = [] if adapter_slots is None else [slot for (_, start, end, _), slot in zip(work, adapter_slots)
                                                   for _ in range(end - start)]
    segments = segments_of(row_slots)
    long_segments = [s for s in segments if s[1] - s[0] >= LORA_GEMM_ROWS]
    short_slots = list(row_slots)
    for start, end, _ in long_segments:
        short_slots[start:end] = [0] * (end - start)
    return FlatBatch(as_long(tokens), as_long(positions), as_long(slots), groups, as_long(logit_rows), int4_rows,
                     decode_group, segments, long_segments, as_long(short_slots) if any(short_slots) else None)


def _decode_group(cache: PagedKVCache, members: list[tuple]) -> DecodeGroup:
    n_blocks = max(-(-end // cache.block_size) for _, _, _, end in members)
    table = torch.full((len(members), n_blocks), cache.null_block, dtype=torch.long)
    for i, (seq, _, _, end) in enumerate(members):
        used = -(-end // cache.block_size)
        table[i, :used] = torch.tensor(seq.blocks[:used])
    rows = torch.tensor([row for _, row, _, _ in members], dtype=torch.long)
    return DecodeGroup(rows, table, torch.tensor([end for _, _, _, end in members], dtype=torch.long))


GROUP_OVERHEAD_SLOTS = 128  # a separate attention group costs about as much as gathering this many more keys


def _split_by_length(decode: list[tuple], block_size: int) -> list[list[tuple]]:
    """Decoding sequences in one or two attention groups: a group pads every member to its longest,
    so when lengths differ widely the short ones go in a group of their own."""
    if len(decode) < 4:
        return [decode] if decode else []
    members = sorted(decode, key=lambda m: m[3])
    padded = lambda group: len(group) * -(-group[-1][3] // block_size) * block_size  # noqa: E731
    best, cut = padded(members), None
    for i in range(1, len(members)):
        cost = padded(members[:i]) + padded(members[i:]) + GROUP_OVERHEAD_SLOTS
        if cost < best:
            best, cut = cost, i
    return [members] if cut is None else [members[:cut], members[cut:]]


def _attention_group(cache: PagedKVCache, members: list[tuple], t: int, n_query_groups: int) -> AttentionGroup:
    n_blocks = max(-(-end // cache.block_size) for _, _, _, end in members)
    table = torch.full((len(members), n_blocks), cache.null_block, dtype=torch.long)
    rows, query_positions = [], []
    for i, (seq, row, start, end) in enumerate(members):
        used = -(-end // cache.block_size)
        table[i, :used] = torch.tensor(seq.blocks[:used])
        rows += range(row, row + t)
        query_positions.append(list(range(start, end)))
    keys = torch.arange(n_blocks * cache.block_size)
    allowed = keys[None, None, :] <= torch.tensor(query_positions)[:, :, None]  # [B, T, L], causal
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).repeat_interleave(n_query_groups, dim=1)
    return AttentionGroup(torch.tensor(rows, dtype=torch.long), table, bias, len(members), t)
