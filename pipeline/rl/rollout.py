"""Rollouts: sample responses from the policy, then score them with every role.

One rollout chunk is: left-padded prompts -> sampled responses, with the log-prob and entropy
of every sampled token recorded as it is drawn -> the reference's log-probs, the value of every
prefix (with a critic) and the RM score at the last real token.

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``T`` response tokens
(right-padded after the first stop token), ``L = P + T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
from transformers import DynamicCache

from pipeline.data.chat import ChatFormat
from pipeline.generation.decoding import encode_prompts
from pipeline.generation.stops import stop_mask


@dataclass
class Rollout:
    query_ids: torch.Tensor  # (B, P) left-padded prompts
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) pad after the first stop token
    response_mask: torch.Tensor  # (B, T) float, 1 through the first stop token
    logprobs: torch.Tensor  # (B, T) rollout policy, logits / T
    ref_logprobs: torch.Tensor  # (B, T) SFT reference, logits / T
    entropy: torch.Tensor  # (B, T) entropy of the sampling distribution, masked
    scores: torch.Tensor  # (B,) total sequence-level score (every reward source, penalties)
    rm_scores: torch.Tensor  # (B,) raw RM score
    values: Optional[torch.Tensor] = None  # (B, T) V of the prefix before each token (critic only)
    kl: Optional[torch.Tensor] = None  # (B, T) per-token KL estimate to the reference, masked
    advantages: Optional[torch.Tensor] = None  # (B, T)
    returns: Optional[torch.Tensor] = None  # (B, T) value targets (critic only)

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                          for f in fields(self)})

    def trimmed(self) -> "Rollout":
        """The same rows without columns that are padding in every row (left of the prompts,
        right of the responses): exact, since positions come from the mask, and less work."""
        q = int(self.query_mask.bool().any(0).long().argmax())
        t = int(self.response_mask.bool().any(0).nonzero().max()) + 1
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if x is None or x.dim() < 2:
                out[f.name] = x
            else:
                out[f.name] = x[:, q:] if f.name.startswith("query") else x[:, :t]
        return Rollout(**out)


def by_length(query_mask: torch.Tensor, response_mask: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices in chunks of ``size``, shortest sequences first: a chunk trimmed of the
    columns that are padding in all its rows then pads far less than the whole batch would."""
    lengths = query_mask.sum(1) + response_mask.sum(1)
    return list(torch.argsort(lengths, stable=True).split(size))


