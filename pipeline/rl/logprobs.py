"""Token log-probs and entropies from logits, in chunks that never hold [B, T, V] at once.

Shapes: ``B`` the batch, ``T`` the response length, ``V`` the vocabulary, ``H`` the hidden size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------- log-probs


# Logits per chunk, per device type: the working copies never grow with B * T. On CPUs 8M (32 MB in
# fp32). On GPUs the LM head's chunk must be compute-bound: n rows do 2n FLOPs per bf16 weight (2
# bytes) read, so n must pass the card's FLOPs per byte of bandwidth (H200 989 TFLOP/s / 4.8 TB/s
# ~ 206, RTX 4090 165 / 1.0 ~ 165); 32M logits is 261 rows at Llama 3's 128k vocabulary, 220 at
# Qwen's 152k (128 MB in fp32).
LOGPROB_CHUNK = {"cpu": 1 << 23, "cuda": 1 << 25}


def logits_per_chunk(device: torch.device | str) -> int:
    return LOGPROB_CHUNK["cuda" if torch.device(device).type == "cuda" else "cpu"]


def _rows_per_chunk(vocab: int, device: torch.device | str) -> int:
    return max(1, logits_per_chunk(device) // max(1, vocab))


class _TokenLogprob(torch.autograd.Function):
    """``log softmax(logits / T)[label]`` in row chunks, with an exact hand-written backward.

    Autograd through ``log_softmax`` would keep a full fp32 ``[N, V]`` copy (and with bf16
    logits an upcast copy too). Here only the logits the caller already holds and one
    log-sum-exp per row are saved; the backward recomputes the softmax chunk by chunk::

        d logp / d logits_v = ([v == label] - softmax(logits / T)_v) / T
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature):  # logits [N, V], labels [N] -> [N] fp32 (or fp64)
        chunk, dtype = _rows_per_chunk(logits.shape[-1], logits.device), torch.promote_types(logits.dtype, torch.float32)
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
        T, chunk = ctx.temperature, _rows_per_chunk(logits.shape[-1], logits.device)
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
                  vocab: int, temperature: float = 1.0, with_entropy: bool = False):
    """``logprobs_from_logits(head(hidden), labels, temperature)`` without ever holding the whole
    ``[B, T, V]`` logits, nor their gradient: the LM ``head`` runs over chunks of rows, and with
    autograd on each chunk is recomputed in the backward pass (activation checkpointing of the
    head and the log-softmax), so a pass holds one chunk's logits (~32 MB in fp32) whatever
    ``B * T`` and the vocabulary. The price is one more head product per training pass.

    Args:
        head: final hidden states ``[N, H]`` -> logits ``[N, V]`` (output scalings included).
        hidden: ``[B, T, H]``; labels: ``[B, T]`` token ids; vocab: ``V``, to size the chunks.
        with_entropy: also return each position's entropy ``entropy_from_logits(head(hidden))``,
            from the same chunks and with its gradient (``algorithm.entropy_coef``).

    Returns:
        ``[B, T]`` float32 log-probs, equal to the unchunked computation within float rounding;
        with ``with_entropy``, ``(log-probs, entropies)``, both ``[B, T]``.
    """
    B, T, H = hidden.shape
    flat, y = hidden.reshape(B * T, H), labels.reshape(B * T).long()

    def chunk_logprobs(h: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        logits = head(h)[None]
        logp = logprobs_from_logits(logits, lab[None], temperature)[0]
        return torch.stack([logp, entropy_from_logits(logits, temperature)[0]], -1) if with_entropy else logp

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    step, out = _rows_per_chunk(vocab, hidden.device), []
    for s in range(0, B * T, step):
        h, lab = flat[s:s + step], y[s:s + step]
        out.append(checkpoint(chunk_logprobs, h, lab, use_reentrant=False, preserve_rng_state=False)
                   if recompute else chunk_logprobs(h, lab))
    if with_entropy:
        both = torch.cat(out).view(B, T, 2) if out else flat.new_zeros(B, T, 2, dtype=torch.float32)
        return both[..., 0], both[..., 1]
    return torch.cat(out).view(B, T) if out else flat.new_zeros(B, T, dtype=torch.float32)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)``, ``H = -sum_v p_v log p_v``, in row chunks.

    Args:
        logits: ``[B, T, V]``.

    Returns:
        ``[B, T]`` float32 entropies (not masked).
    """
    B, T, V = logits.shape
    flat, chunk, out = logits.reshape(B * T, V), _rows_per_chunk(V, logits.device), []

    def chunk_entropy(x: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(x.float() / temperature, dim=-1)
        # A -inf logit (masked vocabulary) has p = 0 and must contribute 0, not 0 * -inf = nan,
        # in the forward and in the backward pass.
        logp_finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
        return -(logp.exp() * logp_finite).sum(dim=-1)

    # With a gradient, autograd would keep each chunk's fp32 [rows, V] softmax until the backward
    # pass, a full [B, T, V] fp32 copy in all; recomputing it per chunk keeps only the logits.
    recompute = torch.is_grad_enabled() and logits.requires_grad
    for s in range(0, B * T, chunk):
        x = flat[s:s + chunk]
        out.append(checkpoint(chunk_entropy, x, use_reentrant=False, preserve_rng_state=False)
                   if recompute else chunk_entropy(x))
    return torch.cat(out).view(B, T) if out else flat.new_zeros(B, T, dtype=torch.float32)
