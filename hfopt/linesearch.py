"""Backtracking (Armijo) line search along the direction chosen by HF.

After CG backtracking picks an update direction, HF (Martens & Sutskever
2012, "Training deep and recurrent networks with Hessian-free optimization")
scales it back until the objective decreases sufficiently, since the damped
quadratic model can still overshoot.  The sufficient-decrease condition is
Armijo's, f(t) <= f(0) + c t g^T d, with defaults c = 1e-2 and step sizes
1, 0.8, 0.8^2, ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["LineSearchResult", "armijo"]


@dataclass
class LineSearchResult:
    """``step`` and ``value`` are 0.0 and ``f0`` when no step was accepted."""

    step: float
    value: float
    evaluations: int
    accepted: bool


def armijo(
    f: Callable[[float], float],
    f0: float,
    slope: float,
    *,
    c: float = 1e-2,
    shrink: float = 0.8,
    initial: float = 1.0,
    max_evaluations: int = 60,
) -> LineSearchResult:
    """Try steps ``initial * shrink**n`` until ``f(step) <= f0 + c * step * slope``.

    ``f(t)`` is the objective at ``t`` times the search direction and ``slope``
    the directional derivative g^T d at ``t = 0``.  A non-finite ``f`` value
    fails the test.  If ``slope`` is not a finite negative number the
    direction cannot give a sufficient decrease, so nothing is evaluated.
    """
    if not 0 < c < 1:
        raise ValueError(f"c must be in (0, 1), got {c}")
    if not 0 < shrink < 1:
        raise ValueError(f"shrink must be in (0, 1), got {shrink}")
    if not (initial > 0 and math.isfinite(initial)):
        raise ValueError(f"initial must be finite and > 0, got {initial}")
    if max_evaluations < 1:
        raise ValueError(f"max_evaluations must be >= 1, got {max_evaluations}")
    f0 = float(f0)
    if not math.isfinite(f0):
        raise ValueError(f"f0 must be finite, got {f0}")
    slope = float(slope)
    if not (math.isfinite(slope) and slope < 0):
        return LineSearchResult(step=0.0, value=f0, evaluations=0, accepted=False)

    for n in range(max_evaluations):
        # Computing each step from the exponent, rather than by repeated
        # multiplication, keeps it equal to the closed form initial * shrink**n.
        step = initial * shrink**n
        value = float(f(step))
        if math.isfinite(value) and value <= f0 + c * step * slope:
            return LineSearchResult(step=step, value=value, evaluations=n + 1, accepted=True)
    return LineSearchResult(step=0.0, value=f0, evaluations=max_evaluations, accepted=False)
