"""The two-call decode step (tasks.lm.fast_decode): a step whose rows all decode runs every layer in
one compiled call and the head on int8 codes, and computes what the op-by-op forward computes: the
same keys and values in the cache, the same logits to rounding, the same greedy tokens; steps it
cannot take (a prefill chunk, a LoRA adapter) run op by op."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from tasks.lm.fast_decode import Q8_HEAD_MAX_ROWS, quantize_q8
from tasks.lm.int4 import INT4_GROUP
from tasks.lm.kernels import kernel_status, q8_linear
from tasks.lm.kvcache import PagedKVCache
from tasks.lm.model import Llama
from tasks.lm.sampling import SamplingParams
from tasks.lm.weights import LlamaConfig, random_checkpoint

pytestmark = pytest.mark.skipif(os.environ.get("TIERFLOW_LM_KERNEL") == "0", reason="kernel turned off by the user")


@pytest.fixture(scope="module")
def fast(engine):
    if engine.model.fast_decode is None:
        pytest.skip(f"no fast decode path on this CPU: {kernel_status()}")
    return engine.model.fast_decode


@contextmanager
def op_by_op(model: Llama):
    """The model without its fast path, for the duration."""
    fast_path, model.fast_decode = model.fast_decode, None
    try:
        yield
    finally:
        model.fast_decode = fast_path


SMALL = LlamaConfig(n_layers=3, dim=128, ffn_dim=320, n_heads=4, n_kv_heads=2, vocab_size=512, context_length=256,
                    rope_base=1e4, norm_eps=1e-5, tied_embeddings=False)


@pytest.fixture(scope="module")
def small(fast):
    """A random 3-layer Llama in int4 (its head untied and not Q8_0, so its int8 codes round it)."""
    return Llama.from_weights(SMALL, random_checkpoint(SMALL, seed=3, std=0.08), "int4")


def test_the_int8_head_reproduces_a_q8_0_head_exactly_and_rounds_any_other(fast, engine):
    """The shipped GGUF's token embedding is stored Q8_0: its int8 codes give every logit exactly."""
    assert fast.head_exact
    codes, scale = fast.head_codes, fast.head_scale
    dequantized = (codes.float().view(codes.shape[0], -1, INT4_GROUP) * scale[..., None]).view(codes.shape)
    assert torch.equal(dequantized, engine.model.lm_head_exact)
    w = torch.randn(64, 96)
    codes, scale, exact = quantize_q8(w)
    assert not exact
    error = (codes.float().view(64, -1, INT4_GROUP) * scale[..., None]).view(64, 96) - w
    assert (error.abs().view(64, -1, INT4_GROUP) <= scale[..., None] / 2 + 1e-7).all()