@dataclass
class Packed:
    """Whole sequences, prompt then response, several to a row, filled first-fit in decreasing
    length, each sequence's positions restarting at 0. Rows are as wide as :func:`row_width`
    finds cheapest for the model (twice the longest sequence when no cost is given).

    Prompts are left-padded and responses right-padded, so side by side a batch pads every row to
    the longest prompt plus the longest response. Packed, only the tail of each row is padding:
    on the world's rollouts (minibatches of 32) about 60% of the side-by-side width is real
    tokens, and about 90% of the packed rows.

    Attention stays within each sequence because transformers builds a block-diagonal causal
    mask from positions that restart (``attention_mask=None``), so each sequence computes what it
    would alone. Trailing pads sit at position 0, each its own one-token sequence.
    Rows hold one sequence each, as wide as the longest, when ``several_per_row`` is off.
    """

    ids: torch.Tensor  # (R, W)
    positions: torch.Tensor  # (R, W) position of each token within its own sequence
    prefix: torch.Tensor  # (B, T) flat index (row * W + column) of the token before response token t;
    #                       past a response's end, the sequence's last token (callers mask those)
    last: torch.Tensor  # (B,) flat index of each sequence's last token

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) per-token outputs -> the entries at flat ``index`` (shape of index, ...)."""
        return x.flatten(0, 1)[index]


def first_fit(lengths: list[int], width: int, several_per_row: bool = True) -> list[tuple[int, int]]:
    """(row, column) of each sequence: first fit in decreasing length into rows of ``width``."""
    fill: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((j for j, used in enumerate(fill) if used + lengths[i] <= width), None) if several_per_row else None
        if row is None:
            fill.append(0)
            row = len(fill) - 1
        place[i] = (row, fill[row])
        fill[row] += lengths[i]
    return place


# Row widths row_width tries, in multiples of the longest sequence.
WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def row_width(lengths: list[int], attention_cost: float) -> int:
    """The row width ``W`` that minimises the estimated cost of a packed pass over sequences of
    ``lengths``, ``rows(W) * W * (1 + attention_cost * W)``, among :data:`WIDTHS` times the
    longest (ties: the narrower).

    A token costs its linear layers wherever it sits, plus attention over its whole row (the
    block-diagonal mask is applied inside the full ``W x W`` product): wider rows pad less and
    attend more. ``attention_cost`` is a token's attention cost per column of row width over its
    linear layers' cost (:meth:`SharedBaseActorCritic.attention_cost`: ~1/830 on the world's tiny
    Llama, ~1/25000 on a 7B). With lengths 41 +- 8, three sequences fit rows of 2.5 x the longest
    where two fit rows of twice it: ~90% real tokens instead of ~75%.
    """
    longest = max(lengths)
    costs = []
    for f in WIDTHS:
        w = math.ceil(longest * f)
        rows = max(r for r, _ in first_fit(lengths, w)) + 1
        costs.append((rows * w * (1 + attention_cost * w), w))
    return min(costs)[1]


def pack(q_ids, q_mask, r_ids, r_mask, pad_id: int, several_per_row: bool = True,
         attention_cost: Optional[float] = None) -> Packed:
    """(B, P) left-padded prompts and (B, T) right-padded responses as one :class:`Packed` batch:
    rows as wide as the longest sequence with ``several_per_row`` off, else of :func:`row_width`
    given the model's ``attention_cost``, else twice the longest."""
    q_len, r_len = q_mask.long().sum(1), r_mask.long().sum(1)
    length = q_len + r_len
    B, P = q_ids.shape
    T = r_ids.shape[1]
    lengths = length.tolist()
    if not several_per_row:
        W = max(lengths)
    elif attention_cost is None:
        W = 2 * max(lengths)
    else:
        W = row_width(lengths, attention_cost)
    place = first_fit(lengths, W, several_per_row)
    rows = max(r for r, _ in place) + 1
    start = torch.tensor([r * W + c for r, c in place], device=q_ids.device)  # (B,) flat index of token 0
    j = torch.arange(W, device=q_ids.device)[None]  # (1, W): token j of each sequence
    in_prompt, real = j < q_len[:, None], j < length[:, None]
    tokens = torch.where(in_prompt, q_ids.gather(1, ((P - q_len)[:, None] + j).clamp(max=P - 1)),
                         r_ids.gather(1, (j - q_len[:, None]).clamp(0, T - 1)))  # (B, W)
    dest = (start[:, None] + j)[real]
    ids = torch.full((rows * W,), pad_id, dtype=q_ids.dtype, device=q_ids.device)
    positions = torch.zeros(rows * W, dtype=torch.long, device=q_ids.device)
    ids[dest] = tokens[real]
    positions[dest] = j.expand(B, -1)[real]
    t = torch.arange(T, device=q_ids.device)[None]
    last = start + length - 1
    prefix = torch.minimum(start[:, None] + q_len[:, None] - 1 + t, last[:, None])
    return Packed(ids.view(rows, W), positions.view(rows, W), prefix, last)


def concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollout chunks whose prompt / response widths differ (left / right pad)."""
    P = max(p.query_ids.shape[1] for p in parts)
    T = max(p.response_ids.shape[1] for p in parts)

    def left(x, value):
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=value)

    def right(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    out = {}
    for f in fields(Rollout):
        xs = [getattr(p, f.name) for p in parts]
        if xs[0] is None:
            out[f.name] = None
        elif f.name.startswith("query"):
            out[f.name] = torch.cat([left(x, pad_id if f.name == "query_ids" else 0) for x in xs])
        elif xs[0].dim() == 2:
            out[f.name] = torch.cat([right(x, pad_id if f.name == "response_ids" else 0) for x in xs])
        else:
            out[f.name] = torch.cat(xs)
    return Rollout(**out)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0. (B, L) -> (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def cumulative(x: torch.Tensor) -> torch.Tensor:
    """The sampler's cumulative distribution: (b, V) logits already divided by T -> (b, V) float64
    running sums of ``exp(x - max x)``, proportional to the CDF of ``softmax(x)``.

    Float64 because a fp32 running sum rounds away every increment under half its ulp (3e-8 past
    0.5): at Qwen's 152k vocabulary that moved 3e-3 of total variation onto the tokens after the
    tail and made tail tokens undrawable. In float64 the drawn distribution is ``softmax(x)`` to
    1e-9 in total variation and a token of p >= ~1e-15 can be drawn (tests/unit/rl/test_rollout.py).
    """
    x = x.to(torch.float64, copy=True)  # a copy: the in-place steps below must not touch the caller's
    return x.sub_(x.amax(-1, keepdim=True)).exp_().cumsum(-1)


def draw(logits: torch.Tensor, temperature: float | torch.Tensor, u: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``softmax(logits / T)`` by inverse CDF: (b, V) -> ``token``, its
    ``logprob`` and the distribution's ``entropy``, each (b,) fp32.

    One float64 uniform ``u`` per row picks the token i with ``cdf[i-1] <= u * cdf[-1] < cdf[i]``, so
    a -inf logit (p = 0, an empty interval) is never drawn. Exact like Gumbel-max, at a fraction of
    its cost on CPUs: one uniform per row instead of one (plus two logs) per vocabulary entry.
    ``u``: the (b, 1) uniforms to use (float64); by default drawn here from the global generator.
    The log-prob is ``x - logsumexp(x)`` as the trainer computes it (pipeline/rl/logprobs.py):
    torch's fp32 ``log_softmax`` on CPUs loses the tail's mass from its sum (3e-4 nats at 152k).
    """
    x = logits.float() / temperature
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # 0 * -inf would be nan
    cdf = cumulative(x)
    if u is None:
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype)
    u = u * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    return token.squeeze(-1), logp.gather(-1, token).squeeze(-1), entropy


@torch.no_grad()
def sample(lm, fmt: ChatFormat, prompts: list[list[dict]], temperature: float, max_new_tokens: int,
           u: torch.Tensor | None = None):
    """Sample one response per prompt from the causal LM ``lm`` (the policy), a token at a time with
    a KV cache, recording each token's log-prob and the entropy it was drawn from.

    A row leaves the batch, and its cache, once it draws a stop token: the steps after that cost
    only the rows still going (HF ``generate`` runs every row until the last one stops, and
    responses here are mostly well under ``max_new_tokens``).

    ``u``: (B, T) float64 uniforms, row r's draw at step t from ``u[r, t]``
    (pipeline/rl/static_sampler.py draws them the same way); by default one fresh uniform a row a step.

    Returns ``q_ids, q_mask`` (B, P), ``response_ids`` (B, T, pad after the first stop token),
    ``response_mask`` (B, T) float, and the sampler's ``logprobs`` and ``entropy`` (B, T).
    """
    q_ids, q_mask = (t.to(lm.device) for t in encode_prompts(fmt, prompts))
    n, dev = q_ids.shape[0], q_ids.device
    resp = torch.full((n, max_new_tokens), fmt.pad_id, dtype=q_ids.dtype, device=dev)
    logprobs, entropy = (torch.zeros(n, max_new_tokens, device=dev) for _ in range(2))
    stops = torch.tensor(fmt.stop_ids, device=dev)
    rows = torch.arange(n, device=dev)  # the prompt each batch row samples for
    ids, mask = q_ids, q_mask
    positions = position_ids_from_mask(q_mask)
    cache = DynamicCache(config=lm.config)  # sliding-window layers where the family has them
    for t in range(max_new_tokens):
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1).logits[:, -1]  # (b, V)
        token, logprobs[rows, t], entropy[rows, t] = draw(
            logits, temperature, None if u is None else u[rows, t:t + 1].to(dev, torch.float64))
        resp[rows, t] = token
        going = ~torch.isin(token, stops)
        if not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(-1)
            rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
            for layer in cache.layers:
                layer.batch_select_indices(keep)
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
    mask = stop_mask(resp, stops).float()
    return q_ids, q_mask, resp, mask, logprobs * mask, entropy * mask
