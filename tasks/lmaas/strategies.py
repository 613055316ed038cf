"""Ways to serve a multi-tenant, multi-adapter trace on one worker, each replayed in real time.

- ``multi_lora`` (LMaaS): every request joins the running batch whatever its adapter; the adapters'
  deltas are added per segment of rows in the same forward (tasks/lm/lora.py).
- ``merged_sequential`` (a plain single-model server): one adapter is merged into the weights at
  a time. Requests wait in per-adapter queues; the server batches the current adapter's queue, and
  when it empties switches to the adapter with the oldest waiting request: un-merge, merge the next
  (a swap, timed and counted in latency).
- ``unbatched``: one request at a time, on the multi-adapter engine.

All three run the same base weights in the same format, so what differs is batching across
adapters and swapping, not the arithmetic. Times are wall-clock on this machine: arrivals are
honoured, so a request's latency includes its wait.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from tasks.lm.engine import LMEngine, Request
from tasks.lm.lora import LoraAdapter, fused_deltas
from tasks.lm.sampling import SamplingParams
from tasks.lm.scheduling import TenantFairShare
from tasks.lmaas.trace import TraceRequest

STRATEGIES = ("multi_lora", "merged_sequential", "unbatched")


@dataclass
class Served:
    model: str
    tenant: str
    arrived_s: float
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cold_start_s: float = 0.0  # how long it waited for a replica to start (serverless; 0: one was ready)


@dataclass
class Replay:
    strategy: str
    served: list[Served]
    makespan_s: float
    swaps: int = 0
    swap_s: float = 0.0
    stats: dict = field(default_factory=dict)

    def summary(self) -> dict:
        latencies = sorted(s.latency_s for s in self.served)
        ttfts = sorted(s.ttft_s for s in self.served)
        tokens = sum(s.completion_tokens for s in self.served)

        def pct(values, q):
            return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")
        tpot = [(s.latency_s - s.ttft_s) / (s.completion_tokens - 1) for s in self.served if s.completion_tokens > 1]
        return {"strategy": self.strategy, "requests": len(self.served), "completion_tokens": tokens,
                "makespan_s": self.makespan_s, "tokens_per_s": tokens / self.makespan_s if self.makespan_s else 0.0,
                "latency_p50_s": pct(latencies, 0.5), "latency_p99_s": pct(latencies, 0.99),
                "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
                "tpot_median_s": statistics.median(tpot) if tpot else float("nan"),
                "swaps": self.swaps, "swap_s": self.swap_s, **self.stats}


def slo_rows(strategy: str, served: list[dict], objectives: dict[str, tuple[float, float]]) -> list[dict]:
    """Per tenant: the share of ``served`` requests (:class:`Served` as dicts) meeting the tenant's
    TTFT and TPOT objectives (``objectives``: tenant → (TTFT s, TPOT s)), each and both. Requests that
    waited for a replica to start are counted apart: ``warm_attainment`` is over the others (None if
    every request met a cold start), ``cold_requests`` / ``cold_wait_s_max`` say how many met one and
    the longest wait."""
    from tasks.lmaas.registry import slo_attainment

    def timings(requests):
        return [(s["ttft_s"], s["latency_s"], s["completion_tokens"]) for s in requests]

    rows = []
    for tenant, (ttft_slo_s, tpot_slo_s) in sorted(objectives.items()):
        mine = [s for s in served if s["tenant"] == tenant]
        if not mine:
            continue
        slo = slo_attainment(timings(mine), ttft_slo_s, tpot_slo_s)
        cold = [s for s in mine if s.get("cold_start_s", 0.0) > 0]
        warm = [s for s in mine if s.get("cold_start_s", 0.0) == 0]
        rows.append({"strategy": strategy, "tenant": tenant, "requests": len(mine),
                     **{k: slo[k] for k in ("ttft_slo_s", "tpot_slo_s", "ttft_attainment", "tpot_attainment")},
                     "slo_attainment": slo["attainment"], "warm_requests": len(warm),
                     "warm_attainment": slo_attainment(timings(warm), ttft_slo_s, tpot_slo_s)["attainment"],
                     "cold_requests": len(cold), "cold_wait_s_max": max((s["cold_start_s"] for s in cold), default=0.0)})
    return rows


def _params(request: TraceRequest) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=request.max_tokens, ignore_eos=True)


def _adapter_name(model: str) -> str | None:
    return None if model == "base" else model


class _Clock:
    """Trace time: seconds since the replay started (arrivals scaled by ``time_scale``)."""

    def __init__(self, time_scale: float):
        self.start, self.scale = time.perf_counter(), time_scale

    def now(self) -> float:
        return time.perf_counter() - self.start

    def due(self, request: TraceRequest) -> float:
        return request.at_s * self.scale

    def wait_for(self, request: TraceRequest) -> None:
        delay = self.due(request) - self.now()
        if delay > 0:
            time.sleep(delay)


def _served(request: TraceRequest, r: Request, clock: _Clock, started: float) -> Served:
    arrived = clock.due(request)
    # engine times are perf_counter values; the trace clock counts from ``started``
    return Served(request.model, request.tenant, arrived, r.first_token_at - started - arrived,
                  r.finished_at - started - arrived, r.prompt_tokens, r.completion_tokens)


def replay_multi_lora(engine: LMEngine, adapters: dict[str, LoraAdapter], trace: list[TraceRequest], *,
                      time_scale: float = 1.0, max_running: int | None = None, strategy: str = "multi_lora") -> Replay:
    """Every request is submitted at its arrival and joins the running batch whatever its adapter
    (``max_running=1``: the ``unbatched`` strategy)."""
    for name, adapter in adapters.items():
        if name not in engine.adapters:
            engine.add_adapter(name, adapter)
    limit = engine.max_running
    if max_running is not None:
        engine.max_running = max_running
    loads_before = engine.stats["adapter_loads"]
    pending, live = deque(sorted(trace, key=lambda r: r.at_s)), []
    clock = _Clock(time_scale)
    try:
        while pending or engine.has_work:
            while pending and clock.due(pending[0]) <= clock.now():
                request = pending.popleft()
                seq = engine.open(list(request.prompt), _adapter_name(request.model))
                live.append((request, engine.submit(seq, _params(request), owns_sequence=True, tenant=request.tenant)))
            if engine.has_work:
                engine.step()
            elif pending:
                clock.wait_for(pending[0])
    finally:
        engine.max_running = limit
    makespan = clock.now()
    served = [_served(request, r, clock, clock.start) for request, r in live]
    return Replay(strategy, served, makespan, stats={"adapter_loads": engine.stats["adapter_loads"] - loads_before})


class MergedWeights:
    """One adapter merged into a bf16 or float32 model's fused weights at a time."""

    def __init__(self, engine: LMEngine):
        if engine.model.weight_format == "int4":
            raise ValueError("merged_sequential merges adapters into dense weights: use a bfloat16 or float32 engine")
        self.engine, self.current = engine, None
        self._touched: list[tuple[int, str]] = []
        self.base = {(i, kind): getattr(layer.attn if kind in ("wqkv", "wo") else layer.ffn, kind).clone()
                     for i, layer in enumerate(engine.model.layers) for kind in ("wqkv", "wo", "w_gate_up", "w_down")}

    def _weight(self, layer: int, kind: str) -> torch.Tensor:
        block = self.engine.model.layers[layer]
        return getattr(block.attn if kind in ("wqkv", "wo") else block.ffn, kind)

    def swap(self, name: str | None, adapter: LoraAdapter | None) -> None:
        """Restore the base weights the current adapter touched, then merge ``adapter``."""
        if name == self.current:
            return
        if self.current is not None:
            for key in self._touched:
                self._weight(*key).copy_(self.base[key])
        self._touched = []
        if adapter is not None:
            config = self.engine.config
            for (layer, kind), parts in fused_deltas(adapter, config).items():
                weight = self._weight(layer, kind)
                merged = self.base[layer, kind].float()
                for row, delta in parts:
                    merged[row:row + delta.shape[0]] += delta
                weight.copy_(merged.to(weight.dtype))
                self._touched.append((layer, kind))
        self.current = name
        self.engine.cache.clear_prefix_cache()  # keys and values of the previous weights


