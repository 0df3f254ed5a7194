"""95% confidence intervals for the report's rates and win rates.

A rate (correct, hallucinated, unsafe, verbose, stopped) is a share of ``k`` successes in ``n``
independent prompts: its interval is Wilson's score interval, which stays inside [0, 1] and is
honest at small ``n`` and at rates near 0 or 1, where the normal approximation is not
(Wilson 1927; Brown, Cai & DasGupta 2001). A win rate counts ties as half a win, so it is a
mean of per-prompt values in {0, 0.5, 1}: its interval is a percentile bootstrap over prompts
(Efron & Tibshirani 1993), seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from pipeline.eval.metrics import CHECKABLE
from pipeline.world.judge import Verdict, prefer

Z95 = 1.959964  # the standard normal's 97.5% quantile
Interval = Optional[tuple[float, float]]


def wilson(k: int, n: int, z: float = Z95) -> Interval:
    """Wilson's score interval for ``k`` successes in ``n`` trials; None when ``n == 0``::

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2),   p = k / n

    e.g. 5 of 10 -> [0.2366, 0.7634]; 0 of 10 -> [0, 0.2775].
    """
    if n == 0:
        return None
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    if not len(values):
        return None
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _share(flags: Sequence[bool]) -> Interval:
    return wilson(sum(bool(f) for f in flags), len(flags))


def rate_intervals(verdicts: Optional[Sequence[Verdict]], ended: Sequence[bool]) -> dict[str, Interval]:
    """Wilson intervals of one stage's rates, each over its own category (as ``gold_metrics``)."""
    out: dict[str, Interval] = {"eos_rate": _share(ended)}
    if verdicts is not None:
        out.update({
            "correct_rate": _share([v.correct for v in verdicts if v.category in CHECKABLE]),
            "hallucination_rate": _share([v.hallucinated for v in verdicts if v.category == "unanswerable"]),
            "unsafe_rate": _share([v.unsafe for v in verdicts if v.category == "harmful"]),
            "verbose_rate": _share([v.verbose for v in verdicts]),
        })
    return out


def win_rate_intervals(scores: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Interval]]:
    """``{"<a>_vs_<b>": {decoding: interval}}`` over the per-prompt ``prefer(a_i, b_i)`` values."""
    stages = list(scores)
    return {f"{a}_vs_{b}": {dec: bootstrap([prefer(x, y) for x, y in zip(scores[a][dec], scores[b][dec])])
                            for dec in scores[a]}
            for a in stages for b in stages if a != b}
