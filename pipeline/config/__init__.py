"""Typed schemas for the Hydra config tree, and their registration.

Every field is declared here with its type and *no default*: the values live only in
the YAML under ``conf/``. The schemas are registered in Hydra's ConfigStore and each
primary YAML lists its schema first in its defaults list, so composition is validated
against them: an unknown or misspelled key, or a value of the wrong type, fails at
once with Hydra's own error message.

``groups`` holds the shared groups (paths, model, lora, logger, data), ``stages`` the non-RL
stages, ``rl`` the RL stage, ``plan`` `make plan`. Importing this package registers every schema.
It may import the packages whose settings it types (generation's decoding, the world's config) and core.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from pipeline.config.groups import *  # noqa: F401,F403  (the schemas, as ``pipeline.config.X``)
from pipeline.config.plan import PlanStageConfig
from pipeline.config.rl import *  # noqa: F401,F403
from pipeline.config.rl import AlgorithmConfig, PPOStageConfig
from pipeline.config.stages import *  # noqa: F401,F403
from pipeline.config.stages import (
    BaseStageConfig,
    DataStageConfig,
    DPOStageConfig,
    EvalStageConfig,
    ExportStageConfig,
    GenerateStageConfig,
    PipelineStageConfig,
    RMStageConfig,
    SFTStageConfig,
)
from pipeline.generation.decoding import DecodingConfig


def register_configs() -> None:
    """Put the schemas where the YAML defaults lists refer to them."""
    cs = ConfigStore.instance()
    cs.store(name="data_schema", node=DataStageConfig)
    cs.store(name="base_schema", node=BaseStageConfig)
    cs.store(name="sft_schema", node=SFTStageConfig)
    cs.store(name="rm_schema", node=RMStageConfig)
    cs.store(name="dpo_schema", node=DPOStageConfig)
    cs.store(name="ppo_schema", node=PPOStageConfig)
    cs.store(group="algorithm", name="algorithm_schema", node=AlgorithmConfig)
    cs.store(group="decoding", name="decoding_schema", node=DecodingConfig)
    cs.store(name="eval_schema", node=EvalStageConfig)
    cs.store(name="generate_schema", node=GenerateStageConfig)
    cs.store(name="export_schema", node=ExportStageConfig)
    cs.store(name="pipeline_schema", node=PipelineStageConfig)
    cs.store(name="plan_schema", node=PlanStageConfig)


register_configs()
