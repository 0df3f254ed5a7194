"""Shared fixtures: compose the real Hydra config, then shrink it for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import pipeline.config  # noqa: F401  (registers the schemas)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """The real config tree, composed exactly as ``python -m stages.<name>`` would."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=name):
        return compose(config_name=name, overrides=overrides or [])


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """An isolated project root: data, artifacts and W&B runs all go under tmp_path."""
    monkeypatch.setenv("RLHF_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _threads():
    # Two cores on CI: keep torch from oversubscribing them across the test run.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
