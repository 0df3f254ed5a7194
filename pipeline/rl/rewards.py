"""Reward sources for PPO: the RM artifact, any Python callable, or a weighted sum.

A source is configured under ``reward.sources.<name>``:

    rm:   {weight: 1.0}                                   # the RM artifact (the default)
    gold: {_target_: pipeline.rl.rewards.GoldJudgeReward, weight: 0.5,
           seed: 0, n_entities: 40, n_unknown: 40}        # any callable

A callable takes ``(prompts, responses: list[str])`` and returns one float per response;
each prompt is as the prompt file gives it (text, or a list of ``{"role", "content"}``
messages). A class named by ``_target_`` is instantiated with the remaining keys first.
The total score is ``sum_i weight_i * source_i``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import hydra.utils
import torch
from omegaconf import OmegaConf

from pipeline.core.errors import ConfigError

RewardFn = Callable[[list, list[str], torch.Tensor], torch.Tensor]


def normalise(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Standardise raw RM scores with the RM's reference statistics: (s - mean) / std."""
    return (scores - mean) / std


def reward_scale(reward_cfg, rm_metrics: dict) -> tuple[float, float]:
    """``(mean, std)`` the RM's scores are normalised with; ``(0, 1)`` when they are not."""
    if reward_cfg.normalize:
        return rm_metrics["reward_mean"], rm_metrics["reward_std"]
    return 0.0, 1.0


def sharpening(ref_logprobs: torch.Tensor, mask: torch.Tensor, coef: float, per_token: bool) -> torch.Tensor:
    """alpha * log pi_ref(y|x), the term ``reward.sharpen`` adds to every score. Shape (B,).

    ``ref_logprobs`` (B, T): the reference's log-probability of each response token, ``mask`` (B, T)
    its response tokens. Maximum-likelihood sharpening (Huang et al. 2024, "Self-Improvement in
    Language Models: The Sharpening Mechanism"): the reference is its own verifier. With the KL
    penalty beta * KL(pi || pi_ref), the optimum of E[r + alpha log pi_ref(y|x)] - beta KL is
    pi*(y|x) ~ pi_ref(y|x)^(1 + alpha/beta) exp(r/beta): the reference raised to a power, the
    sequence-level form of sampling it colder, tilted by the reward as before. It moves mass to the
    answers the reference already rates most likely, which a reward model may not tell apart (a
    known fact against a wrong one). The sum over tokens favours short answers as likelihood does
    (a 200-token answer at 1.5 nats a token costs 300 * alpha); ``per_token`` takes the mean over
    the response's tokens instead, which does not, and no longer has the closed form above.
    The trainer passes the log-probs it computes for the KL, at the sampling temperature, so the
    reference is scored as it would sample (at the default T = 1, its plain log-probabilities).
    """
    seq = (ref_logprobs * mask).sum(1)
    if per_token:
        seq = seq / mask.sum(1).clamp(min=1)
    return coef * seq


def _callable_source(spec: dict) -> Callable[[list[str], list[str]], list[float]]:
    target = hydra.utils.get_object(spec.pop("_target_"))
    if inspect.isclass(target):
        return target(**spec)
    if spec:
        return lambda prompts, responses: target(prompts, responses, **spec)
    return target


def build_reward_fn(reward_cfg, rm_metrics: dict) -> RewardFn:
    """Combine the configured sources into one ``(prompts, responses, rm_scores) -> (B,)``."""
    terms: list[tuple[float, RewardFn]] = []
    for name, src in reward_cfg.sources.items():
        spec = OmegaConf.to_container(src, resolve=True)
        if not isinstance(spec, dict) or not isinstance(spec.get("weight"), (int, float)):
            raise ConfigError(f"reward.sources.{name} needs a numeric `weight`, e.g. "
                              f"reward.sources.{name}.weight=1.0")
        weight = spec.pop("weight")
        if "_target_" not in spec:  # the learned reward model
            if spec:
                raise ConfigError(f"reward.sources.{name}: the RM source takes only `weight`, got {sorted(spec)}")
            mean, std = reward_scale(reward_cfg, rm_metrics)
            terms.append((weight, lambda p, r, rm, m=mean, s=std: normalise(rm, m, s)))
            continue
        fn = _callable_source(spec)
        terms.append((weight, lambda p, r, rm, fn=fn, name=name: _as_scores(fn(p, r), len(r), name, rm.device)))
    if not terms:
        raise ConfigError("reward.sources is empty: configure at least one reward source")

    def total(prompts: list, responses: list[str], rm_scores: torch.Tensor) -> torch.Tensor:
        return sum(w * fn(prompts, responses, rm_scores) for w, fn in terms)

    return total


def _as_scores(values, n: int, name: str, device) -> torch.Tensor:
    """A callable's output as (n,) float32, or an error naming the source."""
    scores = torch.as_tensor(values, dtype=torch.float32, device=device)
    if scores.shape != (n,):
        raise ConfigError(f"reward.sources.{name} returned shape {tuple(scores.shape)} for {n} responses; "
                          "a reward callable must return one float per response")
    if not torch.isfinite(scores).all():
        raise ConfigError(f"reward.sources.{name} returned a non-finite score: {scores.tolist()}")
    return scores
