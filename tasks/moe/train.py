"""Single-process GPT-MoE training: the reference a distributed trainer must reproduce.

Flat, top to bottom: seed, split the tokens, build the model and AdamW, then steps of
batch → forward → backward → clip → step, evaluating on held-out tokens every
``eval_every`` steps and at the end. The same seed gives the same batches, the same
initial weights and hence (on one thread) the same losses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from infra.errors import InputError
from tasks.moe.corpus import batches
from tasks.moe.model import GPTMoE, MoEConfig


@dataclass
class TrainResult:
    """What a training run produced.

    losses: training loss (cross-entropy + weighted aux loss) of every step.
    eval_losses: (step, held-out cross-entropy) at every evaluation, the last at the final step.
    expert_loads: (n_moe_layers, E) tokens each expert processed during training.
    seconds: wall-clock time of the run.
    model: the trained model.
    """

    losses: list[float]
    eval_losses: list[tuple[int, float]]
    expert_loads: torch.Tensor
    seconds: float
    model: GPTMoE

    @property
    def eval_loss(self) -> float:
        """Held-out cross-entropy (nats/token) after the last step."""
        return self.eval_losses[-1][1]


def configure_optimizer(model: GPTMoE, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def learning_rate(step: int, steps: int, lr: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then constant or cosine down to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: GPTMoE, tokens: torch.Tensor, batch_size: int, n_batches: int, seed: int) -> float:
    """Mean cross-entropy (nats/token) on ``n_batches`` random windows of ``tokens`` chosen by ``seed``."""
    was_training = model.training
    model.eval()
    windows = batches(tokens, batch_size, model.config.block_size, torch.Generator().manual_seed(seed))
    losses = [float(model(x, y)[2]["ce_loss"]) for x, y in (next(windows) for _ in range(n_batches))]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(config: MoEConfig, tokens: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 3e-3,
          seed: int = 0, eval_every: int = 100, *, schedule: str = "cosine", warmup: int = 0,
          weight_decay: float = 0.1, grad_clip: float = 1.0, eval_fraction: float = 0.1,
          eval_batches: int = 8) -> TrainResult:
    """Train a GPT-MoE on ``tokens`` in this process.

    Parameters
    ----------
    config: model shape; sequences are ``config.block_size`` long.
    tokens: 1-D LongTensor of token ids, all < ``config.vocab_size``; the last
        ``eval_fraction`` of it is held out for evaluation.
    steps: optimizer steps.
    batch_size: sequences per step.
    lr: peak learning rate.
    seed: seeds the initial weights, the training batches and the evaluation windows.
    eval_every: evaluate every this many steps (and always after the last).
    schedule: ``"cosine"`` (to lr/10) or ``"constant"``, after ``warmup`` linear steps.
    weight_decay: AdamW decoupled weight decay on matrices and embeddings.
    grad_clip: maximum global gradient norm (0: no clipping).
    eval_fraction: share of ``tokens`` held out.
    eval_batches: batches of ``batch_size`` windows per evaluation.
    """
    _check_arguments(config, tokens, steps, batch_size, lr, eval_every, schedule, eval_fraction)
    n_eval = max(config.block_size + 1, int(len(tokens) * eval_fraction))
    train_tokens, eval_tokens = tokens[:-n_eval], tokens[-n_eval:]

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = GPTMoE(config)
    model.train()
    optimizer = configure_optimizer(model, lr, weight_decay)
    data = batches(train_tokens, batch_size, config.block_size, torch.Generator().manual_seed(seed))

    losses, eval_losses = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, schedule, warmup)
        x, y = next(data)
        _, loss, _ = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            eval_losses.append((step + 1, evaluate(model, eval_tokens, batch_size, eval_batches, seed + 1)))
    return TrainResult(losses, eval_losses, model.expert_loads(), time.perf_counter() - start, model)


def _check_arguments(config, tokens, steps, batch_size, lr, eval_every, schedule, eval_fraction) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if value < 1:
            raise InputError("train", name, value, "must be ≥ 1")
    if lr <= 0:
        raise InputError("train", "lr", lr, "must be > 0")
    if schedule not in ("cosine", "constant"):
        raise InputError("train", "schedule", schedule, "must be 'cosine' or 'constant'")
    if not 0 < eval_fraction < 1:
        raise InputError("train", "eval_fraction", eval_fraction, "must be between 0 and 1")
    if tokens.dim() != 1 or tokens.dtype != torch.long:
        raise InputError("train", "tokens", f"{tokens.dtype} {tuple(tokens.shape)}", "must be a 1-D LongTensor")
    if len(tokens) * min(eval_fraction, 1 - eval_fraction) <= config.block_size + 1:
        raise InputError("train", "tokens", len(tokens), f"too short for block_size={config.block_size}")
    if int(tokens.max()) >= config.vocab_size or int(tokens.min()) < 0:
        raise InputError("train", "tokens", int(tokens.max()), f"token ids must lie in [0, vocab_size={config.vocab_size})")
