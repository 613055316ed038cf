"""The tierflow JellyBean workflow spec (YAML), and the problem it makes with an infrastructure.

::

    name: vqa
    sources:
      ReadImage: {rate: 40, tier: device}
    operators:
      ExtractImageFeature: {inputs: [ReadImage], variants: [resnet18, resnet50]}
    accuracy:
      target: 56.0
      profiles: jellybean-vqa/accuracy_profiles.json   # end-to-end table (relative paths: from this file)
    messages: jellybean-vqa/message_sizes.csv           # KiB per request, the repository's format

Latency comes from the PROFILE stage (measured on the tier workers, scaled to each
pool's device by the catalog); prices and link costs come from the catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.catalog import Catalog, tier_rank
from infra.errors import InputError, from_validation_error, load_yaml
from infra.spec import InfraSpec
from optimizers.jellybean import AccuracyProduct, AccuracyTable, JellyBeanProblem, Pool
from tasks.jellybean.defaults import DATA, DEFAULT_INFRA, DEFAULT_WORKFLOW  # noqa: F401 - re-exported
from tasks.jellybean.inputs import find_cycle, read_accuracy_table, read_message_sizes

Tier = Annotated[str, Field(pattern=r"^(device|hub|edge|cloud)$")]


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: Annotated[float, Field(gt=0)]
    tier: Tier = "device"


class Operator(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Annotated[list[str], Field(min_length=1)]
    variants: Annotated[list[str], Field(min_length=1)]
    accuracy: dict[str, Annotated[float, Field(gt=0, le=100)]] | None = None  # per-variant (product model)


class Accuracy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: Annotated[float, Field(gt=0, le=100)]
    profiles: str | None = None  # accuracy_profiles.json with an end-to-end table


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "workflow"
    sources: Annotated[dict[str, Source], Field(min_length=1)]
    operators: Annotated[dict[str, Operator], Field(min_length=1)]
    accuracy: Accuracy
    messages: str | None = None
    path: str = ""

    def edges(self) -> list[tuple[str, str]]:
        return [(u, op) for op, spec in self.operators.items() for u in spec.inputs]

    def nodes_frame(self) -> pd.DataFrame:
        """The nodes as the ``jellybean.workflow`` contract's table."""
        rows = [{"node": n, "kind": "source", "inputs": "", "variants": 1, "rate": s.rate} for n, s in self.sources.items()]
        rows += [{"node": n, "kind": "operator", "inputs": "+".join(o.inputs), "variants": len(o.variants), "rate": 0.0}
                 for n, o in self.operators.items()]
        return pd.DataFrame(rows)


def load_workflow(path: str | Path, *, rate: float | None = None) -> WorkflowSpec:
    """Read and check a workflow spec; errors name the file, the field and the value."""
    path = Path(path)
    data = load_yaml(path)
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(path, exc, data) from None
    spec.path = str(path)
    nodes = set(spec.sources) | set(spec.operators)
    for op, op_spec in spec.operators.items():
        for i, u in enumerate(op_spec.inputs):
            if u not in nodes:
                raise InputError(path, f"operators.{op}.inputs", u, "unknown node (not a source or operator)")
            if u in op_spec.inputs[:i]:
                raise InputError(path, f"operators.{op}.inputs", u, "input listed twice")
        if op_spec.accuracy:
            for var in op_spec.accuracy:
                if var not in op_spec.variants:
                    raise InputError(path, f"operators.{op}.accuracy", var, "not one of the operator's variants")
    for s in spec.sources:
        if s in spec.operators:
            raise InputError(path, "sources", s, "a node cannot be both a source and an operator")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise InputError("--rate", "rate", rate, "must be a number > 0")
        for s in spec.sources.values():
            s.rate = float(rate)
    cycle = find_cycle(spec.edges())
    if cycle:
        u, v = cycle[-1]
        raise InputError(path, f"operators.{v}.inputs", u,
                         f"closes a cycle {' → '.join([*(a for a, _ in cycle), cycle[0][0]])}; a workflow must be acyclic")
    return spec


def _resolve(spec: WorkflowSpec, relative: str) -> Path:
    return (Path(spec.path).parent / relative).resolve()


def accuracy_model(spec: WorkflowSpec) -> AccuracyTable | AccuracyProduct:
    """The end-to-end table named by the spec, else the product of per-variant accuracies."""
    if spec.accuracy.profiles:
        path = _resolve(spec, spec.accuracy.profiles)
        ops, table, _ = read_accuracy_table(path)
        for op in ops:
            if op not in spec.operators:
                raise InputError(path, "end_to_end_accuracy.operators", op, "not an operator of the workflow")
        # Rows for variants the workflow does not offer are dropped: a workflow may offer a subset.
        table = {combo: acc for combo, acc in table.items()
                 if all(v in spec.operators[op].variants for op, v in zip(ops, combo))}
        if not table:
            raise InputError(path, "end_to_end_accuracy.table", 0, "no row uses only the workflow's variants")
        return AccuracyTable(ops, table)
    accuracies = {}
    for op, op_spec in spec.operators.items():
        for var in op_spec.variants:
            if op_spec.accuracy is None or var not in op_spec.accuracy:
                raise InputError(spec.path, f"operators.{op}.accuracy", var, "missing: give accuracy.profiles or every variant's accuracy")
            accuracies[op, var] = op_spec.accuracy[var]
    return AccuracyProduct(accuracies)


def message_sizes(spec: WorkflowSpec) -> dict[tuple[str, str, str, str], float]:
    if not spec.messages:
        return {}
    variants = {op: o.variants for op, o in spec.operators.items()}
    return read_message_sizes(_resolve(spec, spec.messages), spec.edges(), variants, subset=True)


def build_problem(spec: WorkflowSpec, infra: InfraSpec, profile: pd.DataFrame, catalog: Catalog) -> JellyBeanProblem:
    """The optimizer's input: the workflow on the infrastructure, timed by the profile.

    ``profile`` has one row per (pool, operator, variant) with ``latency_ms`` on that
    pool's device. A missing row is an error naming the triple.
    """
    latency = {(r.operator, r.pool, r.variant): float(r.latency_ms) for r in profile.itertuples()}
    for pool in infra.pools:
        for op, op_spec in spec.operators.items():
            for var in op_spec.variants:
                if (op, pool.name, var) not in latency:
                    raise InputError("profile", "operator,pool,variant", f"{op},{pool.name},{var}", "missing profile")
    pools = [
        Pool(p.name, tier_rank(p.tier), catalog.device(p.device).usd_per_hour, p.count, device=p.device) for p in infra.pools
    ]
    places = {s: tier_rank(src.tier) for s, src in spec.sources.items()}
    links = {}
    tier_name = {p.name: p.tier for p in infra.pools}
    tier_name.update({s: src.tier for s, src in spec.sources.items()})
    for a in [*spec.sources, *(p.name for p in infra.pools)]:
        for b in infra.pools:
            links[a, b.name] = catalog.link(tier_name[a], b.tier).usd_per_gb
    return JellyBeanProblem(
        sources={s: src.rate for s, src in spec.sources.items()},
        source_tier=places,
        edges=spec.edges(),
        ratios={},
        variants={op: list(o.variants) for op, o in spec.operators.items()},
        relative_cost={},
        pools=pools,
        latency_ms=latency,
        message_kib=message_sizes(spec),
        link_usd_per_gb=links,
        accuracy=accuracy_model(spec),
        accuracy_target=spec.accuracy.target,
        name=spec.name,
    )
