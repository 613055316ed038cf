"""One SmolLM2 engine for the LM tests (loading it takes ~5 s), in the fast int4 format."""

from __future__ import annotations

import os

import pytest
import torch

from tasks.lm.engine import LMEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers (the reference in test_model) never reaches for the Hub


@pytest.fixture(scope="session")
def engine() -> LMEngine:
    torch.set_num_threads(2)
    return LMEngine.load(weight_format="int4", kv_cache_mib=256)


@pytest.fixture(scope="session")
def engine_fp32() -> LMEngine:
    """The float32 reference format: numerics that do not depend on batch shape to ~1e-6."""
    torch.set_num_threads(2)
    return LMEngine.load(weight_format="float32", kv_cache_mib=64)


@pytest.fixture
def chat(engine):
    """Render one user message with the model's chat template."""
    return lambda question: engine.tokenizer.render_chat([{"role": "user", "content": question}])
