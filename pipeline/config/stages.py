"""Schemas of the SFT, RM, DPO, base, eval, generate, export and pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from pipeline.config.groups import DataConfig, LoraConfig, ModelConfig, PathsConfig, StageConfig
from pipeline.generation.decoding import DecodingConfig
from pipeline.world.entities import WorldConfig


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
    save_steps: int = MISSING  # steps between checkpoints a killed run resumes from
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
    resume: bool = MISSING  # rerun of a killed stage continues from its last checkpoint
    save_merged: bool = MISSING
    gpu_memory: Any = MISSING  # the card the run must fit (24GiB, 80GB, 24e9); null: the CUDA device's


@dataclass
class RMTrainConfig(HFTrainConfig):
    use_margin: Any = MISSING  # true | false | auto: subtract each comparison's `margin` in the loss (auto: when all have one)
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
    resume: bool = MISSING  # rerun of a killed stage continues from its last checkpoint
    score_batch_size: int = MISSING
    gpu_memory: Any = MISSING  # the card the run must fit (24GiB, 80GB, 24e9); null: the CUDA device's


@dataclass
class DPOTrainConfig(HFTrainConfig):
    beta: float = MISSING  # the implicit KL coefficient
    loss_type: list[str] = MISSING  # TRL's DPO losses, summed: apo_zero, sigmoid (DPO), ipo, sft (NLL on chosen), ...
    loss_weights: Optional[list[float]] = MISSING  # one per loss_type; null = all 1
    label_smoothing: float = MISSING  # share of labels assumed flipped (TRL's robust, exo_pair, aot losses)
    use_weighting: bool = MISSING  # WPO (Zhou et al. 2024): weight pairs by their probability under the policy
    entropy_coef: float = MISSING  # loss - coef * the policy's mean entropy on the chosen answers; < 0 sharpens


@dataclass
class DPOPairsConfig:
    source: str = MISSING  # data: data.prefs.train; policy: the SFT policy's samples ranked by the RM
    prompts: Optional[int] = MISSING  # policy: the first n of data.ppo_prompts; null = all
    samples_per_prompt: int = MISSING  # policy: samples per prompt; the best and the worst make a pair
    temperature: float = MISSING  # policy: sampling temperature
    max_new_tokens: int = MISSING  # policy: longest sample
    batch_size: int = MISSING  # policy: prompts per generate call / pairs per RM forward pass


@dataclass
class DPOParents:
    sft: Optional[str] = MISSING  # null: the same run's sft artifact
    rm: Optional[str] = MISSING  # pairs.source=policy|both: null = the same run's rm artifact


@dataclass
class DPOStageConfig(StageConfig):
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    train: DPOTrainConfig = MISSING
    pairs: DPOPairsConfig = MISSING
    parents: DPOParents = MISSING
    resume: bool = MISSING  # rerun of a killed stage continues from its last checkpoint


# --- eval / generate / pipeline -------------------------------------------------------


@dataclass
class EvalStageConfig(StageConfig):
    """`make eval`: every policy stage of the run, judged on the held-out prompts."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    world: WorldConfig = MISSING  # the judge's world: the settings `make data` ran with
    policies: list[str] = MISSING  # stages evaluated where their artifact exists
    prompts: str = MISSING  # eval | val: data.eval_prompts (report figures) or data.val_prompts (choose settings)
    decodings: dict[str, DecodingConfig] = MISSING  # one report block per decoding
    max_prompts: Optional[int] = MISSING  # the first n eval prompts; null = all of them
    batch_size: int = MISSING  # prompts per generate call
    score_batch_size: int = MISSING  # conversations per reward-model forward pass
    nll_documents: int = MISSING  # held-out corpus documents for the NLL row (0 = skip)
    nll_block_size: int = MISSING  # tokens per document
    num_threads: int = MISSING
    judge: Optional[str] = MISSING  # a reward model not trained in the run (folder, hub id or rm artifact); null: none


@dataclass
class GenerateStageConfig(StageConfig):
    """`make generate`: sample one stage's policy on a prompt or a prompt file."""

    model: ModelConfig = MISSING
    stage: str = MISSING  # base | sft | dpo | ppo | rloo | grpo | dr_grpo | reinforce_pp | online_dpo
    prompt: Optional[str] = MISSING
    prompt_file: Optional[str] = MISSING  # .txt (a prompt per line) or .jsonl ({"prompt": ...})
    decoding: DecodingConfig = MISSING
    batch_size: int = MISSING
    num_threads: int = MISSING


@dataclass
class ExportStageConfig(StageConfig):
    """`make export`: one stage's policy merged into the base, as a plain HF model folder."""

    model: ModelConfig = MISSING
    stage: str = MISSING
    num_threads: int = MISSING


@dataclass
class PipelineStageConfig:
    """`make pipeline`: the stages to run in order; each composes its own config."""

    run_name: str = MISSING
    seed: int = MISSING
    paths: PathsConfig = MISSING
    data: DataConfig = MISSING  # `make data` runs first when a file listed here is missing
    stages: list[str] = MISSING
