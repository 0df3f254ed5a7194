"""Write the embedded world's datasets (``make data``).

A seeded, deterministic generator: the same ``world.*`` settings give byte-identical
files. See ``pipeline/world/`` for what the world contains.

    make data
    make data ARGS="world.seed=3 world.n_entities=60"
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import pipeline.config  # noqa: F401  (registers the schemas)
from pipeline.core.runtime import user_errors
from pipeline.core.validation import check_ranges
from pipeline.world.entities import WorldConfig
from pipeline.world.generator import generate_world


def run(cfg: DictConfig) -> dict[str, Path]:
    check_ranges(cfg)
    world_cfg = WorldConfig(**OmegaConf.to_container(cfg.world, resolve=True))
    files = generate_world(world_cfg, Path(cfg.paths.data_dir))
    for name, path in files.items():
        rows = sum(1 for _ in open(path))
        print(f"{name:>14}: {rows:6d} rows  {path}")
    return files


@hydra.main(version_base="1.3", config_path="../conf", config_name="datagen")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
