"""The device & tier catalog: what each device kind can do and what moving data between tiers costs.

The figures live in two CSV files beside this module; PROVENANCE.md says where each came from.

- ``devices.csv``: one row per device kind (peak TFLOP/s, memory, memory bandwidth, $/hour, TDP).
- ``links.csv``: one row per ordered pair of tiers, same-tier pairs included (bandwidth,
  one-way latency, $/GB charged for data sent from ``src_tier`` to ``dst_tier``).

``load_catalog()`` reads and checks both files once. A bad value raises ``CatalogError``
naming the file, the row (its line number; the header is row 1), the field and the value.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal

import pandas as pd
from pydantic import Field, StringConstraints, TypeAdapter, ValidationError

TIERS = ("device", "hub", "edge", "cloud")
DEVICE_KINDS = ("cpu", "edge", "gpu")
DEFAULT_DEVICES_PATH = Path(__file__).parent / "devices.csv"
DEFAULT_LINKS_PATH = Path(__file__).parent / "links.csv"

# Field types: pydantic checks them when a CSV row is read; constructing the dataclasses
# directly does not (inner code trusts what the loader produced).
Tier = Literal[TIERS]
DeviceKindName = Literal[DEVICE_KINDS]
DeviceName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]*$")]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Citation = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class CatalogError(ValueError):
    """A catalog file holds a bad value, or a look-up asked for something the catalog lacks.

    Attributes ``source`` (file), ``row`` (line number, header = 1), ``field`` and ``value``
    say where; each is None when it does not apply.
    """

    def __init__(self, message: str, *, source: object = None, row: int | None = None,
                 field: str | None = None, value: object = None):
        super().__init__(message)
        self.source = None if source is None else str(source)
        self.row, self.field, self.value = row, field, value


def tier_rank(tier: str) -> int:
    """Position of ``tier`` in device < hub < edge < cloud (0 for device)."""
    try:
        return TIERS.index(tier)
    except ValueError:
        raise CatalogError(f"unknown tier {tier!r}; tiers are {', '.join(TIERS)}",
                           field="tier", value=tier) from None


@dataclass(frozen=True)
class DeviceKind:
    """One kind of device: peak dense throughput, memory, price and power.

    tflops_fp16 is peak dense fp16/bf16 tensor TFLOP/s (no sparsity); tflops_fp32 peak fp32;
    memory_gbps memory bandwidth in GB/s; usd_per_hour the on-demand price of one device.
    """

    device: DeviceName
    kind: DeviceKindName
    tflops_fp16: Positive
    tflops_fp32: Positive
    memory_gib: Positive
    memory_gbps: Positive
    usd_per_hour: NonNegative
    tdp_watts: Positive
    source: Citation

    @property
    def effective_tflops(self) -> float:
        """The throughput ML work gets: fp16 tensor cores on accelerators, fp32 on CPUs."""
        return self.tflops_fp32 if self.kind == "cpu" else self.tflops_fp16


@dataclass(frozen=True)
class Link:
    """Data sent from ``src_tier`` to ``dst_tier``: bandwidth, one-way latency and $/GB."""

    src_tier: Tier
    dst_tier: Tier
    bandwidth_mbps: Positive
    latency_ms: NonNegative
    usd_per_gb: NonNegative
    source: Citation


@dataclass(frozen=True)
class Catalog:
    """Device kinds by name and links by (src_tier, dst_tier). Treat both dicts as read-only:
    the default catalog is shared by every caller of ``load_catalog()``."""

    devices: dict[str, DeviceKind]
    links: dict[tuple[str, str], Link]

    def device(self, name: str) -> DeviceKind:
        """The device kind called ``name``; CatalogError listing the known ones otherwise."""
        try:
            return self.devices[name]
        except KeyError:
            raise CatalogError(f"unknown device {name!r}; known devices: {', '.join(sorted(self.devices))}",
                               field="device", value=name) from None

    def link(self, src_tier: str, dst_tier: str) -> Link:
        """The link carrying data from ``src_tier`` to ``dst_tier`` (same tier allowed)."""
        tier_rank(src_tier)  # an unknown tier is reported by name, not as a missing link
        tier_rank(dst_tier)
        try:
            return self.links[(src_tier, dst_tier)]
        except KeyError:
            raise CatalogError(f"the catalog has no link {src_tier} -> {dst_tier}",
                               field="dst_tier", value=dst_tier) from None

    def speedup(self, from_device: str, to_device: str, bound: str = "compute") -> float:
        """How many times faster ``to_device`` runs a workload than ``from_device``.

        Parameters
        ----------
        from_device, to_device: device names in the catalog.
        bound: "compute" compares effective peak TFLOP/s (fp16 tensor for GPUs and edge
            boards, fp32 for CPUs); "memory" compares memory bandwidth.
        """
        if bound not in ("compute", "memory"):
            raise CatalogError(f"bound must be 'compute' or 'memory', got {bound!r}", field="bound", value=bound)
        old, new = self.device(from_device), self.device(to_device)
        if bound == "compute":
            return new.effective_tflops / old.effective_tflops
        return new.memory_gbps / old.memory_gbps

    def devices_frame(self) -> pd.DataFrame:
        """One row per device kind, with the columns of devices.csv."""
        return _frame(DeviceKind, self.devices.values())

    def links_frame(self) -> pd.DataFrame:
        """One row per link, with the columns of links.csv."""
        return _frame(Link, self.links.values())


def load_catalog(devices_path: str | os.PathLike | None = None,
                 links_path: str | os.PathLike | None = None) -> Catalog:
    """Read and check the device and link files; the shipped ones when no path is given.

    The shipped catalog is read once and shared. Raises CatalogError naming the file, row,
    field and value of the first bad entry, or the tier pair a links file leaves out.
    """
    if devices_path is None and links_path is None:
        return _shipped_catalog()
    return _read_catalog(Path(devices_path or DEFAULT_DEVICES_PATH), Path(links_path or DEFAULT_LINKS_PATH))


@functools.cache
def _shipped_catalog() -> Catalog:
    return _read_catalog(DEFAULT_DEVICES_PATH, DEFAULT_LINKS_PATH)


def _read_catalog(devices_path: Path, links_path: Path) -> Catalog:
    devices: dict[str, DeviceKind] = {}
    device_rows: dict[str, int] = {}
    for row, device in _read_rows(devices_path, DeviceKind):
        if device.device in devices:
            raise _bad_value(devices_path, row, "device", device.device,
                             f"device listed twice (first at row {device_rows[device.device]})")
        devices[device.device], device_rows[device.device] = device, row
    if not devices:
        raise CatalogError(f"{devices_path}: no devices listed", source=devices_path)

    links: dict[tuple[str, str], Link] = {}
    link_rows: dict[tuple[str, str], int] = {}
    for row, link in _read_rows(links_path, Link):
        pair = (link.src_tier, link.dst_tier)
        if pair in links:
            raise _bad_value(links_path, row, "dst_tier", link.dst_tier,
                             f"link {link.src_tier} -> {link.dst_tier} listed twice (first at row {link_rows[pair]})")
        links[pair], link_rows[pair] = link, row
    for src in TIERS:
        for dst in TIERS:
            if (src, dst) not in links:
                raise CatalogError(f"{links_path}: no link {src} -> {dst}; every ordered pair of tiers, "
                                   f"same-tier pairs included, needs a row", source=links_path)
    return Catalog(devices=devices, links=links)


def _read_rows(path: Path, record: type) -> Iterator[tuple[int, object]]:
    """Yield (row number, validated record) for each data row of a CSV whose columns are
    the fields of the dataclass ``record``."""
    columns = [f.name for f in dataclasses.fields(record)]
    adapter = TypeAdapter(record)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often prepend a BOM
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog file: {exc.strerror}", source=path) from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", source=path) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    for name in header:
        if name not in columns:
            raise _bad_value(path, 1, name, name, f"unknown column; expected {', '.join(columns)}")
    for name in columns:
        if name not in header:
            raise CatalogError(f"{path}: row 1: header lacks column {name!r}; expected {', '.join(columns)}",
                               source=path, row=1, field=name)
    for raw in reader:
        row = reader.line_num
        if None in raw:
            raise CatalogError(f"{path}: row {row}: {len(columns) + len(raw[None])} values but the header "
                               f"has {len(columns)} columns (extra: {raw[None]!r}); quote values that hold commas",
                               source=path, row=row, value=raw[None])
        for name in columns:
            if raw[name] is None:
                raise _bad_value(path, row, name, None, f"missing; the row has fewer than {len(columns)} values")
        values = {name: raw[name].strip() for name in columns}
        try:
            item = adapter.validate_python(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0])
            reason = error["msg"]
            if error["type"] == "string_pattern_mismatch":
                reason = "use lowercase letters, digits, '.' and '-' only (no spaces)"
            raise _bad_value(path, row, field, raw[field], reason) from None
        yield row, item


def _bad_value(path: Path, row: int, field: str, value: object, reason: str) -> CatalogError:
    return CatalogError(f"{path}: row {row}: field {field!r} = {value!r}: {reason}",
                        source=path, row=row, field=field, value=value)


def _frame(record: type, items) -> pd.DataFrame:
    columns = [f.name for f in dataclasses.fields(record)]
    return pd.DataFrame([dataclasses.asdict(item) for item in items], columns=columns)
