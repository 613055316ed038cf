"""Checkpoints of an expert-parallel run in the artifact store (local directory or S3).

A checkpoint of step ``s`` under ``prefix`` is a folder of parts and a manifest written last:

    <prefix>/step-<s>/dense.pt          dense weights, their optimizer state, load counters
    <prefix>/step-<s>/expert-<e>.pt     expert e's weights and optimizer state (every MoE layer)
    <prefix>/step-<s>/manifest.json     step, model config, parts — the checkpoint exists once this does

Every expert is written by one holder (the lowest rank holding it), so a checkpoint holds
the whole model whatever the placement, and any placement can be restored from it. The
store verifies every part's content hash on read; a part that fails, a manifest for
another model, or a missing part is an :class:`~infra.errors.InputError` naming the key.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict

import torch

from infra.errors import InputError
from infra.store import ArtifactStore, StoreError
from tasks.moe.model import GPTMoE, MoEConfig


def _step_prefix(prefix: str, step: int) -> str:
    return f"{prefix}/step-{step:07d}"


def save_part(store: ArtifactStore, prefix: str, step: int, name: str, state: dict) -> int:
    """Write one part (``dense`` or ``expert-<e>``); returns its size in bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    store.put_bytes(f"{_step_prefix(prefix, step)}/{name}.pt", data)
    return len(data)


def expert_part(expert: int) -> str:
    return f"expert-{expert:03d}"


def write_manifest(store: ArtifactStore, prefix: str, step: int, config: MoEConfig) -> None:
    """Declare the checkpoint of ``step`` complete (call once every part is written)."""
    parts = ["dense", *(expert_part(e) for e in range(config.n_expert))]
    missing = [p for p in parts if not store.exists(f"{_step_prefix(prefix, step)}/{p}.pt")]
    if missing:
        raise InputError(store.url(_step_prefix(prefix, step)), "parts", missing, "checkpoint parts were not written")
    store.put_json(f"{_step_prefix(prefix, step)}/manifest.json",
                   {"step": step, "config": asdict(config), "parts": parts})


def latest_checkpoint(store: ArtifactStore, prefix: str) -> int | None:
    """The step of the newest complete checkpoint under ``prefix`` (None: there is none)."""
    steps = []
    for key in store.list(f"{prefix}/"):
        if key.endswith("/manifest.json"):
            try:
                steps.append(int(key.rsplit("/", 2)[-2].removeprefix("step-")))
            except ValueError:
                continue
    return max(steps) if steps else None


def load_part(store: ArtifactStore, prefix: str, step: int, name: str, config: MoEConfig) -> dict:
    """Read one part of the checkpoint of ``step``, checking it belongs to a model of ``config``."""
    base = _step_prefix(prefix, step)
    try:
        manifest = store.get_json(f"{base}/manifest.json")
    except StoreError as exc:
        raise InputError(store.url(f"{base}/manifest.json"), "<file>", step, f"no complete checkpoint: {exc}") from None
    if manifest.get("config") != json.loads(json.dumps(asdict(config))):
        raise InputError(store.url(f"{base}/manifest.json"), "config", manifest.get("config"),
                         f"the checkpoint is of another model; this run trains {asdict(config)}")
    key = f"{base}/{name}.pt"
    try:
        data = store.get_bytes(key)
        return torch.load(io.BytesIO(data), weights_only=True)
    except StoreError as exc:
        raise InputError(store.url(key), "<file>", key, f"checkpoint part unreadable: {exc}") from None
    except Exception as exc:  # torch's unpickler raises many kinds on corrupt bytes
        raise InputError(store.url(key), "<file>", key, f"corrupt checkpoint part: {exc}") from None


def checkpoint_cost(store: ArtifactStore, prefix: str, config: MoEConfig) -> tuple[float, int]:
    """(seconds, bytes) to write one whole checkpoint of a ``config`` model — its weights and both
    Adam moments — to ``store`` under ``prefix``: the cost Young's rule weighs against lost work."""
    weights = GPTMoE(config).state_dict()
    state = {"weights": weights, **{m: {k: torch.zeros_like(v) for k, v in weights.items()} for m in ("exp_avg", "exp_avg_sq")}}
    start = time.perf_counter()
    nbytes = save_part(store, prefix, 0, "cost", state)
    return time.perf_counter() - start, nbytes
