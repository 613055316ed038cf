"""The serving strategies in virtual time: the same schedulers, with step times from a cost model.

This host has no GPU, so what LMaaS costs on one is simulated. :func:`simulate` replays a trace
through a mirror of each strategy's scheduler (tasks/lmaas/strategies.py and the engine's
continuous batching: admission up to ``max_running`` with fairness between tenants, decoding rows
first, then prefill chunks within ``max_batch_tokens``, adapters limited to ``lora_slots`` at once;
``merged_sequential``'s per-adapter queues and swaps; ``unbatched`` one at a time). Only the time a
step takes comes from a model:

- :class:`FittedStepCost`: fitted (non-negative least squares) on the engine's own step log, so
  the simulator can be checked against measured replays on this host;
- :class:`GpuStepCost`: a GPU kind from the device catalog. The device side is a roofline —
  weights, KV reads and adapters streamed at a share of the memory bandwidth, or the FLOPs at a
  share of the fp16 peak, whichever binds — plus a floor per kernel; the host side (scheduling,
  PyTorch dispatch, sampling: the same Python a GPU host runs) is measured here on a model of
  the same depth and negligible width (:func:`measure_host_side`). A step takes the longer of the
  two (kernels are queued while the host goes on).

Every figure made with :class:`GpuStepCost` is simulated and says so.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from tasks.lmaas.strategies import Replay, Served
from tasks.lmaas.trace import TraceRequest

# Device-side assumptions for the GPU roofline (stated in every simulated result):
MEMORY_EFFICIENCY = 0.8  # share of peak bandwidth a decode step's streaming reaches (STREAM-like copies reach 80-90%)
COMPUTE_EFFICIENCY = 0.6  # share of dense fp16 tensor peak for the step's small GEMMs
KERNEL_FLOOR_S = 3e-6  # a kernel that does nothing takes ~3 µs on recent GPUs and drivers (NVIDIA developer forums)
PCIE_GBPS = 25.0  # host → device copies of adapters (PCIe 4.0 x16, achieved)
KERNELS_PER_LAYER = 12  # 2 norms, 4 GEMMs (qkv, o, gate|up, down), RoPE, KV write, attention, SwiGLU, 2 residual adds
KERNELS_PER_LORA_LAYER = 2  # one gather-based shrink and one expand (BGMV) per fused layer with adapters
KERNELS_PER_STEP = 4  # embedding, final norm, output head, sampling


@dataclass(frozen=True)
class StepWork:
    """What one engine step computes (a record of the engine's ``step_log``)."""

    tokens: int  # rows of the forward: one per decoding sequence, a chunk per prefilling one
    sequences: int
    context_tokens: int  # keys the sequences attend to, summed over sequences
    adapters: int  # distinct adapters in the batch


class FittedStepCost:
    """Step seconds = a · (1, tokens, sequences, context tokens, adapters), a ≥ 0, fitted on a step log.

    ``swap_s`` and ``slot_load_s`` (merging one adapter into the weights; loading one into a LoRA
    slot) are taken as measured."""

    simulated = False
    features = ("step", "token", "sequence", "context_token", "adapter")

    def __init__(self, coefficients, swap_s: float, slot_load_s: float, name: str = "this host"):
        self.coefficients = np.asarray(coefficients, dtype=float)
        self.swap_s, self.slot_load_s, self.name = swap_s, slot_load_s, name

    @classmethod
    def fit(cls, steps: list[dict], *, swap_s: float, slot_load_s: float, name: str = "this host") -> "FittedStepCost":
        if len(steps) < len(cls.features):
            raise ValueError(f"a step-cost fit needs at least {len(cls.features)} steps, got {len(steps)}")
        x = np.array([[1.0, s["tokens"], s["sequences"], s["context_tokens"], s["adapters"]] for s in steps])
        y = np.array([s["seconds"] for s in steps])
        weights = 1.0 / np.maximum(y, 1e-4)  # relative error: short steps count as much as long ones
        coefficients, _ = nnls(x * weights[:, None], y * weights)
        return cls(coefficients, swap_s, slot_load_s, name)

    def step_s(self, work: StepWork) -> float:
        return float(self.coefficients @ [1.0, work.tokens, work.sequences, work.context_tokens, work.adapters])

    def describe(self) -> dict:
        return {"name": self.name, "simulated": False, "swap_s": self.swap_s, "slot_load_s": self.slot_load_s,
                **{f"seconds_per_{f}": float(c) for f, c in zip(self.features, self.coefficients)}}


@dataclass(frozen=True)
class HostSide:
    """The host's seconds per step (scheduling, dispatch, sampling) = base + per_token · tokens, and
    per adapter swap or slot load: measured by :func:`measure_host_side`."""

    base_s: float
    per_token_s: float
    swap_s: float
    slot_load_s: float

    def step_s(self, work: StepWork) -> float:
        return self.base_s + self.per_token_s * work.tokens


@dataclass
class GpuStepCost:
    """A GPU kind's step time for a model of ``config`` (bf16 weights and KV cache) with rank-``rank``
    adapters on ``targets``: max(host side, device side), the device side a roofline plus kernel floors."""

    device: object  # infra.catalog.DeviceKind
    config: object  # tasks.lm.weights.LlamaConfig
    rank: int
    targets: tuple[str, ...]
    host: HostSide
    simulated: bool = field(default=True, init=False)

    def __post_init__(self):
        from tasks.lm.lora import module_shapes

        c, shapes = self.config, module_shapes(self.config)
        self.weight_bytes = 2 * c.n_params
        self.kv_bytes_per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2
        lora_params = c.n_layers * sum(self.rank * (shapes[t][0] + shapes[t][1]) for t in self.targets)
        self.adapter_bytes = 2 * lora_params
        self.lora_flops_per_token = 2 * lora_params
        self.target_bytes = 2 * c.n_layers * sum(shapes[t][0] * shapes[t][1] for t in self.targets)
        self.bandwidth = MEMORY_EFFICIENCY * self.device.memory_gbps * 1e9
        self.flops = COMPUTE_EFFICIENCY * self.device.tflops_fp16 * 1e12
        self.name = self.device.device

    def device_s(self, work: StepWork) -> float:
        c = self.config
        moved = self.weight_bytes + work.context_tokens * self.kv_bytes_per_token + work.adapters * self.adapter_bytes
        flops = 2 * c.n_params * work.tokens + 4 * c.n_layers * c.dim * work.context_tokens
        flops += self.lora_flops_per_token * work.tokens if work.adapters else 0
        kernels = c.n_layers * (KERNELS_PER_LAYER + (KERNELS_PER_LORA_LAYER if work.adapters else 0)) + KERNELS_PER_STEP
        return kernels * KERNEL_FLOOR_S + max(moved / self.bandwidth, flops / self.flops)

    def step_s(self, work: StepWork) -> float:
        return max(self.host.step_s(work), self.device_s(work))

    @property
    def swap_s(self) -> float:
        """Merge one adapter into the target weights and later restore them: read and write them twice."""
        return self.host.swap_s + 4 * self.target_bytes / self.bandwidth

    @property
    def slot_load_s(self) -> float:
        return self.host.slot_load_s + self.adapter_bytes / (PCIE_GBPS * 1e9)

    def describe(self) -> dict:
        return {"name": self.name, "simulated": True, "memory_gbps": self.device.memory_gbps,
                "tflops_fp16": self.device.tflops_fp16, "memory_efficiency": MEMORY_EFFICIENCY,
                "compute_efficiency": COMPUTE_EFFICIENCY, "kernel_floor_s": KERNEL_FLOOR_S, "pcie_gbps": PCIE_GBPS,
                "host_side": self.host.__dict__, "swap_s": self.swap_s, "slot_load_s": self.slot_load_s,
                "decode_step_s": {b: self.step_s(StepWork(b, b, b * 128, min(b, 16))) for b in (1, 16, 64)}}


def measure_host_side(config, tokenizer, *, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                      rows: tuple[int, ...] = (1, 8, 32, 64), repeats: int = 12) -> HostSide:
    """The engine's host-side cost per step, on this host: the real engine (scheduling, flat batch,
    every PyTorch dispatch, sampling) on a model with ``config``'s depth and grouped-query ratio but
    16-wide heads, a 128-wide MLP and 512 tokens, whose arithmetic is negligible. Also one adapter
    swap (merging, as ``merged_sequential`` does) and one slot load on the same model."""
    from dataclasses import replace

    import torch

    from tasks.lm.engine import LMEngine
    from tasks.lm.lora import random_adapter
    from tasks.lm.model import Llama
    from tasks.lm.sampling import SamplingParams
    from tasks.lm.weights import random_checkpoint
    from tasks.lmaas.strategies import MergedWeights

    group = config.n_heads // config.n_kv_heads
    narrow = replace(config, dim=16 * 2 * group, ffn_dim=128, n_heads=2 * group, n_kv_heads=2, vocab_size=512)
    model = Llama.from_weights(narrow, random_checkpoint(narrow), "bfloat16")
    engine = LMEngine(model, tokenizer, kv_cache_mib=64, lora_slots=16, lora_rank=rank, lora_targets=targets,
                      prefix_caching=False)
    for i in range(16):
        engine.add_adapter(f"a{i}", random_adapter(narrow, rank=rank, targets=targets, seed=i))
    samples = []
    params = SamplingParams(temperature=0, max_tokens=repeats + 2, ignore_eos=True)
    with torch.inference_mode():
        for n in rows:
            engine.step_log = []
            requests = [engine.submit(engine.open(list(range(100, 132)), f"a{i % 16}"), params, owns_sequence=True)
                        for i in range(n)]
            engine.run(requests)
            samples += [s for s in engine.step_log if s["tokens"] == s["sequences"] == n]  # the decode steps
        engine.step_log = None
    x = np.array([[1.0, s["tokens"]] for s in samples])
    (base, per_row), _ = nnls(x, np.array([s["seconds"] for s in samples]))
    merged = MergedWeights(LMEngine(Llama.from_weights(narrow, random_checkpoint(narrow), "bfloat16"), tokenizer,
                                    kv_cache_mib=8))
    adapter = random_adapter(narrow, rank=rank, targets=targets, seed=99)
    swaps = []
    for k in range(6):
        started = time.perf_counter()
        merged.swap(f"s{k}", adapter)
        swaps.append(time.perf_counter() - started)
    slot_load_s = engine.stats["adapter_load_s"] / max(1, engine.stats["adapter_loads"])
    return HostSide(float(base), float(per_row), float(np.median(swaps)), slot_load_s)


# --- the schedulers in virtual time ------------------------------------------------------------

@dataclass
class _Live:
    request: TraceRequest
    order: int
    computed: int = 0  # tokens whose keys are in the cache
    generated: int = 0
    first_at: float | None = None
    done_at: float | None = None

    @property
    def length(self) -> int:
        return len(self.request.prompt) + self.generated

    @property
    def adapter(self) -> str | None:
        return None if self.request.model == "base" else self.request.model


class _Engine:
    """The engine's continuous batching in virtual time (``merged=True``: adapters merged, none in the batch)."""

    def __init__(self, cost, max_running: int, max_batch_tokens: int, lora_slots: int, merged: bool = False):
        self.cost, self.max_running, self.max_batch_tokens = cost, max_running, max_batch_tokens
        self.lora_slots, self.merged = lora_slots, merged
        self.waiting: deque[_Live] = deque()
        self.running: list[_Live] = []
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.clock, self.steps, self.slot_loads = 0.0, 0, 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _make_resident(self, adapter: str) -> bool:
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            return True
        if len(self.resident) >= self.lora_slots:
            busy = {r.adapter for r in self.running}
            victim = next((a for a in self.resident if a not in busy), None)
            if victim is None:
                return False
            del self.resident[victim]
        self.resident[adapter] = None
        self.clock += self.cost.slot_load_s
        self.slot_loads += 1
        return True

    def _admit(self) -> None:
        counts: dict[str, int] = {}
        for r in self.running:
            counts[r.request.tenant] = counts.get(r.request.tenant, 0) + 1
        candidates, deferred = list(self.waiting), False
        while candidates and len(self.running) < self.max_running:
            best = min(candidates, key=lambda r: (counts.get(r.request.tenant, 0), r.order))  # fewest running first
            candidates.remove(best)
            if not self.merged and best.adapter is not None and not self._make_resident(best.adapter):
                if not deferred:  # every slot is busy, and admitting more only adds busy adapters:
                    deferred = True  # from now on, only requests whose adapter is resident can go in
                    candidates = [r for r in candidates if r.adapter is None or r.adapter in self.resident]
                continue
            self.waiting.remove(best)
            self.running.append(best)
            counts[best.request.tenant] = counts.get(best.request.tenant, 0) + 1

    def step(self) -> list[_Live]:
        self._admit()
        if not self.running:
            return []
        budget = self.max_batch_tokens
        decoding = [r for r in self.running if r.length - r.computed == 1]
        prefilling = [r for r in self.running if r.length - r.computed > 1]
        work = []
        for live in decoding + prefilling:
            if budget <= 0:
                break
            n = min(live.length - live.computed, budget)
            work.append((live, n))
            budget -= n
        adapters = 0 if self.merged else len({live.adapter for live, _ in work if live.adapter is not None})
        done = StepWork(sum(n for _, n in work), len(work), sum(live.computed + n for live, n in work), adapters)
        self.clock += self.cost.step_s(done)
        self.steps += 1
        finished = []
        for live, n in work:
            live.computed += n
            if live.computed == live.length:  # the sequence's last known token: a new one is sampled
                live.generated += 1
                live.first_at = live.first_at if live.first_at is not None else self.clock
                if live.generated >= live.request.max_tokens:
                    live.done_at = self.clock
                    self.running.remove(live)
                    finished.append(live)
        return finished


def _replay(strategy: str, engine: _Engine, trace: list[TraceRequest], merged: bool) -> Replay:
    pending = deque(_Live(r, i) for i, r in enumerate(sorted(trace, key=lambda r: r.at_s)))
    everyone = list(pending)
    queues: OrderedDict[str, deque[_Live]] = OrderedDict()
    current, swaps, swap_s = "base", 0, 0.0
    while pending or engine.has_work or any(queues.values()):
        while pending and pending[0].request.at_s <= engine.clock:
            live = pending.popleft()
            if merged:
                queues.setdefault(live.request.model, deque()).append(live)
            else:
                engine.waiting.append(live)
        if merged:
            if not engine.has_work:
                waiting = [(q[0].request.at_s, model) for model, q in queues.items() if q]
                if waiting:
                    _, model = min(waiting)
                    if model != current:
                        engine.clock += engine.cost.swap_s
                        swap_s += engine.cost.swap_s
                        swaps, current = swaps + 1, model
            queue = queues.get(current)
            while queue:
                engine.waiting.append(queue.popleft())
        if engine.has_work:
            engine.step()
        elif pending and not any(queues.values()):
            engine.clock = max(engine.clock, pending[0].request.at_s)
    served = [Served(x.request.model, x.request.tenant, x.request.at_s, x.first_at - x.request.at_s,
                     x.done_at - x.request.at_s, len(x.request.prompt), x.generated) for x in everyone]
    return Replay(strategy, served, engine.clock, swaps, swap_s,
                  stats={"steps": engine.steps, "slot_loads": engine.slot_loads, "simulated": engine.cost.simulated,
                         "device": engine.cost.name})


def simulate(strategy: str, trace: list[TraceRequest], cost, *, max_running: int = 64, max_batch_tokens: int = 256,
             lora_slots: int = 32) -> Replay:
    """Replay ``trace`` with ``strategy`` (multi_lora, merged_sequential or unbatched) in virtual
    time, each step taking ``cost.step_s`` seconds (a :class:`FittedStepCost` or :class:`GpuStepCost`)."""
    if strategy == "multi_lora":
        return _replay(strategy, _Engine(cost, max_running, max_batch_tokens, lora_slots), trace, merged=False)
    if strategy == "unbatched":
        return _replay(strategy, _Engine(cost, 1, max_batch_tokens, lora_slots), trace, merged=False)
    if strategy == "merged_sequential":
        return _replay(strategy, _Engine(cost, max_running, max_batch_tokens, lora_slots, merged=True), trace,
                       merged=True)
    raise ValueError(f"strategy {strategy!r} is not one of multi_lora, merged_sequential, unbatched")