def test_the_q8_kernel_is_the_fp32_dot_with_the_dequantized_rows(fast):
    torch.manual_seed(0)
    codes, scale, _ = quantize_q8(torch.randn(1000, 160))
    dequantized = (codes.double().view(1000, -1, INT4_GROUP) * scale[..., None].double()).view(1000, 160)
    for rows in (1, 3, 4, 5, 9):
        x = torch.randn(rows, 160) * 3
        out = q8_linear()(x, codes, scale)
        expected = x.double() @ dequantized.t()
        assert out.shape == (rows, 1000) and (out.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    with pytest.raises(RuntimeError, match="codes: contiguous int8"):
        q8_linear()(torch.randn(2, 128), codes, scale)


def decode_batch(model: Llama, cache: PagedKVCache, seqs) -> tuple:
    """Each sequence's next token as one decoding row (blocks reserved)."""
    for seq in seqs:
        cache.reserve(seq, len(seq.tokens))
    return model.flat_batch(cache, [(seq, len(seq.tokens) - 1, len(seq.tokens), True) for seq in seqs])


def test_the_fast_step_writes_the_same_cache_and_computes_the_same_logits_as_op_by_op(small):
    """Sequences of mixed lengths (one past a block boundary), prefilled op by op; then one decode step
    both ways from the same cache: keys and values equal to bf16 rounding, the likeliest tokens'
    logits (re-scored in fp32) to fp32 rounding and the rest to the heads' rounding, for 1 row and for
    more rows than the int8 head takes."""
    generator = torch.Generator().manual_seed(0)
    for n_rows in (1, Q8_HEAD_MAX_ROWS + 2):
        cache = PagedKVCache(SMALL, 64, 16, torch.bfloat16)
        lengths = [5, 17, 40, 3, 16, 29][:n_rows]
        seqs = [cache.open(torch.randint(0, SMALL.vocab_size, (n,), generator=generator).tolist()) for n in lengths]
        for seq in seqs:
            cache.reserve(seq, len(seq.tokens) - 1)
            small(small.flat_batch(cache, [(seq, 0, len(seq.tokens) - 1, False)]), cache)
            cache.commit(seq, len(seq.tokens) - 1)
        batch = decode_batch(small, cache, seqs)
        assert small.fast_decode.handles(batch, cache)
        fast_logits = small(batch, cache)
        fast_k, fast_v = cache.k.clone(), cache.v.clone()
        with op_by_op(small):
            logits = small(batch, cache)
        assert fast_logits.shape == logits.shape == (n_rows, SMALL.vocab_size)
        scale = logits.abs().max()
        assert (fast_logits - logits).abs().max() < 0.02 * scale  # the rest come from rounded heads (int8, bf16)
        top = logits.topk(16, dim=-1).indices  # re-scored in float32 both ways
        assert (fast_logits.gather(1, top) - logits.gather(1, top)).abs().max() < 1e-4 * scale
        assert torch.equal(fast_logits.argmax(-1), logits.argmax(-1))
        for fast_pool, pool in ((fast_k, cache.k), (fast_v, cache.v)):
            assert (fast_pool.float() - pool.float()).abs().max() <= 2 ** -7 * pool.float().abs().max()
            assert fast_pool.count_nonzero() == pool.count_nonzero()  # nothing written beside the new slots


def teacher_forced(engine, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Next-token logits after ``prompt`` and after each of ``forced``, one decoding row a step."""
    model, cache = engine.model, engine.cache
    seq = cache.open(list(prompt))
    try:
        cache.reserve(seq, len(prompt) - 1)
        model(model.flat_batch(cache, [(seq, 0, len(prompt) - 1, False)]), cache)
        cache.commit(seq, len(prompt) - 1)
        logits = []
        for token in [None, *forced]:
            if token is not None:
                seq.tokens.append(token)
            logits.append(model(decode_batch(model, cache, [seq]), cache)[0])
            cache.commit(seq, len(seq.tokens))
        return torch.stack(logits)
    finally:
        cache.release(seq)


def test_greedy_answers_are_the_same_token_for_token_with_and_without_the_fast_path(engine, fast, chat):
    """The France question and a 128-token story, each alone (the int8 head), and six prompts of
    mixed lengths decoding together (the bf16 head): the same tokens up to where the op-by-op path
    itself all but ties (its two likeliest within 0.3: rounding in another order may pick either,
    and the answers then go their own ways). On an AMD EPYC host the story met one such tie; the
    France answer is the same text everywhere."""
    params = SamplingParams(temperature=0, max_tokens=128)
    france = chat("What is the capital of France?")
    story = chat("Tell me a long story about a dragon who learns to read.")
    batch = [chat("Name a planet."), "Once upon a time", chat("Count to five."), "def add(a, b):",
             chat("Why is the sky blue?"), "The recipe for bread is"]
    batched = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    answers = [engine.generate([france], params)[0], engine.generate([story], params)[0], *engine.generate(batch, batched)]
    assert answers[0].text == "The capital of France is Paris."
    assert answers[1].completion_tokens == 128
    with op_by_op(engine.model):
        expected = [engine.generate([france], params)[0], engine.generate([story], params)[0],
                    *engine.generate(batch, batched)]
    assert answers[0].tokens == expected[0].tokens
    for prompt, answer, reference in zip([france, story, *batch], answers, expected):
        diverged = next((i for i, (a, b) in enumerate(zip(answer.tokens, reference.tokens)) if a != b), None)
        if diverged is not None:
            with op_by_op(engine.model):
                logits = teacher_forced(engine, engine.tokenizer.encode(prompt), reference.tokens[:diverged])[-1]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] < 0.3, f"{prompt!r} diverged at token {diverged} where op by op is sure"


def test_the_fast_path_is_as_close_to_the_float_reference_as_int4_is(engine, engine_fp32, fast, chat):
    """Teacher-forced decoding of two chat answers one token a step: logits within int4's stated 1.5 of
    the float32 model's, and the same next token wherever the reference does not all but tie (its two
    likeliest within 0.1)."""
    for question in ("Name three primary colors.", "Write a haiku about rain."):
        prompt = engine.tokenizer.encode(chat(question))
        forced = engine_fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=48))[0].tokens
        reference = engine_fp32.score(prompt + forced)[len(prompt) - 1:]
        ours = teacher_forced(engine, prompt, forced)
        assert (ours - reference).abs().max() < 1.5
        top2 = reference.topk(2, dim=-1).values
        sure = top2[:, 0] - top2[:, 1] >= 0.1
        assert torch.equal(ours.argmax(-1)[sure], reference.argmax(-1)[sure])


def test_steps_with_a_prefill_chunk_or_an_adapter_run_op_by_op(small):
    cache = PagedKVCache(SMALL, 16, 16, torch.bfloat16)
    decoding, prefilling = cache.open([1, 2, 3, 4]), cache.open([5, 6, 7])
    cache.reserve(decoding, 4)
    cache.commit(decoding, 3)
    cache.reserve(prefilling, 3)
    mixed = small.flat_batch(cache, [(decoding, 3, 4, True), (prefilling, 0, 3, True)])
    assert not small.fast_decode.handles(mixed, cache)
    with_adapter = small.flat_batch(cache, [(decoding, 3, 4, True)], adapter_slots=[1])
    assert not small.fast_decode.handles(with_adapter, cache)
    assert small.fast_decode.handles(small.flat_batch(cache, [(decoding, 3, 4, True)], adapter_slots=[0]), cache)
    float_cache = PagedKVCache(SMALL, 16, 16, torch.float32)
    seq = float_cache.open([1, 2])
    float_cache.reserve(seq, 2)
    assert not small.fast_decode.handles(small.flat_batch(float_cache, [(seq, 1, 2, True)]), float_cache)


def test_formats_and_settings_without_the_compiled_int4_kernel_decode_op_by_op():
    weights = random_checkpoint(SMALL, seed=1)
    assert Llama.from_weights(SMALL, weights, "int4", compiled_kernels=False).fast_decode is None
    assert Llama.from_weights(SMALL, weights, "bfloat16").fast_decode is None
    assert Llama.from_weights(SMALL, weights, "float32").fast_decode is None


def test_the_layer_kernel_rejects_a_cache_it_cannot_write(small):
    cache = PagedKVCache(SMALL, 16, 16, torch.float32)
    seq = cache.open([1, 2])
    cache.reserve(seq, 2)
    batch = small.flat_batch(cache, [(seq, 1, 2, True)])
    fast = small.fast_decode
    with pytest.raises(RuntimeError, match="caches: contiguous bfloat16"):
        torch.ops.tierflow.decode_layers(torch.zeros(1, SMALL.dim), fast.norms, *fast.stacked, small.rope_cos,
                                         small.rope_sin, batch.positions, cache.k, cache.v, batch.slots,
                                         batch.decode.block_table, batch.decode.lengths, SMALL.n_heads, 1e-5)
