"""Read JellyBean inputs: the authors' optimizer-input folder, checked row by row.

The folder format is the one in the JellyBean repository's ``optimizer_inputs``
(see data/jellybean-vqa/PROVENANCE.md): headerless CSVs plus a few JSON files.
Every value is checked before any work starts; a bad one raises
:class:`infra.errors.InputError` naming the file, the row and column, and the value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from data_contracts.shipped import UnreadableDataset, read_headerless_csv
from infra.errors import InputError
from optimizers.jellybean import DEFAULT, AccuracyTable, JellyBeanProblem, Pool

COMM_COST_SCALING_FACTOR = 0.1  # the repository's config.yaml for VQA

REQUIRED_FILES = (
    "logical_graph.csv",
    "input_injection_rates.csv",
    "throughput_normalization_ratios.csv",
    "accuracy_requirement.json",
    "accuracy_profiles.json",
    "execution_profile.csv",
    "message_sizes.csv",
    "workers_specs.csv",
    "workers_partition.json",
    "workers_workers_link.csv",
    "sources_workers_link.csv",
)


def read_rows(path: Path, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a headerless CSV as (line number, {column: text}); a trailing empty field is allowed."""
    try:
        frame = read_headerless_csv(path, columns)
    except UnreadableDataset as exc:
        raise InputError(path, f"row {exc.line}", exc.text, exc.reason) from None
    return [(int(line), row.to_dict()) for line, row in frame.iterrows()]


