"""Specifications of Lazarus's token dispatch: the plan (property tests) and the exchange
over four real gloo processes against a single-process computation."""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.prefect_server import free_port
from tasks.moe.dispatch import combine_tokens, dispatch_tokens, plan_dispatch

torch.set_num_threads(1)


def _capacities(total: int, replicas: list[int]) -> dict[int, int]:
    base, extra = divmod(total, len(replicas))
    return {h: base + (i < extra) for i, h in enumerate(sorted(replicas))}


@st.composite
def routings(draw):
    """Random (counts, holders): 1-6 ranks, 1-5 experts, every expert held by 1+ ranks."""
    n_ranks, n_experts = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    rank_sets = st.sets(st.integers(0, n_ranks - 1), min_size=1, max_size=n_ranks)
    holders = [sorted(draw(rank_sets)) for _ in range(n_experts)]
    row = st.lists(st.integers(0, 30), min_size=n_experts, max_size=n_experts)
    counts = np.array(draw(st.lists(row, min_size=n_ranks, max_size=n_ranks)), dtype=np.int64)
    return counts, holders


plan_properties = settings(max_examples=60, deadline=None)


@plan_properties
@given(routings())
def test_plan_sends_every_token_of_every_rank_exactly_once(routing):
    counts, holders = routing
    send = plan_dispatch(counts, holders)
    assert send.shape == (*counts.shape, counts.shape[0])
    assert (send >= 0).all()
    np.testing.assert_array_equal(send.sum(axis=2), counts)


@plan_properties
@given(routings())
def test_plan_sends_only_to_holders_of_the_expert(routing):
    counts, holders = routing
    send = plan_dispatch(counts, holders)
    for e, replicas in enumerate(holders):
        others = [r for r in range(counts.shape[0]) if r not in replicas]
        assert send[:, e, others].sum() == 0


@plan_properties
@given(routings())
def test_plan_fills_every_replica_exactly_to_its_even_share_without_padding(routing):
    counts, holders = routing
    send = plan_dispatch(counts, holders)
    for e, replicas in enumerate(holders):
        for h, capacity in _capacities(int(counts[:, e].sum()), replicas).items():
            assert send[:, e, h].sum() == capacity


@plan_properties
@given(routings())
def test_plan_lets_a_holder_keep_its_own_tokens_up_to_its_capacity(routing):
    counts, holders = routing
    send = plan_dispatch(counts, holders)
    for e, replicas in enumerate(holders):
        for h, capacity in _capacities(int(counts[:, e].sum()), replicas).items():
            assert send[h, e, h] == min(counts[h, e], capacity)


@plan_properties
@given(routings())
def test_plan_is_deterministic(routing):
    counts, holders = routing
    np.testing.assert_array_equal(plan_dispatch(counts, holders), plan_dispatch(counts.copy(), [list(h) for h in holders]))


