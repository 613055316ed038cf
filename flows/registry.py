"""The systems tierflow runs. Adding one is one line here: its package under ``flows/``, which
declares ``SYSTEM`` (a :class:`flows.system.System`)."""

from __future__ import annotations

import importlib

from flows.system import System

# the data products no one system owns (every system's flow validates its infrastructure spec)
PLATFORM_CONTRACTS = ("catalog.devices", "catalog.links", "infra.pools")

SYSTEMS = (
    "jellybean",
    "honeybee",
    "lazarus",
    "lmaas",
)


def systems() -> dict[str, System]:
    """Every registered system, by name, in the order above."""
    return {name: importlib.import_module(f"flows.{name}").SYSTEM for name in SYSTEMS}


def system(name: str) -> System:
    """One system by name; a ValueError naming the registered ones when there is none."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; the systems are {', '.join(SYSTEMS)}")
    return importlib.import_module(f"flows.{name}").SYSTEM
