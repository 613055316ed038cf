"""The model runtime is SmolLM2 as an independent implementation (transformers' own GGUF loader)
computes it: same token ids, same logits to a stated tolerance, same greedy text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.lm.engine import LMEngine
from tasks.lm.batch import build_flat_batch
from tasks.lm.int4 import INT4_GROUP, int4_weight, quantize_int4
from tasks.lm.model import linear
from tasks.lm.sampling import SamplingParams
from tasks.lm.weights import ModelLoadError, default_model_path, load_checkpoint

transformers = pytest.importorskip("transformers")

PROMPTS = ["The quick brown fox 123 jumps", "def fibonacci(n):\n    "]
QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """A folder holding (a link to) the shipped GGUF, as transformers' loader wants."""
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / default_model_path().name).symlink_to(default_model_path())
    return folder


@pytest.fixture(scope="module")
def reference(gguf_dir):
    """transformers' tokenizer and float32 model, both built from the same GGUF file, offline."""
    name = default_model_path().name
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


def all_logits(engine: LMEngine, ids: list[int], int4_kernel: bool = False) -> torch.Tensor:
    """Our next-token logits at every position of ``ids`` (one prefill; with ``int4_kernel`` every
    row on the int4 codes, as decoding runs, instead of their bf16 copy)."""
    seq = engine.cache.open(ids)
    engine.cache.reserve(seq, len(ids))
    batch = build_flat_batch(engine.cache, [(seq, 0, len(ids), True)], engine.config.n_heads // engine.config.n_kv_heads)
    batch.logit_rows = torch.arange(len(ids))
    batch.int4_rows = len(ids) if int4_kernel else 0
    try:
        return engine.model(batch, engine.cache)
    finally:
        engine.close(seq)


def test_tokenizer_round_trips_text_and_matches_the_reference_ids(engine, reference):
    tokenizer, _ = reference
    for text in ["Digits 1234567 split one by one", "accents: déjà vu, naïve", "中文 and emoji 😀🚀",
                 "tabs\tand  double  spaces", engine.tokenizer.render_chat([{"role": "user", "content": "hi"}])]:
        ids = engine.tokenizer.encode(text)
        assert engine.tokenizer.decode(ids, skip_special=False) == text
        assert ids == tokenizer(text, add_special_tokens=False).input_ids


def test_chat_template_renders_chatml_with_the_default_system_prompt(engine):
    text = engine.tokenizer.render_chat([{"role": "user", "content": "Hello"}])
    assert text.startswith("<|im_start|>system\n") and "SmolLM" in text
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert engine.tokenizer.eos_token_ids == (2,) and engine.tokenizer.token_text(2) == "<|im_end|>"


def test_float32_logits_match_transformers_within_1e_3(engine_fp32, reference, chat):
    _, model = reference
    for text in PROMPTS + [chat(q) for q in QUESTIONS]:
        ids = engine_fp32.tokenizer.encode(text)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        assert (all_logits(engine_fp32, ids) - expected).abs().max().item() < 1e-3


def reference_greedy(model, ids: list[int], n: int, stop_at_eos: bool) -> list[int]:
    ids = torch.tensor([ids])
    # an explicit mask: generate() would otherwise infer one from pad_token_id, which for this
    # model is <|im_end|>, and mask every turn end in the prompt
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=2 if stop_at_eos else None)
    return out[0, ids.shape[1]:].tolist()


def test_float32_greedy_generation_equals_transformers_token_for_token(engine_fp32, reference, chat):
    _, model = reference
    prompts = [chat(QUESTIONS[1]), PROMPTS[1]]
    results = engine_fp32.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.tokens == reference_greedy(model, engine_fp32.tokenizer.encode(prompt), 16, stop_at_eos=False)


def test_int4_runs_the_files_own_codes_close_to_the_float_reference(engine, reference, chat):
    """The fast format (4-bit codes, bf16 activations and KV; prefill on their bf16 copy): the same chat answers up
    to where the reference itself all but ties (its two likeliest tokens within 0.1: a 4-bit rounding may pick
    either, and the answers then go their own ways), next-token choices agreeing with the reference at ≥ 95% of
    teacher-forced positions, logits within 1.5 (their range is about ±35)."""
    _, model = reference
    agree = total = 0
    for question in QUESTIONS:
        ids = engine.tokenizer.encode(chat(question))
        expected = reference_greedy(model, ids, 32, stop_at_eos=True)
        answer = engine.generate([ids], SamplingParams(temperature=0, max_tokens=32))[0]
        full = ids + expected
        with torch.no_grad():
            reference_logits = model(torch.tensor([full])).logits[0, len(ids) - 1:]
        diverged = next((i for i, (a, b) in enumerate(zip(answer.tokens, expected)) if a != b), None)
        if diverged is None:
            assert answer.tokens == expected
        else:
            top2 = reference_logits[diverged].topk(2).values
            assert top2[0] - top2[1] < 0.1, f"diverged at token {diverged} where the reference is sure"
        ours = all_logits(engine, full, int4_kernel=True)[len(ids) - 1:]
        assert (ours - reference_logits).abs().max().item() < 1.5
        agree += (ours.argmax(-1) == reference_logits.argmax(-1)).sum().item()
        total += len(expected) + 1
    assert agree / total >= 0.95


def test_the_capital_of_france_is_paris(engine, chat):
    result = engine.generate([chat("What is the capital of France?")], SamplingParams(temperature=0, max_tokens=20))[0]
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"


def test_a_safetensors_llama_folder_loads_and_matches_transformers(tmp_path, reference):
    """Any Llama checkpoint by path: a small random one, untied head, saved by transformers."""
    tokenizer, _ = reference
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 49152, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = LMEngine.load(str(tmp_path), weight_format="float32", kv_cache_mib=8)
    assert engine.config.n_layers == 2 and not engine.config.tied_embeddings
    ids = engine.tokenizer.encode("The quick brown fox 123 jumps over")
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert (all_logits(engine, ids) - expected).abs().max().item() < 1e-4


def test_int4_quantizes_a_float_checkpoint_it_has_no_codes_for(tmp_path, reference):
    tokenizer, _ = reference
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    exact = LMEngine.load(str(tmp_path), weight_format="float32", kv_cache_mib=4)
    quantized = LMEngine.load(str(tmp_path), weight_format="int4", kv_cache_mib=4)
    ids = exact.tokenizer.encode("hello world")
    reference_logits = all_logits(exact, ids)
    ours = all_logits(quantized, ids)
    assert not torch.equal(ours, reference_logits)
    assert torch.corrcoef(torch.stack([ours.flatten(), reference_logits.flatten()]))[0, 1] > 0.99


def test_int4_matmul_equals_the_dequantized_weights():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    codes, scale, minimum = quantize_int4(w)
    dequantized = (codes.float().view(96, -1, INT4_GROUP) * scale[..., None] + minimum[..., None]).view(96, 128)
    assert (dequantized - w).abs().max() <= scale.max() / 2 + 1e-6  # rounding to the nearest code
    x = torch.randn(5, 128)
    # the kernel rounds activations, scale and zero to bf16: a relative error of a few 1e-3
    expected = x @ dequantized.t()
    assert (linear(x, int4_weight(codes, scale, minimum)) - expected).abs().max() < 0.02 * expected.abs().max()


def test_bad_checkpoints_get_errors_naming_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="weights.bin: not a .gguf file"):
        load_checkpoint(not_gguf)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(ModelLoadError, match="corrupt.gguf"):
        load_checkpoint(corrupt)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type is 'gpt2'"):
        load_checkpoint(folder)
