"""An elastic run: node processes, the control plane and the coordinator in one place.

:class:`ElasticRun` owns the control plane (:mod:`tasks.lazarus.control`) and the
:class:`~tasks.lazarus.coordinator.Coordinator`; a *launcher* starts, watches and kills node
processes. :class:`ProcessLauncher` runs them as plain processes on this host
(``multiprocessing`` spawn) — what the tests and the benchmark use; the flow uses the Dask
launcher in :mod:`tasks.lazarus.tasks`, one node per tier-tagged worker. Failures are real:
:meth:`ElasticRun.kill` sends SIGKILL to a node's process mid-step; :meth:`ElasticRun.add_node`
starts a new one, which the coordinator absorbs at the members' next step boundary.
"""

from __future__ import annotations

import contextvars
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from infra.store import open_store
from tasks.lazarus.control import ControlPlane
from tasks.lazarus.coordinator import POLICIES, CheckpointRule, Coordinator
from tasks.lazarus.node import RunSettings, run_node


class Launcher(Protocol):
    """Starts node processes and knows whether they live."""

    def start(self, node: str, port: int, settings: RunSettings) -> None: ...
    def alive(self, node: str) -> bool: ...
    def kill(self, node: str, pid: int) -> None: ...
    def reports(self, timeout_s: float) -> dict[str, dict]: ...
    def close(self) -> None: ...


def _node_main(node: str, port: int, settings: RunSettings, results) -> None:
    try:
        results.put((node, run_node(node, "127.0.0.1", port, settings)))
    except BaseException as exc:  # noqa: BLE001 - report why the node stopped, whatever it was
        results.put((node, {"node": node, "outcome": f"error: {type(exc).__name__}: {exc}"}))


