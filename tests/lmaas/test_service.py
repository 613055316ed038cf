"""The LMaaS service over HTTP with the official openai client, as tenants use it: keys, their own
adapters only, quotas that turn away one tenant while others are served, and metering."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from infra.store import LocalStore
from tasks.lm.engine import LMEngine
from tasks.lm.lora import MODULES, random_adapter, save_adapter
from tasks.lmaas.registry import Registry
from tasks.lmaas.service import create_service_app
from tests.lm.test_server import serving, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A registry with two tenants (acme: one adapter, at most 2 requests in flight; globex: one
    adapter, 60 tokens a minute) and the service on a local port."""
    tmp = tmp_path_factory.mktemp("lmaas")
    engine = LMEngine.load(kv_cache_mib=128, lora_slots=2, lora_rank=8, lora_targets=tuple(MODULES))
    registry = Registry(f"sqlite:///{tmp / 'lmaas.db'}", LocalStore(tmp / "store"), engine.config)
    _, acme_key = registry.add_tenant("acme", max_concurrent=2)
    _, globex_key = registry.add_tenant("globex", tokens_per_minute=60)
    for tenant, seed in (("acme", 1), ("globex", 2)):
        folder = save_adapter(random_adapter(engine.config, rank=8, seed=seed, std=0.1), tmp / f"{tenant}-bot")
        registry.register_adapter(tenant, "bot", folder)
    with serving(create_service_app(registry, engine, price_per_hour=0.096)) as url:
        yield {"url": url, "registry": registry, "engine": engine, "acme": acme_key, "globex": globex_key}


def client(service, key):
    return openai.OpenAI(base_url=f"{service['url']}/v1", api_key=key, max_retries=0)


def ask(service, key, model, max_tokens=8, **kw):
    return client(service, key).chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens,
                                                        temperature=0, **kw)


def test_a_tenant_uses_the_base_model_and_its_own_adapter(service):
    base = ask(service, service["acme"], "base")
    adapted = ask(service, service["acme"], "acme/bot")
    assert base.model == "base" and adapted.model == "acme/bot"
    assert base.choices[0].message.content.startswith("The capital of France is Paris")
    assert adapted.choices[0].message.content != base.choices[0].message.content  # the adapter is applied
    models = [m.id for m in client(service, service["acme"]).models.list()]
    assert models == ["base", "acme/bot"]  # not globex's


def test_a_missing_or_wrong_key_is_401(service):
    for key in ("tfk-not-a-key", "unused"):
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(service, key, "base")
        assert caught.value.body["code"] == "invalid_api_key"
    response = httpx.post(f"{service['url']}/v1/chat/completions", json={"model": "base", "messages": QUESTION})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_another_tenants_adapter_is_403_with_no_hint_that_it_exists(service):
    errors = []
    for model in ("globex/bot", "globex/no-such-adapter", "nobody/bot"):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            ask(service, service["acme"], model)
        errors.append(caught.value.body["message"].replace(model, "<model>"))
    assert len(set(errors)) == 1


def test_an_unknown_adapter_of_ones_own_is_404(service):
    with pytest.raises(openai.NotFoundError) as caught:
        ask(service, service["acme"], "acme/no-such-adapter")
    assert caught.value.body["code"] == "model_not_found"


def test_a_tenant_over_its_concurrency_quota_gets_429_while_others_are_served(service):
    slow = client(service, service["acme"])
    streams = [slow.chat.completions.create(model="acme/bot", messages=QUESTION, max_tokens=400, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}) for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            ask(service, service["acme"], "base")
        assert "2 requests in flight" in caught.value.body["message"]
        assert caught.value.response.headers["Retry-After"] == "1"
        assert ask(service, service["globex"], "globex/bot", max_tokens=4).choices[0].message.content
    finally:
        for stream in streams:
            stream.close()
    assert wait_until(lambda: not service["engine"].running, timeout=10)  # closed streams are aborted
    assert ask(service, service["acme"], "base", max_tokens=2).choices[0].finish_reason == "length"


def test_a_tenant_over_its_token_quota_gets_429_with_retry_after(service):
    key = service["globex"]
    for _ in range(10):  # 60 tokens a minute: a few requests use it up
        try:
            ask(service, key, "base", max_tokens=16)
        except openai.RateLimitError as exc:
            retry = int(exc.response.headers["Retry-After"])
            assert 1 <= retry <= 61 and "tokens in the last minute" in exc.body["message"]
            break
    else:
        pytest.fail("the token quota never refused a request")
    assert ask(service, service["acme"], "base", max_tokens=2).choices  # acme is unaffected


