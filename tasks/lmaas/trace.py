"""Multi-tenant request traces for LMaaS: skewed adapter popularity and bursty arrivals.

- Popularity is Zipf: the adapter of rank i is asked for with probability ∝ 1 / i^s (s ≈ 1 in
  S-LoRA's and Punica's synthetic workloads; a few adapters get most requests, most get few).
- Arrivals are a two-state Markov-modulated Poisson process: calm periods at ``rate`` and bursts
  at ``burst_factor × rate``, each lasting an exponential time; bursts make queues form and drain.
- Prompts are slices of a shipped corpus; each request asks for a number of new tokens drawn
  uniformly from a range.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TraceRequest:
    at_s: float  # arrival, seconds from the trace's start
    tenant: str
    model: str  # "base" or "<tenant>/<adapter>"
    prompt: tuple[int, ...]
    max_tokens: int


def zipf_weights(n: int, s: float) -> list[float]:
    weights = [1.0 / (rank ** s) for rank in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def bursty_arrivals(n: int, rate: float, burst_factor: float, mean_calm_s: float, mean_burst_s: float,
                    rng: random.Random) -> list[float]:
    """``n`` arrival times of the two-state MMPP described in the module docstring."""
    times, now, bursting = [], 0.0, False
    switch = rng.expovariate(1 / mean_calm_s)
    while len(times) < n:
        current = rate * (burst_factor if bursting else 1.0)
        gap = rng.expovariate(current)
        if now + gap >= switch:  # the state changes first: memorylessness lets the clock restart there
            now, bursting = switch, not bursting
            switch = now + rng.expovariate(1 / (mean_burst_s if bursting else mean_calm_s))
            continue
        now += gap
        times.append(now)
    return times


def make_trace(models: list[str], corpus_tokens: list[int], *, n_requests: int, rate: float, zipf_s: float = 1.0,
               burst_factor: float = 4.0, mean_calm_s: float = 4.0, mean_burst_s: float = 1.0,
               prompt_tokens: tuple[int, int] = (16, 96), max_tokens: tuple[int, int] = (16, 64),
               seed: int = 0) -> list[TraceRequest]:
    """A trace over ``models`` (``<tenant>/<adapter>`` names, in popularity order) with ``n_requests``
    arriving at ``rate`` requests/s on average outside bursts."""
    if not models:
        raise ValueError("models: at least one model name is needed")
    if n_requests < 1 or rate <= 0:
        raise ValueError(f"n_requests must be ≥ 1 and rate > 0 (got {n_requests}, {rate})")
    low, high = prompt_tokens
    if len(corpus_tokens) <= high:
        raise ValueError(f"the corpus has {len(corpus_tokens)} tokens; prompts need more than {high}")
    rng = random.Random(seed)
    arrivals = bursty_arrivals(n_requests, rate, burst_factor, mean_calm_s, mean_burst_s, rng)
    chosen = rng.choices(models, weights=zipf_weights(len(models), zipf_s), k=n_requests)
    trace = []
    for at, model in zip(arrivals, chosen):
        length = rng.randint(low, high)
        start = rng.randrange(0, len(corpus_tokens) - length)
        tenant = model.split("/", 1)[0] if "/" in model else "public"
        trace.append(TraceRequest(at, tenant, model, tuple(corpus_tokens[start:start + length]),
                                  rng.randint(*max_tokens)))
    return trace
