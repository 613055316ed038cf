"""The compiled kernels (tasks.lm.kernels):

- paged decode attention: the same attention as gathering each sequence's keys and values and running
  softmax(q k^T / sqrt(d)) v in torch, read in place from scattered blocks;
- the Q4_1 linear layer: x @ w.T for w = scale * code + minimum, on x rounded to bf16 (as torch's
  int4 kernel rounds it) and in fp32 otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from tasks.lm.kernels import kernel_status, paged_decode_attention, q4_linear
from tasks.lm.int4 import INT4_GROUP, int4_weight, quantize_int4
from tasks.lm.model import linear
from tasks.lm.sampling import SamplingParams

pytestmark = pytest.mark.skipif(os.environ.get("TIERFLOW_LM_KERNEL") == "0", reason="kernel turned off by the user")


@pytest.fixture(scope="module")
def kernel():
    op = paged_decode_attention()
    assert op is not None, kernel_status()  # this machine has a compiler: the kernel must build
    return op


def reference_attention(q, rows, k_pool, v_pool, table, lengths):
    kv_heads, _, block_size, head_dim = k_pool.shape
    out = torch.zeros(q.shape[0], q.shape[1] * head_dim)
    for b, row in enumerate(rows.tolist()):
        length = int(lengths[b])
        keys = k_pool[:, table[b]].reshape(kv_heads, -1, head_dim)[:, :length].double()
        values = v_pool[:, table[b]].reshape(kv_heads, -1, head_dim)[:, :length].double()
        queries = q[row].view(kv_heads, -1, head_dim).double()  # query head h uses KV head h // G
        probs = torch.softmax(queries @ keys.transpose(1, 2) * head_dim ** -0.5, dim=-1)
        out[row] = (probs @ values).reshape(-1).float()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (6, 3, 48), (4, 4, 32)])
def test_the_kernel_equals_attention_over_the_gathered_keys(kernel, dtype, heads, kv_heads, head_dim):
    """SmolLM2's shape and others (compiled for the shape, or the general loop), lengths from one
    key to several blocks and not on a block boundary, blocks scattered over the pool, rows not in
    sequence order; other rows of ``out`` are left alone."""
    torch.manual_seed(0)
    block_size, n_blocks = 16, 64
    k_pool = torch.randn(kv_heads, n_blocks, block_size, head_dim).to(dtype)
    v_pool = torch.randn(kv_heads, n_blocks, block_size, head_dim).to(dtype)
    lengths = torch.tensor([1, 16, 17, 100, 5])
    width = int(-(-lengths.max() // block_size))
    table = torch.randperm(n_blocks - 1)[: len(lengths) * width].view(len(lengths), width) + 1
    rows = torch.tensor([3, 0, 6, 2, 5])
    q = torch.randn(8, heads, head_dim)
    out = torch.full((8, heads * head_dim), 7.0)
    kernel(q, rows, k_pool, v_pool, table, lengths, out, head_dim ** -0.5)
    expected = reference_attention(q, rows, k_pool, v_pool, table, lengths)
    assert torch.allclose(out[rows], expected[rows], atol=1e-5, rtol=1e-4)
    untouched = [r for r in range(8) if r not in rows.tolist()]
    assert (out[untouched] == 7.0).all()


def test_the_kernel_rejects_tensors_it_cannot_read(kernel):
    q, rows, lengths = torch.randn(2, 9, 64), torch.tensor([0, 1]), torch.tensor([3, 3])
    pool, table, out = torch.randn(3, 4, 16, 64), torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 9 * 64)
    with pytest.raises(RuntimeError, match="q: contiguous float32"):
        kernel(q.double(), rows, pool, pool, table, lengths, out, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        kernel(q, rows.int(), pool, pool, table, lengths, out, 0.125)
    with pytest.raises(RuntimeError, match="pools"):
        kernel(q, rows, pool.half(), pool.half(), table, lengths, out, 0.125)


def test_the_engine_generates_the_same_tokens_with_and_without_the_kernel(engine_fp32, chat, kernel):
    """Batched decoding of mixed lengths in float32: the kernel against the plain-torch attention
    over padded, masked groups."""
    engine = engine_fp32
    assert engine.model.compiled_attention
    prompts = [chat("Name a planet."), "Once upon a time", chat("Count to five."), "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with_kernel = engine.generate(prompts, params)
    try:
        for layer in engine.model.layers:
            layer.attn.kernel = None
        assert not engine.model.compiled_attention
        without = engine.generate(prompts, params)
    finally:
        for layer in engine.model.layers:
            layer.attn.kernel = kernel
    assert [r.tokens for r in with_kernel] == [r.tokens for r in without]


@pytest.fixture(scope="module")
def q4(kernel):
    op = q4_linear()
    if op is None:
        pytest.skip(f"this CPU lacks AVX-512 BF16: {kernel_status()}")
    return op


def dequantized(codes, scale, minimum):
    return (codes.double().view(codes.shape[0], -1, INT4_GROUP) * scale[..., None] + minimum[..., None]).view(codes.shape)


@pytest.mark.parametrize("n_out,n_in", [(960, 576), (576, 1536), (16, 32)])
def test_the_q4_kernel_equals_the_dequantized_weights_on_bf16_inputs(q4, n_out, n_in):
    """Row counts below, at and past the kernel's 8-row chunks; relative error at fp32 level."""
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in) * 0.05
    codes, scale, minimum = quantize_int4(w)
    weight = int4_weight(codes, scale, minimum)
    assert weight.kernel == "q4"
    exact = dequantized(codes, scale, minimum)
    for rows in (1, 7, 8, 9, 16, 40):
        x = torch.randn(rows, n_in) * 3
        out = linear(x, weight)
        expected = x.bfloat16().double() @ exact.t()
        assert out.dtype == torch.float32 and out.shape == (rows, n_out)
        assert (out.double() - expected).abs().max() < 1e-5 * expected.abs().max()


