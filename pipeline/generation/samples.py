"""Sampling a model on held-out prompts and summarising what came back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.chat import ChatFormat, Message
from pipeline.data.layouts import prompt_text
from pipeline.generation.decoding import DecodingConfig, decode_responses, encode_prompts, generate_ids
from pipeline.generation.stops import ends_with_stop


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    ended: bool  # the model emitted a stop token within max_new_tokens
    well_formed: bool  # ended, non-empty, and no other special token (a role marker) inside the answer


def sample_responses(model, fmt: ChatFormat, prompts: list[list[Message]], dec: DecodingConfig,
                     batch_size: int, seed: int) -> list[Sample]:
    """Batched generation that also reports, per response, whether it stopped on its own."""
    model.eval()
    torch.manual_seed(seed)
    stops = torch.tensor(fmt.stop_ids)
    markers = set(fmt.tokenizer.all_special_ids) - set(fmt.stop_ids) - {fmt.pad_id}
    out: list[Sample] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids, attn = encode_prompts(fmt, batch)
        resp, mask = generate_ids(model, ids, attn, dec, fmt, generator_seed=None)
        resp, mask = resp.cpu(), mask.cpu()
        ended = ends_with_stop(resp, mask, stops).tolist()
        texts = decode_responses(fmt, resp, mask)
        for p, text, e, row, m in zip(batch, texts, ended, resp.tolist(), mask.tolist()):
            inside = {t for t, bit in zip(row, m) if bit} - set(fmt.stop_ids)
            clean = e and bool(text) and not inside & markers
            out.append(Sample(prompt_text(p), text, e, clean))
    return out


def sample_stats(samples: list[Sample]) -> dict[str, float]:
    n = max(1, len(samples))
    return {
        "eos_rate": sum(s.ended for s in samples) / n,
        "format_rate": sum(s.well_formed for s in samples) / n,
        "mean_response_words": sum(len(s.response.split()) for s in samples) / n,
    }
