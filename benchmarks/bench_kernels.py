#!/usr/bin/env python
"""BatchNorm kernel benchmark: hfopt.kernels (Triton) against eager torch, on CUDA.

1. Device-to-device copy bandwidth: ``x.clone()`` of a large tensor (read + write), GB/s.
2. For a BatchNorm input ``[256, 64, 32, 32]`` float32 (train mode), every BatchNorm
   product of ``hfopt.rules.batchnorm`` two ways:

   * ``kernels``: composed from ``channel_moments``/``channel_normalize``/``channel_sums``/
     ``channel_affine`` (one reduction launch + one elementwise launch per product);
   * ``eager``: the same formulas in plain torch ops, as the rule writes them
     (``mean``, ``(t * u).mean``, ``mul``/``addcmul_``/``add_``).

   Products: ``forward`` (batch statistics, ``xh`` and ``y``), ``jvp`` (dx -> dy),
   ``vjp`` (g -> gx, ggamma, gbeta), ``residual`` (dx, dgamma -> rx, rgamma; the
   statistics of g are cached as in the rule) and ``hessian_vjp`` (the fused
   ``J^T h + residual``).

   "Ideal bytes" count each distinct input-shaped tensor read once and each output
   written once (per-channel vectors are negligible); the achieved bandwidth
   ``ideal bytes / time`` is printed as a % of the copy bandwidth.  Composed from a
   reduction and an elementwise pass, a product really reads its inputs twice, so
   about 50-70% is the ceiling of this design (100% would need one fused pass).

Times are medians of CUDA-event timings over ``--repeats`` runs after warm-up.
On a machine without CUDA (or without triton) it says so and exits 0.

Usage::

    python benchmarks/bench_kernels.py [--shape 256 64 32 32] [--dtype float32] [--repeats 50] [--check]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hfopt import kernels as K  # noqa: E402

EPS = 1e-5


# ----------------------------------------------------------------------------- products
class KernelBN:
    """Train-mode BatchNorm products from hfopt.kernels."""

    def __init__(self, x, gamma, beta):
        self.m = x.numel() // x.shape[1]
        self.gamma, self.beta = gamma, beta
        self.forward(x)

    def forward(self, x):
        mean, var = K.channel_moments(x)
        self.inv = torch.rsqrt(var + EPS)
        self.xh, y = K.channel_normalize(x, mean, self.inv, self.gamma, self.beta)
        self.A = self.gamma * self.inv
        return y

    def jvp(self, dx, dgamma, dbeta):
        d, b = K.channel_sums([(dx, None), (self.xh, dx)]) / self.m
        return K.channel_affine([(dx, self.A), (self.xh, dgamma - self.A * b)], dbeta - self.A * d)

    def g_stats(self, g):
        self.g = g
        gsum, gxh = K.channel_sums([(g, None), (self.xh, g)])
        self.gm, self.a = gsum / self.m, gxh / self.m

    def vjp(self, g):
        gsum, gxh = K.channel_sums([(g, None), (self.xh, g)])
        gm, a = gsum / self.m, gxh / self.m
        return K.channel_affine([(g, self.A), (self.xh, -self.A * a)], -self.A * gm), gxh, gsum

    def residual(self, dx, dgamma):
        d, b, c = K.channel_sums([(dx, None), (self.xh, dx), (self.g, dx)]) / self.m
        P, Q, R, S, rg = self._pqrs(d, b, c, dgamma)
        return K.channel_affine([(dx, P), (self.g, Q), (self.xh, R)], S), rg

    def hessian_vjp(self, h, dx, dgamma):
        d, b, c, hm, ha = K.channel_sums([(dx, None), (self.xh, dx), (self.g, dx), (h, None), (self.xh, h)]) / self.m
        P, Q, R, S, rg = self._pqrs(d, b, c, dgamma)
        R, S = R - self.A * ha, S - self.A * hm
        return K.channel_affine([(h, self.A), (dx, P), (self.g, Q), (self.xh, R)], S), rg + ha * self.m, hm * self.m

    def _pqrs(self, d, b, c, dgamma):
        gm, a, inv = self.gm, self.a, self.inv
        k = self.A * inv
        t = dgamma * inv
        P = -k * a
        Q = -k * b + t
        R = k * (3 * a * b - c + gm * d) - t * a
        S = k * (b * gm + a * d) - t * gm
        return P, Q, R, S, (c - gm * d - a * b) * (self.m * inv)


class EagerBN(KernelBN):
    """The same products in eager torch ops, written the way the rule writes them."""

    def _c(self, v):
        return v.view(self.bshape)

    def _mean(self, t):
        return t.mean(self.dims)

    def _dot_mean(self, t, u):
        return (t * u).mean(self.dims)

    def _affine(self, terms, const):
        (t0, c0), rest = terms[0], terms[1:]
        out = t0 * self._c(c0)
        for t, c in rest:
            out.addcmul_(t, self._c(c))
        if const is not None:
            out.add_(self._c(const))
        return out

    def forward(self, x):
        self.dims = [0] + list(range(2, x.dim()))
        self.bshape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        var, mean = torch.var_mean(x, self.dims, correction=0)
        self.inv = torch.rsqrt(var + EPS)
        self.xh = (x - self._c(mean)) * self._c(self.inv)
        self.A = self.gamma * self.inv
        return torch.addcmul(self._c(self.beta), self.xh, self._c(self.gamma))

    def jvp(self, dx, dgamma, dbeta):
        d, b = self._mean(dx), self._dot_mean(self.xh, dx)
        return self._affine([(dx, self.A), (self.xh, dgamma - self.A * b)], dbeta - self.A * d)

    def g_stats(self, g):
        self.g, self.gm, self.a = g, self._mean(g), self._dot_mean(self.xh, g)

    def vjp(self, g):
        gm, a = self._mean(g), self._dot_mean(self.xh, g)
        return self._affine([(g, self.A), (self.xh, -self.A * a)], -self.A * gm), a * self.m, gm * self.m

    def residual(self, dx, dgamma):
        d, b, c = self._mean(dx), self._dot_mean(self.xh, dx), self._dot_mean(self.g, dx)
        P, Q, R, S, rg = self._pqrs(d, b, c, dgamma)
        return self._affine([(dx, P), (self.g, Q), (self.xh, R)], S), rg

    def hessian_vjp(self, h, dx, dgamma):
        d, b, c = self._mean(dx), self._dot_mean(self.xh, dx), self._dot_mean(self.g, dx)
        hm, ha = self._mean(h), self._dot_mean(self.xh, h)
        P, Q, R, S, rg = self._pqrs(d, b, c, dgamma)
        R, S = R - self.A * ha, S - self.A * hm
        return self._affine([(h, self.A), (dx, P), (self.g, Q), (self.xh, R)], S), rg + ha * self.m, hm * self.m


# ----------------------------------------------------------------------------- timing
def timer(fn, repeats, cuda):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[256, 64, 32, 32])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth tensor")
    ap.add_argument("--check", action="store_true", help="compare kernel and eager results first")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # exercise the script on CPU
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("bench_kernels: CUDA is needed (the Triton kernels run on CUDA tensors only); nothing to do.")
        return 0
    device = "cuda" if cuda else "cpu"
    if cuda and not K.use_kernels(torch.empty(1, device=device)):
        print("bench_kernels: triton is not importable (or HFOPT_DISABLE_KERNELS is set); nothing to do.")
        return 0
    dtype = getattr(torch, args.dtype)
    shape = tuple(args.shape) if not args.cpu_smoke else (4, 3, 5, 5)
    repeats = args.repeats if not args.cpu_smoke else 2
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke run: reference path, meaningless times)"
    print(f"device: {name}; torch {torch.__version__}")

    # 1. copy bandwidth
    n_copy = (args.copy_mib if not args.cpu_smoke else 4) * 2**20 // 4
    buf = torch.empty(n_copy, dtype=torch.float32, device=device).uniform_()
    t_copy = timer(lambda: buf.clone(), repeats, cuda)
    bw_copy = 2 * buf.numel() * 4 / t_copy / 1e9
    print(f"copy bandwidth (clone of {buf.numel() * 4 / 2**20:.0f} MiB, read + write): {bw_copy:8.1f} GB/s")
    del buf

    # 2. BatchNorm products
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dtype)
    C = shape[1]
    x, g, dx, h = r(*shape) * 2 + 0.5, r(*shape), r(*shape), r(*shape)
    gamma, beta, dgamma, dbeta = 1 + 0.3 * r(C), r(C), r(C), r(C)
    if dtype in (torch.float16, torch.bfloat16):  # per-channel math in float32, as the kernels return it
        gamma, beta, dgamma, dbeta = (v.float() for v in (gamma, beta, dgamma, dbeta))
    kb, eb = KernelBN(x, gamma, beta), EagerBN(x, gamma, beta)
    kb.g_stats(g)
    eb.g_stats(g)
    T = x.numel() * x.element_size()

    products = {
        # name: (call, ideal bytes: tensors read + tensors written)
        "forward": (lambda bn: bn.forward(x), 3 * T),
        "jvp": (lambda bn: bn.jvp(dx, dgamma, dbeta), 3 * T),
        "vjp": (lambda bn: bn.vjp(g), 3 * T),
        "residual": (lambda bn: bn.residual(dx, dgamma), 4 * T),
        "hessian_vjp": (lambda bn: bn.hessian_vjp(h, dx, dgamma), 5 * T),
    }

    if args.check:
        print("check (kernels vs eager, relative error of each output):")
        for pname, (call, _) in products.items():
            a, b = call(kb), call(eb)
            a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
            print(f"  {pname:12s} " + "  ".join(f"{rel(u, v):.1e}" for u, v in zip(a, b)))

    print(f"\nBatchNorm {list(shape)} {args.dtype}, train mode; one tensor = {T / 2**20:.1f} MiB")
    print(f"{'product':12s} {'ideal MiB':>9s} | {'kernels ms':>10s} {'GB/s':>7s} {'% copy':>6s} | "
          f"{'eager ms':>9s} {'GB/s':>7s} {'% copy':>6s} | {'speed-up':>8s}")
    for pname, (call, nbytes) in products.items():
        tk = timer(lambda: call(kb), repeats, cuda)
        te = timer(lambda: call(eb), repeats, cuda)
        bk, be = nbytes / tk / 1e9, nbytes / te / 1e9
        print(f"{pname:12s} {nbytes / 2**20:9.0f} | {tk * 1e3:10.3f} {bk:7.1f} {100 * bk / bw_copy:5.1f}% | "
              f"{te * 1e3:9.3f} {be:7.1f} {100 * be / bw_copy:5.1f}% | {te / tk:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