def tokens_used(service, key) -> int:
    usage = httpx.get(f"{service['url']}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    return usage["total"]["prompt_tokens"] + usage["total"]["completion_tokens"]


def complete(service, key, max_tokens, **body):
    return httpx.post(f"{service['url']}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": "base", "prompt": "Once upon a time", "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True, **body})


def test_one_request_may_not_reserve_more_than_the_token_quota(service):
    """A 100-token quota: max_tokens 600 is refused before it runs, not served 600 tokens."""
    _, key = service["registry"].add_tenant("hooli", tokens_per_minute=100)
    refused = complete(service, key, 600)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "more than tenant 'hooli''s quota of 100 tokens per minute" in refused.json()["error"]["message"]
    assert tokens_used(service, key) == 0
    assert complete(service, key, 20).status_code == 200
    assert tokens_used(service, key) <= 100


def test_concurrent_requests_never_take_a_tenant_past_its_token_quota(service):
    """Eight requests of 150 tokens at once under a 400-token quota: admission counts what each may
    still generate, so those admitted fit the quota together and the rest are turned away."""
    quota = 400
    _, key = service["registry"].add_tenant("initech", tokens_per_minute=quota)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: complete(service, key, 150), range(8)))
    served = [r.json()["usage"]["total_tokens"] for r in replies if r.status_code == 200]
    assert sorted({r.status_code for r in replies}) == [200, 429] and len(served) == quota // served[0]
    assert sum(served) == tokens_used(service, key) <= quota


def test_a_reservation_is_held_while_its_request_runs_and_what_it_did_not_use_comes_back(service, monkeypatch):
    engine = service["engine"]
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or step())  # 80 tokens: ≥ 4 s
    _, key = service["registry"].add_tenant("umbrella", tokens_per_minute=100)
    streamed = client(service, key).completions.create(model="base", prompt="Once upon a time", max_tokens=80,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(streamed))
    refused = complete(service, key, 40)  # 4 + 80 held, 4 + 40 more would pass 100
    assert refused.status_code == 429 and "holds 84 for requests in flight" in refused.json()["error"]["message"]
    streamed.close()  # the stream is aborted after a few tokens: the rest of its reservation is released
    assert wait_until(lambda: not engine.running, timeout=10)
    monkeypatch.undo()
    assert tokens_used(service, key) < 40
    assert complete(service, key, 40).status_code == 200


def test_usage_is_metered_per_tenant_and_each_sees_only_its_own(service):
    ask(service, service["acme"], "acme/bot", max_tokens=4)
    usage = httpx.get(f"{service['url']}/v1/usage", headers={"Authorization": f"Bearer {service['acme']}"}).json()
    assert usage["tenant"] == "acme" and set(usage["models"]) <= {"base", "acme/bot"}
    bot = usage["models"]["acme/bot"]
    assert bot["requests"] >= 1 and bot["completion_tokens"] >= 4 and bot["cost_usd"] > 0
    slo = usage["slo"]  # its latency objectives, tracked on its own requests
    assert slo["requests"] == usage["total"]["requests"] and 0 <= slo["attainment"] <= 1 and slo["ttft_p50_s"] > 0
    assert httpx.get(f"{service['url']}/v1/usage").status_code == 401


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """One tenant with 12 adapters, served by an engine that keeps 3 in host memory and 2 in slots."""
    tmp = tmp_path_factory.mktemp("lmaas-many")
    engine = LMEngine.load(kv_cache_mib=128, lora_slots=2, lora_rank=4, lora_targets=("q_proj",), max_host_adapters=3)
    registry = Registry(f"sqlite:///{tmp / 'lmaas.db'}", LocalStore(tmp / "store"), engine.config)
    _, key = registry.add_tenant("acme", max_concurrent=32)
    for i in range(12):
        folder = save_adapter(random_adapter(engine.config, rank=4, targets=("q_proj",), seed=i), tmp / f"a{i}")
        registry.register_adapter("acme", f"a{i}", folder)
    with serving(create_service_app(registry, engine, price_per_hour=0.096)) as url:
        yield {"url": url, "engine": engine, "acme": key}


def test_adapters_beyond_host_memory_come_back_from_the_store_on_demand(many):
    for i in [*range(12), 0, 5]:  # every adapter, then two that host memory has let go
        assert ask(many, many["acme"], f"acme/a{i}", max_tokens=2).choices[0].finish_reason == "length"
    engine = many["engine"]
    assert len(engine.adapters) <= 3 and engine.stats["adapter_host_evictions"] >= 11


def test_concurrent_requests_for_more_adapters_than_slots_all_get_served(many):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: ask(many, many["acme"], f"acme/a{i}", max_tokens=3), range(8)))
    assert [r.usage.completion_tokens for r in replies] == [3] * 8
