"""Truncated preconditioned conjugate gradient for Hessian-free optimization.

The inner solver of Hessian-free optimization (Martens 2010, "Deep learning via
Hessian-free optimization", ICML; Martens & Sutskever 2012, "Training deep and
recurrent networks with Hessian-free optimization", in *Neural Networks: Tricks
of the Trade*) approximately minimises the local quadratic model

    phi(x) = 0.5 x^T A x - b^T x

with linear conjugate gradient, where ``A`` (damped curvature) is available
only through matrix-vector products.  CG is not run to convergence; it is
truncated by the relative-progress rule of Martens (2010):

    at iteration i, with k = max(min_k, ceil(k_fraction * i)), stop when
    i > k, phi(x_i) < 0 and (phi(x_i) - phi(x_{i-k})) / phi(x_i) < k * eps

i.e. when the average relative reduction of phi per iteration over the last
k iterations has dropped below ``eps`` (Martens uses min_k = 10,
k_fraction = 0.1, eps = 5e-4).  The product ``k_fraction * i`` is rounded to
9 decimals before the ceiling so that decimal fractions behave as written
(k_fraction = 0.07 at i = 100 gives k = 7, not the 8 that the binary product
7.000000000000001 would give).

phi is tracked without extra matrix-vector products through the recursively
updated residual r = b - A x:  phi(x) = -0.5 x^T (b + r).

Iterates are saved at iterations ceil(5 * 1.3**j), j = 0, 1, ... (Martens
2010, "CG iteration backtracking") so that the outer optimizer can fall back
with :func:`backtrack` to an earlier iterate, which may do better on the true
objective than later ones fitted more closely to the mini-batch quadratic.

Besides the relative-progress rule, CG stops on: ``max_iterations``; a search
direction of non-positive curvature (possible when ``A`` is an indefinite
Hessian rather than a Gauss-Newton matrix), in which case the step along that
direction is not taken; a residual norm at or below ``residual_tol``; and a
non-finite curvature, step size or phi, in which case the last finite iterate
is returned.  When several of the ordinary conditions hold at the same
iteration the reason reported is, in order of precedence, ``residual``,
``relative_progress``, ``max_iterations``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["CGResult", "cg", "backtrack", "save_schedule"]


@dataclass
class CGResult:
    """Outcome of :func:`cg`.

    ``iterations`` is the index of the returned iterate, i.e. the number of
    accepted CG steps; ``phi`` therefore has ``iterations + 1`` entries.  A
    direction rejected for non-positive or non-finite curvature still cost a
    matrix-vector product, which ``matvecs`` includes but ``iterations`` does
    not.
    """

    x: Tensor
    saved: list[tuple[int, Tensor]]
    iterations: int
    stop_reason: str
    phi: list[float]
    matvecs: int


def save_schedule(max_iterations: int) -> list[int]:
    """Iterations ceil(5 * 1.3**j), j = 0, 1, ..., up to ``max_iterations``, without repeats.

    Computed in exact rational arithmetic so that no value is pushed across an
    integer by rounding error.
    """
    schedule: list[int] = []
    growth = Fraction(13, 10)
    value = Fraction(5)
    while True:
        i = math.ceil(value)
        if i > max_iterations:
            return schedule
        if not schedule or schedule[-1] != i:
            schedule.append(i)
        value *= growth


def _window(i: int, min_k: int, k_fraction: float) -> int:
    return max(min_k, math.ceil(round(k_fraction * i, 9)))


def cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Optional[Tensor] = None,
    *,
    precond: Optional[Tensor] = None,
    max_iterations: int = 250,
    eps: float = 5e-4,
    min_k: int = 10,
    k_fraction: float = 0.1,
    residual_tol: float = 0.0,
) -> CGResult:
    """Minimise 0.5 x^T A x - b^T x by truncated preconditioned CG (see module docstring).

    ``matvec(v)`` returns ``A v``; its output is detached, since CG is not
    meant to be differentiated through and keeping autograd history across
    hundreds of iterations would exhaust memory.  ``precond`` is the positive
    diagonal ``M`` of the preconditioner (the preconditioned residual is
    ``r / M``).  ``x0`` warm-starts the solve at the cost of one matrix-vector
    product; ``None`` starts from zero.  All work stays on ``b``'s device and
    dtype.  If the start point itself gives a non-finite phi, ``x0`` is
    returned with ``stop_reason == "non_finite"`` and no iterations.
    """
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D tensor, got shape {tuple(b.shape)}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if min_k < 1:
        raise ValueError(f"min_k must be >= 1, got {min_k}")
    if not k_fraction >= 0:
        raise ValueError(f"k_fraction must be >= 0, got {k_fraction}")
    if not residual_tol >= 0:
        raise ValueError(f"residual_tol must be >= 0, got {residual_tol}")
    if precond is not None:
        if precond.shape != b.shape:
            raise ValueError(
                f"precond must have the shape of b {tuple(b.shape)}, got {tuple(precond.shape)}"
            )
        if not bool((precond > 0).all()):
            raise ValueError("precond must be strictly positive")
        precond = precond.detach().to(device=b.device, dtype=b.dtype)

    b = b.detach()
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
        x = x0.detach().to(device=b.device, dtype=b.dtype).clone()
        r = b - matvec(x).detach()
        matvecs += 1

    phi_start, rnorm = torch.stack(
        [-0.5 * torch.dot(x, b + r), torch.linalg.vector_norm(r)]
    ).tolist()
    phi = [phi_start]
    saved: list[tuple[int, Tensor]] = []
    schedule = set(save_schedule(max_iterations))

    def finish(reason: str) -> CGResult:
        if not saved or saved[-1][0] != len(phi) - 1:
            saved.append((len(phi) - 1, x))
        return CGResult(x, saved, len(phi) - 1, reason, phi, matvecs)

    if not math.isfinite(phi_start):
        return finish("non_finite")
    if rnorm <= residual_tol:
        return finish("residual")

    z = r if precond is None else r / precond
    p = z
    rz = torch.dot(r, z)
    for i in range(1, max_iterations + 1):
        Ap = matvec(p).detach()
        matvecs += 1
        curvature = torch.dot(p, Ap)
        alpha = rz / curvature
        x_next = x + alpha * p
        r_next = r - alpha * Ap
        phi_next = -0.5 * torch.dot(x_next, b + r_next)
        # One host synchronisation per iteration carries every scalar the
        # stopping decisions need.
        curvature_v, alpha_v, phi_v, rnorm = torch.stack(
            [curvature, alpha, phi_next, torch.linalg.vector_norm(r_next)]
        ).tolist()
        if not math.isfinite(curvature_v):
            return finish("non_finite")
        if curvature_v <= 0:
            return finish("negative_curvature")
        if not (math.isfinite(alpha_v) and math.isfinite(phi_v)):
            return finish("non_finite")

        x, r = x_next, r_next
        phi.append(phi_v)
        if i in schedule:
            saved.append((i, x))

        if rnorm <= residual_tol:
            return finish("residual")
        k = _window(i, min_k, k_fraction)
        if i > k and phi_v < 0 and (phi_v - phi[i - k]) / phi_v < k * eps:
            return finish("relative_progress")

        z = r if precond is None else r / precond
        rz_next = torch.dot(r, z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    return finish("max_iterations")


def backtrack(
    saved: list[tuple[int, Tensor]],
    objective: Callable[[Tensor], float],
    last_value: Optional[float] = None,
) -> tuple[int, Tensor, float, int]:
    """Martens' CG backtracking over the iterates saved by :func:`cg`.

    Evaluates ``objective`` on the last saved iterate, then walks back through
    earlier ones while the objective keeps strictly decreasing, stopping at
    the first iterate that is not better.  This finds the best saved iterate
    when the objective along the saved sequence is unimodal, as Martens (2010)
    assumed; otherwise it finds a local best nearest the end and avoids
    evaluating every iterate.  Non-finite objective values count as +inf.
    ``last_value``, if given, is the objective at the last saved iterate,
    already known to the caller, and is not evaluated again.

    Returns ``(index into saved, iterate, objective value, evaluations)``.
    """
    if not saved:
        raise ValueError("saved must contain at least one iterate")

    def evaluate(x: Tensor) -> float:
        value = float(objective(x))
        return value if math.isfinite(value) else math.inf

    best_index = len(saved) - 1
    if last_value is None:
        best_value, evaluations = evaluate(saved[best_index][1]), 1
    else:
        best_value, evaluations = (last_value if math.isfinite(last_value) else math.inf), 0
    for index in range(len(saved) - 2, -1, -1):
        value = evaluate(saved[index][1])
        evaluations += 1
        if not value < best_value:
            break
        best_index, best_value = index, value
    return best_index, saved[best_index][1], best_value, evaluations
