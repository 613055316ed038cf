"""Expert-parallel token dispatch for Lazarus: which replica processes each token, and the
exchange that gets it there and back.

Every expert ``e`` has replicas on the ranks ``holders[e]``. Each rank routes its tokens,
all ranks all-gather the per-(rank, expert) counts, and each computes the same plan with
:func:`plan_dispatch` (Lazarus §4, load-balanced dispatch):

    N_e        = Σ_r counts[r, e]                                  tokens of expert e
    cap_e(h)   = ⌊N_e / |H_e|⌋ + [index of h in H_e < N_e mod |H_e|]   capacity of each replica
    keep(h)    = min(counts[h, e], cap_e(h))                        local first
    the rest   → replicas by residual capacity, sources in rank order, destinations by
                 largest residual capacity, then rank

The capacities sum to ``N_e``, so every replica receives exactly its capacity and nothing is
padded.

:func:`dispatch_tokens` and :func:`combine_tokens` carry the rows there and back with one
all-to-all each; both are differentiable. (The replicas of an expert agree on its gradient
through :func:`tasks.moe.expert_parallel.sync_gradients`.)

Why a small autograd Function instead of ``torch.distributed.nn.functional.all_to_all_single``:
in torch 2.13 that function works with gloo but warns (FutureWarning) on every call and
points at the private ``torch.distributed._functional_collectives``; the public,
non-deprecated ``dist.all_to_all_single`` (which gloo supports on CPU) plus a backward that
is the same exchange with the split sizes swapped is a dozen lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


# --------------------------------------------------------------------------- the plan


def plan_dispatch(counts: np.ndarray, holders: list[list[int]]) -> np.ndarray:
    """Plan which replica processes each rank's tokens, expert by expert.

    Parameters
    ----------
    counts : (R, E) int array
        ``counts[r, e]``: tokens rank ``r`` routes to expert ``e`` (all-gathered, so every
        rank passes the same array and gets the same plan).
    holders : list of E rank lists
        ``holders[e]``: the ranks holding a replica of expert ``e``.

    Returns
    -------
    send : (R, E, R) int64 array
        ``send[src, e, dst]``: tokens of expert ``e`` that rank ``src`` sends to rank ``dst``
        (``src == dst`` is local). ``Σ_dst send[src, e, dst] == counts[src, e]``; only
        holders of ``e`` receive; each replica receives exactly its capacity.
    """
    counts = _checked_counts(counts, holders)
    n_ranks, n_experts = counts.shape
    send = np.zeros((n_ranks, n_experts, n_ranks), dtype=np.int64)
    for e in range(n_experts):
        replicas = sorted(holders[e])
        total = int(counts[:, e].sum())
        if total == 0:
            continue
        # capacity: an even split, the remainder to the lowest ranks
        base, extra = divmod(total, len(replicas))
        residual = {h: base + (i < extra) for i, h in enumerate(replicas)}
        left = counts[:, e].copy()
        # local first: a holder keeps its own tokens up to its capacity
        for h in replicas:
            keep = min(int(left[h]), residual[h])
            send[h, e, h] = keep
            left[h] -= keep
            residual[h] -= keep
        # overflow and non-holders' tokens: sources in rank order, fullest residual first
        for src in np.flatnonzero(left):
            for dst in sorted(replicas, key=lambda h: (-residual[h], h)):
                move = min(int(left[src]), residual[dst])
                send[src, e, dst] += move
                left[src] -= move
                residual[dst] -= move
                if left[src] == 0:
                    break
    return send


def _checked_counts(counts: np.ndarray, holders: list[list[int]]) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be a (ranks, experts) array, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {counts.dtype}")
    n_ranks, n_experts = counts.shape
    if len(holders) != n_experts:
        raise ValueError(f"counts has {n_experts} experts (columns) but holders lists {len(holders)}")
    if (counts < 0).any():
        r, e = np.argwhere(counts < 0)[0]
        raise ValueError(f"counts must be non-negative: counts[{r}, {e}] = {counts[r, e]} (rank {r}, expert {e})")
    for e, ranks in enumerate(holders):
        if len(set(ranks)) != len(ranks) or any(not 0 <= h < n_ranks for h in ranks):
            raise ValueError(f"holders[{e}] must be distinct ranks in [0, {n_ranks}), got {list(ranks)}")
        if not ranks and counts[:, e].sum() > 0:
            raise ValueError(f"expert {e} has {counts[:, e].sum()} tokens but no holders")
    return counts.astype(np.int64)


# --------------------------------------------------------------------------- the exchange


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with autograd: the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_x, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_x, None, None, None


@dataclass(frozen=True)
class RecvMeta:
    """What the received rows are: ``received.split(tokens_per_expert.tolist())`` gives one
    chunk per expert, in expert order (zero rows for experts this rank does not hold)."""

    expert_idx: Tensor  # (N,) long: expert of each received row, ascending
    src_rank: Tensor  # (N,) long: rank each row came from (ascending within an expert)
    tokens_per_expert: np.ndarray  # (E,) int64


@dataclass(frozen=True)
class DispatchContext:
    """How to undo a dispatch (for :func:`combine_tokens`)."""

    send_order: Tensor  # original row index of each sent row
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    recv_order: Tensor  # received (source-major) row index of each row of ``received``


def dispatch_tokens(x: Tensor, expert_idx: Tensor, plan: np.ndarray, rank: int,
                    group: dist.ProcessGroup | None = None) -> tuple[Tensor, RecvMeta, DispatchContext]:
    """Send this rank's rows to the replicas the plan names; receive the rows to process here.

    Parameters
    ----------
    x : (T, d) tensor
        This rank's token activations, one row per (token, routing choice).
    expert_idx : (T,) long tensor
        Expert of each row; ``bincount(expert_idx) == plan[rank].sum(-1)``.
    plan : (R, E, R) int array
        :func:`plan_dispatch`'s output, identical on every rank.
    rank : int
        This rank within ``group`` (``group`` spans all R ranks; default: the world).

    Returns
    -------
    received : (N, d) rows to process here, grouped by expert (ascending), then source rank.
    recv_meta : :class:`RecvMeta`, the expert (and source) of each received row.
    ctx : :class:`DispatchContext` for :func:`combine_tokens`.

    Collective: every rank of ``group`` calls it, and runs backward through it, together.
    """
    plan = np.asarray(plan)
    if plan.ndim != 3 or plan.shape[0] != plan.shape[2]:
        raise ValueError(f"plan must be (ranks, experts, ranks), got shape {plan.shape}")
    n_ranks, n_experts, _ = plan.shape
    if dist.get_world_size(group) != n_ranks:
        raise ValueError(f"plan is for {n_ranks} ranks but the group has {dist.get_world_size(group)}")
    if x.shape[0] != expert_idx.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but expert_idx has {expert_idx.shape[0]}")
    mine = plan[rank]  # (E, R)
    local_counts = torch.bincount(expert_idx, minlength=n_experts).cpu().numpy()
    if len(local_counts) != n_experts or (local_counts != mine.sum(1)).any():
        raise ValueError(f"rank {rank}: rows per expert {local_counts.tolist()} differ from the plan's "
                         f"{mine.sum(1).tolist()}")

    # each expert's rows, in their original order, go to its destinations in rank order
    by_expert = torch.argsort(expert_idx, stable=True).cpu()
    dst = torch.from_numpy(np.concatenate([np.repeat(np.arange(n_ranks), mine[e]) for e in range(n_experts)]))
    # the exchange needs one contiguous block per destination, expert-sorted inside it
    send_order = by_expert[torch.argsort(dst, stable=True)].to(x.device)
    send_splits = mine.sum(0).tolist()
    recv_splits = plan[:, :, rank].sum(1).tolist()
    arrived = _AllToAll.apply(x[send_order], send_splits, recv_splits, group)

    # arrived is source-major (expert-sorted within a source); regroup expert-major
    per_src_expert = plan[:, :, rank]  # (R, E)
    arrived_expert = np.concatenate([np.repeat(np.arange(n_experts), per_src_expert[s]) for s in range(n_ranks)])
    arrived_src = np.repeat(np.arange(n_ranks), per_src_expert.sum(1))
    recv_order = torch.from_numpy(np.argsort(arrived_expert, kind="stable"))
    meta = RecvMeta(expert_idx=torch.from_numpy(arrived_expert[recv_order.numpy()]).to(x.device),
                    src_rank=torch.from_numpy(arrived_src[recv_order.numpy()]).to(x.device),
                    tokens_per_expert=per_src_expert.sum(0))
    recv_order = recv_order.to(x.device)
    ctx = DispatchContext(send_order=send_order, send_splits=send_splits, recv_splits=recv_splits,
                          recv_order=recv_order)
    return arrived[recv_order], meta, ctx


def combine_tokens(y_received: Tensor, ctx: DispatchContext, group: dist.ProcessGroup | None = None) -> Tensor:
    """Send processed rows back to their source ranks, in the original row order there.

    ``y_received`` is (N, d') in the order :func:`dispatch_tokens` returned ``received``.
    Returns (T, d'), row ``i`` the result for row ``i`` of the ``x`` dispatched. Collective,
    like the dispatch.
    """
    arrived_order = torch.empty_like(ctx.recv_order)
    arrived_order[ctx.recv_order] = torch.arange(len(ctx.recv_order), device=ctx.recv_order.device)
    returned = _AllToAll.apply(y_received[arrived_order], ctx.recv_splits, ctx.send_splits, group)
    original = torch.empty_like(ctx.send_order)
    original[ctx.send_order] = torch.arange(len(ctx.send_order), device=ctx.send_order.device)
    return returned[original]
