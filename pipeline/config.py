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
    bnb_4bit_quant_type: str = MISSING  # nf4 | fp4
    bnb_4bit_use_double_quant: bool = MISSING


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names
    bias: str = MISSING
    use_rslora: bool = MISSING  # scale by alpha / sqrt(r) (Kalajdzievski 2023)
    use_dora: bool = MISSING  # weight-decomposed LoRA (Liu et al. 2024)
    rank_pattern: dict[str, int] = MISSING  # per-module ranks, e.g. {q_proj: 4}
    alpha_pattern: dict[str, int] = MISSING  # per-module alphas


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
    pretrain: str = MISSING  # text rows {"text"}: base pretraining, PPO-ptx
    pretrain_eval: Optional[str] = MISSING  # held-out text: eval's corpus NLL (alignment tax); null = skip
    sft: SplitConfig = MISSING
    prefs: SplitConfig = MISSING
    ppo_prompts: list[str] = MISSING
    eval_prompts: list[str] = MISSING
    hub_split: str = MISSING  # split used when a source is a hub dataset id
    # The pipeline's field names -> a dataset's own, e.g. {prompt: question, chosen: response_j}
    columns: dict[str, str] = MISSING


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
    resume: bool = MISSING  # rerun of a killed stage continues from its last checkpoint
    score_batch_size: int = MISSING


@dataclass
class DPOTrainConfig(HFTrainConfig):
    beta: float = MISSING  # the implicit KL coefficient
    loss_type: list[str] = MISSING  # TRL's DPO losses, summed: sigmoid (DPO), ipo, hinge, sft (NLL on chosen), ...
    loss_weights: Optional[list[float]] = MISSING  # one per loss_type; null = all 1
    label_smoothing: float = MISSING  # share of labels assumed flipped (TRL's robust, exo_pair, aot losses)
    use_weighting: bool = MISSING  # WPO (Zhou et al. 2024): weight pairs by their probability under the policy


@dataclass
class DPOStageConfig(StageConfig):
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    train: DPOTrainConfig = MISSING
    parents: RMParents = MISSING
    resume: bool = MISSING  # rerun of a killed stage continues from its last checkpoint


# --- eval / generate / pipeline -------------------------------------------------------


@dataclass
class EvalStageConfig(StageConfig):
    """`make eval`: every policy stage of the run, judged on the held-out prompts."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    world: WorldConfig = MISSING  # the judge's world: the settings `make data` ran with
    policies: list[str] = MISSING  # stages evaluated where their artifact exists
    decodings: dict[str, DecodingConfig] = MISSING  # one report block per decoding
    max_prompts: Optional[int] = MISSING  # the first n eval prompts; null = all of them
    batch_size: int = MISSING  # prompts per generate call
    score_batch_size: int = MISSING  # conversations per reward-model forward pass
    nll_documents: int = MISSING  # held-out corpus documents for the NLL row (0 = skip)
    nll_block_size: int = MISSING  # tokens per document
    num_threads: int = MISSING


@dataclass
class GenerateStageConfig(StageConfig):
    """`make generate`: sample one stage's policy on a prompt or a prompt file."""

    model: ModelConfig = MISSING
    stage: str = MISSING  # base | sft | dpo | ppo | rloo | grpo | dr_grpo | reinforce_pp
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


@dataclass
class KLConfig:
    controller: str = MISSING  # fixed | adaptive (Ziegler et al. 2019)
    init_coef: float = MISSING
    target: Optional[float] = MISSING  # adaptive: target sequence-level KL
    horizon: Optional[int] = MISSING  # adaptive: episodes over which the error is corrected
    estimator: str = MISSING  # k1 | k3


@dataclass
class PPOConfig:
    total_updates: int = MISSING
    rollout_batch_size: int = MISSING  # responses per update per process (k per prompt)
    generation_batch_size: int = MISSING  # responses sampled and scored per pass
    minibatch_size: int = MISSING  # responses per optimizer step; divides rollout_batch_size
    micro_batch_size: int = MISSING  # responses per forward/backward; divides minibatch_size
    ppo_epochs: int = MISSING
    temperature: float = MISSING
    max_new_tokens: int = MISSING
    learning_rate: float = MISSING
    adam_eps: float = MISSING
    weight_decay: float = MISSING
    lr_schedule: str = MISSING  # constant | linear | cosine
    warmup_steps: int = MISSING
    max_grad_norm: float = MISSING
    clip_range: float = MISSING
    clip_range_value: float = MISSING
    vf_coef: float = MISSING
    gamma: float = MISSING
    lam: float = MISSING
    target_kl: Optional[float] = MISSING  # early-stop the epochs past this approx KL; null = off
    missing_eos_penalty: Optional[float] = MISSING  # subtracted from a response without EOS
    value_init: str = MISSING  # rm | fresh (gae only)
    old_logprobs: str = MISSING  # sampler (recorded while sampling) | recompute (an extra full pass)
    gradient_checkpointing: bool = MISSING
    fold_adapters: str = MISSING  # auto | always | never: each role's adapters folded into a weight copy
    ptx_batch_size: int = MISSING  # pretraining sequences per optimizer step
    ptx_block_size: int = MISSING  # tokens per pretraining sequence
    precision: str = MISSING  # auto | fp32 | bf16 | fp16
    seed: int = MISSING
    kl: KLConfig = MISSING


@dataclass
class AlgorithmConfig:
    """The advantage estimator of the RL stage (conf/algorithm/)."""

    name: str = MISSING  # the artifact's folder: ppo | ppo_ptx | rloo | grpo | dr_grpo | reinforce_pp
    advantage: str = MISSING  # gae | rloo | grpo | reinforce_pp
    samples_per_prompt: int = MISSING  # k
    kl_in: str = MISSING  # reward (Ziegler et al.) | loss (k3 with gradient, as GRPO)
    loss_agg: str = MISSING  # token_mean | seq_mean | constant (Dr.GRPO)
    scale_by_std: bool = MISSING  # grpo: divide by the group's std (false: Dr.GRPO)
    group_baseline: bool = MISSING  # reinforce_pp: subtract the group mean first (REINFORCE++-baseline)
    ptx_coef: float = MISSING  # PPO-ptx (InstructGPT eq. 2): weight of the pretraining log-likelihood; 0 = off


@dataclass
class HealthConfig:
    thresholds: dict[str, float] = MISSING  # health/<name> above its threshold prints a warning
    abort_on: list[str] = MISSING  # ... and stops the run for these names


@dataclass
class RewardConfig:
    normalize: bool = MISSING  # standardise RM scores with the RM artifact's mean / std
    min_accuracy: float = MISSING  # refuse an RM whose held-out pairwise accuracy is lower
    sources: dict[str, Any] = MISSING


@dataclass
class PPOParents:
    sft: Optional[str] = MISSING
    rm: Optional[str] = MISSING


@dataclass
class PPOStageConfig(StageConfig):
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    parents: PPOParents = MISSING
    reward: RewardConfig = MISSING
    algorithm: AlgorithmConfig = MISSING
    ppo: PPOConfig = MISSING
    health: HealthConfig = MISSING
    resume: bool = MISSING
    log_every: int = MISSING
    table_every: int = MISSING
    checkpoint_every: int = MISSING
    summary_window: int = MISSING  # the artifact's metrics: mean of the last n updates
    num_threads: int = MISSING


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


register_configs()
