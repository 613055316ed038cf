"""LoRA fine-tuning: the training forward is the serving model, and training teaches the task."""

from __future__ import annotations

import pytest
import torch

from tasks.lm.engine import LMEngine
from tasks.lm.lora import load_adapter, random_adapter, save_adapter
from tasks.lmaas.finetune import TASKS, accuracy, answer_loss, finetune, finetune_together, lora_forward, make_task

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def engine():
    return LMEngine.load(weight_format="float32", kv_cache_mib=64, lora_slots=2, lora_rank=8, lora_targets=TARGETS)


def test_the_training_forward_gives_the_serving_engines_logits_with_and_without_an_adapter(engine):
    adapter = random_adapter(engine.config, rank=8, targets=TARGETS, seed=3, std=0.05)
    engine.add_adapter("random", adapter)
    tokens = engine.tokenizer.encode("Ticket: my parcel has not arrived.\nQueue:")
    served, base = engine.score(tokens, "random"), engine.score(tokens)
    assert (served - base).abs().max() > 1.0  # the adapter matters, so equality below means something
    # a second, longer row pads the batch: causal attention keeps row 0 unchanged
    longer = tokens + engine.tokenizer.encode(" LOG-2 and more words")
    batch = torch.tensor([tokens + [0] * (len(longer) - len(tokens)), longer])
    trained = lora_forward(engine, batch, adapter.weights, adapter.scaling)[0, : len(tokens)]
    assert torch.allclose(trained, served, atol=1e-3)
    assert torch.allclose(lora_forward(engine, batch[:1, : len(tokens)], {}, 1.0)[0], base, atol=1e-3)


def test_gradients_reach_both_lora_matrices_and_only_them(engine):
    task = make_task("reviews")
    a = torch.randn(8, engine.config.dim, requires_grad=True)
    b = torch.zeros(engine.config.n_kv_heads * engine.config.head_dim, 8, requires_grad=True)
    loss = answer_loss(engine, {(0, "v_proj"): (a, b)}, 2.0, list(task.train[:2]))
    loss.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert a.grad is not None  # zero while B is zero, as in PEFT's first step
    assert not any(p.requires_grad for p in engine.model.parameters())


def test_tasks_hold_out_examples_never_seen_in_training_and_use_labels_the_base_model_cannot_know():
    for name in TASKS:
        task = make_task(name)
        assert task.test and task.train
        assert not set(task.train) & set(task.test)
        assert {e.answer for e in task.test} <= {e.answer for e in task.train}
    with pytest.raises(ValueError, match="unknown fine-tuning task 'nope'"):
        make_task("nope")


def test_fine_tuning_lowers_the_held_out_loss_and_the_adapter_serves_and_round_trips(engine, tmp_path):
    task = make_task("reviews")
    adapter, record = finetune(engine, task, steps=10, batch_size=6, targets=TARGETS, seed=0)
    assert record.heldout_loss_after < 0.5 * record.heldout_loss_before
    assert len(record.losses) == 10 and record.trainable_params == adapter.n_params()
    engine.add_adapter("reviews", load_adapter(save_adapter(adapter, tmp_path / "reviews"), engine.config))
    assert accuracy(engine, "reviews", task.test) > accuracy(engine, None, task.test)


def test_adapters_trained_together_in_one_forward_are_the_adapters_each_task_trains_alone(engine):
    tasks = [make_task("reviews"), make_task("owners")]
    together = finetune_together(engine, tasks, steps=3, batch_size=4, targets=TARGETS, seed=5)
    for task, (adapter, record) in zip(tasks, together):
        alone, alone_record = finetune(engine, task, steps=3, batch_size=4, targets=TARGETS, seed=5)
        assert record.task == task.name and record.extra["trained_with"] == ["reviews", "owners"]
        assert record.losses == pytest.approx(alone_record.losses, rel=1e-4)
        assert record.heldout_loss_after == pytest.approx(alone_record.heldout_loss_after, rel=1e-4)
        # the same up to float rounding (batched matmuls), which Adam's normalised first steps
        # magnify to ~1e-4 against trained B entries of ~6e-3
        for key, (a, b) in adapter.weights.items():
            assert b.abs().max() > 1e-3
            assert torch.allclose(a, alone.weights[key][0], atol=2e-4) and torch.allclose(b, alone.weights[key][1], atol=2e-4)


def test_int4_weights_are_refused_for_training():
    engine = LMEngine.load(weight_format="int4", kv_cache_mib=16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        lora_forward(engine, torch.tensor([[1, 2, 3]]), {}, 1.0)
