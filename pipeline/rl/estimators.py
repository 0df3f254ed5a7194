"""Advantage estimators: GAE with a critic, and the critic-free RLOO, GRPO and REINFORCE++.

Shapes: ``B`` the batch (``B = n * k`` for ``n`` prompts of ``k`` samples each, grouped
contiguously), ``T`` the response length; ``mask`` is 1 on the valid response tokens.

References:
    - Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE".
    - Ziegler et al. 2019 (per-token KL penalty in the reward).
    - Huang et al. 2024, arXiv 2403.17031 (reward placement, whitening).
    - Ahmadian et al. 2024 (RLOO); Shao et al. 2024 (GRPO); Hu 2025 (REINFORCE++).
    - Liu et al. 2025, arXiv 2503.20783 (Dr.GRPO); Liu et al. 2025, arXiv 2508.08221 (Lite PPO: the
      group mean with the batch's std).
"""

from __future__ import annotations

import torch

from pipeline.generation.stops import last_token_index
from pipeline.rl.kl import kl_per_token
from pipeline.rl.masked import AllReduce, masked_var


@torch.no_grad()
def shape_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty on every token plus the score on the last one.

    ``r_t = -kl_coef * kl_t + [t == last valid token] * score`` (Ziegler et al. 2019,
    eq. 2; the score lands on the last real token, Huang et al. 2024). Rewards are
    targets, so no gradient flows through them.

    Args:
        scores: ``[B]`` sequence-level scores (RM output, reward functions, penalties).
        logp: ``[B, T]`` rollout log-probs of the policy.
        ref_logp: ``[B, T]`` log-probs of the reference model.
        mask: ``[B, T]`` response mask.
        kl_coef: the KL penalty coefficient (``beta``).
        estimator: ``"k1"`` or ``"k3"``, see :func:`kl_per_token`.

    Returns:
        ``(rewards, kl, non_score)``, each ``[B, T]`` and 0 on masked positions;
        ``kl.sum(-1)`` is the sequence-level KL to log, ``non_score = -kl_coef * kl``.
    """
    valid = mask.bool()
    kl = kl_per_token(logp, ref_logp, estimator)
    kl = torch.where(valid, kl, torch.zeros_like(kl))
    non_score = -kl_coef * kl
    # A row with no valid token gets no score rather than a score at index 0.
    scores = scores.to(device=kl.device, dtype=kl.dtype)
    row_scores = torch.where(valid.any(dim=-1), scores, torch.zeros_like(scores))
    last = last_token_index(mask).unsqueeze(-1)
    rewards = non_score.scatter_add(-1, last, row_scores.unsqueeze(-1))
    return rewards, kl, non_score


# --------------------------------------------------------------------------- advantages


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    ``values[:, t]`` is ``V(s_t)``, the value of the prefix before response token ``t``.
    The episode ends after the last valid token, so the bootstrap value there is 0::

        delta_t = r_t + gamma * V_{t+1} * mask_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    Args:
        rewards: ``[B, T]`` per-token rewards (see :func:`shape_rewards`).
        values: ``[B, T]`` rollout values.
        mask: ``[B, T]`` response mask.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each ``[B, T]`` and 0 on masked positions. Advantages
        are not whitened here; use :func:`masked_whiten`.
    """
    valid = mask.bool()
    m = valid.to(values.dtype)
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards)).to(values.dtype)
    values = torch.where(valid, values, torch.zeros_like(values))
    T = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Multiplying by mask_t zeroes padding, so the token before it sees A_{t+1} = 0.
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]  # already 0 where mask is 0: V_{t+1} * mask_{t+1}
    returns = (advantages + values) * m
    return advantages, returns


