"""The OpenAI-compatible server, driven over HTTP with the official client as a user would."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from tasks.lm.engine import LMEngine
from tasks.lm.server import create_app

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "What is the largest planet?"]


@contextmanager
def serving(app):
    """``app`` on a free local port under uvicorn in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def url(engine):
    with serving(create_app(engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def small(engine):
    """A second engine over the same weights, served with room for one request at a time."""
    small_engine = LMEngine(engine.model, engine.tokenizer, model_id=engine.model_id, kv_cache_mib=16)
    with serving(create_app(small_engine, max_queue=1, retry_after_s=3)) as base:
        yield small_engine, base


def ask(client, question, **options):
    """A chat completion of one user message, greedy and short unless ``options`` say otherwise."""
    options = {"temperature": 0, "max_tokens": 16, **options}
    return client.chat.completions.create(model="smollm2-135m-instruct",
                                          messages=[{"role": "user", "content": question}], **options)


def idle(engine, n_free) -> bool:
    return not engine.running and not engine.waiting and engine.cache.n_free == n_free


# --- what a user sees ---------------------------------------------------------------------------------
def test_models_lists_the_engine_model(client, engine):
    models = client.models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [(engine.model_id, "tierflow")]


def test_chat_greedy_answer_names_paris_with_consistent_usage(client, engine, chat):
    reply = ask(client, "What is the capital of France?")
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage.prompt_tokens == len(engine.tokenizer.encode(chat("What is the capital of France?")))
    assert 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_ends_before_the_stop_string(client, chat):
    prompt = chat("Name three colors.")
    whole = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, temperature=0, max_tokens=12)
    assert whole.object == "text_completion" and "\n" in whole.choices[0].text
    cut = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, temperature=0, max_tokens=12,
                                    stop=["\n"])
    assert cut.choices[0].text == whole.choices[0].text.split("\n")[0]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < whole.usage.completion_tokens


