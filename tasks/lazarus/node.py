"""A training node of an elastic expert-parallel run: train while the plan holds, recover when it breaks.

``run_node`` is what each node process runs (a Dask worker, or a plain process in tests).
It registers with the control plane (:mod:`tasks.lazarus.control`), waits to be admitted
into an epoch, and then, epoch after epoch:

1. joins the epoch's process group (gloo; rendezvous under the epoch's prefix of the store);
2. builds the model for the epoch's placement (collective: replica groups) and moves state
   into it — dense weights from its previous model (or, joining, from ``dense_source``),
   experts it held from its previous model, experts it lacks from a member that holds them
   (point-to-point), or everything from a checkpoint when the epoch says so; the members
   agree on the resume step (the smallest committed count; a node one step ahead rolls that
   step back from its pre-step snapshot, so a step some rank failed is discarded everywhere);
3. trains step after step on the global batch of that step (the same rows whatever the
   world size: each rank takes its share), until the run ends, the coordinator asks for a
   switch at a step boundary (rank 0 reads the control plane and broadcasts the decision,
   so every member switches after the same step), or a collective fails because a peer died
   — then it reports its committed steps and waits for the next epoch.

Checkpoints go to the artifact store: each expert written by its lowest-rank holder, the dense
part by rank 0, the manifest last — once the epoch's ``checkpoint_every_s`` seconds (chosen by the
coordinator from its plan) have passed since the last one, as rank 0 decides and broadcasts with the
step's switch flag, or else every ``checkpoint_every`` committed steps. The members agree on when the
last one was as they enter an epoch, so a plan that needs checkpoints more often than the last one
did (fewer nodes, a restore likelier) writes one at its first step.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from infra.store import open_store
from optimizers.lazarus import Placement
from tasks.lazarus.checkpoint import expert_part, load_part, save_part, write_manifest
from tasks.lazarus.control import ControlPlane, Epoch
from tasks.moe.corpus import load_corpus, tokenize
from tasks.moe.expert_parallel import (
    ExpertParallelMoE, dense_state, expert_state, load_dense_state, load_expert_state, transfer_expert_states,
    train_step,
)
from tasks.moe.model import MoEConfig
from tasks.moe.train import configure_optimizer, learning_rate


@dataclass(frozen=True)
class RunSettings:
    """What every node of a run trains, identically.

    Parameters
    ----------
    config: the model (``MoEConfig`` fields).
    steps: optimizer steps of the whole run.
    global_batch: sequences per step, split over the members (rank r takes rows
        ``r·B/R .. (r+1)·B/R``), so the data of a step does not depend on how many train it.
    lr, warmup, weight_decay, grad_clip: the optimizer, as the single-process reference uses it.
    checkpoint_every: committed steps between checkpoints (0: only the step-0 one).
    store_url, checkpoint_prefix: where checkpoints go (``infra.store.open_store``).
    corpus: text file to train on (default: the shipped corpus).
    timeout_s: a collective that waits longer than this fails. A dead peer's sockets close and
        most survivors fail at once, but gloo leaves one that is sending to a peer which has
        itself failed waiting this long (reproduced with bare all_to_all_single on 4 ranks: one
        survivor waits out the timeout on every kill, 8 of 8, whether the others destroy or abort
        their groups) — it is the failure-detection time, as NCCL's is on GPUs (§6.3: 10–20 s).
    gather_timeout_s: how long the members of a new epoch wait for each other to arrive (a member
        that died first makes the coordinator abort the epoch sooner).
    step_delay_s: extra seconds per step (a slower simulated device); 0 here.
    checkpoint_io_s: extra seconds every checkpoint write and every restore takes (simulated: a
        larger model's state over a shared file system, :mod:`tasks.lazarus.scales`); 0: only the real I/O.
    """

    config: dict
    steps: int
    global_batch: int = 24
    lr: float = 3e-3
    warmup: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    store_url: str | None = None
    checkpoint_prefix: str = "lazarus/checkpoints"
    corpus: str | None = None
    timeout_s: float = 10.0
    gather_timeout_s: float = 60.0
    step_delay_s: float = 0.0
    checkpoint_io_s: float = 0.0
    wait_s: float = 600.0

    def model_config(self) -> MoEConfig:
        return MoEConfig(**self.config)


class EpochAborted(RuntimeError):
    """An epoch was given up before its process group formed."""


@dataclass
class NodeReport:
    """What one node did over the run."""

    node: str
    epochs: list[int] = field(default_factory=list)
    steps_run: int = 0  # steps this node computed (including ones thrown away)
    committed: int = 0
    failures_seen: int = 0
    rollbacks: int = 0
    checkpoints: int = 0  # checkpoints this node took part in writing
    outcome: str = "stopped"


def global_batch(tokens: torch.Tensor, step: int, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of step ``step``: the same for every world size (seeded by step)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(len(tokens) - seq_len - 1, (batch,), generator=generator)
    x = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1 : s + 1 + seq_len] for s in starts.tolist()])
    return x, y


def rank_rows(batch: int, world: int, rank: int) -> slice:
    """This rank's rows of a global batch (shares differ by at most one row)."""
    return slice(rank * batch // world, (rank + 1) * batch // world)


def training_tokens(settings: RunSettings) -> torch.Tensor:
    """The token stream a run trains on (the first 90% of the corpus; the rest is held out)."""
    text = load_corpus(settings.corpus) if settings.corpus else load_corpus()
    _, tokens = tokenize(text)
    return tokens[: int(len(tokens) * 0.9)]


class _Node:
    def __init__(self, node: str, control: ControlPlane, settings: RunSettings):
        self.node, self.control, self.settings = node, control, settings
        self.config = settings.model_config()
        self.store = open_store(settings.store_url)
        self.tokens = training_tokens(settings)
        self.model: ExpertParallelMoE | None = None
        self.optimizer = None
        self.committed = 0
        self.last_checkpoint = -1  # the step of the newest checkpoint this node knows was written (-1: none)
        self.last_checkpoint_time = -math.inf  # and when (wall clock: the members compare it)
        self.snapshot: tuple[int, dict, dict] | None = None  # (committed before the step, dense, experts)
        self.report = NodeReport(node)

    def held(self) -> list[int]:
        """The experts this node holds in memory (a node still without a model holds none)."""
        return list(self.model.local_experts) if self.model is not None else []

    # ---- entering an epoch ------------------------------------------------------------------
    def enter(self, epoch: Epoch) -> dict:
        """Join ``epoch``'s group, build its model and move the state in; returns timings."""
        start = time.perf_counter()
        _leave_group()
        rank = epoch.rank_of(self.node)
        self._gather(epoch)
        dist.init_process_group("gloo", store=self.control.process_group_store(epoch.number), rank=rank,
                                world_size=len(epoch.members), timeout=timedelta(seconds=self.settings.timeout_s))
        placement = Placement(epoch.placement, max(map(len, epoch.placement)), self.config.n_expert)
        old_model, old_optimizer = self.model, self.optimizer
        model = ExpertParallelMoE(self.config, placement, rank, seed=self.settings.seed)
        optimizer = configure_optimizer(model, self.settings.lr, self.settings.weight_decay)
        timings = {"group_s": time.perf_counter() - start, "fetch_s": 0.0, "restore_s": 0.0}
        if epoch.restore_step is not None:
            t = time.perf_counter()
            if epoch.restore_step > 0 or self._checkpoint_exists(0):
                self._load_checkpoint(model, optimizer, epoch.restore_step)
            self.committed = self.last_checkpoint = epoch.restore_step
            self.last_checkpoint_time = time.time()  # a failure now would lose nothing more than it
            timings["restore_s"] = time.perf_counter() - t
        else:
            resume = self._agree_on_resume(old_model is not None)
            self._agree_on_last_checkpoint()
            if old_model is not None and self.committed > resume:
                self._roll_back(old_model, old_optimizer, resume)
            self.committed = resume
            t = time.perf_counter()
            self._move_state(epoch, placement, rank, old_model, old_optimizer, model, optimizer)
            timings["fetch_s"] = time.perf_counter() - t
        self.model, self.optimizer, self.snapshot = model, optimizer, None
        self.report.epochs.append(epoch.number)
        timings["total_s"] = time.perf_counter() - start
        return timings

    def _gather(self, epoch: Epoch) -> None:
        """Wait, at the store, for every member to arrive before forming the group: a member that
        died first makes the coordinator abort the epoch, and nobody is left waiting in a
        rendezvous until its timeout."""
        self.control.arrive(epoch.number)
        deadline = time.monotonic() + self.settings.gather_timeout_s
        while self.control.arrived(epoch.number) < len(epoch.members):
            if self.control.aborted(epoch.number) or self.control.latest_epoch() > epoch.number:
                raise EpochAborted(f"epoch {epoch.number} aborted: a member died before it formed")
            if time.monotonic() > deadline:
                raise EpochAborted(f"epoch {epoch.number}: members did not all arrive in {self.settings.gather_timeout_s} s")
            time.sleep(0.01)

    def _agree_on_resume(self, has_state: bool) -> int:
        nothing = 2**62
        mine = torch.tensor([self.committed if has_state else nothing], dtype=torch.int64)
        dist.all_reduce(mine, op=dist.ReduceOp.MIN)
        if mine.item() == nothing:  # the plan says to keep state that no member has: never train from scratch
            raise RuntimeError(f"no member of the epoch holds any state to continue from (node {self.node})")
        return int(mine.item())

    def _agree_on_last_checkpoint(self) -> None:
        """Take the newest checkpoint any member knows of, and when it was written (a node that joins
        knows of none; step and time grow together, so the maxima belong to the same one)."""
        mine = torch.tensor([self.last_checkpoint, self.last_checkpoint_time], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        self.last_checkpoint, self.last_checkpoint_time = int(mine[0].item()), float(mine[1].item())

    def _roll_back(self, model, optimizer, resume: int) -> None:
        if self.snapshot is None or self.snapshot[0] != resume:
            raise RuntimeError(f"node {self.node} committed {self.committed} steps, the members resume at {resume} "
                               "and no snapshot of that step is kept")
        _, dense, experts = self.snapshot
        load_dense_state(model, optimizer, dense)
        for e, state in experts.items():
            load_expert_state(model, optimizer, e, state)
        self.report.rollbacks += 1

    def _move_state(self, epoch: Epoch, placement: Placement, rank: int, old_model, old_optimizer, model,
                    optimizer) -> None:
        box = [dense_state(old_model, old_optimizer) if old_model is not None and rank == epoch.dense_source else None]
        if epoch.dense_source is not None and any(not held for held in epoch.held):
            dist.broadcast_object_list(box, src=epoch.dense_source)
        dense = box[0] if old_model is None else dense_state(old_model, old_optimizer)
        if dense is not None:
            load_dense_state(model, optimizer, dense)
        received = transfer_expert_states(old_model, old_optimizer, epoch.held, placement, rank)
        for e in placement.nodes[rank]:
            if e in received:
                load_expert_state(model, optimizer, e, received[e])
            elif old_model is not None and e in epoch.held[rank]:
                load_expert_state(model, optimizer, e, expert_state(old_model, old_optimizer, e))

    # ---- checkpoints ------------------------------------------------------------------------
    def _checkpoint_exists(self, step: int) -> bool:
        return self.store.exists(f"{self.settings.checkpoint_prefix}/step-{step:07d}/manifest.json")

    def _load_checkpoint(self, model, optimizer, step: int) -> None:
        prefix = self.settings.checkpoint_prefix
        load_dense_state(model, optimizer, load_part(self.store, prefix, step, "dense", self.config))
        for e in model.local_experts:
            load_expert_state(model, optimizer, e, load_part(self.store, prefix, step, expert_part(e), self.config))
        if self.settings.checkpoint_io_s:
            time.sleep(self.settings.checkpoint_io_s)  # simulated: reading a larger model's state back

    def checkpoint(self) -> None:
        """Write this rank's parts of the checkpoint of the committed step; rank 0 seals it."""
        start = time.perf_counter()
        model, prefix, step = self.model, self.settings.checkpoint_prefix, self.committed
        if model.rank == 0:
            save_part(self.store, prefix, step, "dense", dense_state(model, self.optimizer))
        holders = model.placement.holders
        for e in model.local_experts:
            if min(holders[e]) == model.rank:
                save_part(self.store, prefix, step, expert_part(e), expert_state(model, self.optimizer, e))
        if self.settings.checkpoint_io_s:
            time.sleep(self.settings.checkpoint_io_s)  # simulated: writing a larger model's state
        dist.barrier()
        self.last_checkpoint, self.last_checkpoint_time = step, time.time()
        self.report.checkpoints += 1
        if model.rank == 0:
            write_manifest(self.store, prefix, step, self.config)
            self.control.record_checkpoint(step, time.perf_counter() - start)

    # ---- training ---------------------------------------------------------------------------
    def train(self, epoch: Epoch) -> str:
        """Train in ``epoch`` until the run ends ("done"), a switch ("switch") or a failure ("failed")."""
        s = self.settings
        model, optimizer = self.model, self.optimizer
        world, rank = len(epoch.members), model.rank
        rows = rank_rows(s.global_batch, world, rank)
        share = (rows.stop - rows.start) / s.global_batch
        loads = torch.zeros(self.config.n_expert, dtype=torch.float64)
        every_s = epoch.checkpoint_every_s
        try:
            if self.committed == 0 and not self._checkpoint_exists(0):
                self.checkpoint()  # the run's starting point: a restart before any checkpoint returns here
            while self.committed < s.steps:
                flags = torch.tensor([0, 0])  # switch epochs now; checkpoint after this step
                if rank == 0:
                    pending = self.control.pending()
                    flags[0] = int(pending is not None and pending > epoch.number) or int(self.control.stopped())
                    flags[1] = int(every_s is not None and time.time() - self.last_checkpoint_time >= every_s)
                dist.broadcast(flags, src=0)
                if flags[0].item():
                    return "switch"
                x, y = global_batch(self.tokens, self.committed, s.global_batch, self.config.block_size, s.seed)
                self.snapshot = (self.committed, dense_state(model, optimizer),
                                 {e: expert_state(model, optimizer, e) for e in model.local_experts})
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(self.committed, s.steps, s.lr, "cosine", s.warmup)
                start = time.perf_counter()
                out = train_step(model, optimizer, (x[rows], y[rows]), s.grad_clip, share=share)
                if s.step_delay_s:
                    time.sleep(s.step_delay_s)
                self.committed += 1
                self.report.steps_run += 1
                loads += out["counts"].sum(0).double()
                self.control.heartbeat(self.node, epoch.number, self.committed, loads.tolist())
                if rank == 0:
                    self.control.record_loss(self.committed - 1, {
                        "loss": out["loss"], "epoch": epoch.number, "world": world, "time": time.time(),
                        "step_s": time.perf_counter() - start, "tokens": s.global_batch * self.config.block_size})
                if every_s is None:
                    due = s.checkpoint_every and self.committed - self.last_checkpoint >= s.checkpoint_every
                else:
                    due = bool(flags[1].item())
                if due:
                    self.checkpoint()
            return "done"
        except RuntimeError as exc:  # a collective failed: a peer died or timed out
            self.report.failures_seen += 1
            self.control.report_failure(epoch.number, self.node, self.committed, self.held(), str(exc))
            _leave_group()  # closes this node's connections: a peer still blocked on it fails now, not at its timeout
            return "failed"


def _leave_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a group broken by a dead peer may not shut down cleanly
            pass


def run_node(node: str, host: str, port: int, settings: RunSettings) -> dict:
    """Train as ``node`` until the run ends; returns this node's :class:`NodeReport` as a dict."""
    torch.set_num_threads(1)
    control = ControlPlane.connect(host, port)
    # epochs published before this process registered were not meant for it (a relaunched
    # node must not enter the epoch its previous process failed in)
    seen = control.latest_epoch()
    control.register(node, os.getpid(), socket.gethostname())
    worker = _Node(node, control, settings)
    try:
        while True:
            epoch = control.wait_for_epoch(node, seen, settings.wait_s)
            if epoch is None:
                break
            seen = epoch.number
            try:
                timings = worker.enter(epoch)
            except RuntimeError as exc:  # a peer died while the epoch was being set up
                worker.report.failures_seen += 1
                control.report_failure(epoch.number, node, worker.committed, worker.held(), f"during set-up: {exc}")
                _leave_group()  # peers blocked on this node fail now, not at their timeout
                continue
            control.report_ready(epoch.number, node, timings)
            outcome = worker.train(epoch)
            if outcome == "done":
                worker.report.outcome = "done"
                break
    finally:
        _leave_group()
    worker.report.committed = worker.committed
    return asdict(worker.report)


def uninterrupted_losses(settings: RunSettings, steps: int | None = None) -> list[float]:
    """The loss of every step of the same run in one process, with no failure: what an
    elastic run's loss curve must follow (the same weights, batches and updates). ``steps``:
    only the first so many (the learning-rate schedule is still the whole run's)."""
    return uninterrupted_run(settings, steps)[0]


def uninterrupted_run(settings: RunSettings, steps: int | None = None) -> tuple[list[float], list[float]]:
    """:func:`uninterrupted_losses` and the tokens the router sent to each expert over the run
    (summed over MoE layers): the loads a plan is made from."""
    from tasks.moe.model import GPTMoE

    torch.set_num_threads(1)
    config = settings.model_config()
    tokens = training_tokens(settings)
    torch.manual_seed(settings.seed)
    model = GPTMoE(config)
    optimizer = configure_optimizer(model, settings.lr, settings.weight_decay)
    losses = []
    for step in range(settings.steps if steps is None else min(steps, settings.steps)):
        x, y = global_batch(tokens, step, settings.global_batch, config.block_size, settings.seed)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.steps, settings.lr, "cosine", settings.warmup)
        optimizer.zero_grad(set_to_none=True)
        _, loss, _ = model(x, y)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return losses, model.expert_loads().sum(0).double().tolist()
