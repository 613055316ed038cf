"""The LMaaS registry: tenants, hashed API keys, adapters checked before anything is written, access
answered per tenant without revealing other tenants' adapters, and usage metered per tenant."""

from __future__ import annotations

import json
import time

import pytest

from infra.store import LocalStore
from tasks.lm.lora import AdapterError, random_adapter, save_adapter
from tasks.lm.weights import LlamaConfig
from tasks.lmaas.registry import AccessDenied, Registry, RegistryError, UnknownModel
from tests.lmaas.postgres import fresh_database

CONFIG = LlamaConfig(n_layers=2, dim=64, ffn_dim=128, n_heads=4, n_kv_heads=2, vocab_size=64, context_length=128,
                     rope_base=10000.0, norm_eps=1e-5, tied_embeddings=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request, tmp_path):
    """The registry on SQLite (the default) and on a real PostgreSQL server (a fresh database per test)."""
    if request.param == "sqlite":
        return Registry(f"sqlite:///{tmp_path / 'lmaas.db'}", LocalStore(tmp_path / "store"), CONFIG)
    # a plain postgresql:// URL, as a user gives it
    return Registry(fresh_database(request.getfixturevalue("postgres")), LocalStore(tmp_path / "store"), CONFIG)


@pytest.fixture
def adapter_folder(tmp_path):
    return save_adapter(random_adapter(CONFIG, rank=4, seed=1), tmp_path / "upload")


def _every_stored_value(registry) -> str:
    """Every row of every table of the registry's database, as text."""
    from sqlalchemy import select

    from tasks.lmaas.registry import Base

    with registry.engine.connect() as connection:
        return repr([list(row) for table in Base.metadata.sorted_tables for row in connection.execute(select(table))])


def test_a_key_is_shown_once_stored_hashed_and_identifies_its_tenant(registry):
    acme, key = registry.add_tenant("acme", max_concurrent=2)
    _, other_key = registry.add_tenant("globex")
    assert key.startswith("tfk-") and key != other_key
    assert registry.authenticate(key) == acme and registry.authenticate(other_key).name == "globex"
    assert registry.authenticate("tfk-wrong") is None and registry.authenticate(None) is None
    assert key not in _every_stored_value(registry)  # only its SHA-256 is kept
    second = registry.add_key("acme")
    assert registry.authenticate(second) == acme


def test_tenants_are_checked_when_added(registry):
    registry.add_tenant("acme")
    with pytest.raises(RegistryError, match="tenant 'acme' already exists"):
        registry.add_tenant("acme")
    with pytest.raises(RegistryError, match=r"tenant must be 1-64 letters.*\(got 'a/b'\)"):
        registry.add_tenant("a/b")
    with pytest.raises(RegistryError, match=r"max_concurrent must be a positive integer \(got 0\)"):
        registry.add_tenant("zero", max_concurrent=0)


def test_an_adapter_is_uploaded_recorded_and_fetched_back_whole(registry, adapter_folder):
    registry.add_tenant("acme")
    info = registry.register_adapter("acme", "support-bot", adapter_folder)
    assert (info.model, info.rank, info.targets) == ("acme/support-bot", 4, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert [a.model for a in registry.adapters("acme")] == ["acme/support-bot"]
    fetched = registry.fetch_adapter(info)
    assert fetched.rank == 4 and fetched.n_params() == info.n_params
    registry.remove_adapter("acme", "support-bot")
    assert registry.adapters() == [] and registry.store.list("lmaas/") == []


def test_a_malformed_adapter_leaves_nothing_registered(registry, adapter_folder):
    registry.add_tenant("acme")
    config = adapter_folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))  # tensors are rank 4
    with pytest.raises(AdapterError, match=r"has shape \[4, 64\]; r=8 on this model needs \[8, 64\]"):
        registry.register_adapter("acme", "broken", adapter_folder)
    assert registry.adapters() == [] and registry.store.list() == []


