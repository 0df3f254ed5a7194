"""Rollout health: worked values, thresholds, warnings and abort."""

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.rl import health

pytestmark = pytest.mark.unit


def test_pearson_worked():
    # lengths [1, 2, 3, 4] and scores [2, 4, 6, 8]: perfectly correlated; reversed: -1
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert health.pearson(x, 2 * x) == pytest.approx(1.0)
    assert health.pearson(x, -x) == pytest.approx(-1.0)
    # [1, 2, 3] vs [1, 3, 2]: cov = 0.5 * 2 / 3 ... r = 0.5
    assert health.pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert health.pearson(x, torch.ones(4)) == 0.0  # a constant: no correlation, not nan
    # the scale does not matter: tiny spreads correlate as well as large ones
    assert health.pearson(1e-3 * x, 1e-3 * x) == pytest.approx(1.0)


def test_crossed_thresholds_warn_with_what_they_mean_and_abort_when_asked():
    metrics = {"health/truncation_rate": 0.6, "health/logprob_gap": 1e-6, "health/length_reward_corr": 0.95}
    thresholds = {"truncation_rate": 0.5, "logprob_gap": 0.05, "length_reward_corr": 0.9}
    assert health.crossed(metrics, thresholds) == ["truncation_rate", "length_reward_corr"]
    lines = []
    health.check(metrics, thresholds, [], 7, lines.append)
    assert len(lines) == 2 and "update 7: health/truncation_rate = 0.6 is above" in lines[0]
    assert "length-hacking" in lines[1]
    with pytest.raises(PipelineError, match=r"stopped at update 7: health/length_reward_corr .* checkpoint is kept"):
        health.check(metrics, thresholds, ["length_reward_corr"], 7, lines.append)
    health.check(metrics, thresholds, ["logprob_gap"], 7, lambda _: None)  # not crossed: no abort
    # "above" is strict: a metric exactly at its threshold has not crossed it
    assert health.crossed({"health/truncation_rate": 0.5}, thresholds) == []
