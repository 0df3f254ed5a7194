"""A tiny end-to-end world for stage tests: real entry points, toy sizes.

The session builds the world's data and a one-layer base model once (seconds), and the
SFT / RM artifacts on demand; each test then runs a real ``run(cfg)`` on a config
composed exactly as the command line would compose it, shrunk by overrides.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import compose_config

TINY_BASE = ["arch.hidden_size=32", "arch.intermediate_size=64", "arch.num_hidden_layers=1",
             "arch.num_attention_heads=2", "arch.num_key_value_heads=2", "tokenizer.vocab_size=512",
             "train.max_steps=40", "train.batch_size=16", "train.block_size=64", "train.warmup_steps=5"]
TINY_SFT = ["train.max_steps=8", "train.per_device_train_batch_size=8", "samples.num_prompts=8",
            "samples.decoding.max_new_tokens=8", "lora.r=4", "lora.alpha=8"]
TINY_RM = ["train.max_steps=6", "train.per_device_train_batch_size=8", "train.eval_steps=0",
           "lora.r=4", "lora.alpha=8"]
QUIET = ["logger=none"]


@pytest.fixture(scope="session")
def world_root(tmp_path_factory) -> Path:
    """Data and a tiny base artifact under one root, built once per test session."""
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_ROOT", str(root))
        from stages import base, datagen

        datagen.run(compose_config("datagen"))
        base.run(compose_config("base", TINY_BASE + QUIET))
    return root


@pytest.fixture
def run_root(world_root, tmp_path, monkeypatch) -> Path:
    """A fresh root per test that shares the session's data and base artifact."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    os.symlink(world_root / "data" / "world", root / "data" / "world")
    (root / "artifacts" / "default").mkdir(parents=True)
    shutil.copytree(world_root / "artifacts" / "default" / "base", root / "artifacts" / "default" / "base")
    monkeypatch.setenv("RLHF_ROOT", str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return root


@pytest.fixture(scope="session")
def sft_root(world_root, tmp_path_factory) -> Path:
    """world_root plus tiny sft and rm artifacts (a separate root: later tests may write)."""
    root = tmp_path_factory.mktemp("chain")
    shutil.copytree(world_root, root, dirs_exist_ok=True, symlinks=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_ROOT", str(root))
        from stages import rm, sft

        sft.run(compose_config("sft", TINY_SFT + QUIET))
        rm.run(compose_config("rm", TINY_RM + QUIET))
    return root


def copy_root(src: Path, dst: Path, ignore=None) -> Path:
    """Copy a run root; manifests record parents by absolute path, so re-point them."""
    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    for manifest in dst.glob("artifacts/*/*/manifest.json"):
        manifest.write_text(manifest.read_text().replace(str(src), str(dst)))
    return dst


@pytest.fixture
def chain(sft_root, tmp_path, monkeypatch) -> Path:
    """A private copy of the base -> sft -> rm chain, as RLHF_ROOT."""
    root = copy_root(sft_root, tmp_path / "chain")
    monkeypatch.setenv("RLHF_ROOT", str(root))
    return root
