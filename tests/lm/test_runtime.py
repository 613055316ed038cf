"""The runtime's KV cache and scheduler: sharing, rollback and batching never change what the
model computes; they only avoid computing it twice."""

from __future__ import annotations

import pytest
import torch

from tasks.lm.backend import LocalBackend
from tasks.lm.engine import LMEngine
from tasks.lm.kvcache import CacheFullError, PagedKVCache
from tasks.lm.sampling import GREEDY, InvalidRequest, SamplingParams
from tasks.lm.scheduling import FifoPolicy, TenantFairShare
from tasks.lm.weights import LlamaConfig

TINY = LlamaConfig(n_layers=1, dim=8, ffn_dim=16, n_heads=2, n_kv_heads=1, vocab_size=100, context_length=64,
                   rope_base=10000.0, norm_eps=1e-5, tied_embeddings=True)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, **kw)


# --- the paged cache alone ----------------------------------------------------------------------

def test_fork_shares_blocks_and_copies_only_the_partial_block_its_writer_shares():
    cache = PagedKVCache(TINY, n_blocks=8, block_size=4)
    parent = cache.open(list(range(6)))
    cache.reserve(parent, 6)
    cache.commit(parent, 6)
    before = cache.n_free
    child = cache.fork(parent)
    assert child.blocks == parent.blocks and cache.n_free == before  # nothing copied
    assert [cache.refs[b] for b in parent.blocks] == [2, 2]
    child.tokens.append(50)
    cache.reserve(child, 7)  # writing position 6 lands in the shared, partly-filled second block
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    assert cache.stats["copy_on_write"] == 1
    assert torch.equal(cache.k[:, :, child.blocks[1]], cache.k[:, :, parent.blocks[1]])


def test_truncate_releases_whole_blocks_and_moves_nothing():
    cache = PagedKVCache(TINY, n_blocks=8, block_size=4)
    seq = cache.open(list(range(11)))
    cache.reserve(seq, 11)
    cache.commit(seq, 11)
    first_two = seq.blocks[:2]
    free_before = cache.n_free
    cache.truncate(seq, 5)
    assert seq.blocks == first_two and seq.computed == 5 and seq.tokens == list(range(5))
    assert cache.n_free == free_before + 1
    with pytest.raises(ValueError, match="cannot truncate a sequence of 5 tokens to 9"):
        cache.truncate(seq, 9)


def test_a_repeated_prefix_reuses_full_blocks_and_eviction_takes_the_least_recently_used():
    cache = PagedKVCache(TINY, n_blocks=6, block_size=4)
    first = cache.open(list(range(10)))
    cache.reserve(first, 10)
    cache.commit(first, 10)
    cache.release(first)  # its two full blocks stay cached, unreferenced
    second = cache.open(list(range(8)) + [99, 98, 97])
    assert cache.reuse_prefix(second) == 8 and second.computed == 8
    third = cache.open([7, 7, 7, 7, 7])  # different first block: nothing to reuse
    assert cache.reuse_prefix(third) == 0
    # the last prompt token is always computed, so a prompt of exactly two blocks reuses one
    assert cache.reuse_prefix(cache.open(list(range(8)))) == 4


def test_a_full_cache_evicts_cached_prefixes_before_it_refuses():
    cache = PagedKVCache(TINY, n_blocks=4, block_size=4)  # 3 usable blocks
    a = cache.open(list(range(8)))
    cache.reserve(a, 8)
    cache.commit(a, 8)
    cache.release(a)
    b = cache.open(list(range(20, 32)))
    cache.reserve(b, 12)  # needs all three: both cached blocks are evicted
    assert cache.stats["evicted"] == 2
    with pytest.raises(CacheFullError, match="all 3 KV blocks are held"):
        cache.reserve(cache.open([1, 2]), 2)


# --- the engine on SmolLM2 ----------------------------------------------------------------------
# Equalities between ways of computing the same tokens use the float32 format: int4 runs decoding
# rows and prefill rows on different kernels (4-bit codes; their bf16 copy), which round
# differently enough to flip a near-tie when a token moves from one to the other.

