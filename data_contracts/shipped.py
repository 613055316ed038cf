"""Every dataset the repository ships, as (path, product, frame), and their contract check.

What is shipped:

- ``infra/catalog/devices.csv`` (``catalog.devices``) and ``infra/catalog/links.csv``
  (``catalog.links``), CSVs with a header;
- every JellyBean optimizer-input folder under ``data/`` (a folder holding
  ``logical_graph.csv``): its headerless CSVs and its accuracy table (see
  :data:`JELLYBEAN_TABLES`);
- every infrastructure spec ``data/**/*.infra.yaml``, as its pools table (``infra.pools``);
- every workflow spec ``data/**/*.workflow.yaml``, as its nodes table (``jellybean.workflow``);
- every spot-instance trace ``data/spot-traces/*.csv`` (``lazarus.spot_trace``), headerless;
- the MoE training text ``data/moe-corpus.txt`` (``moe.corpus``), as its non-blank lines.

Headerless CSVs are read as the JellyBean loader reads them: cells stripped, blank lines
skipped, trailing empty fields dropped (one shipped row ends in a comma). Numeric cells
that do not parse stay text, so the contract reports them by value. A file that cannot be
read as a table at all raises :class:`UnreadableDataset`; :func:`check_shipped` reports it
as that dataset's failure.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from data_contracts import check

# file name → (product, columns, numeric columns) for a JellyBean optimizer-input folder.
JELLYBEAN_TABLES: dict[str, tuple[str, list[str], list[str]]] = {
    "message_sizes.csv": (
        "jellybean.message_sizes",
        ["upstream", "downstream", "upstream_variant", "downstream_variant", "size_kib"],
        ["size_kib"],
    ),
    "workers_specs.csv": ("jellybean.workers_specs", ["worker", "usd_per_hour"], ["usd_per_hour"]),
    "workers_workers_link.csv": ("jellybean.links", ["src", "dst", "usd_per_gb"], ["usd_per_gb"]),
    "sources_workers_link.csv": ("jellybean.links", ["src", "dst", "usd_per_gb"], ["usd_per_gb"]),
    "input_injection_rates.csv": ("jellybean.rates", ["source", "rate"], ["rate"]),
    "logical_graph.csv": ("jellybean.graph", ["upstream", "downstream"], []),
}
EXECUTION_PROFILE = ("jellybean.execution_profile", ["operator", "worker", "variant", "latency_ms"], ["latency_ms"])
POOL_COLUMNS = ["name", "tier", "device", "count"]
SPOT_TRACE = ("lazarus.spot_trace", ["time_ms", "event", "node"], ["time_ms"])

Reader = Callable[[Path], pd.DataFrame]


class UnreadableDataset(ValueError):
    """A shipped file cannot be read as a table; the message names the file and what is wrong.

    For a bad CSV row, ``line``, ``text`` and ``reason`` say which row, what it holds and why.
    """

    def __init__(self, message: str, *, line: int | None = None, text: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.line, self.text, self.reason = line, text, reason


def read_headerless_csv(path: Path, columns: list[str], numeric: list[str] = ()) -> pd.DataFrame:
    """A headerless CSV as a frame with ``columns``, indexed by line number.

    ``numeric`` columns are parsed where they parse. A trailing empty field is allowed
    (the JellyBean repository's files have one).
    """
    rows, lines = [], []
    with open(path, newline="") as fh:
        for line_no, raw in enumerate(csv.reader(fh), start=1):
            if not raw or all(not cell.strip() for cell in raw):
                continue
            while len(raw) > len(columns) and not raw[-1].strip():
                raw = raw[:-1]
            if len(raw) != len(columns):
                reason = f"expected {len(columns)} fields ({', '.join(columns)}), got {len(raw)}"
                raise UnreadableDataset(f"{path}: row {line_no}: {','.join(raw)!r}: {reason}",
                                        line=line_no, text=",".join(raw), reason=reason)
            rows.append([cell.strip() for cell in raw])
            lines.append(line_no)
    frame = pd.DataFrame(rows, columns=columns, dtype=object, index=pd.Index(lines, name="line"))
    for column in numeric:
        frame[column] = _numbers(frame[column])
    return frame


def _numbers(texts: pd.Series) -> pd.Series:
    values = [_number(t) for t in texts]
    if all(isinstance(v, float) for v in values):
        return pd.Series(values, index=texts.index, dtype="float64")
    return pd.Series(values, index=texts.index, dtype=object)


def _number(text: object) -> object:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def read_accuracy_table(path: Path) -> pd.DataFrame:
    """``end_to_end_accuracy`` of an accuracy_profiles.json: one column per operator, combination, accuracy."""
    try:
        e2e = json.loads(path.read_text())["end_to_end_accuracy"]
        operators = [str(op) for op in e2e["operators"]]
        records = []
        for entry in e2e["table"]:
            variants = [str(v) for v in entry["variants"]]
            if len(variants) != len(operators):
                raise UnreadableDataset(f"{path}: end_to_end_accuracy.table: {variants} has {len(variants)} variants "
                                        f"for {len(operators)} operators")
            records.append({**dict(zip(operators, variants)), "combination": "+".join(variants),
                            "accuracy": _number(entry["accuracy"])})
    except json.JSONDecodeError as exc:
        raise UnreadableDataset(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    except (KeyError, TypeError) as exc:
        raise UnreadableDataset(f"{path}: expected end_to_end_accuracy.operators and .table[{{variants, accuracy}}] "
                                f"(missing or malformed: {exc})") from None
    frame = pd.DataFrame.from_records(records, columns=[*operators, "combination", "accuracy"])
    frame["accuracy"] = _numbers(frame["accuracy"])
    return frame


def read_infra_pools(path: Path) -> pd.DataFrame:
    """An infrastructure spec's pools as a table (name, tier, device, count; count defaults to 1)."""
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UnreadableDataset(f"{path}: malformed YAML: {exc}") from None
    pools = spec.get("pools") if isinstance(spec, dict) else None
    if not isinstance(pools, list) or not all(isinstance(p, dict) for p in pools):
        raise UnreadableDataset(f"{path}: pools: expected a list of {{name, tier, device, count}}, got {pools!r}")
    return pd.DataFrame([{"count": 1, **pool} for pool in pools], columns=POOL_COLUMNS)


def read_workflow_nodes(path: Path) -> pd.DataFrame:
    """A JellyBean workflow spec's nodes as a table (node, kind, inputs, variants, rate)."""
    try:
        spec = yaml.safe_load(path.read_text())
        sources, operators = spec["sources"], spec["operators"]
        rows = [{"node": n, "kind": "source", "inputs": "", "variants": 1, "rate": s.get("rate")} for n, s in sources.items()]
        rows += [{"node": n, "kind": "operator", "inputs": "+".join(o.get("inputs") or []),
                  "variants": len(o.get("variants") or []), "rate": 0.0} for n, o in operators.items()]
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise UnreadableDataset(f"{path}: not a workflow spec (sources, operators): {exc}") from None
    return pd.DataFrame(rows, columns=["node", "kind", "inputs", "variants", "rate"])


def read_text_lines(path: Path) -> pd.DataFrame:
    """A text file's non-blank lines, numbered from 1 (``line_no``, ``line``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableDataset(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    rows = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return pd.DataFrame(rows, columns=["line_no", "line"])


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV with a header row."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UnreadableDataset(f"{path}: not a readable CSV: {exc}") from None


def _headerless(columns: list[str], numeric: list[str]) -> Reader:
    return lambda path: read_headerless_csv(path, columns, numeric)


def _jellybean_folder(folder: Path) -> list[tuple[Path, str, Reader]]:
    product, columns, numeric = EXECUTION_PROFILE
    found = [(path, product, _headerless(columns, numeric)) for path in sorted(folder.glob("execution_profile*.csv"))]
    for name, (product, columns, numeric) in JELLYBEAN_TABLES.items():
        if (folder / name).is_file():
            found.append((folder / name, product, _headerless(columns, numeric)))
    if (folder / "accuracy_profiles.json").is_file():
        found.append((folder / "accuracy_profiles.json", "jellybean.accuracy_table", read_accuracy_table))
    return found


def _shipped(root: Path) -> list[tuple[Path, str, Reader]]:
    found: list[tuple[Path, str, Reader]] = []
    for name, product in (("devices.csv", "catalog.devices"), ("links.csv", "catalog.links")):
        path = root / "infra" / "catalog" / name
        if path.is_file():
            found.append((path, product, read_csv))
    data = root / "data"
    for graph in sorted(data.rglob("logical_graph.csv")):
        found.extend(_jellybean_folder(graph.parent))
    for spec in sorted(data.rglob("*.infra.yaml")):
        found.append((spec, "infra.pools", read_infra_pools))
    for spec in sorted(data.rglob("*.workflow.yaml")):
        found.append((spec, "jellybean.workflow", read_workflow_nodes))
    product, columns, numeric = SPOT_TRACE
    for trace in sorted((data / "spot-traces").glob("*.csv")):
        found.append((trace, product, _headerless(columns, numeric)))
    if (data / "moe-corpus.txt").is_file():
        found.append((data / "moe-corpus.txt", "moe.corpus", read_text_lines))
    return found


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def shipped_datasets(root: Path) -> list[tuple[str, str, pd.DataFrame]]:
    """(path relative to ``root``, product, frame) for every shipped dataset.

    Raises :class:`UnreadableDataset` when a file cannot be read as a table.
    """
    root = Path(root)
    return [(_relative(path, root), product, read(path)) for path, product, read in _shipped(root)]


def check_shipped(root: Path) -> list[tuple[str, str, list[str]]]:
    """(path relative to ``root``, product, failures) for every shipped dataset; failures empty when it holds."""
    root = Path(root)
    results = []
    for path, product, read in _shipped(root):
        try:
            failures = check(read(path), product)
        except UnreadableDataset as exc:
            failures = [str(exc)]
        results.append((_relative(path, root), product, failures))
    return results
