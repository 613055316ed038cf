"""Specifications of the GPT-MoE runtime: routing, the dispatch/compute/combine split, the
analytic parameter counts, and that it learns the shipped corpus."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from infra.errors import InputError
from tasks.moe.corpus import load_corpus, tokenize, unigram_entropy
from tasks.moe.model import CONFIGS, GPTMoE, MoEConfig, MoELayer, param_counts
from tasks.moe.train import learning_rate, train

torch.set_num_threads(1)


def tiny(**changes) -> MoEConfig:
    return dataclasses.replace(CONFIGS["tiny"], **changes)


def layer_and_tokens(top_k: int, n_tokens: int = 40, seed: int = 0) -> tuple[MoELayer, torch.Tensor]:
    torch.manual_seed(seed)
    config = tiny(top_k=top_k)
    return MoELayer(config), torch.randn(n_tokens, config.n_embd)


def naive_moe(layer: MoELayer, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token by token: softmax router, top-k, renormalise (k=2), gate-weighted sum of expert outputs."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = F.softmax(x[n] @ layer.router.w_gate.weight.T, dim=-1)
        gate, experts = probs.topk(top_k)
        if top_k == 2:
            gate = gate / gate.sum()
        for g, e in zip(gate, experts):
            out[n] += g * layer.experts[int(e)](x[n : n + 1])[0]
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_local_moe_forward_equals_naive_token_loop(top_k):
    layer, x = layer_and_tokens(top_k)
    with torch.no_grad():
        y, _ = layer(x)
        assert torch.allclose(y, naive_moe(layer, x, top_k), atol=1e-5, rtol=0)
        y3, _ = layer(x.view(4, 10, -1))  # (B, T, C) is routed token by token too
        assert torch.allclose(y3.view_as(y), y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_every_token_goes_to_exactly_k_distinct_experts_and_counts_sum_to_tokens_times_k(top_k):
    layer, x = layer_and_tokens(top_k, n_tokens=64)
    routing = layer.dispatch(x)
    assert routing.expert_idx.shape == routing.gate.shape == (64, top_k)
    assert all(len(set(row.tolist())) == top_k for row in routing.expert_idx)
    assert torch.allclose(routing.gate.sum(-1), torch.ones(64)) if top_k == 2 else bool((routing.gate <= 1).all())
    assert routing.counts.shape == (layer.n_expert,) and int(routing.counts.sum()) == 64 * top_k
    assert torch.equal(routing.counts, torch.bincount(routing.expert_idx.flatten(), minlength=layer.n_expert))
    assert sorted(routing.order.tolist()) == list(range(64 * top_k))  # a permutation of the token copies


def test_sorted_copies_give_each_expert_exactly_its_tokens_in_token_order():
    """The contract a distributed runtime relies on: slice e of permute() (length counts[e])
    holds the tokens routed to expert e, in their original order."""
    layer, x = layer_and_tokens(top_k=2, n_tokens=30)
    routing = layer.dispatch(x)
    slices = layer.permute(x, routing).split(routing.counts.tolist())
    for e, chunk in enumerate(slices):
        tokens = [n for n in range(30) if e in routing.expert_idx[n].tolist()]
        assert torch.equal(chunk, x[tokens])


def test_replacing_the_expert_step_replaces_the_computation():
    layer, x = layer_and_tokens(top_k=2)
    routing = layer.dispatch(x)
    xs = layer.permute(x, routing)
    doubled = torch.cat([2 * expert(chunk) for expert, chunk in zip(layer.experts, xs.split(routing.counts.tolist()))])
    with torch.no_grad():
        assert torch.allclose(layer.combine(doubled, routing), 2 * layer(x)[0], atol=1e-6)


def test_aux_loss_is_one_when_the_router_is_uniform():
    layer, x = layer_and_tokens(top_k=1)
    torch.nn.init.zeros_(layer.router.w_gate.weight)
    assert layer.dispatch(x).aux_loss.item() == pytest.approx(1.0)


def test_router_and_experts_get_gradients_through_the_loss():
    torch.manual_seed(0)
    model = GPTMoE(tiny(vocab_size=32))
    idx = torch.randint(0, 32, (2, 16))
    logits, loss, stats = model(idx, idx)
    assert logits.shape == (2, 16, 32)
    assert loss.item() == pytest.approx((stats["ce_loss"] + model.config.aux_loss_weight * stats["aux_loss"]).item())
    loss.backward()
    layer = model.moe_layers()[0]
    assert layer.router.w_gate.weight.grad.abs().sum() > 0
    used = int(stats["counts"][0].argmax())
    assert layer.experts[used].c_fc.weight.grad.abs().sum() > 0


def test_model_stats_and_running_expert_loads():
    torch.manual_seed(0)
    model = GPTMoE(tiny(vocab_size=32, top_k=2))
    idx = torch.randint(0, 32, (3, 20))
    _, loss, stats = model(idx)
    assert loss is None and stats["counts"].shape == (2, 8)
    assert stats["counts"].sum(dim=1).tolist() == [3 * 20 * 2] * 2
    model(idx)
    assert torch.equal(model.expert_loads(), 2 * stats["counts"])  # accumulates in training mode
    model.eval()
    model(idx)
    assert torch.equal(model.expert_loads(), 2 * stats["counts"])  # not while evaluating
    model.reset_expert_loads()
    assert int(model.expert_loads().sum()) == 0


def test_moe_every_alternates_dense_and_moe_layers():
    model = GPTMoE(tiny(vocab_size=32, n_layer=4, moe_every=2))
    assert [type(b.ffn).__name__ for b in model.blocks] == ["Expert", "MoELayer", "Expert", "MoELayer"]
    assert model(torch.zeros(1, 8, dtype=torch.long))[2]["counts"].shape == (2, 8)


@pytest.mark.parametrize("config", [
    CONFIGS["tiny"], CONFIGS["small"], tiny(top_k=2, moe_every=2, n_layer=3), tiny(ffn_mult=2, n_expert=3)])
def test_param_counts_match_the_built_model(config):
    model = GPTMoE(config)
    counts = param_counts(config)
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.per_expert == sum(p.numel() for p in model.moe_layers()[0].experts[0].parameters())
    assert counts.dense == counts.total - experts


def test_paper_model_shapes_and_flops():
    s, m, l = (param_counts(CONFIGS[name]) for name in ("gpt-s", "gpt-m", "gpt-l"))
    assert (s.n_expert, m.n_expert, l.n_expert) == (8, 12, 16)
    assert s.per_expert == 2 * 768 * 3072 + 3072 + 768
    assert s.expert_flops_per_token == 4 * 768 * 3072
    assert m.per_expert == l.per_expert and l.total - m.total == 12 * 4 * (m.per_expert + 1024)  # 4 more experts and router columns per layer
    assert s.attention_flops_per_token == 8 * 768**2 + 4 * 1024 * 768
    assert s.forward_flops_per_token == 12 * (s.attention_flops_per_token + s.router_flops_per_token
                                              + s.expert_flops_per_token) + 2 * 768 * 50257


@pytest.mark.parametrize("field, value", [("top_k", 3), ("n_embd", 66), ("n_expert", 0), ("moe_every", 3)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(InputError, match=field):
        tiny(**{field: value})


def test_learning_rate_schedule():
    assert learning_rate(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert learning_rate(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert learning_rate(50, 100, 1.0, "constant") == 1.0


def test_training_is_deterministic_for_a_seed():
    tokens = tokenize(load_corpus()[:20_000])[1]
    config = tiny(vocab_size=int(tokens.max()) + 1, block_size=32)
    first, second = (train(config, tokens, steps=3, batch_size=4, seed=5, eval_every=3, eval_batches=1) for _ in range(2))
    assert first.losses == second.losses and first.eval_losses == second.eval_losses
    assert first.expert_loads.sum(dim=1).tolist() == [3 * 4 * 32] * 2


def test_tiny_model_learns_the_corpus_well_below_the_unigram_entropy():
    tokenizer, tokens = tokenize(load_corpus())
    result = train(tiny(vocab_size=tokenizer.vocab_size), tokens, steps=250, batch_size=16, lr=3e-3, seed=0, eval_every=250)
    baseline = unigram_entropy(tokens[-len(tokens) // 10:])  # the held-out tenth the trainer evaluates on
    print(f"unigram entropy {baseline:.3f} nats, eval loss {result.eval_loss:.3f}, {result.seconds:.1f} s")
    assert result.eval_loss < 0.8 * baseline
    assert result.losses[-1] < result.losses[0]
