"""hfopt.kernels: the per-channel BatchNorm kernels against their torch references.

* Always: ``import hfopt`` leaves triton alone, the dispatcher uses the torch
  reference on CPU, the references compute what they promise, and BatchNorm
  products composed from these functions equal ``BatchNormRule``'s in float64.
* With triton installed (no GPU needed): the Triton kernels run in Triton's
  interpreter on CPU tensors, in one subprocess started with
  ``TRITON_INTERPRET=1`` (Triton fixes interpreted vs compiled when it is
  imported, so that cannot happen in this process), against the references in
  float64 (rel 1e-12) and float32 (rel 1e-5); and every kernel compiles ahead of
  time for sm_90 (frontend, layouts, ptxas), which the interpreter does not check.
* With CUDA: the compiled kernels against the CPU references.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfopt import kernels as K
from hfopt.rules import BatchNormRule

ROOT = Path(__file__).resolve().parents[1]


def _has_triton() -> bool:
    try:  # without importing it: this process must stay free to import it compiled or not at all
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _has_triton()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (CPU torch ships without it)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOLS = {torch.float64: 1e-12, torch.float32: 1e-5}
EPS = 1e-5


# ============================================================================ helpers
def _rand(shape, dtype, seed, device="cpu", scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def _case_errors(fns, shape, dtype, seed=0, device="cpu", **kw):
    """Relative errors of ``fns`` (sums, affine, moments, normalize) against the
    float64 references on the same data."""
    sums, affine, moments, normalize = fns
    C = shape[1]
    x, g, d, h = (_rand(shape, dtype, seed + i, device, offset=0.5 * (i == 0)) for i in range(4))
    cs = [_rand((C,), dtype, seed + 10 + i, device) for i in range(6)]
    ref = [t.double().cpu() for t in (x, g, d, h)]
    rcs = [c.double().cpu() for c in cs]
    R = K  # references
    err = {}
    # 6 pairs over 4 distinct tensors (one launch), a square, and a single sum.
    pairs = lambda ts: [(ts[2], None), (ts[0], ts[2]), (ts[1], ts[2]), (ts[3], None), (ts[0], ts[3]), (ts[1], ts[1])]
    err["sums"] = _rel(sums(pairs((x, g, d, h)), **kw), R._reference_channel_sums(pairs(ref)))
    err["sums1"] = _rel(sums([(g, None)], **kw), R._reference_channel_sums([(ref[1], None)]))
    terms = lambda ts, c: [(ts[3], c[0]), (ts[2], c[1]), (ts[1], c[2]), (ts[0], c[3])]
    err["affine4"] = _rel(affine(terms((x, g, d, h), cs), cs[4], **kw),
                          R._reference_channel_affine(terms(ref, rcs), rcs[4]))
    err["affine1"] = _rel(affine([(d, cs[0])], None, **kw), R._reference_channel_affine([(ref[2], rcs[0])], None))
    mean, var = moments(x, **kw)
    m0, v0 = R._reference_channel_moments(ref[0])
    # The mean is judged at the scale of the data (its RMS per channel): it can be ~0.
    err["moments"] = max(((mean.double().cpu() - m0).abs() / (v0 + m0 * m0).sqrt()).max().item(), _rel(var, v0))
    inv = torch.rsqrt(v0 + EPS)
    xh, y = normalize(x, m0.to(device), inv.to(device), cs[0], cs[1], **kw)
    xh0, y0 = R._reference_channel_normalize(ref[0], m0, inv, rcs[0], rcs[1])
    err["normalize"] = max(_rel(xh, xh0), _rel(y, y0))
    return err


# --- BatchNorm products composed from the four functions (what the rule does with them)
def bn_products(fns, x, gamma, beta, g, dx, dgamma, dbeta, h, eps=EPS):
    """Train-mode BatchNorm: output, JVP, VJP (x, gamma, beta) and the fused
    ``J^T h + residual`` (x, gamma) from channel_* calls only."""
    sums, affine, moments, normalize = fns
    m = x.numel() // x.shape[1]
    mean, var = moments(x)
    inv = torch.rsqrt(var + eps)
    xh, y = normalize(x, mean, inv, gamma, beta)
    A = gamma * inv
    d, b = sums([(dx, None), (xh, dx)]) / m
    jvp = affine([(dx, A), (xh, dgamma - A * b)], dbeta - A * d)
    gsum, gxh = sums([(g, None), (xh, g)])
    gm, a = gsum / m, gxh / m
    vjp = affine([(g, A), (xh, -A * a)], -A * gm), gxh, gsum
    d, b, c, hm, ha = sums([(dx, None), (xh, dx), (g, dx), (h, None), (xh, h)]) / m
    k = A * inv
    P, Q = -k * a, -k * b + dgamma * inv
    R = k * (3 * a * b - c + gm * d) - dgamma * inv * a - A * ha
    S = k * (b * gm + a * d) - dgamma * inv * gm - A * hm
    rx = affine([(h, A), (dx, P), (g, Q), (xh, R)], S)
    rgamma = (c - gm * d - a * b) * (m * inv) + ha * m
    return y, jvp, vjp, (rx, rgamma, hm * m)


def _bn_data(shape, dtype, seed, device="cpu"):
    C = shape[1]
    x = _rand(shape, dtype, seed, device, scale=2.0, offset=0.5)
    g, dx, h = (_rand(shape, dtype, seed + i, device) for i in (1, 2, 3))
    gamma = 1 + 0.3 * _rand((C,), dtype, seed + 4, device)
    beta, dgamma, dbeta = (_rand((C,), dtype, seed + i, device) for i in (5, 6, 7))
    return x, gamma, beta, g, dx, dgamma, dbeta, h


def _bn_rule_errors(fns, shape, dtype, seed=0, device="cpu"):
    """bn_products(fns) against BatchNormRule (eager torch, float64 on CPU)."""
    data = _bn_data(shape, dtype, seed, device)
    x, gamma, beta, g, dx, dgamma, dbeta, h = [t.double().cpu() for t in data]
    rule = BatchNormRule(EPS, True)
    rule.setup([True], ("weight", "bias"))
    with torch.no_grad():
        y0 = rule.forward([x], {"weight": gamma, "bias": beta})
        jvp0 = rule.jvp([dx], {"weight": dgamma, "bias": dbeta})
        (gx0,), gp0 = rule.vjp(g, [True], ("weight", "bias"))
        (rx0,), rp0 = rule.hessian_vjp(h, g, [dx], {"weight": dgamma}, [True], ("weight", "bias"))
        y, jvp, (gx, gg, gb), (rx, rg, rb) = bn_products(fns, *data)
    return {"forward": _rel(y, y0), "jvp": _rel(jvp, jvp0),
            "vjp": max(_rel(gx, gx0), _rel(gg, gp0["weight"]), _rel(gb, gp0["bias"])),
            "hessian_vjp": max(_rel(rx, rx0), _rel(rg, rp0["weight"]), _rel(rb, rp0["bias"]))}


PUBLIC = (K.channel_sums, K.channel_affine, K.channel_moments, K.channel_normalize)
KERNELS = (K._kernel_channel_sums, K._kernel_channel_affine, K._kernel_channel_moments, K._kernel_channel_normalize)


# ============================================================================ no triton needed
def test_import_hfopt_does_not_import_triton():
    code = ("import sys, torch, hfopt, hfopt.kernels as K, hfopt.rules.batchnorm\n"
            "x = torch.randn(4, 3, 5)\n"
            "K.channel_sums([(x, None), (x, x)]); K.channel_affine([(x, torch.ones(3))], torch.zeros(3))\n"
            "K.channel_moments(x); K.channel_normalize(x, torch.zeros(3), torch.ones(3))\n"
            "assert not K.use_kernels(x)\n"
            "bad = sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.'))\n"
            "assert not bad, bad\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_cpu_dispatches_to_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel path taken for a CPU tensor")

    for name in ("_kernel_channel_sums", "_kernel_channel_affine", "_kernel_channel_moments",
                 "_kernel_channel_normalize"):
        monkeypatch.setattr(K, name, boom)
    x, g = _rand((4, 3, 5), torch.float64, 0), _rand((4, 3, 5), torch.float64, 1)
    c0, c1 = _rand((3,), torch.float64, 2), _rand((3,), torch.float64, 3)
    assert not K.use_kernels(x)
    assert torch.equal(K.channel_sums([(x, None), (x, g)]), K._reference_channel_sums([(x, None), (x, g)]))
    assert torch.equal(K.channel_affine([(x, c0), (g, c1)], c1), K._reference_channel_affine([(x, c0), (g, c1)], c1))
    for a, b in zip(K.channel_moments(x), K._reference_channel_moments(x)):
        assert torch.equal(a, b)
    for a, b in zip(K.channel_normalize(x, c0, c1, c0, c1), K._reference_channel_normalize(x, c0, c1, c0, c1)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 7), (3, 4, 5, 6)], ids=["NC", "NCL", "NCHW"])
def test_references(shape):
    """The references against the definitions, and bit for bit against the eager
    formulas BatchNormRule uses today."""
    x, g, d = (_rand(shape, torch.float64, i) for i in range(3))
    C = shape[1]
    c = [_rand((C,), torch.float64, 10 + i) for i in range(3)]
    dims = [0] + list(range(2, len(shape)))
    bs = (1, C) + (1,) * (len(shape) - 2)
    s = K._reference_channel_sums([(x, None), (x, g), (d, d)])
    assert s.shape == (3, C)
    assert torch.allclose(s, torch.stack([x.sum(dims), (x * g).sum(dims), (d * d).sum(dims)]), rtol=1e-14, atol=0)
    want = x * c[0].view(bs)
    want.addcmul_(g, c[1].view(bs))
    want.add_(c[2].view(bs))
    assert torch.equal(K._reference_channel_affine([(x, c[0]), (g, c[1])], c[2]), want)
    out = torch.empty_like(x)
    assert K._reference_channel_affine([(x, c[0]), (g, c[1])], c[2], out=out) is out and torch.equal(out, want)
    var, mean = torch.var_mean(x, dims, correction=0)
    m, v = K._reference_channel_moments(x)
    assert torch.equal(m, mean) and torch.equal(v, var)
    xh, y = K._reference_channel_normalize(x, mean, c[0], c[1], c[2])
    xh0 = (x - mean.view(bs)) * c[0].view(bs)
    assert torch.equal(xh, xh0) and torch.equal(y, torch.addcmul(c[2].view(bs), xh0, c[1].view(bs)))
    xh, y = K._reference_channel_normalize(x, mean, c[0])
    assert y is xh
    # float32 inputs accumulate in float32, float64 anywhere makes float64
    assert K._reference_channel_sums([(x.float(), None)]).dtype == torch.float32
    assert K._reference_channel_sums([(x.float(), g)]).dtype == torch.float64
    assert K._reference_channel_sums([(x.half(), None)]).dtype == torch.float32


def test_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError):
        K.channel_sums([])
    with pytest.raises(ValueError):
        K.channel_sums([(x, torch.randn(4, 4))])
    with pytest.raises(ValueError):
        K.channel_affine([(x, torch.ones(4))], None)
    with pytest.raises(ValueError):
        K.channel_moments(torch.randn(5))


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 7), (3, 4, 3, 2)], ids=["NC", "NCL", "NCHW"])
def test_bn_products_from_reference_match_rule(shape):
    """The composition the BatchNorm rule makes of these functions (dispatching to
    the references on CPU) reproduces its products in float64."""
    for kind, e in _bn_rule_errors(PUBLIC, shape, torch.float64, seed=3).items():
        assert e < 1e-13, (kind, e)


# ============================================================================ triton interpreter
# (id, shape, dtype, tile): tile=None is the default tile; small tiles force several
# channel blocks, several position blocks per row, and sample blocks.
INTERP_CASES = [
    ("NC-f64", (6, 5), "float64", None),
    ("NC-f32", (6, 5), "float32", None),
    ("NCL-f64", (4, 3, 7), "float64", None),
    ("NCL-f32", (4, 3, 7), "float32", None),
    ("NCHW-f64", (3, 4, 5, 6), "float64", None),
    ("NCHW-f32", (3, 4, 5, 6), "float32", None),
    ("NCL-odd-tile16-f64", (2, 3, 37), "float64", 16),
    ("NCHW-tile8-f32", (3, 2, 3, 3), "float32", 8),
    ("NC-wide-f64", (3, 1100), "float64", None),
    ("NC-4096-f32", (2, 4096), "float32", None),
]
KINDS = ["sums", "sums1", "affine4", "affine1", "moments", "normalize"]
BN_CASES = [("bn-NCHW-f64", (4, 3, 5, 5)), ("bn-NC-f64", (7, 6))]


def _interp_worker() -> dict:
    """Runs in the TRITON_INTERPRET=1 subprocess; returns {case: {kind: error}}."""
    out = {}
    for cid, shape, dtype, tile in INTERP_CASES:
        kw = {} if tile is None else {"tile": tile}
        fns = (K._kernel_channel_sums, lambda t, c, **k: K._kernel_channel_affine(t, c, **k),
               K._kernel_channel_moments, K._kernel_channel_normalize)
        out[cid] = _case_errors(fns, shape, getattr(torch, dtype), seed=len(out), **kw)
    for cid, shape in BN_CASES:
        out[cid] = _bn_rule_errors(KERNELS, shape, torch.float64, seed=5)
    # one pass in float32 over data with a large mean: no E[x^2] - E[x]^2 cancellation
    x = _rand((16, 3, 50), torch.float32, 7, offset=1e4)
    mean, var = K._kernel_channel_moments(x, tile=64)
    m0, v0 = K._reference_channel_moments(x.double())
    out["moments-offset-f32"] = {"var": ((var.double() - v0).abs() / v0).max().item(),
                                 "mean": ((mean.double() - m0).abs() / v0.sqrt()).max().item()}
    # half precision in, float32 sums out
    xh, gh = _rand((4, 3, 7), torch.float16, 8), _rand((4, 3, 7), torch.float16, 9)
    s = K._kernel_channel_sums([(xh, None), (xh, gh)])
    out["sums-f16"] = {"sums": _rel(s, K._reference_channel_sums([(xh.double(), None), (xh.double(), gh.double())])),
                       "dtype_ok": float(s.dtype == torch.float32)}
    o = K._kernel_channel_affine([(xh, torch.ones(3)), (gh, torch.full((3,), 2.0))], torch.ones(3))
    out["sums-f16"]["affine"] = _rel(o, xh.double() + 2 * gh.double() + 1)
    out["sums-f16"]["affine_dtype_ok"] = float(o.dtype == torch.float16)
    # more than MAX_TENSORS distinct tensors / MAX_PAIRS pairs: split into launches
    ts = [_rand((3, 2, 5), torch.float64, 20 + i) for i in range(6)]
    pairs = [(ts[i], ts[(i + 1) % 6]) for i in range(6)] + [(t, None) for t in ts]
    e = _rel(K._kernel_channel_sums(pairs), K._reference_channel_sums(pairs))
    terms = [(t, _rand((2,), torch.float64, 40 + i)) for i, t in enumerate(ts)]
    e2 = _rel(K._kernel_channel_affine(terms, ts[0][0, :, 0]), K._reference_channel_affine(terms, ts[0][0, :, 0]))
    dst = torch.empty_like(ts[0])
    e3 = _rel(K._kernel_channel_affine(terms[:2], None, out=dst), K._reference_channel_affine(terms[:2], None))
    out["split"] = {"sums": e, "affine": e2, "affine_out": e3}
    # deterministic: the same bits twice
    p = [(ts[0], ts[1]), (ts[2], None)]
    out["deterministic"] = {"same": float(torch.equal(K._kernel_channel_sums(p), K._kernel_channel_sums(p)))}
    return out


@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpret-worker"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("cid,shape,dtype,tile", INTERP_CASES, ids=[c[0] for c in INTERP_CASES])
def test_interpreted_kernels(interp_results, cid, shape, dtype, tile):
    tol = TOLS[getattr(torch, dtype)]
    errs = interp_results[cid]
    assert set(errs) == set(KINDS)
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, bad


@needs_triton
@pytest.mark.parametrize("cid", [c[0] for c in BN_CASES])
def test_interpreted_bn_products_match_rule(interp_results, cid):
    bad = {k: e for k, e in interp_results[cid].items() if not e < 1e-12}
    assert not bad, bad


@needs_triton
def test_interpreted_extras(interp_results):
    r = interp_results
    assert r["moments-offset-f32"]["var"] < 1e-5 and r["moments-offset-f32"]["mean"] < 1e-3, r["moments-offset-f32"]
    assert r["sums-f16"]["dtype_ok"] == 1.0 and r["sums-f16"]["affine_dtype_ok"] == 1.0
    assert r["sums-f16"]["sums"] < 1e-6 and r["sums-f16"]["affine"] < 1e-3, r["sums-f16"]
    assert all(e < 1e-12 for e in r["split"].values()), r["split"]
    assert r["deterministic"]["same"] == 1.0


# ============================================================================ ahead-of-time compile
@needs_triton
def test_kernels_compile_for_sm90():
    """Compile each kernel (float32 and float64, a row tile and a channel tile) for
    sm_90 without a GPU: Triton's frontend, layouts, LLVM and ptxas all run."""
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--compile-worker"], cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} |
                       {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
                       capture_output=True, text=True, timeout=600)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode == 0 and last.startswith("SKIP"):
        pytest.skip(last)
    assert r.returncode == 0 and last == "OK", r.stdout[-2000:] + r.stderr[-4000:]


