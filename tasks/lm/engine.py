"""The LM runtime: sequences in a paged KV cache, and a scheduler that decodes many at once.

A *sequence* is a token list whose keys and values live in the cache. Users open, fork, extend,
roll back and close sequences; a *request* asks for tokens to be generated onto one. Each
:meth:`LMEngine.step` is one forward pass over a flat batch (continuous batching):

1. every running request that is decoding contributes its one new token;
2. requests still prefilling contribute chunks of their prompt, up to ``max_batch_tokens`` in
   the step (chunked prefill, so a long prompt does not stall everyone else's decoding);
3. the rows that ended a sequence's known tokens are sampled, stop conditions checked, and the
   requests' text advanced.

A prompt starting with token blocks already in the cache reuses them (prefix caching); a fork
shares its parent's blocks; a rollback drops block references. None of these copy keys or values
except the one partly-filled block a writer shares (copy-on-write).

Beside the engine, and given to it: the scheduling policy (:mod:`tasks.lm.scheduling`: which
waiting request is admitted next) and the LoRA adapter cache (:mod:`tasks.lm.adapter_cache`).
A request may carry logits processors (:mod:`tasks.lm.sampling`: applied to its own row before
sampling) and a per-token hook (:class:`TokenEvent`) that continues, pauses or ends it at a token
boundary; a paused request keeps its KV cache and is rolled back and resumed with :meth:`LMEngine.resume`.
"""

from __future__ import annotations

import itertools
import time
from collections import ChainMap, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from tasks.lm.adapter_cache import EMPTY_STATS, AdapterCache
from tasks.lm.kvcache import CacheFullError, PagedKVCache, SequenceKV
from tasks.lm.lora import DEFAULT_TARGETS, LoraAdapter, LoraPool
from tasks.lm.model import Llama
from tasks.lm.sampling import (InvalidRequest, LogitsProcessor, SamplingParams, apply_processors, make_generator,
                               sample)
from tasks.lm.scheduling import FifoPolicy
from tasks.lm.tokenizer import ChatTokenizer, build_tokenizer
from tasks.lm.weights import (DEFAULT_MODEL_ID, LlamaConfig, WeightTransform, load_checkpoint, load_transform,
                              transform_weights)

_ids = itertools.count(1)

TokenAction = Literal["continue", "pause", "end"]


@dataclass(frozen=True)
class TokenEvent:
    """What a per-token hook sees: the request, the token it just generated, that token's position
    in the sequence (its index: rolling back to ``position`` drops it) and the visible text so far."""

    request: "Request"
    token: int
    position: int
    text: str


TokenHook = Callable[[TokenEvent], "TokenAction | None"]


@dataclass
class Request:
    """One generation onto a sequence, and what it has produced so far."""

    seq: SequenceKV
    params: SamplingParams
    owns_sequence: bool  # close the sequence when the request ends (server requests do)
    tenant: str | None = None  # whose request: admission is fair between tenants
    compute_s: float = 0.0  # its share of the forward passes it took part in (by rows): what it cost
    id: int = field(default_factory=lambda: next(_ids))
    prompt_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the visible completion so far, cut before any stop string
    emitted: int = 0  # characters of text already handed to a stream
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | "pause" (see LMEngine.end)
    error: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    prefix_reused: int = 0
    generator: torch.Generator | None = None
    logits_processors: tuple[LogitsProcessor, ...] = ()  # applied in order to this request's row of logits
    on_token: TokenHook | None = None  # called after each generated token that does not end the request
    paused: bool = False  # by its hook: out of the batch, its KV cache kept (:meth:`LMEngine.resume`)
    failure: BaseException | None = None  # what its processors or hook raised, when that ended it
    _read_offset: int = 0
    _prefix_offset: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def take_text(self) -> str:
        """Text not yet handed out that can no longer change: the tail that might begin a stop
        string is held back until the next token settles it."""
        safe = len(self.text)
        if not self.finished:
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        delta = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    latency_s: float
    prefix_reused_tokens: int = 0


