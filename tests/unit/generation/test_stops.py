"""pipeline.generation.stops: where a response stops."""

from __future__ import annotations

import pytest
import torch

from pipeline.generation.stops import ends_with_stop, last_token_index, stop_mask
from tests.unit.worked import EOS, EOT, PAD, STOPS

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- masks and stop tokens

def test_stop_mask_ends_at_the_first_token_of_the_stop_set():
    ids = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD],  # eos at 2
            [5, EOT, 7, EOS, 9],  # the end-of-turn token at 1 wins
            [5, 6, 7, 8, 9],  # truncated, no stop token
        ]
    )
    mask = stop_mask(ids, STOPS)
    assert mask.dtype == torch.bool
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ends_with_stop(ids, mask, STOPS).tolist() == [True, True, False]


def test_pad_never_ends_a_response():
    # A model that emits the pad id mid-answer has not stopped: pad is not in the stop set.
    ids = torch.tensor([[5, PAD, 6, EOT, PAD]])
    mask = stop_mask(ids, STOPS)
    assert mask.long().tolist() == [[1, 1, 1, 1, 0]]
    assert ends_with_stop(ids, mask, STOPS).tolist() == [True]
    assert ends_with_stop(ids, torch.tensor([[1, 1, 1, 0, 0]]), STOPS).tolist() == [False]


def test_a_response_with_no_tokens_has_not_stopped():
    # An empty row's "last token" index falls back to 0; a stop id there must not count.
    ids = torch.tensor([[EOS, PAD, PAD], [5, EOS, PAD]])
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    assert ends_with_stop(ids, mask, STOPS).tolist() == [False, True]


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    idx = last_token_index(mask)
    assert idx.dtype == torch.long
    assert idx.tolist() == [2, 0, 4]
