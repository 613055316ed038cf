"""`tierflow lazarus plan` as a user runs it: the placement and its exact recovery curve; bad input is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimizers.lazarus import Placement, recovery_probability

TIERFLOW = str(Path(sys.executable).with_name("tierflow"))
PAPER_LOADS = "1000,435,267,189,145,117,98,84,73,65,58,52,48,44,40,37"  # skewed, 16 experts


def tierflow(*args):
    return subprocess.run([TIERFLOW, *map(str, args)], env=dict(os.environ), capture_output=True, text=True, timeout=120)


def test_plan_prints_placement_and_exact_recovery_per_failed_count():
    result = tierflow("lazarus", "plan", "--nodes", 10, "--slots", 6, "--f", 2, "--loads", PAPER_LOADS, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    nodes = [plan["placement"][str(n)] for n in range(10)]
    assert all(len(held) <= 6 for held in nodes)  # a node may hold two replicas of a hot expert (the paper's §4.1)
    assert sum(plan["replicas"]) == 60 and min(plan["replicas"]) >= 2
    assert sorted(e for held in nodes for e in held) == sorted(e for e, r in enumerate(plan["replicas"]) for _ in range(r))
    curve = {int(k): v for k, v in plan["recovery_probability"].items()}
    assert sorted(curve) == list(range(11)) and curve[0] == 1.0 and curve[10] == 0.0
    placement = Placement(nodes, 6, 16)
    assert curve[4] == pytest.approx(recovery_probability(placement, 10, 4))


def test_plan_all_compares_mro_with_the_baselines():
    result = tierflow("lazarus", "plan", "--nodes", 10, "--slots", 6, "--loads", PAPER_LOADS, "--strategy", "all", "--json")
    assert result.returncode == 0, result.stderr
    plans = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(plans) == {"lazarus", "reconfig_uniform", "spread", "compact"}
    at4 = {name: p["recovery_probability"]["4"] for name, p in plans.items()}
    assert at4["lazarus"] > at4["spread"]  # the paper: MRO 41%, spread 12% at 4 failed nodes


@pytest.mark.parametrize("args, says", [
    (["--nodes", 1, "--slots", 1, "--loads", "1,2"], "f = 2 replicas per expert > 1 nodes"),
    (["--nodes", 3, "--slots", 1, "--f", 2, "--loads", "1,2"], "3 × 1 = 3 < E experts × f = 2 × 2 = 4"),
    (["--nodes", 2, "--slots", 4, "--f", 3, "--loads", "1,2"], "f = 3"),
    (["--nodes", 3, "--slots", 2, "--loads", "1,x"], "--loads: entry 2 is 'x'"),
    (["--nodes", 3, "--slots", 2, "--loads", "1,-4"], "-4"),
    (["--nodes", 3, "--slots", 2, "--loads", "1,2", "--strategy", "best"], "--strategy: 'best'"),
])
def test_bad_input_is_one_clear_line(args, says):
    result = tierflow("lazarus", "plan", *args)
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr


def test_kill_preempts_a_node_of_the_running_run_and_the_survivors_go_on(tmp_path):
    from dataclasses import asdict

    from infra.prefect_server import tierflow_home
    from tasks.lazarus.local import ElasticRun
    from tasks.lazarus.node import RunSettings
    from tasks.moe.model import CONFIGS

    settings = RunSettings(config=asdict(CONFIGS["tiny"]), steps=100, store_url=str(tmp_path / "store"), timeout_s=30)
    run = ElasticRun(settings, policy="lazarus", slots=4, f=2)
    run.start(4)
    current = tierflow_home() / "lazarus" / "current.json"  # what `tierflow run lazarus` writes
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text(json.dumps(run.describe()))
    try:
        run.wait_for_step(3)
        unknown = tierflow("lazarus", "kill", "node9")
        assert unknown.returncode != 0 and "node0, node1, node2, node3" in unknown.stderr + unknown.stdout
        killed = tierflow("lazarus", "kill", "node1")
        assert killed.returncode == 0, killed.stderr
        out = run.finish()
    finally:
        current.unlink()
    recovery = out["recoveries"][0]
    assert recovery.failed == ["node1"] and recovery.restored_step is None
    assert recovery.detected_s is not None, "the CLI records when it killed the node"
    assert sorted(out["losses"]) == list(range(100))
