"""From profiles to the placement's inputs: a worker's capacity is its best throughput within the
latency objective, the replicas' weight format is the one with the higher capacity, and a trace
becomes per-adapter rates."""

import pytest

from infra.catalog import load_catalog
from infra.spec import InfraSpec
from tasks.lmaas.profile import adapter_loads, capacity, choose_weight_format, trace_counts, worker_options, zipf_loads
from tasks.lmaas.trace import TraceRequest


def profile(*points: tuple[int, float, float]) -> dict:
    return {"points": [{"batch": b, "tokens_per_s": t, "tpot_s": tpot} for b, t, tpot in points], "lora_slots": 16}


# as measured on one thread of this host: int4 is faster per token at small batches, bf16 at large
INT4 = profile((1, 25.0, 0.036), (4, 60.0, 0.055), (16, 98.0, 0.097), (32, 125.0, 0.121))
BF16 = profile((1, 13.0, 0.076), (4, 44.0, 0.082), (16, 108.0, 0.091), (32, 152.0, 0.093))


def test_capacity_is_the_best_throughput_within_the_tpot_objective():
    assert capacity(INT4, 0.1) == 98.0 and capacity(INT4, 0.2) == 125.0
    assert capacity(INT4, 0.01) == 25.0  # out of reach at any load: the smallest batch's throughput


def test_the_replicas_run_the_weight_format_with_the_higher_capacity_at_the_objective():
    assert choose_weight_format({"int4": INT4, "bfloat16": BF16}, tpot_slo_s=0.2) == "bfloat16"
    assert choose_weight_format({"int4": INT4, "bfloat16": BF16}, tpot_slo_s=0.06) == "int4"
    with pytest.raises(ValueError, match="no weight format"):
        choose_weight_format({}, 0.2)


def test_a_trace_becomes_rates_and_each_machine_an_option_priced_from_the_catalog():
    trace = [TraceRequest(0.0, "acme", "acme/a", (1, 2), 10), TraceRequest(1.0, "acme", "acme/a", (1,), 30),
             TraceRequest(2.0, "acme", "acme/b", (1,), 20)]
    counts = trace_counts(trace)
    assert counts == {"acme/a": (2, 40), "acme/b": (1, 20)}
    loads = adapter_loads(counts, 4.0, {"acme/a": 100, "acme/b": 200})
    assert [(a.name, a.tokens_per_s, a.requests_per_s) for a in loads] == [("acme/a", 10.0, 0.5), ("acme/b", 5.0, 0.25)]
    with pytest.raises(ValueError, match="must be positive"):
        adapter_loads(counts, 0.0, {})
    spec = InfraSpec.model_validate({"name": "t", "pools": [{"name": "serve", "tier": "edge", "device": "cpu-small",
                                                           "count": 2, "worker_per_machine": True}]})
    options = worker_options(spec.pools, {"serve": BF16}, 0.2, load_catalog())
    assert [(o.name, o.tokens_per_s, o.usd_per_hour) for o in options] == [("serve-0", 152.0, 0.096),
                                                                           ("serve-1", 152.0, 0.096)]


def test_a_what_if_mix_spreads_its_load_by_zipf_over_the_adapters_in_the_order_given():
    loads = zipf_loads(["b", "a", "c"], 110.0, 10.0, {"a": 1, "b": 2, "c": 3})
    assert [x.name for x in loads] == ["b", "a", "c"]
    assert [x.tokens_per_s for x in loads] == pytest.approx([60.0, 30.0, 20.0])  # 1 : 1/2 : 1/3
    assert [x.requests_per_s for x in loads] == pytest.approx([6.0, 3.0, 2.0]) and loads[0].size_bytes == 2