def replay_merged_sequential(engine: LMEngine, adapters: dict[str, LoraAdapter], trace: list[TraceRequest], *,
                             time_scale: float = 1.0) -> Replay:
    """A single-model server: batches only requests of the adapter currently merged; when their
    queue empties, swaps to the adapter whose first waiting request is oldest."""
    merged = MergedWeights(engine)
    pending = deque(sorted(trace, key=lambda r: r.at_s))
    queues: OrderedDict[str, deque[TraceRequest]] = OrderedDict()
    live, swaps, swap_s = [], 0, 0.0
    clock = _Clock(time_scale)
    current = "base"
    try:
        while pending or engine.has_work or any(queues.values()):
            while pending and clock.due(pending[0]) <= clock.now():
                request = pending.popleft()
                queues.setdefault(request.model, deque()).append(request)
            if not engine.has_work:
                waiting = [(q[0].at_s, model) for model, q in queues.items() if q]
                if waiting:
                    _, next_model = min(waiting)
                    if next_model != current:
                        started = time.perf_counter()
                        merged.swap(_adapter_name(next_model), adapters.get(next_model))
                        swap_s += time.perf_counter() - started
                        swaps += 1
                        current = next_model
            queue = queues.get(current)
            while queue:  # the current adapter's requests join its batch
                request = queue.popleft()
                seq = engine.open(list(request.prompt))
                live.append((request, engine.submit(seq, _params(request), owns_sequence=True, tenant=request.tenant)))
            if engine.has_work:
                engine.step()
            elif pending and not any(queues.values()):
                clock.wait_for(pending[0])
    finally:
        merged.swap(None, None)
    makespan = clock.now()
    served = [_served(request, r, clock, clock.start) for request, r in live]
    return Replay("merged_sequential", served, makespan, swaps, swap_s)


def replay(strategy: str, engine: LMEngine, adapters: dict[str, LoraAdapter], trace: list[TraceRequest], *,
           time_scale: float = 1.0) -> Replay:
    """Replay ``trace`` with ``strategy`` (one of :data:`STRATEGIES`), every strategy admitting
    requests fairly between tenants as the LMaaS service does."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    policy, engine.policy = engine.policy, TenantFairShare()
    try:
        if strategy == "multi_lora":
            return replay_multi_lora(engine, adapters, trace, time_scale=time_scale)
        if strategy == "unbatched":
            return replay_multi_lora(engine, adapters, trace, time_scale=time_scale, max_running=1, strategy="unbatched")
        return replay_merged_sequential(engine, adapters, trace, time_scale=time_scale)
    finally:
        engine.policy = policy
