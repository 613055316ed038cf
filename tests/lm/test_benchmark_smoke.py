"""The LM benchmark's quick decode run measures 1 and 16 sequences for tierflow (with and without its
fast decode path), transformers and, when llama-cpp-python is importable, llama.cpp, with ratios; and
says why when llama.cpp is skipped."""

import importlib.util
import json

import pytest

from benchmarks.lm import main


@pytest.mark.slow  # ~1 min: loads three engines and transformers, decodes 16 tokens for each
def test_quick_decode_benchmark_compares_every_system_at_1_and_16_sequences(tmp_path):
    main(["--quick", "--only", "decode", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "lm.json").read_text())
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    assert set(saved["decode"]) == {"1", "16"}
    fast_path = saved["int4_decode_path"] != "op by op"  # where the compiled kernels build
    for batch, row in saved["decode"].items():
        for name in ("int4", "float32", "transformers", *(["int4_op_by_op"] if fast_path else [])):
            assert row[name]["tokens"] == int(batch) * 16 and row[name]["tokens_per_s"] > 0
        assert row["speedup_vs_transformers"] > 0 and ("speedup_vs_int4_op_by_op" in row) == fast_path
        assert ("llama_cpp" in row) == has_llama_cpp
        if has_llama_cpp:
            assert row["llama_cpp"]["tokens"] == int(batch) * 16
            assert row["speedup_vs_llama_cpp"] == row["int4"]["tokens_per_s"] / row["llama_cpp"]["tokens_per_s"]
            assert row["same_tokens_as_llama_cpp"] >= 1  # the same file, greedy: at least the first token agrees
    assert ("llama-cpp-python" if has_llama_cpp else "not importable") in saved["llama_cpp"]
    assert (tmp_path / "lm.png").stat().st_size > 0
