"""A compact GPT with mixture-of-experts feed-forward layers, in plain torch (nanoGPT style).

The MoE layer's forward is three steps, so a distributed runtime can replace the middle one:

    routing = layer.dispatch(x)                 # which experts each token goes to, and with what gate
    xs = layer.permute(x, routing)              # token copies sorted by expert, no padding
    ys = [expert e on its slice of xs]          # the local step; an expert-parallel runtime
                                                #   sends the slices to the experts' owners instead
                                                #   (all-to-all with split sizes routing.counts)
    y = layer.combine(ys, routing)              # gate-weighted sum back into token order

Every token goes to exactly ``top_k`` experts; capacity is not enforced (no token is
dropped). Each MoE layer also keeps a running count of tokens per expert while training,
which a trainer reads with ``GPTMoE.expert_loads()`` (Lazarus re-plans replicas from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from infra.errors import InputError


@dataclass(frozen=True)
class MoEConfig:
    """Shape of a GPT-MoE.

    Parameters
    ----------
    vocab_size: number of token ids.
    block_size: longest sequence (positions embedded).
    n_layer, n_head, n_embd: transformer depth, attention heads, hidden size.
    n_expert: experts per MoE layer.
    top_k: experts each token is routed to (1: Switch, 2: GShard-style).
    moe_every: every ``moe_every``-th layer has an MoE feed-forward, the others a dense MLP.
    ffn_mult: hidden size of an expert (and of a dense MLP) as a multiple of ``n_embd``.
    aux_loss_weight: weight of the load-balancing loss added to the cross-entropy.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_expert: int
    top_k: int = 1
    moe_every: int = 1
    ffn_mult: int = 4
    aux_loss_weight: float = 0.01

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_expert", "moe_every", "ffn_mult"):
            if getattr(self, name) < 1:
                raise InputError("MoEConfig", name, getattr(self, name), "must be ≥ 1")
        if self.n_embd % self.n_head:
            raise InputError("MoEConfig", "n_embd", self.n_embd, f"must be divisible by n_head={self.n_head}")
        if self.top_k not in (1, 2) or self.top_k > self.n_expert:
            raise InputError("MoEConfig", "top_k", self.top_k, f"must be 1 or 2 and ≤ n_expert={self.n_expert}")
        if self.moe_every > self.n_layer:
            raise InputError("MoEConfig", "moe_every", self.moe_every, f"leaves no MoE layer among n_layer={self.n_layer}")
        if self.aux_loss_weight < 0:
            raise InputError("MoEConfig", "aux_loss_weight", self.aux_loss_weight, "must be ≥ 0")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether transformer layer ``layer`` (0-based) has an MoE feed-forward."""
        return (layer + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))


CONFIGS = {
    # the Lazarus paper's models (simulator only: never built in tests)
    "gpt-s": MoEConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, n_expert=8),
    "gpt-m": MoEConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=16, n_embd=1024, n_expert=12),
    "gpt-l": MoEConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=16, n_embd=1024, n_expert=16),
    # trainable on a CPU; vocab 128 covers any ASCII character vocabulary
    # (fit one exactly with dataclasses.replace(config, vocab_size=tokenizer.vocab_size))
    "tiny": MoEConfig(vocab_size=128, block_size=64, n_layer=2, n_head=4, n_embd=64, n_expert=8),
    "small": MoEConfig(vocab_size=128, block_size=128, n_layer=4, n_head=4, n_embd=128, n_expert=8),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Expert(nn.Module):
    """The feed-forward network: one expert in an MoE layer, the dense MLP elsewhere."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_mult * config.n_embd)
        self.c_proj = nn.Linear(config.ffn_mult * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Router(nn.Module):
    """Top-k gating: softmax over experts, the k most probable, gates renormalised when k = 2.

    With k = 1 the gate is the chosen expert's probability (Switch Transformer), so the
    router still gets a gradient through the output it scales.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.w_gate = nn.Linear(config.n_embd, config.n_expert, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (N, C) → expert ids (N, k), gates (N, k), router probabilities (N, E)."""
        probs = F.softmax(self.w_gate(x), dim=-1)
        gate, expert_idx = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return expert_idx, gate, probs


class Routing(NamedTuple):
    """Where each token of a flattened batch of N tokens goes.

    expert_idx: (N, k) experts of each token.
    gate: (N, k) weight of each expert's output in the token's result.
    order: (N·k,) the token copies sorted by expert: copy j is token ``order[j] // k``
        going to ``expert_idx.flatten()[order[j]]``; stable, so tokens keep their order
        within an expert.
    counts: (E,) tokens per expert (``torch.bincount`` of ``expert_idx``); the split sizes
        of the sorted copies.
    aux_loss: the Switch load-balancing loss, E · Σ_e f_e · P_e, with f_e the fraction of
        token copies sent to expert e and P_e its mean router probability (1 when balanced).
    """

    expert_idx: torch.Tensor
    gate: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor
    aux_loss: torch.Tensor


class MoELayer(nn.Module):
    """A router and ``n_expert`` experts; ``forward(x) -> (y, stats)``."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k, self.n_expert = config.top_k, config.n_expert
        self.router = Router(config)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.n_expert))
        # tokens per expert since the last reset, counted in training mode only
        self.register_buffer("load", torch.zeros(config.n_expert, dtype=torch.long), persistent=False)

    def dispatch(self, x: torch.Tensor) -> Routing:
        """Route the tokens ``x`` (N, C)."""
        expert_idx, gate, probs = self.router(x)
        flat = expert_idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_expert)
        aux_loss = self.n_expert * torch.sum(counts / flat.numel() * probs.mean(dim=0))
        return Routing(expert_idx, gate, order, counts, aux_loss)

    def permute(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The token copies, sorted by expert: (N·k, C), expert e's slice ``counts[e]`` long."""
        return x[routing.order // self.top_k]

    def combine(self, expert_out: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Scatter the experts' outputs (N·k, C, in ``order``) back to tokens, weighted by gate: (N, C)."""
        gate = routing.gate.flatten()[routing.order]
        token = routing.order // self.top_k
        y = expert_out.new_zeros(routing.expert_idx.shape[0], expert_out.shape[1])
        return y.index_add(0, token, expert_out * gate[:, None].to(expert_out.dtype))

    def compute_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local expert step: each expert on its contiguous slice of the sorted copies."""
        chunks = xs.split(counts.tolist())
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` (..., C) → ``y`` like ``x``, and stats ``{"counts": (E,), "aux_loss": ()}``."""
        flat = x.reshape(-1, x.shape[-1])
        routing = self.dispatch(flat)
        y = self.combine(self.compute_experts(self.permute(flat, routing), routing.counts), routing)
        if self.training:
            self.load += routing.counts.detach()
        return y.view_as(x), {"counts": routing.counts, "aux_loss": routing.aux_loss}


class Block(nn.Module):
    def __init__(self, config: MoEConfig, moe: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.ffn = MoELayer(config) if moe else Expert(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        x = x + self.attn(self.ln_1(x))
        if isinstance(self.ffn, MoELayer):
            h, stats = self.ffn(self.ln_2(x))
            return x + h, stats
        return x + self.ffn(self.ln_2(x)), None


class GPTMoE(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(i)) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in depth order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``idx`` (B, T) → logits (B, T, V), loss (None without targets), stats.

        loss = cross-entropy + aux_loss_weight · aux_loss. stats: ``counts`` (n_moe_layers, E)
        tokens per expert in this batch, ``aux_loss`` the mean load-balancing loss over MoE
        layers, ``ce_loss`` the cross-entropy alone (with targets).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        layer_stats = []
        for block in self.blocks:
            x, stats = block(x)
            if stats is not None:
                layer_stats.append(stats)
        logits = self.lm_head(self.ln_f(x))
        stats = {"counts": torch.stack([s["counts"] for s in layer_stats]),
                 "aux_loss": torch.stack([s["aux_loss"] for s in layer_stats]).mean()}
        loss = None
        if targets is not None:
            stats["ce_loss"] = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            loss = stats["ce_loss"] + self.config.aux_loss_weight * stats["aux_loss"]
        return logits, loss, stats

    def expert_loads(self) -> torch.Tensor:
        """Tokens per expert per MoE layer since the last reset (training mode only): (n_moe_layers, E)."""
        return torch.stack([layer.load.clone() for layer in self.moe_layers()])

    def reset_expert_loads(self) -> None:
        """Start counting expert loads afresh."""
        for layer in self.moe_layers():
            layer.load.zero_()


@dataclass(frozen=True)
class ParamCounts:
    """Parameters and forward FLOPs per token of a GPT-MoE, from its config alone.

    FLOPs count 2 per multiply-add of a weight matrix (biases and norms ignored); a
    training step costs about 3× the forward. Attention includes the score and value
    products over the full context (``4 · block_size · n_embd``), as nanoGPT does.
    """

    dense: int  # every parameter outside the experts (lm head tied to the embedding)
    per_expert: int  # one expert
    n_expert: int
    n_moe_layers: int
    n_layer: int
    top_k: int
    attention_flops_per_token: int  # one layer
    expert_flops_per_token: int  # one expert, one token copy
    router_flops_per_token: int  # one MoE layer
    dense_mlp_flops_per_token: int  # one dense layer
    lm_head_flops_per_token: int

    @property
    def total(self) -> int:
        return self.dense + self.per_expert * self.n_expert * self.n_moe_layers

    @property
    def forward_flops_per_token(self) -> int:
        n_dense = self.n_layer - self.n_moe_layers
        return (self.n_layer * self.attention_flops_per_token
                + self.n_moe_layers * (self.router_flops_per_token + self.top_k * self.expert_flops_per_token)
                + n_dense * self.dense_mlp_flops_per_token + self.lm_head_flops_per_token)


def param_counts(config: MoEConfig) -> ParamCounts:
    """Dense and per-expert parameter counts and forward FLOPs per token, computed analytically."""
    C, F_, V, T, E = config.n_embd, config.ffn_mult * config.n_embd, config.vocab_size, config.block_size, config.n_expert
    layer_norm = 2 * C
    attention = (C * 3 * C + 3 * C) + (C * C + C)
    ffn = (C * F_ + F_) + (F_ * C + C)
    router = C * E
    n_moe = config.n_moe_layers
    dense = (V * C + T * C  # token and position embeddings (the lm head shares the former)
             + config.n_layer * (2 * layer_norm + attention)
             + n_moe * router + (config.n_layer - n_moe) * ffn
             + layer_norm)
    return ParamCounts(
        dense=dense, per_expert=ffn, n_expert=E, n_moe_layers=n_moe, top_k=config.top_k, n_layer=config.n_layer,
        attention_flops_per_token=2 * 4 * C * C + 4 * T * C,
        expert_flops_per_token=2 * 2 * C * F_,
        router_flops_per_token=2 * C * E,
        dense_mlp_flops_per_token=2 * 2 * C * F_,
        lm_head_flops_per_token=2 * C * V,
    )
