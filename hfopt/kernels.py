"""Fused per-channel kernels for the BatchNorm rule (Triton on CUDA, torch elsewhere).

Every BatchNorm product of :mod:`hfopt.rules.batchnorm` is a few per-channel
reductions over input-shaped tensors ``[N, C, *]`` followed by one elementwise
pass with per-channel coefficients.  This module provides exactly those pieces:

* :func:`channel_sums` ``(pairs) -> [K, C]``: for each pair ``(t, u)`` the
  per-channel sum of ``t`` (``u is None``) or of ``t * u``; all pairs in one
  kernel launch that reads each distinct tensor once.
* :func:`channel_affine` ``(terms, const) -> out``: ``out = sum_k coef_k[c] * t_k
  + const[c]`` in one pass (each ``t_k`` read once, ``out`` written once).
* :func:`channel_moments` ``(x) -> (mean, var)``: per-channel mean and biased
  variance in one pass over ``x``: statistics of ``x - x[0, c, 0]`` per tile
  (exact two-pass in registers), merged across tiles and programs with Chan's
  parallel formula, so no ``E[x^2] - E[x]^2`` cancellation.
* :func:`channel_normalize` ``(x, mean, invstd, weight, bias) -> (xh, y)``: the
  train/eval forward ``xh = (x - mean) * invstd``, ``y = weight * xh + bias``,
  reading ``x`` once and writing ``xh`` and ``y`` once.

Dispatch.  Each public function uses the Triton kernels when :func:`use_kernels`
says so (a CUDA tensor, and ``triton`` importable) and the pure-torch
``_reference_*`` implementation otherwise, so callers use them unconditionally.
The kernels are not differentiable: with autograd recording and an input that
requires grad, the reference is used.  ``HFOPT_DISABLE_KERNELS=1`` forces the
reference everywhere (debugging, benchmarks).

Triton is imported lazily, on the first kernel call for a CUDA tensor: CPU
builds of torch ship without it and ``import hfopt`` never imports it.  The
``_kernel_*`` functions (the kernel path without the dispatch) also run on CPU
tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` is in the
environment before triton is imported (Triton fixes interpreted vs compiled at
its import): that is how the tests check the kernels without a GPU.

Layout and numerics.  Tensors are viewed as contiguous ``[N, C, M]`` (``M = 1``
for ``[N, C]``; a non-contiguous input is made contiguous first).  A kernel
program owns a tile ``[BN, BC, BM]`` of (samples, channels, positions), powers of
two, masked on every tail.  Reductions accumulate in float64 when any input is
float64 and in float32 otherwise (float16/bfloat16/float32), and are
deterministic: each program writes partial sums to a ``[programs, K, C]``
buffer that one small torch sum reduces (no atomics).  Results of the
reductions are returned in that accumulation dtype; the elementwise passes
compute in it and store in the tensors' dtype.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["channel_sums", "channel_affine", "channel_moments", "channel_normalize", "use_kernels",
           "triton_available"]

# Filled in by _import_triton(); the kernel bodies below resolve ``tl`` here.
triton = None
tl = None
_TRITON_OK: Optional[bool] = None

MAX_TENSORS = 4   # distinct tensors one channel_sums launch reads
MAX_PAIRS = 8     # pairs one channel_sums launch reduces
MAX_TERMS = 4     # terms one channel_affine launch combines

TILE = 1024             # elements per program tile (BN * BC * BM)
NUM_WARPS = 4
PROGRAMS_PER_SM = 8     # reduction programs launched per SM (occupancy target)
INTERP_PROGRAMS = 16    # reduction programs in interpreter mode (several, to exercise the 2-stage sum)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ============================================================================ dispatch
def _import_triton() -> bool:
    global triton, tl, _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton as _triton
            import triton.language as _tl
        except Exception:  # ImportError, or a broken install
            _TRITON_OK = False
        else:
            triton, tl, _TRITON_OK = _triton, _tl, True
    return _TRITON_OK


def triton_available() -> bool:
    """Whether ``triton`` imports (imports it on the first call)."""
    return _import_triton()


def use_kernels(t: Tensor) -> bool:
    """True when ``t`` is a CUDA tensor and Triton imports."""
    if not t.is_cuda or os.environ.get("HFOPT_DISABLE_KERNELS", "0") not in ("", "0"):
        return False
    return _import_triton()


def _kernel_ok(tensors: Sequence[Tensor]) -> bool:
    t0 = tensors[0]
    if not use_kernels(t0) or t0.dim() < 2 or t0.numel() == 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device != t0.device or t.shape != t0.shape or t.dtype not in _FLOATS:
            return False
        if grad and t.requires_grad:
            return False
    return True


# ============================================================================ references
def _dims(t: Tensor) -> List[int]:
    return [0] + list(range(2, t.dim()))


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _bshape(t: Tensor) -> Tuple[int, ...]:
    return (1, t.shape[1]) + (1,) * (t.dim() - 2)


def _per_channel(c: Tensor, C: int, dtype: torch.dtype, device) -> Tensor:
    """A per-channel coefficient (``[C]``, or anything with one value) as a contiguous ``[C]``."""
    c = c.reshape(-1)
    if c.numel() == 1 and C != 1:
        c = c.expand(C)
    if c.numel() != C:
        raise ValueError(f"per-channel coefficient has {c.numel()} values, expected {C}")
    return c.to(device=device, dtype=dtype).contiguous()


def _check_pairs(pairs) -> List[Tensor]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("channel_sums needs at least one pair")
    ts = [t for p in pairs for t in p if t is not None]
    shape = ts[0].shape
    if len(shape) < 2:
        raise ValueError(f"expected tensors of shape [N, C, ...], got {tuple(shape)}")
    for t in ts:
        if t.shape != shape:
            raise ValueError(f"all tensors must have the same shape, got {tuple(shape)} and {tuple(t.shape)}")
    return ts


def _reference_channel_sums(pairs: Sequence[Tuple[Tensor, Optional[Tensor]]]) -> Tensor:
    ts = _check_pairs(pairs)
    acc = _acc_dtype(*(t.dtype for t in ts))
    dims = _dims(ts[0])
    rows = []
    for t, u in pairs:
        v = t if t.dtype == acc else t.to(acc)
        if u is not None:
            v = v * (u if u.dtype == acc else u.to(acc))
        rows.append(v.sum(dims))
    return torch.stack(rows)


def _check_terms(terms) -> List[Tensor]:
    terms = list(terms)
    if not terms:
        raise ValueError("channel_affine needs at least one term")
    ts = [t for t, _ in terms]
    shape = ts[0].shape
    if len(shape) < 2:
        raise ValueError(f"expected tensors of shape [N, C, ...], got {tuple(shape)}")
    for t in ts:
        if t.shape != shape:
            raise ValueError(f"all tensors must have the same shape, got {tuple(shape)} and {tuple(t.shape)}")
    return ts


def _out_dtype(ts: Sequence[Tensor]) -> torch.dtype:
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _reference_channel_affine(terms: Sequence[Tuple[Tensor, Tensor]], const: Optional[Tensor],
                              out: Optional[Tensor] = None) -> Tensor:
    """``t0 * c0`` then ``addcmul_`` per further term then ``add_(const)``: for
    same-dtype float32/float64 inputs this is bit for bit what the BatchNorm rule's
    eager ``_affine`` computes."""
    ts = _check_terms(terms)
    dtype = _out_dtype(ts)
    acc = dtype if dtype in (torch.float32, torch.float64) else _acc_dtype(dtype)
    t0 = ts[0]
    C, shape = t0.shape[1], _bshape(t0)

    def coef(c):
        return _per_channel(c, C, acc, t0.device).view(shape)

    def cast(t):
        return t if t.dtype == acc else t.to(acc)

    (t, c), rest = terms[0], terms[1:]
    res = cast(t) * coef(c)
    for t, c in rest:
        res.addcmul_(cast(t), coef(c))
    if const is not None:
        res.add_(coef(const))
    if out is None:
        return res if res.dtype == dtype else res.to(dtype)
    out.copy_(res)
    return out


def _reference_channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    if x.dim() < 2:
        raise ValueError(f"expected a tensor of shape [N, C, ...], got {tuple(x.shape)}")
    acc = _acc_dtype(x.dtype)
    var, mean = torch.var_mean(x if x.dtype == acc else x.to(acc), _dims(x), correction=0)
    return mean, var


def _reference_channel_normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor] = None,
                                 bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``xh = (x - mean) * invstd`` and ``y = weight * xh + bias`` as the BatchNorm rule's
    eager forward computes them (``y`` is ``xh`` itself without weight and bias)."""
    shape = _bshape(x)

    def c(v):
        return v.reshape(-1).view(shape) if v.numel() == x.shape[1] else v.reshape(-1).expand(x.shape[1]).view(shape)

    xh = (x - c(mean)) * c(invstd)
    if weight is None:
        return xh, (xh if bias is None else xh + c(bias))
    if bias is None:
        return xh, xh * c(weight)
    return xh, torch.addcmul(c(bias), xh, c(weight))


