"""Serving strategies replayed on a trace: every request is served whole under each; the merged
baseline swaps when the adapter changes; the trace is skewed and bursty as specified."""

from __future__ import annotations

import pytest

from tasks.lm.engine import LMEngine
from tasks.lm.lora import MODULES, random_adapter
from tasks.lmaas.strategies import MergedWeights, replay, slo_rows
from tasks.lmaas.trace import bursty_arrivals, make_trace, zipf_weights


@pytest.fixture(scope="module")
def engine():
    return LMEngine.load(weight_format="bfloat16", kv_cache_mib=64, lora_slots=3, lora_rank=8, lora_targets=tuple(MODULES))


@pytest.fixture(scope="module")
def adapters(engine):
    return {f"t{i}/a": random_adapter(engine.config, rank=8, seed=i, std=0.05) for i in range(3)}


def test_the_trace_is_zipf_skewed_bursty_and_repeatable():
    weights = zipf_weights(4, 1.0)
    assert weights == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])
    corpus = list(range(1000))
    trace = make_trace(["a/x", "a/y", "b/z"], corpus, n_requests=300, rate=5, seed=3)
    assert trace == make_trace(["a/x", "a/y", "b/z"], corpus, n_requests=300, rate=5, seed=3)
    counts = [sum(r.model == m for r in trace) for m in ("a/x", "a/y", "b/z")]
    assert counts[0] > counts[1] > counts[2]
    assert all(16 <= len(r.prompt) <= 96 and 16 <= r.max_tokens <= 64 for r in trace)
    assert {r.tenant for r in trace} == {"a", "b"}
    import random
    times = bursty_arrivals(4000, rate=2.0, burst_factor=8.0, mean_calm_s=5.0, mean_burst_s=5.0, rng=random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 1.3  # burstier than Poisson (whose gaps have a coefficient of variation of 1)


@pytest.mark.parametrize("strategy", ["multi_lora", "merged_sequential", "unbatched"])
def test_every_strategy_serves_every_request_whole(engine, adapters, strategy):
    corpus = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    trace = make_trace(list(adapters) + ["base"], corpus, n_requests=9, rate=50, max_tokens=(4, 8), seed=1)
    result = replay(strategy, engine, adapters, trace, time_scale=1.0)
    assert len(result.served) == 9
    assert sorted(s.completion_tokens for s in result.served) == sorted(r.max_tokens for r in trace)
    assert all(0 <= s.ttft_s <= s.latency_s for s in result.served)
    summary = result.summary()
    assert summary["tokens_per_s"] > 0 and summary["latency_p99_s"] >= summary["latency_p50_s"]
    if strategy == "merged_sequential":
        assert result.swaps >= len({r.model for r in trace}) - 1 and result.swap_s > 0
    assert not engine.has_work


def test_merging_then_restoring_leaves_the_base_weights_bit_for_bit(engine, adapters):
    before = engine.model.layers[3].attn.wqkv.clone()
    merged = MergedWeights(engine)
    merged.swap("t0/a", adapters["t0/a"])
    assert not torch_equal(engine.model.layers[3].attn.wqkv, before)
    merged.swap(None, None)
    assert torch_equal(engine.model.layers[3].attn.wqkv, before)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_slo_rows_count_the_requests_that_met_a_cold_start_apart():
    def served(tenant, ttft, latency, cold=0.0):
        return {"tenant": tenant, "ttft_s": ttft, "latency_s": latency, "completion_tokens": 11, "cold_start_s": cold}
    requests = [served("acme", 0.5, 1.5), served("acme", 0.5, 1.5), served("acme", 9.0, 10.0, cold=8.5),
                served("acme", 0.5, 9.0),  # warm, but slow per token: 0.85 s > 0.2 s
                served("globex", 12.0, 13.0, cold=11.0)]
    acme, globex = slo_rows("lmaas_serverless", requests, {"acme": (2.0, 0.2), "globex": (6.0, 0.5),
                                                           "initech": (1.0, 0.1)})  # initech sent nothing: no row
    assert (acme["tenant"], acme["requests"], acme["slo_attainment"]) == ("acme", 4, 0.5)
    assert (acme["warm_requests"], acme["warm_attainment"], acme["cold_requests"]) == (3, 2 / 3, 1)
    assert acme["cold_wait_s_max"] == 8.5 and acme["ttft_attainment"] == 0.75
    assert (globex["slo_attainment"], globex["warm_requests"], globex["warm_attainment"]) == (0.0, 0, None)
    assert globex["cold_wait_s_max"] == 11.0
