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
from transformers import LogitsProcessor, LogitsProcessorList

from pipeline.chat import ChatFormat
from pipeline.generation import encode_prompts
from pipeline.rl import core


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
    """Rows re-laid as whole sequences, prompt then response, left-padded to the longest one.

    Prompts are left-padded and responses right-padded, so side by side a row of a short prompt
    and a long response and a row of the opposite pad to the sum of both maxima; packed, the
    width is the longest single sequence. Positions come from the mask, so nothing changes but
    the padding. Row i's response token t sits at column ``W - r_i + t``; the logits and values
    that concern it are read at column ``W - r_i + t - 1`` (:attr:`prefix`).
    """

    ids: torch.Tensor  # (B, W)
    mask: torch.Tensor  # (B, W)
    prefix: torch.Tensor  # (B, T) column of the prefix before response token t (clamped past the end)
    keep: int  # columns at the right end that hold every response and the token before it

    def response_columns(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, ...) -> (B, T, ...): what each response token needs, from the prefix before it."""
        idx = self.prefix.view(*self.prefix.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx)


def pack(q_ids, q_mask, r_ids, r_mask, pad_id: int) -> Packed:
    """(B, P) left-padded prompts and (B, T) right-padded responses as one :class:`Packed` batch."""
    q_len, r_len = q_mask.long().sum(1), r_mask.long().sum(1)
    W = int((q_len + r_len).max())
    B, P = q_ids.shape
    T = r_ids.shape[1]
    ids = torch.full((B, W), pad_id, dtype=q_ids.dtype, device=q_ids.device)
    mask = torch.zeros((B, W), dtype=q_mask.dtype, device=q_mask.device)
    cols = torch.arange(W, device=q_ids.device)
    start = W - q_len - r_len  # first real column of each row
    # prompt token j (of the q_len real ones, stored at P - q_len + j) goes to start + j
    q_src = (P - q_len)[:, None] + (cols[None] - start[:, None])
    in_prompt = (cols[None] >= start[:, None]) & (cols[None] < (start + q_len)[:, None])
    r_src = cols[None] - (start + q_len)[:, None]
    in_response = (cols[None] >= (start + q_len)[:, None])
    ids = torch.where(in_prompt, q_ids.gather(1, q_src.clamp(0, P - 1)), ids)
    ids = torch.where(in_response, r_ids.gather(1, r_src.clamp(0, T - 1)), ids)
    mask = (in_prompt | in_response).to(mask.dtype)
    t = torch.arange(T, device=q_ids.device)
    prefix = (W - r_len[:, None] + t[None] - 1).clamp(max=W - 1)
    return Packed(ids, mask, prefix, keep=int(r_len.max()) + 1)


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


class RecordingSampler(LogitsProcessor):
    """Samples from ``softmax(logits / T)`` inside HF ``generate`` and records, for every sampled
    token, its log-prob and the entropy of the distribution it was drawn from.

    It draws the token itself, by inverse CDF (one uniform number per row), and hands HF a score
    row that is 0 at that token and -inf elsewhere; HF runs greedy, so its argmax takes the
    sample. HF keeps its loop, caches and stopping; what it loses is ``torch.multinomial``,
    which on CPUs draws one exponential per vocabulary entry per row and step (a third of the
    sampling time at a 32k vocabulary). The token drawn at step t is known at step t + 1 (the
    last column of ``input_ids``) and the last one from the output, so only one step's
    ``[B, V]`` log-softmax is kept at a time.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self._last: Optional[torch.Tensor] = None  # (B, V) log-softmax of the latest step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self.logprobs.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        probs = self._last.exp()
        # a -inf logit (masked vocabulary) has p = 0 and adds 0, not 0 * -inf = nan
        self.entropy.append(-(probs * self._last.nan_to_num(neginf=0.0)).sum(-1))
        cdf = probs.cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, -math.inf).scatter_(-1, token, 0.0)

    def finish(self, response_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, entropy)``, each (B, T), aligned with the generated ``response_ids`` (B, T)."""
        self.logprobs.append(self._last.gather(-1, response_ids[:, -1:]).squeeze(-1))
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


@torch.no_grad()
def sample(model, fmt: ChatFormat, prompts: list[list[dict]], temperature: float, max_new_tokens: int):
    """Sample one response per prompt from the policy role.

    Returns ``q_ids, q_mask`` (B, P), ``response_ids`` (B, T, pad after the first stop token),
    ``response_mask`` (B, T) float, and the sampler's ``logprobs`` and ``entropy`` (B, T).
    """
    q_ids, q_mask = (t.to(model.device) for t in encode_prompts(fmt, prompts))
    recorder = RecordingSampler(temperature)
    # Greedy over the sampler's one-hot scores; every key that could add a processor is neutral.
    config = fmt.generation_config(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   repetition_penalty=1.0, min_new_tokens=0, no_repeat_ngram_size=0, use_cache=True)
    out = model.generate(input_ids=q_ids, attention_mask=q_mask, generation_config=config,
                         logits_processor=LogitsProcessorList([recorder]))
    resp = out[:, q_ids.shape[1]:]
    logprobs, entropy = recorder.finish(resp)
    mask = core.stop_mask(resp, torch.tensor(fmt.stop_ids, device=resp.device)).float()
    # Everything after the first stop token becomes padding, masked explicitly.
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, fmt.pad_id))
    return q_ids, q_mask, resp, mask, logprobs * mask, entropy * mask
