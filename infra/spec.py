"""Infrastructure spec: the worker pools a system runs on, loaded from YAML.

A spec lists pools of identical machines, each in one tier and of one device kind::

    name: vqa-small
    pools:
      - {name: phones, tier: device, device: cpu-small, count: 2}
      - {name: cloud-gpu, tier: cloud, device: t4, count: 3}

The embedded cluster starts one Dask worker per pool; ``count`` is how many machines
the pool stands for (the optimizer places work on each of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.catalog import TIERS, load_catalog
from infra.errors import InputError

POOL_NAME = r"^[a-z0-9][a-z0-9_-]*$"


class Pool(BaseModel):
    """A group of identical machines in one tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=POOL_NAME)]
    tier: str
    device: str
    count: Annotated[int, Field(ge=1, le=10_000)] = 1

    @field_validator("tier")
    @classmethod
    def _known_tier(cls, tier: str) -> str:
        if tier not in TIERS:
            raise ValueError(f"unknown tier; expected one of {', '.join(TIERS)}")
        return tier

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        known = load_catalog().devices
        if device not in known:
            raise ValueError(f"unknown device; the catalog has {', '.join(sorted(known))}")
        return device

    def machine_names(self) -> list[str]:
        """Names of the individual machines this pool stands for."""
        return [self.name] if self.count == 1 else [f"{self.name}-{i}" for i in range(self.count)]

    def resources(self) -> dict[str, float]:
        """Dask resources the pool's worker advertises: one unit per machine."""
        return {f"tier-{self.tier}": self.count, f"device-{self.device}": self.count, f"pool-{self.name}": self.count}


class InfraSpec(BaseModel):
    """The pools of an infrastructure, lowest tier first once sorted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "infra"
    pools: Annotated[list[Pool], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_pool_names(self) -> "InfraSpec":
        seen: set[str] = set()
        for pool in self.pools:
            if pool.name in seen:
                raise ValueError(f"pool name {pool.name!r} is used twice")
            seen.add(pool.name)
        return self

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(f"no pool named {name!r}; pools: {', '.join(p.name for p in self.pools)}")

    def required_resources(self) -> dict[str, float]:
        """Every resource some pool's worker must advertise, with the amount needed."""
        needed: dict[str, float] = {}
        for pool in self.pools:
            for key, amount in pool.resources().items():
                needed[key] = needed.get(key, 0) + amount
        return needed


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _value_at(data: object, loc: tuple) -> object:
    for part in loc:
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def parse_infra_spec(data: object, source: str | Path = "<infra spec>") -> InfraSpec:
    """Validate an already-parsed spec; errors name the source, field and value."""
    try:
        return InfraSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        raise InputError(source, _location(loc) or "<root>", _value_at(data, loc), err["msg"]) from None


def load_infra_spec(path: str | Path) -> InfraSpec:
    """Read and validate an infrastructure spec YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "<file>", str(path), "file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise InputError(path, where, getattr(exc, "problem", None), f"malformed YAML: {exc}") from None
    return parse_infra_spec(data, path)
