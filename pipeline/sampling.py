"""Sampling a model on held-out prompts and summarising what came back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.generation import DecodingConfig, decode_responses, encode_prompts, generate_ids


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    ended: bool  # the model emitted EOS within max_new_tokens
    well_formed: bool  # ended, non-empty, and no chat-role marker inside the answer


def sample_responses(model, tokenizer, prompts: list[str], dec: DecodingConfig,
                     batch_size: int, seed: int) -> list[Sample]:
    """Batched generation that also reports, per response, whether it ended with EOS."""
    model.eval()
    torch.manual_seed(seed)
    role_markers = [t for t in tokenizer.all_special_tokens
                    if t not in (tokenizer.eos_token, tokenizer.pad_token)]
    out: list[Sample] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids, attn = encode_prompts(tokenizer, batch)
        resp, mask = generate_ids(model, ids, attn, dec, tokenizer, generator_seed=None)
        resp, mask = resp.cpu(), mask.cpu()
        ended = (resp == tokenizer.eos_token_id).logical_and(mask.bool()).any(dim=1).tolist()
        raw = tokenizer.batch_decode(resp, skip_special_tokens=False)
        texts = decode_responses(tokenizer, resp, mask)
        for p, text, e, r in zip(batch, texts, ended, raw):
            answer = r.split(tokenizer.eos_token)[0]
            clean = e and bool(text) and not any(m in answer for m in role_markers)
            out.append(Sample(p, text, e, clean))
    return out


def sample_stats(samples: list[Sample]) -> dict[str, float]:
    n = max(1, len(samples))
    return {
        "eos_rate": sum(s.ended for s in samples) / n,
        "format_rate": sum(s.well_formed for s in samples) / n,
        "mean_response_words": sum(len(s.response.split()) for s in samples) / n,
    }
