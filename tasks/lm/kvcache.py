"""A paged KV cache: fixed-size token blocks shared between sequences by reference count.

Each layer's keys and values live in one pool ``[n_kv_heads, n_blocks, block_size, head_dim]``.
A sequence owns a list of blocks (its block table). Blocks are shared, never copied, when:

- a sequence is forked: the child takes the parent's table and every block's count goes up;
- a prompt starts with token blocks already computed: full blocks are registered under a hash
  of their tokens and of every token before them, so a repeated prefix is found and reused.

A shared block, or one registered for prefix reuse, is copied before anyone writes into it
(copy-on-write), so forks and cached prefixes never see each other's later tokens. Truncating a
sequence to an earlier position only drops block references: nothing is recomputed or moved.
Blocks nobody references stay in the prefix cache until space is needed (least recently used
goes first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from tasks.lm.weights import LlamaConfig


class CacheFullError(RuntimeError):
    """Every block is referenced by a live sequence: nothing can be evicted."""


@dataclass
class SequenceKV:
    """What the cache holds for one sequence: its tokens, how many of them have keys and values
    in the cache, and the blocks those live in."""

    tokens: list[int]
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of full, computed blocks, in order
    adapter: str | None = None  # the LoRA adapter its keys and values are computed with


class PagedKVCache:
    def __init__(self, config: LlamaConfig, n_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32):
        if n_blocks < 2 or block_size < 1:
            raise ValueError(f"a KV cache needs at least 2 blocks of at least 1 token (got {n_blocks} × {block_size})")
        # [layer, KV head, block, slot, head_dim]: a gather of blocks is contiguous per KV head
        shape = (config.n_layers, config.n_kv_heads, n_blocks, block_size, config.head_dim)
        # zeros, not empty: padded attention reads past a sequence's end, and 0 × NaN garbage is NaN
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.refs = [0] * n_blocks
        self._free: deque[int] = deque(range(1, n_blocks))
        self.null_block = 0  # never handed out: pads block tables
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody references, LRU first
        self.stats = {"prefix_hit_tokens": 0, "prefix_lookup_tokens": 0, "copy_on_write": 0, "evicted": 0}

    # --- capacity -------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, seq: SequenceKV, length: int) -> int:
        """New blocks a sequence needs to hold ``length`` tokens (copy-on-write included)."""
        need = -(-length // self.block_size) - len(seq.blocks) + self._must_copy(seq)
        return max(need, 0)

    def _must_copy(self, seq: SequenceKV) -> bool:
        """Whether the block ``seq`` writes next is shared or cached (so it is copied first)."""
        first = seq.computed // self.block_size
        if first >= len(seq.blocks):
            return False
        block = seq.blocks[first]
        return self.refs[block] > 1 or block in self._hash_of

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self.stats["evicted"] += 1
        else:
            raise CacheFullError(f"all {self.n_blocks - 1} KV blocks are held by live sequences")
        self.refs[block] = 1
        return block

    def _release_block(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _retain_block(self, block: int) -> None:
        if self.refs[block] == 0:
            self._evictable.pop(block, None)
        self.refs[block] += 1

    # --- sequences --------------------------------------------------------------------------
    def _chain_hash(self, parent: int | None, tokens: list[int]) -> int:
        return hash((parent, tuple(tokens)))

    @staticmethod
    def _root(adapter: str | None) -> int | None:
        """The hash chain's start: a LoRA adapter changes keys and values, so each has its own prefixes."""
        return None if adapter is None else hash(("adapter", adapter))

    def open(self, tokens: list[int], adapter: str | None = None) -> SequenceKV:
        """A new sequence holding nothing yet (its prefix is looked up when it first runs)."""
        return SequenceKV(tokens=list(tokens), adapter=adapter)

    def reuse_prefix(self, seq: SequenceKV) -> int:
        """Attach the longest run of ``seq``'s full token blocks already in the cache to a sequence
        that holds nothing yet; returns the tokens reused. The last token is always left to
        compute, so the sequence's first step has logits."""
        if seq.blocks or seq.computed:
            return 0
        bs, parent = self.block_size, self._root(seq.adapter)
        n_full = (len(seq.tokens) - 1) // bs
        self.stats["prefix_lookup_tokens"] += n_full * bs
        for i in range(n_full):
            parent = self._chain_hash(parent, seq.tokens[i * bs:(i + 1) * bs])
            block = self._by_hash.get(parent)
            if block is None:
                break
            self._retain_block(block)
            seq.blocks.append(block)
            seq.block_hashes.append(parent)
        seq.computed = len(seq.blocks) * bs
        self.stats["prefix_hit_tokens"] += seq.computed
        return seq.computed

    def cached_prefix_length(self, tokens: list[int], adapter: str | None = None) -> int:
        """How many leading tokens :meth:`reuse_prefix` would find cached now (changes nothing)."""
        bs, parent, n = self.block_size, self._root(adapter), 0
        for i in range((len(tokens) - 1) // bs):
            parent = self._chain_hash(parent, tokens[i * bs:(i + 1) * bs])
            if parent not in self._by_hash:
                break
            n += bs
        return n

    def fork(self, seq: SequenceKV) -> SequenceKV:
        """A child sequence that shares every block of ``seq``; neither sees the other's later tokens."""
        for block in seq.blocks:
            self._retain_block(block)
        return SequenceKV(tokens=list(seq.tokens), computed=seq.computed, blocks=list(seq.blocks),
                          block_hashes=list(seq.block_hashes), adapter=seq.adapter)

    def truncate(self, seq: SequenceKV, length: int) -> None:
        """Roll ``seq`` back to its first ``length`` tokens: drops block references, moves nothing."""
        if not 0 <= length <= len(seq.tokens):
            raise ValueError(f"cannot truncate a sequence of {len(seq.tokens)} tokens to {length}")
        keep = -(-length // self.block_size)
        for block in seq.blocks[keep:]:
            self._release_block(block)
        del seq.blocks[keep:]
        del seq.block_hashes[length // self.block_size:]
        del seq.tokens[length:]
        seq.computed = min(seq.computed, length)

    def release(self, seq: SequenceKV) -> None:
        for block in seq.blocks:
            self._release_block(block)
        seq.blocks.clear()
        seq.block_hashes.clear()
        seq.computed = 0

    def reserve(self, seq: SequenceKV, length: int) -> None:
        """Make blocks for positions ``seq.computed .. length-1`` writable by ``seq`` alone."""
        bs = self.block_size
        if self._must_copy(seq):
            first = seq.computed // bs
            old, new = seq.blocks[first], self._allocate()
            self.k[:, :, new] = self.k[:, :, old]
            self.v[:, :, new] = self.v[:, :, old]
            self._release_block(old)
            seq.blocks[first] = new
            self.stats["copy_on_write"] += 1
        while len(seq.blocks) * bs < length:
            seq.blocks.append(self._allocate())

    def commit(self, seq: SequenceKV, length: int) -> None:
        """Record that ``seq``'s first ``length`` tokens are in the cache; full blocks become
        reusable by later prompts with the same prefix."""
        seq.computed = length
        bs = self.block_size
        while len(seq.block_hashes) < length // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else self._root(seq.adapter)
            h = self._chain_hash(parent, seq.tokens[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.blocks[i]
            if h not in self._by_hash and block not in self._hash_of:
                self._by_hash[h] = block
                self._hash_of[block] = h

    def slots(self, seq: SequenceKV, start: int, end: int) -> list[int]:
        """Flat slot indices (block * block_size + offset) of positions ``start .. end-1``."""
        bs = self.block_size
        return [seq.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks still referenced stay with their sequences)."""
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()
