"""Int4 weights: 4-bit codes with a scale and minimum per group of ``INT4_GROUP`` inputs
(w = scale * code + minimum, the Q4_1 form), packed for the kernel that runs them.

For a Q4_1 GGUF these are the file's own codes, so nothing is re-quantized; other checkpoints are
quantized min/max per group (:func:`quantize_int4`). Decoding rows run on the compiled Q4_1 kernel
(q4_linear.cpp, AVX-512 BF16 dot products; on CPUs without them, torch's int4 kernel while the
rows are fewer than ``INT4_MAX_ROWS``); prefill rows run on the same values dequantized to bf16
through a GEMM, which reuses each weight across many rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tasks.lm.kernels import q4_linear

INT4_GROUP = 32
INT4_MAX_ROWS = 24  # torch's int4 kernel costs grow linearly with rows: from here a bf16 GEMM is faster
Q4_TILE = 16  # outputs per tile of the compiled Q4_1 kernel


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


def fused_int4_weight(names: list[str], weights: dict[str, torch.Tensor], q4_1: dict,
                      compiled: bool = True) -> Int4Weight:
    """The weights ``names`` stacked by rows into one int4 weight: from the checkpoint's own Q4_1
    blocks (``q4_1``) when every one has them, quantized from ``weights`` otherwise."""
    if all(name in q4_1 for name in names):
        parts = [q4_1[name] for name in names]
        codes, scale, minimum = (torch.from_numpy(np.concatenate([getattr(p, f) for p in parts]))
                                 for f in ("codes", "scale", "minimum"))
    else:
        codes, scale, minimum = quantize_int4(torch.cat([weights[name] for name in names]))
    return int4_weight(codes, scale, minimum, compiled)


def int4_linear(x: torch.Tensor, weight: Int4Weight, int4_rows: int | None = None) -> torch.Tensor:
    """x @ weight.T in float32: the first ``int4_rows`` rows (all by default) on the int4 kernel,
    the rest on the bf16 copy."""
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
