"""Per-request logits processors: a request's processors shape its own row of logits before
sampling, under every sampler, and no other row in the batch."""

from __future__ import annotations

import pytest
import torch

from tasks.lm.backend import LocalBackend, OpenAIBackend, UnsupportedFeature
from tasks.lm.sampling import SamplingParams, TokenMask

SAMPLERS = {"greedy": dict(temperature=0), "temperature": dict(temperature=1.0, seed=3),
            "top_p": dict(temperature=0.8, top_p=0.9, seed=4), "top_k": dict(temperature=1.2, top_k=5, seed=5)}


def digits(engine) -> set[int]:
    ids = {engine.tokenizer.encode(str(d))[0] for d in range(10)}
    assert len(ids) == 10  # SmolLM2 gives every digit a token of its own
    return ids


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_token_mask_lets_only_its_tokens_be_generated(engine, sampler):
    allowed = digits(engine)
    params = SamplingParams(max_tokens=12, ignore_eos=True, **SAMPLERS[sampler])
    result = engine.generate(["My favourite animal is"], params, logits_processors=[TokenMask(allowed)])[0]
    assert len(result.tokens) == 12 and set(result.tokens) <= allowed
    assert result.text.isdigit()


def test_a_seeded_masked_request_repeats_and_other_rows_in_its_batch_are_unaffected(engine_fp32):
    """float32: a row's logits do not depend on what else is in the batch, so an unmasked row
    batched beside a masked one samples exactly what it samples alone."""
    engine = engine_fp32
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=11)
    mask = TokenMask(digits(engine))
    alone = engine.generate(["Once upon a time"], params)[0].tokens
    masked_seq, plain_seq = engine.open("My favourite animal is"), engine.open("Once upon a time")
    masked = engine.submit(masked_seq, params, owns_sequence=True, logits_processors=[mask])
    plain = engine.submit(plain_seq, params, owns_sequence=True)
    engine.run([masked, plain])
    assert plain.generated == alone
    assert set(masked.generated) <= digits(engine)
    again = engine.generate(["My favourite animal is"], params, logits_processors=[mask])[0]
    assert again.tokens == masked.generated


def test_processors_compose_in_order_and_a_mask_may_change_with_what_was_generated(engine):
    allowed = digits(engine)
    seven = engine.tokenizer.encode("7")[0]

    def no_seven(generated, logits):
        logits[seven] = float("-inf")
        return logits

    # even positions digits only, odd positions a comma only: "d,d,d,…"
    comma = engine.tokenizer.encode(",")[0]
    alternate = TokenMask(lambda generated: allowed if len(generated) % 2 == 0 else torch.tensor([comma]))
    params = SamplingParams(max_tokens=9, temperature=1.0, seed=2, ignore_eos=True)
    result = engine.generate(["Numbers:"], params, logits_processors=[alternate, no_seven])[0]
    assert result.tokens[1::2] == [comma] * 4
    assert set(result.tokens[::2]) <= allowed - {seven}


def test_a_processor_that_fails_ends_its_own_request_and_not_the_batch(engine):
    nothing = TokenMask(torch.zeros(engine.config.vocab_size, dtype=torch.bool))
    broken = engine.submit(engine.open("Hello"), SamplingParams(temperature=0, max_tokens=4), owns_sequence=True,
                           logits_processors=[nothing])
    fine = engine.submit(engine.open("Hello"), SamplingParams(temperature=0, max_tokens=4), owns_sequence=True)
    engine.run([broken, fine])
    assert broken.finish_reason == "error" and "allows no token" in broken.error
    assert fine.finish_reason == "length"
    with pytest.raises(RuntimeError, match="allows no token"):
        engine.completion(broken)
    with pytest.raises(ValueError, match=r"allowed token ids must be in \[0, 49152\); got \[49152\]"):
        TokenMask([1, 49152])([], torch.zeros(49152))


def test_the_local_backend_takes_processors_and_a_remote_one_says_it_cannot(engine):
    backend = LocalBackend(engine)
    allowed, params = digits(engine), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    mask = [TokenMask(allowed)]
    assert set(backend.generate(["Pick a number:"], params, mask)[0].tokens) <= allowed
    assert "".join(backend.stream("Pick a number:", params, mask)).isdigit()
    assert backend.chat([{"role": "user", "content": "Hi"}], params, mask).text.isdigit()
    session = backend.session("Pick a number:")
    assert set(session.generate(params, mask).tokens) <= allowed
    session.close()
    assert {"logits_processors", "token_hook"} <= backend.supports
    remote = OpenAIBackend("http://127.0.0.1:9/v1", engine.model_id)  # nothing listens: refused before any request
    with pytest.raises(UnsupportedFeature, match="does not support 'logits_processors'"):
        remote.generate(["Pick a number:"], params, mask)
