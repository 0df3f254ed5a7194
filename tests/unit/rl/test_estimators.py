"""pipeline.rl.estimators: reward shaping, GAE and the critic-free estimators, on worked values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.generation.stops import stop_mask
from pipeline.rl.estimators import (
    equal_reward_groups,
    gae,
    group_centred,
    grpo_advantages,
    online_dpo_advantages,
    returns_to_go,
    rloo_advantages,
    sequence_advantages,
    shape_rewards,
    std_scaling,
)
from pipeline.rl.masked import masked_mean, masked_var, masked_whiten
from tests.unit.worked import EOT, LN2, PAD, STOPS, t64

pytestmark = pytest.mark.unit


def test_terminal_reward_lands_on_last_real_token():
    ids = torch.tensor([[5, 6, EOT, PAD, PAD]])
    mask = stop_mask(ids, STOPS)  # [1, 1, 1, 0, 0]
    logp = torch.zeros(1, 5)
    rewards, kl, non_score = shape_rewards(
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
    rewards, kl, non_score = shape_rewards(scores, logp, ref, mask, 0.1, "k1")
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
    rewards, _, _ = shape_rewards(
        torch.tensor([5.0]), torch.zeros(1, 3), torch.zeros(1, 3), mask, 0.1, "k3"
    )
    assert (rewards == 0).all()


# --------------------------------------------------------------------------- GAE


def test_gae_gamma1_lam1_worked():
    rewards = t64(0.0, 0.0, 1.0)
    values = t64(0.5, 0.6, 0.7)
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
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
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
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
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    adv3, ret3 = gae(rewards[:, :3], values[:, :3], torch.ones(1, 3), 0.9, 0.95)
    torch.testing.assert_close(adv[:, :3], adv3)
    torch.testing.assert_close(ret[:, :3], ret3)
    assert (adv[:, 3:] == 0).all() and (ret[:, 3:] == 0).all()


def test_gae_batch_rows_are_independent_and_detached():
    values = t64([0.5, 1.0, 1.5], [2.0, 2.0, 2.0]).requires_grad_()
    rewards = t64([1.0, 0.0, 2.0], [0.0, 1.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.95)
    torch.testing.assert_close(adv[0], t64(2.0647625, 0.7775, 0.5)[0])
    # row 1, T=2: delta1 = 1 - 2 = -1; delta0 = 0 + 0.9 * 2 - 2 = -0.2; A0 = -0.2 - 0.855
    torch.testing.assert_close(adv[1], t64(-0.2 - 0.855, -1.0, 0.0)[0])
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- critic-free estimators


def test_rloo_leave_one_out_worked():
    # one prompt, k = 4, rewards [1, 2, 3, 6]: baseline_i = (12 - R_i) / 3 = [11/3, 10/3, 3, 2]
    # A = [1 - 11/3, 2 - 10/3, 0, 4] = [-8/3, -4/3, 0, 4]; a second prompt [5, 5] -> [0, 0]
    adv = rloo_advantages(t64(1.0, 2.0, 3.0, 6.0)[0], 4)
    torch.testing.assert_close(adv, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0], dtype=torch.float64))
    assert rloo_advantages(torch.tensor([5.0, 5.0, 1.0, 3.0]), 2).tolist() == [0.0, 0.0, -2.0, 2.0]
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.tensor([1.0]), 1)


def test_grpo_group_z_scores_and_dr_grpo_worked():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    # group 1: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3) = 2.1602
    # z = [-2, -1, 0, 3] / (2.1602 + 1e-4); group 2 is constant: all zeros
    std = math.sqrt(14 / 3) + 1e-4
    expected = torch.tensor([-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(grpo_advantages(r, 4, scale_by_std="group"), expected)
    # Dr.GRPO: the group mean removed, no division
    torch.testing.assert_close(grpo_advantages(r, 4, scale_by_std="none"),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0], dtype=torch.float64))
    assert equal_reward_groups(r, 4).item() == 0.5  # the second group carries no signal


def test_grpo_two_samples_a_prompt_is_the_smallest_group():
    # k = 2, rewards [1, 0]: centred [0.5, -0.5], unbiased std sqrt(0.5) = 0.7071 -> [0.7071, -0.7071]
    z = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(grpo_advantages(t64(1.0, 0.0)[0], 2, "group"), t64(z, -z)[0])
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(torch.tensor([1.0, 0.0]), 1, "group")


def test_grpo_batch_std_worked():
    """Lite PPO: the group mean removed, then divided by the std of every reward of the batch.
    r = [1, 2, 3, 6, 4, 4, 4, 4]: mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 6.25 + 4 x 0.25
    = 16, unbiased std sqrt(16 / 7) = 1.5119. Group 1 centred [-2, -1, 0, 3] / 1.5119 (not the
    group std 2.1602); the equal group stays zero."""
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    std = math.sqrt(16 / 7) + 1e-4
    expected = torch.tensor([-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(grpo_advantages(r, 4, scale_by_std="batch"), expected)
    # A near-tie keeps its small size: the group std would make it unit-size.
    near = torch.tensor([0.0, 0.01, 0.0, 0.01, -2.0, 2.0, -2.0, 2.0], dtype=torch.float64)
    assert grpo_advantages(near, 4, "batch")[:4].abs().max() < 0.01
    assert grpo_advantages(near, 4, "group")[:4].abs().min() > 0.8


def test_grpo_batch_std_across_processes_equals_the_whole_batch():
    """Data parallel: each process holds whole groups; the std is over every process's rewards."""
    import threading

    from tests.unit.rl.test_masked import thread_all_reduce
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0, -1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    reduces, out = thread_all_reduce(2), {}

    def shard(rank):  # 2 groups on process 0, 1 on process 1
        rows = slice(0, 8) if rank == 0 else slice(8, 12)
        out[rank] = grpo_advantages(r[rows], 4, "batch", all_reduce=reduces[rank])
    threads = [threading.Thread(target=shard, args=(rank,)) for rank in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat([out[0], out[1]]), grpo_advantages(r, 4, "batch"))


