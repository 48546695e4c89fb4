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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
            # The kernels call their helpers by name: jit them here, so that a kernel
            # finds them however it is built (by _kernels(), or by triton.jit directly).
            globals().update({fn.__name__: triton.jit(fn) for fn in _DEVICE_FNS})
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


def _check_shapes(ts: List[Tensor]) -> List[Tensor]:
    """``ts``, checked to share one shape ``[N, C, *]``."""
    shape = ts[0].shape
    if len(shape) < 2:
        raise ValueError(f"expected tensors of shape [N, C, ...], got {tuple(shape)}")
    for t in ts:
        if t.shape != shape:
            raise ValueError(f"all tensors must have the same shape, got {tuple(shape)} and {tuple(t.shape)}")
    return ts


def _check_pairs(pairs) -> List[Tensor]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("channel_sums needs at least one pair")
    return _check_shapes([t for p in pairs for t in p if t is not None])


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
    return _check_shapes([t for t, _ in terms])


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
# Plain functions, decorated lazily: the kernels by _kernels(), and the device
# helpers (marked @_device) by _import_triton(), which rebinds each helper's name
# in this module to its jit'd version (with triton.jit, or for the interpreter):
# a kernel can only call jit'd functions, and Triton looks them up in this
# module's globals when it compiles or interprets the kernel.  ``tl`` is this
# module's global too, set by _import_triton().
# Tile: [BN] samples, cs [BC] channels, [BM] positions; element (n, c, j) of the
# contiguous [N, C, M] tensor is at (n * C + c) * M + j.
_DEVICE_FNS: List[Callable] = []


def _device(fn):
    """Marks ``fn`` as a helper the kernels call (jit'd in place by _import_triton())."""
    _DEVICE_FNS.append(fn)
    return fn


@_device
def _load(PTR, offs, mask, ACC: tl.constexpr):
    return tl.load(PTR + offs, mask=mask, other=0.0).to(ACC)


@_device
def _load_channels(PTR, cs, cmask, ACC: tl.constexpr):
    # A per-channel vector, shaped [1, BC, 1] to broadcast over a tile.
    return _load(PTR, cs, cmask, ACC)[None, :, None]


@_device
def _channel_sum(x):
    # [BN, BC, BM] -> [BC]: the sum over samples and positions.
    return tl.sum(tl.sum(x, axis=2), axis=0)


@_device
def _tile(nb, jb, cs, cmask, N, C, M, BN: tl.constexpr, BM: tl.constexpr):
    # Offsets and mask of the tile (sample block nb, channels cs, position block jb).
    n = nb * BN + tl.arange(0, BN)
    j = jb * BM + tl.arange(0, BM)
    row = n.to(tl.int64)[:, None, None] * C + cs[None, :, None]
    offs = row * M + j[None, None, :]
    mask = (n < N)[:, None, None] & cmask[None, :, None] & (j < M)[None, None, :]
    return offs, mask


@_device
def _reduction_tile(it, JB, cs, cmask, N, C, M, BN: tl.constexpr, BM: tl.constexpr):
    # Iteration it of a reduction program: its sample and position blocks, offsets and mask.
    nb = it // JB
    jb = it - nb * JB
    offs, mask = _tile(nb, jb, cs, cmask, N, C, M, BN, BM)
    return nb, jb, offs, mask


@_device
def _elementwise_tile(N, C, M, JB, CB, BN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr):
    # This program's tile of an elementwise pass: channels, channel mask, offsets and mask.
    pid = tl.program_id(0)
    jb = pid % JB
    rest = pid // JB
    cb = rest % CB
    nb = rest // CB
    cs = cb * BC + tl.arange(0, BC)
    cmask = cs < C
    offs, mask = _tile(nb, jb, cs, cmask, N, C, M, BN, BM)
    return cs, cmask, offs, mask


@_device
def _accumulate(acc, vs, A: tl.constexpr, B: tl.constexpr, USED: tl.constexpr):
    # acc + vs[A] (times vs[B] when B >= 0) for a pair in use; an unused pair's
    # accumulator is left alone (USED is constexpr: no code for it).
    if USED:
        p = vs[A]
        if B >= 0:
            p = p * vs[B]
        acc += p
    return acc


@_device
def _affine_term(T, K, offs, mask, cs, cmask, ACC: tl.constexpr):
    # K[c] * T on one tile.
    k = _load_channels(K, cs, cmask, ACC)
    return _load(T, offs, mask, ACC) * k


