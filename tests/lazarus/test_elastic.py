"""Elastic training for real: node processes on this host, gloo collectives, SIGKILL mid-run.

Every run's loss curve is compared with the same training in one process without failures
(`uninterrupted_losses`): recovering must neither lose nor repeat an update, nor drop
optimizer state, so the curves agree step for step (float32 reassociation aside).
"""

import math
import time
import uuid
from dataclasses import asdict

import pytest

from infra.store import open_store
from tasks.lazarus.checkpoint import latest_checkpoint
from tasks.lazarus.coordinator import CheckpointRule
from tasks.lazarus.local import ElasticRun, checkpoint_intervals
from tasks.lazarus.node import RunSettings, uninterrupted_losses
from tasks.moe.model import CONFIGS

STEPS = 12


@pytest.fixture(scope="module")
def reference():
    return uninterrupted_losses(_settings("unused"))


def _settings(store: str, **kw) -> RunSettings:
    return RunSettings(config=asdict(CONFIGS["tiny"]), steps=STEPS, global_batch=24, store_url=store, timeout_s=30, **kw)


def _assert_follows(losses: dict[int, float], reference: list[float]) -> None:
    assert sorted(losses) == list(range(STEPS)), "every step committed exactly once in the final curve"
    for step, expected in enumerate(reference):
        assert losses[step] == pytest.approx(expected, abs=2e-3), f"step {step}"


def test_killed_node_survivors_continue_without_a_checkpoint(tmp_path, reference):
    run = ElasticRun(_settings(str(tmp_path / "store"), checkpoint_every=4), policy="lazarus", slots=4, f=2)
    run.start(4)
    run.wait_for_step(5)
    run.kill("node3")
    out = run.finish()
    assert not out["errors"]
    (recovery,) = out["recoveries"]
    assert recovery.failed == ["node3"] and recovery.survivors == ["node0", "node1", "node2"]
    assert recovery.restored_step is None and recovery.lost_steps == 0  # every expert survived: no restart
    assert recovery.detected_s is not None and recovery.detected_s < 5
    assert out["epochs"][-1].members == ["node0", "node1", "node2"]
    assert all(out["nodes"][n]["outcome"] == "done" for n in recovery.survivors)
    _assert_follows(out["losses"], reference)


def test_losing_every_replica_of_an_expert_restores_the_last_checkpoint(tmp_path, reference):
    run = ElasticRun(_settings(str(tmp_path / "store"), checkpoint_every=3, checkpoint_io_s=0.3), policy="lazarus",
                     slots=3, f=1)  # each write and restore takes 0.3 s longer, as a larger model's would
    run.start(4)  # 8 experts in 12 slots, f = 1: some expert has a single replica
    epoch = run.coordinator.current
    holders = {e: [n for n, held in zip(epoch.members, epoch.placement) if e in held] for e in range(8)}
    victim = next(nodes[0] for nodes in holders.values() if len(nodes) == 1)
    run.wait_for_step(7)
    run.kill(victim)
    out = run.finish()
    (recovery,) = out["recoveries"]
    assert recovery.restored_step is not None and recovery.restored_step % 3 == 0
    assert recovery.lost_steps == recovery.committed - recovery.restored_step
    assert any("no surviving replica" in note for note in out["epochs"][-1].notes)
    assert recovery.restore_s >= 0.3 and min(c["seconds"] for c in run.control.checkpoints().values()) >= 0.3
    _assert_follows(out["losses"], reference)


def test_checkpoint_restart_relaunches_every_process_and_restores_the_last_checkpoint_from_s3(
        moto_endpoint, monkeypatch, reference):
    monkeypatch.setenv("TIERFLOW_S3_ENDPOINT_URL", moto_endpoint)  # the node processes inherit it
    url = f"s3://lazarus-{uuid.uuid4().hex[:8]}/run"
    open_store(url, create_bucket=True)
    run = ElasticRun(_settings(url, checkpoint_every=4), policy="checkpoint_restart", slots=4, f=2)
    run.start(4)
    run.wait_for_step(6)
    pids = {node: record["pid"] for node, record in run.control.registered().items()}
    run.kill("node2")
    out = run.finish()
    (recovery,) = out["recoveries"]
    assert recovery.restored_step == 4 and recovery.lost_steps >= 2
    assert recovery.survivors == ["node0", "node1", "node3"] and recovery.relaunch_s > 0
    relaunched = run.control.registered()
    for node in recovery.survivors:  # DeepSpeed-style: the job stops, no process survives a failure
        assert relaunched[node]["pid"] != pids[node], f"{node} kept its process"
        assert out["nodes"][node]["outcome"] == "done", out["nodes"]
    assert latest_checkpoint(open_store(url), "lazarus/checkpoints") == 12  # the checkpoints are in the bucket
    _assert_follows(out["losses"], reference)


def test_a_joining_node_is_absorbed_at_a_step_boundary(tmp_path, reference):
    run = ElasticRun(_settings(str(tmp_path / "store")), policy="lazarus", slots=4, f=2)
    joined = run.spawn()  # a process starts slower than 12 tiny steps run: have it wait, registered
    run.wait_registered([joined])
    run.start(3)
    run.wait_for_step(3)
    run.admit(joined)
    out = run.finish()
    assert not out["errors"]
    last = out["epochs"][-1]
    assert last.reason == "join" and joined in last.members and len(last.members) == 4
    assert out["nodes"][joined]["outcome"] == "done" and out["nodes"][joined]["steps_run"] > 0
    assert not out["recoveries"]
    _assert_follows(out["losses"], reference)


