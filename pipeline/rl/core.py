"""The pure-math core of PPO for language models: no model, no tokenizer, only tensors.

Shapes: ``B`` is the batch, ``T`` the response length, ``V`` the vocabulary. A ``mask`` is a
0/1 tensor (float or bool) of shape ``[B, T]`` that is 1 on the valid response tokens, i.e.
up to and including the first EOS. Masks are always carried explicitly and never rebuilt
from token ids, because with ``pad == eos`` the real EOS becomes indistinguishable from
padding (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").

References:
    - Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate).
    - Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE".
    - Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
      (per-token KL penalty, adaptive KL controller).
    - Huang et al. 2024, arXiv 2403.17031 (masking, reward placement, whitening).
    - Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "response_mask_until_eos",
    "has_eos",
    "last_token_index",
    "kl_per_token",
    "shape_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
    "minibatch_indices",
    "count_optimizer_steps",
]

KL_ESTIMATORS = ("k1", "k3")

Dim = Optional[Union[int, tuple[int, ...]]]
# Sums a tensor across data-parallel processes (``accelerator.reduce(x, "sum")``); None = one process.
AllReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


# --------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label: ``log_softmax(logits)[b, t, labels[b, t]]``.

    Args:
        logits: ``[B, T, V]``, already divided by the sampling temperature.
        labels: ``[B, T]`` token ids.

    Returns:
        ``[B, T]`` float32 log-probs.
    """
    # float32 because bf16 log-probs are too coarse for a ratio that must be 1 at the start.
    logits = logits.float()
    # gather - logsumexp equals gathering log_softmax without materialising a [B, T, V] copy.
    picked = torch.gather(logits, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution ``H = -sum_v p_v log p_v``.

    Args:
        logits: ``[B, T, V]``.

    Returns:
        ``[B, T]`` float32 entropies (not masked).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    # A -inf logit (masked vocabulary) has p = 0 and must contribute 0, not 0 * -inf = nan,
    # in the forward and in the backward pass.
    logp_finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * logp_finite).sum(dim=-1)


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None,
                all_reduce: AllReduce = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: any shape.
        mask: 0/1, same shape as ``x``.
        dim: reduce over these dims; ``None`` reduces over all.
        all_reduce: with ``dim=None``, sums numerator and count across processes, so the
            mean is over every process's valid positions (not a mean of per-process means).

    Returns:
        The masked mean (a scalar when ``dim is None``). An all-zero mask gives 0.
    """
    keep = mask.bool()
    # where, not x * mask: masked positions may hold inf/nan (e.g. log-probs of padding).
    total = torch.where(keep, x, torch.zeros_like(x))
    count = keep.to(x.dtype)
    if dim is None:
        num_den = torch.stack([total.sum(), count.sum()])
        if all_reduce is not None:
            num_den = all_reduce(num_den)
        return num_den[0] / num_den[1].clamp_min(1.0)
    return total.sum(dim) / count.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               all_reduce: AllReduce = None) -> torch.Tensor:
    """Variance of ``x`` over the valid positions (a scalar), across processes with ``all_reduce``.

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)``; with fewer than two
    valid positions the (zero) biased variance is returned instead of dividing by zero.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = masked_mean((x - mean) ** 2, mask, all_reduce=all_reduce)
    if unbiased:
        n = mask.bool().sum().to(x.dtype)
        if all_reduce is not None:
            n = all_reduce(n.clone())
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    all_reduce: AllReduce = None,
) -> torch.Tensor:
    """Normalise ``x`` to unit variance using statistics of the valid positions only.

    ``(x - mean) / sqrt(var + eps)``, with ``mean`` and (unbiased) ``var`` taken over
    ``mask``. With ``shift_mean=False`` the mean is added back: reward whitening must not
    shift the mean (Huang et al. 2024). Masked positions are returned as 0.

    Args:
        x: ``[B, T]`` (any shape matching ``mask``).
        mask: 0/1, same shape.
        all_reduce: statistics over every process's valid positions (data parallel).

    Returns:
        Same shape as ``x``.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = masked_var(x, mask, unbiased=True, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- masks and EOS


def response_mask_until_eos(
    response_ids: torch.Tensor, eos_id: int, pad_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mask of the response up to and including its first EOS.

    Pad ids are never looked at: validity beyond EOS comes only from ``pad_mask``, so a
    tokenizer with ``pad == eos`` cannot hide the real stop token.

    Args:
        response_ids: ``[B, T]`` generated token ids.
        eos_id: the stop token id.
        pad_mask: optional ``[B, T]`` 0/1 mask of positions that were actually generated;
            an EOS outside it does not count.

    Returns:
        ``[B, T]`` bool mask: 1 up to and including the first EOS, 0 after. A row with no
        EOS (truncated at max length) stays 1 wherever ``pad_mask`` is 1.
    """
    is_eos = response_ids == eos_id
    if pad_mask is not None:
        is_eos = is_eos & pad_mask.bool()
    # Exclusive cumsum: EOS tokens strictly before t. The first EOS itself stays valid.
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    mask = eos_before == 0
    if pad_mask is not None:
        mask = mask & pad_mask.bool()
    return mask