def test_plan_spills_overflow_to_the_emptiest_replica_then_the_lowest_rank():
    counts = np.array([[5, 7], [1, 0], [4, 1], [2, 0]])
    send = plan_dispatch(counts, [[0, 1], [1, 2, 3]])
    # expert 0: 12 tokens, capacities 6 + 6; ranks 0 and 1 keep theirs, rank 2's 4 go to
    # rank 1 (residual 5), rank 3's 2 split over the tie (residuals 1 and 1)
    np.testing.assert_array_equal(send[:, 0], [[5, 0, 0, 0], [0, 1, 0, 0], [0, 4, 0, 0], [1, 1, 0, 0]])
    # expert 1: 8 tokens, capacities 3 + 3 + 2 (remainder to the lowest rank); rank 2 keeps
    # its 1, rank 0's 7 fill rank 1 (3) then the tie of ranks 2 and 3 (2 each)
    np.testing.assert_array_equal(send[:, 1], [[0, 3, 2, 2], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_plan_allows_an_expert_without_holders_only_when_no_token_routes_to_it():
    assert plan_dispatch(np.array([[3, 0], [1, 0]]), [[0, 1], []])[:, 1].sum() == 0


@pytest.mark.parametrize(("counts", "holders", "message"), [
    ([[3, 2], [1, 0]], [[0, 1], []], "expert 1 has 2 tokens but no holders"),
    ([[3, -1], [1, 0]], [[0], [1]], "non-negative"),
    ([[3, 2], [1, 0]], [[0, 1]], "2 experts"),
    ([3, 2], [[0], [0]], "shape"),
    ([[1.5, 2.0]], [[0], [0]], "integers"),
    ([[3, 2], [1, 0]], [[0, 2], [1]], r"holders\[0\]"),
])
def test_plan_rejects_bad_inputs_with_a_message_naming_the_problem(counts, holders, message):
    with pytest.raises(ValueError, match=message):
        plan_dispatch(np.array(counts), holders)


# --------------------------------------------------------------------------- four gloo ranks

WORLD, EXPERTS, D_IN, D_OUT = 4, 4, 8, 5
HOLDERS = [[0, 1], [2, 3], [0, 2], [1, 3]]
ROWS = [30, 17, 0, 25]  # rank 2 routes nothing: empty splits must work too


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows, their experts (skewed towards expert 0) and the loss's upstream gradient."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(ROWS[rank], D_IN, generator=gen, dtype=torch.float64)
    experts = torch.multinomial(torch.tensor([4.0, 1.0, 2.0, 1.0]), max(ROWS[rank], 1), replacement=True,
                                generator=gen)[: ROWS[rank]]
    upstream = torch.randn(ROWS[rank], D_OUT, generator=gen, dtype=torch.float64)
    return x, experts, upstream


def _expert(e: int) -> torch.nn.Linear:
    """Expert ``e``'s weights: the same on every replica (and in the reference)."""
    torch.manual_seed(1000 + e)
    return torch.nn.Linear(D_IN, D_OUT).double()


def _reference() -> tuple[list[torch.Tensor], list[torch.Tensor], dict[int, torch.nn.Linear]]:
    """One process, every rank's rows through their expert: outputs, x gradients and expert
    gradients of the loss summed over ranks."""
    experts = {e: _expert(e) for e in range(EXPERTS)}
    outputs, xs, loss = [], [], 0.0
    for rank in range(WORLD):
        x, idx, upstream = _rank_batch(rank)
        x.requires_grad_()
        every_expert = torch.stack([experts[e](x) for e in range(EXPERTS)])  # (E, T, D_OUT)
        y = every_expert[idx, torch.arange(len(idx))]
        loss = loss + (y * upstream).sum()
        outputs.append(y.detach())
        xs.append(x)
    loss.backward()
    return outputs, [x.grad for x in xs], experts


def _check_exchange(rank: int) -> None:
    x, idx, upstream = _rank_batch(rank)
    x.requires_grad_()
    local = torch.bincount(idx, minlength=EXPERTS)
    gathered = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(gathered, local)
    plan = plan_dispatch(torch.stack(gathered).numpy(), HOLDERS)
    experts = {e: _expert(e) for e in range(EXPERTS) if rank in HOLDERS[e]}

    received, meta, ctx = dispatch_tokens(x, idx, plan, rank)
    chunks = received.split(meta.tokens_per_expert.tolist())
    assert all(len(chunks[e]) == 0 for e in range(EXPERTS) if e not in experts), "rows of an expert not held here"
    # every held expert runs, even on no rows, so this rank's backward joins the exchange
    y = combine_tokens(torch.cat([experts[e](chunks[e]) for e in sorted(experts)]), ctx)

    # marker: each row's global id, dispatched the same way, counted where it is processed
    offsets = np.cumsum([0, *ROWS])
    ids = torch.arange(offsets[rank], offsets[rank + 1], dtype=torch.float64)[:, None]
    ids_received, ids_meta, _ = dispatch_tokens(ids, idx, plan, rank)
    processed = torch.bincount(ids_received[:, 0].long(), minlength=offsets[-1])
    dist.all_reduce(processed)
    assert (processed == 1).all(), f"rows processed {processed.tolist()} times, not once each"
    every_expert = torch.cat([_rank_batch(r)[1] for r in range(WORLD)])
    assert torch.equal(every_expert[ids_received[:, 0].long()], meta.expert_idx), "a row reached the wrong expert"
    assert torch.equal(ids_meta.expert_idx, meta.expert_idx)
    assert np.array_equal(torch.bincount(meta.expert_idx, minlength=EXPERTS).numpy(), plan[:, :, rank].sum(0))

    ref_outputs, ref_x_grads, ref_experts = _reference()
    torch.testing.assert_close(y.detach(), ref_outputs[rank], atol=1e-6, rtol=0)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, ref_x_grads[rank], atol=1e-6, rtol=0)

    # each replica's gradient covers only the rows sent to it: summed over the replicas (every
    # rank adds its replica's, or zeros), it is the expert's gradient over every rank's rows
    for e in range(EXPERTS):
        for i, ref in enumerate(ref_experts[e].parameters()):
            grad = list(experts[e].parameters())[i].grad.clone() if e in experts else torch.zeros_like(ref)
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, ref.grad, atol=1e-6, rtol=0)


def _exchange_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        _check_exchange(rank)
    finally:
        dist.destroy_process_group()


def test_dispatch_and_combine_over_four_gloo_ranks_match_a_single_process():
    workers = mp.start_processes(_exchange_worker, args=(free_port("127.0.0.1"),), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    # join re-raises a worker's exception with its traceback (and ends the others)
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the gloo workers did not finish within 120 s")
