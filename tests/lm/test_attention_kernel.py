"""The compiled paged decode-attention kernel: the same attention as gathering each sequence's keys
and values and running softmax(q k^T / sqrt(d)) v in torch, read in place from scattered blocks."""

from __future__ import annotations

import os

import pytest
import torch

from tasks.lm.attention_kernel import kernel_status, paged_decode_attention
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
