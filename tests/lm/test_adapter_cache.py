"""The LoRA adapter cache on its own: host memory bounded least-recently-used first, pool slots
given to the adapters requests need, and nothing a request uses ever dropped."""

from __future__ import annotations

import pytest
import torch

from tasks.lm.adapter_cache import AdapterCache
from tasks.lm.lora import LoraPool, random_adapter
from tasks.lm.weights import LlamaConfig

CONFIG = LlamaConfig(n_layers=1, dim=32, ffn_dim=64, n_heads=4, n_kv_heads=2, vocab_size=50, context_length=32,
                     rope_base=1e4, norm_eps=1e-5, tied_embeddings=True)
TARGETS = ("q_proj", "v_proj")


def adapter(seed: int):
    return random_adapter(CONFIG, rank=4, targets=TARGETS, seed=seed, std=0.1)


def cache(slots: int = 2, host: int = 3) -> AdapterCache:
    return AdapterCache(LoraPool(CONFIG, slots + 1, 4, TARGETS, compiled=False), max_host_adapters=host)


def test_host_memory_keeps_the_most_recently_used_and_spares_adapters_in_use():
    c = cache(host=3)
    for i in range(3):
        c.add(f"a{i}", adapter(i))
    c.add("a3", adapter(3), in_use={"a0"})  # over the bound: a1 is the oldest nobody needs
    assert list(c.adapters) == ["a0", "a2", "a3"] and c.stats["adapter_host_evictions"] == 1
    c.make_resident("a0")  # using an adapter makes it recent
    c.add("a4", adapter(4))
    assert list(c.adapters) == ["a3", "a0", "a4"]


def test_slots_go_to_the_least_recently_used_adapter_not_in_use():
    c = cache(slots=2, host=10)
    for i in range(3):
        c.add(f"a{i}", adapter(i))
    assert c.make_resident("a0") and c.make_resident("a1")
    assert {c.slot("a0"), c.slot("a1")} == {1, 2} and c.slot(None) == 0
    assert not c.make_resident("a2", in_use={"a0", "a1"})  # every slot serves a running request
    assert c.make_resident("a2", in_use={"a0"})  # a1 gives its slot
    assert set(c.resident) == {"a0", "a2"} and c.stats["adapter_evictions"] == 1 and c.stats["adapter_loads"] == 3
    with pytest.raises(KeyError):
        c.slot("a1")


def test_the_pool_slot_holds_the_adapters_weights_and_a_replacement_reloads_it():
    c = cache()
    c.add("bot", adapter(1))
    c.make_resident("bot")
    slot, a = c.slot("bot"), c.pool.a[0, "wqkv"]
    first = a[slot].clone()
    assert first.abs().sum() > 0
    assert c.add("bot", adapter(2)) is True  # re-registered: new weights, same slot
    assert c.slot("bot") == slot and not torch.equal(a[slot], first)
    c.remove("bot")
    assert "bot" not in c and "bot" not in c.resident
    c.add("next", adapter(3))
    assert c.make_resident("next") and c.slot("next") == slot  # the freed slot is reused


def test_an_adapter_the_pool_cannot_serve_is_refused_before_it_is_held():
    c = cache()
    too_wide = random_adapter(CONFIG, rank=8, targets=TARGETS, seed=0)
    with pytest.raises(ValueError, match="exceeds the pool's max rank 4"):
        c.add("wide", too_wide)
    assert "wide" not in c
