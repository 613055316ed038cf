"""An OpenAI-compatible HTTP server over the LM engine: models, completions and chat completions,
whole or streamed as server-sent events.

The engine is single-threaded, so one thread owns it (:class:`EngineLoop`). HTTP handlers hand
that thread jobs and aborts through an inbox, and read each job's text back from an asyncio queue
the thread fills with ``call_soon_threadsafe``. Every request in flight shares the engine's forward
passes (continuous batching), so concurrent clients are served together, not one after another.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and only ever
fail the request that caused them.

A request never holds the server for a client that has gone: a stream ends when its client
disconnects, and a whole (non-streamed) answer polls the connection while it waits, so either way
the request is aborted and its queue place and KV blocks freed. ``max_tokens`` is bounded by the
context, as OpenAI's servers do: a ``max_tokens`` (or ``max_completion_tokens``) the prompt leaves
no room for is refused with ``context_length_exceeded``; without one, the completion may run to the
end of the context (chat) or to 16 tokens (completions), whichever comes first.

A :class:`Tenancy` (LMaaS: tasks/lmaas/service.py) makes the server multi-tenant: it checks each
request's API key and model name, hands back which LoRA adapter serves it, holds what the request
may use (its prompt and every token it may generate) against a quota before it runs, and hears how
each request went (tokens, time to first token, latency) for quotas and metering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Protocol

import uvicorn
from fastapi import FastAPI, Header
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from tasks.lm.engine import LMEngine, Request
from tasks.lm.lora import LoraAdapter
from tasks.lm.sampling import InvalidRequest, SamplingParams

log = logging.getLogger(__name__)

MAX_CHOICES = 8
DISCONNECT_POLL_S = 0.25  # how often a whole answer being generated checks that its client is still there
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Delta:
    """What one choice produced since its last delivery; ``finish_reason`` is set on its last."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    error: str | None = None
    compute_s: float = 0.0  # the choice's share of the forward passes so far


