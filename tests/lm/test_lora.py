"""LoRA adapters on the LM runtime: PEFT's file format and meaning, many adapters in one batch equal
to each alone with its adapter merged into the weights, a pool of resident adapters loaded on
demand, and adapter files checked at the door."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.lm.engine import LMEngine
from tasks.lm.lora import (MODULES, AdapterError, LoraPool, load_adapter, merge_into, random_adapter, save_adapter,
                           segments_of)
from tasks.lm.model import Llama
from tasks.lm.sampling import InvalidRequest, SamplingParams
from tasks.lm.tokenizer import build_tokenizer
from tasks.lm.weights import default_model_path, load_checkpoint

ALL = tuple(MODULES)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(None)


@pytest.fixture(scope="module")
def adapters(checkpoint):
    config = checkpoint[0]
    return {"attn": random_adapter(config, rank=8, seed=1, std=0.05, name="attn"),
            "mlp": random_adapter(config, rank=4, targets=("gate_proj", "up_proj", "down_proj"), seed=2, std=0.05, name="mlp"),
            "qv": random_adapter(config, rank=16, targets=("q_proj", "v_proj"), seed=3, std=0.05, name="qv")}


def fp32_engine(checkpoint, weights=None, **options) -> LMEngine:
    config, base, meta = checkpoint
    model = Llama.from_weights(config, weights or base, "float32")
    return LMEngine(model, build_tokenizer(meta), kv_cache_mib=32, **options)


@pytest.fixture(scope="module")
def served(checkpoint, adapters):
    engine = fp32_engine(checkpoint, lora_slots=4, lora_rank=16, lora_targets=ALL)
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    return engine


def test_segments_are_runs_of_rows_with_one_adapter():
    assert segments_of([0, 2, 2, 1, 0, 0, 1, 1]) == [(1, 3, 2), (3, 4, 1), (6, 8, 1)]
    assert segments_of([0, 0]) == [] and segments_of([]) == []


def test_one_batch_of_different_adapters_equals_each_request_alone_on_merged_weights(checkpoint, adapters, served):
    """Requests for three adapters and the base model decode together; each gives the tokens and
    logits of a plain model whose weights have its adapter merged in."""
    config, weights, _ = checkpoint
    prompts = {"attn": "The capital of France is", "mlp": "def fibonacci(n):", "qv": "Once upon a time",
               None: "The capital of France is"}
    requests = {name: served.submit(served.open(prompt, name), GREEDY, owns_sequence=True)
                for name, prompt in prompts.items()}
    served.run(list(requests.values()))
    base_tokens = requests[None].generated
    for name, adapter in adapters.items():
        merged = fp32_engine(checkpoint, merge_into(weights, adapter, config))
        alone = merged.generate([prompts[name]], GREEDY)[0]
        assert requests[name].generated == alone.tokens
        ids = served.tokenizer.encode(prompts[name]) + alone.tokens
        assert (served.score(ids, name) - merged.score(ids)).abs().max() < 1e-3
    assert requests["attn"].generated != base_tokens  # the adapter changes the answer: it is applied
    assert requests[None].generated == fp32_engine(checkpoint).generate([prompts[None]], GREEDY)[0].tokens


def test_peft_reads_our_adapter_files_and_computes_our_logits(checkpoint, adapters, served, tmp_path):
    """An independent implementation: PEFT wraps transformers' model of the same GGUF file with the
    adapter folder we wrote, and gives the logits our runtime gives with the adapter."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    folder = save_adapter(adapters["attn"], tmp_path / "attn")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / default_model_path().name).symlink_to(default_model_path())
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=default_model_path().name,
                                                             dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, folder).eval()
    ids = served.tokenizer.encode("Adapters change what a model says about Paris.")
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert (served.score(ids, "attn") - expected).abs().max() < 1e-3


def test_adapters_beyond_the_pool_load_on_demand_and_the_least_recently_used_leaves(checkpoint, adapters, served):
    small = fp32_engine(checkpoint, lora_slots=2, lora_rank=16, lora_targets=ALL)
    for name, adapter in adapters.items():
        small.add_adapter(name, adapter)
    prompt = "A short story:"
    for name in ["attn", "mlp", "attn", "qv", "mlp"]:  # qv evicts mlp (attn was used later); mlp then evicts attn
        ours = small.submit(small.open(prompt, name), GREEDY, owns_sequence=True)
        small.run([ours])
        reference = served.submit(served.open(prompt, name), GREEDY, owns_sequence=True)
        served.run([reference])
        assert ours.generated == reference.generated
    assert small.stats["adapter_loads"] == 4 and small.stats["adapter_evictions"] == 2
    assert set(small.adapter_cache.resident) == {"qv", "mlp"}


