"""From profiles to the placement's inputs: a worker's capacity is what its replica, as deployed,
held within the objectives (the highest load of a probe ladder), or in-process its best throughput
within the latency objective; the replicas' weight format is the one with the higher capacity; a
trace becomes per-adapter rates; the plan fills a measured capacity, and says when the spec cannot
hold the load."""

import pytest

from infra.catalog import load_catalog
from infra.spec import InfraSpec
from optimizers.lmaas import AdapterLoad, WorkerOption
from tasks.lmaas.profile import (CapacityError, adapter_loads, capacity, choose_weight_format, plan_within_objectives,
                                 planned_load, profile_deployed, trace_counts, trace_seconds, worker_options, zipf_loads)
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


class Replica:
    """A stand-in for an HTTP probe of a replica that holds the objectives for every request up to
    ``holds`` tokens/s and for none beyond: it records the loads it was sent."""

    def __init__(self, holds: float):
        self.holds, self.sent = holds, []

    def probe(self, scaler, keys, trace, rate, factor, ttft_slo_s, tpot_slo_s) -> dict:
        offered = 10.0 * factor  # the trace's own load is 10 tokens/s
        self.sent.append(factor)
        return {"factor": factor, "offered_tokens_per_s": offered, "attainment": 1.0 if offered <= self.holds else 0.5}


def ladder(holds: float) -> tuple[dict, list[float]]:
    replica = Replica(holds)
    profile = profile_deployed(None, {}, [], 1.0, ttft_slo_s=2.0, tpot_slo_s=0.2, probe=replica.probe, lora_slots=16)
    return profile, replica.sent


def test_the_deployed_capacity_is_the_highest_load_of_the_ladder_that_held():
    profile, sent = ladder(holds=16.0)  # 1× and 1.5× held, 2.25× did not: the ladder stops there
    assert sent == [1.0, 1.5, 2.25] and profile["capacity_tokens_per_s"] == 15.0
    assert [p["held"] for p in profile["points"]] == [True, True, False]
    assert profile["objectives"] == {"ttft_s": 2.0, "tpot_s": 0.2} and profile["lora_slots"] == 16
    profile, sent = ladder(holds=100.0)  # every load up held: the highest one tried
    assert sent == [1.0, 1.5, 2.25] and profile["capacity_tokens_per_s"] == 22.5


def test_when_the_workload_itself_is_not_held_the_ladder_steps_down_until_a_load_is():
    profile, sent = ladder(holds=7.0)
    assert sent == pytest.approx([1.0, 2 / 3]) and profile["capacity_tokens_per_s"] == pytest.approx(20 / 3)
    profile, sent = ladder(holds=1.0)  # no load held: the objectives are out of reach
    assert sent == pytest.approx([1.0, 2 / 3, 4 / 9]) and profile["capacity_tokens_per_s"] == 0.0
    with pytest.raises(ValueError, match="target must be in"):
        profile_deployed(None, {}, [], 1.0, ttft_slo_s=2.0, tpot_slo_s=0.2, target=1.5)


def test_the_ladder_is_around_the_planned_traces_load_not_the_probes_own():
    """The probe is another draw of the workload's shape: it is compressed in time so that 1× offers
    the load the plan is for (a heavier draw would otherwise be judged at 1.5× the workload's)."""
    from types import SimpleNamespace

    probe_trace = [SimpleNamespace(at_s=float(i), max_tokens=15) for i in range(10)]  # 150 tokens over 10 s: 15/s
    assert planned_load(probe_trace, 1.0) == pytest.approx(15.0)
    sent = []

    def probe(scaler, keys, trace, rate, compression, ttft_slo_s, tpot_slo_s):
        sent.append(compression)
        offered = planned_load(trace, rate) * compression
        return {"offered_tokens_per_s": offered, "attainment": 1.0 if offered <= 12.0 else 0.5}

    profile = profile_deployed(None, {}, probe_trace, 1.0, ttft_slo_s=2.0, tpot_slo_s=0.2, load_tokens_per_s=10.0,
                               probe=probe)
    assert sent == pytest.approx([10 / 15, 1.5 * 10 / 15])  # 10 tokens/s held, 15 not
    assert [p["factor"] for p in profile["points"]] == [1.0, 1.5]
    assert profile["capacity_tokens_per_s"] == pytest.approx(10.0) and profile["load_tokens_per_s"] == 10.0


def test_a_deployed_profiles_capacity_holds_at_its_own_objectives_and_looser_ones_only():
    deployed = {"kind": "deployed", "objectives": {"ttft_s": 2.0, "tpot_s": 0.2}, "capacity_tokens_per_s": 31.5,
                "points": [], "lora_slots": 8}
    assert capacity(deployed, 0.2) == capacity(deployed, 0.5) == 31.5
    with pytest.raises(ValueError, match="measured at TPOT ≤ 0.2 s; a 0.1 s objective needs the replica profiled again"):
        capacity(deployed, 0.1)
    spec = InfraSpec.model_validate({"name": "t", "pools": [{"name": "serve", "tier": "edge", "device": "cpu-small",
                                                           "count": 1}]})
    (option,) = worker_options(spec.pools, {"serve": deployed}, 0.2, load_catalog())
    assert (option.tokens_per_s, option.resident_slots) == (31.5, 8)


def workers(n: int, tokens_per_s: float) -> list[WorkerOption]:
    return [WorkerOption(f"serve-{i}", "cpu-small", 0.096, tokens_per_s, 2**30, 16) for i in range(n)]


def test_a_plan_may_fill_a_capacity_measured_as_deployed_but_not_exceed_the_spec():
    # 90% of one machine's capacity as deployed: one machine (the 70% rule for in-process
    # capacities would have bought a second)
    loads = [AdapterLoad("a/x", 18.0, 1.0, 1000)]
    assert plan_within_objectives(loads, workers(2, 20.0), ttft_slo_s=2.0, tpot_slo_s=0.2).workers == ["serve-0"]
    with pytest.raises(CapacityError) as error:
        plan_within_objectives([AdapterLoad("a/x", 30.0, 1.0, 1000), AdapterLoad("a/y", 15.0, 1.0, 1000)],
                               workers(2, 20.0), ttft_slo_s=2.0, tpot_slo_s=0.2)
    message = str(error.value)
    assert message.startswith("the load of 45.0 tokens/s needs more than the spec's 2 serving machine(s), which hold "
                              "40.0 tokens/s together within TTFT ≤ 2 s and TPOT ≤ 0.2 s (measured as deployed): "
                              "lower the rate or add machines; nothing was deployed")


def test_a_traces_load_is_spread_to_one_mean_gap_after_its_last_arrival():
    trace = [TraceRequest(0.0, "a", "a/x", (1,), 4), TraceRequest(9.5, "a", "a/x", (1,), 4)]
    assert trace_seconds(trace, rate=2.0) == 10.0
