"""What every stage entry point shares: seeding, resolved configs, user-facing errors."""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.core.errors import ArtifactError, PipelineError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain JSON-able data, every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def output_run_dir(cfg: DictConfig) -> str:
    """Where this run writes its artifact: ``paths.run_dir``, except in a Hydra multirun (``-m``),
    where each job gets ``paths.run_dir/sweep/<its overrides>`` so a sweep's jobs don't
    overwrite each other. Parents are still read from ``paths.run_dir``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg.paths.run_dir
    job = HydraConfig.get().job
    name = job.override_dirname or f"job{job.num}"
    return str(Path(cfg.paths.run_dir) / "sweep" / name.replace("/", "_"))


def user_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn expected failures (bad data, missing artifact) into one clear line and exit 2, and end
    a finished multi-process run's process group.

    Hydra prints its own clear message for config errors; everything else is a bug and
    keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            out = fn(cfg)
        except (PipelineError, ArtifactError, FloatingPointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        close_process_group()
        return out

    return wrapper


def close_process_group() -> None:
    """Destroy the data-parallel process group, if any, once every process is done with it. A
    process that exits with a live gloo group can abort in the group's destructor (SIGABRT,
    "terminate called without an active exception"), failing a run whose artifact was written."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