def number(path: Path, line_no: int, column: str, text: str, *, positive: bool = False, nonneg: bool = True) -> float:
    """Parse a finite number, naming file/row/column when it is not one or out of range."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(path, f"row {line_no} {column}", text, "not a number") from None
    if not math.isfinite(value):
        raise InputError(path, f"row {line_no} {column}", text, "must be finite")
    if positive and value <= 0:
        raise InputError(path, f"row {line_no} {column}", text, "must be > 0")
    if nonneg and value < 0:
        raise InputError(path, f"row {line_no} {column}", text, "must be ≥ 0")
    return value


def find_cycle(edges: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
    """The edges of one cycle of the graph, in flow order, or None when it is acyclic."""
    from graphlib import CycleError, TopologicalSorter

    inputs: dict[str, set[str]] = {}
    for u, v in edges:
        inputs.setdefault(v, set()).add(u)
    try:
        TopologicalSorter(inputs).prepare()
    except CycleError as exc:
        nodes = exc.args[1]  # first == last; consecutive nodes are joined by an edge one way or the other
        cycle = list(zip(nodes, nodes[1:]))
        return cycle if all(e in edges for e in cycle) else [(v, u) for u, v in reversed(cycle)]
    return None


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "<file>", str(path), f"cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        lines = exc.doc.splitlines()
        text = lines[exc.lineno - 1][:80] if 0 < exc.lineno <= len(lines) else ""
        raise InputError(path, f"line {exc.lineno}", text, f"malformed JSON: {exc.msg}") from None


def read_accuracy_table(path: Path) -> tuple[tuple[str, ...], dict[tuple[str, ...], float], dict]:
    """The profiled end-to-end accuracy table of an ``accuracy_profiles.json``.

    Returns (operators, {variants: accuracy}, per-operator profiles); every row must name one
    variant per operator and a number in [0, 100].
    """
    profiles = read_json(path)
    if not isinstance(profiles, dict) or not isinstance(profiles.get("end_to_end_accuracy"), dict):
        raise InputError(path, "end_to_end_accuracy", None, "expected an object with operators and table")
    e2e = profiles["end_to_end_accuracy"]
    ops = e2e.get("operators")
    if not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops):
        raise InputError(path, "end_to_end_accuracy.operators", ops, "expected a list of operator names")
    rows = e2e.get("table")
    if not isinstance(rows, list) or not rows:
        raise InputError(path, "end_to_end_accuracy.table", rows, "expected a list of {variants, accuracy}")
    table = {}
    for i, row in enumerate(rows):
        variants = row.get("variants") if isinstance(row, dict) else None
        if not isinstance(variants, list) or len(variants) != len(ops):
            raise InputError(path, f"end_to_end_accuracy.table[{i}].variants", variants, f"expected {len(ops)} variant names, one per operator")
        accuracy = row.get("accuracy")
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 100:
            raise InputError(path, f"end_to_end_accuracy.table[{i}].accuracy", accuracy, "expected a number in [0, 100]")
        table[tuple(variants)] = float(accuracy)
    operators = profiles.get("operators", {})
    if not isinstance(operators, dict) or not all(isinstance(info, dict) for info in operators.values()):
        raise InputError(path, "operators", operators, "expected {operator: {cost: {variant: number}, ...}}")
    return tuple(ops), table, operators


def read_message_sizes(path: Path, edges: list[tuple[str, str]], variants: dict[str, list[str]],
                       *, subset: bool = False) -> dict[tuple[str, str, str, str], float]:
    """KiB per request of the downstream, keyed (u, v, u_variant, v_variant) ("default" matches any).

    With ``subset`` (a workflow offering some of the profiled variants) rows for variants it
    does not offer are skipped, but every offered pair must then find a size; otherwise an
    unknown variant is an error.
    """
    sizes = {}
    for line, row in read_rows(path, ["upstream", "downstream", "upstream_variant", "downstream_variant", "size_kib"]):
        if (row["upstream"], row["downstream"]) not in edges:
            raise InputError(path, f"row {line}", f"{row['upstream']},{row['downstream']}", "not an edge of the workflow")
        unknown = [(col, node) for col, node in (("upstream_variant", row["upstream"]), ("downstream_variant", row["downstream"]))
                   if row[col] != DEFAULT and row[col] not in variants.get(node, [])]
        if unknown and subset:
            continue
        if unknown:
            col, node = unknown[0]
            raise InputError(path, f"row {line} {col}", row[col], f"unknown variant of {node}")
        key = (row["upstream"], row["downstream"], row["upstream_variant"], row["downstream_variant"])
        sizes[key] = number(path, line, "size_kib", row["size_kib"])
    if subset:
        for u, v in edges:
            for uv in variants.get(u, [DEFAULT]):
                for vv in variants.get(v, [DEFAULT]):
                    if not any(k in sizes for k in ((u, v, uv, vv), (u, v, DEFAULT, vv), (u, v, uv, DEFAULT), (u, v, DEFAULT, DEFAULT))):
                        raise InputError(path, "upstream,downstream,upstream_variant,downstream_variant",
                                         f"{u},{v},{uv},{vv}", "no message size for this edge and variant pair")
    return sizes


def load_repository_inputs(folder: str | Path, *, profile_file: str = "execution_profile.csv",
                           rate: float | None = None, accuracy_target: float | None = None) -> JellyBeanProblem:
    """Build a :class:`JellyBeanProblem` from a JellyBean optimizer-input folder.

    Parameters
    ----------
    folder: the folder holding the repository's files.
    profile_file: which execution profile to use (mean, or the p50/p75/p90 files).
    rate: override every source's injection rate (requests/s).
    accuracy_target: override the accuracy requirement.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "--inputs", str(folder), "not a folder")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise InputError(folder / name, "<file>", name, "missing from the inputs folder")

    path = folder / "workers_partition.json"
    partition = read_json(path)
    if not isinstance(partition, list) or not all(isinstance(t, list) for t in partition):
        raise InputError(path, "<root>", partition, "expected a list of tiers, each a list of worker names")
    tier_of = {}
    for rank, tier in enumerate(partition):
        for worker in tier:
            if worker in tier_of:
                raise InputError(path, f"[{rank}]", worker, f"worker already in tier {tier_of[worker]}")
            tier_of[worker] = rank

    path = folder / "workers_specs.csv"
    pools = []
    for line, row in read_rows(path, ["worker", "usd_per_hour"]):
        if row["worker"] not in tier_of:
            raise InputError(path, f"row {line} worker", row["worker"], "not in any tier of workers_partition.json")
        price = number(path, line, "usd_per_hour", row["usd_per_hour"])
        pools.append(Pool(row["worker"], tier_of[row["worker"]], price, 1, device=_device_guess(row["worker"])))
    known_workers = {p.name for p in pools}
    for worker in tier_of:
        if worker not in known_workers:
            raise InputError(folder / "workers_partition.json", "worker", worker, "has no price in workers_specs.csv")

    path = folder / "input_injection_rates.csv"
    sources = {}
    for line, row in read_rows(path, ["source", "rate"]):
        sources[row["source"]] = rate if rate is not None else number(path, line, "rate", row["rate"], positive=True)
    if rate is not None and rate <= 0:
        raise InputError("--rate", "rate", rate, "must be > 0")

    path = folder / "logical_graph.csv"
    edges, edge_line = [], {}
    for line, row in read_rows(path, ["upstream", "downstream"]):
        edge = (row["upstream"], row["downstream"])
        if edge in edge_line:
            raise InputError(path, f"row {line}", ",".join(edge), f"edge listed twice (first on row {edge_line[edge]})")
        edges.append(edge)
        edge_line[edge] = line
    cycle = find_cycle(edges)
    if cycle:
        closing = max(cycle, key=edge_line.get)  # the edge listed last closed it
        raise InputError(path, f"row {edge_line[closing]}", ",".join(closing),
                         f"closes a cycle {' → '.join([*(u for u, _ in cycle), cycle[0][0]])} "
                         f"(rows {', '.join(str(edge_line[e]) for e in cycle)}); a workflow must be acyclic")
    nodes = {n for e in edges for n in e}
    for s in sources:
        if s not in nodes:
            raise InputError(folder / "input_injection_rates.csv", "source", s, "not a node of logical_graph.csv")

    path = folder / "throughput_normalization_ratios.csv"
    ratios = {}
    for line, row in read_rows(path, ["upstream", "downstream", "ratio"]):
        if (row["upstream"], row["downstream"]) not in edges:
            raise InputError(path, f"row {line}", f"{row['upstream']},{row['downstream']}", "not an edge of logical_graph.csv")
        ratios[row["upstream"], row["downstream"]] = number(path, line, "ratio", row["ratio"], positive=True)

    table_ops, table, op_profiles = read_accuracy_table(folder / "accuracy_profiles.json")

    path = folder / profile_file
    if not path.is_file():
        raise InputError(path, "--profile", profile_file, "no such execution profile in the inputs folder")
    latency: dict[tuple[str, str, str], float] = {}
    variants: dict[str, list[str]] = {}
    # The variants accuracy_profiles.json knows of each operator: a profile row naming another is a typo.
    known_variants = {op: {combo[j] for combo in table} for j, op in enumerate(table_ops)}
    for op, info in op_profiles.items():
        if isinstance(info.get("cost"), dict):
            known_variants.setdefault(op, set()).update(info["cost"])
    for line, row in read_rows(path, ["operator", "worker", "variant", "latency_ms"]):
        op, worker, var = row["operator"], row["worker"], row["variant"]
        if op not in nodes or op in sources:
            raise InputError(path, f"row {line} operator", op, "not an operator of logical_graph.csv")
        if worker not in known_workers:
            raise InputError(path, f"row {line} worker", worker, "unknown worker (not in workers_specs.csv)")
        if known_variants.get(op) and var not in known_variants[op]:
            raise InputError(path, f"row {line} variant", var,
                             f"unknown variant of {op}: accuracy_profiles.json has {', '.join(sorted(known_variants[op]))}")
        latency[op, worker, var] = number(path, line, "latency_ms", row["latency_ms"], positive=True)
        if var not in variants.setdefault(op, []):
            variants[op].append(var)
    for op in nodes - set(sources):
        if op not in variants:
            raise InputError(path, "operator", op, "has no execution profile on any worker")
    for op, vars_ in variants.items():
        for worker in known_workers:
            have = [v for v in vars_ if (op, worker, v) in latency]
            if have and len(have) != len(vars_):
                missing = next(v for v in vars_ if v not in have)
                raise InputError(path, "operator,worker,variant", f"{op},{worker},{missing}",
                                 "missing profile: the worker is profiled for other variants of this operator")
    for j, op in enumerate(table_ops):
        for combo in table:
            if op not in variants or combo[j] not in variants[op]:
                raise InputError(folder / "accuracy_profiles.json", f"end_to_end_accuracy.{op}", combo[j],
                                 f"unknown variant; {profile_file} has {', '.join(variants.get(op, []))}")

    relative_cost = {}
    for op, info in op_profiles.items():
        for var, cost in (info.get("cost") or {}).items():
            if isinstance(cost, bool) or not isinstance(cost, (int, float)) or cost < 0:
                raise InputError(folder / "accuracy_profiles.json", f"operators.{op}.cost.{var}", cost, "expected a number ≥ 0")
            relative_cost[op, var] = float(cost)

    messages = read_message_sizes(folder / "message_sizes.csv", edges, variants)

    links = {}
    for name, src_known in (("workers_workers_link.csv", known_workers), ("sources_workers_link.csv", set(sources))):
        path = folder / name
        for line, row in read_rows(path, ["src", "dst", "usd_per_gb"]):
            if row["src"] not in src_known:
                raise InputError(path, f"row {line} src", row["src"], "unknown worker or source")
            if row["dst"] not in known_workers:
                raise InputError(path, f"row {line} dst", row["dst"], "unknown worker")
            links[row["src"], row["dst"]] = number(path, line, "usd_per_gb", row["usd_per_gb"]) * COMM_COST_SCALING_FACTOR

    path = folder / "accuracy_requirement.json"
    requirement = read_json(path)
    try:
        target = float(requirement["threshold"]) if accuracy_target is None else float(accuracy_target)
    except (KeyError, TypeError, ValueError):
        raise InputError(path, "threshold", requirement, "expected {\"sink\": ..., \"threshold\": number}") from None

    return JellyBeanProblem(
        sources=sources,
        source_tier={s: 0 for s in sources},
        edges=edges,
        ratios=ratios,
        variants=variants,
        relative_cost=relative_cost,
        pools=pools,
        latency_ms=latency,
        message_kib=messages,
        link_usd_per_gb=links,
        accuracy=AccuracyTable(table_ops, table),
        accuracy_target=target,
        name=folder.name,
    )


def _device_guess(worker: str) -> str:
    return "gpu" if "gpu" in worker else "cpu"
