"""Expert-parallel GPT-MoE training across R ranks, as Lazarus runs it.

Every rank holds all dense weights (embeddings, attention, norms, routers: data parallel,
the same init from a seed) and, in each MoE layer, only the experts the placement gives it
(``placement.nodes[rank]``, replicas of an expert starting identical). Each MoE layer's
forward is the single-process :class:`~tasks.moe.model.MoELayer` with its middle step
replaced by an exchange (:mod:`tasks.moe.dispatch`):

    route the local tokens            router → expert ids, gates, sorted copies, counts (E,)
    all-gather the counts             (R, E), identical on every rank
    plan_dispatch → dispatch_tokens   each copy goes to one replica of its expert
    local replicas on received rows   every replica runs, even on no rows, so the backward's
                                      exchanges stay collective
    combine_tokens → gate-weighted sum

The load-balancing loss takes the expert fractions f_e from the all-gathered counts and the
mean router probabilities P_e from the local tokens: the mean of the ranks' losses is then
exactly the loss of one process on the concatenated batch (with local f_e it would not be,
the loss being a product of two batch means).

A training step (:func:`train_step`) averages dense gradients over ranks (all-reduce / R),
sums each expert's gradient over its replicas and divides by R
(one all-reduce, :func:`sync_gradients`), clips on the global norm and steps
AdamW — the single-process step on all ranks' batches with loss = the mean of the ranks'
losses.

Elasticity: :func:`expert_state` / :func:`load_expert_state` and :func:`dense_state` /
:func:`load_dense_state` move weights with their optimizer state (AdamW moments and step);
:func:`transfer_expert_states` ships the experts a new placement needs between survivors;
:func:`rebuild` re-creates the local expert set for a new placement without losing any state.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from infra.errors import InputError
from optimizers.lazarus import Placement
from tasks.moe.dispatch import combine_tokens, dispatch_tokens, plan_dispatch
from tasks.moe.model import Expert, GPTMoE, MoEConfig, MoELayer, Routing

State = dict[str, dict]  # {"params": {name: tensor}, "optimizer": {name: {key: value}}, ...}


class ExpertLostError(ValueError):
    """No live rank holds an expert: recovery needs a checkpoint, not a re-plan."""


# --------------------------------------------------------------------------- the model


class ExpertParallelLayer(MoELayer):
    """An MoE layer holding only some experts; its forward exchanges tokens with the other ranks.

    Built from a full :class:`MoELayer` (keeping its router, load buffer and the experts in
    ``local``), so the local replicas are the single-process layer's experts, same init.
    ``experts`` is an ``nn.ModuleDict`` keyed by expert id: parameter names match the full
    model's (``...experts.3.c_fc.weight``).
    """

    def __init__(self, layer: MoELayer, local: list[int], holders: list[list[int]], rank: int, group):
        nn.Module.__init__(self)  # not MoELayer.__init__: it would build all n_expert experts
        self.top_k, self.n_expert = layer.top_k, layer.n_expert
        self.router = layer.router
        self.experts = nn.ModuleDict({str(e): layer.experts[e] for e in sorted(local)})
        self.register_buffer("load", layer.load, persistent=False)
        self.holders, self.rank, self.group = holders, rank, group
        self.last_rank_counts = self.last_processed = None  # of the last forward, for stats

    @property
    def local_experts(self) -> list[int]:
        return sorted(int(e) for e in self.experts)

    def route(self, x: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """:meth:`MoELayer.dispatch` with the counts all-gathered: (routing, counts (R, E)).

        ``routing.counts`` are this rank's; its ``aux_loss`` uses the global fractions f_e.
        """
        expert_idx, gate, probs = self.router(x)
        flat = expert_idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_expert)
        gathered = [torch.empty_like(counts) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, counts, group=self.group)
        rank_counts = torch.stack(gathered)
        total = rank_counts.sum(0)
        aux_loss = self.n_expert * torch.sum(total / total.sum() * probs.mean(dim=0))
        return Routing(expert_idx, gate, order, counts, aux_loss), rank_counts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` (..., C) → ``y`` like ``x``, stats ``{"counts": (E,) over all ranks, "aux_loss": ()}``."""
        flat = x.reshape(-1, x.shape[-1])
        routing, rank_counts = self.route(flat)
        plan = plan_dispatch(rank_counts.numpy(), self.holders)
        copy_expert = routing.expert_idx.flatten()[routing.order]
        received, meta, ctx = dispatch_tokens(self.permute(flat, routing), copy_expert, plan, self.rank, self.group)
        chunks = received.split(meta.tokens_per_expert.tolist())
        # received is expert-sorted and empty for experts held elsewhere: cat in expert order;
        # a rank holding no expert receives no rows, and passes them on so the backward's
        # exchanges stay collective
        outputs = [self.experts[str(e)](chunks[e]) for e in self.local_experts]
        processed = torch.cat(outputs) if outputs else received.clone()
        y = self.combine(combine_tokens(processed, ctx, self.group), routing)
        counts = rank_counts.sum(0)
        if self.training:
            self.load += counts
        self.last_rank_counts, self.last_processed = rank_counts, torch.from_numpy(meta.tokens_per_expert)
        return y.view_as(x), {"counts": counts, "aux_loss": routing.aux_loss}


