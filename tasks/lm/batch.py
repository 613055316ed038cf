"""The flat batch one forward pass takes: the new tokens of many sequences side by side, each with
its position and the cache slot its key and value go to, and how attention and the LoRA adapters
see them.

Decoding sequences (one new token each) come first: the compiled paged-attention kernel attends
them in place (:class:`DecodeGroup`), or, without it, they share padded attention groups. Each
prefill chunk gets an attention group of its own (:class:`AttentionGroup`). Int4 weights run the
decoding rows on their 4-bit kernel and prefill rows on the bf16 copy (tasks.lm.int4); LoRA
segments name each run of rows with one adapter (tasks.lm.lora).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tasks.lm.int4 import INT4_MAX_ROWS
from tasks.lm.kvcache import PagedKVCache
from tasks.lm.lora import segments_of

LORA_GEMM_ROWS = 8  # a run of this many rows with one adapter goes through two matmuls, not the LoRA kernel


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
