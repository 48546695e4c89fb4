"""Curvature spectra: extreme eigenvalues, the trace and the spectral density.

Every function takes an hfopt operator (:class:`~hfopt.GGN`,
:class:`~hfopt.Hessian`, :class:`~hfopt.DatasetOperator`, or any
:class:`~hfopt.curvature.FlatOperator`) and works on its flat vectors, in the
dtype and on the device of the model's parameters; only products with the
operator are used.

* :func:`eigenvalues`: Lanczos with full reorthogonalisation, stopped by the
  Ritz residuals (or SciPy's ARPACK ``eigsh`` on ``op.to_scipy()``).
* :func:`trace`: Hutchinson's estimator with Rademacher probes, or Hutch++
  (Meyer, Musco, Musco and Woodruff, 2021), each with its standard error.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani, Krishnan
  and Xiao, 2019; Yao et al., 2020), and :func:`plot_density`.

Why Lanczos in torch by default: on c3d3_bn / resnet20_bn (CIFAR-10 batch
128, float32) it needs fewer products than ``eigsh`` for the same tolerance,
because it stops as soon as the wanted Ritz pairs have small residuals while
ARPACK works on a basis of ``ncv >= 2k+1`` (at least 20) vectors before its
first convergence test, and it skips the float32 <-> float64 NumPy round trip
of every product.  ``benchmarks/bench_spectrum.py`` measures both
(``hfopt-eigsh`` rows).  Full reorthogonalisation costs ``O(m n)`` per step
for ``m`` steps, negligible next to a curvature product at these sizes, and
rules out the spurious copies of converged eigenvalues that plain Lanczos
produces.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .curvature import FlatOperator, Vector

WHICH = ("largest", "smallest", "magnitude")
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
# Bars appear only for calls that run longer than this (tqdm's ``delay``).
PROGRESS_DELAY_S = 2.0


# ----------------------------------------------------------------------------- checks
def _check_operator(op) -> None:
    if not isinstance(op, FlatOperator):
        raise TypeError(f"hfopt: op must be an hfopt operator (GGN, Hessian, DatasetOperator), got "
                        f"{type(op).__name__}")


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"hfopt: {name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"hfopt: {name} must be {bound}, got {value}")
    return value


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"hfopt: tol must be a float in (0, 1), got {tol!r}")
    return float(tol)


def _generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    # A private generator: spectra never draw from (or advance) torch's global RNG,
    # so measuring during training leaves the training run's random stream alone.
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic, from the generator itself
    else:
        gen.manual_seed(int(seed))
    return gen


def _probe_like(op: FlatOperator) -> Tuple[torch.dtype, torch.device]:
    p = op.params[0]
    return p.dtype, p.device


def _rademacher(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randint(0, 2, (n,), generator=gen, device=device).to(dtype).mul_(2).sub_(1)


# ----------------------------------------------------------------------------- Lanczos
class _Krylov:
    """An orthonormal Krylov basis grown by Lanczos steps, with full
    reorthogonalisation (classical Gram-Schmidt, applied twice: "twice is
    enough" for orthogonality to working precision)."""

    def __init__(self, op: FlatOperator, start: Tensor, capacity: int, gen: torch.Generator):
        self.op, self.gen, self.n = op, gen, start.numel()
        self.capacity = capacity
        self.basis = start.new_empty((min(capacity, 16), self.n))
        self.m = 0
        self.alphas: List[float] = []
        self.betas: List[float] = []   # betas[j] couples vectors j and j+1
        self.products = 0
        self.scale = 0.0               # largest |alpha|, |beta| seen: the operator's norm, roughly
        self._append(start / start.norm())

    def _append(self, q: Tensor) -> None:
        if self.m == self.basis.shape[0]:
            grown = self.basis.new_empty((min(2 * self.m, self.capacity), self.n))
            grown[:self.m] = self.basis
            self.basis = grown
        self.basis[self.m] = q
        self.m += 1

    def _orthogonalise(self, w: Tensor) -> Tensor:
        Q = self.basis[:self.m]
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        return w

    def step(self) -> bool:
        """One Lanczos step; False once the basis is full (``capacity`` vectors, or the whole space)."""
        j = self.m - 1
        q = self.basis[j]
        w = self.op.matvec_flat(q)
        self.products += 1
        alpha = float(torch.dot(q, w))
        self.alphas.append(alpha)
        w = self._orthogonalise(w)
        beta = float(w.norm())
        self.scale = max(self.scale, abs(alpha), beta)
        if self.m == self.n or self.m == self.capacity:
            self.betas.append(beta)
            return False
        # Breakdown: the Krylov space is invariant; its Ritz values are exact.
        # Carry on from a fresh random direction orthogonal to it (the new block
        # of T is decoupled, beta = 0), so that eigenvalues the start vector
        # missed (repeated ones, or ones it was orthogonal to) can still be found.
        # (A reorthogonalised w is at rounding level, ~sqrt(m) eps ||B||, once the space is exhausted.)
        if beta <= 10 * math.sqrt(self.m) * torch.finfo(w.dtype).eps * max(self.scale, 1e-300):
            w = self._orthogonalise(torch.randn(self.n, generator=self.gen, dtype=w.dtype, device=w.device))
            self.betas.append(0.0)
            self._append(w / w.norm())
        else:
            self.betas.append(beta)
            self._append(w / beta)
        return True

    def ritz(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), the eigenvectors of T, and each pair's residual
        norm ``||B y - theta y|| = |beta_m s_m|``."""
        k = len(self.alphas)
        T = np.diag(self.alphas)
        off = np.asarray(self.betas[:k - 1])
        T[np.arange(k - 1), np.arange(1, k)] = off
        T[np.arange(1, k), np.arange(k - 1)] = off
        theta, S = np.linalg.eigh(T)
        last = self.betas[k - 1] if len(self.betas) >= k else 0.0
        return theta, S, np.abs(last * S[-1, :])


def _select(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    if which == "largest":
        order = np.argsort(-theta, kind="stable")
    elif which == "smallest":
        order = np.argsort(theta, kind="stable")
    else:
        order = np.argsort(-np.abs(theta), kind="stable")
    return order[:k]


@dataclass
class EigenResult:
    """What :func:`eigenvalues` returns.

    ``eigenvalues[i]`` (float64) pairs with ``eigenvectors[i]``, a list of
    tensors shaped like the trainable parameters (unit norm over all of them).
    ``residuals[i] = ||B y_i - theta_i y_i||``: by the Krylov-Weinstein bound an
    eigenvalue of ``B`` lies within it of ``theta_i``.  ``iterations`` is the
    number of Lanczos steps (ARPACK: operator applications), ``products`` the
    operator products used, ``seconds`` the wall time.
    """

    eigenvalues: Tensor
    eigenvectors: List[Vector] = field(repr=False)
    residuals: Tensor
    iterations: int
    products: int
    converged: bool
    tol: float
    which: str
    method: str
    seconds: float

    def flat_eigenvectors(self) -> Tensor:
        """The eigenvectors as rows of a ``(k, numel)`` tensor."""
        return torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in self.eigenvectors])


def eigenvalues(op: FlatOperator, k: int = 1, which: str = "largest", *, tol: float = 1e-3,
                max_iter: Optional[int] = None, method: str = "lanczos", seed: Optional[int] = 0,
                progress: bool = True) -> EigenResult:
    """The ``k`` largest, smallest or largest-magnitude eigenvalues of ``op`` and their eigenvectors.

    Args:
        op: an hfopt operator (symmetric).
        k: how many eigenpairs, ``1 <= k <= op.numel`` (``< op.numel`` for ``method="eigsh"``).
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative tolerance.  Lanczos stops once every wanted pair has
            ``||B y - theta y|| <= tol * max(|theta|, 1e-3 * |theta|_max)``, so
            some eigenvalue of ``B`` lies within ``tol * |theta|`` of each
            returned ``theta`` (eigenvalues nearer zero than a thousandth of the
            largest one get that thousandth as their scale).  The eigenvalue
            error is usually far smaller, about ``residual**2 / gap``.
            ``method="eigsh"`` passes ``tol`` to ARPACK (its relative accuracy).
        max_iter: Lanczos steps allowed (default ``min(numel, max(300, 10 k))``);
            the basis holds ``max_iter`` vectors of ``numel`` elements.
            ARPACK: its ``maxiter`` (restarts).
        method: ``"lanczos"`` (torch, default) or ``"eigsh"`` (SciPy ARPACK on
            ``op.to_scipy()``, float64 NumPy vectors).
        seed: seed of the start vector, drawn from a private generator (torch's
            global RNG is neither used nor advanced); None: a fresh random seed.
        progress: show a tqdm bar for runs longer than 2 seconds.

    Returns:
        :class:`EigenResult`; eigenvalues ordered as ``which`` ranks them
        (largest first, smallest first, largest magnitude first).  If the
        tolerance is not reached within ``max_iter`` steps, ``converged`` is
        False and a ``RuntimeWarning`` says by how much it was missed.

    A single-vector Krylov method sees one copy of an exactly repeated
    eigenvalue until its space is exhausted: if the wanted end of the spectrum
    has exact multiplicities (the null space of a GGN, say), smaller copies
    may be skipped.
    """
    _check_operator(op)
    n = op.numel
    if which not in WHICH:
        raise ValueError(f"hfopt: which must be one of {WHICH}, got {which!r}")
    if method not in ("lanczos", "eigsh"):
        raise ValueError(f"hfopt: method must be 'lanczos' or 'eigsh', got {method!r}")
    k = _check_int("k", k, 1, n if method == "lanczos" else n - 1)
    tol = _check_tol(tol)
    if max_iter is None:
        max_iter = min(n, max(300, 10 * k))
    max_iter = _check_int("max_iter", max_iter, k)
    start = time.perf_counter()
    if method == "eigsh":
        return _eigsh(op, k, which, tol, max_iter, seed, progress, start)
    max_iter = min(max_iter, n)
    dtype, device = _probe_like(op)
    gen = _generator(seed, device)
    kry = _Krylov(op, torch.randn(n, generator=gen, dtype=dtype, device=device), max_iter, gen)
    bar = tqdm(total=max_iter, desc=f"Lanczos ({which} {k})", unit="step", delay=PROGRESS_DELAY_S,
               disable=not progress, leave=False)
    worst = math.inf
    try:
        while True:
            more = kry.step()
            bar.update(1)
            theta, S, res = kry.ritz()
            if len(theta) >= k:
                sel = _select(theta, which, k)
                scale = np.maximum(np.abs(theta[sel]), 1e-3 * np.abs(theta).max())
                worst = float((res[sel] / np.maximum(scale, 1e-300)).max())
                bar.set_postfix(rel_residual=f"{worst:.1e}", refresh=False)
                if worst <= tol or not more:
                    break
            elif not more:
                break
    finally:
        bar.close()
    converged = worst <= tol
    if not converged:
        warnings.warn(f"hfopt.eigenvalues: {k} {which} eigenpair(s) not converged in {kry.m} Lanczos steps "
                      f"(max_iter={max_iter}): worst relative residual {worst:.2e} > tol={tol:g}",
                      RuntimeWarning, stacklevel=2)
    vectors = torch.from_numpy(S[:, sel].T.copy()).to(dtype=dtype, device=device) @ kry.basis[:len(theta)]
    return EigenResult(
        eigenvalues=torch.from_numpy(theta[sel].copy()), eigenvectors=[op.unflatten(v) for v in vectors],
        residuals=torch.from_numpy(res[sel].copy()), iterations=len(kry.alphas), products=kry.products,
        converged=converged, tol=tol, which=which, method="lanczos", seconds=time.perf_counter() - start)


def _eigsh(op: FlatOperator, k: int, which: str, tol: float, max_iter: int, seed: Optional[int],
           progress: bool, start: float) -> EigenResult:
    from scipy.sparse.linalg import LinearOperator, eigsh

    inner = op.to_scipy()
    bar = tqdm(desc=f"eigsh ({which} {k})", unit="product", delay=PROGRESS_DELAY_S, disable=not progress,
               leave=False)
    count = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1
        bar.update(1)
        return inner.matvec(x)

    A = LinearOperator(inner.shape, matvec=mv, rmatvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(0 if seed is None else seed).standard_normal(inner.shape[0])
    arpack = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}[which]
    try:
        vals, vecs = eigsh(A, k=k, which=arpack, tol=tol, maxiter=max_iter, v0=v0)
    finally:
        bar.close()
    order = _select(vals, which, k)
    vals, vecs = vals[order], vecs[:, order]
    dtype, device = _probe_like(op)
    flat_vecs = torch.from_numpy(vecs.T.copy())
    residuals = torch.tensor([float(np.linalg.norm(inner.matvec(vecs[:, i]) - vals[i] * vecs[:, i]))
                              for i in range(k)])
    return EigenResult(
        eigenvalues=torch.from_numpy(vals.copy()),
        eigenvectors=[op.unflatten(v.to(dtype=dtype, device=device)) for v in flat_vecs],
        residuals=residuals, iterations=count[0], products=count[0] + k, converged=True, tol=tol,
        which=which, method="eigsh", seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------- trace
@dataclass
class TraceResult:
    """What :func:`trace` returns: the estimate of ``tr(B)``, its standard error
    (0 when exact), the products used, and per-probe values ``v^T B v`` of the
    Hutchinson part (of the deflated operator, for Hutch++)."""

    estimate: float
    stderr: float
    products: int
    method: str
    exact: bool
    samples: Tensor = field(repr=False)
    seconds: float = 0.0


TRACE_METHODS = ("hutch++", "hutchinson")


def trace(op: FlatOperator, samples: int = 100, *, method: str = "hutchinson", seed: Optional[int] = 0,
          progress: bool = True) -> TraceResult:
    """Estimate ``tr(op)`` from ``samples`` products.

    Args:
        op: an hfopt operator.
        samples: products to spend (Hutch++: at least 3).  With
            ``samples >= op.numel`` the trace is computed exactly from the
            ``numel`` unit vectors (``stderr`` 0, ``exact`` True).
        method: ``"hutchinson"`` (default): the mean of ``v^T B v`` over
            Rademacher ``v``.  ``"hutch++"``: a third of the products sketch the
            dominant range ``Q`` of ``B`` (``Q = qr(B S)``, Rademacher ``S``), a
            third take ``tr(Q^T B Q)`` exactly, the rest run Hutchinson on
            ``(I - QQ^T) B (I - QQ^T)``.  It wins when a few eigenvalues carry
            most of the trace; on c3d3_bn's eval-mode Hessian (CIFAR-10 batch
            128, 100 products) they do not, and its standard error was 1.5x
            Hutchinson's (``benchmarks/bench_spectrum.py``), hence the default.
        seed: seed of the probes (a private generator).
        progress: tqdm bar for runs longer than 2 seconds.

    ``stderr`` is the standard error of the mean of the Hutchinson part
    (sample standard deviation / sqrt(count)); for Hutch++ it is conditional
    on the sketch, whose part is exact given ``Q``.  It is NaN when the
    Hutchinson part has a single probe.
    """
    _check_operator(op)
    if method not in TRACE_METHODS:
        raise ValueError(f"hfopt: method must be one of {TRACE_METHODS}, got {method!r}")
    samples = _check_int("samples", samples, 3 if method == "hutch++" else 1)
    start = time.perf_counter()
    n = op.numel
    dtype, device = _probe_like(op)
    bar = tqdm(total=min(samples, n), desc=f"trace ({method})", unit="product", delay=PROGRESS_DELAY_S,
               disable=not progress, leave=False)

    def apply(v: Tensor) -> Tensor:
        bar.update(1)
        return op.matvec_flat(v)

    try:
        if samples >= n:
            values = torch.stack([apply(e)[i] for i, e in enumerate(torch.eye(n, dtype=dtype, device=device))])
            return TraceResult(float(values.double().sum()), 0.0, n, method, True, values.double(),
                               time.perf_counter() - start)
        gen = _generator(seed, device)
        low = 0.0
        if method == "hutch++":
            sketch = samples // 3
            Y = torch.stack([apply(_rademacher(n, gen, dtype, device)) for _ in range(sketch)], dim=1)
            Q = torch.linalg.qr(Y).Q
            low = float(sum(torch.dot(q, apply(q)) for q in Q.T))
            rest = samples - 2 * sketch
        else:
            Q, rest = None, samples
        values = []
        for _ in range(rest):
            g = _rademacher(n, gen, dtype, device)
            if Q is not None:
                g = g - Q @ (Q.T @ g)
            values.append(torch.dot(g, apply(g)))
    finally:
        bar.close()
    vals = torch.stack(values).double()
    stderr = float(vals.std() / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
    return TraceResult(low + float(vals.mean()), stderr, samples, method, False, vals, time.perf_counter() - start)


# ----------------------------------------------------------------------------- density
@dataclass
class SpectralDensity:
    """What :func:`spectral_density` returns.

    ``grid`` and ``density`` (float64 NumPy arrays): the smoothed density of
    eigenvalues, a Gaussian of width ``sigma`` at each quadrature node, scaled
    so that the trapezoidal integral over ``grid`` is 1.  ``nodes[p]`` and
    ``weights[p]`` are probe ``p``'s Gauss quadrature (Ritz values of its
    Lanczos run and the squared first components of T's eigenvectors; each
    probe's weights sum to 1).
    """

    grid: np.ndarray = field(repr=False)
    density: np.ndarray = field(repr=False)
    nodes: List[np.ndarray] = field(repr=False)
    weights: List[np.ndarray] = field(repr=False)
    sigma: float
    probes: int
    steps: int
    products: int
    seconds: float

    def moment(self, p: int) -> float:
        """Quadrature estimate of ``(1/n) tr(B^p)``, the mean of ``lambda^p`` over
        the eigenvalues (exact per probe for ``p <= 2 steps - 1``, up to rounding)."""
        return float(np.mean(self.probe_moments(p)))

    def probe_moments(self, p: int) -> np.ndarray:
        """Each probe's estimate ``v^T B^p v / v^T v`` of the ``p``-th moment."""
        return np.array([np.sum(w * t ** p) for t, w in zip(self.nodes, self.weights)])