class TenancyError(Exception):
    """A request a tenancy refuses: its HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.headers = status, type, code, param, headers


@dataclass
class Grant:
    """A tenancy's yes: who asked, the model name to answer with, the adapter that serves it (its
    weights when the engine may not hold them yet), and what to call when the request is over."""

    tenant: str
    model: str
    adapter: str | None = None
    adapter_weights: LoraAdapter | None = None
    release: Callable[[], None] = lambda: None
    reserved_tokens: int = 0  # what the tenancy holds against the quota for this request (Tenancy.reserve)


class Tenancy(Protocol):
    async def admit(self, authorization: str | None, model: str) -> Grant:
        """The grant for this key and model, or a :class:`TenancyError` (401, 403, 404, 429)."""

    async def models(self, authorization: str | None) -> list[str]:
        """The model names this key may use."""

    async def usage(self, authorization: str | None) -> dict:
        """This key's tenant's usage (never another tenant's)."""

    def reserve(self, grant: Grant, prompt_tokens: int, completion_tokens: int, at_least: int) -> int:
        """Hold the prompt and up to ``completion_tokens`` generated tokens against the grant's
        quota until :meth:`finished`; returns how many generated tokens are held (from ``at_least``
        to ``completion_tokens``), or raises a :class:`TenancyError` (429)."""

    def finished(self, grant: Grant, prompt_tokens: int, completion_tokens: int, ttft_s: float, latency_s: float,
                 compute_s: float) -> None:
        """A granted request is over (answered, failed or abandoned); ``compute_s`` is its share of
        the engine's forward passes."""


@dataclass
class Job:
    """One HTTP request: a prompt, ``n`` choices sampled from it, and the queue its results go to.

    The engine thread puts on ``events`` first ``None`` (admitted) or the ``InvalidRequest`` that
    refused the prompt, then the choices' :class:`Delta` objects."""

    prompt: str | list[int]
    params: SamplingParams
    n: int
    grant: Grant | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    prompt_tokens: int = 0
    requests: list[Request] = field(default_factory=list)
    unfinished: int = 0


class EngineLoop:
    """The one thread that touches the engine: it admits jobs, steps while there is work, sleeps
    when there is none, and delivers each choice's new text to its job's queue.

    ``max_queue`` bounds the jobs in flight (in the inbox, waiting or generating); the counters
    ``served``, ``rejected`` (turned away for being over that bound) and ``in_flight`` count jobs."""

    def __init__(self, engine: LMEngine, max_queue: int = 64):
        self.engine, self.max_queue = engine, max_queue
        self.served = self.rejected = self.in_flight = 0
        self._counters = threading.Lock()
        self._inbox: deque[tuple[str, Job]] = deque()  # append and popleft are thread-safe
        self._wake = threading.Event()
        self._active: dict[int, tuple[Request, Job, int]] = {}  # request id -> (request, job, choice index)
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lm-engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is still in flight and join the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    # --- the asyncio side -------------------------------------------------------------------------
    def submit(self, job: Job) -> bool:
        """Queue ``job`` for the engine; False (and counted rejected) if ``max_queue`` are in flight."""
        with self._counters:
            if self.in_flight >= self.max_queue:
                self.rejected += 1
                return False
            self.in_flight += 1
        self._post("submit", job)
        return True

    def abort(self, job: Job) -> None:
        self._post("abort", job)

    async def deltas(self, job: Job) -> AsyncIterator[Delta]:
        """``job``'s deltas until every choice has finished; leaving early (a client gone) aborts it."""
        unfinished = job.n
        try:
            while unfinished:
                delta = await job.events.get()
                unfinished -= delta.finish_reason is not None
                yield delta
        finally:
            if unfinished:
                self.abort(job)

    def _post(self, action: str, job: Job) -> None:
        self._inbox.append((action, job))
        self._wake.set()

    # --- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_work:
                self._wake.wait()
            # cleared before the inbox is read, so a post after this point wakes the next wait
            self._wake.clear()
            self._drain_inbox()
            if self._stopping:
                break
            if engine.has_work:
                try:
                    engine.step()
                except Exception as exc:  # a failed step must not strand every client: fail those in flight
                    log.exception("engine step failed")
                    for request, _, _ in self._active.values():
                        engine.abort(request)
                        request.finish_reason, request.error = "error", f"the engine failed: {exc!r}"
            self._deliver()
        for request, _, _ in self._active.values():
            engine.abort(request)
        self._deliver()

    def _drain_inbox(self) -> None:
        while self._inbox:
            action, job = self._inbox.popleft()
            if action == "submit":
                self._admit(job)
            else:
                for request in job.requests:
                    self.engine.abort(request)

    def _admit(self, job: Job) -> None:
        """Open the prompt once and fork it for the other choices; refuse an invalid prompt."""
        engine, grant = self.engine, job.grant
        adapter = grant.adapter if grant else None
        try:
            if adapter is not None and adapter not in engine.adapters:
                engine.add_adapter(adapter, grant.adapter_weights)
            seq = engine.open(job.prompt, adapter)
        except InvalidRequest as exc:
            with self._counters:
                self.in_flight -= 1
            job.loop.call_soon_threadsafe(job.events.put_nowait, exc)
            return
        job.prompt_tokens = len(seq.tokens)
        seqs = [seq, *(engine.fork(seq) for _ in range(job.n - 1))]
        # a seed makes the job repeatable, but the choices must still differ from each other
        params = [job.params if job.params.seed is None else replace(job.params, seed=job.params.seed + i)
                  for i in range(job.n)]
        tenant = grant.tenant if grant else None
        job.requests = [engine.submit(s, p, owns_sequence=True, tenant=tenant) for s, p in zip(seqs, params)]
        job.unfinished = job.n
        self._active.update((r.id, (r, job, i)) for i, r in enumerate(job.requests))
        job.loop.call_soon_threadsafe(job.events.put_nowait, None)

    def _deliver(self) -> None:
        """Hand each choice the text it can stream now; retire finished choices and jobs."""
        for request, job, index in list(self._active.values()):
            text = request.take_text()
            if not text and not request.finished:
                continue
            if request.finished:  # counted out before the client can hear of it and send the next one
                del self._active[request.id]
                job.unfinished -= 1
                if not job.unfinished:
                    with self._counters:
                        self.in_flight -= 1
                        self.served += 1
            delta = Delta(index, text, request.finish_reason, request.completion_tokens, request.error, request.compute_s)
            job.loop.call_soon_threadsafe(job.events.put_nowait, delta)


# --- request bodies -------------------------------------------------------------------------------
class _SamplingBody(BaseModel):
    """The fields both generation endpoints share, with OpenAI's names. ``stream_options`` is
    accepted and ignored: a stream always ends with a usage chunk."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    ignore_eos: bool = False  # not OpenAI's: generate to max_tokens past end-of-sequence (as vLLM's server allows)


class CompletionBody(_SamplingBody):
    prompt: str | list[int]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": self.role, "content": content}


class ChatBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


# --- responses ------------------------------------------------------------------------------------
def _error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class _Reply:
    """Formats one job's results as a ``text_completion`` or a ``chat.completion`` (and chunks)."""

    model: str
    chat: bool
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _object(self, choices: list[dict], *, chunk: bool, **extra) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def completion(self, texts: list[str], reasons: list[str], usage: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return self._object(choices, chunk=False, usage=usage)

    def chunk(self, index: int, text: str, finish_reason: str | None, *, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return _event(self._object([choice], chunk=True))

    def usage_chunk(self, usage: dict) -> str:
        return _event(self._object([], chunk=True, usage=usage))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _failure(delta: Delta) -> str:
    return delta.error or "the request was aborted before it finished"


# --- the app --------------------------------------------------------------------------------------
def create_app(engine: LMEngine, *, max_queue: int = 64, retry_after_s: int = 1,
               tenancy: Tenancy | None = None, title: str = "tierflow LM server",
               gil_switch_interval_s: float | None = 0.0005) -> FastAPI:
    """The OpenAI-compatible app over ``engine``; its lifespan starts and stops the engine thread.

    ``max_queue`` bounds the requests in flight; one more is answered 429 with ``Retry-After:
    retry_after_s``. With a ``tenancy`` every request needs an API key (``Authorization: Bearer``)
    and names ``base`` or one of its tenant's adapters. ``app.state.engine_loop`` is the
    :class:`EngineLoop`.

    ``gil_switch_interval_s``: while the app runs, the interpreter's thread switch interval (restored
    after). A decode step is hundreds of short torch calls, each releasing and retaking the GIL;
    with the event loop busy streaming, each retake can wait out the default 5 ms interval. At
    0.5 ms, a trace replayed over HTTP on one core measured a median time per output token of
    0.107 s against 0.182 s (in-process: 0.080 s). None leaves the interval alone."""
    engine_loop = EngineLoop(engine, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        previous = sys.getswitchinterval()
        if gil_switch_interval_s is not None:
            sys.setswitchinterval(gil_switch_interval_s)
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.stop)  # the join waits out a step: not on the event loop
            sys.setswitchinterval(previous)

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.engine_loop = engine_loop

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first['ctx']['error']}")
        if len(first["loc"]) < 2:  # the body itself, not one of its fields
            return _error(400, f"the request body must be a JSON object: {first['msg']}")
        # every error, each at its path below "body" (a union field fails once per member)
        message = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors)
        return _error(400, message, param=str(first["loc"][1]))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_id, "requests_served": engine_loop.served,
                "requests_rejected": engine_loop.rejected, "requests_in_flight": engine_loop.in_flight}

    def refused(exc: TenancyError) -> JSONResponse:
        return _error(exc.status, str(exc), type=exc.type, param=exc.param, code=exc.code, headers=exc.headers)

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(None)):
        try:
            names = await tenancy.models(authorization) if tenancy else [engine.model_id]
        except TenancyError as exc:
            return refused(exc)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tierflow"}
                                           for name in names]}

    if tenancy is not None:
        @app.get("/v1/usage")
        async def usage(authorization: str | None = Header(None)):
            try:
                return await tenancy.usage(authorization)
            except TenancyError as exc:
                return refused(exc)

    async def grant_for(authorization: str | None, model: str) -> Grant | JSONResponse | None:
        if tenancy is not None:
            try:
                return await tenancy.admit(authorization, model)
            except TenancyError as exc:
                return refused(exc)
        if model != engine.model_id:
            return _error(404, f"the model {model!r} does not exist; this server serves {engine.model_id!r}",
                          param="model", code="model_not_found")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest, authorization: str | None = Header(None)):
        grant = await grant_for(authorization, body.model)
        if isinstance(grant, JSONResponse):
            return grant
        return await generate(body, body.prompt, body.max_tokens, grant, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HttpRequest, authorization: str | None = Header(None)):
        grant = await grant_for(authorization, body.model)
        if isinstance(grant, JSONResponse):
            return grant
        try:
            prompt = engine.tokenizer.render_chat([m.as_dict() for m in body.messages])
        except ValueError as exc:
            return over(grant, _error(400, str(exc), param="messages"))
        if body.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
            return await generate(body, prompt, body.max_completion_tokens, grant, http, chat=True,
                                  max_tokens_param="max_completion_tokens")
        return await generate(body, prompt, body.max_tokens, grant, http, chat=True)

    def over(grant: Grant | None, response=None, prompt_tokens: int = 0, completion_tokens: int = 0,
             started: float | None = None, first: float | None = None, compute_s: float = 0.0):
        """Tell the tenancy a granted request is over; returns ``response``."""
        if grant is not None:
            now = time.perf_counter()
            started = now if started is None else started
            try:
                tenancy.finished(grant, prompt_tokens, completion_tokens, (first or now) - started, now - started,
                                 compute_s)
            finally:
                grant.release()
        return response

    async def generate(body: _SamplingBody, prompt: str | list[int], max_tokens: int | None, grant: Grant | None,
                       http: HttpRequest, *, chat: bool, max_tokens_param: str = "max_tokens"):
        """Run one job and answer it whole or streamed. ``max_tokens`` is the client's limit (None:
        none asked for); ``max_tokens_param`` names the field it came from, for errors."""
        prompt_param = "messages" if chat else "prompt"
        default = engine.config.context_length if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        try:
            params = SamplingParams(max_tokens=default if max_tokens is None else max_tokens, stop=body.stop,
                                    seed=body.seed, ignore_eos=body.ignore_eos,
                                    temperature=1.0 if body.temperature is None else body.temperature,
                                    top_p=1.0 if body.top_p is None else body.top_p)
            tokens = await asyncio.to_thread(engine.tokens_of, prompt)  # the engine thread need not tokenize it again
        except InvalidRequest as exc:
            param = {"max_tokens": max_tokens_param, "prompt": prompt_param}.get(exc.param, exc.param)
            return over(grant, _error(400, str(exc), param=param))
        room = engine.config.context_length - len(tokens)  # tokens the context leaves to generate
        if not tokens:
            return over(grant, _error(400, "the prompt is empty", param=prompt_param))
        if room < 1:
            return over(grant, _error(400, f"this model's context is {engine.config.context_length} tokens and the "
                                      f"prompt has {len(tokens)}: at least one must be left to generate",
                                      param=prompt_param, code="context_length_exceeded"))
        if max_tokens is not None and max_tokens > room:
            return over(grant, _error(400, f"this model's context is {engine.config.context_length} tokens; the prompt "
                                      f"has {len(tokens)} and {max_tokens_param} asks for {max_tokens} more: "
                                      f"give {max_tokens_param} ≤ {room}", param=max_tokens_param,
                                      code="context_length_exceeded"))
        limit = min(params.max_tokens, room)
        if grant is not None:
            try:  # an explicit limit is held whole; without one, what the quota has room for (≥ 1 token)
                held = tenancy.reserve(grant, len(tokens), body.n * limit, body.n * limit if max_tokens else body.n)
            except TenancyError as exc:  # nothing held, nothing used: only its place in flight to give back
                grant.release()
                return refused(exc)
            limit = held // body.n
        job = Job(tokens, replace(params, max_tokens=limit), body.n, grant)
        if not engine_loop.submit(job):
            return over(grant, _error(429, f"{max_queue} requests are already in flight; retry in {retry_after_s} s",
                                      type="rate_limit_error", code="rate_limit_exceeded",
                                      headers={"Retry-After": str(retry_after_s)}))
        started = time.perf_counter()
        refusal = await job.events.get()
        if refusal is not None:
            return over(grant, _error(400, str(refusal), code=refusal.code,
                                      param="messages" if chat and refusal.param == "prompt" else refusal.param))
        reply = _Reply(grant.model if grant else engine.model_id, chat)
        if body.stream:
            return StreamingResponse(stream(job, reply, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(job, reply, started, http)

    def generated(job: Job, delivered: dict[int, int]) -> int:
        """Tokens the job's choices generated: what was delivered, or what the engine counted if a
        client left (or a choice failed) before hearing of them."""
        counted = sum(r.completion_tokens for r in job.requests)  # ints written by the engine thread
        return max(counted, sum(delivered.values()))

    async def collect(job: Job, reply: _Reply, started: float, http: HttpRequest) -> dict | JSONResponse | None:
        """The job as one response; a failed choice fails it (500) and aborts the others. A client
        that disconnects meanwhile aborts it (nobody is left to answer)."""
        texts, reasons, tokens, first, compute = [""] * job.n, [""] * job.n, {}, None, {}

        async def gather() -> dict | JSONResponse:
            nonlocal first
            async with aclosing(engine_loop.deltas(job)) as deltas:  # leaving early aborts the job
                async for delta in deltas:
                    first = first or time.perf_counter()
                    texts[delta.index] += delta.text
                    compute[delta.index] = delta.compute_s
                    tokens[delta.index] = delta.completion_tokens
                    if delta.finish_reason in ("abort", "error"):
                        return _error(500, _failure(delta), type="server_error")
                    if delta.finish_reason:
                        reasons[delta.index] = delta.finish_reason
            return reply.completion(texts, reasons, _usage(job.prompt_tokens, sum(tokens.values())))

        answer = asyncio.ensure_future(gather())
        try:
            while not answer.done():
                await asyncio.wait({answer}, timeout=DISCONNECT_POLL_S)
                if not answer.done() and await http.is_disconnected():
                    answer.cancel()
                    with suppress(asyncio.CancelledError):
                        await answer
                    return None
            return answer.result()
        finally:
            if not answer.done():  # this handler itself was cancelled
                answer.cancel()
            over(job.grant, None, job.prompt_tokens, generated(job, tokens), started, first, sum(compute.values()))

    async def stream(job: Job, reply: _Reply, started: float) -> AsyncIterator[str]:
        """The job as server-sent events: chunks as text settles, a usage chunk, then [DONE]; a
        failed choice sends an error event instead of its last chunk."""
        tokens, failure, first, compute = {}, None, None, {}
        try:
            if reply.chat:
                for index in range(job.n):
                    yield reply.chunk(index, "", None, role=True)
            async with aclosing(engine_loop.deltas(job)) as deltas:  # closing the stream aborts the job
                async for delta in deltas:
                    tokens[delta.index] = delta.completion_tokens
                    compute[delta.index] = delta.compute_s
                    if delta.finish_reason in ("abort", "error"):
                        failure = failure or _failure(delta)
                    elif delta.text or delta.finish_reason:
                        first = first or time.perf_counter()
                        yield reply.chunk(delta.index, delta.text, delta.finish_reason)
            yield reply.usage_chunk(_usage(job.prompt_tokens, sum(tokens.values())))
            if failure:
                yield _event({"error": {"message": failure, "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        finally:
            over(job.grant, None, job.prompt_tokens, generated(job, tokens), started, first, sum(compute.values()))

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` (from :func:`create_app`) with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level=log_level)
