"""Weights & Biases runs: one per stage, grouped by run name, offline by default.

Offline runs land in ``wandb/offline-run-*`` and upload later with ``wandb sync``.
Only the resolved Hydra config is logged: never the environment, so no token or key
can leak into a run.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.runtime import ConfigError


class Tracker:
    """A thin handle over a wandb run that is a no-op when logging is off."""

    def __init__(self, run: Any = None):
        self.run = run

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, data: dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def histogram(self, key: str, values) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Histogram(list(map(float, values)))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def start_tracking(cfg: DictConfig, stage: str) -> Tracker:
    """Open the stage's wandb run (group = run name, job type = stage), or a no-op."""
    if cfg.logger.name == "none":
        return Tracker(None)
    if cfg.logger.name != "wandb":
        raise ConfigError(f"logger.name must be 'wandb' or 'none', got {cfg.logger.name!r}")
    import wandb

    os.makedirs(cfg.paths.wandb_dir, exist_ok=True)
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        mode=cfg.logger.mode,
        dir=cfg.paths.wandb_dir,
        group=cfg.run_name,
        job_type=stage,
        name=f"{cfg.run_name}-{stage}",
        config=OmegaConf.to_container(cfg, resolve=True),
        reinit="finish_previous",
    )
    return Tracker(run)
