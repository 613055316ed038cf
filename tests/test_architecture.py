"""The project's shape, checked by reading its sources (every import, at module level or inside a function).

- One place for Dask: only ``infra/`` imports ``dask`` or ``distributed`` or calls ``get_worker``.
- Dependencies point one way: flows → tasks → optimizers → infra. An optimizer never imports
  Prefect or Dask; infra imports nothing of ours outside infra.
- No import cycle among the modules of ``flows/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "optimizers", "infra", "data_contracts", "benchmarks")
# what each layer may import of ours (its own package always)
MAY_IMPORT = {
    "flows": {"tasks", "optimizers", "infra", "data_contracts"},
    "tasks": {"optimizers", "infra", "data_contracts"},
    "optimizers": {"infra"},
    "infra": set(),
    "data_contracts": {"infra"},
    "benchmarks": {"flows", "tasks", "optimizers", "infra", "data_contracts"},
}
DASK = {"dask", "distributed"}
ORCHESTRATION = {"prefect", "prefect_dask", "dask", "distributed"}


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file; ``from a import b`` gives both ``a`` and
    ``a.b`` (b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def calls_named(path: Path, name: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if called == name:
                lines.append(node.lineno)
    return lines


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_only_infra_imports_dask_or_asks_for_the_worker():
    offenders = []
    for package in PACKAGES:
        if package == "infra":
            continue
        for path in sources(package):
            offenders += [f"{where(path, line)} imports {name}" for line, name in imports(path)
                          if name.split(".")[0] in DASK]
            offenders += [f"{where(path, line)} calls get_worker" for line in calls_named(path, "get_worker")]
    assert not offenders, "Dask is infra.cluster's business:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    ours = set(PACKAGES)
    offenders = []
    for path in sources(package):
        for line, name in imports(path):
            root = name.split(".")[0]
            if root in ours and root != package and root not in MAY_IMPORT[package]:
                offenders.append(f"{where(path, line)} imports {name}")
    assert not offenders, f"{package} may import only {sorted(MAY_IMPORT[package]) or 'nothing of ours'}:\n" + "\n".join(offenders)


def test_optimizers_are_pure_code_without_prefect_or_dask():
    offenders = [f"{where(path, line)} imports {name}" for path in sources("optimizers")
                 for line, name in imports(path) if name.split(".")[0] in ORCHESTRATION]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle_among_the_flows_modules():
    modules = {module_name(path): path for path in sources("flows")}
    graph = {name: sorted({imported for _, imported in imports(path) if imported in modules and imported != name})
             for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in flows/: " + " → ".join(cycle)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle of the directed graph as a path that returns to its start, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = "done", stack.pop()
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_sees_a_cycle_through_a_function_level_import(tmp_path):
    # the checker itself: a local `from flows import cli` inside a sub-command module is an edge too
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flows import cli\n")
    assert "flows.cli" in {name for _, name in imports(module)}
    assert find_cycle({"flows.cli": ["flows.lmaas_cli"], "flows.lmaas_cli": ["flows.cli"]}) == [
        "flows.cli", "flows.lmaas_cli", "flows.cli"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
