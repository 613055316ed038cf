"""The strategies in virtual time: the mirrored schedulers batch, queue and swap as the real ones do
(checked by hand on steps of one second), the step-cost fit recovers a known cost, and the GPU cost
model is a roofline over the catalog's figures with the measured host side as its floor."""

from __future__ import annotations

import pytest

from infra.catalog import load_catalog
from tasks.lm.weights import LlamaConfig
from tasks.lmaas.simulate import FittedStepCost, GpuStepCost, HostSide, StepWork, simulate
from tasks.lmaas.trace import TraceRequest


class OneSecondSteps:
    """Every step takes 1 s; a swap 10 s, a slot load nothing."""

    simulated, name, swap_s, slot_load_s = False, "one second", 10.0, 0.0

    def __init__(self):
        self.steps: list[StepWork] = []

    def step_s(self, work: StepWork) -> float:
        self.steps.append(work)
        return 1.0


def request(at: float, model: str, prompt: int = 4, tokens: int = 3) -> TraceRequest:
    return TraceRequest(at, model.split("/")[0], model, tuple(range(prompt)), tokens)


def latencies(replay) -> list[float]:
    return [s.latency_s for s in replay.served]


def test_multi_lora_runs_every_adapter_in_one_batch():
    cost = OneSecondSteps()
    replay = simulate("multi_lora", [request(0, "a/x"), request(0, "b/y"), request(0, "a/z")], cost)
    # one step prefills all three prompts (and samples each one's first token), two more decode
    assert latencies(replay) == [3.0, 3.0, 3.0] and replay.makespan_s == 3.0
    assert cost.steps[0] == StepWork(tokens=12, sequences=3, context_tokens=12, adapters=3)
    assert cost.steps[1] == StepWork(tokens=3, sequences=3, context_tokens=15, adapters=3)
    assert [s.ttft_s for s in replay.served] == [1.0, 1.0, 1.0]


def test_unbatched_serves_one_request_at_a_time_in_arrival_order():
    replay = simulate("unbatched", [request(0, "a/x"), request(0.5, "b/y"), request(10, "a/z")], OneSecondSteps())
    # x: steps 0-3; y arrived at 0.5, runs 3-6; z arrives at 10 on an idle engine, runs 10-13
    assert latencies(replay) == [3.0, 5.5, 3.0]


def test_merged_sequential_swaps_to_the_oldest_waiting_adapter_and_batches_only_its_requests():
    replay = simulate("merged_sequential", [request(0, "a/x"), request(0, "b/y"), request(0, "a/x")], OneSecondSteps())
    # swap to a/x (10 s), both a/x requests together (3 steps), swap to b/y (10 s), 3 steps
    assert latencies(replay) == [13.0, 26.0, 13.0]
    assert replay.swaps == 2 and replay.swap_s == 20.0


def test_requests_wait_for_a_lora_slot_when_every_slot_holds_an_adapter_in_use():
    cost = OneSecondSteps()
    replay = simulate("multi_lora", [request(0, "a/x"), request(0, "b/y")], cost, lora_slots=1)
    assert latencies(replay) == [3.0, 6.0] and replay.stats["slot_loads"] == 2


def test_admission_is_fair_between_tenants():
    # acme floods; when a place frees up, globex (nothing running) goes before acme's older backlog
    trace = [request(0, "acme/x", tokens=10)] + [request(0, "acme/x") for _ in range(3)] + [request(0.1, "globex/y")]
    replay = simulate("multi_lora", trace, OneSecondSteps(), max_running=2)
    # acme's first runs 0-10; its second 0-3; then globex 3-6, acme's third 6-9, its fourth 9-12
    assert latencies(replay) == [10.0, 3.0, 9.0, 12.0, pytest.approx(5.9)]


def test_chunked_prefill_keeps_decoding_rows_first_within_the_token_budget():
    cost = OneSecondSteps()
    simulate("multi_lora", [request(0, "a/x", prompt=4, tokens=4), request(1, "a/x", prompt=10)], cost,
             max_batch_tokens=6)
    # at t=1 the first request decodes (1 row) and the second's prompt takes the other 5 tokens
    assert cost.steps[1] == StepWork(tokens=6, sequences=2, context_tokens=5 + 5, adapters=1)


def test_the_step_cost_fit_recovers_a_known_cost():
    truth = [0.01, 0.0002, 0.0001, 0.000001, 0.0005]
    steps = []
    for tokens, sequences, context, adapters in [(1, 1, 50, 1), (16, 16, 900, 8), (64, 64, 6000, 16),
                                                 (256, 3, 400, 2), (40, 8, 2000, 4), (128, 20, 3000, 12)]:
        seconds = truth[0] + truth[1] * tokens + truth[2] * sequences + truth[3] * context + truth[4] * adapters
        steps.append({"tokens": tokens, "sequences": sequences, "context_tokens": context, "adapters": adapters,
                      "seconds": seconds})
    fitted = FittedStepCost.fit(steps, swap_s=0.5, slot_load_s=0.001)
    assert list(fitted.coefficients) == pytest.approx(truth, rel=1e-4)
    with pytest.raises(ValueError, match="at least 5 steps"):
        FittedStepCost.fit(steps[:2], swap_s=0.5, slot_load_s=0.001)


SMOLLM2 = LlamaConfig(n_layers=30, dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, vocab_size=49152,
                      context_length=8192, rope_base=100000.0, norm_eps=1e-5, tied_embeddings=True)
IDLE_HOST = HostSide(base_s=0.0, per_token_s=0.0, swap_s=0.0, slot_load_s=0.0)


def gpu(device: str, host: HostSide = IDLE_HOST) -> GpuStepCost:
    return GpuStepCost(load_catalog().device(device), SMOLLM2, 8, ("q_proj", "v_proj"), host)


def test_a_decode_step_on_a_gpu_streams_the_weights_at_the_catalogs_bandwidth():
    decode = StepWork(tokens=16, sequences=16, context_tokens=16 * 100, adapters=4)
    t4, h100 = gpu("t4"), gpu("h100")
    floors = (30 * 14 + 4) * 3e-6
    moved = 2 * SMOLLM2.n_params + 1600 * t4.kv_bytes_per_token + 4 * t4.adapter_bytes
    assert t4.step_s(decode) == pytest.approx(floors + moved / (0.8 * 320e9))
    assert h100.step_s(decode) < t4.step_s(decode)
    assert t4.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2  # keys and values, bf16


def test_a_large_prefill_chunk_is_compute_bound_and_the_host_side_is_a_floor():
    prefill = StepWork(tokens=256, sequences=1, context_tokens=256, adapters=0)
    t4 = gpu("t4")
    assert t4.step_s(prefill) == pytest.approx((30 * 12 + 4) * 3e-6 + 2 * SMOLLM2.n_params * 256 / (0.6 * 65e12)
                                               + 4 * 30 * 576 * 256 / (0.6 * 65e12))
    slow_host = HostSide(base_s=0.05, per_token_s=0.0, swap_s=0.0, slot_load_s=0.0)
    assert gpu("h100", slow_host).step_s(prefill) == 0.05
