"""BatchNorm1d/2d/3d in closed form, train and eval mode.

Notation per channel (all sums over the ``m = N * spatial`` values of a channel):
``xh = (x - mean) * invstd``, ``y = gamma * xh + beta``, ``A = gamma * invstd``,
``<t> = mean(t)``.  In train mode the statistics are the batch's own, which
couples all samples of the batch; every product below is nonetheless a few
per-channel reductions followed by one elementwise pass ``p*t + q*u + r*xh + s``
with per-channel coefficients: no ``m x m`` object is ever formed.

* JVP        ``dy = A (dx - <dx> - xh <xh dx>) + dgamma xh + dbeta``
* VJP        ``gx = A (g - <g> - xh <xh g>)``, ``ggamma = sum(g xh)``, ``gbeta = sum(g)``
  (the input Jacobian is symmetric).
* Residual   with ``a = <xh g>``, ``gm = <g>``, ``d = <dx>``, ``b = <xh dx>``, ``c = <g dx>``:
  ``rx = gamma invstd^2 (-a (dx - d) - b (g - gm) - xh (c - gm d) + 3 a b xh)
  + dgamma invstd (g - gm - a xh)`` and ``rgamma = m invstd (c - gm d - a b)``.

The derivation from the Hessian entry of Fischer's note is in
``docs/batchnorm_curvature.md``; tests prove every product against
reverse-over-reverse autograd in float64.

In eval mode (or with ``track_running_stats=False`` in train mode the batch
statistics are used, as PyTorch does) the running statistics are constants, the
layer is affine in ``x`` and only the mixed gamma-input residual remains.
"""
from __future__ import annotations

import weakref
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..kernels import channel_affine, channel_moments, channel_normalize, channel_sums, use_kernels
from .base import Grads, Rule


