"""``tierflow lmaas …``: the multi-tenant LoRA serving service from the command line.

- ``serve``: the OpenAI-compatible service; ``model`` is ``base`` or ``<tenant>/<adapter>``;
- ``tenant add|list|remove|key``: tenants, their quotas and SLOs, and their API keys;
- ``adapter add|list|remove``: a tenant's LoRA adapters (PEFT folders, checked before anything is
  stored);
- ``usage``: one tenant's metered usage and how often its latency objectives were met.

State lives in a real database (``--db``: SQLite under ``$TIERFLOW_HOME/lmaas`` by default, or any
SQLAlchemy URL such as ``postgresql+psycopg://…``) and adapter files in the artifact store
(``--store``: a folder by default, or ``s3://bucket/prefix``). Nothing imports Prefect here.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console

from flows.console import fail
from rich.table import Table

lmaas_app = typer.Typer(help="LMaaS: multi-tenant serving of one base model with many LoRA adapters.",
                        no_args_is_help=True)
tenant_app = typer.Typer(help="tenants, their quotas and their API keys", no_args_is_help=True)
adapter_app = typer.Typer(help="tenants' LoRA adapters", no_args_is_help=True)
lmaas_app.add_typer(tenant_app, name="tenant")
lmaas_app.add_typer(adapter_app, name="adapter")

DB_HELP = "SQLAlchemy database URL (default: sqlite under $TIERFLOW_HOME/lmaas)"
STORE_HELP = "artifact store for adapter files: a folder or s3://bucket/prefix (default: $TIERFLOW_HOME/lmaas/store)"
MODEL_HELP = "the base model: a Llama .gguf file or safetensors folder (default: the shipped SmolLM2-135M-Instruct)"


def _registry(db: str | None, store: str | None, model: str | None = None, *, with_model: bool = False):
    """The registry; ``with_model`` also reads the base model's config, to check adapters against."""
    from infra.prefect_server import tierflow_home
    from infra.store import StoreError, open_store
    from tasks.lmaas.registry import Registry

    home = tierflow_home() / "lmaas"
    home.mkdir(parents=True, exist_ok=True)
    config = None
    if with_model:
        from tasks.lm.weights import ModelLoadError, load_config

        try:
            config = load_config(model)
        except ModelLoadError as exc:
            fail(str(exc))
    try:
        return Registry(db or f"sqlite:///{home / 'registry.db'}", open_store(store or home / "store", create_bucket=True),
                        config)
    except StoreError as exc:
        fail(str(exc))
    except Exception as exc:  # an unreachable or malformed database URL
        fail(f"--db {db!r}: {exc}")


def _refusing():
    """Turn the registry's and the adapter checker's refusals into a clean exit."""
    import sys
    from contextlib import contextmanager

    from tasks.lmaas.registry import RegistryError

    @contextmanager
    def guard():
        try:
            yield
        except Exception as exc:
            lora = sys.modules.get("tasks.lm.lora")  # an adapter can be refused only once it is imported (torch)
            if isinstance(exc, RegistryError) or (lora is not None and isinstance(exc, lora.AdapterError)):
                fail(str(exc))
            raise

    return guard()


# --- tenants --------------------------------------------------------------------------------------
@tenant_app.command("add")
def tenant_add(
    name: str = typer.Argument(..., help="tenant name"),
    max_concurrent: int = typer.Option(8, help="requests in flight at once"),
    tokens_per_minute: int = typer.Option(60_000, help="prompt + completion tokens per minute"),
    ttft_slo_s: float = typer.Option(2.0, help="time-to-first-token objective, seconds"),
    tpot_slo_s: float = typer.Option(0.2, help="time-per-output-token objective, seconds"),
    db: str = typer.Option(None, help=DB_HELP),
    store: str = typer.Option(None, help=STORE_HELP),
) -> None:
    """Add a tenant and print its first API key (shown only now)."""
    registry = _registry(db, store)
    with _refusing():
        tenant, key = registry.add_tenant(name, max_concurrent=max_concurrent, tokens_per_minute=tokens_per_minute,
                                          ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)
    print(json.dumps({"tenant": tenant.name, "api_key": key}))


@tenant_app.command("key")
def tenant_key(name: str, db: str = typer.Option(None, help=DB_HELP), store: str = typer.Option(None, help=STORE_HELP)) -> None:
    """Make another API key for a tenant (shown only now)."""
    registry = _registry(db, store)
    with _refusing():
        print(json.dumps({"tenant": name, "api_key": registry.add_key(name)}))