# ============================================================================ Triton kernels
# Plain functions, decorated lazily by _kernels() (with triton.jit, or for the
# interpreter); ``tl`` is this module's global, set by _import_triton().
# Tile: ns [BN] samples, cs [BC] channels, js [BM] positions; element
# (n, c, j) of the contiguous [N, C, M] tensor is at (n * C + c) * M + j.

def _sums_kernel(T0, T1, T2, T3, OUT, N, C, M, JB, ITERS, PER_PROG,
                 NT: tl.constexpr, NP: tl.constexpr,
                 A0: tl.constexpr, B0: tl.constexpr, A1: tl.constexpr, B1: tl.constexpr,
                 A2: tl.constexpr, B2: tl.constexpr, A3: tl.constexpr, B3: tl.constexpr,
                 A4: tl.constexpr, B4: tl.constexpr, A5: tl.constexpr, B5: tl.constexpr,
                 A6: tl.constexpr, B6: tl.constexpr, A7: tl.constexpr, B7: tl.constexpr,
                 BN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr):
    # Pair k sums T[Ak] (times T[Bk] when Bk >= 0) over the samples and positions
    # of this program's share of (sample-block, position-block) iterations.
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ns = tl.arange(0, BN)
    cs = pid_c * BC + tl.arange(0, BC)
    js = tl.arange(0, BM)
    cmask = cs < C
    zero = tl.zeros([BN, BC, BM], ACC)
    acc0 = zero
    acc1 = zero
    acc2 = zero
    acc3 = zero
    acc4 = zero
    acc5 = zero
    acc6 = zero
    acc7 = zero
    for i in range(0, PER_PROG):
        it = pid_s * PER_PROG + i
        nb = it // JB
        jb = it - nb * JB
        n = nb * BN + ns
        j = jb * BM + js
        row = n.to(tl.int64)[:, None, None] * C + cs[None, :, None]
        offs = row * M + j[None, None, :]
        # n >= N also masks the iterations past ITERS of the last program.
        mask = (n < N)[:, None, None] & cmask[None, :, None] & (j < M)[None, None, :]
        v0 = tl.load(T0 + offs, mask=mask, other=0.0).to(ACC)
        if NT > 1:
            v1 = tl.load(T1 + offs, mask=mask, other=0.0).to(ACC)
        if NT > 2:
            v2 = tl.load(T2 + offs, mask=mask, other=0.0).to(ACC)
        if NT > 3:
            v3 = tl.load(T3 + offs, mask=mask, other=0.0).to(ACC)
        # -- pair 0
        if A0 == 0:
            p = v0
        elif A0 == 1:
            p = v1
        elif A0 == 2:
            p = v2
        else:
            p = v3
        if B0 == 0:
            p = p * v0
        elif B0 == 1:
            p = p * v1
        elif B0 == 2:
            p = p * v2
        elif B0 == 3:
            p = p * v3
        acc0 += p
        # -- pair 1
        if NP > 1:
            if A1 == 0:
                p = v0
            elif A1 == 1:
                p = v1
            elif A1 == 2:
                p = v2
            else:
                p = v3
            if B1 == 0:
                p = p * v0
            elif B1 == 1:
                p = p * v1
            elif B1 == 2:
                p = p * v2
            elif B1 == 3:
                p = p * v3
            acc1 += p
        # -- pair 2
        if NP > 2:
            if A2 == 0:
                p = v0
            elif A2 == 1:
                p = v1
            elif A2 == 2:
                p = v2
            else:
                p = v3
            if B2 == 0:
                p = p * v0
            elif B2 == 1:
                p = p * v1
            elif B2 == 2:
                p = p * v2
            elif B2 == 3:
                p = p * v3
            acc2 += p
        # -- pair 3
        if NP > 3:
            if A3 == 0:
                p = v0
            elif A3 == 1:
                p = v1
            elif A3 == 2:
                p = v2
            else:
                p = v3
            if B3 == 0:
                p = p * v0
            elif B3 == 1:
                p = p * v1
            elif B3 == 2:
                p = p * v2
            elif B3 == 3:
                p = p * v3
            acc3 += p
        # -- pair 4
        if NP > 4:
            if A4 == 0:
                p = v0
            elif A4 == 1:
                p = v1
            elif A4 == 2:
                p = v2
            else:
                p = v3
            if B4 == 0:
                p = p * v0
            elif B4 == 1:
                p = p * v1
            elif B4 == 2:
                p = p * v2
            elif B4 == 3:
                p = p * v3
            acc4 += p
        # -- pair 5
        if NP > 5:
            if A5 == 0:
                p = v0
            elif A5 == 1:
                p = v1
            elif A5 == 2:
                p = v2
            else:
                p = v3
            if B5 == 0:
                p = p * v0
            elif B5 == 1:
                p = p * v1
            elif B5 == 2:
                p = p * v2
            elif B5 == 3:
                p = p * v3
            acc5 += p
        # -- pair 6
        if NP > 6:
            if A6 == 0:
                p = v0
            elif A6 == 1:
                p = v1
            elif A6 == 2:
                p = v2
            else:
                p = v3
            if B6 == 0:
                p = p * v0
            elif B6 == 1:
                p = p * v1
            elif B6 == 2:
                p = p * v2
            elif B6 == 3:
                p = p * v3
            acc6 += p
        # -- pair 7
        if NP > 7:
            if A7 == 0:
                p = v0
            elif A7 == 1:
                p = v1
            elif A7 == 2:
                p = v2
            else:
                p = v3
            if B7 == 0:
                p = p * v0
            elif B7 == 1:
                p = p * v1
            elif B7 == 2:
                p = p * v2
            elif B7 == 3:
                p = p * v3
            acc7 += p
    # Partial sums of this program: OUT[pid_s, k, c].
    base = OUT + pid_s * NP * C + cs
    tl.store(base, tl.sum(tl.sum(acc0, axis=2), axis=0), mask=cmask)
    if NP > 1:
        tl.store(base + C, tl.sum(tl.sum(acc1, axis=2), axis=0), mask=cmask)
    if NP > 2:
        tl.store(base + 2 * C, tl.sum(tl.sum(acc2, axis=2), axis=0), mask=cmask)
    if NP > 3:
        tl.store(base + 3 * C, tl.sum(tl.sum(acc3, axis=2), axis=0), mask=cmask)
    if NP > 4:
        tl.store(base + 4 * C, tl.sum(tl.sum(acc4, axis=2), axis=0), mask=cmask)
    if NP > 5:
        tl.store(base + 5 * C, tl.sum(tl.sum(acc5, axis=2), axis=0), mask=cmask)
    if NP > 6:
        tl.store(base + 6 * C, tl.sum(tl.sum(acc6, axis=2), axis=0), mask=cmask)
    if NP > 7:
        tl.store(base + 7 * C, tl.sum(tl.sum(acc7, axis=2), axis=0), mask=cmask)


