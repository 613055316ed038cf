"""An elastic run on this machine: node processes, the control plane and the coordinator in one place.

The flow runs nodes on tier-tagged Dask workers; this launcher runs them as plain
processes (``multiprocessing`` spawn) — what the tests and the benchmark use, and what a
user gets with ``tierflow lazarus train``. Failures are real: :meth:`LocalRun.kill` sends
SIGKILL to a node's process mid-step; :meth:`LocalRun.add_node` starts a new one, which the
coordinator absorbs at the members' next step boundary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from infra.store import open_store
from tasks.lazarus.control import ControlPlane
from tasks.lazarus.coordinator import POLICIES, Coordinator
from tasks.lazarus.node import RunSettings, run_node


def _node_main(node: str, port: int, settings: RunSettings, results) -> None:
    try:
        results.put((node, run_node(node, "127.0.0.1", port, settings)))
    except BaseException as exc:  # noqa: BLE001 - report why the node stopped, whatever it was
        results.put((node, {"node": node, "outcome": f"error: {type(exc).__name__}: {exc}"}))


@dataclass
class LocalRun:
    """Nodes as processes on this host under one coordinator.

    Parameters
    ----------
    settings: what every node trains.
    policy: ``lazarus``, ``reconfig_uniform`` or ``checkpoint_restart``.
    slots: expert slots per node (c); f: at least this many replicas of every expert.
    """

    settings: RunSettings
    policy: str = "lazarus"
    slots: int = 4
    f: int = 2
    rebalance_every: int = 20
    processes: dict[str, mp.Process] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)
    kills: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._mp = mp.get_context("spawn")
        self._results = self._mp.Queue()
        self.control = ControlPlane.host()
        config = self.settings.model_config()
        self.coordinator = Coordinator(
            self.control, POLICIES[self.policy], config.n_expert, self.slots, self.f,
            open_store(self.settings.store_url), self.settings.checkpoint_prefix,
            alive=self.alive, killed_at=self.kills.get, rebalance_every=self.rebalance_every,
            report_timeout_s=2 * self.settings.timeout_s + 30)
        self._thread: threading.Thread | None = None
        self._count = 0
        self.started_at: float | None = None

    # ---- nodes ------------------------------------------------------------------------------
    def spawn(self) -> str:
        """Start one node process (not yet admitted); returns its id."""
        node = f"node{self._count}"
        self._count += 1
        process = self._mp.Process(target=_node_main, args=(node, self.control.port, self.settings, self._results),
                                   name=f"lazarus-{node}", daemon=True)
        process.start()
        self.processes[node] = process
        return node

    def alive(self, node: str) -> bool:
        process = self.processes.get(node)
        return process is not None and process.is_alive()

    def kill(self, node: str) -> None:
        """SIGKILL ``node``'s process (a preemption: no goodbye)."""
        self.kills[node] = time.time()
        os.kill(self.processes[node].pid, signal.SIGKILL)

    def add_node(self) -> str:
        """Start a node and let it join at the next step boundary."""
        node = self.spawn()
        self.wait_registered([node])
        self.admit(node)
        return node

    def admit(self, node: str) -> None:
        """Let a started, registered node join at the members' next step boundary."""
        self.coordinator.admit(node)

    def wait_registered(self, nodes: list[str], timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not set(nodes) <= set(self.control.registered()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(set(nodes) - set(self.control.registered()))} did not register")
            dead = [n for n in nodes if not self.alive(n)]
            if dead:
                self._collect(0.5)
                raise RuntimeError(f"node {dead[0]} exited before registering: {self.reports.get(dead[0])}")
            time.sleep(0.05)

    # ---- the run ----------------------------------------------------------------------------
    def start(self, n_nodes: int) -> None:
        """Start ``n_nodes`` nodes and epoch 0 over them."""
        nodes = [self.spawn() for _ in range(n_nodes)]
        self.wait_registered(nodes)
        self.started_at = time.time()
        self.coordinator.start(nodes)
        self._thread = threading.Thread(target=self.coordinator.run, name="lazarus-coordinator", daemon=True)
        self._thread.start()

    def committed(self) -> int:
        """The most steps any live member has committed."""
        beats = self.control.heartbeats()
        return max((b["committed"] for n, b in beats.items() if b and self.alive(n)), default=0)

    def wait_for_step(self, step: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.committed() < step:
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {step} not reached in {timeout_s} s (at {self.committed()})")
            if self.coordinator.errors:
                raise RuntimeError(f"coordinator: {self.coordinator.errors[-1]}")
            time.sleep(0.02)

    def finish(self, timeout_s: float = 600) -> dict:
        """Wait for the members to finish, stop everything, return the run's record."""
        deadline = time.monotonic() + timeout_s
        while not self.coordinator.finished(self.settings.steps):
            if time.monotonic() > deadline:
                break
            if not any(self.alive(n) for n in self.processes):
                break
            time.sleep(0.05)
        wall = time.time() - (self.started_at or time.time())
        self.close()
        losses = self.control.losses() if self._control_open else {}
        return {"wall_s": wall, "losses": {k: v["loss"] for k, v in sorted(losses.items())},
                "loss_records": losses, "recoveries": self.coordinator.recoveries, "joins": self.coordinator.joins,
                "epochs": self.coordinator.epochs, "errors": self.coordinator.errors, "nodes": self.reports,
                "kills": dict(self.kills)}

    _control_open = True

    def close(self) -> None:
        """Stop the coordinator and every node (SIGTERM, then SIGKILL)."""
        self.coordinator.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._collect(10)
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(5)
                if process.is_alive():
                    process.kill()

    def _collect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(not p.is_alive() for p in self.processes.values()) and self._results.empty():
                break
            try:
                node, report = self._results.get(timeout=0.1)
                self.reports[node] = report
            except Exception:  # queue.Empty
                continue
