"""Minibatch indices and the optimizer-step count of a PPO update."""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- minibatching


def _check_divisible(n: int, minibatch_size: int) -> None:
    if n <= 0 or minibatch_size <= 0:
        raise ValueError(f"sizes must be positive, got n={n}, minibatch_size={minibatch_size}")
    if n % minibatch_size != 0:
        # A ragged last minibatch would silently change the number of optimizer steps.
        raise ValueError(f"minibatch_size {minibatch_size} does not divide batch size {n}")


def minibatch_indices(
    n: int, minibatch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Shuffle ``range(n)`` and split it into ``n // minibatch_size`` equal minibatches.

    One call per PPO epoch; each minibatch is exactly one optimizer step.

    Raises:
        ValueError: if ``minibatch_size`` does not divide ``n``.
    """
    _check_divisible(n, minibatch_size)
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(minibatch_size))


def count_optimizer_steps(batch_size: int, minibatch_size: int, ppo_epochs: int) -> int:
    """Optimizer steps per PPO update: ``ppo_epochs * batch_size // minibatch_size``."""
    _check_divisible(batch_size, minibatch_size)
    if ppo_epochs <= 0:
        raise ValueError(f"ppo_epochs must be positive, got {ppo_epochs}")
    return ppo_epochs * (batch_size // minibatch_size)
