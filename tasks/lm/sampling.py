"""Sampling parameters, checked once, and the samplers that apply them to a row of logits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


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
