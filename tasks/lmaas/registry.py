"""The LMaaS control plane's state: tenants, their API keys, their LoRA adapters and their usage.

A real database through SQLAlchemy: SQLite by default (a file under ``TIERFLOW_HOME``), PostgreSQL
(or anything SQLAlchemy speaks) by URL. Adapter files live in the artifact store (a local folder or
S3); the database holds where, and their checksum.

- An API key is shown once, when it is made; the database keeps its SHA-256 and a short prefix.
- Registering an adapter checks the folder against the base model first (:func:`load_adapter`),
  then uploads it, then records it in one transaction; if any step fails nothing stays behind.
- A model name is ``base`` or ``<tenant>/<adapter>``. :meth:`Registry.resolve` answers for one
  tenant: its own adapter, or :class:`AccessDenied` for any other tenant's name — whether or not it
  exists, so a key learns nothing about other tenants — or :class:`UnknownModel`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (Float, ForeignKey, Integer, String, UniqueConstraint, create_engine, func, select)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from typing import TYPE_CHECKING

from infra.store import ArtifactStore

if TYPE_CHECKING:  # torch only where adapters are read: managing tenants stays quick from the CLI
    from tasks.lm.lora import LoraAdapter
    from tasks.lm.weights import LlamaConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # a PEFT folder (tasks.lm.lora)

BASE_MODEL = "base"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_PREFIX = "tfk-"


class RegistryError(ValueError):
    """A request the registry refuses; the message names the field and the value."""


class UnknownModel(RegistryError):
    pass


class AccessDenied(RegistryError):
    pass


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_concurrent: Mapped[int] = mapped_column(Integer, default=8)  # requests in flight at once
    tokens_per_minute: Mapped[int] = mapped_column(Integer, default=60_000)  # prompt + completion
    ttft_slo_s: Mapped[float] = mapped_column(Float, default=2.0)  # time to first token
    tpot_slo_s: Mapped[float] = mapped_column(Float, default=0.2)  # time per output token
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    store_prefix: Mapped[str] = mapped_column(String(512))  # where its two files are in the artifact store
    sha256: Mapped[str] = mapped_column(String(64))  # of the weights file
    rank: Mapped[int] = mapped_column(Integer)
    targets: Mapped[str] = mapped_column(String(128))  # comma-separated module names
    n_params: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Usage(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(160))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    ttft_s: Mapped[float] = mapped_column(Float)
    latency_s: Mapped[float] = mapped_column(Float)
    cost_usd: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float] = mapped_column(Float, default=time.time)


@dataclass(frozen=True)
class TenantInfo:
    id: int
    name: str
    max_concurrent: int
    tokens_per_minute: int
    ttft_slo_s: float
    tpot_slo_s: float


@dataclass(frozen=True)
class AdapterInfo:
    tenant: str
    name: str
    store_prefix: str
    sha256: str
    rank: int
    targets: tuple[str, ...]
    n_params: int

    @property
    def model(self) -> str:
        return f"{self.tenant}/{self.name}"


def slo_attainment(requests, ttft_slo_s: float, tpot_slo_s: float) -> dict:
    """How ``requests`` — (time to first token, latency, completion tokens) each — met a tenant's
    objectives: the share within the TTFT objective, within the TPOT objective (time per output
    token after the first; a one-token answer has none and meets it), and within both; with the
    median and 99th percentile of each."""
    ttfts = [ttft for ttft, _, _ in requests]
    tpots = [(latency - ttft) / (tokens - 1) if tokens > 1 else 0.0 for ttft, latency, tokens in requests]
    n = len(ttfts)

    def pct(values: list[float], q: float) -> float | None:
        ordered = sorted(values)
        return ordered[min(n - 1, int(q * n))] if n else None
    ttft_ok = [t <= ttft_slo_s for t in ttfts]
    tpot_ok = [t <= tpot_slo_s for t in tpots]
    return {"ttft_slo_s": ttft_slo_s, "tpot_slo_s": tpot_slo_s, "requests": n,
            "ttft_attainment": sum(ttft_ok) / n if n else None, "tpot_attainment": sum(tpot_ok) / n if n else None,
            "attainment": sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / n if n else None,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
            "tpot_p50_s": pct(tpots, 0.5), "tpot_p99_s": pct(tpots, 0.99)}


def _tenant_info(t: Tenant) -> TenantInfo:
    return TenantInfo(t.id, t.name, t.max_concurrent, t.tokens_per_minute, t.ttft_slo_s, t.tpot_slo_s)


def _adapter_info(tenant: str, a: Adapter) -> AdapterInfo:
    return AdapterInfo(tenant, a.name, a.store_prefix, a.sha256, a.rank, tuple(a.targets.split(",")), a.n_params)


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check_name(field: str, value: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise RegistryError(f"{field} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                            f"or digit (got {value!r})")
    return value


class Registry:
    """Tenants, keys, adapters and usage in the database at ``url``; adapter files in ``store``;
    adapters checked against ``base_config`` (needed only to register or fetch adapters)."""

    def __init__(self, url: str, store: ArtifactStore, base_config: LlamaConfig | None = None):
        if url.startswith(("postgresql://", "postgres://")):  # SQLAlchemy's default driver there is psycopg2
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self.url, self.store, self.base_config = url, store, base_config
        self.engine = create_engine(url)
        Base.metadata.create_all(self.engine)

    # --- tenants and keys ------------------------------------------------------------------------
    def add_tenant(self, name: str, *, max_concurrent: int = 8, tokens_per_minute: int = 60_000,
                   ttft_slo_s: float = 2.0, tpot_slo_s: float = 0.2) -> tuple[TenantInfo, str]:
        """A new tenant and its first API key (returned once; only its hash is kept)."""
        _check_name("tenant", name)
        for field, value in (("max_concurrent", max_concurrent), ("tokens_per_minute", tokens_per_minute)):
            if not isinstance(value, int) or value < 1:
                raise RegistryError(f"{field} must be a positive integer (got {value!r})")
        for field, value in (("ttft_slo_s", ttft_slo_s), ("tpot_slo_s", tpot_slo_s)):
            if not value > 0:
                raise RegistryError(f"{field} must be positive (got {value!r})")
        with Session(self.engine) as session:
            tenant = Tenant(name=name, max_concurrent=max_concurrent, tokens_per_minute=tokens_per_minute,
                            ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)
            session.add(tenant)
            try:
                session.flush()
            except IntegrityError:
                raise RegistryError(f"tenant {name!r} already exists") from None
            key = self._new_key(session, tenant.id)
            session.commit()
            return _tenant_info(tenant), key

    def _new_key(self, session: Session, tenant_id: int) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(24)
        session.add(ApiKey(tenant_id=tenant_id, sha256=_hash_key(key), prefix=key[:10]))
        return key

    def add_key(self, tenant: str) -> str:
        with Session(self.engine) as session:
            key = self._new_key(session, self._tenant(session, tenant).id)
            session.commit()
            return key

    def tenant(self, name: str) -> TenantInfo:
        with Session(self.engine) as session:
            return _tenant_info(self._tenant(session, name))

    def _tenant(self, session: Session, name: str) -> Tenant:
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise RegistryError(f"no tenant named {name!r}")
        return tenant

    def tenants(self) -> list[TenantInfo]:
        with Session(self.engine) as session:
            return [_tenant_info(t) for t in session.scalars(select(Tenant).order_by(Tenant.name))]

    def remove_tenant(self, name: str) -> None:
        """The tenant, its keys, adapters (files too) and usage."""
        for adapter in self.adapters(name):
            self.remove_adapter(name, adapter.name)
        with Session(self.engine) as session:
            tenant = self._tenant(session, name)
            for table in (ApiKey, Usage):
                for row in session.scalars(select(table).where(table.tenant_id == tenant.id)):
                    session.delete(row)
            session.delete(tenant)
            session.commit()

    def authenticate(self, key: str | None) -> TenantInfo | None:
        """The tenant whose key this is, or None."""
        if not key:
            return None
        with Session(self.engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.sha256 == _hash_key(key)))
            return None if row is None else _tenant_info(session.get(Tenant, row.tenant_id))

    # --- adapters --------------------------------------------------------------------------------
    def register_adapter(self, tenant: str, name: str, folder: str | Path) -> AdapterInfo:
        """Check ``folder`` (a PEFT LoRA folder) against the base model, upload it and record it."""
        from tasks.lm.lora import load_adapter

        _check_name("adapter", name)
        adapter = load_adapter(folder, self._config(), name=name)  # AdapterError: nothing written yet
        with Session(self.engine) as session:
            owner = self._tenant(session, tenant)
            if session.scalar(select(Adapter).where(Adapter.tenant_id == owner.id, Adapter.name == name)):
                raise RegistryError(f"tenant {tenant!r} already has an adapter named {name!r}")
            weights = (Path(folder) / WEIGHTS_FILE).read_bytes()
            sha = hashlib.sha256(weights).hexdigest()
            prefix = f"lmaas/adapters/{tenant}/{name}/{sha[:16]}"
            uploaded = []
            try:
                for file_name, data in ((WEIGHTS_FILE, weights), (CONFIG_FILE, (Path(folder) / CONFIG_FILE).read_bytes())):
                    self.store.put_bytes(f"{prefix}/{file_name}", data)
                    uploaded.append(f"{prefix}/{file_name}")
                row = Adapter(tenant_id=owner.id, name=name, store_prefix=prefix, sha256=sha, rank=adapter.rank,
                              targets=",".join(adapter.targets), n_params=adapter.n_params())
                session.add(row)
                session.commit()
            except BaseException:
                session.rollback()
                for key in uploaded:
                    self.store.delete(key, missing_ok=True)
                raise
            return _adapter_info(tenant, row)

    def adapters(self, tenant: str | None = None) -> list[AdapterInfo]:
        """One tenant's adapters, or everyone's."""
        with Session(self.engine) as session:
            query = select(Adapter, Tenant.name).join(Tenant, Adapter.tenant_id == Tenant.id)
            if tenant is not None:
                query = query.where(Tenant.id == self._tenant(session, tenant).id)
            return [_adapter_info(owner, a) for a, owner in session.execute(query.order_by(Tenant.name, Adapter.name))]

    def remove_adapter(self, tenant: str, name: str) -> None:
        with Session(self.engine) as session:
            owner = self._tenant(session, tenant)
            row = session.scalar(select(Adapter).where(Adapter.tenant_id == owner.id, Adapter.name == name))
            if row is None:
                raise RegistryError(f"tenant {tenant!r} has no adapter named {name!r}")
            prefix = row.store_prefix
            session.delete(row)
            session.commit()
        for file_name in (WEIGHTS_FILE, CONFIG_FILE):
            self.store.delete(f"{prefix}/{file_name}", missing_ok=True)

    def fetch_adapter(self, info: AdapterInfo) -> LoraAdapter:
        """The adapter's weights from the artifact store (checksums verified by the store)."""
        from tasks.lm.lora import load_adapter

        with tempfile.TemporaryDirectory(prefix="tierflow-adapter-") as tmp:
            for file_name in (WEIGHTS_FILE, CONFIG_FILE):
                self.store.get_file(f"{info.store_prefix}/{file_name}", Path(tmp) / file_name)
            return load_adapter(tmp, self._config(), name=info.model)

    def _config(self) -> LlamaConfig:
        if self.base_config is None:
            raise RegistryError("this registry was opened without the base model's config: adapters cannot be checked")
        return self.base_config

    def resolve(self, tenant: TenantInfo, model: str) -> AdapterInfo | None:
        """What ``model`` means for ``tenant``: None for the base model, or one of its own adapters."""
        if model == BASE_MODEL:
            return None
        owner, _, name = model.partition("/")
        if owner != tenant.name:
            raise AccessDenied(f"the model {model!r} is not available to this API key: a key may use "
                               f"'{BASE_MODEL}' and its own tenant's adapters ('{tenant.name}/<adapter>')")
        with Session(self.engine) as session:
            row = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant.id, Adapter.name == name))
            if row is None:
                raise UnknownModel(f"the model {model!r} does not exist")
            return _adapter_info(tenant.name, row)

    # --- usage -----------------------------------------------------------------------------------
    def record_usage(self, tenant: TenantInfo, model: str, prompt_tokens: int, completion_tokens: int,
                     ttft_s: float, latency_s: float, cost_usd: float) -> None:
        with Session(self.engine) as session:
            session.add(Usage(tenant_id=tenant.id, model=model, prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens, ttft_s=ttft_s, latency_s=latency_s, cost_usd=cost_usd))
            session.commit()

    def load_since(self, since: float) -> dict[str, tuple[int, int]]:
        """Every model's (requests, completion tokens) finished since ``since`` (epoch seconds), all
        tenants: the control plane's view of the load mix, for re-planning."""
        with Session(self.engine) as session:
            rows = session.execute(select(Tenant.name, Usage.model, func.count(), func.sum(Usage.completion_tokens))
                                   .join(Tenant, Tenant.id == Usage.tenant_id).where(Usage.finished_at >= since)
                                   .group_by(Tenant.name, Usage.model))
            return {model: (int(n), int(tokens or 0)) for _, model, n, tokens in rows}

    def usage(self, tenant: TenantInfo, since: float | None = None) -> dict:
        """One tenant's totals, per model: requests, tokens and cost (never another tenant's), and
        how often its latency objectives were met (:func:`slo_attainment`); ``since``: only
        requests finished after it (epoch seconds)."""
        mine = Usage.tenant_id == tenant.id
        if since is not None:
            mine = mine & (Usage.finished_at >= since)
        with Session(self.engine) as session:
            rows = session.execute(
                select(Usage.model, func.count(), func.sum(Usage.prompt_tokens), func.sum(Usage.completion_tokens),
                       func.sum(Usage.cost_usd)).where(mine).group_by(Usage.model))
            models = {model: {"requests": n, "prompt_tokens": int(p or 0), "completion_tokens": int(c or 0),
                              "cost_usd": float(cost or 0.0)} for model, n, p, c, cost in rows}
            timings = session.execute(select(Usage.ttft_s, Usage.latency_s, Usage.completion_tokens).where(mine)).all()
        total = {key: sum(m[key] for m in models.values()) for key in ("requests", "prompt_tokens", "completion_tokens", "cost_usd")}
        return {"tenant": tenant.name, "models": models, "total": total,
                "slo": slo_attainment(timings, tenant.ttft_slo_s, tenant.tpot_slo_s)}