def _compile_worker() -> str:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        K._import_triton()
        tl = triton.language
        target = GPUTarget("cuda", 90, 32)
    except Exception as exc:  # an older/newer Triton without this API, or no NVIDIA backend
        return f"SKIP no ahead-of-time compile API: {exc!r}"

    def build(fn, sig, const, divisible):
        jf = triton.jit(fn)
        sig = dict(sig, **{k: "constexpr" for k in const})
        attrs = {(jf.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        try:
            src = ASTSource(jf, sig, const, attrs)
        except TypeError as exc:
            raise _Skip(repr(exc))
        return triton.compile(src, target=target, options={"num_warps": K.NUM_WARPS})

    try:
        for acc, pt in ((tl.float32, "*fp32"), (tl.float64, "*fp64")):
            for BN, BC, BM in ((1, 1, 1024), (2, 16, 32)):
                tile = dict(BN=BN, BC=BC, BM=BM, ACC=acc)
                ints = dict(N="i32", C="i32", M="i32", JB="i32")
                div = ["N", "C"] + (["M"] if BM > 1 else [])
                spec = {f"A{k}": 0 for k in range(8)} | {f"B{k}": -1 for k in range(8)}
                spec.update(A1=1, B1=0, A2=2, B2=0, A3=3, A4=1, B4=3)
                build(K._sums_kernel, {f"T{i}": pt for i in range(4)} | {"OUT": pt} | ints |
                      dict(ITERS="i32", PER_PROG="i32"), dict(NT=4, NP=5, **spec, **tile),
                      [f"T{i}" for i in range(4)] + ["OUT"] + div)
                build(K._moments_kernel, dict(X=pt, OUT=pt, **ints, ITERS="i32", PER_PROG="i32"), tile,
                      ["X", "OUT"] + div)
                build(K._affine_kernel, {f"T{i}": pt for i in range(4)} | {f"K{i}": pt for i in range(4)} |
                      dict(CONST=pt, OUT=pt, CB="i32") | ints, dict(NT=4, HAS_CONST=True, **tile),
                      [f"T{i}" for i in range(4)] + ["OUT"] + div)
                build(K._normalize_kernel, dict(X=pt, MEAN=pt, INVSTD=pt, W=pt, B=pt, XH=pt, Y=pt, CB="i32") | ints,
                      dict(HAS_W=True, HAS_B=True, **tile), ["X", "XH", "Y"] + div)
    except _Skip as exc:
        return f"SKIP ASTSource API differs: {exc}"
    return "OK"


class _Skip(Exception):
    pass


# ============================================================================ CUDA
CUDA_CASES = [((512, 4096), torch.float32), ((512, 4096), torch.float64), ((64, 64, 32, 32), torch.float32),
              ((64, 64, 32, 32), torch.float64), ((7, 3, 33, 17), torch.float32), ((7, 3, 33, 17), torch.float64),
              ((5, 6, 1000), torch.float32), ((256, 64, 32, 32), torch.float32)]


@needs_cuda
@pytest.mark.parametrize("shape,dtype", CUDA_CASES, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in CUDA_CASES])
def test_cuda_kernels_match_cpu_reference(shape, dtype):
    if not K.use_kernels(torch.empty(1, device="cuda")):
        pytest.skip("triton is not importable")
    errs = _case_errors(PUBLIC, shape, dtype, seed=1, device="cuda")
    bad = {k: e for k, e in errs.items() if not e < TOLS[dtype]}
    assert not bad, bad


@needs_cuda
@pytest.mark.parametrize("shape", [(16, 8, 9, 7), (33, 12)], ids=["NCHW", "NC"])
def test_cuda_bn_products_match_rule(shape):
    if not K.use_kernels(torch.empty(1, device="cuda")):
        pytest.skip("triton is not importable")
    bad = {k: e for k, e in _bn_rule_errors(PUBLIC, shape, torch.float64, seed=2, device="cuda").items()
           if not e < 1e-12}
    assert not bad, bad


@needs_cuda
def test_cuda_deterministic_and_grad_fallback():
    if not K.use_kernels(torch.empty(1, device="cuda")):
        pytest.skip("triton is not importable")
    x, g = _rand((32, 16, 9, 9), torch.float32, 0, "cuda"), _rand((32, 16, 9, 9), torch.float32, 1, "cuda")
    a, b = K.channel_sums([(x, g), (g, None)]), K.channel_sums([(x, g), (g, None)])
    assert torch.equal(a, b)
    # with autograd recording through an input, the differentiable reference is used
    xr = x.clone().requires_grad_(True)
    out = K.channel_affine([(xr, torch.ones(16, device="cuda"))], None)
    assert out.requires_grad


if __name__ == "__main__":
    if sys.argv[1:] == ["--interpret-worker"]:
        print(json.dumps(_interp_worker()))
    elif sys.argv[1:] == ["--compile-worker"]:
        print(_compile_worker())
    else:
        sys.exit(pytest.main([__file__, "-v"]))
