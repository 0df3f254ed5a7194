"""Rollouts: sample responses from the policy, then score them with every role.

One rollout chunk is: left-padded prompts -> sampled responses, with the log-prob and entropy
of every sampled token recorded as it is drawn -> the reference's log-probs, the value of every
prefix (with a critic) and the RM score at the last real token.

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``T`` response tokens
(right-padded after the first stop token), ``L = P + T``.
"""

from __future__ import annotations

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

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and response side by side: ids and attention mask, (B, L)."""
        return (torch.cat([self.query_ids, self.response_ids], 1),
                torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], 1))

    def trimmed(self) -> "Rollout":
        """The same rows without columns that are padding in every row (left of the prompts,
        right of the responses): exact, since positions come from the mask, and less work."""
        q = int(self.query_mask.bool().any(0).long().argmax()) if self.query_mask.bool().any() else 0
        t = int(self.response_mask.bool().any(0).nonzero().max()) + 1 if self.response_mask.bool().any() else 1
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if x is None or x.dim() < 2:
                out[f.name] = x
            else:
                out[f.name] = x[:, q:] if f.name.startswith("query") else x[:, :t]
        return Rollout(**out)


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
    """Turns HF ``generate`` into sampling from ``softmax(logits / T)`` that records, for every
    sampled token, its log-prob and the entropy of the distribution it was drawn from.

    It is the only logits processor in play (the generation config asks for temperature 1, top_k
    0 and top_p 1, so HF adds none of its own): it divides by T itself, so what is recorded is
    exactly the distribution sampled from. The token drawn at step t is known at step t + 1 (the
    last column of ``input_ids``), and the last one from the output, so only one step's
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
        scaled = scores.float() / self.temperature
        self._last = torch.log_softmax(scaled, dim=-1)
        self.entropy.append(-(self._last.exp() * self._last).sum(-1))
        return scaled

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
    config = fmt.generation_config(max_new_tokens=max_new_tokens, do_sample=True, num_beams=1,
                                   temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                   min_new_tokens=0, no_repeat_ngram_size=0, use_cache=True)
    out = model.generate(input_ids=q_ids, attention_mask=q_mask, generation_config=config,
                         logits_processor=LogitsProcessorList([recorder]))
    resp = out[:, q_ids.shape[1]:]
    logprobs, entropy = recorder.finish(resp)
    mask = core.stop_mask(resp, torch.tensor(fmt.stop_ids, device=resp.device)).float()
    # Everything after the first stop token becomes padding, masked explicitly.
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, fmt.pad_id))
    return q_ids, q_mask, resp, mask, logprobs * mask, entropy * mask
