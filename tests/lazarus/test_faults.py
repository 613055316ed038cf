"""The failure schedule is kept to the second for every strategy, however long an arrival takes."""

import threading
import time

from tasks.lazarus.faults import FaultInjector, periodic_faults


class SlowToGrowRun:
    """Stands in for an ElasticRun whose new nodes take 1.5 s to start (a Dask worker restarting)."""

    def __init__(self):
        self.started_at = time.time()
        self.alive_nodes = [f"node{i}" for i in range(4)]
        self.killed: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def members(self):
        with self.lock:
            return list(self.alive_nodes)

    def alive(self, node):
        return node in self.members()

    def kill(self, node):
        with self.lock:
            self.alive_nodes.remove(node)
        self.killed.append((node, time.time() - self.started_at))

    def add_node(self):
        time.sleep(1.5)
        with self.lock:
            node = f"node{len(self.alive_nodes) + len(self.killed)}"
            self.alive_nodes.append(node)
        return node

    def done(self):
        return False


def test_a_slow_arrival_does_not_delay_the_next_failure():
    run = SlowToGrowRun()
    injector = FaultInjector(run, periodic_faults(0.5, 1.6, rejoin_after_s=0.1), seed=0)
    injector.start()
    time.sleep(2.5)
    injector.stop()
    times = [t for _, t in run.killed]
    assert len(times) == 3 and abs(times[1] - 1.0) < 0.3 and abs(times[2] - 1.5) < 0.3, times
    assert sum(e["kind"] == "add" and "node" in e for e in injector.events) == 3