class ExpertParallelMoE(GPTMoE):
    """A GPT-MoE whose MoE layers hold only this rank's experts.

    Parameters
    ----------
    config: model shape.
    placement: which experts each rank holds; node ``i`` is rank ``i`` of ``group``.
    rank: this process's rank in ``group``.
    group: the process group of all the placement's ranks; default (and necessarily: the
        gradient all-reduce spans it) the whole world.
    seed: ``torch.manual_seed(seed); GPTMoE(config)`` gives the same weights, so every rank
        (and a single-process reference built that way) starts identical.

    Construction is local (no collective): a new placement needs no new process group.
    ``forward(idx, targets)`` returns ``(logits, loss, stats)`` like
    :class:`GPTMoE`, with ``counts`` summed over ranks and, per MoE layer, ``rank_counts``
    (R, E) and ``processed`` (E,) rows this rank's replicas computed.
    """

    def __init__(self, config: MoEConfig, placement: Placement, rank: int, group=None, *, seed: int = 0):
        _check_placement(config, placement, rank, group)
        torch.manual_seed(seed)
        super().__init__(config)
        self.placement, self.rank, self.group = placement, rank, group
        local = placement.nodes[rank]
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                block.ffn = ExpertParallelLayer(block.ffn, local, placement.holders, rank, group)

    @property
    def local_experts(self) -> list[int]:
        return sorted(self.placement.nodes[self.rank])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits, loss, stats = super().forward(idx, targets)
        stats["rank_counts"] = torch.stack([layer.last_rank_counts for layer in self.moe_layers()])
        stats["processed"] = torch.stack([layer.last_processed for layer in self.moe_layers()])
        return logits, loss, stats

    def expert_parameters(self) -> dict[int, list[nn.Parameter]]:
        """Local expert → its parameters in every MoE layer (layer order, then module order)."""
        return {e: [p for layer in self.moe_layers() for p in layer.experts[str(e)].parameters()]
                for e in self.local_experts}

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the experts (identical on all ranks)."""
        expert = {id(p) for params in self.expert_parameters().values() for p in params}
        return [p for p in self.parameters() if id(p) not in expert]


def _check_placement(config: MoEConfig, placement: Placement, rank: int, group) -> None:
    world = dist.get_world_size(group)
    if world != dist.get_world_size():
        raise InputError("ExpertParallelMoE", "group", world, f"must span the whole world of {dist.get_world_size()} "
                         "ranks (the gradient all-reduce spans the world)")
    if placement.n_experts != config.n_expert:
        raise InputError("ExpertParallelMoE", "placement.n_experts", placement.n_experts,
                         f"must equal config.n_expert={config.n_expert}")
    if placement.n_nodes != world:
        raise InputError("ExpertParallelMoE", "placement.nodes", placement.n_nodes,
                         f"must list one node per rank ({world})")
    if rank != dist.get_rank(group):
        raise InputError("ExpertParallelMoE", "rank", rank, f"is not this process's rank {dist.get_rank(group)}")
    lost = [e for e, ranks in enumerate(placement.holders) if not ranks]
    if lost:
        raise ExpertLostError(f"experts {lost} have no holder in placement {placement.nodes}")


# --------------------------------------------------------------------------- a training step


def sync_gradients(model: ExpertParallelMoE) -> None:
    """Average dense gradients over ranks; sum each expert's over its replicas, divided by R.

    With each rank's loss the mean over its own tokens, the gradients are then those of the
    mean of the ranks' losses. One all-reduce over the world carries both: the dense
    gradients, and a slot per (MoE layer, expert) that each rank fills for the experts it
    holds (zeros elsewhere), so a slot sums its expert's replicas. Per-replica-set groups
    would move less data but every new placement would have to create them all (a
    rendezvous per group), which is what makes re-planning slow; here a new placement needs
    no new group.
    """
    world = dist.get_world_size(model.group)
    dense = model.dense_parameters()
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    layers, n_expert = model.moe_layers(), model.config.n_expert
    slot = _expert_numel(model.config)
    dense_numel = sum(p.numel() for p in dense)
    flat = torch.zeros(dense_numel + len(layers) * n_expert * slot, dtype=dense[0].grad.dtype)
    torch.cat([p.grad.reshape(-1) for p in dense], out=flat[:dense_numel])
    for i, layer in enumerate(layers):
        for e in layer.local_experts:
            start = dense_numel + (i * n_expert + e) * slot
            grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in layer.experts[str(e)].parameters()]
            flat[start : start + slot] = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=model.group)
    flat /= world
    for p, g in zip(dense, flat[:dense_numel].split([p.numel() for p in dense])):
        p.grad.copy_(g.view_as(p))
    for i, layer in enumerate(layers):
        for e in layer.local_experts:
            start = dense_numel + (i * n_expert + e) * slot
            params = list(layer.experts[str(e)].parameters())
            for q, g in zip(params, flat[start : start + slot].split([q.numel() for q in params])):
                q.grad = g.view_as(q).clone()


def _expert_numel(config: MoEConfig) -> int:
    """Parameters of one expert (its slot in the gradient all-reduce)."""
    hidden = config.ffn_mult * config.n_embd
    return 2 * config.n_embd * hidden + hidden + config.n_embd


def global_grad_norm(model: ExpertParallelMoE) -> torch.Tensor:
    """The L2 norm of the whole model's gradient, the same on every rank (after :func:`sync_gradients`).

    Dense gradients are identical everywhere, so each rank counts them; an expert's replicas
    hold the same gradient, so only its lowest-ranked holder adds it to the all-reduced sum
    of squares — every expert counts once, as in the single-process model.
    """
    dense_sq = sum(p.grad.double().pow(2).sum() for p in model.dense_parameters())
    holders = model.placement.holders
    owned = [p for e, params in model.expert_parameters().items() if min(holders[e]) == model.rank for p in params]
    expert_sq = sum((p.grad.double().pow(2).sum() for p in owned), torch.zeros((), dtype=torch.float64))
    dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=model.group)
    return (dense_sq + expert_sq).sqrt()


def train_step(model: ExpertParallelMoE, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor], grad_clip: float = 1.0, share: float | None = None) -> dict:
    """One optimizer step on this rank's ``batch`` = (x, y), together with every other rank.

    forward → backward → :func:`sync_gradients` → :func:`global_grad_norm` → the global
    loss → clip to ``grad_clip`` (0: no clipping) → ``optimizer.step()``. The learning rate is
    the caller's (set it in ``optimizer.param_groups`` first, as the reference does).

    Every collective comes before the update, so a step that raises (a peer died) has changed
    nothing: an elastic run can redo it on the survivors without applying it twice.

    ``share``: this rank's fraction of the global batch when ranks hold different numbers of
    rows (None: equal shares). The rank's loss is weighted by ``share · R`` before the
    backward, so the update is the single-process one on the whole batch whatever the split.

    Returns ``loss`` (the global batch's loss), ``local_loss``, ``grad_norm`` (before
    clipping), ``counts`` (n_moe_layers, E) over all ranks and ``processed`` (n_moe_layers, E)
    rows this rank's replicas computed.
    """
    x, y = batch
    world = dist.get_world_size(model.group)
    weight = 1.0 / world if share is None else share
    optimizer.zero_grad(set_to_none=True)
    _, loss, stats = model(x, y)
    (loss * (weight * world)).backward()
    sync_gradients(model)
    norm = global_grad_norm(model)
    global_loss = loss.detach().clone() * weight
    dist.all_reduce(global_loss, op=dist.ReduceOp.SUM, group=model.group)
    # the step's last collective is behind us: from here on nothing can fail half-way
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), grad_clip, norm)
    optimizer.step()
    return {"loss": global_loss.item(), "local_loss": loss.item(),
            "grad_norm": norm.item(), "counts": stats["counts"], "processed": stats["processed"]}


# --------------------------------------------------------------------------- state


def _snapshot(named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> State:
    def copy(value):
        return value.detach().clone() if torch.is_tensor(value) else value

    return {"params": {name: p.detach().clone() for name, p in named.items()},
            "optimizer": {name: {k: copy(v) for k, v in optimizer.state[p].items()}
                          for name, p in named.items() if p in optimizer.state}}


def _restore(named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, state: State, what: str) -> None:
    if set(state["params"]) != set(named):
        raise ValueError(f"{what}: state holds {sorted(state['params'])}, the model {sorted(named)}")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state["params"][name])
    for name, p in named.items():
        optimizer.state.pop(p, None)
        if name in state["optimizer"]:
            saved = state["optimizer"][name]
            optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()}


def _expert_named(model: ExpertParallelMoE, expert: int) -> dict[str, nn.Parameter]:
    if str(expert) not in model.moe_layers()[0].experts:
        raise ValueError(f"rank {model.rank} holds no replica of expert {expert} (it holds {model.local_experts})")
    return {f"moe{i}.{name}": p for i, layer in enumerate(model.moe_layers())
            for name, p in layer.experts[str(expert)].named_parameters()}


def expert_state(model: ExpertParallelMoE, optimizer: torch.optim.Optimizer, expert: int) -> State:
    """A copy of a local expert's weights and optimizer state (AdamW: step, exp_avg, exp_avg_sq)
    in every MoE layer, keyed ``moe{layer}.{param}`` (e.g. ``moe0.c_fc.weight``)."""
    return _snapshot(_expert_named(model, expert), optimizer)


def load_expert_state(model: ExpertParallelMoE, optimizer: torch.optim.Optimizer, expert: int, state: State) -> None:
    """Overwrite local expert ``expert``'s weights and optimizer state with ``state`` (from :func:`expert_state`)."""
    _restore(_expert_named(model, expert), optimizer, state, f"expert {expert}")


