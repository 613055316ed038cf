"""The language-model interface the systems use, and its two implementations.

- :class:`LocalBackend` runs the model in this process on :class:`tasks.lm.engine.LMEngine`:
  batched decoding, sessions whose KV cache can be forked and rolled back, prefix caching.
- :class:`OpenAIBackend` talks to any OpenAI-compatible endpoint (tierflow's own server, vLLM,
  a llama.cpp server). Batching and streaming work; a session forks by re-sending its text (the
  endpoint may cache the prefix on its side); features that need the KV cache itself (token-level
  rollback) raise :class:`UnsupportedFeature` naming the endpoint.

A *session* is a growing text the model continues: ``extend`` appends (a tool result, the next
turn), ``generate`` appends the model's continuation, ``fork`` branches, ``rollback`` goes back.

Generation may carry ``logits_processors`` (:mod:`tasks.lm.sampling`, e.g. a :class:`TokenMask`)
and an ``on_token`` hook (:class:`tasks.lm.engine.TokenEvent` -> "continue" | "pause" | "end");
a session paused by its hook returns with finish_reason "pause", its KV cache kept, ready to be
rolled back, extended and generated on (checkpoint and rollback without recomputing the prefix).
Both need the model in process (features ``logits_processors`` and ``token_hook``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from tasks.lm.engine import Completion, LMEngine, TokenHook
from tasks.lm.kvcache import SequenceKV
from tasks.lm.sampling import LogitsProcessor, SamplingParams

Processors = Sequence[LogitsProcessor] | None


class UnsupportedFeature(RuntimeError):
    """The backend cannot do this (e.g. a remote endpoint has no KV-cache access)."""


class Session(ABC):
    """A text the model continues, owned by one backend."""

    @property
    @abstractmethod
    def text(self) -> str: ...

    @abstractmethod
    def extend(self, text: str) -> None: ...

    @abstractmethod
    def fork(self) -> "Session": ...

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Go back to the first ``length`` tokens (see ``len(session)``)."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def generate(self, params: SamplingParams, logits_processors: Processors = None,
                 on_token: TokenHook | None = None) -> Completion:
        return self.backend.generate_sessions([self], params, logits_processors, on_token)[0]


class LMBackend(ABC):
    model_id: str
    # of: batch, stream, chat, fork, kv_shared_fork, rollback, prefix_cache, token_ids, logits_processors, token_hook
    supports: frozenset[str]

    @abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams, logits_processors: Processors = None,
                 on_token: TokenHook | None = None) -> list[Completion]:
        """Complete every prompt (batched where the backend can); ``logits_processors`` and
        ``on_token`` apply to each prompt's request."""

    @abstractmethod
    def stream(self, prompt: str, params: SamplingParams, logits_processors: Processors = None) -> Iterator[str]:
        """The completion's text, piece by piece as it is decoded."""

    @abstractmethod
    def chat(self, messages: list[dict], params: SamplingParams, logits_processors: Processors = None) -> Completion: ...

    @abstractmethod
    def session(self, prompt: str) -> Session: ...

    @abstractmethod
    def generate_sessions(self, sessions: list[Session], params: SamplingParams, logits_processors: Processors = None,
                          on_token: TokenHook | None = None) -> list[Completion]:
        """Continue every session (batched where the backend can); each session's text grows. A
        session its hook pauses stops there (finish_reason "pause") and keeps its KV cache."""

    def require(self, feature: str) -> None:
        if feature not in self.supports:
            raise UnsupportedFeature(f"{self.describe()} does not support {feature!r} (it supports {sorted(self.supports)})")

    def describe(self) -> str:
        return f"{type(self).__name__}({self.model_id})"


# --- in process --------------------------------------------------------------------------------

class LocalSession(Session):
    def __init__(self, backend: "LocalBackend", seq: SequenceKV):
        self.backend, self.seq = backend, seq

    @property
    def tokens(self) -> list[int]:
        return list(self.seq.tokens)

    @property
    def text(self) -> str:
        return self.backend.engine.tokenizer.decode(self.seq.tokens, skip_special=False)

    def extend(self, text: str) -> None:
        self.backend.engine.extend(self.seq, text)

    def fork(self) -> "LocalSession":
        return LocalSession(self.backend, self.backend.engine.fork(self.seq))

    def rollback(self, length: int) -> None:
        self.backend.engine.rollback(self.seq, length)

    def close(self) -> None:
        self.backend.engine.close(self.seq)

    def __len__(self) -> int:
        return len(self.seq.tokens)


