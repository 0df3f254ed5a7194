"""Settings that type-check but cannot work, refused by name before any model loads.

Hydra's schemas (pipeline/config/) catch unknown keys and wrong types; this catches values:
a negative learning rate, a zero batch size, a probability outside [0, 1]. Every stage calls
:func:`check_ranges` first, and a rule applies to whichever of its keys the stage's config has.
"""

from __future__ import annotations

import math
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.core.errors import ConfigError

Rule = tuple[Callable[[float], bool], str]

POSITIVE: Rule = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
PROBABILITY: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
DROPOUT: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
FINITE: Rule = (math.isfinite, "a finite number")
STEPS: Rule = (lambda v: v > 0 or v == -1, "> 0 (or -1: train for num_train_epochs)")

_PPO_POSITIVE = ("total_updates", "rollout_batch_size", "generation_batch_size", "minibatch_size",
                 "micro_batch_size", "ppo_epochs", "max_new_tokens", "temperature", "learning_rate", "adam_eps",
                 "max_grad_norm", "clip_range", "clip_range_value", "target_kl", "ptx_batch_size", "ptx_block_size")
_TRAIN_POSITIVE = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                   "gradient_accumulation_steps", "num_train_epochs", "max_grad_norm", "max_length",
                   "logging_steps", "num_threads", "batch_size", "block_size", "log_every", "beta",
                   "save_steps")

RULES: dict[str, Rule] = {
    **{f"train.{k}": POSITIVE for k in _TRAIN_POSITIVE},
    "train.max_steps": STEPS,
    **{f"train.{k}": NON_NEGATIVE for k in ("warmup", "warmup_steps", "weight_decay", "eval_steps",
                                            "center_rewards_coefficient")},
    "train.min_lr_ratio": PROBABILITY,
    "train.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5): the share of labels assumed flipped"),
    "lora.r": POSITIVE, "lora.alpha": POSITIVE, "lora.dropout": DROPOUT,
    **{f"ppo.{k}": POSITIVE for k in _PPO_POSITIVE},
    **{f"ppo.{k}": NON_NEGATIVE for k in ("weight_decay", "warmup_steps", "vf_coef", "missing_eos_penalty")},
    "algorithm.ptx_coef": NON_NEGATIVE, "algorithm.kl_coef": NON_NEGATIVE,
    "algorithm.entropy_coef": FINITE, "train.entropy_coef": FINITE,
    "ppo.gamma": PROBABILITY, "ppo.lam": PROBABILITY,
    "ppo.kl.init_coef": NON_NEGATIVE, "ppo.kl.target": POSITIVE, "ppo.kl.horizon": POSITIVE,
    "algorithm.samples_per_prompt": POSITIVE,
    "reward.min_accuracy": PROBABILITY, "reward.sharpen.coef": NON_NEGATIVE,
    **{f"pairs.{k}": POSITIVE for k in ("prompts", "temperature", "max_new_tokens", "batch_size")},
    "pairs.samples_per_prompt": (lambda v: v >= 2, ">= 2: a pair is the best and the worst of a prompt's samples"),
    **{k: POSITIVE for k in ("log_every", "table_every", "checkpoint_every", "summary_window", "num_threads",
                             "score_batch_size", "batch_size", "max_prompts", "samples.num_prompts",
                             "samples.batch_size", "tokenizer.vocab_size", "tokenizer.min_frequency")},
    **{f"arch.{k}": POSITIVE for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                       "rope_theta")},
    **{f"world.{k}": POSITIVE for k in ("n_entities", "pretrain_repeats", "n_sft_train", "n_sft_eval",
                                        "n_pref_train", "n_pref_eval", "k_responses", "n_ppo_prompts",
                                        "n_eval_prompts")},
    "world.n_unknown": NON_NEGATIVE,
    **{f"world.{k}": PROBABILITY for k in ("ranked_fraction", "label_noise", "demo_verbose_rate",
                                           "demo_wrong_rate", "demo_unsafe_rate", "demo_hallucination_rate")},
}


def check_ranges(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value outside its range, naming the key and the fix.
    Keys the config does not have, and ``null`` (off) values, are skipped."""
    for key, (ok, what) in RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not ok(value):
            raise ConfigError(f"{key}={value} must be {what}; fix the override or the YAML under conf/")
    thresholds = OmegaConf.select(cfg, "health.thresholds", default=None) or {}
    for name, value in thresholds.items():
        if value < 0:
            raise ConfigError(f"health.thresholds.{name}={value} must be >= 0")
