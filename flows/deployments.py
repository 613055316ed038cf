"""``deployments/prefect.yaml`` against the registry: every system's deployments, and nothing else.

The YAML is what ``prefect deploy`` reads; each deployment in it must be one a system declares
(:attr:`flows.system.System.deployments`), with the same entrypoint, schedule, parameters and tags.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.registry import systems

PREFECT_YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"
WORK_POOL = "tierflow-process"


def declared() -> dict[str, dict]:
    """``<flow>/<deployment>`` → what the registry says it is."""
    return {f"{d.flow_name}/{d.name}": {"entrypoint": d.entrypoint, "cron": d.cron, "parameters": d.parameters,
                                         "tags": list(d.tags)}
            for system in systems().values() for d in system.deployments}


def check_prefect_yaml(path: Path = PREFECT_YAML) -> list[str]:
    """What in the YAML differs from the registry (empty when they agree)."""
    document = yaml.safe_load(path.read_text())
    expected, problems, seen = declared(), [], set()
    by_name = {f"{d['entrypoint'].split(':')[1].replace('_', '-')}/{d['name']}": d for d in document["deployments"]}
    for name, d in by_name.items():
        want = expected.get(name)
        if want is None:
            problems.append(f"{path}: deployment {name!r} is declared by no system")
            continue
        seen.add(name)
        got = {"entrypoint": d["entrypoint"], "cron": [s["cron"] for s in d.get("schedules") or []],
               "parameters": d.get("parameters") or {}, "tags": d.get("tags") or []}
        for key, value in (("entrypoint", want["entrypoint"]), ("cron", [want["cron"]]),
                           ("parameters", want["parameters"]), ("tags", want["tags"])):
            if got[key] != value:
                problems.append(f"{path}: deployment {name!r} field {key!r} = {got[key]!r}; the registry says {value!r}")
        if (d.get("work_pool") or {}).get("name") != WORK_POOL:
            problems.append(f"{path}: deployment {name!r} does not run on the {WORK_POOL!r} work pool")
    problems += [f"{path}: deployment {name!r} of the registry is missing" for name in sorted(set(expected) - seen)]
    return problems
