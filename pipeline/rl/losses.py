"""The clipped policy and value losses, and how token losses aggregate into one number.

Shapes: ``B`` sequences of ``T`` response tokens; ``mask`` is 1 on valid tokens.

References:
    - Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate).
    - Huang et al. 2024, arXiv 2403.17031 (value clipping, loss aggregation).
"""

from __future__ import annotations

import torch

from pipeline.rl.masked import masked_mean

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
