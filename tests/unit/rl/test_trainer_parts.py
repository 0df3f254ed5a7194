"""The RL trainer's pure parts: PPO-ptx's pretraining batches across processes, and when adapters fold."""

import pytest
import torch

from pipeline.rl.trainer import FOLD_SHARE, PtxBatches, folds

pytestmark = pytest.mark.unit


def test_ptx_ranks_take_disjoint_slices_of_one_global_batch():
    stream = torch.arange(1000)
    ptx = PtxBatches(stream, block_size=8, batch_size=3, seed=5)
    ranks = [ptx.batch(update=2, step=1, rank=r, world=2) for r in range(2)]
    assert all(b.shape == (3, 8) for b in ranks)
    # Windows of the stream, 8 consecutive tokens each.
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 8)) for b in ranks for w in b)
    # N processes see N different batches, whose union is one process's batch of 3 x N windows.
    assert not torch.equal(ranks[0], ranks[1])
    one = PtxBatches(stream, block_size=8, batch_size=6, seed=5).batch(update=2, step=1)
    assert torch.equal(torch.cat(ranks), one)
    # A resumed run draws the same batch at the same (update, step); another step, another seed, others.
    assert torch.equal(ptx.batch(2, 1, rank=1, world=2), ranks[1])
    assert not torch.equal(ptx.batch(2, 2, rank=1, world=2), ranks[1])
    assert not torch.equal(ptx.batch(3, 1, rank=1, world=2), ranks[1])
    assert not torch.equal(PtxBatches(stream, 8, 3, seed=6).batch(2, 1, rank=1, world=2), ranks[1])


def test_a_ptx_corpus_shorter_than_a_window_is_refused():
    # 10 = 8 + 2 tokens, the shortest accepted: two full windows, starting at 0 and at 1, and no other.
    windows = PtxBatches(torch.arange(10), block_size=8, batch_size=64, seed=0).batch(0, 0)
    assert {tuple(w.tolist()) for w in windows} == {tuple(range(8)), tuple(range(1, 9))}
    with pytest.raises(ValueError, match="fewer than ppo.ptx_block_size \\+ 2"):
        PtxBatches(torch.arange(9), block_size=8, batch_size=1, seed=0)


def test_auto_folds_only_an_fp32_base_whose_adapters_cost_enough():
    assert folds("auto", FOLD_SHARE, torch.float32)
    assert not folds("auto", FOLD_SHARE / 2, torch.float32)  # too small a share: folding does not pay
    assert not folds("auto", 0.9, torch.bfloat16)  # a 16-bit fold rounds the adapter's delta away
    assert folds("always", 0.0, torch.bfloat16) and not folds("never", 0.9, torch.float32)