# --------------------------------------------------------------------------- critic-free estimators
#
# Each turns sequence rewards into advantages without a value model; the advantage of a
# sequence is broadcast to all its tokens. Rows come in groups of k consecutive samples of the
# same prompt: ``rewards.view(-1, k)`` is one group per row. (shared/notes/rl-algorithms.md)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024; Kool et al. 2019).

    ``A_i = R_i - 1/(k-1) * sum_{j != i} R_j`` within each group of k samples of one prompt.

    Args:
        rewards: ``[B]`` sequence rewards, ``B = n_prompts * k``, a prompt's samples adjacent.
        k: samples per prompt, ``>= 2``.

    Returns:
        ``[B]`` advantages; each group sums to 0.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    g = rewards.view(-1, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


STD_SCALINGS = ("group", "batch", "none")


def std_scaling(value) -> str:
    """``algorithm.scale_by_std`` as one of :data:`STD_SCALINGS`; the booleans of earlier configs
    read as ``true`` -> group, ``false`` -> none. ValueError for anything else."""
    legacy = {"true": "group", "false": "none"}
    name = str(value).lower()
    name = legacy.get(name, name)
    if name not in STD_SCALINGS:
        raise ValueError(f"algorithm.scale_by_std must be one of {list(STD_SCALINGS)}, got {value!r}")
    return name


def grpo_advantages(rewards: torch.Tensor, k: int, scale_by_std: str, eps: float = 1e-4,
                    all_reduce: AllReduce = None) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath): ``A_i = (R_i - mean_g R) / sigma``.

    ``scale_by_std`` picks ``sigma``:

    - ``group``: ``std_g R + eps``, the unbiased std of the prompt's k rewards (the paper's form).
      A group whose rewards barely differ gets unit-size advantages all the same: noise in a
      reward that can hardly tell its answers apart weighs as much as a clear preference.
    - ``batch``: ``std_B R + eps``, the unbiased std of every reward of the update, over all
      processes (Liu et al. 2025's Lite PPO; TRL's ``scale_rewards="batch"``). Near-ties keep their
      small advantages; every group is on one scale.
    - ``none``: 1, only the group mean removed (Dr.GRPO, Liu et al. 2025).

    Args:
        rewards: ``[B]``, groups of k adjacent samples.
        k: samples per prompt, ``>= 2``.
        all_reduce: sums over processes, for ``batch`` (data parallel); None with one process.

    Returns:
        ``[B]``. A group whose k rewards are equal gets all-zero advantages (no signal).
    """
    if k < 2:
        raise ValueError(f"GRPO needs k >= 2 samples per prompt, got {k}")
    mode = std_scaling(scale_by_std)
    g = rewards.view(-1, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if mode == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif mode == "batch":
        ones = torch.ones_like(rewards)
        centred = centred / (masked_var(rewards, ones, unbiased=True, all_reduce=all_reduce).sqrt() + eps)
    return centred.reshape(-1)


def group_centred(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """``R_i - mean_g R``: REINFORCE++-baseline's first step. ``[B] -> [B]``."""
    g = rewards.view(-1, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def sequence_advantages(estimator: str, scores: torch.Tensor, seq_kl: torch.Tensor, beta: float, k: int,
                        scale_by_std: str, all_reduce: AllReduce = None) -> torch.Tensor:
    """One advantage per sequence for RLOO or GRPO, with the KL penalty ``beta * KL_i`` in the reward::

        RLOO:  A_i = R_i - mean_{j != i} R_j,                 R_i = s_i - beta KL_i
        GRPO:  A_i = (s_i - mean_g s) / sigma - beta (KL_i - mean_g KL)     (sigma: grpo_advantages)

    GRPO scales the task scores alone: z-scoring ``s - beta KL`` would turn the KL's noise into
    unit-size advantages in a group whose k task rewards are equal (a rule-based or gold reward,
    the missing-EOS penalty), and beta would no longer set the pull's strength. Without std
    scaling (Dr.GRPO) both forms are equal, since the baseline is linear in the reward.

    Args:
        estimator: ``rloo`` or ``grpo``.
        scores: ``[B]`` task rewards, groups of k adjacent samples.
        seq_kl: ``[B]`` sequence KL to the reference (zeros when the KL sits in the loss).
        scale_by_std, all_reduce: GRPO's ``sigma`` (:func:`grpo_advantages`).

    Returns:
        ``[B]``.
    """
    if estimator == "rloo":
        return rloo_advantages(scores - beta * seq_kl, k)
    return grpo_advantages(scores, k, scale_by_std, all_reduce=all_reduce) - beta * group_centred(seq_kl, k)


def online_dpo_advantages(scores: torch.Tensor, seq_logratio: torch.Tensor, beta: float, k: int,
                          tol: float = 1e-6) -> torch.Tensor:
    """Online DPO over every pair of a group's samples, as sequence advantages.

    Each pair ``(i, j)`` of a prompt's k samples with ``s_i > s_j`` adds DPO's loss
    (Rafailov et al. 2023) ``-log sigmoid(h_ij)``, ``h_ij = beta (rho_i - rho_j)``, where
    ``rho = sum_t (log pi - log pi_ref)`` is a response's log-ratio to the reference; all pairs
    together are RankNet's pairwise loss (Burges et al. 2005), and k = 2 is one pair, the online
    AI feedback form (Guo et al. 2024). The gradient is ``-beta sigmoid(-h_ij) (grad rho_i - grad rho_j)``,
    so the advantages

        ``A_i = sum_{j: s_j < s_i} beta sigmoid(-h_ij) - sum_{j: s_j > s_i} beta sigmoid(-h_ji)``

    fed to the surrogate with token losses summed per sequence (``loss_agg=constant``) give the
    summed loss's gradient at the rollout policy. The reference enters through ``h``; no KL goes
    into the scores.

    Args:
        scores: ``[B]`` task rewards, groups of k adjacent samples.
        seq_logratio: ``[B]`` ``rho`` of each response under the rollout policy.
        beta: DPO's beta.
        k: samples per prompt, ``>= 2``.

    Returns:
        ``[B]``; each group sums to 0. Samples with equal scores form no pair.
    """
    if k < 2:
        raise ValueError(f"online DPO needs k >= 2 samples per prompt, got {k}")
    g, rho = scores.view(-1, k), seq_logratio.view(-1, k)
    wins = (g[:, :, None] - g[:, None, :]) > tol  # [G, k, k]: sample i scored above sample j
    w = beta * torch.sigmoid(-beta * (rho[:, :, None] - rho[:, None, :])) * wins
    return (w.sum(2) - w.sum(1)).reshape(-1)


def equal_reward_groups(rewards: torch.Tensor, k: int, tol: float = 1e-6) -> torch.Tensor:
    """Share of groups whose k rewards are all equal (their group advantages carry no signal)."""
    g = rewards.view(-1, k)
    return ((g.max(dim=1).values - g.min(dim=1).values) <= tol).float().mean()


@torch.no_grad()
def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++'s per-token return with gamma = 1 (Hu 2025): ``G_t = sum_{s >= t} r_s``.

    Args:
        rewards: ``[B, T]`` per-token rewards (:func:`shape_rewards`: the score on the last
            token, and the per-token KL penalty when the KL is in the reward).
        mask: ``[B, T]``.

    Returns:
        ``[B, T]``, 0 on masked positions. Normalise over the batch with :func:`masked_whiten`.
    """
    r = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    return torch.where(mask.bool(), r.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(r))