def _dense_named(model: ExpertParallelMoE) -> dict[str, nn.Parameter]:
    dense = {id(p) for p in model.dense_parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in dense}


def dense_state(model: ExpertParallelMoE, optimizer: torch.optim.Optimizer) -> State:
    """A copy of the dense weights, their optimizer state and the expert-load counters (for a joining rank)."""
    state = _snapshot(_dense_named(model), optimizer)
    state["buffers"] = {name: b.clone() for name, b in model.named_buffers()}
    return state


def load_dense_state(model: ExpertParallelMoE, optimizer: torch.optim.Optimizer, state: State) -> None:
    """Overwrite the dense weights, their optimizer state and the load counters with ``state``."""
    _restore(_dense_named(model), optimizer, state, "dense")
    buffers = dict(model.named_buffers())
    for name, value in state.get("buffers", {}).items():
        buffers[name].copy_(value)


# --------------------------------------------------------------------------- elasticity


def plan_expert_transfers(held: list[list[int]], placement: Placement) -> list[tuple[int, int, int]]:
    """Which rank sends which expert to which, for the ranks to go from ``held`` to ``placement``.

    ``held[r]``: the experts rank ``r`` (numbered as in ``placement``) holds now. Every
    expert a rank must newly hold comes from a rank holding it now, the one with the fewest
    sends so far (then the lowest). Returns ``(expert, src, dst)`` in (dst, expert) order;
    raises :class:`ExpertLostError` for an expert no rank holds.
    """
    if len(held) != placement.n_nodes:
        raise ValueError(f"held lists {len(held)} ranks, the placement {placement.n_nodes}")
    sends = [0] * len(held)
    transfers = []
    for dst, experts in enumerate(placement.nodes):
        for e in sorted(set(experts) - set(held[dst])):
            sources = [r for r, mine in enumerate(held) if e in mine]
            if not sources:
                raise ExpertLostError(f"expert {e} is held by no live rank (held: {held}); restore from a checkpoint")
            src = min(sources, key=lambda r: (sends[r], r))
            sends[src] += 1
            transfers.append((e, src, dst))
    return transfers


