"""Typed schemas for the Hydra config tree.

Every field is declared here with its type and *no default*: the values live only in
the YAML under ``conf/``. The schemas are registered in Hydra's ConfigStore and each
primary YAML lists its schema first in its defaults list, so composition is validated
against them: an unknown or misspelled key, or a value of the wrong type, fails at
once with Hydra's own error message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.generation import DecodingConfig
from pipeline.world import WorldConfig


# --- groups --------------------------------------------------------------------------


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    artifacts_dir: str = MISSING
    run_dir: str = MISSING
    wandb_dir: str = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory. null means "the run's `base` artifact" (`make base`).
    path: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    dtype: str = MISSING  # float32 | bfloat16 | float16
    # Path to a jinja chat template; null keeps the tokenizer's own (or the project's
    # default when the tokenizer has none, e.g. GPT-2).
    chat_template: Optional[str] = MISSING
    # 4-bit base weights (QLoRA, bitsandbytes); needs CUDA.
    load_in_4bit: bool = MISSING


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names
    bias: str = MISSING


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: str = MISSING  # offline | online | disabled
    num_samples: int = MISSING  # rows in the sampled-responses table


@dataclass
class SplitConfig:
    train: list[str] = MISSING
    eval: list[str] = MISSING


@dataclass
class DataConfig:
    """Where each stage reads its data: local .json/.jsonl/.parquet files or hub ids."""

    name: str = MISSING
    pretrain: str = MISSING
    sft: SplitConfig = MISSING
    prefs: SplitConfig = MISSING
    ppo_prompts: list[str] = MISSING
    eval_prompts: list[str] = MISSING
    hub_split: str = MISSING  # split used when a source is a hub dataset id


# --- stage schemas --------------------------------------------------------------------


@dataclass
class StageConfig:
    """Keys every stage shares."""

    run_name: str = MISSING
    seed: int = MISSING
    paths: PathsConfig = MISSING
    logger: LoggerConfig = MISSING


@dataclass
class DataStageConfig(StageConfig):
    world: WorldConfig = MISSING


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = MISSING
    min_frequency: int = MISSING


@dataclass
class TinyArchConfig:
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    max_position_embeddings: int = MISSING
    rope_theta: float = MISSING
    tie_word_embeddings: bool = MISSING


@dataclass
class PretrainConfig:
    block_size: int = MISSING
    batch_size: int = MISSING
    max_steps: int = MISSING
    learning_rate: float = MISSING
    min_lr_ratio: float = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    log_every: int = MISSING
    num_threads: int = MISSING


@dataclass
class BaseStageConfig(StageConfig):
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    tokenizer: TokenizerTrainConfig = MISSING
    arch: TinyArchConfig = MISSING
    train: PretrainConfig = MISSING


@dataclass
class HFTrainConfig:
    """TrainingArguments the TRL stages expose (SFT and RM)."""

    max_steps: int = MISSING  # > 0 overrides num_train_epochs
    num_train_epochs: float = MISSING
    per_device_train_batch_size: int = MISSING
    per_device_eval_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING  # cosine | linear | constant_with_warmup
    warmup: float = MISSING  # steps, or a fraction of training when < 1
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    max_length: int = MISSING
    group_by_length: bool = MISSING
    gradient_checkpointing: bool = MISSING
    precision: str = MISSING  # auto | fp32 | bf16 | fp16
    logging_steps: int = MISSING
    eval_steps: int = MISSING  # 0 evaluates only at the end
    num_threads: int = MISSING


@dataclass
class SFTTrainConfig(HFTrainConfig):
    packing: bool = MISSING


@dataclass
class SamplesConfig:
    """Responses sampled from held-out prompts after training (W&B table, EOS rate)."""

    num_prompts: int = MISSING
    batch_size: int = MISSING
    decoding: DecodingConfig = MISSING


@dataclass
class SFTParents:
    base: Optional[str] = MISSING  # null: the same run's base artifact


@dataclass
class SFTStageConfig(StageConfig):
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    lora: LoraConfig = MISSING
    train: SFTTrainConfig = MISSING
    samples: SamplesConfig = MISSING
    parents: SFTParents = MISSING
    save_merged: bool = MISSING


@dataclass
class RMTrainConfig(HFTrainConfig):
    use_margin: bool = MISSING  # use a row's `margin` in the loss when the data has one
    center_rewards_coefficient: Optional[float] = MISSING  # Eisenstein et al. 2023; null = off
    group_pairs: bool = MISSING  # keep a prompt's pairs in one batch (InstructGPT)


@dataclass
class RMParents:
    sft: Optional[str] = MISSING  # null: the same run's sft artifact


@dataclass
class RMStageConfig(StageConfig):
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    lora: LoraConfig = MISSING
    train: RMTrainConfig = MISSING
    parents: RMParents = MISSING
    score_batch_size: int = MISSING


def register_configs() -> None:
    """Put the schemas where the YAML defaults lists refer to them."""
    cs = ConfigStore.instance()
    cs.store(name="data_schema", node=DataStageConfig)
    cs.store(name="base_schema", node=BaseStageConfig)
    cs.store(name="sft_schema", node=SFTStageConfig)
    cs.store(name="rm_schema", node=RMStageConfig)
    cs.store(group="decoding", name="decoding_schema", node=DecodingConfig)


register_configs()
