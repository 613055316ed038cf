"""The per-token hook: a request can be paused at a token boundary with its KV cache kept, rolled
back, given a forced continuation and resumed, and the result is what a fresh generation from
that text computes, without recomputing the kept prefix."""

from __future__ import annotations

import pytest

from tasks.lm.backend import LocalBackend
from tasks.lm.sampling import SamplingParams


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


def pause_once_at(n_generated: int):
    """A hook that pauses the first time its request has generated ``n_generated`` tokens, and
    the events it saw."""
    seen, paused = [], []

    def hook(event):
        seen.append(event)
        if len(event.request.generated) == n_generated and not paused:
            paused.append(event)
            return "pause"
        return "continue"
    return hook, seen


def test_pause_rollback_and_a_forced_continuation_equal_a_fresh_generation_of_that_text(engine_fp32, chat):
    """float32, so computing a token in a prefill or in a decode step rounds alike."""
    engine = engine_fp32
    prompt = engine.tokenizer.encode(chat("Count from one to twenty in words, separated by commas."))
    hook, seen = pause_once_at(12)
    request = engine.submit(engine.open(prompt), greedy(40), owns_sequence=True, on_token=hook)
    engine.run([request])
    assert request.paused and not request.finished and len(request.generated) == 12
    assert not engine.has_work and request.seq.computed == len(prompt) + 11  # its KV cache is kept
    assert [e.position for e in seen] == list(range(len(prompt), len(prompt) + 12))
    assert [e.token for e in seen] == request.generated and seen[-1].text == engine.tokenizer.decode(request.generated)

    kept, forced = request.generated[:8], engine.tokenizer.encode(" and then, finally")
    prefill_before = engine.stats["prefill_tokens"]
    engine.resume(request, rollback_to=len(prompt) + 8, append=forced)
    assert request.generated == kept + forced and request.text == engine.tokenizer.decode(kept + forced)
    engine.run([request])
    assert request.finished and engine.stats["prefill_tokens"] - prefill_before == len(forced)  # the prefix is reused

    continuation = request.generated[len(kept) + len(forced):]
    fresh = engine.generate([prompt + kept + forced], greedy(40 - len(kept) - len(forced)))[0]
    assert continuation == fresh.tokens and request.finish_reason == fresh.finish_reason
    assert request.text == engine.tokenizer.decode(kept + forced) + fresh.text


def test_a_hook_can_end_a_request_at_a_boundary(engine):
    request = engine.submit(engine.open("Once upon a time"), greedy(30), owns_sequence=True,
                            on_token=lambda event: "end" if len(event.request.generated) == 5 else None)
    engine.run([request])
    assert request.finish_reason == "stop" and len(request.generated) == 5 and not engine.has_work


def test_a_paused_request_resumes_as_is_or_aborts_and_frees_its_blocks(engine):
    free = engine.cache.n_free
    request = engine.submit(engine.open("Once upon a time"), greedy(10), owns_sequence=True,
                            on_token=pause_once_at(4)[0])
    engine.run([request])
    assert request.paused and engine.cache.n_free < free
    with pytest.raises(ValueError, match=r"rollback_to must be in \[\d+, \d+\]"):
        engine.resume(request, rollback_to=1)
    engine.resume(request)  # no rollback, nothing forced: it goes on as if never paused
    engine.run([request])
    uninterrupted = engine.generate(["Once upon a time"], greedy(10))[0]
    assert request.generated == uninterrupted.tokens and request.finish_reason == "length"
    held = engine.submit(engine.open("Once upon a time"), greedy(10), owns_sequence=True, on_token=pause_once_at(2)[0])
    engine.run([held])
    engine.abort(held)
    assert held.finish_reason == "abort" and engine.cache.n_free == free
    with pytest.raises(ValueError, match="is not paused"):
        engine.resume(held)


def test_a_session_paused_by_its_hook_rolls_back_and_goes_on_without_recomputing(engine_fp32, chat):
    engine = engine_fp32
    backend = LocalBackend(engine)
    session = backend.session(chat("Name five animals, one per line."))
    start = len(session)
    hook, _ = pause_once_at(10)
    paused = session.generate(greedy(30), on_token=hook)
    assert paused.finish_reason == "pause" and len(session) == start + 10
    session.rollback(start + 6)
    session.extend("\nZebra")
    prefill_before = engine.stats["prefill_tokens"]
    resumed = session.generate(greedy(12))
    assert engine.stats["prefill_tokens"] - prefill_before == len(engine.tokenizer.encode("\nZebra"))
    fresh = engine.generate([session.tokens[:-len(resumed.tokens)]], greedy(12))[0]
    assert resumed.tokens == fresh.tokens
    session.close()
