"""The pure-math core of PPO for language models: no model, no tokenizer, only tensors.

Shapes: ``B`` is the batch, ``T`` the response length, ``V`` the vocabulary. A ``mask`` is a
0/1 tensor (float or bool) of shape ``[B, T]`` that is 1 on the valid response tokens, i.e.
up to and including the first stop token (end-of-turn or eos). Masks are always carried explicitly and never rebuilt
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
from torch.utils.checkpoint import checkpoint

__all__ = [
    "logprobs_from_logits",
    "head_logprobs",
    "entropy_from_logits",
    "rloo_advantages",
    "grpo_advantages",
    "returns_to_go",
    "loss_weights",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "stop_mask",
    "ends_with_stop",
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


LOGPROB_CHUNK = 1 << 23  # logits per chunk (32 MB in fp32): the working copies never grow with B * T


def _rows_per_chunk(vocab: int) -> int:
    return max(1, LOGPROB_CHUNK // max(1, vocab))


class _TokenLogprob(torch.autograd.Function):
    """``log softmax(logits / T)[label]`` in row chunks, with an exact hand-written backward.

    Autograd through ``log_softmax`` would keep a full fp32 ``[N, V]`` copy (and with bf16
    logits an upcast copy too). Here only the logits the caller already holds and one
    log-sum-exp per row are saved; the backward recomputes the softmax chunk by chunk::

        d logp / d logits_v = ([v == label] - softmax(logits / T)_v) / T
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature):  # logits [N, V], labels [N] -> [N] fp32 (or fp64)
        chunk, dtype = _rows_per_chunk(logits.shape[-1]), torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], chunk):
            x = logits[s:s + chunk].to(dtype) / temperature
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            out[s:s + chunk] = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, _rows_per_chunk(logits.shape[-1])
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_out[s:s + chunk, None].to(lse.dtype)
            p = torch.exp(logits[s:s + chunk].to(lse.dtype) / T - lse[s:s + chunk, None])
            d = (-p * g).scatter_add_(-1, labels[s:s + chunk, None], g)
            grad[s:s + chunk] = (d / T).to(grad.dtype)
        return grad, None, None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Memory-light in both directions (see ``_TokenLogprob``): no fp32 ``[B, T, V]`` copy is
    made or kept, whatever the logits' dtype, and the gradient is exact.

    Args:
        logits: ``[B, T, V]`` raw logits (any float dtype).
        labels: ``[B, T]`` token ids.
        temperature: the sampling temperature the labels were drawn at.

    Returns:
        ``[B, T]`` float32 log-probs (float64 for float64 logits). At least fp32 because bf16
        log-probs are too coarse for a ratio that must be 1 at the start.
    """
    B, T, V = logits.shape
    flat = _TokenLogprob.apply(logits.reshape(B * T, V), labels.reshape(-1).long(), float(temperature))
    return flat.view(B, T)


def head_logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                  vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """``logprobs_from_logits(head(hidden), labels, temperature)`` without ever holding the whole
    ``[B, T, V]`` logits, nor their gradient: the LM ``head`` runs over chunks of rows, and with
    autograd on each chunk is recomputed in the backward pass (activation checkpointing of the
    head and the log-softmax), so a pass holds one chunk's logits (~32 MB in fp32) whatever
    ``B * T`` and the vocabulary. The price is one more head product per training pass.

    Args:
        head: final hidden states ``[N, H]`` -> logits ``[N, V]`` (output scalings included).
        hidden: ``[B, T, H]``; labels: ``[B, T]`` token ids; vocab: ``V``, to size the chunks.

    Returns:
        ``[B, T]`` float32 log-probs, equal to the unchunked computation within float rounding.
    """
    B, T, H = hidden.shape
    flat, y = hidden.reshape(B * T, H), labels.reshape(B * T).long()

    def chunk_logprobs(h: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        return logprobs_from_logits(head(h)[None], lab[None], temperature)[0]

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    step, out = _rows_per_chunk(vocab), []
    for s in range(0, B * T, step):
        h, lab = flat[s:s + step], y[s:s + step]
        out.append(checkpoint(chunk_logprobs, h, lab, use_reentrant=False, preserve_rng_state=False)
                   if recompute else chunk_logprobs(h, lab))
    return torch.cat(out).view(B, T) if out else flat.new_zeros(B, T, dtype=torch.float32)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)``, ``H = -sum_v p_v log p_v``, in row chunks.

    Args:
        logits: ``[B, T, V]``.

    Returns:
        ``[B, T]`` float32 entropies (not masked).
    """
    B, T, V = logits.shape
    flat, chunk, out = logits.reshape(B * T, V), _rows_per_chunk(V), []
    for s in range(0, B * T, chunk):
        logp = F.log_softmax(flat[s:s + chunk].float() / temperature, dim=-1)
        # A -inf logit (masked vocabulary) has p = 0 and must contribute 0, not 0 * -inf = nan,
        # in the forward and in the backward pass.
        logp_finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
        out.append(-(logp.exp() * logp_finite).sum(dim=-1))
    return torch.cat(out).view(B, T) if out else flat.new_zeros(B, T, dtype=torch.float32)


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


