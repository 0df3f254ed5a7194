"""Schema of `make plan`: the memory each stage would hold, from the model's config.json alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from pipeline.config.groups import ModelConfig, PathsConfig


@dataclass
class PlanStageConfig:
    run_name: str = MISSING
    seed: int = MISSING
    paths: PathsConfig = MISSING
    model: ModelConfig = MISSING  # the model every stage is planned for
    gpu_memory: Any = MISSING  # the card: 24GiB, 80GB, 24e9 (bytes); null: the CUDA device's, or none
    ppo_prompt_tokens: int = MISSING  # the longest prompt PPO samples for (prompts are not cut)
    stages: list[str] = MISSING  # which of sft, rm, ppo
    overrides: list[str] = MISSING  # for the stages' own configs (conf/<stage>.yaml); `make plan` fills it
