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

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

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

    def _mean(self, t: Tensor) -> Tensor:
        return t.mean(self.dims)

    def _dot_mean(self, t: Tensor, u: Tensor) -> Tensor:
        return (t * u).mean(self.dims)

    def _affine(self, terms, const: Optional[Tensor]) -> Tensor:
        """``sum coef_c * tensor + const_c`` in as few passes as torch allows."""
        (t0, c0), rest = terms[0], terms[1:]
        out = t0 * self._c(c0)
        for t, c in rest:
            out.addcmul_(t, self._c(c))
        if const is not None:
            out.add_(self._c(const))
        return out

    # -- forward -------------------------------------------------------------------------
    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        x = inputs[0]
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects an input of shape [N, C, ...], got {tuple(x.shape)}")
        C = x.shape[1]
        self.dims = [0] + list(range(2, x.dim()))
        self.bshape = (1, C) + (1,) * (x.dim() - 2)
        self.m = x.numel() // C
        self.shape = x.shape
        if self.batch_stats:
            if self.m == 1:
                # Same message PyTorch raises for a one-value channel.
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
            var, mean = torch.var_mean(x, self.dims, correction=0)
        else:
            mean, var = self.running_mean, self.running_var
        self.invstd = torch.rsqrt(var + self.eps)
        self.gamma = params.get("weight")
        self.A = self.invstd if self.gamma is None else self.gamma * self.invstd
        xh = (x - self._c(mean)) * self._c(self.invstd)
        # Eval mode needs xh only for gamma's products; train mode always.
        self.xh = xh if (self.batch_stats or "weight" in self.trainable) else None
        self._g = None
        beta = params.get("bias")
        if self.gamma is None:
            return xh if beta is None else xh + self._c(beta)
        if beta is None:
            return xh * self._c(self.gamma)
        return torch.addcmul(self._c(beta), xh, self._c(self.gamma))

    # -- first-order products ----------------------------------------------------------------
    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        dx, dg, db = din[0], dparams.get("weight"), dparams.get("bias")
        terms, cxh, const = [], dg, db
        if dx is not None:
            terms.append((dx, self.A))
            if self.batch_stats:
                cxh = _sub(cxh, self.A * self._dot_mean(self.xh, dx))
                const = _sub(const, self.A * self._mean(dx))
        if cxh is not None:
            terms.append((self.xh, cxh))
        if not terms:
            return self.invstd.new_zeros(()).expand(self.shape) + self._c(const)
        return self._affine(terms, const)

    def _g_stats(self, g: Tensor):
        """<g> and <xh g>, cached: the Hessian reuses the same gradient ``g`` in
        every product of an operator."""
        if self._g is not g:
            self._g, self._gm, self._ga = g, self._mean(g), self._dot_mean(self.xh, g)
        return self._gm, self._ga

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        gp = {}
        if self.batch_stats:
            gm, ga = self._mean(g), self._dot_mean(self.xh, g)
            gx = self._affine([(g, self.A), (self.xh, -self.A * ga)], -self.A * gm) if need_inputs[0] else None
            if "weight" in need_params:
                gp["weight"] = ga * self.m
            if "bias" in need_params:
                gp["bias"] = gm * self.m
            return [gx], gp
        gx = g * self._c(self.A) if need_inputs[0] else None
        if "weight" in need_params:
            gp["weight"] = self._dot_mean(self.xh, g) * self.m
        if "bias" in need_params:
            gp["bias"] = g.sum(self.dims)
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
            rgamma = None if dx is None else self._dot_mean(g, dx) * (self.m * inv)
            return None, Q, None, None, rgamma
        gm, a = self._g_stats(g)
        k = self.A * inv  # gamma * invstd^2
        P = Q = R = S = rgamma = None
        if dx is not None:
            d, b, c = self._mean(dx), self._dot_mean(self.xh, dx), self._dot_mean(g, dx)
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
        if h is not None:
            # Fold the transposed product of h into the same coefficient pass.
            if self.batch_stats:
                hm, ha = self._mean(h), self._dot_mean(self.xh, h)
                R = _sub(R, self.A * ha)
                S = _sub(S, self.A * hm)
                gh_gamma, gh_beta = ha * self.m, hm * self.m
            else:
                gh_gamma = self._dot_mean(self.xh, h) * self.m if "weight" in need_params else None
                gh_beta = h.sum(self.dims) if "bias" in need_params else None
            if "weight" in need_params:
                gp["weight"] = gh_gamma
            if "bias" in need_params:
                gp["bias"] = gh_beta
        if "weight" in need_params and rgamma is not None:
            gp["weight"] = _add(gp.get("weight"), rgamma)
        rx = None
        if need_inputs[0]:
            terms = [(t, c) for t, c in ((h, None if h is None else self.A), (dx, P), (g, Q), (self.xh, R))
                     if t is not None and c is not None]
            if terms:
                rx = self._affine(terms, S)
        return [rx], gp


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a + b)


def _sub(a: Optional[Tensor], b: Tensor) -> Tensor:
    return -b if a is None else a - b