def stop_mask(response_ids: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Mask of each response up to and including its first stop token.

    Pad ids are never looked at, so a tokenizer whose pad id equals a stop id cannot hide the
    real stop, and a model that emits the pad token cannot end a response early.

    Args:
        response_ids: ``[B, T]`` generated token ids.
        stop_ids: ``[S]`` the stop set (end-of-turn token, eos, generation-config eos ids).

    Returns:
        ``[B, T]`` bool: 1 up to and including the first stop token, 0 after. A row with no
        stop token (truncated at max length) is all 1.

    Example: stop set {2, 9}, ids ``[5, 9, 7, 2]`` -> ``[1, 1, 0, 0]``.
    """
    is_stop = torch.isin(response_ids, stop_ids).long()
    # Exclusive cumsum: stop tokens strictly before t. The first stop itself stays valid.
    return (torch.cumsum(is_stop, dim=-1) - is_stop) == 0


def ends_with_stop(response_ids: torch.Tensor, mask: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Whether each response's last valid token is a stop token (it finished, not truncated).

    Args:
        response_ids: ``[B, T]``.
        mask: ``[B, T]`` response mask (e.g. from :func:`stop_mask`).
        stop_ids: ``[S]`` the stop set.

    Returns:
        ``[B]`` bool; the missing-EOS penalty keys on ``~ends_with_stop``.
    """
    last = response_ids.gather(-1, last_token_index(mask).unsqueeze(-1)).squeeze(-1)
    return torch.isin(last, stop_ids) & mask.bool().any(dim=-1)


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


def grpo_advantages(rewards: torch.Tensor, k: int, scale_by_std: bool, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath).

    ``A_i = (R_i - mean_g R) / (std_g R + eps)``, the unbiased std of the group; with
    ``scale_by_std=False`` only the mean is removed (Dr.GRPO, Liu et al. 2025), which removes
    the bias towards groups whose rewards barely differ.

    Args:
        rewards: ``[B]``, groups of k adjacent samples.
        k: samples per prompt, ``>= 2``.

    Returns:
        ``[B]``. A group whose k rewards are equal gets all-zero advantages (no signal).
    """
    if k < 2:
        raise ValueError(f"GRPO needs k >= 2 samples per prompt, got {k}")
    g = rewards.view(-1, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def group_centred(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """``R_i - mean_g R``: REINFORCE++-baseline's first step. ``[B] -> [B]``."""
    g = rewards.view(-1, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


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


# --------------------------------------------------------------------------- loss aggregation

LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "constant")


def loss_weights(mask: torch.Tensor, mode: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights ``w`` and units ``u`` so that the loss is ``sum(w * l) / sum(u)``.

    The sums run over every micro-batch and process of a minibatch, so splitting a minibatch
    (gradient accumulation, data parallel) never changes the loss.

    - ``token_mean``: ``w = mask``, ``u`` = valid tokens. Each token counts once (PPO).
    - ``seq_mean``: ``w = mask / n_i``, ``u`` = sequences. Each sequence counts once (GRPO).
    - ``constant``: ``w = mask / max_len``, ``u`` = sequences: token sums over a constant
      (Dr.GRPO), so long responses are not down-weighted per token.

    Args:
        mask: ``[B, T]`` response mask.
        mode: one of ``LOSS_AGGREGATIONS``.
        max_len: the maximum response length (``max_new_tokens``), for ``constant``.

    Returns:
        ``(w [B, T] float32, u scalar float32)``.
    """
    m = mask.float()
    if mode == "token_mean":
        return m, m.sum()
    rows = torch.tensor(float(m.shape[0]), device=m.device)
    if mode == "seq_mean":
        return m / m.sum(-1, keepdim=True).clamp_min(1.0), rows
    if mode == "constant":
        return m / float(max_len), rows
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


# --------------------------------------------------------------------------- losses


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), per token, as a loss.

    ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))`` with
    ``rho_t = exp(logp_t - old_logp_t)``; aggregate with :func:`loss_weights`.

    Args:
        logp: ``[B, T]`` log-probs under the current policy (carries gradient).
        old_logp: ``[B, T]`` rollout log-probs.
        advantages: ``[B, T]`` (whitened GAE, or a sequence advantage on every token).
        mask: ``[B, T]`` response mask.
        clip_range: ``eps``.

    Returns:
        ``(l [B, T], stats)``: ``l`` is 0 on masked positions; stats are detached masked
        means over this batch: ``approxkl`` (``0.5 * (logp - old_logp)^2``), ``clipfrac``
        (share of tokens where the clipped term is active), ``ratio`` (mean ``rho``) and
        ``logprob_gap`` (mean ``|logp - old_logp|``).
    """
    valid = mask.bool()
    # Mask the log-ratio before exp: padding may hold -inf log-probs, whose exp would
    # poison the backward pass even behind a later where().
    log_ratio = torch.where(valid, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.where(valid, torch.maximum(unclipped, clipped), torch.zeros_like(ratio))
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "ratio": masked_mean(ratio, mask),
            "logprob_gap": masked_mean(log_ratio.abs(), mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss per token, ``0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)``.

    Args:
        values: ``[B, T]`` current value predictions (carry gradient).
        old_values: ``[B, T]`` rollout values.
        returns: ``[B, T]`` targets from :func:`gae`.
        mask: ``[B, T]`` response mask.
        clip_range_value: ``c``.

    Returns:
        ``(l [B, T], stats)``: ``l`` is 0 on masked positions; ``stats["clipfrac"]`` is the
        detached share of tokens where the clipped term is the larger one.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    c = clip_range_value
    clipped_values = old_values + torch.clamp(values - old_values, -c, c)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * torch.where(mask.bool(), torch.maximum(loss_unclipped, loss_clipped), torch.zeros_like(values))
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
