"""Levenberg-Marquardt adjustment of the Tikhonov damping strength lambda.

The damped curvature ``G + lambda I`` is trusted only as far as the quadratic
model it defines predicts the true change in the objective.  After each step
the reduction ratio rho = (f(new) - f(old)) / (q(d) - q(0)) compares the two:
when the model was pessimistic or accurate (rho > 3/4) lambda shrinks, when it
was badly optimistic (rho < 1/4) lambda grows, by the factors 2/3 and 3/2 of
Martens (2010), "Deep learning via Hessian-free optimization".  Between the
thresholds the model is adequate and lambda is left alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["reduction_ratio", "LevenbergMarquardt"]


def reduction_ratio(actual: float, predicted: float) -> float:
    """rho = actual / predicted for signed changes (both negative when things improve).

    Returns nan when the model predicts no decrease (``predicted >= 0``),
    because the ratio is then meaningless, or when either value is non-finite;
    :meth:`LevenbergMarquardt.update` treats nan as a failed step.
    """
    actual = float(actual)
    predicted = float(predicted)
    if not (math.isfinite(actual) and math.isfinite(predicted)) or predicted >= 0:
        return math.nan
    return actual / predicted


@dataclass
class LevenbergMarquardt:
    """Multiplicative damping schedule driven by the reduction ratio rho.

    ``value`` is the current lambda; every change is clamped to
    ``[minimum, maximum]`` (the initial value is used as given).
    """

    value: float = 1.0
    decrease: float = 2 / 3
    increase: float = 3 / 2
    low: float = 0.25
    high: float = 0.75
    minimum: float = 1e-8
    maximum: float = 1e8

    def __post_init__(self) -> None:
        # Comparisons are written so that nan fails every check.
        if not self.value > 0:
            raise ValueError(f"value must be > 0, got {self.value}")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {self.decrease}")
        if not self.increase > 1:
            raise ValueError(f"increase must be > 1, got {self.increase}")
        if not self.low >= 0:
            raise ValueError(f"low must be >= 0, got {self.low}")
        if not self.high > self.low:
            raise ValueError(f"high must be > low ({self.low}), got {self.high}")
        if not self.minimum > 0:
            raise ValueError(f"minimum must be > 0, got {self.minimum}")
        if not self.maximum >= self.minimum:
            raise ValueError(f"maximum must be >= minimum ({self.minimum}), got {self.maximum}")

    def _set(self, value: float) -> float:
        self.value = min(max(value, self.minimum), self.maximum)
        return self.value

    def update(self, rho: float) -> float:
        """Adjust lambda from the reduction ratio and return the new value."""
        rho = float(rho)
        if not math.isfinite(rho) or rho < self.low:
            return self._set(self.value * self.increase)
        if rho > self.high:
            return self._set(self.value * self.decrease)
        return self._set(self.value)

    def state_dict(self) -> dict[str, float]:
        return {key: float(val) for key, val in asdict(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; missing keys keep their current values.

        The merged settings are validated as by the constructor, and unknown
        keys raise ``ValueError`` rather than being silently ignored.
        """
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"unknown LevenbergMarquardt state keys: {sorted(unknown)}")
        merged = {**self.state_dict(), **{key: float(val) for key, val in state.items()}}
        validated = LevenbergMarquardt(**merged)
        for name in names:
            setattr(self, name, getattr(validated, name))
