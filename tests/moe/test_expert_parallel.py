"""Specifications of expert-parallel training: four gloo ranks, each with its slice of the
global batch and its experts of a Lazarus placement, train like one process on the whole
batch — and keep doing so after a rank is dropped and the survivors re-plan.

One spawn serves every test (its workers train a top-1 and a top-2 model); each worker
reports its losses, token counts and weights, and the tests compare them with the
single-process reference computed here. Float64, so the comparison can be tight.
"""

from __future__ import annotations

import dataclasses
import os
import functools
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infra.prefect_server import free_port
from optimizers.lazarus import Placement, plan_lazarus
from tasks.moe.corpus import batches, load_corpus, tokenize
from tasks.moe.expert_parallel import (ExpertLostError, ExpertParallelMoE, dense_state, expert_state,
                                       load_dense_state, load_expert_state, plan_expert_transfers, rebuild,
                                       train_step, transfer_expert_states)
from tasks.moe.model import CONFIGS, GPTMoE, MoEConfig
from tasks.moe.train import configure_optimizer

torch.set_num_threads(1)

WORLD, SURVIVORS = 4, 3  # rank 3 leaves after the first phase
STEPS, MORE_STEPS = 3, 2
GLOBAL_BATCH, SEQ_LEN = 12, 32  # divisible by 4 and by 3 ranks
TOP_KS = (1, 2)
SEED, LR = 0, 3e-3
LOADS = [9, 7, 6, 5, 4, 3, 2, 1]
PLACEMENT = plan_lazarus(LOADS, n_nodes=WORLD, slots=4, f=2).placement  # every expert on 2 ranks
SURVIVOR_PLACEMENT = plan_lazarus(LOADS, n_nodes=SURVIVORS, slots=4, f=1).placement
DEADLINE_S = 150


@functools.cache
def _tokens() -> tuple[int, torch.Tensor]:
    tokenizer, tokens = tokenize(load_corpus()[:100_000])
    return tokenizer.vocab_size, tokens


def _config(top_k: int) -> MoEConfig:
    return dataclasses.replace(CONFIGS["tiny"], vocab_size=_tokens()[0], top_k=top_k)


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = batches(_tokens()[1], GLOBAL_BATCH, SEQ_LEN, torch.Generator().manual_seed(SEED))
    return [next(data) for _ in range(STEPS + MORE_STEPS)]


def _rank_slice(batch, rank: int, world: int):
    share = GLOBAL_BATCH // world
    return tuple(t[rank * share:(rank + 1) * share] for t in batch)


def _reference(top_k: int) -> dict:
    """One process on the whole global batch: the losses, and the weights after each phase."""
    torch.manual_seed(SEED)
    model = GPTMoE(_config(top_k)).double()
    optimizer = configure_optimizer(model, LR)
    losses, weights = [], {}
    for step, (x, y) in enumerate(_global_batches()):
        _, loss, _ = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step + 1 in (STEPS, STEPS + MORE_STEPS):
            weights[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "weights": weights}


# --------------------------------------------------------------------------- the workers


