"""`tierflow lm …` as a user runs it: generate here, or serve and talk to it with the openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from infra.prefect_server import free_port

TIERFLOW = str(Path(sys.executable).with_name("tierflow"))


def tierflow(*args, timeout=120):
    return subprocess.run([TIERFLOW, *map(str, args)], env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


def wait_until_serving(server: subprocess.Popen, url: str, timeout: float = 90) -> None:
    """Poll ``url`` until it answers 200; fail with the server's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, server.stderr.read()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not come up in {timeout:.0f} s"
        time.sleep(0.5)


def test_generate_answers_a_chat_question_and_reports_its_timings():
    result = tierflow("lm", "generate", "--chat", "What is the capital of France?", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"] == "The capital of France is Paris." and answer["finish_reason"] == "stop"
    assert answer["model"] == "smollm2-135m-instruct" and answer["completion_tokens"] == 8
    assert answer["tokens_per_s"] > 0


def test_bad_options_are_one_line_naming_the_option():
    result = tierflow("lm", "generate", "hi", "--temperature", "9")
    assert result.returncode == 2 and "--temperature: temperature must be a number in [0, 2]; got 9.0" in result.stderr
    result = tierflow("lm", "serve", "--model", "/no/such/model.gguf")
    assert result.returncode == 2 and "model path /no/such/model.gguf does not exist" in result.stderr


def test_serve_answers_the_openai_client_and_stops_on_sigterm():
    port = free_port("127.0.0.1")
    server = subprocess.Popen([TIERFLOW, "lm", "serve", "--port", str(port), "--kv-cache-mib", "128"],
                              env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}/v1/models")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
        reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=20,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content == "The capital of France is Paris."
        assert reply.usage.completion_tokens == 8
    finally:
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal (exit status -15)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Finished server process" in server.stderr.read()
