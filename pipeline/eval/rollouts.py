"""Sampling every stage on the eval prompts, and the KL of its samples to the SFT policy.

Shapes: ``N`` prompts, ``B`` prompts in a batch, ``P`` prompt tokens (left-padded),
``T`` response tokens, ``V`` the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.data.chat import ChatFormat
from pipeline.generation.decoding import DecodingConfig, decode_responses, encode_prompts, generate_ids
from pipeline.generation.stops import ends_with_stop
from pipeline.rl.kl import kl_per_token
from pipeline.rl.logprobs import logprobs_from_logits

# --- KL to the SFT policy -----------------------------------------------------------------


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence k1 estimate of KL(pi || pi_ref) from one sample of pi each.

    ``sum_t mask_t (log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))``; averaged over
    samples y ~ pi it is unbiased for the sequence-level KL (Schulman 2020). A single
    sample may be negative. ``logp``, ``ref_logp``, ``mask``: (B, T) -> (B,).
    """
    per_token = kl_per_token(logp, ref_logp, "k1")
    # where, not *: positions past EOS are never looked at, whatever they hold.
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(-1)


@torch.no_grad()
def response_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``log softmax(logits / T)`` of each response token under ``model``. (B, T).

    Prompts are left-padded (B, P); responses (B, T) are masked after their stop token.
    Position ids come from the attention mask, as in ``generate``, so a padded row sees
    the same positions as it would unpadded; the LM head runs only at response positions.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(model.device)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(model.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    T = response_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1).logits[:, :-1]  # position P - 1 + t predicts response token t
    return logprobs_from_logits(logits, response_ids.to(model.device), temperature).cpu()


@torch.no_grad()
def corpus_nll(model, fmt: ChatFormat, texts: Sequence[str], block_size: int, batch_size: int) -> float:
    """Mean negative log-likelihood per token of ``texts``, each cut to ``block_size`` tokens
    (right-padded in batches; padding is masked)."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        rows = [fmt.tokenizer(t, add_special_tokens=False)["input_ids"][:block_size]
                for t in texts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), fmt.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = logprobs_from_logits(logits, ids[:, 1:])
        valid = mask[:, 1:].bool()
        total -= logp[valid].sum().item()
        count += int(valid.sum())
    return total / max(1, count)


# --- rollouts -----------------------------------------------------------------------------


@dataclass
class Rollout:
    """One policy's responses to every prompt under one decoding."""

    texts: list[str]  # N responses, cut at the stop token
    ended: torch.Tensor  # (N,) bool: a stop token within max_new_tokens
    lengths: torch.Tensor  # (N,) response tokens, through the stop token
    # Per generate call: prompt ids and mask (B, P), response ids and mask (B, T).
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def generate_rollout(model, fmt: ChatFormat, prompts: list[list[dict]], dec: DecodingConfig,
                     batch_size: int, seed: int) -> Rollout:
    """Batched decoding that keeps the token ids (the KL needs them), not only the text.

    The RNG is seeded once, so every stage draws from the same random stream.
    """
    texts, ended, lengths, batches = [], [], [], []
    stops = torch.tensor(fmt.stop_ids)
    for start in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask = encode_prompts(fmt, prompts[start:start + batch_size])
        response_ids, response_mask = generate_ids(model, prompt_ids, prompt_mask, dec, fmt,
                                                   generator_seed=seed if start == 0 else None)
        response_ids, response_mask = response_ids.cpu(), response_mask.cpu()
        texts.extend(decode_responses(fmt, response_ids, response_mask))
        ended.append(ends_with_stop(response_ids, response_mask, stops))
        lengths.append(response_mask.sum(1).float())
        batches.append((prompt_ids, prompt_mask, response_ids, response_mask))
    return Rollout(texts, torch.cat(ended), torch.cat(lengths), batches)


def rollout_kl(policy, reference, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Per-sequence KL(policy || reference) on the policy's own samples. (N,).

    Both models must share the tokenizer the rollout was encoded with.
    """
    return torch.cat([
        sequence_kl(response_logprobs(policy, p_ids, p_mask, r_ids, r_mask, temperature),
                    response_logprobs(reference, p_ids, p_mask, r_ids, r_mask, temperature),
                    r_mask)
        for p_ids, p_mask, r_ids, r_mask in rollout.batches])
