"""Schemas of the RL stage: PPO settings, the algorithm group, KL, health and rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from pipeline.config.groups import DataConfig, ModelConfig, StageConfig


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
    generation_batch_size: Any = MISSING  # responses sampled and scored per pass: a positive int or auto
    minibatch_size: int = MISSING  # responses per optimizer step; divides rollout_batch_size
    micro_batch_size: Any = MISSING  # responses per forward/backward; divides minibatch_size; or auto
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
    sampler: str = MISSING  # auto | eager | static | graphs (pipeline/rl/static_sampler.py)
    gradient_checkpointing: bool = MISSING
    fold_adapters: str = MISSING  # auto | always | never: each role's adapters folded into a weight copy
    ptx_batch_size: int = MISSING  # pretraining sequences per optimizer step
    ptx_block_size: int = MISSING  # tokens per pretraining sequence
    precision: str = MISSING  # auto | fp32 | bf16 | fp16
    seed: int = MISSING
    snapshot_every: Optional[int] = MISSING  # keep the policy adapter every n updates (eval's curve); 0/null: off
    kl: KLConfig = MISSING


@dataclass
class AlgorithmConfig:
    """The advantage estimator of the RL stage (conf/algorithm/)."""

    name: str = MISSING  # the artifact's folder: ppo | ppo_ptx | rloo | grpo | dr_grpo | reinforce_pp | online_dpo
    advantage: str = MISSING  # gae | rloo | grpo | reinforce_pp | dpo
    samples_per_prompt: int = MISSING  # k
    kl_in: str = MISSING  # reward (Ziegler et al.) | loss (k3 with gradient, as GRPO) | none
    loss_agg: str = MISSING  # token_mean | seq_mean | constant (Dr.GRPO)
    scale_by_std: str = MISSING  # grpo: group | batch | none (Dr.GRPO); true/false read as group/none
    group_baseline: bool = MISSING  # reinforce_pp: subtract the group mean first (REINFORCE++-baseline)
    ptx_coef: float = MISSING  # PPO-ptx (InstructGPT eq. 2): weight of the pretraining log-likelihood; 0 = off
    kl_coef: Optional[float] = MISSING  # this estimator's starting KL coefficient beta; null: ppo.kl.init_coef
    entropy_coef: float = MISSING  # loss - coef * the policy's mean token entropy: > 0 explores, < 0 sharpens; 0 = off


@dataclass
class HealthConfig:
    thresholds: dict[str, float] = MISSING  # health/<name> above its threshold prints a warning
    abort_on: list[str] = MISSING  # ... and stops the run for these names


@dataclass
class SharpenConfig:
    coef: float = MISSING  # alpha: alpha * log pi_ref(y|x) is added to every score; 0 = off
    per_token: bool = MISSING  # the mean over the response's tokens instead of the sum


@dataclass
class RewardConfig:
    normalize: bool = MISSING  # standardise RM scores with the RM artifact's mean / std
    min_accuracy: float = MISSING  # refuse an RM whose held-out pairwise accuracy is lower
    sharpen: SharpenConfig = MISSING  # maximum-likelihood sharpening (pipeline/rl/rewards.py sharpening)
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
    gpu_memory: Any = MISSING  # the card a configuration must fit (24GiB, 80GB, 24e9); null: the CUDA device's
