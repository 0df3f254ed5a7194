"""pipeline.rl.losses: loss aggregation, the clipped policy and value losses, on worked values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.rl.losses import LOSS_AGGREGATIONS, loss_weights, policy_loss, value_loss
from tests.unit.worked import t64

pytestmark = pytest.mark.unit


def test_loss_weights_worked():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    # per-token losses l = 1 on the first row, 5 on the second
    l = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    w, u = loss_weights(mask, "token_mean", max_len=8)
    assert ((w * l).sum() / u).item() == pytest.approx(9 / 5)  # (4 + 5) / 5 tokens
    w, u = loss_weights(mask, "seq_mean", max_len=8)
    assert ((w * l).sum() / u).item() == pytest.approx(3.0)  # (mean 1 + mean 5) / 2 sequences
    w, u = loss_weights(mask, "constant", max_len=8)
    assert ((w * l).sum() / u).item() == pytest.approx(9 / 16)  # (4 + 5) / (8 * 2)
    with pytest.raises(ValueError, match="token_mean"):
        loss_weights(mask, "mean", 8)


def test_split_minibatch_gives_the_same_loss():
    # Two micro-batches with their own weights over shared units equal the whole minibatch.
    g = torch.Generator().manual_seed(7)
    l = torch.rand(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    for mode in LOSS_AGGREGATIONS:
        w, u = loss_weights(mask, mode, 5)
        whole = (w * l).sum() / u
        parts = [loss_weights(mask[s], mode, 5) for s in (slice(0, 2), slice(2, 6))]
        units = sum(p[1] for p in parts)
        split = sum((p[0] * l[s]).sum() for p, s in zip(parts, (slice(0, 2), slice(2, 6)))) / units
        assert split.item() == pytest.approx(whole.item()), mode


# --------------------------------------------------------------------------- policy loss


def test_policy_loss_ratio_one_when_logp_equals_old():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[1, 2:] = 0
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
    # ratio will be all ones -> l = -adv on valid tokens, nothing clipped, approxkl 0
    torch.testing.assert_close(loss, torch.where(mask.bool(), -adv, torch.zeros_like(adv)))
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0 and stats["logprob_gap"].item() == 0.0


def test_policy_loss_clipping_worked():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = t64(math.log(1.5), math.log(0.5), 0.0, math.inf).requires_grad_()  # inf = padding
    adv = t64(1.0, 1.0, -1.0, 5.0)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # ratio will be [1.5, 0.5, 1]
    # -A * ratio       = [-1.5, -0.5, 1]
    # -A * clip(ratio) = [-1.2, -0.8, 1]
    # max              = [-1.2, -0.5, 1, 0 (padding)]
    torch.testing.assert_close(loss, t64(-1.2, -0.5, 1.0, 0.0))
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)  # only token 0
    assert stats["ratio"].item() == pytest.approx(3.0 / 3)  # (1.5 + 0.5 + 1) / 3
    approxkl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3
    assert stats["approxkl"].item() == pytest.approx(approxkl)
    assert stats["logprob_gap"].item() == pytest.approx((math.log(1.5) + math.log(2)) / 3)
    assert all(not v.requires_grad for v in stats.values())
    (loss.sum() / 3).backward()
    # clipped token 0 gets no gradient; token 1: d/dlogp (-A * ratio) / 3 = -0.5 / 3
    # token 2: -(-1) * 1 / 3 = 1/3; the inf padding gives 0, not nan
    torch.testing.assert_close(logp.grad, t64(0.0, -0.5 / 3, 1 / 3, 0.0))


# --------------------------------------------------------------------------- value loss


def test_value_loss_clipping_worked():
    values = t64(1.5, 0.9, 123.0).requires_grad_()
    old = t64(1.0, 1.0, 0.0)
    returns = t64(2.0, 0.0, 0.0)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: clip(1.5, 0.8, 1.2) = 1.2; (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64 -> 0.5 * 0.64
    # token 1: 0.9 within range;      (0.9 - 0)^2 = 0.81 both             -> 0.5 * 0.81
    torch.testing.assert_close(loss, t64(0.32, 0.405, 0.0))
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    (loss.sum() / 2).backward()
    # token 0 is clipped -> no gradient; token 1: 0.5 * 2 * 0.9 / 2 = 0.45; padding 0
    torch.testing.assert_close(values.grad, t64(0.0, 0.45, 0.0))