def spectral_density(op: FlatOperator, probes: int = 1, steps: int = 100, *, points: int = 1000,
                     sigma: Optional[float] = None, seed: Optional[int] = 0,
                     progress: bool = True) -> SpectralDensity:
    """Stochastic Lanczos quadrature: the eigenvalue density of ``op``.

    Args:
        op: an hfopt operator.
        probes: independent Rademacher start vectors (averaged).
        steps: Lanczos steps per probe (capped at ``op.numel``); each takes one product.
        points: grid points.
        sigma: width of the Gaussian at each node; default 1% of the range of
            the nodes (from the smallest to the largest Ritz value).
        seed: seed of the probes (a private generator).
        progress: tqdm bar for runs longer than 2 seconds.

    The grid spans the nodes plus 6 sigma on either side.  Defaults follow
    PyHessian's ``density()`` (one probe, 100 steps); several probes reduce the
    variance of the weights, more steps resolve the edges.
    """
    _check_operator(op)
    probes = _check_int("probes", probes, 1)
    steps = _check_int("steps", steps, 1)
    points = _check_int("points", points, 2)
    if sigma is not None and not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0):
        raise ValueError(f"hfopt: sigma must be a positive float or None, got {sigma!r}")
    start = time.perf_counter()
    n = op.numel
    steps = min(steps, n)
    dtype, device = _probe_like(op)
    gen = _generator(seed, device)
    nodes, weights, products = [], [], 0
    bar = tqdm(total=probes * steps, desc="spectral density", unit="step", delay=PROGRESS_DELAY_S,
               disable=not progress, leave=False)
    try:
        for _ in range(probes):
            kry = _Krylov(op, _rademacher(n, gen, dtype, device), steps, gen)
            for _ in range(steps):
                more = kry.step()
                bar.update(1)
                if not more:
                    break
            # Gauss quadrature of the probe's spectral measure: nodes theta, weights
            # the squared first components; breakdown restarts (beta = 0) leave
            # blocks the probe has no weight on, which the first components drop.
            theta, S, _ = kry.ritz()
            nodes.append(theta)
            weights.append(S[0, :] ** 2)
            products += kry.products
    finally:
        bar.close()
    lo = min(t.min() for t in nodes)
    hi = max(t.max() for t in nodes)
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-2
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, points)
    density = np.zeros_like(grid)
    for t, w in zip(nodes, weights):
        density += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2)).sum(axis=1)
    density /= _trapezoid(density, grid)
    return SpectralDensity(grid, density, nodes, weights, float(sigma), probes, steps, products,
                           time.perf_counter() - start)


def plot_density(result: SpectralDensity, ax=None, *, path: Optional[str] = None, title: Optional[str] = None,
                 floor: float = 1e-8, label: Optional[str] = None):
    """Log-density plot of a :class:`SpectralDensity` (needs matplotlib).

    Draws on ``ax`` (a new figure if None), clips the density below
    ``floor`` times its maximum (the Gaussian tails underflow), saves to
    ``path`` if given, and returns the axes.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("hfopt.plot_density needs matplotlib: pip install matplotlib") from err
    if not isinstance(result, SpectralDensity):
        raise TypeError(f"hfopt: result must be a SpectralDensity, got {type(result).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    low = floor * result.density.max()
    ax.semilogy(result.grid, np.maximum(result.density, low), label=label)
    ax.set_ylim(bottom=low)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    if title:
        ax.set_title(title)
    if label:
        ax.legend()
    ax.grid(True, which="major", alpha=0.3)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=150)
    return ax


__all__ = ["EigenResult", "SpectralDensity", "TraceResult", "eigenvalues", "plot_density", "spectral_density",
           "trace"]
