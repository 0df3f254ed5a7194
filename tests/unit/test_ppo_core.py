"""Unit tests for the PPO math core, on hand-computed examples (worked values in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.rl import core

pytestmark = pytest.mark.unit

LN2 = math.log(2.0)


def t64(*items):
    """``t64(1, 2)`` -> float64 ``[[1, 2]]``; ``t64([1, 2], [3, 4])`` -> ``[[1, 2], [3, 4]]``."""
    rows = list(items) if isinstance(items[0], (list, tuple)) else [list(items)]
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- log-probs / entropy


def test_logprobs_from_logits_hand_computed():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    labels = torch.tensor([[2, 0]])
    logp = core.logprobs_from_logits(logits, labels)
    # logp will be [log 1/2, log 1/4]
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.5), math.log(0.25)]]))
    assert logp.shape == (1, 2)


def test_logprobs_from_logits_matches_log_softmax_and_upcasts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(core.logprobs_from_logits(logits, labels), expected)
    assert core.logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def test_entropy_hand_computed():
    # p = [1/4, 1/4, 1/2]: H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2 = 1.0397
    # uniform over 4: H = ln 4
    logits = torch.tensor([[[0.0, 0.0, LN2, -1e9], [1.0, 1.0, 1.0, 1.0]]])
    ent = core.entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[1.5 * LN2, math.log(4.0)]]))


def test_entropy_with_minus_inf_logit_is_finite_with_finite_grad():
    # p = [1/2, 1/2, 0]: H = ln 2; the -inf logit must not make 0 * -inf = nan
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    ent = core.entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[LN2]]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_worked():
    x = t64([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean of [1, 2, 3] is 2; unbiased var = (1 + 0 + 1) / 2 = 1; biased = 2/3
    assert core.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert core.masked_var(x, mask).item() == pytest.approx(1.0)
    assert core.masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)


def test_masked_mean_dim_empty_row_and_nan_padding():
    x = t64([1.0, 3.0, math.nan], [5.0, 6.0, 7.0])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # row means will be [2, 0]: nan in padding is ignored, an empty row gives 0
    torch.testing.assert_close(core.masked_mean(x, mask, dim=1), t64(2.0, 0.0)[0])
    assert core.masked_mean(x, mask).item() == pytest.approx(2.0)
    # a single valid token: unbiased variance falls back to 0 instead of 0 / 0
    assert core.masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]])).item() == 0.0


def test_masked_whiten_statistics_and_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3 + 5
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    w = core.masked_whiten(x, mask)
    assert core.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert core.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()
    # garbage in padding does not move the statistics
    x_garbage = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(core.masked_whiten(x_garbage, mask), w)


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
        out[rank] = (core.masked_whiten(x[rows], mask[rows], all_reduce=reduces[rank]),
                     core.masked_mean(x[rows], mask[rows], all_reduce=reduces[rank]))
    threads = [threading.Thread(target=shard, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), core.masked_whiten(x, mask))
    assert out[0][1].item() == out[1][1].item() == pytest.approx(core.masked_mean(x, mask).item())


def test_masked_whiten_shift_mean_false_keeps_mean():
    x = t64([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = core.masked_whiten(x, mask, shift_mean=False)
    # mean 2, var 1 -> (x - 2) / 1 + 2 = x on valid tokens; padding -> 0
    torch.testing.assert_close(w, t64(1.0, 2.0, 3.0, 0.0), atol=1e-6, rtol=0)
    assert core.masked_mean(w, mask).item() == pytest.approx(core.masked_mean(x, mask).item())


# --------------------------------------------------------------------------- masks and stop tokens

EOS, EOT, PAD = 2, 3, 0
STOPS = torch.tensor([EOT, EOS])  # e.g. <|im_end|> and <|endoftext|>


def test_stop_mask_ends_at_the_first_token_of_the_stop_set():
    ids = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD],  # eos at 2
            [5, EOT, 7, EOS, 9],  # the end-of-turn token at 1 wins
            [5, 6, 7, 8, 9],  # truncated, no stop token
        ]
    )
    mask = core.stop_mask(ids, STOPS)
    assert mask.dtype == torch.bool
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert core.ends_with_stop(ids, mask, STOPS).tolist() == [True, True, False]


def test_pad_never_ends_a_response():
    # A model that emits the pad id mid-answer has not stopped: pad is not in the stop set.
    ids = torch.tensor([[5, PAD, 6, EOT, PAD]])
    mask = core.stop_mask(ids, STOPS)
    assert mask.long().tolist() == [[1, 1, 1, 1, 0]]
    assert core.ends_with_stop(ids, mask, STOPS).tolist() == [True]
    assert core.ends_with_stop(ids, torch.tensor([[1, 1, 1, 0, 0]]), STOPS).tolist() == [False]


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    idx = core.last_token_index(mask)
    assert idx.dtype == torch.long
    assert idx.tolist() == [2, 0, 4]


# --------------------------------------------------------------------------- KL and rewards


def test_kl_estimators_worked():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    # k1 will be [log 2, -log 2]  (k1 can be negative)
    torch.testing.assert_close(core.kl_per_token(logp, ref, "k1"), t64(LN2, -LN2))
    # r = ref / p = [0.5, 2]; k3 = (r - 1) - log r = [-0.5 + ln 2, 1 - ln 2] = [0.1931, 0.3069]
    k3 = core.kl_per_token(logp, ref, "k3")
    torch.testing.assert_close(k3, t64(-0.5 + LN2, 1.0 - LN2))
    assert k3[0, 0].item() == pytest.approx(0.193147, abs=1e-6)


def test_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(64, 32, generator=g) * 3
    ref = torch.randn(64, 32, generator=g) * 3
    assert (core.kl_per_token(logp, ref, "k3") >= 0).all()
    assert (core.kl_per_token(logp, logp, "k3") == 0).all()


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k2"):
        core.kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


def test_terminal_reward_lands_on_last_real_token():
    ids = torch.tensor([[5, 6, EOT, PAD, PAD]])
    mask = core.stop_mask(ids, STOPS)  # [1, 1, 1, 0, 0]
    logp = torch.zeros(1, 5)
    rewards, kl, non_score = core.shape_rewards(
        torch.tensor([3.0]), logp, logp.clone(), mask, kl_coef=0.1, estimator="k1"
    )
    # score lands at index 2 (the EOS), not at index 4 (the end of the padded row)
    assert rewards.tolist() == [[0.0, 0.0, 3.0, 0.0, 0.0]]
    assert (kl == 0).all() and (non_score == 0).all()


def test_shape_rewards_kl_penalty_worked():
    logp = torch.full((2, 4), math.log(0.5), dtype=torch.float64)
    ref = torch.full((2, 4), math.log(0.25), dtype=torch.float64)
    ref[:, 3] = math.nan  # padding garbage must not leak
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    scores = torch.tensor([1.0, -2.0])
    rewards, kl, non_score = core.shape_rewards(scores, logp, ref, mask, 0.1, "k1")
    # k1 = ln 2 = 0.6931 per valid token; non_score = -0.1 * ln 2 = -0.0693
    p = -0.1 * LN2
    torch.testing.assert_close(non_score, t64([p, p, p, 0.0], [p, p, 0.0, 0.0]))
    torch.testing.assert_close(kl, t64([LN2] * 3 + [0.0], [LN2] * 2 + [0.0] * 2))
    # rewards = non_score + score at the last valid token: [p, p, p + 1, 0], [p, p - 2, 0, 0]
    expected = t64([p, p, p + 1.0, 0.0], [p, p - 2.0, 0.0, 0.0])
    torch.testing.assert_close(rewards, expected)
    # sequence-level KL to log: [3 ln 2, 2 ln 2]
    torch.testing.assert_close(kl.sum(-1), torch.tensor([3 * LN2, 2 * LN2], dtype=torch.float64))


def test_shape_rewards_empty_row_gets_no_score():
    mask = torch.tensor([[0, 0, 0]])
    rewards, _, _ = core.shape_rewards(
        torch.tensor([5.0]), torch.zeros(1, 3), torch.zeros(1, 3), mask, 0.1, "k3"
    )
    assert (rewards == 0).all()


# --------------------------------------------------------------------------- GAE


def test_gae_gamma1_lam1_worked():
    rewards = t64(0.0, 0.0, 1.0)
    values = t64(0.5, 0.6, 0.7)
    mask = torch.ones(1, 3)
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # delta2 = 1 + 0 - 0.7 = 0.3            A2 = 0.3
    # delta1 = 0 + 0.7 - 0.6 = 0.1          A1 = 0.1 + 0.3 = 0.4
    # delta0 = 0 + 0.6 - 0.5 = 0.1          A0 = 0.1 + 0.4 = 0.5
    # returns = A + V = [1, 1, 1] (undiscounted reward-to-go)
    torch.testing.assert_close(adv, t64(0.5, 0.4, 0.3))
    torch.testing.assert_close(ret, t64(1.0, 1.0, 1.0))


def test_gae_discounted_worked():
    rewards = t64(1.0, 0.0, 2.0)
    values = t64(0.5, 1.0, 1.5)
    mask = torch.ones(1, 3)
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # gamma * lam = 0.855
    # delta2 = 2 + 0         - 1.5 = 0.5    A2 = 0.5
    # delta1 = 0 + 0.9 * 1.5 - 1.0 = 0.35   A1 = 0.35 + 0.855 * 0.5    = 0.7775
    # delta0 = 1 + 0.9 * 1.0 - 0.5 = 1.4    A0 = 1.4  + 0.855 * 0.7775 = 2.0647625
    # returns = [2.5647625, 1.7775, 2.0]
    torch.testing.assert_close(adv, t64(2.0647625, 0.7775, 0.5))
    torch.testing.assert_close(ret, t64(2.5647625, 1.7775, 2.0))


def test_gae_padded_row_equals_unpadded_and_padding_is_zero():
    rewards = t64(1.0, 0.0, 2.0, 99.0, -99.0)  # garbage in padding
    values = t64(0.5, 1.0, 1.5, 42.0, 7.0)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.95)
    adv3, ret3 = core.gae(rewards[:, :3], values[:, :3], torch.ones(1, 3), 0.9, 0.95)
    torch.testing.assert_close(adv[:, :3], adv3)
    torch.testing.assert_close(ret[:, :3], ret3)
    assert (adv[:, 3:] == 0).all() and (ret[:, 3:] == 0).all()


def test_gae_batch_rows_are_independent_and_detached():
    values = t64([0.5, 1.0, 1.5], [2.0, 2.0, 2.0]).requires_grad_()
    rewards = t64([1.0, 0.0, 2.0], [0.0, 1.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = core.gae(rewards, values, mask, 0.9, 0.95)
    torch.testing.assert_close(adv[0], t64(2.0647625, 0.7775, 0.5)[0])
    # row 1, T=2: delta1 = 1 - 2 = -1; delta0 = 0 + 0.9 * 2 - 2 = -0.2; A0 = -0.2 - 0.855
    torch.testing.assert_close(adv[1], t64(-0.2 - 0.855, -1.0, 0.0)[0])
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- critic-free estimators


def test_rloo_leave_one_out_worked():
    # one prompt, k = 4, rewards [1, 2, 3, 6]: baseline_i = (12 - R_i) / 3 = [11/3, 10/3, 3, 2]
    # A = [1 - 11/3, 2 - 10/3, 0, 4] = [-8/3, -4/3, 0, 4]; a second prompt [5, 5] -> [0, 0]
    adv = core.rloo_advantages(t64(1.0, 2.0, 3.0, 6.0)[0], 4)
    torch.testing.assert_close(adv, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0], dtype=torch.float64))
    assert core.rloo_advantages(torch.tensor([5.0, 5.0, 1.0, 3.0]), 2).tolist() == [0.0, 0.0, -2.0, 2.0]
    with pytest.raises(ValueError, match="k >= 2"):
        core.rloo_advantages(torch.tensor([1.0]), 1)


def test_grpo_group_z_scores_and_dr_grpo_worked():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    # group 1: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3) = 2.1602
    # z = [-2, -1, 0, 3] / (2.1602 + 1e-4); group 2 is constant: all zeros
    std = math.sqrt(14 / 3) + 1e-4
    expected = torch.tensor([-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(core.grpo_advantages(r, 4, scale_by_std=True), expected)
    # Dr.GRPO: the group mean removed, no division
    torch.testing.assert_close(core.grpo_advantages(r, 4, scale_by_std=False),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0], dtype=torch.float64))
    assert core.equal_reward_groups(r, 4).item() == 0.5  # the second group carries no signal


def test_reinforce_pp_returns_to_go_and_batch_normalisation():
    # rewards with the score on the last valid token and a KL penalty of -0.1 per token
    rewards = t64([-0.1, -0.1, 0.9, 7.0], [-0.1, 1.9, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g = core.returns_to_go(rewards, mask)
    # row 0: [0.7, 0.8, 0.9, 0] (sum to the end, gamma = 1); row 1: [1.8, 1.9, 0, 0]
    torch.testing.assert_close(g, t64([0.7, 0.8, 0.9, 0.0], [1.8, 1.9, 0.0, 0.0]))
    a = core.masked_whiten(g, mask)  # REINFORCE++: normalised over the whole batch's tokens
    assert core.masked_mean(a, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert core.masked_var(a, mask).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(core.group_centred(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_loss_weights_worked():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    # per-token losses l = 1 on the first row, 5 on the second
    l = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    w, u = core.loss_weights(mask, "token_mean", max_len=8)
    assert ((w * l).sum() / u).item() == pytest.approx(9 / 5)  # (4 + 5) / 5 tokens
    w, u = core.loss_weights(mask, "seq_mean", max_len=8)
    assert ((w * l).sum() / u).item() == pytest.approx(3.0)  # (mean 1 + mean 5) / 2 sequences
    w, u = core.loss_weights(mask, "constant", max_len=8)
    assert ((w * l).sum() / u).item() == pytest.approx(9 / 16)  # (4 + 5) / (8 * 2)
    with pytest.raises(ValueError, match="token_mean"):
        core.loss_weights(mask, "mean", 8)


def test_split_minibatch_gives_the_same_loss():
    # Two micro-batches with their own weights over shared units equal the whole minibatch.
    g = torch.Generator().manual_seed(7)
    l = torch.rand(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    for mode in core.LOSS_AGGREGATIONS:
        w, u = core.loss_weights(mask, mode, 5)
        whole = (w * l).sum() / u
        parts = [core.loss_weights(mask[s], mode, 5) for s in (slice(0, 2), slice(2, 6))]
        units = sum(p[1] for p in parts)
        split = sum((p[0] * l[s]).sum() for p, s in zip(parts, (slice(0, 2), slice(2, 6)))) / units
        assert split.item() == pytest.approx(whole.item()), mode


def test_custom_logprob_backward_matches_autograd_and_temperature():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 50, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 3), generator=g)
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    for T in (1.0, 0.7):
        expected = torch.log_softmax(logits / T, -1).gather(-1, labels[..., None]).squeeze(-1)
        (grad_ref,) = torch.autograd.grad((expected * weights).sum(), logits)
        got = core.logprobs_from_logits(logits, labels, T)
        (grad,) = torch.autograd.grad((got.double() * weights).sum(), logits)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=0)
    # a missing division by T would show: T = 0.5 halves every logit's scale
    assert not torch.allclose(core.logprobs_from_logits(logits, labels, 0.5), core.logprobs_from_logits(logits, labels))


# --------------------------------------------------------------------------- policy loss


def test_policy_loss_ratio_one_when_logp_equals_old():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[1, 2:] = 0
    loss, stats = core.policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
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
    loss, stats = core.policy_loss(logp, old, adv, mask, clip_range=0.2)
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
    loss, stats = core.value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: clip(1.5, 0.8, 1.2) = 1.2; (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64 -> 0.5 * 0.64
    # token 1: 0.9 within range;      (0.9 - 0)^2 = 0.81 both             -> 0.5 * 0.81
    torch.testing.assert_close(loss, t64(0.32, 0.405, 0.0))
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    (loss.sum() / 2).backward()
    # token 0 is clipped -> no gradient; token 1: 0.5 * 2 * 0.9 / 2 = 0.45; padding 0
    torch.testing.assert_close(values.grad, t64(0.0, 0.45, 0.0))


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_one_update_worked():
    ctl = core.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)
    # e = 9/6 - 1 = 0.5, clipped to 0.2; value = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    assert ctl.value == pytest.approx(0.100512)
    ctl = core.AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(current_kl=3.0, n_steps=256)
    # e = 3/6 - 1 = -0.5, clipped to -0.2; value = 0.1 * (1 - 0.00512) = 0.099488
    assert ctl.value == pytest.approx(0.099488)
    ctl = core.AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(current_kl=6.6, n_steps=256)
    # e = 0.1 (inside the clip); value = 0.1 * (1 + 0.1 * 0.0256) = 0.100256
    assert ctl.value == pytest.approx(0.100256)


def test_adaptive_kl_state_round_trip():
    ctl = core.make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    for kl in (9.0, 2.0, 7.0):
        ctl.update(kl, 256)
    state = ctl.state_dict()
    restored = core.make_kl_controller("adaptive", 0.5, target=6.0, horizon=10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(8.0, 64)
    restored.update(8.0, 64)
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        core.FixedKLController(0.1).load_state_dict(state)


def test_fixed_kl_controller_and_factory():
    ctl = core.make_kl_controller("fixed", 0.05, target=None, horizon=None)
    assert isinstance(ctl, core.FixedKLController)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = core.FixedKLController(0.3)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError):
        core.make_kl_controller("pid", 0.1, 6.0, 10000)
    with pytest.raises(ValueError):
        core.make_kl_controller("adaptive", 0.1, None, None)


# --------------------------------------------------------------------------- minibatching


def test_minibatch_indices_cover_every_index_once_and_count_steps():
    g = torch.Generator().manual_seed(4)
    n, mb, epochs = 12, 4, 3
    steps = 0
    for _ in range(epochs):
        batches = core.minibatch_indices(n, mb, g)
        assert len(batches) == 3 and all(b.dtype == torch.long and len(b) == mb for b in batches)
        assert sorted(torch.cat(batches).tolist()) == list(range(n))
        steps += len(batches)
    # 3 epochs * 12 / 4 minibatches = 9 optimizer steps
    assert steps == core.count_optimizer_steps(n, mb, epochs) == 9


def test_minibatch_indices_reproducible_and_shuffled():
    a = core.minibatch_indices(64, 8, torch.Generator().manual_seed(5))
    b = core.minibatch_indices(64, 8, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.cat(a).tolist() != list(range(64))


def test_minibatch_non_divisible_raises():
    with pytest.raises(ValueError, match="divide"):
        core.minibatch_indices(10, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divide"):
        core.count_optimizer_steps(10, 4, 2)


def test_head_logprobs_in_chunks_give_the_full_logits_numbers_and_gradients(monkeypatch):
    """The LM head run chunk by chunk (recomputed in the backward pass) gives the log-probs and the
    gradients (to the hidden states and to a trainable head) of the whole [B, T, V] logits, at
    T = 0.7 and with a Gemma-style soft-cap inside the head; and autograd keeps no logits."""
    monkeypatch.setattr(core, "_rows_per_chunk", lambda vocab: 2)  # 6 rows -> 3 chunks
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 3), generator=g)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def head(h):
        return torch.tanh(h @ weight.T / 5.0) * 5.0

    expected = torch.log_softmax(head(hidden) / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    want = torch.autograd.grad((expected * w).sum(), (hidden, weight))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        got = core.head_logprobs(head, hidden, labels, vocab=40, temperature=0.7)
    grads = torch.autograd.grad((got * w).sum(), (hidden, weight))
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)
    assert sum(saved) < 2 * 40  # the chunks' inputs at most, never a chunk's logits (2 x 40)
    with torch.no_grad():  # scoring passes: no recomputation, same numbers
        torch.testing.assert_close(core.head_logprobs(head, hidden, labels, 40, 0.7), expected)
