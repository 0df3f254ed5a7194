"""The card a plan is made for: ``gpu_memory`` as the user writes it, or the CUDA device's own memory.

A plan keeps ``MARGIN`` of the card free: the memory model leaves out the CUDA context, allocator
slack and short-lived temporaries, and on an H200 it came out 3% under the measured peak allocated
(18.03 against 18.65 GiB for PPO at the Llama-3-8B shape) and 7% under the peak reserved (19.25 GiB).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from pipeline.core.errors import ConfigError

MARGIN = 0.10  # share of the card a plan leaves free
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


def parse_bytes(value: Any, key: str = "gpu_memory") -> int:
    """Bytes from ``24GiB``, ``80GB``, ``512 MiB``, ``24e9`` or a number (bytes). GB is 10^9, GiB 2^30."""
    match = None if isinstance(value, bool) else _SIZE.match(str(value).lower())
    if match is None or match.group(2) not in UNITS or not math.isfinite(float(match.group(1))) \
            or float(match.group(1)) * UNITS[match.group(2)] < 1:
        raise ConfigError(f"{key}={value!r} must be a size: bytes (24e9) or a number with a unit, e.g. 24GiB, "
                          "80GB, 512MiB (GB = 10^9, GiB = 2^30); fix the override or the YAML under conf/")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def show_bytes(n: float) -> str:
    """``n`` bytes for a reader: GiB with two decimals, or MiB / KiB / B below a GiB."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def cuda_memory() -> Optional[tuple[int, int]]:
    """(free, total) bytes of the current CUDA device, or None without one."""
    import torch

    return torch.cuda.mem_get_info() if torch.cuda.is_available() else None


def the_card(gpu_memory: Any) -> tuple[Optional[int], str]:
    """The card's bytes and where they come from: ``gpu_memory`` when set, else the CUDA device's
    total, else (None, why) on a machine without one."""
    if gpu_memory is not None:
        return parse_bytes(gpu_memory), f"gpu_memory={gpu_memory}"
    cuda = cuda_memory()
    if cuda is None:
        return None, "no CUDA device and no gpu_memory"
    return cuda[1], "the CUDA device's total"


def budget(card: int) -> float:
    """What a plan may fill of a ``card``-byte card."""
    return card * (1 - MARGIN)
