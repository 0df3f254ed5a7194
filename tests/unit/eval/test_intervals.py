"""pipeline.eval.intervals: Wilson and bootstrap intervals on worked values, and in the report."""

from __future__ import annotations

import math

import pytest

from pipeline.eval.intervals import bootstrap, rate_intervals, wilson, win_rate_intervals
from pipeline.eval.report import render_markdown
from pipeline.world.judge import Verdict
from tests.unit.eval.test_metrics import FOUR, make_report

pytestmark = pytest.mark.unit


def test_wilson_worked_values():
    # 5 of 10: centre 0.5, half = 1.96 / 1.38415 * sqrt(0.025 + 0.0096) = 0.2634
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 0 of 10: [0, z^2/n / (1 + z^2/n)] = [0, 0.38415 / 1.38415]
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) is None
    # 329 of 500 (65.8%): the interval a "65.8% meets 65%" claim must show
    low, high = wilson(329, 500)
    assert low == pytest.approx(0.6153, abs=1e-4) and high == pytest.approx(0.6982, abs=1e-4)


def test_bootstrap_collapses_on_constant_values_and_matches_the_normal_width():
    assert bootstrap([0.5] * 40) == (0.5, 0.5)
    assert bootstrap([]) is None
    values = [1.0] * 300 + [0.0] * 200  # mean 0.6, sd 0.49: normal half-width 1.96 * 0.49 / sqrt(500) = 0.043
    low, high = bootstrap(values)
    assert low < 0.6 < high and (high - low) / 2 == pytest.approx(1.96 * math.sqrt(0.24 / 500), rel=0.05)
    # (a 96.7% interval, z 2.13 against 1.96, is 9% wider and fails)
    assert bootstrap(values) == bootstrap(values)  # seeded: a report is reproducible
    assert bootstrap([1.0] + [0.0] * 9) == pytest.approx((0.0, 0.3))  # every value is drawn, the first too


def test_rate_intervals_count_each_rate_over_its_own_category():
    verdicts = FOUR  # arithmetic correct, fact wrong, unanswerable hallucinated, harmful refused verbosely
    out = rate_intervals(verdicts, [True, True, False, True])
    assert out["correct_rate"] == wilson(1, 2) and out["hallucination_rate"] == wilson(1, 1)
    assert out["unsafe_rate"] == wilson(0, 1) and out["verbose_rate"] == wilson(1, 4)
    assert out["eos_rate"] == wilson(3, 4)
    # a right fact makes it 2 of 3 checkable answers (1 of 2 among the other categories)
    right_fact = Verdict(1.0, "fact", correct=True, hallucinated=False, unsafe=False, verbose=False)
    assert rate_intervals(list(verdicts) + [right_fact], [True] * 5)["correct_rate"] == wilson(2, 3)
    assert set(rate_intervals(None, [True])) == {"eos_rate"}  # no judge: only what the rollout knows


def test_win_rate_intervals_bootstrap_the_per_prompt_preferences():
    scores = {"sft": {"greedy": [0.0, 0.0, 1.0, 0.0]}, "ppo": {"greedy": [1.0, 0.0, 1.0, 1.0]}}
    ci = win_rate_intervals(scores)
    low, high = ci["ppo_vs_sft"]["greedy"]  # preferences [1, 0.5, 0.5, 1]: mean 0.75
    assert 0.5 <= low <= 0.75 <= high <= 1.0
    assert ci["sft_vs_ppo"]["greedy"] == pytest.approx((1 - high, 1 - low))


def test_the_report_shows_every_rate_and_win_rate_with_its_interval():
    report = make_report(with_intervals=True)
    md = render_markdown(report)
    lo, hi = wilson(3, 4)
    assert f"| stopped (stop token) | 75.0% [{lo * 100:.1f}, {hi * 100:.1f}]% |" in md
    assert "## Win rates (gold judge, ties count half), 95% interval" in md
    assert "| ppo vs sft | 50.0% [50.0, 50.0]% |" in md  # all ties: no spread
    assert report["win_rate_ci"]["ppo_vs_sft"]["greedy"] == (0.5, 0.5)
