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


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"line {exc.lineno}", exc.doc.splitlines()[exc.lineno - 1][:80] if exc.doc else "", f"malformed JSON: {exc.msg}") from None


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
    edges = []
    for line, row in read_rows(path, ["upstream", "downstream"]):
        edge = (row["upstream"], row["downstream"])
        if edge in edges or edge[::-1] in edges:
            raise InputError(path, f"row {line}", ",".join(edge), "edge listed twice")
        edges.append(edge)
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

    path = folder / "accuracy_profiles.json"
    profiles = read_json(path)
    try:
        e2e = profiles["end_to_end_accuracy"]
        table_ops = tuple(e2e["operators"])
        table = {tuple(r["variants"]): float(r["accuracy"]) for r in e2e["table"]}
        op_profiles = profiles["operators"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, "end_to_end_accuracy", str(exc), "expected operators, table[{variants, accuracy}] and operators{}") from None

    path = folder / profile_file
    if not path.is_file():
        raise InputError(path, "--profile", profile_file, "no such execution profile in the inputs folder")
    latency: dict[tuple[str, str, str], float] = {}
    variants: dict[str, list[str]] = {}
    for line, row in read_rows(path, ["operator", "worker", "variant", "latency_ms"]):
        op, worker, var = row["operator"], row["worker"], row["variant"]
        if op not in nodes or op in sources:
            raise InputError(path, f"row {line} operator", op, "not an operator of logical_graph.csv")
        if worker not in known_workers:
            raise InputError(path, f"row {line} worker", worker, "unknown worker (not in workers_specs.csv)")
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
            relative_cost[op, var] = float(cost)

    path = folder / "message_sizes.csv"
    messages = {}
    for line, row in read_rows(path, ["upstream", "downstream", "upstream_variant", "downstream_variant", "size_kib"]):
        if (row["upstream"], row["downstream"]) not in edges:
            raise InputError(path, f"row {line}", f"{row['upstream']},{row['downstream']}", "not an edge of logical_graph.csv")
        for col, node in (("upstream_variant", row["upstream"]), ("downstream_variant", row["downstream"])):
            if row[col] != DEFAULT and row[col] not in variants.get(node, []):
                raise InputError(path, f"row {line} {col}", row[col], f"unknown variant of {node}")
        key = (row["upstream"], row["downstream"], row["upstream_variant"], row["downstream_variant"])
        messages[key] = number(path, line, "size_kib", row["size_kib"])

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
