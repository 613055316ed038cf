"""Other Llama GGUF files load the same way: a SentencePiece-tokenized one (as Llama 2 and TinyLlama
ship) with float32 tensors, written here by gguf's own writer, is read as transformers reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.lm.engine import LMEngine
from tests.lm.test_model import all_logits

sentencepiece = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXTS = ["The cat sat on the mat.", "  two leading spaces and 42 digits", "unseen: 中文 😀 ü", "line one\nline two"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A SentencePiece BPE trained on the shipped corpus, and a small random Llama around it."""
    from tasks.moe.corpus import load_corpus

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text(load_corpus()[:300_000])
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
        # as Llama's tokenizers are trained: no normalization at encode time, digits one by one
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    n = sp.get_piece_size()
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]

    heads, kv_heads, dim, layers = 4, 2, 64, 2
    rng = np.random.default_rng(0)
    tensor = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    # llama.cpp's convert script stores Q and K with each head's rotary pairs interleaved
    permute = lambda w, h: w.reshape(h, 2, w.shape[0] // h // 2, -1).swapaxes(1, 2).reshape(w.shape)  # noqa: E731
    path = folder / "tiny-spm-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(128)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_vocab_size(n)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_tensor("token_embd.weight", tensor(n, dim))
    writer.add_tensor("output_norm.weight", 1 + tensor(dim))
    writer.add_tensor("output.weight", tensor(n, dim))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + tensor(dim))
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(tensor(dim, dim), heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(tensor(kv_heads * 16, dim), kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", tensor(kv_heads * 16, dim))
        writer.add_tensor(f"blk.{i}.attn_output.weight", tensor(dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + tensor(dim))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", tensor(128, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", tensor(128, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", tensor(dim, 128))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, sp


def test_a_sentencepiece_gguf_tokenizes_as_sentencepiece_does(spm_gguf):
    path, sp = spm_gguf
    engine = LMEngine.load(str(path), weight_format="float32", kv_cache_mib=4)
    for text in TEXTS:
        ids = engine.tokenizer.encode(text)
        assert ids == [1, *sp.encode(text)]  # add_bos_token: true
        assert engine.tokenizer.decode(ids) == sp.decode(ids[1:])


def test_a_sentencepiece_gguf_computes_what_transformers_computes(spm_gguf):
    path, _ = spm_gguf
    engine = LMEngine.load(str(path), weight_format="float32", kv_cache_mib=4)
    assert not engine.config.tied_embeddings and engine.config.n_layers == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = engine.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert (all_logits(engine, ids) - expected).abs().max().item() < 1e-4
