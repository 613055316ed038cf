"""The weights-transform hook at load time: a function sees every named weight before the model is
built and packed, and what it returns is what the model computes with."""

from __future__ import annotations

import pytest
import torch

from tasks.lm.engine import LMEngine
from tasks.lm.weights import LlamaConfig, ModelLoadError, load_transform, random_checkpoint, transform_weights

TINY = LlamaConfig(n_layers=1, dim=8, ffn_dim=16, n_heads=2, n_kv_heads=1, vocab_size=100, context_length=64,
                   rope_base=10000.0, norm_eps=1e-5, tied_embeddings=True)

PROMPT = "Video codecs can compress tensors too."


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"wq": (q, config.dim), "wk": (kv, config.dim), "wv": (kv, config.dim), "wo": (config.dim, q),
              "w_gate": (config.ffn_dim, config.dim), "w_up": (config.ffn_dim, config.dim),
              "w_down": (config.dim, config.ffn_dim)}
    return {f"layers.{i}.{name}": shape for i in range(config.n_layers) for name, shape in shapes.items()}


def test_an_identity_transform_sees_every_linear_weight_and_changes_no_logit(engine):
    seen = {}

    def record(name, weight):
        seen[name] = tuple(weight.shape)
        return weight.clone()  # equal values: the checkpoint's own 4-bit codes are kept

    copy = LMEngine.load(weight_format="int4", kv_cache_mib=16, transform=record)
    assert linear_shapes(copy.config).items() <= seen.items()
    assert {"tok_embeddings", "norm"} <= seen.keys()
    ids = engine.tokenizer.encode(PROMPT)
    assert torch.equal(copy.score(ids), engine.score(ids))


def test_a_transform_that_perturbs_one_matrix_changes_the_logits(engine):
    def perturb(name, weight):
        return weight + 0.05 * torch.randn_like(weight) if name == "layers.10.w_down" else weight

    perturbed = LMEngine.load(weight_format="int4", kv_cache_mib=16, transform=perturb)
    ids = engine.tokenizer.encode(PROMPT)
    ours, base = perturbed.score(ids), engine.score(ids)
    assert not torch.allclose(ours, base, atol=1e-2)
    # only that matrix was re-quantized: every other layer still runs the file's own codes
    assert torch.equal(perturbed.model.layers[9].ffn.w_down.dense, engine.model.layers[9].ffn.w_down.dense)
    assert not torch.equal(perturbed.model.layers[10].ffn.w_down.dense, engine.model.layers[10].ffn.w_down.dense)


def test_a_transform_keeps_codes_only_for_weights_it_leaves_equal_and_must_keep_shapes():
    weights = random_checkpoint(TINY)
    codes = {"layers.0.wq": "wq codes", "layers.0.wk": "wk codes"}
    out, kept = transform_weights(weights, codes, lambda name, w: w * 2 if name == "layers.0.wq" else w)
    assert kept == {"layers.0.wk": "wk codes"} and codes == {"layers.0.wq": "wq codes", "layers.0.wk": "wk codes"}
    assert torch.equal(out["layers.0.wq"], 2 * weights["layers.0.wq"])
    with pytest.raises(ModelLoadError, match=r"returned \(2, 8\) for weight 'layers.0.wv'; expected a tensor of shape \(4, 8\)"):
        transform_weights(weights, {}, lambda name, w: w[:2] if name == "layers.0.wv" else w)


def test_a_command_line_names_a_transform_as_module_and_function():
    assert load_transform("tasks.lm.weights:random_checkpoint") is random_checkpoint
    for spec, match in (("no_colon", "is named 'package.module:function'"),
                        ("tasks.lm.no_such_module:f", "No module named 'tasks.lm.no_such_module'"),
                        ("tasks.lm.weights:missing", "has no attribute 'missing'"),
                        ("tasks.lm.weights:DEFAULT_MODEL_ID", "is a str, not a function")):
        with pytest.raises(ModelLoadError, match=match):
            load_transform(spec)
