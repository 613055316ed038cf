"""deployments/prefect.yaml: what the registry declares, and end to end: work pool → `prefect deploy`
→ process worker → flow run COMPLETED.

The file holds exactly the deployments the systems declare (flows/<system>/__init__.py). End to end,
everything goes through the `prefect` command line against the session's real Prefect server, as an
operator would do it (deployments/README.md). Every deployment is registered with its schedule; the
one that runs is `lmaas-replan/hourly-adapter-replan`, the cheapest (no cluster): it re-plans a
current LMaaS placement from a registry's metered usage, and the test sees the plan file rewritten.
The other flows run end to end in their own tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from flows.deployments import PREFECT_YAML, check_prefect_yaml, declared
from flows.registry import systems

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
RUN_TIMEOUT_S = 480
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _prefect(args: list[str], env: dict, timeout: float = 300) -> str:
    done = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{output[-4000:]}"
    return output


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no worker log)"


@contextmanager
def _client(api_url: str):
    """A sync Prefect client for ``api_url`` (Prefect read its settings when first imported)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _metered_plan(tmp_path: Path) -> Path:
    """A one-worker LMaaS plan whose registry metered more load in the last 5 minutes than 70% of
    the worker's throughput: a re-plan adds a second worker."""
    from tests.lmaas.test_flow import acme_on_one_worker

    registry, _, path = acme_on_one_worker(tmp_path)
    acme = registry.tenant("acme")
    for model in ("acme/a", "acme/b"):  # 2 × 12,000 tokens within the run's window of 300 s: 80 tokens/s > 70% of 100
        for _ in range(3):
            registry.record_usage(acme, model, 10, 4000, 0.1, 1.0, 0.0)
    return path


def test_prefect_yaml_holds_exactly_the_deployments_the_systems_declare():
    assert check_prefect_yaml() == []
    assert set(declared()) >= {"jellybean/hourly-replan", "lmaas-replan/hourly-adapter-replan"}


def test_a_deployment_out_of_step_with_the_registry_is_named(tmp_path):
    import yaml

    document = yaml.safe_load(PREFECT_YAML.read_text())
    document["deployments"][0]["schedules"][0]["cron"] = "5 * * * *"
    document["deployments"].append({**document["deployments"][0], "name": "stray"})
    del document["deployments"][1]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(document))
    problems = "\n".join(check_prefect_yaml(path))
    assert "deployment 'jellybean/hourly-replan' field 'cron' = ['5 * * * *']; the registry says ['0 * * * *']" in problems
    assert "deployment 'jellybean/stray' is declared by no system" in problems
    assert "deployment 'jellybean/nightly-profile' of the registry is missing" in problems


def test_each_deployments_flow_is_the_flow_prefect_knows_by_that_name():
    for system in systems().values():
        for deployment in system.deployments:
            module, function = deployment.flow.split(":")
            flow = getattr(__import__(module, fromlist=[function]), function)
            assert flow.name == deployment.flow_name, deployment.name


def test_hourly_replan_deployment_runs_on_a_process_worker(prefect_api, tmp_path):
    from prefect.states import Cancelling

    # The worker resolves the pull step's {{ $TIERFLOW_ROOT }}; a short poll keeps the test quick.
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "TIERFLOW_ROOT": str(ROOT),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    plan_path = _metered_plan(tmp_path)
    params = {"plan_path": str(plan_path), "window_s": 300}

    _prefect(["work-pool", "create", "tierflow-process", "--type", "process", "--overwrite"], env, timeout=120)
    _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)

    with _client(prefect_api) as client:
        crons = {}
        for name in declared():
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_pool_name == "tierflow-process", name
            crons[name] = [s.schedule.cron for s in deployment.schedules]
            # Pause the schedules (this also deletes their upcoming runs), so the worker below
            # picks up only this test's run even if the test straddles the hour.
            for schedule in deployment.schedules:
                client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        assert crons == {name: [d["cron"]] for name, d in declared().items()}

    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "tierflow-process"], cwd=tmp_path, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    flow_run_id, state = None, None
    try:
        out = _prefect(["deployment", "run", "lmaas-replan/hourly-adapter-replan", "--params", json.dumps(params)], env,
                       timeout=120)
        found = re.search(r"UUID:\s*(" + UUID.pattern + ")", out) or UUID.search(out)
        assert found, f"no flow run id in the output of `prefect deployment run`:\n{out}"
        flow_run_id = found.group(1)

        deadline = time.monotonic() + RUN_TIMEOUT_S
        with _client(prefect_api) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.is_final():
                    break
                assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{_tail(log_path)}"
                time.sleep(3)
            assert state is not None and state.is_completed(), (
                f"flow run {flow_run_id} ended {state.type.value if state else None} "
                f"({state.message if state else 'no state'}) within {RUN_TIMEOUT_S} s; worker log:\n{_tail(log_path)}")
    finally:
        if flow_run_id and not (state and state.is_final()):
            # Leave nothing running on a shared machine: ask the worker to cancel the run first.
            try:
                with _client(prefect_api) as client:
                    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
                    for _ in range(20):
                        if client.read_flow_run(flow_run_id).state.is_final():
                            break
                        time.sleep(2)
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        try:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)

    plan = json.loads(plan_path.read_text())  # the run re-planned: the load outgrew one worker
    assert sorted(plan["workers"]) == ["serve-0", "serve-1"], plan["workers"]