def _moments_kernel(X, OUT, N, C, M, JB, ITERS, PER_PROG,
                    BN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr):
    # Per channel: count, mean and sum of squared deviations of this program's
    # share of x.  Each tile's own mean and squared deviations (exact two-pass in
    # registers) are merged into the running ones by Chan's formula.
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ns = tl.arange(0, BN)
    cs = pid_c * BC + tl.arange(0, BC)
    js = tl.arange(0, BM)
    cmask = cs < C
    # Statistics of x - x[0, c, 0]: the shift keeps every rounding at the scale of
    # the spread of the data, not of its mean.
    shift = tl.load(X + cs.to(tl.int64) * M, mask=cmask, other=0.0).to(ACC)
    cnt = tl.zeros([BC], ACC)
    mean = tl.zeros([BC], ACC)
    m2 = tl.zeros([BC], ACC)
    for i in range(0, PER_PROG):
        it = pid_s * PER_PROG + i
        nb = it // JB
        jb = it - nb * JB
        n = nb * BN + ns
        j = jb * BM + js
        row = n.to(tl.int64)[:, None, None] * C + cs[None, :, None]
        offs = row * M + j[None, None, :]
        mask = (n < N)[:, None, None] & cmask[None, :, None] & (j < M)[None, None, :]
        x = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(ACC) - shift[None, :, None], 0.0)
        nval = tl.maximum(tl.minimum(N - nb * BN, BN), 0)
        jval = tl.minimum(M - jb * BM, BM)
        tcnt = (nval * jval).to(ACC)
        tmean = tl.sum(tl.sum(x, axis=2), axis=0) / tl.maximum(tcnt, 1.0)
        d = tl.where(mask, x - tmean[None, :, None], 0.0)
        tm2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
        new = cnt + tcnt
        f = tcnt / tl.maximum(new, 1.0)
        delta = tmean - mean
        mean = mean + delta * f
        m2 = m2 + tm2 + delta * delta * cnt * f
        cnt = new
    base = OUT + pid_s * 3 * C + cs
    tl.store(base, cnt, mask=cmask)
    tl.store(base + C, mean, mask=cmask)
    tl.store(base + 2 * C, m2, mask=cmask)


