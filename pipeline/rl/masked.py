"""Statistics over the valid tokens of a batch, across data-parallel processes when asked.

A ``mask`` is a 0/1 tensor (float or bool) of shape ``[B, T]`` that is 1 on the valid response
tokens, i.e. up to and including the first stop token (end-of-turn or eos). Masks are always
carried explicitly and never rebuilt from token ids, because with ``pad == eos`` the real EOS
becomes indistinguishable from padding (Huang et al. 2024, arXiv 2403.17031).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

Dim = Optional[Union[int, tuple[int, ...]]]
# Sums a tensor across data-parallel processes (``accelerator.reduce(x, "sum")``); None = one process.
AllReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


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
