"""pipeline.rl.batching: minibatch indices and optimizer-step counts."""

from __future__ import annotations

import pytest
import torch

from pipeline.rl.batching import count_optimizer_steps, minibatch_indices

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- minibatching


def test_minibatch_indices_cover_every_index_once_and_count_steps():
    g = torch.Generator().manual_seed(4)
    n, mb, epochs = 12, 4, 3
    steps = 0
    for _ in range(epochs):
        batches = minibatch_indices(n, mb, g)
        assert len(batches) == 3 and all(b.dtype == torch.long and len(b) == mb for b in batches)
        assert sorted(torch.cat(batches).tolist()) == list(range(n))
        steps += len(batches)
    # 3 epochs * 12 / 4 minibatches = 9 optimizer steps
    assert steps == count_optimizer_steps(n, mb, epochs) == 9


def test_minibatch_indices_reproducible_and_shuffled():
    a = minibatch_indices(64, 8, torch.Generator().manual_seed(5))
    b = minibatch_indices(64, 8, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.cat(a).tolist() != list(range(64))


def test_minibatch_non_divisible_raises():
    with pytest.raises(ValueError, match="divide"):
        minibatch_indices(10, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divide"):
        count_optimizer_steps(10, 4, 2)


def test_sizes_of_one_are_the_smallest_and_zero_or_less_is_refused():
    steps = count_optimizer_steps(1, 1, 1)
    assert steps == 1 and isinstance(steps, int)  # a step count, not 1.0
    for n, mb in ((0, 4), (4, 0), (-4, 4), (4, -4)):
        with pytest.raises(ValueError, match="sizes must be positive"):
            count_optimizer_steps(n, mb, 1)
    with pytest.raises(ValueError, match="ppo_epochs must be positive, got 0"):
        count_optimizer_steps(4, 4, 0)
