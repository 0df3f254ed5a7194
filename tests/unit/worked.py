"""Helpers for the worked examples of the unit tests."""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def t64(*items):
    """``t64(1, 2)`` -> float64 ``[[1, 2]]``; ``t64([1, 2], [3, 4])`` -> ``[[1, 2], [3, 4]]``."""
    rows = list(items) if isinstance(items[0], (list, tuple)) else [list(items)]
    return torch.tensor(rows, dtype=torch.float64)


EOS, EOT, PAD = 2, 3, 0
STOPS = torch.tensor([EOT, EOS])  # e.g. <|im_end|> and <|endoftext|>