def test_batched_decoding_of_mixed_lengths_equals_each_prompt_alone(engine_fp32, chat):
    engine = engine_fp32
    prompts = [chat("What is the capital of France?"), "Once upon a time", chat("List three fruits, one per line."),
               "1, 2, 3, 4,"]
    together = engine.generate(prompts, greedy(20))
    for prompt, result in zip(prompts, together):
        assert engine.generate([prompt], greedy(20))[0].tokens == result.tokens
    assert not engine.running and not engine.waiting


def test_forked_sessions_share_the_prefix_and_continue_as_fresh_sequences_would(engine_fp32, chat):
    engine = engine_fp32
    backend = LocalBackend(engine)
    root = backend.session(chat("Give me a one-word answer: what color is the sky?"))
    root.generate(greedy(1))  # computes the prompt once
    free = engine.cache.n_free
    branches = [root.fork() for _ in range(3)]
    assert engine.cache.n_free == free  # forking copies no keys or values
    for i, branch in enumerate(branches):
        branch.extend(f" Option {i}:")
    results = backend.generate_sessions(branches, greedy(12))
    for branch, result in zip(branches, results):
        fresh = engine.generate([branch.tokens[:-len(result.tokens)]], greedy(12))[0]
        assert fresh.tokens == result.tokens
    for session in branches + [root]:
        session.close()


def test_rollback_returns_to_an_earlier_token_without_recomputing_it(engine_fp32, chat):
    engine = engine_fp32
    backend = LocalBackend(engine)
    session = backend.session(chat("Count from one to ten in words."))
    prompt_length = len(session)
    first = session.generate(greedy(24))
    checkpoint = prompt_length + 6
    session.rollback(checkpoint)
    assert len(session) == checkpoint
    prefill_before = engine.stats["prefill_tokens"]
    again = session.generate(greedy(18))
    assert engine.stats["prefill_tokens"] - prefill_before <= 1  # only the last kept token, for its logits
    assert again.tokens == first.tokens[6:]  # greedy from the same state: the same continuation
    session.rollback(prompt_length)
    session.extend("Sure! ")
    diverted = session.generate(greedy(8))
    fresh = engine.generate([session.tokens[:-len(diverted.tokens)]], greedy(8))[0]
    assert diverted.tokens == fresh.tokens
    session.close()


def test_a_shared_prompt_prefix_is_computed_once_and_changes_nothing(engine_fp32, chat):
    engine = engine_fp32
    document = "Notes: " + " ".join(f"item {i} is {i * i}." for i in range(40))
    prompts = [chat(f"{document}\nWhat is item {k}?") for k in (3, 7)]
    engine.cache.clear_prefix_cache()
    first = engine.generate(prompts[:1], greedy(10))[0]
    second = engine.generate(prompts[1:], greedy(10))[0]
    assert first.prefix_reused_tokens == 0
    assert second.prefix_reused_tokens >= len(engine.tokenizer.encode(chat(document))) - 2 * engine.cache.block_size
    uncached = LMEngine(engine.model, engine.tokenizer, kv_cache_mib=64, prefix_caching=False)
    assert uncached.generate(prompts[1:], greedy(10))[0].tokens == second.tokens


def test_a_small_cache_preempts_and_recomputes_without_changing_outputs(engine_fp32, chat):
    """float32: a preempted request is recomputed as one prefill instead of step by step, and
    bf16 kernels round those two shapes differently enough to flip near-ties."""
    prompts = [chat(f"Tell me a fact about the number {n}.") for n in range(6)]
    expected = [r.tokens for r in engine_fp32.generate(prompts, greedy(16))]
    tight = LMEngine(engine_fp32.model, engine_fp32.tokenizer, kv_cache_mib=9, max_running=6)  # 12 blocks of 16 tokens
    results = tight.generate(prompts, greedy(16))
    assert [r.tokens for r in results] == expected
    assert tight.stats["preempted"] > 0


