"""Data contracts: a Great Expectations suite per data product, and one ``validate()``.

Each product (the device catalog, an infrastructure spec, a workflow spec, profiles, a
plan, an evaluation) registers a suite builder with :func:`contract`. Flows call
:func:`validate` at every stage boundary; ``tierflow contracts check`` runs it on every
shipped dataset. A failure raises :class:`ContractError` naming the product, the source
and each failed expectation with its unexpected values.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable

import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SuiteBuilder = Callable[[], list]
_SUITES: dict[str, SuiteBuilder] = {}


class ContractError(ValueError):
    """A data product broke its contract; ``failures`` lists what failed and the bad values."""

    def __init__(self, product: str, source: str, failures: list[str]):
        self.product, self.source, self.failures = product, source, failures
        super().__init__(f"{source}: breaks the {product!r} contract:\n" + "\n".join(f"  - {f}" for f in failures))


def contract(product: str) -> Callable[[SuiteBuilder], SuiteBuilder]:
    """Register a function returning the expectations of ``product``'s suite."""

    def register(builder: SuiteBuilder) -> SuiteBuilder:
        _SUITES[product] = builder
        return builder

    return register


def products() -> list[str]:
    _load_all()
    return sorted(_SUITES)


def _load_all() -> None:
    # Importing the modules registers their suites.
    from data_contracts import catalog, honeybee, infra, jellybean, lazarus, lmaas, shipped  # noqa: F401


@lru_cache(maxsize=1)
def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


@lru_cache(maxsize=None)
def suite(product: str):
    """The Great Expectations suite for ``product``."""
    import great_expectations as gx

    _load_all()
    if product not in _SUITES:
        raise KeyError(f"no contract for {product!r}; known: {', '.join(sorted(_SUITES))}")
    built = gx.ExpectationSuite(name=product)
    for expectation in _SUITES[product]():
        built.add_expectation(expectation)
    return built


def _describe(result) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
    what = f"{config.type}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    details = result.result or {}
    unexpected = details.get("partial_unexpected_list")
    if unexpected:
        return f"{what}: unexpected {unexpected[:10]!r}"
    if "observed_value" in details:
        return f"{what}: observed {details['observed_value']!r}"
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"{what}: {result.exception_info.get('exception_message')}"
    return what


def check(df: pd.DataFrame, product: str) -> list[str]:
    """Validate ``df`` against ``product``'s suite; the failures, empty when it holds."""
    context = _context()
    name = product.replace(".", "_")
    try:
        asset = context.data_sources.get("tierflow").get_asset(name)
    except (KeyError, LookupError, ValueError):
        try:
            source = context.data_sources.get("tierflow")
        except (KeyError, LookupError, ValueError):
            source = context.data_sources.add_pandas("tierflow")
        asset = source.add_dataframe_asset(name)
    try:
        definition = asset.get_batch_definition("whole")
    except (KeyError, LookupError, ValueError):
        definition = asset.add_batch_definition_whole_dataframe("whole")
    batch = definition.get_batch(batch_parameters={"dataframe": df})
    outcome = batch.validate(suite(product))
    return [_describe(r) for r in outcome.results if not r.success]


def validate(df: pd.DataFrame, product: str, source: object = "<data>") -> pd.DataFrame:
    """Return ``df`` unchanged if it meets ``product``'s contract, else raise ContractError."""
    failures = check(df, product)
    if failures:
        raise ContractError(product, str(source), failures)
    return df
