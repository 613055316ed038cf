"""The control plane of an elastic training run: who is training, with which plan, from which step.

One ``torch.distributed.TCPStore`` (hosted by the coordinator, 127.0.0.1 or any address the
nodes reach) holds small JSON records under these keys:

    node/<id>            a node registered: its pid and host (the coordinator admits it later)
    epoch                the latest epoch number
    epoch/<g>            epoch g's plan (:class:`Epoch`): members in rank order, placement,
                         where training resumes and how state is recovered
    pending              the next epoch number, set while the members of the current one must
                         switch at a step boundary (a node joined, or loads shifted)
    hb/<id>              a node's heartbeat: epoch, committed steps, router loads, time
    fail/<g>/<id>        a node of epoch g saw a peer fail: its committed steps, the experts it
                         holds in memory and the error
    arrive/<g>           how many members of epoch g have arrived to form its process group
    abort/<g>            epoch g will never form (a member died before it did): its members
                         report and wait for the next
    ready/<g>/<id>       a node is training in epoch g: how long set-up, fetch and restore took
    loss/<step>          the global loss of a committed step (written by rank 0)
    ckpt/<step>          a checkpoint was written at that step, and how long it took (rank 0)
    kill/<id>            when a node was killed from outside the run (``tierflow lazarus kill``)
    stop                 the coordinator ends the run

Each epoch's process group lives under its own prefix (``pg/<g>/``) of the same store, so a
new group needs no new port. A *committed* step is one whose optimizer update every rank of
the epoch applied; the coordinator resumes from the smallest committed count the survivors
report, and a node that got one step further rolls that step back (:mod:`tasks.lazarus.node`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch.distributed as dist

POLL_S = 0.02


@dataclass
class Epoch:
    """One membership generation of the run and the plan its members train with.

    Parameters
    ----------
    number: g, counting from 0.
    members: node ids in rank order.
    placement: rank → expert ids it holds (``optimizers.lazarus.Placement.nodes``).
    resume_step: committed steps every member starts this epoch from.
    reason: why this epoch began (``start``, ``failure``, ``join``, ``rebalance``).
    held: rank → experts that member already holds in memory from the previous epoch
        (empty for a node that joins or restores); experts it lacks are fetched from a member
        that holds them.
    restore_step: when set, every member loads the checkpoint of this step instead of
        keeping its state (no survivor holds some expert, or the policy restarts on failure).
    dense_source: rank that sends the dense (data-parallel) weights to members that have none.
    replicas, loads: the replica counts and the router loads the plan was computed from.
    checkpoint_every_s: seconds between checkpoints in this epoch, counted from the last one
        written (inf: none; None: every ``RunSettings.checkpoint_every`` steps instead), and
    restore_probability: the share of failures the plan needs a restore for, it was chosen from
        (:class:`~tasks.lazarus.coordinator.CheckpointRule`).
    """

    number: int
    members: list[str]
    placement: list[list[int]]
    resume_step: int
    reason: str
    held: list[list[int]] = field(default_factory=list)
    restore_step: int | None = None
    dense_source: int | None = 0
    replicas: list[int] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)
    checkpoint_every_s: float | None = None
    restore_probability: float | None = None

    def rank_of(self, node: str) -> int:
        return self.members.index(node)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Epoch":
        return cls(**json.loads(text))


class ControlPlane:
    """Typed access to the run's store, for the coordinator and the nodes alike."""

    def __init__(self, store: dist.Store):
        self.store = store

    # ---- connecting ------------------------------------------------------------------------
    @classmethod
    def host(cls, host: str = "127.0.0.1", port: int = 0) -> "ControlPlane":
        """Start the store (the coordinator's side); ``port`` 0 picks a free one."""
        store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        return cls(store)

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float = 30.0) -> "ControlPlane":
        """Join a running store (a node's side)."""
        return cls(dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s)))

    @property
    def port(self) -> int:
        return self.store.port

    # ---- records ----------------------------------------------------------------------------
    def _put(self, key: str, value: object) -> None:
        self.store.set(key, json.dumps(value))

    def _get(self, key: str) -> object | None:
        if not self.store.check([key]):
            return None
        return json.loads(self.store.get(key))

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.store.list_keys() if k.startswith(prefix)]

    def register(self, node: str, pid: int, host: str) -> None:
        self._put(f"node/{node}", {"pid": pid, "host": host, "time": time.time()})

    def forget(self, node: str) -> None:
        """Drop a node's registration and heartbeat (its process is being replaced by a fresh one)."""
        for key in (f"node/{node}", f"hb/{node}"):
            if self.store.check([key]):
                self.store.delete_key(key)

    def registered(self) -> dict[str, dict]:
        return {k.split("/", 1)[1]: self._get(k) for k in self.keys("node/")}

    def publish(self, epoch: Epoch, *, at_boundary: bool = False) -> None:
        """Make ``epoch`` the run's plan. ``at_boundary``: the current members switch to it at
        their next step boundary (they agree on which step); otherwise they are already waiting."""
        self.store.set(f"epoch/{epoch.number}", epoch.to_json())
        self.store.set("epoch", str(epoch.number))
        if at_boundary:
            self.store.set("pending", str(epoch.number))

    def latest_epoch(self) -> int:
        return int(self.store.get("epoch")) if self.store.check(["epoch"]) else -1

    def epoch(self, number: int) -> Epoch:
        return Epoch.from_json(self.store.get(f"epoch/{number}"))

    def pending(self) -> int | None:
        """The epoch the current members must switch to at the next boundary, if any."""
        return int(self.store.get("pending")) if self.store.check(["pending"]) else None

    def wait_for_epoch(self, node: str, after: int, timeout_s: float) -> Epoch | None:
        """Block until an epoch newer than ``after`` includes ``node``; None when the run stops
        (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stopped():
                return None
            latest = self.latest_epoch()
            for number in range(latest, after, -1):
                epoch = self.epoch(number)
                if node in epoch.members:
                    return epoch
                break  # the newest epoch leaves this node out: keep waiting for one that admits it
            time.sleep(POLL_S)
        return None

    def heartbeat(self, node: str, epoch: int, committed: int, loads: list[float]) -> None:
        self._put(f"hb/{node}", {"epoch": epoch, "committed": committed, "loads": loads, "time": time.time()})

    def heartbeats(self) -> dict[str, dict]:
        return {k.split("/", 1)[1]: self._get(k) for k in self.keys("hb/")}

    def report_failure(self, epoch: int, node: str, committed: int, held: list[int], error: str) -> None:
        """A node of ``epoch`` saw a collective fail: its committed steps and the experts it holds
        in memory (none when it has no model yet)."""
        self._put(f"fail/{epoch}/{node}", {"committed": committed, "held": held, "error": error[:500],
                                           "time": time.time()})

    def failures(self, epoch: int) -> dict[str, dict]:
        return {k.rsplit("/", 1)[1]: self._get(k) for k in self.keys(f"fail/{epoch}/")}

    def arrive(self, epoch: int) -> None:
        self.store.add(f"arrive/{epoch}", 1)

    def arrived(self, epoch: int) -> int:
        return int(self.store.add(f"arrive/{epoch}", 0))

    def abort(self, epoch: int) -> None:
        self.store.set(f"abort/{epoch}", "1")

    def aborted(self, epoch: int) -> bool:
        return self.store.check([f"abort/{epoch}"])

    def report_ready(self, epoch: int, node: str, timings: dict) -> None:
        self._put(f"ready/{epoch}/{node}", {**timings, "time": time.time()})

    def ready(self, epoch: int) -> dict[str, dict]:
        return {k.rsplit("/", 1)[1]: self._get(k) for k in self.keys(f"ready/{epoch}/")}

    def record_loss(self, step: int, record: dict) -> None:
        self._put(f"loss/{step:07d}", record)

    def losses(self) -> dict[int, dict]:
        return {int(k.split("/", 1)[1]): self._get(k) for k in self.keys("loss/")}

    def loss(self, step: int) -> dict | None:
        return self._get(f"loss/{step:07d}")

    def record_checkpoint(self, step: int, seconds: float) -> None:
        """Rank 0 wrote the checkpoint of ``step`` in ``seconds`` (parts, barrier and manifest)."""
        self._put(f"ckpt/{step:07d}", {"seconds": seconds, "time": time.time()})

    def checkpoints(self) -> dict[int, dict]:
        return {int(k.split("/", 1)[1]): self._get(k) for k in self.keys("ckpt/")}

    def record_kill(self, node: str) -> None:
        """Note when ``node`` was killed (by ``tierflow lazarus kill``), for the detection time."""
        self._put(f"kill/{node}", time.time())

    def killed_at(self, node: str) -> float | None:
        return self._get(f"kill/{node}")

    def stop(self) -> None:
        self.store.set("stop", "1")

    def stopped(self) -> bool:
        return self.store.check(["stop"])

    def process_group_store(self, epoch: int) -> dist.Store:
        """The store an epoch's process group rendezvous through."""
        return dist.PrefixStore(f"pg/{epoch}/", self.store)