def test_scale_by_std_names_and_the_booleans_of_earlier_configs():
    assert [std_scaling(v) for v in ("group", "batch", "none", True, False, "True", "false")] == \
        ["group", "batch", "none", "group", "none", "group", "none"]
    with pytest.raises(ValueError, match="algorithm.scale_by_std must be one of"):
        std_scaling("global")


def test_reinforce_pp_returns_to_go_and_batch_normalisation():
    # rewards with the score on the last valid token and a KL penalty of -0.1 per token
    rewards = t64([-0.1, -0.1, 0.9, 7.0], [-0.1, 1.9, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g = returns_to_go(rewards, mask)
    # row 0: [0.7, 0.8, 0.9, 0] (sum to the end, gamma = 1); row 1: [1.8, 1.9, 0, 0]
    torch.testing.assert_close(g, t64([0.7, 0.8, 0.9, 0.0], [1.8, 1.9, 0.0, 0.0]))
    a = masked_whiten(g, mask)  # REINFORCE++: normalised over the whole batch's tokens
    assert masked_mean(a, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(a, mask).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(group_centred(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_equal_task_rewards_give_no_task_driven_grpo_advantage(scale):
    """GRPO's std scales the task rewards alone; the KL penalty stays at beta's scale. Scores
    [1, 1, 1, 1] with sequence KL 0.30-0.35 and beta 0.05: the task part is 0 and the KL part is
    -beta * (KL_i - mean KL), mean 0.315 -> [0.00075, -0.00025, 0.00125, -0.00175]. Z-scoring
    scores - beta * KL instead gives unit-size advantages from the KL's noise."""
    scores, kl = t64(1.0, 1.0, 1.0, 1.0)[0], t64(0.30, 0.32, 0.29, 0.35)[0]
    adv = sequence_advantages("grpo", scores, kl, beta=0.05, k=4, scale_by_std=scale)
    torch.testing.assert_close(adv, t64(0.00075, -0.00025, 0.00125, -0.00175)[0])
    # Unequal task rewards: the z-scored task part plus the same KL part.
    scores = t64(0.0, 1.0, 0.0, 1.0)[0]  # mean 0.5, unbiased std 1/sqrt(3)
    z = (scores - 0.5) / (3 ** -0.5 + 1e-4)
    adv = sequence_advantages("grpo", scores, kl, beta=0.05, k=4, scale_by_std="group")
    torch.testing.assert_close(adv, z - 0.05 * (kl - 0.315))


def test_sequence_advantages_without_std_scaling_equal_centring_the_penalised_reward():
    """Dr.GRPO and RLOO are linear in the reward: the KL may enter before or after the baseline."""
    g = torch.Generator().manual_seed(0)
    scores, kl = torch.randn(8, generator=g, dtype=torch.float64), torch.rand(8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sequence_advantages("grpo", scores, kl, 0.1, 4, scale_by_std="none"),
                               grpo_advantages(scores - 0.1 * kl, 4, scale_by_std="none"))
    torch.testing.assert_close(sequence_advantages("rloo", scores, kl, 0.1, 4, scale_by_std="none"),
                               rloo_advantages(scores - 0.1 * kl, 4))


def test_online_dpo_pairs_every_sample_with_those_it_beat_worked():
    """Group 1: scores [0.2, 0.9, -0.5, 0.2], log-ratios rho [1.0, 0.4, -0.2, 1.0], beta 0.5.
    Pairs (winner, loser): (1, 0), (1, 2), (1, 3), (0, 2), (3, 2); samples 0 and 3 tie, no pair.
    w(i, j) = 0.5 sigmoid(-0.5 (rho_i - rho_j)): w(1, 0) = w(1, 3) = 0.5 sigmoid(0.3) = 0.287221,
    w(1, 2) = 0.5 sigmoid(-0.3) = 0.212779, w(0, 2) = w(3, 2) = 0.5 sigmoid(-0.6) = 0.177440.
    A_0 = w(0, 2) - w(1, 0) = -0.109781 = A_3; A_1 = 2 w(1, 0) + w(1, 2) = 0.787221;
    A_2 = -w(1, 2) - 2 w(0, 2) = -0.567659. Group 2's scores are equal: zeros."""
    scores = t64(0.2, 0.9, -0.5, 0.2, 1.0, 1.0, 1.0, 1.0)[0]
    rho = t64(1.0, 0.4, -0.2, 1.0, 0.1, 0.2, 0.3, 0.4)[0]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    w10, w12, w02 = 0.5 * sig(0.3), 0.5 * sig(-0.3), 0.5 * sig(-0.6)
    expected = t64(w02 - w10, 2 * w10 + w12, -w12 - 2 * w02, w02 - w10, 0.0, 0.0, 0.0, 0.0)[0]
    torch.testing.assert_close(online_dpo_advantages(scores, rho, beta=0.5, k=4), expected)
    # k = 2 is one pair a prompt (Guo et al. 2024): +w for the better sample, -w for the worse
    w = 0.5 * sig(-0.5 * (0.4 - 1.0))
    torch.testing.assert_close(online_dpo_advantages(t64(0.2, 0.9)[0], t64(1.0, 0.4)[0], 0.5, 2), t64(-w, w)[0])
    with pytest.raises(ValueError, match="k >= 2"):
        online_dpo_advantages(scores, rho, 0.5, 1)


def test_online_dpo_advantages_give_the_dpo_gradient_through_the_surrogate():
    """At the rollout policy (ratio 1) the clipped surrogate with these advantages, token losses
    summed per sequence, has the gradient of DPO's loss summed over every pair with unequal scores:
    sum -log sigmoid(beta (rho_i - rho_j)), rho = sum_t (log pi - log ref)."""
    from pipeline.rl.losses import policy_loss
    g = torch.Generator().manual_seed(0)
    k, n, t, beta = 4, 3, 5, 0.7
    theta = torch.randn(n * k, t, dtype=torch.float64, generator=g, requires_grad=True)
    logp = torch.nn.functional.logsigmoid(theta)  # [B, T] token log-probs of some policy
    ref = torch.nn.functional.logsigmoid(torch.randn(n * k, t, dtype=torch.float64, generator=g))
    mask = (torch.rand(n * k, t, generator=g) > 0.2).double()
    scores = torch.randn(n * k, dtype=torch.float64, generator=g)
    scores[1] = scores[0]  # a tie: no pair
    rho = ((logp - ref) * mask).sum(1)
    dpo = sum(-torch.nn.functional.logsigmoid(beta * (rho[i] - rho[j]))
              for q in range(n) for i in range(q * k, q * k + k) for j in range(q * k, q * k + k)
              if scores[i] > scores[j])
    want, = torch.autograd.grad(dpo, theta, retain_graph=True)
    adv = online_dpo_advantages(scores, rho.detach(), beta, k)[:, None] * mask
    pg, _ = policy_loss(logp, logp.detach(), adv, mask, clip_range=0.2)
    got, = torch.autograd.grad(pg.sum(), theta)
    torch.testing.assert_close(got, want)
