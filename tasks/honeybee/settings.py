"""HoneyBee's run settings and their checks (no Prefect here: the CLI checks them before starting anything)."""

from __future__ import annotations

from pathlib import Path

from infra.catalog import TIERS
from infra.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INFRA = ROOT / "data" / "honeybee.infra.yaml"


def check_settings(source: object, settings: dict) -> None:
    """Raise InputError naming the first bad setting (only the settings present are checked)."""
    budget = settings.get("storage_budget")
    if budget is not None and not (isinstance(budget, (int, float)) and budget >= 1.0):
        raise InputError(source, "storage_budget", budget, "must be a number ≥ 1.0: every document is stored at least once")
    target = settings.get("recall_target")
    if target is not None and not (isinstance(target, (int, float)) and 0 < target < 1):
        raise InputError(source, "recall_target", target, "must be a number in (0, 1), e.g. 0.95")
    k = settings.get("k")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise InputError(source, "k", k, "must be an integer ≥ 1")
    tier = settings.get("near_tier")
    if tier is not None and tier not in TIERS:
        raise InputError(source, "near_tier", tier, f"must be one of {', '.join(TIERS)}")
    gib = settings.get("max_index_gib")
    if gib is not None and not (isinstance(gib, (int, float)) and gib > 0):
        raise InputError(source, "max_index_gib", gib, "must be a number > 0 (GiB of index memory a strategy may use)")