@tenant_app.command("list")
def tenant_list(db: str = typer.Option(None, help=DB_HELP), store: str = typer.Option(None, help=STORE_HELP),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Tenants with their quotas and objectives."""
    tenants = _registry(db, store).tenants()
    if as_json:
        print(json.dumps([t.__dict__ for t in tenants]))
        return
    table = Table("tenant", "in flight", "tokens/min", "TTFT SLO", "TPOT SLO")
    for t in tenants:
        table.add_row(t.name, str(t.max_concurrent), str(t.tokens_per_minute), f"{t.ttft_slo_s} s", f"{t.tpot_slo_s} s")
    Console().print(table)


@tenant_app.command("remove")
def tenant_remove(name: str, db: str = typer.Option(None, help=DB_HELP), store: str = typer.Option(None, help=STORE_HELP)) -> None:
    """Remove a tenant with its keys, adapters (files too) and usage."""
    registry = _registry(db, store)
    with _refusing():
        registry.remove_tenant(name)
    Console(stderr=True).print(f"removed tenant {name}")


# --- adapters -------------------------------------------------------------------------------------
@adapter_app.command("add")
def adapter_add(
    tenant: str = typer.Argument(..., help="the owning tenant"),
    name: str = typer.Argument(..., help="adapter name: served as <tenant>/<name>"),
    folder: str = typer.Argument(..., help="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)"),
    model: str = typer.Option(None, help=MODEL_HELP),
    db: str = typer.Option(None, help=DB_HELP),
    store: str = typer.Option(None, help=STORE_HELP),
) -> None:
    """Check an adapter against the base model, store it and register it."""
    registry = _registry(db, store, model, with_model=True)
    with _refusing():
        info = registry.register_adapter(tenant, name, folder)
    print(json.dumps({"model": info.model, "rank": info.rank, "targets": list(info.targets), "params": info.n_params}))


@adapter_app.command("list")
def adapter_list(tenant: str = typer.Argument(None, help="one tenant's (default: all)"),
                 db: str = typer.Option(None, help=DB_HELP), store: str = typer.Option(None, help=STORE_HELP),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered adapters."""
    registry = _registry(db, store)
    with _refusing():
        adapters = registry.adapters(tenant)
    if as_json:
        print(json.dumps([{"model": a.model, "rank": a.rank, "targets": list(a.targets), "params": a.n_params}
                          for a in adapters]))
        return
    table = Table("model", "rank", "targets", "params")
    for a in adapters:
        table.add_row(a.model, str(a.rank), ",".join(a.targets), f"{a.n_params:,}")
    Console().print(table)


@adapter_app.command("remove")
def adapter_remove(tenant: str, name: str, db: str = typer.Option(None, help=DB_HELP),
                   store: str = typer.Option(None, help=STORE_HELP)) -> None:
    """Unregister an adapter and delete its files."""
    registry = _registry(db, store)
    with _refusing():
        registry.remove_adapter(tenant, name)
    Console(stderr=True).print(f"removed {tenant}/{name}")


@lmaas_app.command("usage")
def usage(tenant: str, last: float = typer.Option(None, help="only the last this many seconds"),
          db: str = typer.Option(None, help=DB_HELP), store: str = typer.Option(None, help=STORE_HELP)) -> None:
    """One tenant's metered usage (requests, tokens, cost) per model and its latency objectives'
    attainment (TTFT, TPOT, both; median and p99), as JSON."""
    import time

    registry = _registry(db, store)
    with _refusing():
        print(json.dumps(registry.usage(registry.tenant(tenant), since=None if last is None else time.time() - last),
                         indent=2))


# --- the service ----------------------------------------------------------------------------------
@lmaas_app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    model: str = typer.Option(None, help=MODEL_HELP),
    lora_slots: int = typer.Option(16, help="adapters resident in the engine's pool at once"),
    lora_rank: int = typer.Option(16, help="the largest adapter rank served"),
    max_host_adapters: int = typer.Option(1024, help="adapters kept in host memory (the rest stay in the store)"),
    price_per_hour: float = typer.Option(None, help="$/hour of this worker, for metering (default: the catalog's CPU price)"),
    max_queue: int = typer.Option(256, help="requests in flight beyond which new ones get 429"),
    db: str = typer.Option(None, help=DB_HELP),
    store: str = typer.Option(None, help=STORE_HELP),
) -> None:
    """Serve base + every tenant's adapters over an OpenAI-compatible API until Ctrl-C."""
    from tasks.lm.engine import LMEngine
    from tasks.lm.lora import MODULES
    from tasks.lm.server import serve as serve_app
    from tasks.lm.weights import ModelLoadError
    from tasks.lmaas.service import create_service_app, default_price_per_hour

    registry = _registry(db, store, model, with_model=True)
    try:
        with Console(stderr=True).status("loading the base model…"):
            engine = LMEngine.load(model, lora_slots=lora_slots, lora_rank=lora_rank, lora_targets=tuple(MODULES),
                                   max_host_adapters=max_host_adapters)
    except ModelLoadError as exc:
        fail(str(exc))
    price = default_price_per_hour() if price_per_hour is None else price_per_hour
    Console(stderr=True).print(f"serving base + {len(registry.adapters())} adapters at http://{host}:{port}/v1 "
                               f"(model: 'base' or '<tenant>/<adapter>'; metered at ${price}/hour)")
    serve_app(create_service_app(registry, engine, price_per_hour=price, max_queue=max_queue), host=host, port=port)
