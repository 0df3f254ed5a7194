"""Where a response stops: masks through the first stop token (end-of-turn or eos).

Shapes: ``B`` responses of ``T`` tokens; a mask is 1 up to and including the first stop token.
Masks are carried explicitly because with ``pad == eos`` the real EOS looks like padding.
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- masks and EOS


def stop_mask(response_ids: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Mask of each response up to and including its first stop token.

    Pad ids are never looked at, so a tokenizer whose pad id equals a stop id cannot hide the
    real stop, and a model that emits the pad token cannot end a response early.

    Args:
        response_ids: ``[B, T]`` generated token ids.
        stop_ids: ``[S]`` the stop set (end-of-turn token, eos, generation-config eos ids).

    Returns:
        ``[B, T]`` bool: 1 up to and including the first stop token, 0 after. A row with no
        stop token (truncated at max length) is all 1.

    Example: stop set {2, 9}, ids ``[5, 9, 7, 2]`` -> ``[1, 1, 0, 0]``.
    """
    is_stop = torch.isin(response_ids, stop_ids).long()
    # Exclusive cumsum: stop tokens strictly before t. The first stop itself stays valid.
    return (torch.cumsum(is_stop, dim=-1) - is_stop) == 0


def ends_with_stop(response_ids: torch.Tensor, mask: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Whether each response's last valid token is a stop token (it finished, not truncated).

    Args:
        response_ids: ``[B, T]``.
        mask: ``[B, T]`` response mask (e.g. from :func:`stop_mask`).
        stop_ids: ``[S]`` the stop set.

    Returns:
        ``[B]`` bool; the missing-EOS penalty keys on ``~ends_with_stop``.
    """
    last = response_ids.gather(-1, last_token_index(mask).unsqueeze(-1)).squeeze(-1)
    return torch.isin(last, stop_ids) & mask.bool().any(dim=-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row.

    Args:
        mask: ``[B, T]`` 0/1.

    Returns:
        ``[B]`` LongTensor; a row with an empty mask gives 0.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    # max over valid positions, not sum(mask) - 1, so it stays right for any mask layout.
    return (positions * mask.bool().long()).amax(dim=-1)
