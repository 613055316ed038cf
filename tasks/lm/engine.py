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
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from tasks.lm.kvcache import CacheFullError, PagedKVCache, SequenceKV
from tasks.lm.lora import DEFAULT_TARGETS, LoraAdapter, LoraPool
from tasks.lm.model import Llama
from tasks.lm.sampling import InvalidRequest, SamplingParams, make_generator, sample
from tasks.lm.tokenizer import ChatTokenizer, build_tokenizer
from tasks.lm.weights import DEFAULT_MODEL_ID, LlamaConfig, load_checkpoint

_ids = itertools.count(1)


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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    prefix_reused: int = 0
    generator: torch.Generator | None = None
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
                 max_host_adapters: int = 1024):
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
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preempted": 0,
                      "adapter_loads": 0, "adapter_evictions": 0, "adapter_load_s": 0.0, "adapter_host_evictions": 0}
        # set to a list to record what each step computed and how long it took (:meth:`step`)
        self.step_log: list[dict] | None = None
        # LoRA: adapters in host memory (up to max_host_adapters, least recently used first) and the
        # ``lora_slots`` of them resident in the pool
        self.adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.max_host_adapters = max_host_adapters
        self.lora_pool = LoraPool(c, lora_slots + 1, lora_rank, tuple(lora_targets)) if lora_slots else None
        model.attach_lora(self.lora_pool)
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first
        self._free_slots = list(range(lora_slots, 0, -1))

    @classmethod
    def load(cls, model: str | None = None, weight_format: str = "int4", compiled_kernels: bool = True,
             **engine_options) -> "LMEngine":
        """The engine over a checkpoint: ``model`` is a GGUF file, a safetensors folder, or None
        for the shipped SmolLM2-135M-Instruct; ``compiled_kernels=False`` decodes in plain torch
        instead of the compiled kernels (tasks.lm.kernels)."""
        config, weights, meta = load_checkpoint(model)
        llama = Llama.from_weights(config, weights, weight_format, meta.get("q4_1"), compiled_kernels)
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
    def add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Register ``adapter`` under ``name`` (in host memory; it enters a pool slot when a request
        needs it). Re-registering a name replaces its weights, in its slot too."""
        if self.lora_pool is None:
            raise ValueError("this engine serves no LoRA adapters: create it with lora_slots > 0")
        self.lora_pool.check(adapter)
        replaced = name in self.adapters
        self.adapters[name] = adapter
        self.adapters.move_to_end(name)
        if name in self._resident:
            self.lora_pool.load(self._resident[name], adapter)
        if replaced:
            self.cache.clear_prefix_cache()  # prefixes computed with the old weights are no longer valid
        in_use = {r.seq.adapter for r in (*self.running, *self.waiting)} | {name}
        for old in [n for n in self.adapters if n not in in_use][:max(0, len(self.adapters) - self.max_host_adapters)]:
            self.remove_adapter(old)  # host memory full: the least recently used that nobody waits for
            self.stats["adapter_host_evictions"] += 1

    def remove_adapter(self, name: str) -> None:
        users = [r for r in (*self.running, *self.waiting) if r.seq.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is in use by {len(users)} request(s)")
        self.adapters.pop(name, None)
        if name in self._resident:
            self._free_slots.append(self._resident.pop(name))

    def adapter_slot(self, name: str | None) -> int:
        """The pool slot holding ``name`` (0: the base model)."""
        return 0 if name is None else self._resident[name]

    def _make_resident(self, name: str) -> bool:
        """Put ``name`` in a pool slot, evicting the least recently used adapter no running request
        uses; False when every slot is in use."""
        self.adapters.move_to_end(name)
        if name in self._resident:
            self._resident.move_to_end(name)
            return True
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            in_use = {r.seq.adapter for r in self.running}
            victim = next((n for n in self._resident if n not in in_use), None)
            if victim is None:
                return False
            slot = self._resident.pop(victim)
            self.stats["adapter_evictions"] += 1
        started = time.perf_counter()
        self.lora_pool.load(slot, self.adapters[name])
        self.stats["adapter_load_s"] += time.perf_counter() - started
        self.stats["adapter_loads"] += 1
        self._resident[name] = slot
        return True

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
               tenant: str | None = None) -> Request:
        """Queue a request to generate onto ``seq`` (on behalf of ``tenant``, for fair admission)."""
        self._check_length(len(seq.tokens))
        if seq.computed == len(seq.tokens):  # all cached (after a rollback): recompute the last token for its logits
            last = seq.tokens[-1]
            self.cache.truncate(seq, len(seq.tokens) - 1)
            seq.tokens.append(last)
        request = Request(seq=seq, params=params, owns_sequence=owns_sequence, tenant=tenant,
                          prompt_tokens=len(seq.tokens), generator=make_generator(params))
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
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
                self._accept(request, sample(logits[row], request.params, request.generator))
                row += 1
                advanced.append(request)
        if self.step_log is not None:
            self.step_log.append({"tokens": len(batch.tokens), "sequences": len(work),
                                  "context_tokens": sum(end for _, _, end, _ in work),
                                  "adapters": len({seq.adapter for seq, *_ in work if seq.adapter is not None}),
                                  "seconds": time.perf_counter() - step_started})
        return advanced

    def run(self, requests: list[Request]) -> None:
        """Step until every one of ``requests`` has finished."""
        while not all(r.finished for r in requests):
            self.step()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams) -> list[Completion]:
        """Complete every prompt, batched together; sequences are freed afterwards."""
        requests = [self.submit(self.open(p), params, owns_sequence=True) for p in prompts]
        self.run(requests)
        return [self.completion(r) for r in requests]

    def completion(self, r: Request) -> Completion:
        if r.finish_reason == "error":
            raise CacheFullError(r.error)
        return Completion(
            text=r.text, tokens=list(r.generated), finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            time_to_first_token_s=(r.first_token_at or r.finished_at) - r.arrived,
            latency_s=r.finished_at - r.arrived, prefix_reused_tokens=r.prefix_reused)

    # --- scheduling -----------------------------------------------------------------------------
    def _next_waiting(self) -> Request:
        """The next request to admit: first come, first served, except that between tenants the one
        with the fewest running requests goes first (a tenant sending many cannot starve the rest)."""
        if all(r.tenant is None for r in self.running) and all(r.tenant is None for r in self.waiting):
            return self.waiting.popleft()
        running = {}
        for r in self.running:
            running[r.tenant] = running.get(r.tenant, 0) + 1
        best = min(self.waiting, key=lambda r: running.get(r.tenant, 0))  # min keeps the earliest of ties
        self.waiting.remove(best)
        return best

    def _admit(self) -> None:
        deferred = []
        while self.waiting and len(self.running) < self.max_running:
            request = self._next_waiting()
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
        victim = max(candidates, key=lambda r: r.arrived)
        self.cache.release(victim.seq)
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        self.stats["preempted"] += 1
        return True

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
            self._finish(request, "length")

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