def test_completion_accepts_a_prompt_of_token_ids(client, engine, chat):
    prompt = chat("What is 2+2?")
    by_text = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, temperature=0, max_tokens=8)
    by_ids = client.completions.create(model="smollm2-135m-instruct", prompt=engine.tokenizer.encode(prompt),
                                       temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage == by_text.usage


def test_streamed_chat_matches_the_whole_reply_and_ends_with_usage(client):
    whole = ask(client, "Who wrote Hamlet?")
    chunks = list(ask(client, "Who wrote Hamlet?", stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_completion_with_stop_matches_the_whole_one(client, chat):
    options = dict(model="smollm2-135m-instruct", prompt=chat("Name three colors."), temperature=0, max_tokens=12,
                   stop=["Blue"])
    whole = client.completions.create(**options)
    chunks = list(client.completions.create(stream=True, **options))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert "Blue" not in whole.choices[0].text and whole.choices[0].finish_reason == "stop"
    assert chunks[-1].usage == whole.usage


def test_n_seeded_choices_differ_repeat_and_free_their_blocks(client, engine):
    """Seeded choices repeat for the same request on the same cache. (Not between a first request,
    which prefills its whole prompt, and a repeat that continues from the cached prefix blocks: on
    CPUs with AMX, oneDNN's bf16 GEMM rounds a row differently with the number of rows, and a
    temperature-1 draw can then take another token.)"""
    n_free = engine.cache.n_free
    options = dict(n=3, seed=7, temperature=1.0, max_tokens=12)
    first = ask(client, "Write a haiku about the sea.", **options)
    again = ask(client, "Write a haiku about the sea.", **options)
    third = ask(client, "Write a haiku about the sea.", **options)
    texts = [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1, "each choice samples with its own seed"
    assert [c.message.content for c in third.choices] == texts
    assert first.usage.completion_tokens <= 3 * 12
    assert wait_until(lambda: idle(engine, n_free))


def test_concurrent_requests_share_steps_and_match_greedy_alone(client, engine):
    alone = [ask(client, q).choices[0].message.content for q in QUESTIONS]
    steps = engine.stats["steps"]
    start = threading.Barrier(len(QUESTIONS))

    def ask_together(question):
        start.wait()
        return ask(client, question)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(ask_together, QUESTIONS))
    assert [r.choices[0].message.content for r in replies] == alone
    # batched: far fewer forward passes than tokens generated
    assert engine.stats["steps"] - steps < sum(r.usage.completion_tokens for r in replies) / 2


# --- errors ---------------------------------------------------------------------------------------
def test_unknown_model_is_404_naming_both_models(client, engine):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=4)
    error = caught.value
    assert error.status_code == 404 and error.code == "model_not_found" and error.param == "model"
    assert "gpt-9" in error.message and engine.model_id in error.message


@pytest.mark.parametrize("chat_endpoint", [False, True])
def test_prompt_longer_than_the_context_is_400(client, chat_endpoint):
    long_text = "hello " * 9000
    with pytest.raises(openai.BadRequestError) as caught:
        if chat_endpoint:
            ask(client, long_text)
        else:
            client.completions.create(model="smollm2-135m-instruct", prompt=long_text, max_tokens=4)
    error = caught.value
    assert error.code == "context_length_exceeded" and error.type == "invalid_request_error"
    assert error.param == ("messages" if chat_endpoint else "prompt")


@pytest.mark.parametrize("field, value", [("temperature", 5), ("top_p", 0), ("max_tokens", 0), ("temperature", "hot"),
                                          ("stop", ["a", "b", "c", "d", "e"]), ("n", 9), ("seed", "x")])
def test_invalid_sampling_parameter_is_400_naming_it(url, field, value):
    body = {"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 4, field: value}
    response = httpx.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field and error["message"]


def test_max_completion_tokens_is_checked_under_its_own_name(url):
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_completion_tokens"


@pytest.mark.parametrize("content, content_type", [(b'{"model": "smollm2-135m-instruct", "prompt": ', "application/json"),
                                                   (b"prompt=hi", "application/x-www-form-urlencoded"),
                                                   (b"[1, 2]", "application/json")])
def test_a_body_that_is_not_a_json_object_is_400(url, content, content_type):
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": content_type})
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_over_max_queue_is_429_with_retry_after(small, monkeypatch):
    small_engine, base = small
    gate = threading.Event()
    step = small_engine.step
    monkeypatch.setattr(small_engine, "step", lambda: gate.wait() and step())  # hold the first request in flight
    body = {"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 4}
    with ThreadPoolExecutor(1) as pool:
        try:
            held = pool.submit(httpx.post, f"{base}/v1/completions", json=body, timeout=60)
            assert wait_until(lambda: httpx.get(f"{base}/health").json()["requests_in_flight"] == 1)
            refused = httpx.post(f"{base}/v1/completions", json=body)
        finally:
            gate.set()  # a held engine thread would hang the server's shutdown
        assert held.result().status_code == 200
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "3"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.get(f"{base}/health").json()["requests_rejected"] == 1
    assert httpx.post(f"{base}/v1/completions", json=body).status_code == 200


def test_a_failed_step_fails_only_the_requests_in_flight(small, monkeypatch):
    small_engine, base = small
    n_free = small_engine.cache.n_free
    step, failures = small_engine.step, iter([RuntimeError("boom")] * 2)

    def failing_step():
        if (failure := next(failures, None)) is not None:
            raise failure
        return step()

    monkeypatch.setattr(small_engine, "step", failing_step)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError, match="boom") as caught:
        ask(client, "Hello")
    assert caught.value.type == "server_error"
    with pytest.raises(openai.APIError, match="boom"):
        list(ask(client, "Hello", stream=True))
    assert wait_until(lambda: idle(small_engine, n_free))
    assert ask(client, "What is 2+2?").choices[0].finish_reason in ("stop", "length")


def test_client_leaving_mid_stream_aborts_and_frees_its_blocks(url, client, engine, monkeypatch):
    n_free = engine.cache.n_free
    step, abort, aborted = engine.step, engine.abort, []
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or step())  # ≥ 1.6 s for 32 tokens
    monkeypatch.setattr(engine, "abort", lambda request: aborted.append(request) or abort(request))
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
            "temperature": 0, "max_tokens": 32, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        received = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(json.loads(line[len("data: "):]))
            if len(received) == 3:
                break
    assert received[0]["choices"][0]["delta"]["role"] == "assistant"
    assert wait_until(lambda: idle(engine, n_free))
    assert [(r.finish_reason, r.completion_tokens < 32) for r in aborted] == [("abort", True)]
    monkeypatch.undo()
    assert "Paris" in ask(client, "What is the capital of France?").choices[0].message.content


def test_a_client_that_disconnects_from_a_whole_answer_frees_its_slot_at_once(small, monkeypatch):
    """max_queue 1: a non-streamed request whose client gives up after 1 s is aborted within two
    seconds (it would otherwise generate 400 tokens, ≥ 20 s at this pace), so the next client is served."""
    small_engine, base = small
    n_free = small_engine.cache.n_free
    step, abort, aborted = small_engine.step, small_engine.abort, []
    monkeypatch.setattr(small_engine, "step", lambda: time.sleep(0.05) or step())
    monkeypatch.setattr(small_engine, "abort", lambda request: aborted.append(request) or abort(request))
    body = {"model": "smollm2-135m-instruct", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, timeout=1.0)
    left = time.monotonic()
    assert wait_until(lambda: httpx.get(f"{base}/health").json()["requests_in_flight"] == 0, timeout=2.0)
    assert wait_until(lambda: idle(small_engine, n_free), timeout=2.0) and time.monotonic() - left < 2.5
    assert [(r.finish_reason, r.completion_tokens < 400) for r in aborted] == [("abort", True)]
    monkeypatch.undo()
    assert httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_context_is_refused_with_context_length_exceeded(url, engine, field):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = len(engine.tokenizer.encode(engine.tokenizer.render_chat(messages)))
    room = engine.config.context_length - prompt
    for too_many in (1_000_000_000, room + 1):
        response = httpx.post(f"{url}/v1/chat/completions",
                              json={"model": "smollm2-135m-instruct", "messages": messages, field: too_many})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == field
        assert f"{field} ≤ {room}" in error["message"]
    fits = httpx.post(f"{url}/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": messages,
                                                           field: room, "temperature": 0}, timeout=60)
    assert fits.status_code == 200 and fits.json()["choices"][0]["finish_reason"] == "stop"


# --- the systems' backend interface over this endpoint ---------------------------------------------

def test_the_openai_backend_gives_the_local_backends_answers_and_says_what_it_cannot_do(url, engine):
    from tasks.lm.backend import LocalBackend, OpenAIBackend, UnsupportedFeature
    from tasks.lm.sampling import SamplingParams

    remote, local = OpenAIBackend(f"{url}/v1", engine.model_id), LocalBackend(engine)
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = ["Once upon a time", "The three primary colors are"]
    assert [c.text for c in remote.generate(prompts, params)] == [c.text for c in local.generate(prompts, params)]
    assert "".join(remote.stream(prompts[0], params)) == local.generate(prompts[:1], params)[0].text
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert remote.chat(question, params).text == local.chat(question, params).text == "The capital of France is Paris."
    session = remote.session("Once upon a time")
    branch = session.fork()
    remote.generate_sessions([session, branch], params)
    assert session.text == branch.text == "Once upon a time" + local.generate(prompts[:1], params)[0].text
    with pytest.raises(UnsupportedFeature, match=f"{url}/v1 \\(model smollm2-135m-instruct\\) cannot roll a session back"):
        session.rollback(3)
    with pytest.raises(UnsupportedFeature, match="does not support 'kv_shared_fork'"):
        remote.require("kv_shared_fork")
    local.require("kv_shared_fork")