@_device
def _store_channel_sum(PTR, acc, cmask, USED: tl.constexpr):
    if USED:
        tl.store(PTR, _channel_sum(acc), mask=cmask)


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
    cs = pid_c * BC + tl.arange(0, BC)
    cmask = cs < C
    zero = tl.zeros([BN, BC, BM], ACC)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = zero, zero, zero, zero, zero, zero, zero, zero
    for i in range(0, PER_PROG):
        # n >= N also masks the iterations past ITERS of the last program.
        _, _, offs, mask = _reduction_tile(pid_s * PER_PROG + i, JB, cs, cmask, N, C, M, BN, BM)
        # Only the NT distinct tensors are read; v0 stands in for the others, which no pair picks.
        v0 = _load(T0, offs, mask, ACC)
        v1 = _load(T1, offs, mask, ACC) if NT > 1 else v0
        v2 = _load(T2, offs, mask, ACC) if NT > 2 else v0
        v3 = _load(T3, offs, mask, ACC) if NT > 3 else v0
        vs = (v0, v1, v2, v3)
        acc0 = _accumulate(acc0, vs, A0, B0, NP > 0)
        acc1 = _accumulate(acc1, vs, A1, B1, NP > 1)
        acc2 = _accumulate(acc2, vs, A2, B2, NP > 2)
        acc3 = _accumulate(acc3, vs, A3, B3, NP > 3)
        acc4 = _accumulate(acc4, vs, A4, B4, NP > 4)
        acc5 = _accumulate(acc5, vs, A5, B5, NP > 5)
        acc6 = _accumulate(acc6, vs, A6, B6, NP > 6)
        acc7 = _accumulate(acc7, vs, A7, B7, NP > 7)
    # Partial sums of this program: OUT[pid_s, k, c].
    base = OUT + pid_s * NP * C + cs
    _store_channel_sum(base, acc0, cmask, NP > 0)
    _store_channel_sum(base + C, acc1, cmask, NP > 1)
    _store_channel_sum(base + 2 * C, acc2, cmask, NP > 2)
    _store_channel_sum(base + 3 * C, acc3, cmask, NP > 3)
    _store_channel_sum(base + 4 * C, acc4, cmask, NP > 4)
    _store_channel_sum(base + 5 * C, acc5, cmask, NP > 5)
    _store_channel_sum(base + 6 * C, acc6, cmask, NP > 6)
    _store_channel_sum(base + 7 * C, acc7, cmask, NP > 7)


def _moments_kernel(X, OUT, N, C, M, JB, ITERS, PER_PROG,
                    BN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr):
    # Per channel: count, mean and sum of squared deviations of this program's
    # share of x.  Each tile's own mean and squared deviations (exact two-pass in
    # registers) are merged into the running ones by Chan's formula.
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cs = pid_c * BC + tl.arange(0, BC)
    cmask = cs < C
    # Statistics of x - x[0, c, 0]: the shift keeps every rounding at the scale of
    # the spread of the data, not of its mean.
    shift = _load(X, cs.to(tl.int64) * M, cmask, ACC)
    cnt = tl.zeros([BC], ACC)
    mean = tl.zeros([BC], ACC)
    m2 = tl.zeros([BC], ACC)
    for i in range(0, PER_PROG):
        nb, jb, offs, mask = _reduction_tile(pid_s * PER_PROG + i, JB, cs, cmask, N, C, M, BN, BM)
        x = tl.where(mask, _load(X, offs, mask, ACC) - shift[None, :, None], 0.0)
        nval = tl.maximum(tl.minimum(N - nb * BN, BN), 0)
        jval = tl.minimum(M - jb * BM, BM)
        tcnt = (nval * jval).to(ACC)
        tmean = _channel_sum(x) / tl.maximum(tcnt, 1.0)
        d = tl.where(mask, x - tmean[None, :, None], 0.0)
        tm2 = _channel_sum(d * d)
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
    cs, cmask, offs, mask = _elementwise_tile(N, C, M, JB, CB, BN, BC, BM)
    out = _affine_term(T0, K0, offs, mask, cs, cmask, ACC)
    if NT > 1:
        out += _affine_term(T1, K1, offs, mask, cs, cmask, ACC)
    if NT > 2:
        out += _affine_term(T2, K2, offs, mask, cs, cmask, ACC)
    if NT > 3:
        out += _affine_term(T3, K3, offs, mask, cs, cmask, ACC)
    if HAS_CONST:
        out += _load_channels(CONST, cs, cmask, ACC)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _normalize_kernel(X, MEAN, INVSTD, W, B, XH, Y, N, C, M, JB, CB,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      BN: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr):
    # XH = (X - MEAN[c]) * INVSTD[c];  Y = W[c] * XH + B[c] (when W or B is given).
    cs, cmask, offs, mask = _elementwise_tile(N, C, M, JB, CB, BN, BC, BM)
    mu = _load_channels(MEAN, cs, cmask, ACC)
    s = _load_channels(INVSTD, cs, cmask, ACC)
    xh = (_load(X, offs, mask, ACC) - mu) * s
    tl.store(XH + offs, xh.to(XH.dtype.element_ty), mask=mask)
    if HAS_W or HAS_B:
        y = xh
        if HAS_W:
            y = y * _load_channels(W, cs, cmask, ACC)
        if HAS_B:
            y = y + _load_channels(B, cs, cmask, ACC)
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
