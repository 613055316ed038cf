"""The JellyBean benchmark's parts run on small inputs and record what they measured."""

import json

import optimizers.solve as solve_module
from benchmarks import jellybean as bench
from benchmarks.jellybean import platform_overhead, vqa_savings
from optimizers.jellybean_baselines import STRATEGIES


def test_quick_vqa_savings_reports_a_saving_against_every_baseline_and_plots_it(tmp_path):
    vqa_savings(quick=True, out=tmp_path)

    results = json.loads((tmp_path / "jellybean.json").read_text())
    section = results["vqa_savings"]
    assert section["simulated"] == []
    savings = section["default_setting"]["savings"]
    assert set(savings) == set(STRATEGIES)
    for name, s in savings.items():
        assert s is not None, name
        assert s["savings"] >= -1e-9, name  # the MILP is never dearer than a baseline
        assert abs(s["from_compute"] + s["from_network"] - s["savings"]) < 1e-9, name
    milp = section["default_setting"]["strategies"]["milp"]
    assert milp["optimal"] is True and milp["gap"] == 0.0
    assert (tmp_path / "vqa_costs.png").stat().st_size > 0
    assert (tmp_path / "vqa_savings_vs_rate.png").stat().st_size > 0


def test_scaling_case_times_milp_heuristic_and_seeded_milp_without_touching_the_solver():
    solve = solve_module._solve
    case = bench._run_case(10, 3, 0, milp_time_limit=30.0, heuristic_limit=60.0)

    assert solve_module._solve is solve  # read from Plan.gap, not by wrapping the solver
    for solver in bench.SOLVERS:
        assert case[solver]["status"] == "ok", case[solver]
        assert case[solver]["violations"] == [], solver
    assert case["milp"]["optimal"] is True and case["milp"]["gap"] == 0.0
    seeded = case["milp_seeded"]
    assert seeded["seconds"] >= seeded["milp_part_seconds"]  # includes the heuristic's run
    assert case["seeded_over_heuristic_cost"] <= 1 + 1e-9  # capped by the heuristic's plan
    assert case["milp_over_heuristic_cost"] <= 1 + 1e-9


def test_scaling_records_impossible_instances_and_prints_the_table(capsys):
    case = bench._run_case(10, 20, 0, milp_time_limit=30.0, heuristic_limit=60.0)
    assert case["status"] == "impossible" and "milp" not in case

    section = {"cases": [case], "medium_requirement": {"runs": [], "target_seconds": 10.0, "pass": None, "all_seeds_pass": None}}
    bench._print_scaling(section)
    assert "impossible" in capsys.readouterr().out


def _summary(**extra) -> dict:
    return {"system": "jellybean", "milp": 1.0, "baselines": {"cloud_only": 2.0}, "savings": {"cloud_only": 0.5},
            "simulated": ["prices come from the catalog"], **extra}


def test_platform_overhead_reads_a_saved_summary(tmp_path):
    summary_file = tmp_path / "run.txt"
    summary_file.write_text("log line\n" + json.dumps(_summary(wall_seconds=40.0, task_seconds=30.0, overhead_share=0.25)) + "\n")

    section = platform_overhead(summary_file, out=tmp_path)

    assert section["status"] == "measured"
    assert section["wall_seconds"] == 40.0 and section["task_seconds"] == 30.0
    assert section["overhead_seconds"] == 10.0 and section["overhead_share"] == 0.25
    assert section["savings"] == {"cloud_only": 0.5}
    assert section["simulated"] == ["platform_overhead run: prices come from the catalog"]
    assert json.loads((tmp_path / "jellybean.json").read_text())["platform_overhead"]["status"] == "measured"


def test_platform_overhead_without_timings_is_not_measured(tmp_path):
    summary_file = tmp_path / "run.txt"
    summary_file.write_text(json.dumps(_summary(task_seconds=3.0)))
    section = platform_overhead(summary_file)
    assert section["status"] == "not measured" and "wall_seconds" in section["reason"]


def test_platform_overhead_quick_starts_no_run(monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("--quick must not start a run")

    monkeypatch.setattr(bench, "_run_tierflow", no_run)
    section = platform_overhead(quick=True)
    assert section["status"] == "not measured (quick)"


def test_platform_overhead_runs_the_command_and_takes_its_last_line(tmp_path, monkeypatch):
    program = tmp_path / "fake-tierflow"
    line = json.dumps(_summary(wall_seconds=20.0, task_seconds=15.0, overhead_share=0.25))
    program.write_text(f"#!/bin/sh\necho starting\necho \"TIERFLOW_HOME=$TIERFLOW_HOME\" >&2\necho '{line}'\n")
    program.chmod(0o755)
    monkeypatch.setenv("TIERFLOW_HOME", str(tmp_path / "home"))

    section = platform_overhead(command=(str(program),), timeout=30)

    assert section["status"] == "measured", section
    assert section["overhead_share"] == 0.25 and section["savings"] == {"cloud_only": 0.5}
    assert section["run"]["tierflow_home"] == str(tmp_path / "home")
    assert section["run"]["returncode"] == 0


def test_platform_overhead_records_a_failed_run(tmp_path):
    program = tmp_path / "failing-tierflow"
    program.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    program.chmod(0o755)

    section = platform_overhead(command=(str(program),), timeout=30)

    assert section["status"] == "not measured"
    assert "status 3" in section["reason"] and "boom" in section["run"]["stderr_tail"]