def test_too_few_survivors_to_hold_every_expert_wait_for_a_node_then_go_on(tmp_path, reference):
    run = ElasticRun(_settings(str(tmp_path / "store"), checkpoint_every=4), policy="lazarus", slots=4, f=2)
    spare = run.spawn()
    run.wait_registered([spare])
    run.start(3)  # 12 slots for 8 experts
    run.wait_for_step(5)
    run.kill("node2")
    run.kill("node3")  # one node left: 4 slots cannot hold 8 experts
    deadline = time.monotonic() + 60
    while run.coordinator._parked is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.coordinator._parked is not None, "the recovery did not wait for nodes"
    assert not run.coordinator.errors, "too few nodes is a wait, not the end of the run"
    run.admit(spare)
    out = run.finish()
    assert not out["errors"]
    recovery = out["recoveries"][-1]
    assert recovery.survivors == ["node1", spare] and recovery.waited_s > 0
    assert any(note.startswith("waited") for note in out["epochs"][-1].notes)
    _assert_follows(out["losses"], reference)


def test_each_epoch_checkpoints_as_often_as_its_plan_needs_restores(tmp_path, reference):
    """DeepSpeed's EP pairs on 4 nodes survive any single failure (no periodic checkpoint); on the 3
    left, one pair and an idle node lose an expert 2 times in 3: a checkpoint at once, then often."""
    rule = CheckpointRule(checkpoint_s=0.05, mtbf_s=0.01)  # failures so frequent that a fragile plan checkpoints every step
    store = str(tmp_path / "store")
    run = ElasticRun(_settings(store), policy="reconfig_uniform", slots=6, f=2, checkpoint_rule=rule)
    run.start(4)
    run.wait_for_step(4)
    run.kill("node1")
    out = run.finish()
    assert not out["errors"]
    first, after = out["epochs"][0], out["epochs"][-1]
    assert first.restore_probability == 0.0 and first.checkpoint_every_s == math.inf  # only the step-0 checkpoint
    assert after.restore_probability == pytest.approx(2 / 3) and after.checkpoint_every_s < 1
    (recovery,) = out["recoveries"]
    checkpoints = sorted(run.control.checkpoints())
    assert checkpoints[0] == 0 and checkpoints[1] == recovery.committed + 1, "written at the first step on 3 nodes"
    assert len(checkpoints) >= 4 and latest_checkpoint(open_store(store), "lazarus/checkpoints") == checkpoints[-1]
    chosen = checkpoint_intervals(out)
    assert list(chosen) == [4, 3] and chosen[4] is None and chosen[3] < 1
    _assert_follows(out["losses"], reference)


def test_a_node_cannot_start_once_the_run_has_closed(tmp_path):
    run = ElasticRun(_settings(str(tmp_path / "store")), policy="lazarus", slots=4, f=2)
    run.start(4)
    out = run.finish()
    assert sorted(out["losses"]) == list(range(STEPS))
    with pytest.raises(RuntimeError, match="the run is over: node4 is not started"):
        run.add_node()  # a replacement the fault injector sends as the run ends


def test_steps_held_while_members_switch_to_a_join_still_count(tmp_path):
    """A run that ends while a join (or rebalance) is being formed keeps every step its members
    committed: the switch happens at a step boundary and rolls nothing back."""
    from tasks.lazarus.control import Epoch

    run = ElasticRun(_settings(str(tmp_path / "store")), policy="lazarus", slots=4, f=2)  # no node started
    members = ["node0", "node1", "node2"]
    placement = run.coordinator._plan(members, [1.0] * 8)[0]
    run.coordinator._publish(Epoch(0, members, placement, 0, "start"))
    for node in members:
        run.control.heartbeat(node, 0, 9, [0.0] * 8)
    assert run.progress() == 9
    joined = members + ["node3"]
    run.coordinator._publish(Epoch(1, joined, run.coordinator._plan(joined, [1.0] * 8)[0], -1, "join"), at_boundary=True)
    assert run.progress() == 9, "the joiner has no state yet; the members' 9 steps are kept"
    run.coordinator._publish(Epoch(2, members, placement, 7, "failure"))
    assert run.progress() == 7, "a recovery being set up resumes from its agreed step"
    run.close()


def test_a_restart_that_brings_too_few_nodes_back_waits_for_nodes(tmp_path, reference):
    """checkpoint_restart relaunches the survivors; when fewer come back than the model needs (a
    worker still restarting), the job waits for a node instead of ending the run."""
    run = ElasticRun(_settings(str(tmp_path / "store"), checkpoint_every=4), policy="checkpoint_restart", slots=4, f=2)
    spare = run.spawn()
    run.wait_registered([spare])
    run.start(3)
    relaunch, calls = run.coordinator.relaunch, []

    def one_comes_back_first(nodes):
        calls.append(list(nodes))
        up = relaunch(nodes)
        return up[:1] if len(calls) == 1 else up

    run.coordinator.relaunch = one_comes_back_first
    run.wait_for_step(5)
    run.kill("node2")
    deadline = time.monotonic() + 120
    while run.coordinator._parked is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.coordinator._parked is not None and not run.coordinator.errors, run.coordinator.errors
    run.admit(spare)
    out = run.finish()
    assert not out["errors"] and len(calls) == 2 and spare in calls[1]
    assert out["recoveries"][-1].restored_step == 4 and out["recoveries"][-1].waited_s > 0
    _assert_follows(out["losses"], reference)