def test_a_duplicate_adapter_name_is_refused_and_the_first_stays(registry, adapter_folder):
    registry.add_tenant("acme")
    registry.register_adapter("acme", "bot", adapter_folder)
    with pytest.raises(RegistryError, match="tenant 'acme' already has an adapter named 'bot'"):
        registry.register_adapter("acme", "bot", adapter_folder)
    assert len(registry.adapters("acme")) == 1 and len(registry.store.list("lmaas/")) == 2


def test_a_key_reaches_the_base_model_and_its_own_adapters_only(registry, adapter_folder):
    acme, _ = registry.add_tenant("acme")
    globex, _ = registry.add_tenant("globex")
    registry.register_adapter("acme", "bot", adapter_folder)
    assert registry.resolve(acme, "base") is None
    assert registry.resolve(acme, "acme/bot").model == "acme/bot"
    with pytest.raises(UnknownModel, match="'acme/nope' does not exist"):
        registry.resolve(acme, "acme/nope")
    # another tenant's adapter and a name that exists nowhere get the same answer: no hint
    messages = []
    for model in ("acme/bot", "acme/nope", "initech/bot"):
        with pytest.raises(AccessDenied) as denied:
            registry.resolve(globex, model)
        messages.append(str(denied.value).replace(model, "<model>"))
    assert len(set(messages)) == 1


def test_usage_is_metered_per_tenant_and_shows_only_ones_own(registry):
    acme, _ = registry.add_tenant("acme")
    globex, _ = registry.add_tenant("globex")
    registry.record_usage(acme, "base", 10, 5, 0.1, 0.5, 0.001)
    registry.record_usage(acme, "acme/bot", 20, 7, 0.2, 0.9, 0.002)
    registry.record_usage(globex, "base", 99, 99, 0.1, 0.1, 0.5)
    usage = registry.usage(acme)
    assert usage["total"] == {"requests": 2, "prompt_tokens": 30, "completion_tokens": 12, "cost_usd": pytest.approx(0.003)}
    assert set(usage["models"]) == {"base", "acme/bot"}


def test_each_tenants_latency_objectives_are_tracked_against_its_own_requests(registry):
    acme, _ = registry.add_tenant("acme", ttft_slo_s=1.0, tpot_slo_s=0.1)
    globex, _ = registry.add_tenant("globex", ttft_slo_s=5.0, tpot_slo_s=1.0)
    # (ttft, latency, tokens): meets both; late first token; slow tokens (0.2 s each); one token only
    for ttft, latency, tokens in ((0.5, 1.4, 10), (2.0, 2.9, 10), (0.5, 2.3, 10), (0.8, 0.8, 1)):
        registry.record_usage(acme, "base", 10, tokens, ttft, latency, 0.0)
    registry.record_usage(globex, "base", 10, 10, 2.0, 2.9, 0.0)  # the same timings meet globex's objectives
    slo = registry.usage(acme)["slo"]
    assert (slo["requests"], slo["ttft_slo_s"], slo["tpot_slo_s"]) == (4, 1.0, 0.1)
    assert slo["ttft_attainment"] == 0.75 and slo["tpot_attainment"] == 0.75 and slo["attainment"] == 0.5
    assert slo["ttft_p99_s"] == 2.0 and slo["tpot_p99_s"] == pytest.approx(0.2)
    assert registry.usage(globex)["slo"]["attainment"] == 1.0
    assert registry.usage(acme, since=time.time() + 60)["slo"]["requests"] == 0


def test_removing_a_tenant_removes_its_keys_adapters_and_files(registry, adapter_folder):
    _, key = registry.add_tenant("acme")
    registry.register_adapter("acme", "bot", adapter_folder)
    registry.remove_tenant("acme")
    assert registry.authenticate(key) is None and registry.tenants() == [] and registry.store.list("lmaas/") == []