def transfer_expert_states(model: ExpertParallelMoE, optimizer: torch.optim.Optimizer, held: list[list[int]],
                           placement: Placement, rank: int, group=None) -> dict[int, State]:
    """Ship the expert states :func:`plan_expert_transfers` calls for; return those received here.

    Run by every rank of ``group`` (the new one) before :func:`rebuild`, with the same
    ``held`` and ``placement``; ``model`` still has its old experts. Transfers are
    point-to-point (``dist.send_object_list``: a size header, then the pickled state) in one
    global order, so the earliest unfinished transfer always has both ends waiting on it.
    """
    received = {}
    for expert, src, dst in plan_expert_transfers(held, placement):
        if rank == src:
            dist.send_object_list([expert_state(model, optimizer, expert)], group=group, group_dst=dst)
        elif rank == dst:
            box = [None]
            dist.recv_object_list(box, group=group, group_src=src)
            received[expert] = box[0]
    return received


def rebuild(model: ExpertParallelMoE, optimizer: torch.optim.Optimizer, new_placement: Placement, new_rank: int,
            fetch: Callable[[int], State], group=None) -> None:
    """Re-create the local expert set for ``new_placement``, in place, keeping every optimizer state.

    Experts held before and after keep their modules and optimizer state; dropped ones
    leave the model and the optimizer; new ones are built and loaded from ``fetch(expert)``
    (an :func:`expert_state`), called before anything changes. ``optimizer`` is
    :func:`~tasks.moe.train.configure_optimizer`'s: a new matrix joins the param group with
    weight decay, a bias the one without. ``group`` (the new world) must already exist.
    """
    config = model.config
    _check_placement(config, new_placement, new_rank, group)
    old, new = set(model.local_experts), set(new_placement.nodes[new_rank])
    fetched = {e: fetch(e) for e in sorted(new - old)}
    dtype = model.lm_head.weight.dtype
    dropped = {id(p) for e in old - new for p in model.expert_parameters()[e]}
    for layer in model.moe_layers():
        modules = {e: layer.experts[str(e)] if e in old else Expert(config).to(dtype) for e in sorted(new)}
        layer.experts = nn.ModuleDict({str(e): m for e, m in modules.items()})
        layer.holders, layer.rank, layer.group = new_placement.holders, new_rank, group
    for param_group in optimizer.param_groups:
        for p in param_group["params"]:
            if id(p) in dropped:
                optimizer.state.pop(p, None)
        param_group["params"] = [p for p in param_group["params"] if id(p) not in dropped]
    model.placement, model.rank, model.group = new_placement, new_rank, group
    for e, params in model.expert_parameters().items():
        if e in fetched:
            for p in params:
                _param_group(optimizer, p)["params"].append(p)
            load_expert_state(model, optimizer, e, fetched[e])


def _param_group(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict:
    """The param group ``configure_optimizer`` puts ``p`` in: weight decay on matrices only."""
    decay = p.dim() >= 2
    for group in optimizer.param_groups:
        if (group["weight_decay"] > 0) == decay:
            return group
    return optimizer.param_groups[0]  # weight_decay 0 everywhere: the groups differ in nothing else