class ProcessLauncher:
    """Nodes as ``multiprocessing`` (spawn) processes on this host."""

    def __init__(self) -> None:
        self._mp = mp.get_context("spawn")
        self._results = self._mp.Queue()
        self.processes: dict[str, mp.Process] = {}
        self._reports: dict[str, dict] = {}

    def start(self, node: str, port: int, settings: RunSettings) -> None:
        if node in self.processes:  # a relaunch: reap the killed process first
            self.processes[node].join(5)
        process = self._mp.Process(target=_node_main, args=(node, port, settings, self._results),
                                   name=f"lazarus-{node}", daemon=True)
        process.start()
        self.processes[node] = process

    def alive(self, node: str) -> bool:
        process = self.processes.get(node)
        return process is not None and process.is_alive()

    def kill(self, node: str, pid: int) -> None:
        os.kill(self.processes[node].pid, signal.SIGKILL)

    def reports(self, timeout_s: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(not p.is_alive() for p in self.processes.values()) and self._results.empty():
                break
            try:
                node, report = self._results.get(timeout=0.1)
                self._reports[node] = report
            except Exception:  # queue.Empty
                continue
        return dict(self._reports)

    def close(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(5)
                if process.is_alive():
                    process.kill()


@dataclass
class ElasticRun:
    """Nodes under one coordinator.

    Parameters
    ----------
    settings: what every node trains.
    policy: ``lazarus``, ``reconfig_uniform`` or ``checkpoint_restart``.
    slots: expert slots per node (c); f: at least this many replicas of every expert.
    launcher: how node processes start (default: :class:`ProcessLauncher`).
    host: the address nodes reach the control plane at.
    checkpoint_rule: how often to checkpoint, chosen per epoch from its plan (None: every
        ``settings.checkpoint_every`` steps).
    """

    settings: RunSettings
    policy: str = "lazarus"
    slots: int = 4
    f: int = 2
    rebalance_every: int = 20
    launcher: Launcher | None = None
    host: str = "127.0.0.1"
    checkpoint_rule: CheckpointRule | None = None
    kills: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        self.launcher = self.launcher or ProcessLauncher()
        self.control = ControlPlane.host(self.host)
        config = self.settings.model_config()
        self.coordinator = Coordinator(
            self.control, POLICIES[self.policy], config.n_expert, self.slots, self.f,
            open_store(self.settings.store_url), self.settings.checkpoint_prefix,
            alive=self.alive, killed_at=self.killed_at, relaunch=self.relaunch, rebalance_every=self.rebalance_every,
            report_timeout_s=2 * self.settings.timeout_s + 30, checkpoint_rule=self.checkpoint_rule)
        self._thread: threading.Thread | None = None
        self._relaunching = False
        # node processes start from three threads (the caller, the fault injector's arrivals, the
        # coordinator's relaunches): none may start once the run closes and reads the launcher's nodes
        self._starting = threading.Lock()
        self._closed = False
        self.started_at: float | None = None

    # ---- nodes ------------------------------------------------------------------------------
    def spawn(self) -> str:
        """Start one node process (not yet admitted); returns its id."""
        with self._starting:
            node = f"node{len(self.nodes)}"
            self._start_process(node)
            self.nodes.append(node)
        return node

    def _start_process(self, node: str) -> None:
        """Start ``node``'s process (hold ``_starting``); refused once the run is closing."""
        if self._closed:
            raise RuntimeError(f"the run is over: {node} is not started")
        self.launcher.start(node, self.control.port, self.settings)

    def describe(self) -> dict:
        """Where this run's control plane is, for ``tierflow lazarus kill`` and status."""
        return {"host": self.host, "port": self.control.port, "policy": self.policy, "nodes": list(self.nodes)}

    def alive(self, node: str) -> bool:
        return self.launcher.alive(node)

    def killed_at(self, node: str) -> float | None:
        """When ``node`` was killed: by this run, or from outside (``tierflow lazarus kill``)."""
        return self.kills.get(node) or self.control.killed_at(node)

    def kill(self, node: str) -> None:
        """SIGKILL ``node``'s process (a preemption: no goodbye)."""
        self.kills[node] = time.time()
        self.launcher.kill(node, self.control.registered().get(node, {}).get("pid", -1))

    def relaunch(self, nodes: list[str]) -> list[str]:
        """Kill ``nodes``' processes and start fresh ones under the same ids, as a job launcher
        restarts a failed job (checkpoint_restart). Returns the nodes whose new process came up
        and registered; one preempted meanwhile is left out (the job restarts without it)."""
        self._relaunching = True  # between the kills and the starts no node lives: the run is not over
        try:
            return self._replace_processes(nodes)
        finally:
            self._relaunching = False

    def _replace_processes(self, nodes: list[str], timeout_s: float = 180) -> list[str]:
        registered = self.control.registered()
        for node in nodes:
            if self.alive(node):
                self.launcher.kill(node, registered.get(node, {}).get("pid", -1))
        deadline = time.monotonic() + 30
        while any(self.alive(n) for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._starting:
            for node in nodes:
                self.control.forget(node)
                self._start_process(node)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            registered = self.control.registered()
            if all(n in registered or not self.alive(n) for n in nodes):
                break
            time.sleep(0.05)
        return [n for n in nodes if n in registered and self.alive(n)]

    def add_node(self) -> str:
        """Start a node and let it join at the next step boundary."""
        node = self.spawn()
        self.wait_registered([node])
        self.admit(node)
        return node

    def admit(self, node: str) -> None:
        """Let a started, registered node join at the members' next step boundary."""
        self.coordinator.admit(node)

    def members(self) -> list[str]:
        epoch = self.coordinator.current
        return list(epoch.members) if epoch else []

    def wait_registered(self, nodes: list[str], timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not set(nodes) <= set(self.control.registered()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(set(nodes) - set(self.control.registered()))} did not register")
            dead = [n for n in nodes if not self.alive(n)]
            if dead:
                raise RuntimeError(f"node {dead[0]} exited before registering: {self.launcher.reports(0.5).get(dead[0])}")
            time.sleep(0.05)

    # ---- the run ----------------------------------------------------------------------------
    def start(self, n_nodes: int) -> None:
        """Start ``n_nodes`` nodes and epoch 0 over them."""
        nodes = [self.spawn() for _ in range(n_nodes)]
        self.wait_registered(nodes)
        self.started_at = time.time()
        self.coordinator.start(nodes)
        # the coordinator may start nodes (a relaunch): it runs in this thread's context, so under a
        # flow run the Dask launcher can submit them as Prefect tasks
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self.coordinator.run,), name="lazarus-coordinator",
                                        daemon=True)
        self._thread.start()

    def committed(self) -> int:
        """The most steps any live member has committed."""
        beats = self.control.heartbeats()
        return max((b["committed"] for n, b in beats.items() if b and self.alive(n)), default=0)

    def progress(self) -> int:
        """Useful steps so far: what the current members have committed in the current epoch (a step
        some member later rolls back, or that a restore throws away, does not count). While a recovery
        is being set up, the step it resumes from; while the members switch to a join or a rebalance
        (at a step boundary, nothing rolled back), what they hold."""
        epoch = self.coordinator.current
        if epoch is None:
            return 0
        if self.coordinator.finished(self.settings.steps):
            return self.settings.steps
        beats = self.control.heartbeats()
        counts = [beats[n]["committed"] for n in epoch.members if beats.get(n) and beats[n]["epoch"] == epoch.number]
        if len(counts) == len(epoch.members):
            return min(counts)
        if epoch.resume_step >= 0:
            return epoch.resume_step
        held = [beats[n]["committed"] for n in epoch.members if beats.get(n)]  # a joiner has no heartbeat yet
        return min(held, default=0)

    def wait_for_step(self, step: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.committed() < step:
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {step} not reached in {timeout_s} s (at {self.committed()})")
            if self.coordinator.errors:
                raise RuntimeError(f"coordinator: {self.coordinator.errors[-1]}")
            time.sleep(0.02)

    def done(self) -> bool:
        """The members finished, or nobody is left to train."""
        if self._relaunching:
            return False
        return self.coordinator.finished(self.settings.steps) or not any(self.alive(n) for n in self.nodes) \
            or self.control.stopped()

    def finish(self, timeout_s: float = 600) -> dict:
        """Wait for the members to finish, stop everything, return the run's record."""
        deadline = time.monotonic() + timeout_s
        while not self.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        wall = time.time() - (self.started_at or time.time())
        timed_out = not self.done()
        progress = self.progress()
        losses = self.control.losses()
        self.close()
        return {"policy": self.policy, "wall_s": wall, "progress": progress,
                "losses": {k: v["loss"] for k, v in sorted(losses.items())},
                "loss_records": losses, "recoveries": self.coordinator.recoveries, "joins": self.coordinator.joins,
                "epochs": self.coordinator.epochs, "errors": self.coordinator.errors,
                "nodes": self.launcher.reports(10), "kills": dict(self.kills), "timed_out": timed_out}

    def close(self) -> None:
        """Stop the coordinator and every node (they exit on the stop record; stragglers are terminated)."""
        with self._starting:
            self._closed = True
        self.coordinator.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.launcher.reports(10)
        self.launcher.close()


def summarize_run(record: dict, reference: list[float], tokens_per_step: int) -> dict:
    """One row for a finished run (:meth:`ElasticRun.finish`): goodput, failures and what they cost
    (mean detection, re-plan, relaunch, set-up, expert-state fetch and checkpoint restore seconds), and
    how far its loss curve strayed from the uninterrupted ``reference``.

    Goodput counts the useful steps — those the members hold when the run ends (all of them when it
    finished; when it was stopped at a time horizon, what a rolled-back or restored step undid does
    not count) — over the wall time."""
    losses = record["losses"]
    steps = min(record.get("progress", len(losses)), len(losses))
    deviation = max((abs(losses[s] - reference[s]) for s in losses if s < min(steps, len(reference))),
                    default=float("nan"))
    recoveries = record["recoveries"]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    return {
        "strategy": record["policy"], "wall_s": record["wall_s"], "steps": steps,
        "goodput_tokens_s": steps * tokens_per_step / record["wall_s"] if record["wall_s"] > 0 else float("nan"),
        "failures": len(recoveries), "restores": sum(r.restored_step is not None for r in recoveries),
        "lost_steps": int(sum(r.lost_steps for r in recoveries)),
        "joins": len(record["joins"]),
        "detect_s": mean(r.detected_s for r in recoveries), "replan_s": mean(r.replan_s for r in recoveries),
        "relaunch_s": mean(r.relaunch_s for r in recoveries),
        "setup_s": mean(r.setup_s for r in recoveries), "fetch_s": mean(r.fetch_s for r in recoveries),
        "restore_s": mean(r.restore_s for r in recoveries),
        "final_loss": losses[max(losses)] if losses else float("nan"), "max_loss_deviation": deviation,
        "completed": not record["timed_out"] and steps == len(reference) and not record["errors"],
    }


def checkpoint_intervals(record: dict) -> dict[int, float | None]:
    """The checkpoint interval a run chose, in seconds, per number of nodes it trained on (None: no
    periodic checkpoint; the median where epochs of one size chose differently)."""
    by_nodes: dict[int, list[float]] = {}
    for epoch in record["epochs"]:
        if epoch.checkpoint_every_s is not None:
            by_nodes.setdefault(len(epoch.members), []).append(epoch.checkpoint_every_s)
    return {n: (None if np.isinf(m := float(np.median(v))) else round(m, 2)) for n, v in sorted(by_nodes.items(), reverse=True)}
