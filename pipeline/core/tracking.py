"""Weights & Biases runs: one per stage, grouped by run name, offline by default.

Offline runs land in ``wandb/offline-run-*`` and upload later with ``wandb sync``.
Only the resolved Hydra config is logged: never the environment, so no token or key
can leak into a run.

Each stage logs its artifact folder as a W&B artifact that *references* the files (no copy)
and declares its parent's as an input, so W&B's lineage graph shows base -> sft -> rm -> ppo
-> eval. A resumed stage continues its W&B run (same id, ``resume="allow"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.core.errors import ConfigError


class Tracker:
    """A thin handle over a wandb run that is a no-op when logging is off."""

    def __init__(self, run: Any = None):
        self.run = run

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> Optional[str]:
        return None if self.run is None else self.run.id

    def log_artifact(self, art) -> None:
        """Log a committed pipeline artifact as a W&B reference artifact, and its parent as the
        run's input: the lineage edge parent -> this stage."""
        if self.run is None:
            return
        parent = art.manifest.get("parent")
        if parent is not None:
            parent_manifest = Path(parent["path"]) / "manifest.json"
            parent_run = json.loads(parent_manifest.read_text())["config"].get("run_name", "run") \
                if parent_manifest.is_file() else "run"
            _use(self.run, _reference(parent_run, parent["stage"], Path(parent["path"])))
        self.run.log_artifact(_reference(art.manifest["config"].get("run_name", "run"), art.stage, art.path))

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


def _reference(run_name: str, stage: str, path: Path):
    import wandb

    art = wandb.Artifact(f"{run_name}-{stage}".replace("/", "_"), type=stage)
    art.add_reference(Path(path).resolve().as_uri())
    return art


def _use(run, artifact) -> None:
    """Declare ``artifact`` an input of ``run``, online or offline.

    ``use_artifact`` refuses offline runs, yet for a draft artifact all it sends is the artifact
    logged with ``use_after_commit``: the record ``wandb sync`` replays as the run's input. Offline,
    that record is written directly (wandb is pinned in constraints.txt; a test reads it back).
    """
    if run.offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def start_tracking(cfg: DictConfig, stage: str, run_id: Optional[str] = None) -> Tracker:
    """Open the stage's wandb run (group = run name, job type = stage), or a no-op.

    ``run_id``: continue that run (a resumed stage), or start it under that id.
    """
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
        id=run_id,
        resume="allow" if run_id else None,
    )
    return Tracker(run)