class LocalBackend(LMBackend):
    """The model in this process (one thread drives the engine: do not share across threads)."""

    supports = frozenset({"batch", "stream", "chat", "fork", "kv_shared_fork", "rollback", "prefix_cache", "token_ids",
                          "logits_processors", "token_hook"})

    def __init__(self, engine: LMEngine):
        self.engine = engine
        self.model_id = engine.model_id

    @classmethod
    def load(cls, model: str | None = None, **options) -> "LocalBackend":
        return cls(LMEngine.load(model, **options))

    def generate(self, prompts, params, logits_processors=None, on_token=None):
        return self.engine.generate(list(prompts), params, logits_processors or (), on_token)

    def stream(self, prompt, params, logits_processors=None):
        request = self.engine.submit(self.engine.open(prompt), params, owns_sequence=True,
                                     logits_processors=logits_processors or ())
        try:
            while not request.finished:
                self.engine.step()
                piece = request.take_text()
                if piece:
                    yield piece
            tail = request.take_text()
            if tail:
                yield tail
        finally:
            self.engine.abort(request)

    def chat(self, messages, params, logits_processors=None):
        return self.generate([self.engine.tokenizer.render_chat(messages)], params, logits_processors)[0]

    def session(self, prompt):
        return LocalSession(self, self.engine.open(prompt))

    def generate_sessions(self, sessions, params, logits_processors=None, on_token=None):
        requests = [self.engine.submit(s.seq, params, logits_processors=logits_processors or (), on_token=on_token)
                    for s in sessions]
        self.engine.run(requests)
        for r in requests:
            if r.paused:
                self.engine.end(r)  # the session keeps its tokens and KV cache: roll back, extend, generate on
        return [self.engine.completion(r) for r in requests]


# --- over HTTP ---------------------------------------------------------------------------------

class RemoteSession(Session):
    def __init__(self, backend: "OpenAIBackend", text: str):
        self.backend, self._text = backend, text

    @property
    def text(self) -> str:
        return self._text

    def extend(self, text: str) -> None:
        self._text += text

    def fork(self) -> "RemoteSession":
        return RemoteSession(self.backend, self._text)  # the endpoint recomputes (or prefix-caches) it

    def rollback(self, length: int) -> None:
        raise UnsupportedFeature(
            f"{self.backend.describe()} cannot roll a session back to a token position: an OpenAI-compatible "
            "endpoint exposes neither token ids nor its KV cache (use LocalBackend, or keep the text you want to return to)")

    def close(self) -> None:
        self._text = ""

    def __len__(self) -> int:
        raise UnsupportedFeature(f"{self.backend.describe()} does not expose token counts of a session's text")


class OpenAIBackend(LMBackend):
    """Any OpenAI-compatible HTTP endpoint (``base_url`` ends in ``/v1``)."""

    supports = frozenset({"batch", "stream", "chat", "fork"})

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0, max_parallel: int = 16):
        self.base_url, self.model_id, self.max_parallel = base_url.rstrip("/"), model, max_parallel
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def describe(self) -> str:
        return f"the OpenAI-compatible endpoint {self.base_url} (model {self.model_id})"

    def _body(self, params: SamplingParams, **fields) -> dict:
        body = {"model": self.model_id, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, **fields}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _post(self, path: str, body: dict) -> dict:
        response = self.client.post(path, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{self.describe()}: {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def _completion(self, data: dict, text: str) -> Completion:
        usage = data.get("usage") or {}
        return Completion(text=text, tokens=[], finish_reason=data["choices"][0].get("finish_reason") or "stop",
                          prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
                          time_to_first_token_s=float("nan"), latency_s=float("nan"))

    def _in_process_only(self, logits_processors, on_token=None) -> None:
        if logits_processors:
            self.require("logits_processors")
        if on_token is not None:
            self.require("token_hook")

    def _complete_one(self, prompt: str, params: SamplingParams) -> Completion:
        data = self._post("/completions", self._body(params, prompt=prompt))
        return self._completion(data, data["choices"][0]["text"])

    def generate(self, prompts, params, logits_processors=None, on_token=None):
        self._in_process_only(logits_processors, on_token)
        # concurrent requests: the endpoint batches them (continuous batching)
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_parallel, len(prompts)))) as pool:
            return list(pool.map(lambda p: self._complete_one(p, params), prompts))

    def stream(self, prompt, params, logits_processors=None):
        self._in_process_only(logits_processors)
        with self.client.stream("POST", "/completions", json=self._body(params, prompt=prompt, stream=True)) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"{self.describe()}: /completions answered {response.status_code}: {response.text[:500]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        yield choice["text"]

    def chat(self, messages, params, logits_processors=None):
        self._in_process_only(logits_processors)
        data = self._post("/chat/completions", self._body(params, messages=messages))
        return self._completion(data, data["choices"][0]["message"]["content"] or "")

    def session(self, prompt):
        return RemoteSession(self, prompt)

    def generate_sessions(self, sessions, params, logits_processors=None, on_token=None):
        completions = self.generate([s.text for s in sessions], params, logits_processors, on_token)
        for session, completion in zip(sessions, completions):
            session.extend(completion.text)
        return completions
