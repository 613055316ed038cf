"""`tierflow lmaas …` as an operator and a tenant use it: add a tenant and its adapter (a malformed
one is refused with the reason and nothing registered), serve, and call the service with the key."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import openai
import pytest

from infra.prefect_server import free_port
from tasks.lm.lora import random_adapter, save_adapter
from tasks.lm.weights import load_config
from tests.lm.test_cli import TIERFLOW, wait_until_serving


@pytest.fixture
def home(tmp_path):
    return {**os.environ, "TIERFLOW_HOME": str(tmp_path / "home")}


def lmaas(env, *args, timeout=120):
    return subprocess.run([TIERFLOW, "lmaas", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def test_tenants_and_adapters_are_managed_and_a_malformed_adapter_is_refused_whole(home, tmp_path):
    added = lmaas(home, "tenant", "add", "acme", "--max-concurrent", "4")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["api_key"].startswith("tfk-")
    folder = save_adapter(random_adapter(load_config(None), rank=4, seed=1), tmp_path / "bot")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj", "mystery"]}))
    refused = lmaas(home, "adapter", "add", "acme", "bot", folder)
    assert refused.returncode == 2 and "target_modules must list modules of" in refused.stderr
    assert json.loads(lmaas(home, "adapter", "list", "--json").stdout) == []
    save_adapter(random_adapter(load_config(None), rank=4, seed=1), folder)
    assert lmaas(home, "adapter", "add", "acme", "bot", folder).returncode == 0
    listed = json.loads(lmaas(home, "adapter", "list", "acme", "--json").stdout)
    assert [a["model"] for a in listed] == ["acme/bot"] and listed[0]["rank"] == 4
    assert "no tenant named 'nobody'" in lmaas(home, "adapter", "list", "nobody").stderr
    assert lmaas(home, "tenant", "remove", "acme").returncode == 0
    assert json.loads(lmaas(home, "tenant", "list", "--json").stdout) == []


@pytest.mark.slow  # ~25 s: a served subprocess; the service itself is tested in-process in test_service
def test_the_service_serves_a_tenants_adapter_to_its_key(home, tmp_path):
    key = json.loads(lmaas(home, "tenant", "add", "acme").stdout)["api_key"]
    folder = save_adapter(random_adapter(load_config(None), rank=8, seed=3, std=0.05), tmp_path / "bot")
    assert lmaas(home, "adapter", "add", "acme", "bot", folder).returncode == 0
    port = free_port("127.0.0.1")
    server = subprocess.Popen([TIERFLOW, "lmaas", "serve", "--port", str(port), "--lora-slots", "2", "--lora-rank", "8"],
                              env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}/health")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["base", "acme/bot"]
        reply = client.chat.completions.create(model="acme/bot", max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": "Hello"}])
        assert reply.model == "acme/bot" and reply.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="tfk-nope", max_retries=0).models.list()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    usage = json.loads(lmaas(home, "usage", "acme").stdout)
    assert usage["models"]["acme/bot"]["requests"] == 1 and usage["total"]["cost_usd"] > 0
