"""Sampling parameters, checked once; per-request logits processors; and the samplers that apply
them to a row of logits.

A *logits processor* is ``fn(generated, logits) -> logits``: the request's generated token ids so
far and its own row of float32 next-token logits ``[vocab]``; it returns the row to sample from
(it may modify it in place). A request's processors run in order, on its row only, before
temperature, top-k, top-p or greedy choice, so whatever they forbid (logit -inf) is never sampled.
:class:`TokenMask` is the one most callers need: constrained decoding to an allowed set.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class InvalidRequest(ValueError):
    """A request the runtime refuses, naming the parameter and the value (``code``: OpenAI's
    error code where one applies, e.g. ``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop (OpenAI's meanings and defaults).

    temperature 0 is greedy; top_p keeps the smallest set of tokens whose probability reaches it;
    top_k (0 = off) keeps the k likeliest; stop strings end the text before them; max_tokens bounds
    the generated tokens; seed makes sampling repeatable."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer ≥ 1"),
            ("temperature", isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2, "a number in [0, 2]"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer ≥ 0"),
            ("stop", len(self.stop) <= 4 and all(isinstance(s, str) and s for s in self.stop), "up to 4 non-empty strings"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InvalidRequest(f"{name} must be {expected}; got {getattr(self, name)!r}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingParams(temperature=0.0)


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    return torch.Generator().manual_seed(params.seed if params.seed is not None else secrets.randbits(63))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of float32 logits."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p (the first is always kept)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


Allowed = Collection[int] | torch.Tensor  # token ids, or a bool mask [vocab]


class TokenMask:
    """A logits processor that lets only some tokens be sampled.

    ``allowed`` is a collection of token ids, a bool tensor ``[vocab]`` (True: allowed), or a
    callable ``allowed(generated) -> either`` asked at every token (a grammar, a plan's next
    legal tokens). A step that allows no token raises ValueError: the request ends with an error
    rather than sampling something forbidden."""

    def __init__(self, allowed: Allowed | Callable[[list[int]], Allowed]):
        self.allowed = allowed
        self._fixed: torch.Tensor | None = None  # the mask of a fixed ``allowed``, built at first use

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if callable(self.allowed):
            mask = self._mask(self.allowed(generated), logits.numel())
        else:
            if self._fixed is None or self._fixed.numel() != logits.numel():
                self._fixed = self._mask(self.allowed, logits.numel())
            mask = self._fixed
        return logits.masked_fill_(~mask, float("-inf"))

    @staticmethod
    def _mask(allowed: Allowed, vocab: int) -> torch.Tensor:
        if isinstance(allowed, torch.Tensor) and allowed.dtype == torch.bool:
            if allowed.shape != (vocab,):
                raise ValueError(f"a token mask must have shape ({vocab},), one entry per token; got {tuple(allowed.shape)}")
            mask = allowed
        else:
            ids = torch.as_tensor(list(allowed) if not isinstance(allowed, torch.Tensor) else allowed, dtype=torch.long)
            outside = ids[(ids < 0) | (ids >= vocab)]
            if outside.numel():
                raise ValueError(f"allowed token ids must be in [0, {vocab}); got {outside[:5].tolist()}")
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[ids] = True
        if not mask.any():
            raise ValueError("the token mask allows no token")
        return mask


def apply_processors(processors: Sequence[LogitsProcessor], generated: list[int], logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (one request's row) through each processor in turn."""
    for processor in processors:
        logits = processor(generated, logits)
    return logits
