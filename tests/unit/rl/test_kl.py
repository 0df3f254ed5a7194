"""pipeline.rl.kl: the k1/k3 estimators and the KL controllers, on worked values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.rl.kl import AdaptiveKLController, FixedKLController, kl_per_token, make_kl_controller
from tests.unit.worked import LN2, t64

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- KL and rewards


def test_kl_estimators_worked():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    # k1 will be [log 2, -log 2]  (k1 can be negative)
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), t64(LN2, -LN2))
    # r = ref / p = [0.5, 2]; k3 = (r - 1) - log r = [-0.5 + ln 2, 1 - ln 2] = [0.1931, 0.3069]
    k3 = kl_per_token(logp, ref, "k3")
    torch.testing.assert_close(k3, t64(-0.5 + LN2, 1.0 - LN2))
    assert k3[0, 0].item() == pytest.approx(0.193147, abs=1e-6)


def test_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(64, 32, generator=g) * 3
    ref = torch.randn(64, 32, generator=g) * 3
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert (kl_per_token(logp, logp, "k3") == 0).all()


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_one_update_worked():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)
    # e = 9/6 - 1 = 0.5, clipped to 0.2; value = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    assert ctl.value == pytest.approx(0.100512)
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(current_kl=3.0, n_steps=256)
    # e = 3/6 - 1 = -0.5, clipped to -0.2; value = 0.1 * (1 - 0.00512) = 0.099488
    assert ctl.value == pytest.approx(0.099488)
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(current_kl=6.6, n_steps=256)
    # e = 0.1 (inside the clip); value = 0.1 * (1 + 0.1 * 0.0256) = 0.100256
    assert ctl.value == pytest.approx(0.100256)


def test_adaptive_kl_state_round_trip():
    ctl = make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    for kl in (9.0, 2.0, 7.0):
        ctl.update(kl, 256)
    state = ctl.state_dict()
    restored = make_kl_controller("adaptive", 0.5, target=6.0, horizon=10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(8.0, 64)
    restored.update(8.0, 64)
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        FixedKLController(0.1).load_state_dict(state)


def test_fixed_kl_controller_and_factory():
    ctl = make_kl_controller("fixed", 0.05, target=None, horizon=None)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError):
        make_kl_controller("pid", 0.1, 6.0, 10000)
    with pytest.raises(ValueError):
        make_kl_controller("adaptive", 0.1, None, None)


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_a_zero_kl_coefficient_is_allowed_and_a_negative_one_is_refused(kind):
    assert make_kl_controller(kind, 0.0, target=6.0, horizon=10000).value == 0.0  # beta = 0: no penalty
    with pytest.raises(ValueError, match="must be >= 0, got -0.1"):
        make_kl_controller(kind, -0.1, target=6.0, horizon=10000)


@pytest.mark.parametrize("target, horizon", [(0.0, 10000), (6.0, 0.0), (-1.0, 10000), (None, 10000), (6.0, None)])
def test_the_adaptive_controller_needs_a_positive_target_and_horizon(target, horizon):
    with pytest.raises(ValueError, match="target and horizon"):
        make_kl_controller("adaptive", 0.1, target=target, horizon=horizon)


def test_the_adaptive_controller_accepts_a_target_and_horizon_under_one():
    ctl = make_kl_controller("adaptive", 0.1, target=0.5, horizon=0.5)
    ctl.update(current_kl=0.5, n_steps=1)  # on target: e = 0, the coefficient stays
    assert ctl.value == pytest.approx(0.1)
