"""Checks of the RL stage's settings, before any model loads.

Each refusal names the key, what it must be, and the fix; ranges every stage shares
(learning rates, batch sizes, probabilities) are checked by pipeline/core/validation.py.
"""

from __future__ import annotations

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.validation import check_ranges
from pipeline.rl.estimators import std_scaling
from pipeline.rl.kl import KL_ESTIMATORS
from pipeline.rl.losses import LOSS_AGGREGATIONS
from pipeline.rl.static_sampler import SAMPLERS

ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp", "dpo")


def check_config(cfg) -> None:
    """Refuse RL settings that cannot work. ``cfg`` is the stage config."""
    check_ranges(cfg)
    ppo, alg = cfg.ppo, cfg.algorithm
    choices = {"ppo.kl.estimator": (ppo.kl.estimator, KL_ESTIMATORS),
               "ppo.kl.controller": (ppo.kl.controller, ("fixed", "adaptive")),
               "ppo.lr_schedule": (ppo.lr_schedule, ("constant", "linear", "cosine")),
               "ppo.value_init": (ppo.value_init, ("rm", "fresh")),
               "ppo.old_logprobs": (ppo.old_logprobs, ("sampler", "recompute")),
               "ppo.fold_adapters": (ppo.fold_adapters, ("auto", "always", "never")),
               "ppo.sampler": (ppo.sampler, SAMPLERS),
               "algorithm.advantage": (alg.advantage, ESTIMATORS),
               "algorithm.kl_in": (alg.kl_in, ("reward", "loss", "none")),
               "algorithm.loss_agg": (alg.loss_agg, LOSS_AGGREGATIONS)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    try:
        std_scaling(alg.scale_by_std)
    except ValueError as e:
        raise ConfigError(f"{e}: group (GRPO's group std), batch (the update's std) or none (Dr.GRPO)") from None
    k = alg.samples_per_prompt
    if alg.advantage in ("rloo", "grpo", "dpo") and k < 2:
        raise ConfigError(f"algorithm.samples_per_prompt={k}: {alg.advantage} compares a prompt's samples with "
                          "each other and needs at least 2")
    if alg.advantage == "reinforce_pp" and alg.group_baseline and k < 2:
        raise ConfigError("algorithm.group_baseline=true with algorithm.samples_per_prompt=1 centres every score "
                          "on itself, to zero, and trains on the KL alone: set algorithm.samples_per_prompt to 2 "
                          "or more (REINFORCE++-baseline), or algorithm.group_baseline=false")
    if alg.advantage == "gae" and alg.kl_in != "reward":
        raise ConfigError(f"algorithm.kl_in={alg.kl_in} needs a critic-free estimator: with gae the KL is part of "
                          "the reward the value model predicts; use algorithm.kl_in=reward")
    if alg.advantage == "dpo" and alg.kl_in == "reward":
        raise ConfigError("algorithm.kl_in=reward with algorithm.advantage=dpo: online DPO's pairwise logit already "
                          "holds the log-ratio to the reference, and a KL penalty in the scores would rank the pairs "
                          "by it; use algorithm.kl_in=none, or loss to add a k3 term")
    sizes = {"ppo.rollout_batch_size": ppo.rollout_batch_size}
    for key, value in sizes.items():
        if value % k:
            raise ConfigError(f"{key}={value} must be a multiple of algorithm.samples_per_prompt={k}: "
                              "every prompt gets k samples")
    if ppo.rollout_batch_size % ppo.minibatch_size:
        raise ConfigError(f"ppo.minibatch_size={ppo.minibatch_size} must divide ppo.rollout_batch_size="
                          f"{ppo.rollout_batch_size}: a ragged minibatch would change the number of optimizer steps")
    for key in ("generation_batch_size", "micro_batch_size"):  # positive is check_ranges's
        if ppo[key] != "auto" and (isinstance(ppo[key], bool) or not isinstance(ppo[key], int)):
            raise ConfigError(f"ppo.{key}={ppo[key]!r} must be a positive integer or auto (the largest that fits "
                              "the GPU, pipeline/plan); fix the override or the YAML under conf/")
    if ppo.micro_batch_size != "auto" and ppo.minibatch_size % ppo.micro_batch_size:
        raise ConfigError(f"ppo.micro_batch_size={ppo.micro_batch_size} must divide ppo.minibatch_size="
                          f"{ppo.minibatch_size}, or be auto (a divisor that fits)")
    if ppo.kl.controller == "adaptive" and not (ppo.kl.target and ppo.kl.horizon):
        raise ConfigError("ppo.kl.controller=adaptive needs a positive ppo.kl.target and ppo.kl.horizon")
    unknown = set(cfg.health.thresholds) - set(HEALTH_METRICS) | set(cfg.health.abort_on) - set(HEALTH_METRICS)
    if unknown:
        raise ConfigError(f"health: unknown metric(s) {sorted(unknown)}; choose from {list(HEALTH_METRICS)}")


HEALTH_METRICS = ("logprob_gap", "equal_reward_groups", "truncation_rate", "length_reward_corr", "kl_token_max")


def check_rm_accuracy(rm, reward_cfg) -> None:
    """Refuse a reward model that does not rank held-out pairs well enough to train against."""
    if "rm" not in reward_cfg.sources:
        return  # the learned RM is not a reward source in this run
    accuracy = rm.metrics.get("eval_accuracy")
    if accuracy is None or accuracy < reward_cfg.min_accuracy:
        raise PipelineError(
            f"the reward model at {rm.path} ranks {accuracy if accuracy is None else f'{accuracy:.1%}'} of its "
            f"held-out pairs correctly, below reward.min_accuracy={reward_cfg.min_accuracy}: RL against it would "
            "optimise noise. Train it longer or on more data (make rm ARGS=\"train.max_steps=...\"), or lower "
            "reward.min_accuracy if you accept it.")