class BatchNormRule(Rule):
    param_names = ("weight", "bias")

    def __init__(self, eps: float, batch_stats: bool,
                 running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None):
        self.eps = eps
        self.batch_stats = batch_stats
        self.running_mean = running_mean
        self.running_var = running_var

    @classmethod
    def from_module(cls, module: nn.modules.batchnorm._BatchNorm) -> "BatchNormRule":
        # PyTorch's own choice: batch statistics in training or without running stats.
        batch_stats = module.training or module.running_mean is None
        return cls(module.eps, batch_stats, module.running_mean, module.running_var)

    # -- helpers -----------------------------------------------------------------------
    def _c(self, coef: Tensor) -> Tensor:
        """Per-channel vector -> broadcastable against the input."""
        return coef.view(self.bshape)

    @property
    def A(self) -> Tensor:
        """``gamma * invstd`` per channel (recomputed: C multiplications)."""
        return self.invstd if self.gamma is None else self.gamma * self.invstd

    # Made per call, not cached: the operator's cache stays as small as autograd's.
    def _zeros(self) -> Tensor:
        return torch.zeros_like(self.invstd)

    def _ones(self) -> Tensor:
        return torch.ones_like(self.invstd)

    def _bn_backward(self, t: Tensor, u: Tensor, scale: Optional[Tensor], mask):
        """ATen's fused batch-norm backward kernel as a primitive: with zero mean
        and unit invstd it returns ``scale (t - <t> - u <u t>)``, ``sum(t u)`` and
        ``sum(t)`` in one pass over the data."""
        if scale is None and t.is_cuda:
            # CUDA's kernel without a weight raised "tensor does not have a
            # device" (torch 2.11, H200); a unit weight changes none of the outputs.
            scale = self._ones()
        return torch.ops.aten.native_batch_norm_backward(
            t, u, scale, None, None, self._zeros(), self._ones(), True, 0.0, mask)

    def _sums(self, t: Tensor, u: Tensor):
        """``<t u>`` and ``<t>`` per channel."""
        if self._kernels(t):
            tu, tt = channel_sums([(t, u), (t, None)]) / self.m
            return tu, tt
        _, tu, tt = self._bn_backward(t, u, None, (False, True, True))
        return tu / self.m, tt / self.m

    def _project(self, t: Tensor):
        """``A (t - <t> - xh <xh t>)`` (the train-mode input Jacobian, which is
        symmetric), with ``sum(xh t)`` and ``sum(t)``."""
        return self._bn_backward(t, self.xh, self.A, (True, True, True))

    def _affine(self, out: Optional[Tensor], terms, const: Optional[Tensor]) -> Tensor:
        """``out + sum coef_c * tensor + const_c``, accumulating in place."""
        if terms and self._kernels(terms[0][0]):  # one pass over all terms, in place into out
            return channel_affine(list(terms) if out is None else [(out, self._ones())] + list(terms), const, out=out)
        for t, c in terms:
            if out is None:
                out = t * self._c(c)
            else:
                out.addcmul_(t, self._c(c))
        if const is not None:
            out = self.invstd.new_zeros(()).expand(self.shape) + self._c(const) if out is None \
                else out.add_(self._c(const))
        return out

    def _kernels(self, t: Tensor) -> bool:
        """Whether the fused Triton kernels serve ``t`` (their reductions are local
        to this process: a cross-rank subclass turns them off)."""
        return use_kernels(t)

    # -- forward -------------------------------------------------------------------------
    def _normalize(self, x: Tensor, beta: Optional[Tensor]):
        """``xh`` (and ``y`` where one pass gives both, else None); sets ``invstd``."""
        if self._kernels(x):  # statistics, then xh and y in one pass over x
            mean, var = channel_moments(x) if self.batch_stats else (self.running_mean, self.running_var)
            self.invstd = torch.rsqrt(var + self.eps)
            return channel_normalize(x, mean, self.invstd, self.gamma, beta)
        if self.batch_stats:
            # var_mean's Welford reduction, not ATen's fused batch norm, whose
            # float32 channels-last statistics are far less accurate; a ResNet
            # amplifies that into every product (bench_mixed_precision.py
            # measures both).
            var, mean = torch.var_mean(x, self.dims, correction=0)
            self.invstd = torch.rsqrt(var + self.eps)
            return (x - self._c(mean)) * self._c(self.invstd), None
        self.invstd = torch.rsqrt(self.running_var + self.eps)
        return (x - self._c(self.running_mean)) * self._c(self.invstd), None

    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        x = inputs[0]
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects an input of shape [N, C, ...], got {tuple(x.shape)}")
        C = x.shape[1]
        self.dims = [0] + list(range(2, x.dim()))
        self.bshape = (1, C) + (1,) * (x.dim() - 2)
        self.m = x.numel() // C
        self.shape = x.shape
        if self.batch_stats and self.m == 1:
            # Same message PyTorch raises for a one-value channel.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        self.gamma = params.get("weight")
        beta = params.get("bias")
        xh, y = self._normalize(x, beta)
        self._dx = None
        # Eval mode needs xh only for gamma's products; train mode always.
        self.xh = xh if (self.batch_stats or "weight" in self.trainable) else None
        self._g = None
        if y is not None:
            return y
        if self.gamma is None:
            return xh if beta is None else xh + self._c(beta)
        if beta is None:
            return xh * self._c(self.gamma)
        return torch.addcmul(self._c(beta), xh, self._c(self.gamma))

    # -- first-order products ----------------------------------------------------------------
    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        dx, dg, db = din[0], dparams.get("weight"), dparams.get("bias")
        out = None
        if dx is not None:
            if self.batch_stats:
                out, sxd, sd = self._project(dx)
                # The Hessian's backward sweep needs <xh dx> and <dx> again; a weak
                # reference keeps the Gauss-Newton sweep free to drop dx.
                self._dx, self._dx_stats = weakref.ref(dx), (sxd / self.m, sd / self.m)
            else:
                out = dx * self._c(self.A)
        return self._affine(out, [(self.xh, dg)] if dg is not None else [], db)

    def _g_stats(self, g: Tensor):
        """<g> and <xh g>, cached: the Hessian reuses the same gradient ``g`` in
        every product of an operator."""
        if self._g is not g:
            ga, gm = self._sums(g, self.xh)
            self._g, self._gm, self._ga = g, gm, ga
        return self._gm, self._ga

    def _dx_sums(self, dx: Tensor):
        if self._dx is None or self._dx() is not dx:
            self._dx, self._dx_stats = weakref.ref(dx), self._sums(dx, self.xh)
        return self._dx_stats

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        gp = {}
        if self.batch_stats:
            gx, gsum_xh, gsum = self._bn_backward(g, self.xh, self.A, (bool(need_inputs[0]), True, True))
        else:
            gx = g * self._c(self.A) if need_inputs[0] else None
            gsum_xh, gsum = self._bn_backward(g, self.xh, None, (False, True, True))[1:] \
                if self.xh is not None else (None, g.sum(self.dims))
        if "weight" in need_params:
            gp["weight"] = gsum_xh
        if "bias" in need_params:
            gp["bias"] = gsum
        return [gx], gp

    # -- second order --------------------------------------------------------------------------
    def has_residual(self) -> bool:
        if self.batch_stats:
            return self.active[0]
        return self.active[0] and "weight" in self.trainable

    def _residual_terms(self, g, dx, dg):
        """Coefficients of ``rx = P dx + Q g + R xh + S`` and ``rgamma``."""
        inv = self.invstd
        if not self.batch_stats:
            Q = None if dg is None else dg * inv
            rgamma = None if dx is None else self._sums(g, dx)[0] * (self.m * inv)
            return None, Q, None, None, rgamma
        gm, a = self._g_stats(g)
        stats = None
        if dx is not None:
            b, d = self._dx_sums(dx)
            stats = (d, b, self._sums(g, dx)[0])
        return self.coefficients(gm, a, stats, dg)

    def coefficients(self, gm: Tensor, a: Tensor, stats, dg: Optional[Tensor]):
        """Train mode: ``P, Q, R, S, rgamma`` from the channel means ``gm = <g>``,
        ``a = <xh g>`` and ``stats = (<dx>, <xh dx>, <g dx>)`` (None: no ``dx``)."""
        inv = self.invstd
        k = self.A * inv  # gamma * invstd^2
        P = Q = R = S = rgamma = None
        if stats is not None:
            d, b, c = stats
            P = -k * a
            Q = -k * b
            R = k * (3 * a * b - c + gm * d)
            S = k * (b * gm + a * d)
            rgamma = (c - gm * d - a * b) * (self.m * inv)
        if dg is not None:
            t = dg * inv
            Q = _add(Q, t)
            R = _sub(R, t * a)
            S = _sub(S, t * gm)
        return P, Q, R, S, rgamma

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        return self.hessian_vjp(None, g, din, dparams, need_inputs, need_params)

    def hessian_vjp(self, h, g, din, dparams, need_inputs, need_params) -> Grads:
        dx, dg = din[0], dparams.get("weight")
        P, Q, R, S, rgamma = self._residual_terms(g, dx, dg)
        gp = {}
        out = None
        terms = []
        if h is not None and self.batch_stats and need_inputs[0] and self._kernels(h):
            # J^T h = A h + (-A <xh h>) xh - A <h>: folded into the residual's single pass.
            hsx, hs = channel_sums([(self.xh, h), (h, None)])
            gp = {k: v for k, v in (("weight", hsx), ("bias", hs)) if k in need_params}
            R, S = _sub(R, self.A * (hsx / self.m)), _sub(S, self.A * (hs / self.m))
            terms = [(h, self.A)]
        elif h is not None:
            # J^T h first, then the residual accumulates into the same buffer.
            (out,), gp = self.vjp(h, need_inputs, need_params)
        if "weight" in need_params and rgamma is not None:
            gp["weight"] = _add(gp.get("weight"), rgamma)
        if need_inputs[0]:
            terms += [(t, c) for t, c in ((dx, P), (g, Q), (self.xh, R)) if t is not None and c is not None]
            out = self._affine(out, terms, S)
        return [out], gp


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a + b)


def _sub(a: Optional[Tensor], b: Tensor) -> Tensor:
    return -b if a is None else a - b