def test_a_batch_needing_more_adapters_than_slots_waits_instead_of_failing(checkpoint, adapters):
    small = fp32_engine(checkpoint, lora_slots=1, lora_rank=16, lora_targets=ALL)
    for name, adapter in adapters.items():
        small.add_adapter(name, adapter)
    requests = [small.submit(small.open("Hello", name), GREEDY, owns_sequence=True) for name in adapters]
    small.step()
    assert len(small.running) == 1  # one slot: one adapter at a time
    small.run(requests)
    assert all(r.finish_reason == "length" for r in requests) and small.stats["adapter_loads"] == 3


def test_cached_prefixes_belong_to_the_adapter_that_computed_them(served):
    prompt = "Shared system prompt. " * 12
    first = served.submit(served.open(prompt, "attn"), GREEDY, owns_sequence=True)
    served.run([first])
    other = served.submit(served.open(prompt, "qv"), GREEDY, owns_sequence=True)
    again = served.submit(served.open(prompt, "attn"), GREEDY, owns_sequence=True)
    served.run([other, again])
    assert other.prefix_reused == 0 and again.prefix_reused >= 32
    assert again.generated == first.generated


def test_unknown_adapters_and_adapters_the_pool_cannot_hold_are_refused(checkpoint, served):
    with pytest.raises(InvalidRequest, match="no adapter named 'nope'") as caught:
        served.open("Hi", "nope")
    assert caught.value.code == "model_not_found"
    with pytest.raises(AdapterError, match="r=32 exceeds the pool's max rank 16"):
        served.add_adapter("big", random_adapter(checkpoint[0], rank=32))
    narrow = fp32_engine(checkpoint, lora_slots=1, lora_rank=8)
    with pytest.raises(AdapterError, match=r"target_modules \['gate_proj'\] are not served"):
        narrow.add_adapter("ffn", random_adapter(checkpoint[0], rank=8, targets=("q_proj", "gate_proj")))
    with pytest.raises(ValueError, match="lora_slots > 0"):
        fp32_engine(checkpoint).add_adapter("any", random_adapter(checkpoint[0]))
    with pytest.raises(ValueError, match="at least 2 slots"):
        LoraPool(checkpoint[0], 1, 8)


def test_an_adapter_folder_round_trips(checkpoint, adapters, tmp_path):
    adapter = adapters["mlp"]
    loaded = load_adapter(save_adapter(adapter, tmp_path / "mlp"), checkpoint[0])
    assert (loaded.rank, loaded.alpha, loaded.targets, loaded.name) == (4, 8.0, ("gate_proj", "up_proj", "down_proj"), "mlp")
    assert all(torch.equal(loaded.weights[k][0], a) and torch.equal(loaded.weights[k][1], b)
               for k, (a, b) in adapter.weights.items())


def _break(folder, what):
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    tensors = load_file(str(weights_path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if what == "no config":
        config_path.unlink()
    elif what == "bad json":
        config_path.write_text("{r: 8")
    elif what in ("rank", "targets", "alpha"):
        meta = json.loads(config_path.read_text())
        meta.update({"rank": {"r": 0}, "targets": {"target_modules": ["q_proj", "attention"]},
                     "alpha": {"lora_alpha": "big"}}[what])
        config_path.write_text(json.dumps(meta))
    elif what == "not safetensors":
        weights_path.write_bytes(b"not a tensor file")
    else:
        if what == "shape":
            tensors[key] = torch.zeros(8, 100)
        elif what == "unknown tensor":
            tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 576)
        elif what == "missing B":
            del tensors[key.replace("lora_A", "lora_B")]
        elif what == "nan":
            tensors[key] = torch.full((8, 576), float("nan"))
        elif what == "layer":
            tensors[key.replace("layers.0.", "layers.30.")] = tensors[key].clone()
        save_file(tensors, str(weights_path))


@pytest.mark.parametrize("what,message", [
    ("no config", "adapter_config.json: missing"),
    ("bad json", "adapter_config.json: not valid JSON"),
    ("rank", r"adapter_config.json: r must be an integer in 1..256 \(got 0\)"),
    ("alpha", r"adapter_config.json: lora_alpha must be a positive number \(got 'big'\)"),
    ("targets", r"adapter_config.json: target_modules must list modules of .* \(got \['q_proj', 'attention'\]\)"),
    ("not safetensors", "adapter_model.safetensors: not a readable safetensors file"),
    ("shape", r"layers.0.self_attn.q_proj.lora_A.weight' has shape \[8, 100\]; r=8 on this model needs \[8, 576\]"),
    ("unknown tensor", "'base_model.model.lm_head.lora_A.weight' is not a LoRA weight of a Llama layer"),
    ("missing B", "layer 0 q_proj has no lora_B weight"),
    ("nan", "must hold finite floats"),
    ("layer", "layer 30 but the model has 30"),
])
def test_a_malformed_adapter_folder_is_refused_naming_the_file_and_the_field(checkpoint, adapters, tmp_path, what, message):
    folder = save_adapter(adapters["attn"], tmp_path / "broken")
    _break(folder, what)
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder, checkpoint[0])
