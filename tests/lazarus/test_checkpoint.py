"""Checkpoints in the artifact store: whole, verified, and refused when they belong to another model."""

from dataclasses import replace

import pytest
import torch

from infra.errors import InputError
from infra.store import LocalStore
from tasks.lazarus.checkpoint import expert_part, latest_checkpoint, load_part, save_part, write_manifest
from tasks.moe.model import CONFIGS

CONFIG = CONFIGS["tiny"]


def _write(store, step, config=CONFIG):
    save_part(store, "run", step, "dense", {"params": {"w": torch.ones(3)}})
    for e in range(config.n_expert):
        save_part(store, "run", step, expert_part(e), {"params": {"w": torch.full((2,), float(e))}})
    write_manifest(store, "run", step, config)


def test_latest_complete_checkpoint_is_found_and_read_back(tmp_path):
    store = LocalStore(tmp_path)
    _write(store, 0)
    _write(store, 20)
    save_part(store, "run", 30, "dense", {"params": {}})  # parts without a manifest: not a checkpoint
    assert latest_checkpoint(store, "run") == 20
    assert torch.equal(load_part(store, "run", 20, expert_part(5), CONFIG)["params"]["w"], torch.full((2,), 5.0))


def test_a_manifest_is_refused_until_every_part_is_written(tmp_path):
    store = LocalStore(tmp_path)
    save_part(store, "run", 4, "dense", {"params": {}})
    with pytest.raises(InputError, match="expert-000"):
        write_manifest(store, "run", 4, CONFIG)


def test_a_checkpoint_of_another_model_is_refused_naming_the_field(tmp_path):
    store = LocalStore(tmp_path)
    _write(store, 8)
    with pytest.raises(InputError, match="config"):
        load_part(store, "run", 8, "dense", replace(CONFIG, n_embd=128))


def test_a_corrupt_part_is_refused_naming_the_file(tmp_path):
    store = LocalStore(tmp_path)
    _write(store, 8)
    part = next(tmp_path.rglob("expert-003.pt"))
    part.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="expert-003"):
        load_part(store, "run", 8, expert_part(3), CONFIG)
