"""KL to the reference: per-token estimators and the coefficient's controllers.

References:
    - Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1, k3).
    - Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
      (per-token KL penalty, adaptive KL controller).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

KL_ESTIMATORS = ("k1", "k3")


# --------------------------------------------------------------------------- KL and rewards


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi``.

    Estimators from Schulman, "Approximating KL Divergence" (2020),
    http://joschu.net/blog/kl-approx.html, with ``r = pi_ref(x) / pi(x)``:

    - ``"k1"``: ``-log r = logp - ref_logp``. Unbiased, high variance, can be negative.
    - ``"k3"``: ``(r - 1) - log r``. Unbiased, lower variance, always ``>= 0``.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the policy.
        ref_logp: ``[B, T]`` log-probs of the same tokens under the reference.
        estimator: ``"k1"`` or ``"k3"``.

    Returns:
        ``[B, T]`` (not masked).

    Raises:
        ValueError: on an unknown estimator.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        # expm1 keeps (r - 1) accurate when r is close to 1, i.e. early in training.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_kind(d, self.kind)
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    A proportional controller steering the observed KL towards ``target``::

        e = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + e * n_steps / horizon

    where ``n_steps`` is the number of episodes (samples) since the last update.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_kind(d, self.kind)
        self.value = float(d["value"])
        self.target = float(d["target"])
        self.horizon = float(d["horizon"])


KLController = Union[FixedKLController, AdaptiveKLController]


def _check_kind(d: dict[str, Any], kind: str) -> None:
    # Resuming an adaptive run into a fixed controller (or back) would silently change the run.
    if d.get("kind", kind) != kind:
        raise ValueError(f"state is for a {d['kind']!r} KL controller, not {kind!r}")


def make_kl_controller(
    kind: str,
    init_kl_coef: float,
    target: Optional[float] = None,
    horizon: Optional[float] = None,
) -> KLController:
    """Build a KL controller; ``kind`` is ``"fixed"`` or ``"adaptive"``.

    ``target`` and ``horizon`` are required for ``"adaptive"`` and ignored for ``"fixed"``.
    """
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs target and horizon")
        return AdaptiveKLController(init_kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'fixed' or 'adaptive'")