class LMEngine:
    """Sequences, a paged KV cache and the continuous-batching scheduler over one model."""

    def __init__(self, model: Llama, tokenizer: ChatTokenizer, *, model_id: str = DEFAULT_MODEL_ID,
                 kv_cache_mib: int = 1024, block_size: int = 16, kv_dtype: torch.dtype | None = None,
                 max_batch_tokens: int = 256, max_running: int = 64, prefix_caching: bool = True,
                 lora_slots: int = 0, lora_rank: int = 16, lora_targets: tuple[str, ...] = DEFAULT_TARGETS,
                 max_host_adapters: int = 1024, policy: FifoPolicy | None = None,
                 adapter_cache: AdapterCache | None = None):
        """``policy`` orders admission (default :class:`~tasks.lm.scheduling.FifoPolicy`);
        ``adapter_cache`` holds the LoRA adapters served (default: one of ``lora_slots`` slots of
        ``lora_rank`` on ``lora_targets`` and ``max_host_adapters`` in host memory; none when
        ``lora_slots`` is 0)."""
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.config: LlamaConfig = model.config
        if kv_dtype is None:
            kv_dtype = torch.float32 if model.weight_format == "float32" else torch.bfloat16
        c = self.config
        bytes_per_block = 2 * c.n_layers * block_size * c.n_kv_heads * c.head_dim * torch.finfo(kv_dtype).bits // 8
        n_blocks = max(2, kv_cache_mib * 2**20 // bytes_per_block)
        self.cache = PagedKVCache(c, n_blocks, block_size, kv_dtype)
        self.max_batch_tokens, self.max_running, self.prefix_caching = max_batch_tokens, max_running, prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.policy = policy or FifoPolicy()
        if adapter_cache is None and lora_slots:
            adapter_cache = AdapterCache(LoraPool(c, lora_slots + 1, lora_rank, tuple(lora_targets)), max_host_adapters)
        self.adapter_cache = adapter_cache
        self.lora_pool = adapter_cache.pool if adapter_cache else None
        model.attach_lora(self.lora_pool)
        # one view of the engine's counters and its adapter cache's (each side writes its own)
        self.stats = ChainMap({"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preempted": 0},
                              adapter_cache.stats if adapter_cache else dict(EMPTY_STATS))
        # set to a list to record what each step computed and how long it took (:meth:`step`)
        self.step_log: list[dict] | None = None

    @classmethod
    def load(cls, model: str | None = None, weight_format: str = "int4", compiled_kernels: bool = True,
             transform: WeightTransform | str | None = None, **engine_options) -> "LMEngine":
        """The engine over a checkpoint: ``model`` is a GGUF file, a safetensors folder, or None
        for the shipped SmolLM2-135M-Instruct; ``compiled_kernels=False`` decodes in plain torch
        instead of the compiled kernels (tasks.lm.kernels); ``transform(name, weight)`` rewrites
        each named float32 weight before the model is built (:func:`tasks.lm.weights.transform_weights`;
        a command line names it ``package.module:function``)."""
        config, weights, meta = load_checkpoint(model)
        q4_1 = meta.get("q4_1")
        if transform is not None:
            transform = load_transform(transform) if isinstance(transform, str) else transform
            weights, q4_1 = transform_weights(weights, q4_1 or {}, transform)
        llama = Llama.from_weights(config, weights, weight_format, q4_1, compiled_kernels)
        model_id = DEFAULT_MODEL_ID if model in (None, "", DEFAULT_MODEL_ID) else meta["name"]
        return cls(llama, build_tokenizer(meta), model_id=model_id, **engine_options)

    # --- sequences ----------------------------------------------------------------------------
    def tokens_of(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.config.vocab_size})", param="prompt")
        return list(prompt)

    def open(self, prompt: str | list[int], adapter: str | None = None) -> SequenceKV:
        """A sequence holding ``prompt``, computed with the LoRA ``adapter`` (a registered name; None
        for the base model); its keys and values are computed when it first runs."""
        tokens = self.tokens_of(prompt)
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if adapter is not None and adapter not in self.adapters:
            raise InvalidRequest(f"no adapter named {adapter!r} is registered", param="model", code="model_not_found")
        self._check_length(len(tokens))
        return self.cache.open(tokens, adapter)

    def extend(self, seq: SequenceKV, text: str | list[int]) -> None:
        """Append tokens (e.g. a tool result or the next user turn) to a sequence."""
        tokens = self.tokens_of(text)
        self._check_length(len(seq.tokens) + len(tokens))
        seq.tokens.extend(tokens)

    def fork(self, seq: SequenceKV) -> SequenceKV:
        """A copy of ``seq`` that shares its cached blocks; each goes on independently."""
        return self.cache.fork(seq)

    def rollback(self, seq: SequenceKV, length: int) -> None:
        """Cut ``seq`` back to its first ``length`` tokens (no recomputation)."""
        self.cache.truncate(seq, length)

    def close(self, seq: SequenceKV) -> None:
        self.cache.release(seq)

    def _check_length(self, n: int) -> None:
        if n >= self.config.context_length:
            raise InvalidRequest(
                f"the prompt has {n} tokens; this model's context is {self.config.context_length} tokens "
                "and at least one must be left to generate", param="prompt", code="context_length_exceeded")

    # --- LoRA adapters --------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, LoraAdapter]:
        """The adapters held in host memory, by name (least recently used first)."""
        return self.adapter_cache.adapters if self.adapter_cache else {}

    def _adapters_in_use(self, waiting: bool = True) -> set[str]:
        requests = (*self.running, *self.waiting) if waiting else self.running
        return {r.seq.adapter for r in requests if r.seq.adapter is not None}

    def add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Register ``adapter`` under ``name`` (in host memory; it enters a pool slot when a request
        needs it). Re-registering a name replaces its weights, in its slot too."""
        if self.adapter_cache is None:
            raise ValueError("this engine serves no LoRA adapters: create it with lora_slots > 0")
        if self.adapter_cache.add(name, adapter, self._adapters_in_use()):
            self.cache.clear_prefix_cache()  # prefixes computed with the old weights are no longer valid

    def remove_adapter(self, name: str) -> None:
        users = [r for r in (*self.running, *self.waiting) if r.seq.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is in use by {len(users)} request(s)")
        if self.adapter_cache is not None:
            self.adapter_cache.remove(name)

    def adapter_slot(self, name: str | None) -> int:
        """The pool slot holding ``name`` (0: the base model)."""
        return 0 if name is None else self.adapter_cache.slot(name)

    def _make_resident(self, name: str) -> bool:
        """Put ``name`` in a pool slot; False when every slot serves a running request."""
        return self.adapter_cache.make_resident(name, self._adapters_in_use(waiting=False))

    @torch.no_grad()
    def score(self, tokens: list[int], adapter: str | None = None) -> torch.Tensor:
        """Next-token logits [len(tokens), vocab] at every position of ``tokens`` (teacher forcing,
        one prefill, nothing cached afterwards): for evaluation and perplexity."""
        seq = self.open(tokens, adapter)
        if adapter is not None and not self._make_resident(adapter):
            raise RuntimeError(f"no LoRA slot is free for {adapter!r}: every slot serves a running request")
        try:
            self.cache.reserve(seq, len(seq.tokens))
            batch = self.model.flat_batch(self.cache, [(seq, 0, len(seq.tokens), True)],
                                          [self.adapter_slot(adapter)] if self.lora_pool else None)
            batch.logit_rows = torch.arange(len(seq.tokens))
            return self.model(batch, self.cache)
        finally:
            self.cache.release(seq)

    # --- requests -------------------------------------------------------------------------------
    def submit(self, seq: SequenceKV, params: SamplingParams, owns_sequence: bool = False,
               tenant: str | None = None, logits_processors: Sequence[LogitsProcessor] = (),
               on_token: TokenHook | None = None) -> Request:
        """Queue a request to generate onto ``seq`` (on behalf of ``tenant``, for the policy).

        ``logits_processors`` (``fn(generated, logits) -> logits``, e.g.
        :class:`~tasks.lm.sampling.TokenMask`) are applied in order to this request's row of logits
        before sampling. ``on_token(event)`` is called after each generated token that does not end
        the request by itself and answers ``"continue"`` (or None), ``"pause"`` (the request leaves
        the batch and keeps its KV cache: :meth:`resume`) or ``"end"`` (finished, reason "stop").
        A processor or hook that raises ends its request alone (reason "error")."""
        self._check_length(len(seq.tokens))
        self._recompute_last(seq)
        request = Request(seq=seq, params=params, owns_sequence=owns_sequence, tenant=tenant,
                          prompt_tokens=len(seq.tokens), generator=make_generator(params),
                          logits_processors=tuple(logits_processors), on_token=on_token)
        self.waiting.append(request)
        return request

    def _recompute_last(self, seq: SequenceKV) -> None:
        """A sequence whose tokens are all cached (after a rollback) recomputes its last one, for its logits."""
        if seq.computed == len(seq.tokens):
            last = seq.tokens[-1]
            self.cache.truncate(seq, len(seq.tokens) - 1)
            seq.tokens.append(last)

    def resume(self, request: Request, *, rollback_to: int | None = None, append: str | list[int] | None = None,
               params: SamplingParams | None = None) -> Request:
        """Continue a request its hook paused: first cut its sequence back to ``rollback_to`` tokens
        (no less than its prompt; the kept tokens' keys and values are reused, nothing is
        recomputed), then append ``append`` (text or token ids: a forced continuation, part of the
        completion and counted against ``max_tokens``), then generate on, with ``params`` if given."""
        if not request.paused:
            raise ValueError(f"request {request.id} is not paused (finish_reason {request.finish_reason!r})")
        seq = request.seq
        if rollback_to is not None:
            if not request.prompt_tokens <= rollback_to <= len(seq.tokens):
                raise ValueError(f"rollback_to must be in [{request.prompt_tokens}, {len(seq.tokens)}] "
                                 f"(the prompt to the sequence's length); got {rollback_to}")
            self.cache.truncate(seq, rollback_to)
            self._retext(request, request.generated[:rollback_to - request.prompt_tokens])
        if append is not None:
            forced = self.tokens_of(append)
            self._check_length(len(seq.tokens) + len(forced))
            seq.tokens.extend(forced)
            self._retext(request, request.generated + forced)
        if params is not None:
            request.params = params
            request.generator = make_generator(params)
        self._recompute_last(seq)
        request.paused = False
        self.waiting.append(request)
        return request

    def _retext(self, request: Request, generated: list[int]) -> None:
        """Make ``generated`` the request's completion, its text decoded as if streamed token by token."""
        request.generated, request.text = [], ""
        request._prefix_offset = request._read_offset = 0
        for token in generated:
            request.generated.append(token)
            request.text += self._detokenize(request)
        request.emitted = min(request.emitted, len(request.text))

    def end(self, request: Request) -> None:
        """Finish a paused request where it stands (reason "pause"); its sequence is released only
        if the request owns it, so a session keeps its tokens and KV cache."""
        if not request.paused:
            raise ValueError(f"request {request.id} is not paused")
        request.paused = False
        self._finish(request, "pause")

    def abort(self, request: Request) -> None:
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        request.paused = False
        self._finish(request, "abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Request]:
        """One forward pass over every runnable request; returns the requests that advanced.

        With :attr:`step_log` a list, each step appends what it computed: ``tokens`` (rows of the
        forward), ``sequences``, ``context_tokens`` (cached keys the sequences attend to, the new
        ones included), ``adapters`` (distinct ones in the batch) and ``seconds`` (the whole step:
        admission, scheduling, forward and sampling)."""
        step_started = time.perf_counter()
        self._admit()
        work, scheduled = self._schedule()
        if not work:
            return []
        slots = [self.adapter_slot(seq.adapter) for seq, *_ in work] if self.lora_pool else None
        batch = self.model.flat_batch(self.cache, work, slots)
        started = time.perf_counter()
        logits = self.model(batch, self.cache)
        per_row = (time.perf_counter() - started) / len(batch.tokens)
        self.stats["steps"] += 1
        advanced, row = [], 0
        for request, (seq, start, end, want_logits) in zip(scheduled, work):
            request.compute_s += per_row * (end - start)
            self.cache.commit(seq, end)
            self.stats["prefill_tokens" if end - start > 1 or not request.generated else "decode_tokens"] += end - start
            if want_logits:
                token = self._sample(request, logits[row])
                if token is not None:
                    self._accept(request, token)
                row += 1
                advanced.append(request)
        if self.step_log is not None:
            self.step_log.append({"tokens": len(batch.tokens), "sequences": len(work),
                                  "context_tokens": sum(end for _, _, end, _ in work),
                                  "adapters": len({seq.adapter for seq, *_ in work if seq.adapter is not None}),
                                  "seconds": time.perf_counter() - step_started})
        return advanced

    def run(self, requests: list[Request]) -> None:
        """Step until every one of ``requests`` has finished or been paused."""
        while not all(r.finished or r.paused for r in requests):
            self.step()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams,
                 logits_processors: Sequence[LogitsProcessor] = (), on_token: TokenHook | None = None
                 ) -> list[Completion]:
        """Complete every prompt, batched together; sequences are freed afterwards (a request its
        hook pauses ends there, reason "pause")."""
        requests = [self.submit(self.open(p), params, owns_sequence=True, logits_processors=logits_processors,
                                on_token=on_token) for p in prompts]
        self.run(requests)
        for r in requests:
            if r.paused:
                self.end(r)
        return [self.completion(r) for r in requests]

    def completion(self, r: Request) -> Completion:
        if r.failure is not None:
            raise RuntimeError(f"request {r.id} failed: {r.error}") from r.failure
        if r.finish_reason == "error":
            raise CacheFullError(r.error)
        return Completion(
            text=r.text, tokens=list(r.generated), finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            time_to_first_token_s=(r.first_token_at or r.finished_at) - r.arrived,
            latency_s=r.finished_at - r.arrived, prefix_reused_tokens=r.prefix_reused)

    # --- scheduling -----------------------------------------------------------------------------
    def _admit(self) -> None:
        deferred = []
        while self.waiting and len(self.running) < self.max_running:
            request = self.policy.next_request(self.waiting, self.running)
            if request is None:
                break
            self.waiting.remove(request)
            if request.seq.adapter is not None and not self._make_resident(request.seq.adapter):
                deferred.append(request)  # every slot holds an adapter a running request uses
                continue
            if self.prefix_caching and request.seq.computed == 0:
                if self._prefix_being_computed(request.seq):
                    deferred.append(request)  # admitted once those blocks are cached, to reuse them
                    continue
                request.prefix_reused = self.cache.reuse_prefix(request.seq)
            if self.running and self.cache.blocks_needed(request.seq, len(request.seq.tokens) + 1) > self.cache.n_free:
                self.waiting.appendleft(request)  # wait for blocks rather than preempt a running request
                break
            self.running.append(request)
        self.waiting.extendleft(reversed(deferred))

    def _prefix_being_computed(self, seq: SequenceKV) -> bool:
        """Whether a running request is prefilling at least two blocks this sequence starts with
        that are not cached yet (concurrent requests for one document, a fork of an unrun prompt)."""
        bs = self.cache.block_size
        cached = self.cache.cached_prefix_length(seq.tokens, seq.adapter)
        for other in self.running:
            if len(other.seq.tokens) - other.seq.computed <= 1 or other.seq.adapter != seq.adapter:
                continue
            common = 0
            for a, b in zip(seq.tokens, other.seq.tokens):
                if a != b:
                    break
                common += 1
            if (min(common, len(seq.tokens) - 1) // bs) * bs - cached >= 2 * bs:
                return True
        return False

    def _schedule(self) -> tuple[list[tuple], list[Request]]:
        budget = self.max_batch_tokens
        decoding = [r for r in self.running if len(r.seq.tokens) - r.seq.computed == 1]
        if self.lora_pool:  # one adapter's rows side by side: one LoRA segment each
            decoding.sort(key=lambda r: self.adapter_slot(r.seq.adapter))
        prefilling = [r for r in self.running if len(r.seq.tokens) - r.seq.computed > 1]
        work, scheduled = [], []
        for request in decoding + prefilling:
            if budget <= 0:
                break
            if request not in self.running:
                continue  # preempted earlier in this step
            seq = request.seq
            n = min(len(seq.tokens) - seq.computed, budget)
            if not self._reserve(request, seq.computed + n, scheduled):
                continue
            end = seq.computed + n
            work.append((seq, seq.computed, end, end == len(seq.tokens)))
            scheduled.append(request)
            budget -= n
        return work, scheduled

    def _reserve(self, request: Request, length: int, scheduled: list[Request]) -> bool:
        """Blocks for ``request`` up to ``length``, preempting later arrivals if the cache is full.
        A request that cannot fit even alone ends with an error instead of waiting forever."""
        while True:
            try:
                self.cache.reserve(request.seq, length)
                return True
            except CacheFullError as exc:
                if self._preempt(exclude=[*scheduled, request]):
                    continue
                if not scheduled:
                    self._finish(request, "error", error=f"the request needs more KV cache than is free: {exc}")
                return False

    def _preempt(self, exclude: list[Request]) -> bool:
        """Free the latest-arrived running request's blocks; it recomputes when re-admitted."""
        candidates = [r for r in self.running if r not in exclude and r.seq.blocks]
        if not candidates:
            return False
        victim = self.policy.preemption_victim(candidates)
        self.cache.release(victim.seq)
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        self.stats["preempted"] += 1
        return True

    def _sample(self, request: Request, logits: torch.Tensor) -> int | None:
        """The request's next token from its row of logits, after its processors; None (and the
        request ended with an error) if a processor raised."""
        try:
            if request.logits_processors:
                logits = apply_processors(request.logits_processors, request.generated, logits)
            return sample(logits, request.params, request.generator)
        except Exception as exc:  # the caller's code: fail this request, not the batch
            request.failure = exc
            self._finish(request, "error", error=f"a logits processor failed: {exc!r}")
            return None

    def _accept(self, request: Request, token: int) -> None:
        now = time.perf_counter()
        request.first_token_at = request.first_token_at or now
        request.generated.append(token)
        request.seq.tokens.append(token)
        params = request.params
        if token in self.tokenizer.eos_token_ids and not params.ignore_eos:
            return self._finish(request, "stop")
        before = len(request.text)
        request.text += self._detokenize(request)
        if params.stop:
            window = max(0, before - max(len(s) for s in params.stop) + 1)
            hits = [i for i in (request.text.find(s, window) for s in params.stop) if i >= 0]
            if hits:
                request.text = request.text[:min(hits)]
                return self._finish(request, "stop")
        if len(request.generated) >= params.max_tokens or len(request.seq.tokens) >= self.config.context_length:
            return self._finish(request, "length")
        if request.on_token is not None:
            self._ask_hook(request, token)

    def _ask_hook(self, request: Request, token: int) -> None:
        try:
            action = request.on_token(TokenEvent(request, token, len(request.seq.tokens) - 1, request.text))
        except Exception as exc:  # the caller's code: fail this request, not the batch
            request.failure = exc
            return self._finish(request, "error", error=f"the per-token hook failed: {exc!r}")
        if action == "end":
            self._finish(request, "stop")
        elif action == "pause":
            request.paused = True
            self.running.remove(request)
        elif action not in (None, "continue"):
            request.failure = ValueError(f"the per-token hook answered {action!r}")
            self._finish(request, "error", error=f"the per-token hook answered {action!r}; "
                                                  "expected 'continue', 'pause', 'end' or None")

    def _detokenize(self, request: Request) -> str:
        """New text from the latest token; waits while the bytes so far end mid-character."""
        ids = request.generated
        decode = self.tokenizer.decode
        prefix = decode(ids[request._prefix_offset:request._read_offset])
        text = decode(ids[request._prefix_offset:])
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""
        request._prefix_offset, request._read_offset = request._read_offset, len(ids)
        return text[len(prefix):]

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        request.finish_reason, request.error = reason, error
        request.finished_at = time.perf_counter()
        if request in self.running:
            self.running.remove(request)
        if request.owns_sequence:
            self.cache.release(request.seq)