def test_the_q4_kernel_and_torchs_int4_kernel_compute_the_same_layer(q4):
    """The fallback for CPUs without AVX-512 BF16 (torch's kernel also rounds scale and zero to bf16)."""
    torch.manual_seed(1)
    codes, scale, minimum = quantize_int4(torch.randn(192, 256))
    compiled, plain = int4_weight(codes, scale, minimum), int4_weight(codes, scale, minimum, compiled=False)
    assert (compiled.kernel, plain.kernel) == ("q4", "torch")
    x = torch.randn(12, 256)
    expected = linear(x, compiled)
    assert (linear(x, plain) - expected).abs().max() < 0.02 * expected.abs().max()


def test_the_q4_kernel_rejects_inputs_that_do_not_fit_the_weight(q4):
    codes, scale, minimum = quantize_int4(torch.randn(32, 64))
    packed = int4_weight(codes, scale, minimum).four_bit
    with pytest.raises(RuntimeError, match="x has 32 inputs; the weight has 64"):
        q4(torch.randn(2, 32), *packed)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        q4(torch.randn(2, 64).bfloat16(), *packed)


def test_the_lora_kernel_adds_each_rows_own_adapter_as_the_per_segment_matmuls_do(kernel):
    """Rows of three adapters interleaved with base rows and a long run of one adapter (which keeps
    its two matmuls): the compiled path equals the plain-torch one."""
    from tasks.lm.lora import LoraPool, random_adapter, segments_of
    from tasks.lm.batch import FlatBatch
    from tasks.lm.weights import LlamaConfig

    config = LlamaConfig(n_layers=1, dim=64, ffn_dim=96, n_heads=4, n_kv_heads=2, vocab_size=32, context_length=64,
                         rope_base=1e4, norm_eps=1e-5, tied_embeddings=True)
    pools = {compiled: LoraPool(config, 4, 8, ("q_proj", "v_proj", "o_proj"), compiled=compiled) for compiled in (True, False)}
    assert pools[True].kernel is not None and pools[False].kernel is None
    for slot in (1, 2, 3):
        adapter = random_adapter(config, rank=4 + slot, targets=("q_proj", "v_proj", "o_proj"), seed=slot, std=0.3)
        for pool in pools.values():
            pool.load(slot, adapter)
    slots = [1, 0, 2, 2, 3, 1, 0] + [3] * 10
    long_segments = [s for s in segments_of(slots) if s[1] - s[0] >= 8]
    short = [0 if any(a <= i < b for a, b, _ in long_segments) else s for i, s in enumerate(slots)]
    batch = FlatBatch(*(torch.zeros(0),) * 3, [], torch.zeros(0), lora_segments=segments_of(slots),
                      lora_long_segments=long_segments, lora_short_row_slots=torch.tensor(short))
    torch.manual_seed(0)
    x = torch.randn(len(slots), 64)
    base = torch.randn(len(slots), 128)  # q|k|v outputs of 4 + 2 + 2 heads of 16
    compiled = pools[True].add(base.clone(), x, 0, "wqkv", batch)
    plain = pools[False].add(base.clone(), x, 0, "wqkv", batch)
    assert torch.allclose(compiled, plain, atol=1e-5)
    assert torch.equal(compiled[[1, 6]], base[[1, 6]])  # rows without an adapter are untouched
    assert not torch.allclose(compiled[0], base[0])


def test_a_build_killed_midway_does_not_leave_later_processes_waiting(kernel):
    """torch leaves its ``lock`` file behind when a build is killed; the next process must not wait on it forever."""
    import subprocess
    import sys

    from tasks.lm.kernels import build_folder

    (build_folder() / "lock").write_text("")  # what a killed build leaves
    probe = "from tasks.lm import kernels; kernels.paged_decode_attention(); print(kernels.kernel_status())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "compiled" in done.stdout and not (build_folder() / "lock").exists()
