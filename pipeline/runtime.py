"""What every stage entry point shares: seeding, resolved configs, user-facing errors."""

from __future__ import annotations

import functools
import random
import sys
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf


class PipelineError(RuntimeError):
    """An error the user can fix; the message names the file, row or key, and the fix."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain JSON-able data, every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def user_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn expected failures (bad data, missing artifact) into one clear line and exit 2.

    Hydra prints its own clear message for config errors; everything else is a bug and
    keeps its traceback.
    """
    from pipeline.artifacts import ArtifactError

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return fn(cfg)
        except (PipelineError, ArtifactError, FloatingPointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
