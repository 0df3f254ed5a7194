"""Plain-text corpora as one token stream (pretraining, and PPO-ptx's pretraining term)."""

from __future__ import annotations

from typing import Iterable

import torch


def pack_corpus(texts: Iterable[str], tokenizer) -> torch.Tensor:
    """One long stream of token ids, documents separated by EOS. Shape (N,)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)
