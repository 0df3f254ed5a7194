"""pipeline.rl.masked: statistics over valid tokens, on worked values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.rl.masked import masked_mean, masked_var, masked_whiten
from tests.unit.worked import t64

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_worked():
    x = t64([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean of [1, 2, 3] is 2; unbiased var = (1 + 0 + 1) / 2 = 1; biased = 2/3
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)


def test_masked_mean_dim_empty_row_and_nan_padding():
    x = t64([1.0, 3.0, math.nan], [5.0, 6.0, 7.0])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # row means will be [2, 0]: nan in padding is ignored, an empty row gives 0
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t64(2.0, 0.0)[0])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    # a row with one valid token has that token as its mean
    torch.testing.assert_close(masked_mean(x, torch.tensor([[0, 1, 0], [1, 1, 0]]), dim=1), t64(3.0, 5.5)[0])
    # two valid tokens [1, 3]: unbiased var = ((1 - 2)^2 + (3 - 2)^2) / 1 = 2
    assert masked_var(x, mask).item() == pytest.approx(2.0)
    # a single valid token: unbiased variance falls back to 0 instead of 0 / 0
    assert masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]])).item() == 0.0


def test_masked_whiten_statistics_and_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3 + 5
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()
    # garbage in padding does not move the statistics
    x_garbage = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(masked_whiten(x_garbage, mask), w)


def thread_all_reduce(world: int):
    """An in-process all-reduce(sum) for ``world`` threads: each thread plays one process."""
    import threading
    barrier, slots = threading.Barrier(world), {}

    def make(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots[r] for r in range(world))
            barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total
        return all_reduce
    return [make(r) for r in range(world)]


def test_whitening_across_processes_equals_whitening_the_whole_batch():
    import threading
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    # Two "processes" with 8 and 5 valid tokens: a mean of per-shard means would differ.
    reduces, out = thread_all_reduce(2), {}

    def shard(rank):
        rows = slice(2 * rank, 2 * rank + 2)
        out[rank] = (masked_whiten(x[rows], mask[rows], all_reduce=reduces[rank]),
                     masked_mean(x[rows], mask[rows], all_reduce=reduces[rank]))
    threads = [threading.Thread(target=shard, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), masked_whiten(x, mask))
    assert out[0][1].item() == out[1][1].item() == pytest.approx(masked_mean(x, mask).item())


def test_masked_whiten_shift_mean_false_keeps_mean():
    x = t64([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, mask, shift_mean=False)
    # mean 2, var 1 -> (x - 2) / 1 + 2 = x on valid tokens; padding -> 0
    torch.testing.assert_close(w, t64(1.0, 2.0, 3.0, 0.0), atol=1e-6, rtol=0)
    assert masked_mean(w, mask).item() == pytest.approx(masked_mean(x, mask).item())