def test_a_request_larger_than_the_whole_cache_ends_with_an_error_instead_of_waiting(engine):
    tiny = LMEngine(engine.model, engine.tokenizer, kv_cache_mib=1)
    request = tiny.submit(tiny.open("word " * 200), greedy(4), owns_sequence=True)
    for _ in range(5):
        tiny.step()
    assert request.finish_reason == "error" and "more KV cache than is free" in request.error
    assert not tiny.running and not tiny.waiting and tiny.cache.n_free == tiny.cache.n_blocks - 1


def test_stop_strings_max_tokens_and_eos_end_a_request_with_the_openai_reason(engine, chat):
    counted = engine.generate([chat("Count from 1 to 20, separated by commas.")], greedy(60, stop=["5"]))[0]
    assert counted.finish_reason == "stop" and "5" not in counted.text and counted.text.startswith("1")
    cut = engine.generate(["Once upon a time"], greedy(5))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 5
    answered = engine.generate([chat("What is the capital of France?")], greedy(40))[0]
    assert answered.finish_reason == "stop" and answered.tokens[-1] == 2 and "<|im_end|>" not in answered.text


def test_streamed_pieces_add_up_to_the_text_and_never_show_a_stop_string(engine, chat):
    backend = LocalBackend(engine)
    params = greedy(40, stop=["Paris"])
    pieces = list(backend.stream(chat("What is the capital of France?"), params))
    assert len(pieces) > 2
    assert "".join(pieces) == engine.generate([chat("What is the capital of France?")], params)[0].text
    assert "Paris" not in "".join(pieces) and "Par" not in pieces[-1]
    assert not engine.running


def test_sampling_is_repeatable_with_a_seed_and_top_p_narrows_it(engine):
    sample = lambda seed, **kw: engine.generate(["My favourite animal is"], SamplingParams(max_tokens=12, seed=seed, **kw))[0].tokens  # noqa: E731
    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1
    greedy_tokens = engine.generate(["My favourite animal is"], greedy(12))[0].tokens
    assert sample(3, top_p=1e-6) == greedy_tokens  # only the likeliest token survives
    assert sample(5, top_k=1) == greedy_tokens


@pytest.mark.parametrize("field, value, match", [
    ("temperature", 3.0, "temperature must be a number in"),
    ("top_p", 0.0, "top_p must be"),
    ("max_tokens", 0, "max_tokens must be an integer"),
    ("stop", ["a", "b", "c", "d", "e"], "stop must be up to 4"),
    ("top_k", -1, "top_k must be"),
])
def test_invalid_sampling_parameters_name_the_field(field, value, match):
    with pytest.raises(InvalidRequest, match=match) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field


def test_a_prompt_longer_than_the_context_is_refused_before_it_runs(engine):
    with pytest.raises(InvalidRequest, match="context is 8192 tokens") as error:
        engine.open([5] * 8192)
    assert error.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        engine.open("")
    assert GREEDY.greedy


def test_admission_is_fair_between_tenants_so_a_flood_does_not_starve_a_later_tenant(engine):
    """With the tenant fair-share policy, tenant a queues eight requests before tenant b's two; with
    four running at a time, b's two are admitted in the first step, alternating with a's."""
    fair = LMEngine(engine.model, engine.tokenizer, kv_cache_mib=32, max_running=4, policy=TenantFairShare())
    flood = [fair.submit(fair.open("Hello"), greedy(4), owns_sequence=True, tenant="a") for _ in range(8)]
    late = [fair.submit(fair.open("Hi"), greedy(4), owns_sequence=True, tenant="b") for _ in range(2)]
    fair.step()
    assert [r.tenant for r in fair.running] == ["a", "b", "a", "b"]
    fair.run(flood + late)
    assert all(r.finish_reason == "length" for r in flood + late)
    assert max(r.first_token_at for r in late) < sorted(r.first_token_at for r in flood)[-1]


def test_the_default_policy_admits_first_come_first_served_whatever_the_tenant(engine):
    fifo = LMEngine(engine.model, engine.tokenizer, kv_cache_mib=32, max_running=4)
    assert isinstance(fifo.policy, FifoPolicy)
    requests = [fifo.submit(fifo.open("Hello"), greedy(2), owns_sequence=True, tenant=t) for t in "aaaaab"]
    fifo.step()
    assert fifo.running == requests[:4]
    fifo.run(requests)
