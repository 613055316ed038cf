"""Which LoRA adapters the engine holds: a least-recently-used set in host memory, and the few of
them resident in the :class:`~tasks.lm.lora.LoraPool`'s slots, where a batch can use them.

The engine tells the cache which adapters its requests use (``in_use``): an adapter a waiting or
running request needs is never dropped from host memory, and one a running request uses never
loses its slot.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection

from tasks.lm.lora import LoraAdapter, LoraPool

# counters, named as the engine's stats report them
EMPTY_STATS = {"adapter_loads": 0, "adapter_evictions": 0, "adapter_load_s": 0.0, "adapter_host_evictions": 0}


class AdapterCache:
    """Up to ``max_host_adapters`` adapters in host memory (least recently used first) and the
    ``pool.n_slots - 1`` of them in pool slots (slot 0 means the base model)."""

    def __init__(self, pool: LoraPool, max_host_adapters: int = 1024):
        if max_host_adapters < 1:
            raise ValueError(f"max_host_adapters must be ≥ 1; got {max_host_adapters}")
        self.pool, self.max_host_adapters = pool, max_host_adapters
        self.adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first
        self._free_slots = list(range(pool.n_slots - 1, 0, -1))
        self.stats = dict(EMPTY_STATS)

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def get(self, name: str) -> LoraAdapter | None:
        return self.adapters.get(name)

    def add(self, name: str, adapter: LoraAdapter, in_use: Collection[str] = ()) -> bool:
        """Hold ``adapter`` under ``name``, replacing its weights (in its slot too) if the name is
        held; then drop least recently used adapters nobody in ``in_use`` needs while host memory is
        over its bound. True when a held adapter was replaced."""
        self.pool.check(adapter)
        replaced = name in self.adapters
        self.adapters[name] = adapter
        self.adapters.move_to_end(name)
        if name in self.resident:
            self.pool.load(self.resident[name], adapter)
        keep = set(in_use) | {name}
        over = max(0, len(self.adapters) - self.max_host_adapters)
        for old in [n for n in self.adapters if n not in keep][:over]:
            self.remove(old)
            self.stats["adapter_host_evictions"] += 1
        return replaced

    def remove(self, name: str) -> None:
        """Forget ``name`` (its slot, if any, becomes free)."""
        self.adapters.pop(name, None)
        if name in self.resident:
            self._free_slots.append(self.resident.pop(name))

    def slot(self, name: str | None) -> int:
        """The pool slot holding ``name`` (0: the base model); the adapter must be resident."""
        return 0 if name is None else self.resident[name]

    def make_resident(self, name: str, in_use: Collection[str] = ()) -> bool:
        """Put ``name`` in a pool slot, evicting the least recently used resident adapter that
        nobody in ``in_use`` needs; False when every slot serves one of ``in_use``."""
        self.adapters.move_to_end(name)
        if name in self.resident:
            self.resident.move_to_end(name)
            return True
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next((n for n in self.resident if n not in in_use), None)
            if victim is None:
                return False
            slot = self.resident.pop(victim)
            self.stats["adapter_evictions"] += 1
        started = time.perf_counter()
        self.pool.load(slot, self.adapters[name])
        self.stats["adapter_load_s"] += time.perf_counter() - started
        self.stats["adapter_loads"] += 1
        self.resident[name] = slot
        return True
