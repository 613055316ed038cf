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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from infra.catalog import TIERS, load_catalog
from infra.errors import from_validation_error, load_yaml

POOL_NAME = r"^[a-z0-9][a-z0-9_-]*$"


class Pool(BaseModel):
    """A group of identical machines in one tier.

    ``worker_per_machine``: the embedded cluster gives each machine its own worker process
    (named after the machine) instead of one worker for the pool — for systems where a
    machine must be able to fail alone (Lazarus's training nodes).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=POOL_NAME)]
    tier: str
    device: str
    count: Annotated[int, Field(ge=1, le=10_000)] = 1
    worker_per_machine: bool = False

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
        first_index: dict[str, int] = {}
        for index, pool in enumerate(self.pools):
            if pool.name in first_index:
                # The index travels in the error context so the loader can point at pools[i].name.
                raise PydanticCustomError(
                    "duplicate_pool_name",
                    "pool name '{name}' is used twice (first by pools[{first}])",
                    {"name": pool.name, "index": index, "first": first_index[pool.name]},
                )
            first_index[pool.name] = index
        kinds: dict[tuple[str, str], int] = {}
        for index, pool in enumerate(self.pools):
            # Tasks are routed by tier and device, which is all an external cluster advertises:
            # two pools alike in both would be one pool.
            if (pool.tier, pool.device) in kinds:
                raise PydanticCustomError(
                    "duplicate_pool_kind",
                    "pools[{first}] already has tier '{tier}' and device '{device}': merge them into one pool (count adds up)",
                    {"index": index, "first": kinds[pool.tier, pool.device], "tier": pool.tier, "device": pool.device},
                )
            kinds[pool.tier, pool.device] = index
        return self

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(f"no pool named {name!r}; pools: {', '.join(p.name for p in self.pools)}")

    def pools_frame(self) -> "pd.DataFrame":
        """The pools as the ``infra.pools`` contract's table."""
        import pandas as pd

        return pd.DataFrame([p.model_dump() for p in self.pools], columns=["name", "tier", "device", "count"])

    def required_resources(self) -> dict[str, float]:
        """Every resource some pool's worker must advertise, with the amount needed."""
        needed: dict[str, float] = {}
        for pool in self.pools:
            for key, amount in pool.resources().items():
                needed[key] = needed.get(key, 0) + amount
        return needed


def parse_infra_spec(data: object, source: str | Path = "<infra spec>") -> InfraSpec:
    """Validate an already-parsed spec; errors name the source, field and value."""
    try:
        return InfraSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # A whole-spec check: point at the repeated name.
        loc = {"duplicate_pool_name": ("pools", err.get("ctx", {}).get("index"), "name"),
               "duplicate_pool_kind": ("pools", err.get("ctx", {}).get("index"), "device")}.get(err["type"])
        raise from_validation_error(source, exc, data, loc) from None


def load_infra_spec(path: str | Path) -> InfraSpec:
    """Read and validate an infrastructure spec YAML file."""
    return parse_infra_spec(load_yaml(path), Path(path))