def _affine_kernel(T0, T1, T2, T3, K0, K1, K2, K3, CONST, OUT, N, C, M, JB, CB,
                   NT: tl.constexpr, HAS_CONST: tl.constexpr,
                   BN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr):
    # OUT = sum_k K_k[c] * T_k + CONST[c] on one tile.
    pid = tl.program_id(0)
    jb = pid % JB
    rest = pid // JB
    cb = rest % CB
    nb = rest // CB
    n = nb * BN + tl.arange(0, BN)
    cs = cb * BC + tl.arange(0, BC)
    j = jb * BM + tl.arange(0, BM)
    cmask = cs < C
    row = n.to(tl.int64)[:, None, None] * C + cs[None, :, None]
    offs = row * M + j[None, None, :]
    mask = (n < N)[:, None, None] & cmask[None, :, None] & (j < M)[None, None, :]
    k = tl.load(K0 + cs, mask=cmask, other=0.0).to(ACC)
    out = tl.load(T0 + offs, mask=mask, other=0.0).to(ACC) * k[None, :, None]
    if NT > 1:
        k = tl.load(K1 + cs, mask=cmask, other=0.0).to(ACC)
        out += tl.load(T1 + offs, mask=mask, other=0.0).to(ACC) * k[None, :, None]
    if NT > 2:
        k = tl.load(K2 + cs, mask=cmask, other=0.0).to(ACC)
        out += tl.load(T2 + offs, mask=mask, other=0.0).to(ACC) * k[None, :, None]
    if NT > 3:
        k = tl.load(K3 + cs, mask=cmask, other=0.0).to(ACC)
        out += tl.load(T3 + offs, mask=mask, other=0.0).to(ACC) * k[None, :, None]
    if HAS_CONST:
        k = tl.load(CONST + cs, mask=cmask, other=0.0).to(ACC)
        out += k[None, :, None]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _normalize_kernel(X, MEAN, INVSTD, W, B, XH, Y, N, C, M, JB, CB,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      BN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr):
    # XH = (X - MEAN[c]) * INVSTD[c];  Y = W[c] * XH + B[c] (when W or B is given).
    pid = tl.program_id(0)
    jb = pid % JB
    rest = pid // JB
    cb = rest % CB
    nb = rest // CB
    n = nb * BN + tl.arange(0, BN)
    cs = cb * BC + tl.arange(0, BC)
    j = jb * BM + tl.arange(0, BM)
    cmask = cs < C
    row = n.to(tl.int64)[:, None, None] * C + cs[None, :, None]
    offs = row * M + j[None, None, :]
    mask = (n < N)[:, None, None] & cmask[None, :, None] & (j < M)[None, None, :]
    mu = tl.load(MEAN + cs, mask=cmask, other=0.0).to(ACC)
    s = tl.load(INVSTD + cs, mask=cmask, other=0.0).to(ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    xh = (x - mu[None, :, None]) * s[None, :, None]
    tl.store(XH + offs, xh.to(XH.dtype.element_ty), mask=mask)
    if HAS_W or HAS_B:
        y = xh
        if HAS_W:
            w = tl.load(W + cs, mask=cmask, other=0.0).to(ACC)
            y = y * w[None, :, None]
        if HAS_B:
            b = tl.load(B + cs, mask=cmask, other=0.0).to(ACC)
            y = y + b[None, :, None]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


_BUILT: Optional[SimpleNamespace] = None


def _interpret_on() -> bool:
    """Whether ``triton.jit`` builds interpreted functions.  Triton decides this when
    it is imported (its own library functions are jit'd then), so the interpreter
    needs ``TRITON_INTERPRET=1`` in the environment before triton is imported."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(t: Tensor) -> SimpleNamespace:
    """The jit'd kernels (built once), checked against the device of ``t``."""
    global _BUILT
    if not _import_triton():
        raise RuntimeError("hfopt.kernels: triton is not installed (CPU builds of torch ship without it)")
    if _BUILT is None:
        _BUILT = SimpleNamespace(sums=triton.jit(_sums_kernel), moments=triton.jit(_moments_kernel),
                                 affine=triton.jit(_affine_kernel), normalize=triton.jit(_normalize_kernel),
                                 interpret=_interpret_on())
    if not t.is_cuda and not _BUILT.interpret:
        raise RuntimeError("hfopt.kernels: Triton kernels on CPU tensors need the interpreter "
                           "(TRITON_INTERPRET=1 set before triton is imported)")
    return _BUILT


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _layout(t: Tensor) -> Tuple[int, int, int]:
    N, C = t.shape[0], t.shape[1]
    return N, C, t.numel() // max(1, N * C)


def _tiles(N: int, C: int, M: int, tile: int) -> Tuple[int, int, int]:
    BM = min(_np2(M), tile)
    BC = min(_np2(C), max(1, tile // BM))
    BN = min(_np2(N), max(1, tile // (BM * BC)))
    return BN, BC, BM


def _launch_opts(interpret: bool) -> dict:
    return {} if interpret else {"num_warps": NUM_WARPS}


_SMS: Dict[int, int] = {}


def _sm_count(device) -> int:
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _split(N: int, C: int, M: int, tile: int, programs: Optional[int], device, interpret: bool):
    """Tile sizes and the reduction grid: (channel blocks, programs along samples x positions)."""
    BN, BC, BM = _tiles(N, C, M, tile)
    JB = -(-M // BM)
    iters = -(-N // BN) * JB
    CB = -(-C // BC)
    if programs is None:
        programs = INTERP_PROGRAMS if interpret else _sm_count(device) * PROGRAMS_PER_SM
    S = max(1, min(iters, -(-programs // CB)))
    per = -(-iters // S)
    S = -(-iters // per)
    return BN, BC, BM, JB, iters, CB, S, per


def _contig(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _kernel_channel_sums(pairs: Sequence[Tuple[Tensor, Optional[Tensor]]], *, tile: int = TILE,
                         programs: Optional[int] = None) -> Tensor:
    pairs = list(pairs)
    ts = _check_pairs(pairs)
    if ts[0].numel() == 0:
        return _reference_channel_sums(pairs)
    acc = _acc_dtype(*(t.dtype for t in ts))
    # Group the pairs into launches of at most MAX_PAIRS pairs over MAX_TENSORS distinct tensors.
    groups, cur, cur_ts = [], [], []
    for t, u in pairs:
        ops = [t] if u is None or u is t else [t, u]
        new = [x for x in ops if not any(x is y for y in cur_ts)]
        if cur and (len(cur) == MAX_PAIRS or len(cur_ts) + len(new) > MAX_TENSORS):
            groups.append(cur)
            cur, cur_ts, new = [], [], ops
        cur.append((t, u))
        cur_ts.extend(new)
    groups.append(cur)
    if len(groups) > 1:
        return torch.cat([_kernel_channel_sums(g, tile=tile, programs=programs) for g in groups])

    t0 = ts[0]
    ks = _kernels(t0)
    interpret = ks.interpret
    distinct: List[Tensor] = []
    spec = []
    for t, u in pairs:
        idx = []
        for x in (t, u):
            if x is None:
                idx.append(-1)
                continue
            for i, y in enumerate(distinct):
                if x is y:
                    idx.append(i)
                    break
            else:
                distinct.append(x)
                idx.append(len(distinct) - 1)
        spec.append(tuple(idx))
    K = len(pairs)
    args = [_contig(t) for t in distinct]
    args += [args[0]] * (MAX_TENSORS - len(args))
    flat_spec = {}
    for k in range(MAX_PAIRS):
        a, b = spec[k] if k < K else (0, -1)
        flat_spec[f"A{k}"], flat_spec[f"B{k}"] = a, b
    N, C, M = _layout(t0)
    BN, BC, BM, JB, iters, CB, S, per = _split(N, C, M, tile, programs, t0.device, interpret)
    part = torch.empty((S, K, C), dtype=acc, device=t0.device)
    ks.sums[(CB, S)](*args, part, N, C, M, JB, iters, per, NT=len(distinct), NP=K, **flat_spec,
                     BN=BN, BC=BC, BM=BM, ACC=_tl_dtype(acc), **_launch_opts(interpret))
    return part[0] if S == 1 else part.sum(0)


def _kernel_channel_moments(x: Tensor, *, tile: int = TILE, programs: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    if x.dim() < 2:
        raise ValueError(f"expected a tensor of shape [N, C, ...], got {tuple(x.shape)}")
    if x.numel() == 0:
        return _reference_channel_moments(x)
    ks = _kernels(x)
    interpret = ks.interpret
    acc = _acc_dtype(x.dtype)
    N, C, M = _layout(x)
    BN, BC, BM, JB, iters, CB, S, per = _split(N, C, M, tile, programs, x.device, interpret)
    part = torch.empty((S, 3, C), dtype=acc, device=x.device)
    ks.moments[(CB, S)](_contig(x), part, N, C, M, JB, iters, per, BN=BN, BC=BC, BM=BM,
                        ACC=_tl_dtype(acc), **_launch_opts(interpret))
    shift = x.reshape(N, C, M)[0, :, 0].to(acc)  # the kernel's shift
    cnt, mean_s, m2_s = part[:, 0], part[:, 1], part[:, 2]
    if S == 1:
        return shift + mean_s[0], m2_s[0] / cnt[0]
    # Chan's merge of the programs' partial statistics.
    n = cnt.sum(0)
    mean = (cnt * mean_s).sum(0) / n
    m2 = m2_s.sum(0) + (cnt * (mean_s - mean).square()).sum(0)
    return shift + mean, m2 / n


def _elementwise_grid(N: int, C: int, M: int, tile: int):
    BN, BC, BM = _tiles(N, C, M, tile)
    JB, CB, NB = -(-M // BM), -(-C // BC), -(-N // BN)
    return BN, BC, BM, JB, CB, NB * CB * JB


def _kernel_channel_affine(terms: Sequence[Tuple[Tensor, Tensor]], const: Optional[Tensor],
                           out: Optional[Tensor] = None, *, tile: int = TILE) -> Tensor:
    terms = list(terms)
    ts = _check_terms(terms)
    t0 = ts[0]
    if t0.numel() == 0:
        return _reference_channel_affine(terms, const, out)
    dtype = _out_dtype(ts)
    acc = _acc_dtype(dtype)
    N, C, M = _layout(t0)
    if out is not None and (out.shape != t0.shape or not out.is_contiguous() or out.device != t0.device):
        out.copy_(_kernel_channel_affine(terms, const, tile=tile))
        return out
    if out is None:
        out = torch.empty(t0.shape, dtype=dtype, device=t0.device)
    if len(terms) > MAX_TERMS:
        # Later terms accumulate onto the partial result (one extra read/write of out).
        _kernel_channel_affine(terms[:MAX_TERMS], const, out, tile=tile)
        rest = terms[MAX_TERMS:]
        while rest:
            head, rest = rest[:MAX_TERMS - 1], rest[MAX_TERMS - 1:]
            _kernel_channel_affine([(out, torch.ones((), dtype=acc, device=t0.device))] + head, None, out, tile=tile)
        return out
    ks = _kernels(t0)
    interpret = ks.interpret
    tens = [_contig(t) for t in ts]
    coefs = [_per_channel(c, C, acc, t0.device) for _, c in terms]
    cst = _per_channel(const, C, acc, t0.device) if const is not None else coefs[0]
    tens += [tens[0]] * (MAX_TERMS - len(tens))
    coefs += [coefs[0]] * (MAX_TERMS - len(coefs))
    BN, BC, BM, JB, CB, grid = _elementwise_grid(N, C, M, tile)
    ks.affine[(grid,)](*tens, *coefs, cst, out, N, C, M, JB, CB, NT=len(terms), HAS_CONST=const is not None,
                       BN=BN, BC=BC, BM=BM, ACC=_tl_dtype(acc), **_launch_opts(interpret))
    return out


def _kernel_channel_normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor] = None,
                              bias: Optional[Tensor] = None, *, tile: int = TILE) -> Tuple[Tensor, Tensor]:
    if x.dim() < 2:
        raise ValueError(f"expected a tensor of shape [N, C, ...], got {tuple(x.shape)}")
    if x.numel() == 0:
        return _reference_channel_normalize(x, mean, invstd, weight, bias)
    ks = _kernels(x)
    interpret = ks.interpret
    acc = _acc_dtype(x.dtype)
    N, C, M = _layout(x)
    xc = _contig(x)
    mu, s = _per_channel(mean, C, acc, x.device), _per_channel(invstd, C, acc, x.device)
    w = _per_channel(weight, C, acc, x.device) if weight is not None else mu
    b = _per_channel(bias, C, acc, x.device) if bias is not None else mu
    xh = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    affine = weight is not None or bias is not None
    y = torch.empty_like(xh) if affine else xh
    BN, BC, BM, JB, CB, grid = _elementwise_grid(N, C, M, tile)
    ks.normalize[(grid,)](xc, mu, s, w, b, xh, y, N, C, M, JB, CB, HAS_W=weight is not None,
                          HAS_B=bias is not None, BN=BN, BC=BC, BM=BM, ACC=_tl_dtype(acc),
                          **_launch_opts(interpret))
    return xh, y


# ============================================================================ public API
def channel_sums(pairs: Sequence[Tuple[Tensor, Optional[Tensor]]]) -> Tensor:
    """``[len(pairs), C]``: row k is the per-channel sum of ``t_k`` (``u_k is None``)
    or of ``t_k * u_k``, over every dimension but 1.  All tensors share one shape
    ``[N, C, *]``.  Float64 if any tensor is float64, float32 otherwise."""
    pairs = list(pairs)
    ts = _check_pairs(pairs)
    if _kernel_ok(ts):
        return _kernel_channel_sums(pairs)
    return _reference_channel_sums(pairs)


def channel_affine(terms: Sequence[Tuple[Tensor, Tensor]], const: Optional[Tensor] = None,
                   out: Optional[Tensor] = None) -> Tensor:
    """``out = sum_k coef_k[c] * t_k + const[c]`` (coefficients ``[C]``); written into
    ``out`` when given.  The result has the tensors' (promoted) dtype."""
    terms = list(terms)
    ts = _check_terms(terms)
    vecs = [c for _, c in terms] + [v for v in (const, out) if v is not None]
    if _kernel_ok(ts) and not (torch.is_grad_enabled() and any(v.requires_grad for v in vecs)):
        return _kernel_channel_affine(terms, const, out)
    return _reference_channel_affine(terms, const, out)


def channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x`` ``[N, C, *]``, float64 for
    float64 input and float32 otherwise."""
    if x.dim() >= 2 and _kernel_ok([x]):
        return _kernel_channel_moments(x)
    return _reference_channel_moments(x)


def channel_normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(xh, y)`` with ``xh = (x - mean) * invstd`` and ``y = weight * xh + bias``
    (per-channel vectors; ``y is xh`` when neither weight nor bias is given)."""
    vecs = [v for v in (mean, invstd, weight, bias) if v is not None]
    if x.dim() >= 2 and _kernel_ok([x]) and not (torch.is_grad_enabled() and any(v.requires_grad for v in vecs)):
        return _kernel_channel_normalize(x, mean, invstd, weight, bias)
    return _reference_channel_normalize(x, mean, invstd, weight, bias)