def has_eos(response_ids: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Whether each response contains the real stop token within its valid part.

    Args:
        response_ids: ``[B, T]``.
        mask: ``[B, T]`` response mask.
        eos_id: the stop token id.

    Returns:
        ``[B]`` bool; the missing-EOS penalty keys on ``~has_eos``.
    """
    return ((response_ids == eos_id) & mask.bool()).any(dim=-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row.

    Args:
        mask: ``[B, T]`` 0/1.

    Returns:
        ``[B]`` LongTensor; a row with an empty mask gives 0.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    # max over valid positions, not sum(mask) - 1, so it stays right for any mask layout.
    return (positions * mask.bool().long()).amax(dim=-1)


# --------------------------------------------------------------------------- KL and rewards


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi``.

    Estimators from Schulman, "Approximating KL Divergence" (2020),
    http://joschu.net/blog/kl-approx.html, with ``r = pi_ref(x) / pi(x)``:

    - ``"k1"``: ``-log r = logp - ref_logp``. Unbiased, high variance, can be negative.
    - ``"k3"``: ``(r - 1) - log r``. Unbiased, lower variance, always ``>= 0``.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the policy.
        ref_logp: ``[B, T]`` log-probs of the same tokens under the reference.
        estimator: ``"k1"`` or ``"k3"``.

    Returns:
        ``[B, T]`` (not masked).

    Raises:
        ValueError: on an unknown estimator.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        # expm1 keeps (r - 1) accurate when r is close to 1, i.e. early in training.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


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


# --------------------------------------------------------------------------- losses


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``L = masked_mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)))`` with
    ``rho = exp(logp - old_logp)``.

    Args:
        logp: ``[B, T]`` log-probs under the current policy (carries gradient).
        old_logp: ``[B, T]`` rollout log-probs.
        advantages: ``[B, T]`` (usually whitened).
        mask: ``[B, T]`` response mask.
        clip_range: ``eps``.

    Returns:
        ``(loss, stats)``; stats are detached scalars: ``approxkl``
        (``0.5 * masked_mean((logp - old_logp)^2)``), ``clipfrac`` (fraction of tokens
        where the clipped term is active) and ``ratio`` (masked mean of ``rho``).
    """
    valid = mask.bool()
    # Mask the log-ratio before exp: padding may hold -inf log-probs, whose exp would
    # poison the backward pass even behind a later where().
    log_ratio = torch.where(valid, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * masked_mean(max((v - R)^2, (clip(v, v_old +- c) - R)^2))``.

    Args:
        values: ``[B, T]`` current value predictions (carry gradient).
        old_values: ``[B, T]`` rollout values.
        returns: ``[B, T]`` targets from :func:`gae`.
        mask: ``[B, T]`` response mask.
        clip_range_value: ``c``.

    Returns:
        ``(loss, stats)``; ``stats["clipfrac"]`` is the detached fraction of tokens where
        the clipped term is the larger one.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    c = clip_range_value
    clipped_values = old_values + torch.clamp(values - old_values, -c, c)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, {"clipfrac": clipfrac.detach()}


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_kind(d, self.kind)
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    A proportional controller steering the observed KL towards ``target``::

        e = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + e * n_steps / horizon

    where ``n_steps`` is the number of episodes (samples) since the last update.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_kind(d, self.kind)
        self.value = float(d["value"])
        self.target = float(d["target"])
        self.horizon = float(d["horizon"])


KLController = Union[FixedKLController, AdaptiveKLController]


def _check_kind(d: dict[str, Any], kind: str) -> None:
    # Resuming an adaptive run into a fixed controller (or back) would silently change the run.
    if d.get("kind", kind) != kind:
        raise ValueError(f"state is for a {d['kind']!r} KL controller, not {kind!r}")


def make_kl_controller(
    kind: str,
    init_kl_coef: float,
    target: Optional[float] = None,
    horizon: Optional[float] = None,
) -> KLController:
    """Build a KL controller; ``kind`` is ``"fixed"`` or ``"adaptive"``.

    ``target`` and ``horizon`` are required for ``"adaptive"`` and ignored for ``"fixed"``.
    """
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs target and horizon")
        return AdaptiveKLController(init_kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'fixed' or 'adaptive'")


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
