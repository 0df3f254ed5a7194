"""Rollout health: the signals that caught the silent RL bugs of the last years.

Each is logged every update (``health/*``), summarised in the artifact and shown in the eval
report. Crossing a configured threshold prints a warning naming the metric and what it usually
means; metrics listed in ``health.abort_on`` stop the run (the last checkpoint is kept).

- ``logprob_gap``: mean ``|log pi_old - log pi|`` over the first minibatch of an update, before
  any step: ~0 when the sampler and the trainer agree (stale weights, a temperature or precision
  mismatch between them show up here).
- ``equal_reward_groups``: share of prompts whose k samples all scored the same; a group
  estimator gets no signal from them.
- ``truncation_rate``: share of responses cut at ``max_new_tokens`` without a stop token.
- ``length_reward_corr``: Pearson correlation of response length and score; length hacking
  (the policy growing its answers to please the RM) shows up here first.
- ``kl_token_max``: the largest per-token KL to the reference in the batch; spikes mean the
  policy put mass on tokens the reference finds very unlikely.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.core.errors import PipelineError

MEANING = {
    "logprob_gap": "the sampler and the trainer disagree: stale weights, or a temperature or precision "
                   "mismatch between generation and the training pass",
    "equal_reward_groups": "many prompts' samples all score the same, so group advantages are zero: the "
                           "reward is saturated or too coarse, or k is too small",
    "truncation_rate": "many responses never stop: raise ppo.max_new_tokens, or the policy lost its stop token",
    "length_reward_corr": "longer answers score higher: the policy may be length-hacking the reward model",
    "kl_token_max": "a per-token KL spike: the policy puts mass on tokens the reference finds very unlikely",
}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two (N,) tensors; 0 when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def crossed(metrics: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """Names of the health metrics above their threshold (``health/<name>`` in ``metrics``)."""
    return [name for name, limit in thresholds.items()
            if f"health/{name}" in metrics and metrics[f"health/{name}"] > limit]


def check(metrics: dict[str, float], thresholds: dict[str, float], abort_on: list[str], update: int,
          warn: Callable[[str], None]) -> None:
    """Warn for every crossed threshold; raise for those in ``abort_on``."""
    bad = crossed(metrics, thresholds)
    for name in bad:
        warn(f"warning: update {update}: health/{name} = {metrics[f'health/{name}']:.4g} is above "
             f"health.thresholds.{name}={thresholds[name]:g}: {MEANING[name]}")
    stop = [name for name in bad if name in abort_on]
    if stop:
        raise PipelineError(f"stopped at update {update}: health/{stop[0]} crossed its threshold "
                            f"(health.abort_on={list(abort_on)}); the last checkpoint is kept. "
                            f"{MEANING[stop[0]]}.")