def _train(model, optimizer, steps, world: int, rank: int, record: dict) -> None:
    for step in steps:
        out = train_step(model, optimizer, _rank_slice(_global_batches()[step], rank, world))
        record["losses"].append(out["loss"])
        record["counts"].append(out["counts"])
        record["processed"].append(out["processed"])
    record["weights"][steps[-1] + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    record["experts"][steps[-1] + 1] = model.local_experts


def _worker(rank: int, ports: tuple[int, int], out: str) -> None:
    torch.set_num_threads(1)
    records, trained = {}, {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        for top_k in TOP_KS:
            model = ExpertParallelMoE(_config(top_k), PLACEMENT, rank, seed=SEED).double()
            optimizer = configure_optimizer(model, LR)
            records[top_k] = {"losses": [], "counts": [], "processed": [], "weights": {}, "experts": {}}
            _train(model, optimizer, range(STEPS), WORLD, rank, records[top_k])
            trained[top_k] = model, optimizer
    finally:
        dist.destroy_process_group()
    if rank < SURVIVORS:
        # the survivors form a new world on a fresh store; rank r keeps its number
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank,
                                world_size=SURVIVORS, timeout=timedelta(seconds=60))
        try:
            for top_k, (model, optimizer) in trained.items():
                held = PLACEMENT.nodes[:SURVIVORS]
                received = transfer_expert_states(model, optimizer, held, SURVIVOR_PLACEMENT, rank)
                rebuild(model, optimizer, SURVIVOR_PLACEMENT, rank, received.__getitem__)
                records[top_k]["received"] = sorted(received)
                _train(model, optimizer, range(STEPS, STEPS + MORE_STEPS), SURVIVORS, rank, records[top_k])
        finally:
            dist.destroy_process_group()
    torch.save(records, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Spawn the four ranks once; their reports by rank, and the references by top_k."""
    out = tmp_path_factory.mktemp("expert_parallel")
    ports = (free_port("127.0.0.1"), free_port("127.0.0.1"))
    start = time.monotonic()
    workers = mp.start_processes(_worker, args=(ports, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    # join re-raises a worker's exception with its traceback (and ends the others)
    while not workers.join(timeout=1):
        if time.monotonic() - start > DEADLINE_S:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the gloo workers did not finish within {DEADLINE_S} s")
    reports = {rank: torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)}
    return {"ranks": reports, "reference": {top_k: _reference(top_k) for top_k in TOP_KS}}


def _assert_weights_match(weights: dict, reference: dict, experts: list[int]) -> None:
    # every local tensor has the reference's name; expert e's replica is the reference's expert e
    held = {int(name.split(".")[4]) for name in weights if ".experts." in name}
    assert held == set(experts)
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name], atol=1e-9, rtol=0, msg=name)


# --------------------------------------------------------------------------- specifications


def test_the_placements_replicate_every_expert_and_the_replan_moves_experts():
    assert all(len(h) == 2 for h in PLACEMENT.holders)
    assert plan_expert_transfers(PLACEMENT.nodes[:SURVIVORS], SURVIVOR_PLACEMENT), "the re-plan moves no expert"


@pytest.mark.parametrize("top_k", TOP_KS)
def test_losses_on_four_ranks_equal_single_process_losses_on_the_global_batch(runs, top_k):
    expected = runs["reference"][top_k]["losses"][:STEPS]
    for rank, report in runs["ranks"].items():
        assert report[top_k]["losses"][:STEPS] == pytest.approx(expected, abs=1e-9, rel=0), f"rank {rank}"


@pytest.mark.parametrize("top_k", TOP_KS)
def test_dense_weights_and_every_expert_replica_equal_the_reference_after_training(runs, top_k):
    reference = runs["reference"][top_k]["weights"][STEPS]
    for rank, report in runs["ranks"].items():
        _assert_weights_match(report[top_k]["weights"][STEPS], reference, PLACEMENT.nodes[rank])


@pytest.mark.parametrize("top_k", TOP_KS)
def test_every_token_copy_is_processed_exactly_once(runs, top_k):
    for step in range(STEPS + MORE_STEPS):
        ranks = range(WORLD) if step < STEPS else range(SURVIVORS)
        counts = runs["ranks"][0][top_k]["counts"][step]  # (n_moe_layers, E), over all ranks
        processed = sum(runs["ranks"][r][top_k]["processed"][step] for r in ranks)
        assert torch.equal(processed, counts), f"step {step}: rows computed per expert differ from routed"
        assert (counts.sum(-1) == GLOBAL_BATCH * SEQ_LEN * top_k).all(), f"step {step}"
        for rank in ranks:  # a rank computes only experts it holds
            held = PLACEMENT.nodes[rank] if step < STEPS else SURVIVOR_PLACEMENT.nodes[rank]
            others = [e for e in range(len(LOADS)) if e not in held]
            assert runs["ranks"][rank][top_k]["processed"][step][:, others].sum() == 0


@pytest.mark.parametrize("top_k", TOP_KS)
def test_rebuild_on_three_survivors_keeps_optimizer_state_and_still_matches_the_reference(runs, top_k):
    reference = runs["reference"][top_k]
    moved = {dst: sorted(e for e, _, d in plan_expert_transfers(PLACEMENT.nodes[:SURVIVORS], SURVIVOR_PLACEMENT)
                         if d == dst) for dst in range(SURVIVORS)}
    for rank in range(SURVIVORS):
        report = runs["ranks"][rank][top_k]
        assert report["received"] == moved[rank]
        assert report["losses"][STEPS:] == pytest.approx(reference["losses"][STEPS:], abs=1e-9, rel=0)
        _assert_weights_match(report["weights"][STEPS + MORE_STEPS], reference["weights"][STEPS + MORE_STEPS],
                              SURVIVOR_PLACEMENT.nodes[rank])
    assert "received" not in runs["ranks"][WORLD - 1][top_k]  # the dropped rank took no part


def test_an_expert_no_survivor_holds_is_reported_lost():
    placement = Placement(nodes=[[0, 1], [0, 1]], slots=2, n_experts=2)
    with pytest.raises(ExpertLostError, match="expert 1"):
        plan_expert_transfers([[0], [0]], placement)


def test_expert_and_dense_state_carry_weights_and_adam_moments_to_another_model():
    """A one-rank world: a model loaded with another's states steps exactly as that one does."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        placement = Placement(nodes=[list(range(len(LOADS)))], slots=len(LOADS), n_experts=len(LOADS))
        batch = _global_batches()[0]
        models = [ExpertParallelMoE(_config(2), placement, 0, seed=seed).double() for seed in (SEED, SEED + 1)]
        optimizers = [configure_optimizer(model, LR) for model in models]
        train_step(models[0], optimizers[0], batch)
        load_dense_state(models[1], optimizers[1], dense_state(models[0], optimizers[0]))
        for e in range(len(LOADS)):
            load_expert_state(models[1], optimizers[1], e, expert_state(models[0], optimizers[0], e))
        for model, optimizer in zip(models, optimizers):
            train_step(model, optimizer, batch)
        for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
            assert torch.equal(a, b), name
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert optimizers[0].state[p].keys() == optimizers[1].state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}
            for key in optimizers[0].state[p]:
                assert torch.equal(optimizers[0].state[p][key], optimizers[1].state[q][key])
    finally:
        dist.destroy_process_group()


# ---- a peer dying in the middle of a step ------------------------------------------------------

DYING_WORLD = 3


def _dying_worker(rank: int, port: int, out: str) -> None:
    """Every rank takes one full step, counting its all-reduces; in the second step the last
    rank exits at its last all-reduce and the others record what the failed step left behind."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DYING_WORLD,
                            timeout=timedelta(seconds=20))
    placement = plan_lazarus(LOADS, n_nodes=DYING_WORLD, slots=6, f=2).placement
    model = ExpertParallelMoE(_config(2), placement, rank, seed=SEED).double()
    optimizer = configure_optimizer(model, LR)
    batches = _global_batches()
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls.get("die_at"):
            os._exit(0)  # dies without entering the step's last collective
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    train_step(model, optimizer, _rank_slice(batches[0], rank, DYING_WORLD))
    per_step, calls["n"] = calls["n"], 0
    if rank == DYING_WORLD - 1:
        calls["die_at"] = per_step
    before = {"weights": {k: v.clone() for k, v in model.state_dict().items()},
              "moments": [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]}
    try:
        train_step(model, optimizer, _rank_slice(batches[1], rank, DYING_WORLD))
        raised = None
    except RuntimeError as exc:
        raised = str(exc)
    after = {"weights": model.state_dict(),
             "moments": [dict(optimizer.state[p]) for p in model.parameters()]}
    torch.save({"raised": raised, "before": before, "after": after}, Path(out) / f"rank{rank}.pt")
    os._exit(0)  # the group is broken; do not wait on it to shut down


def test_a_step_a_peer_dies_in_raises_and_leaves_weights_and_adam_moments_untouched(tmp_path):
    """The failed step must change nothing on the survivors, or an elastic run that redoes it
    on them applies the update twice (the loss then drifts from the uninterrupted run)."""
    port = free_port("127.0.0.1")
    workers = mp.start_processes(_dying_worker, args=(port, str(tmp_path)), nprocs=DYING_WORLD, join=False,
                                 start_method="spawn")
    for process in workers.processes:
        process.join(DEADLINE_S)
        assert not process.is_alive(), "a worker hung on the dead peer"
    for rank in range(DYING_WORLD - 1):
        report = torch.load(tmp_path / f"rank{rank}.pt")
        assert report["raised"], f"rank {rank}: the step with a dead peer did not fail"
        for name, value in report["before"]["weights"].items():
            assert torch.equal(report["after"]["weights"][name], value), f"rank {rank}: {name} changed"
        for before, after in zip(report["before"]["moments"], report["after"]["moments"]):
            assert before.keys() == after.keys()
            for key in before:
                assert torch.equal(torch.as_tensor(after[key]), torch.as_tensor(before[key])), f"rank {rank}: {key}"
