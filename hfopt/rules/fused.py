"""Rules for recognised runs of consecutive layers, fused for speed.

Each fused rule is built from the per-layer rules of the run after their
forward, reuses their caches, and gives the same products; the per-layer rules
stay the reference (tests compare both paths against autograd).

``BatchNorm -> ReLU -> MaxPool`` (and ``ReLU -> MaxPool``): a max-pool passes on
only the values at its argmax positions, and ReLU and BatchNorm's elementwise
pass act position by position, so the forward sweep gathers first and runs the
ReLU mask and BatchNorm's per-channel affine on the pooled positions alone;
only BatchNorm's channel sums need the whole direction.  Backwards, the pooled
cotangent is masked, its BatchNorm channel sums are taken on the pooled
positions, and the dense part of BatchNorm's transposed product (a per-channel
affine of ``xh``) is written once before the sparse part is scattered in.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .activations import ReLURule
from .base import Grads, Rule
from .batchnorm import BatchNormRule, _sub
from .pooling import MaxPoolRule


class ReLUMaxPoolRule(Rule):
    """``maxpool(relu(x))``: mask the pooled values, never the full map."""

    def __init__(self, relu: ReLURule, pool: MaxPoolRule):
        self.pool = pool
        self.active = [True]
        self.trainable = ()
        n, c = pool.idx.shape[:2]
        self.idx = pool.idx.reshape(n, c, -1)
        # Pooled ReLU output: positive exactly where the ReLU passed the argmax.
        self.y = relu.y.reshape(n, c, -1).gather(-1, self.idx)
        self.out_shape = pool.out_shape

    def _gather(self, t: Tensor) -> Tensor:
        return t.reshape(self.idx.shape[:2] + (-1,)).gather(-1, self.idx)

    def _mask(self, t: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(t, self.y, 0)

    def forward(self, inputs, params) -> Tensor:  # pragma: no cover - built after the forward
        raise RuntimeError("fused rules are assembled from rules that already ran forward")

    def jvp(self, din, dparams) -> Tensor:
        return self._mask(self._gather(din[0])).view(self.out_shape)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        return self.pool.vjp(self._mask(g.reshape(self.y.shape)).view(self.out_shape), [True], ())


class BNReLUMaxPoolRule(ReLUMaxPoolRule):
    """``maxpool(relu(batchnorm(x)))``; see the module docstring."""

    param_names = BatchNormRule.param_names

    def __init__(self, bn: BatchNormRule, relu: ReLURule, pool: MaxPoolRule):
        super().__init__(relu, pool)
        self.bn = bn
        self.active = bn.active
        self.trainable = bn.trainable
        self.xh_p = self._gather(bn.xh) if bn.xh is not None else None
        self._g = None

    def _c(self, coef: Tensor) -> Tensor:
        return coef.view(1, -1, 1)

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        bn, dx = self.bn, din[0]
        dg, db = dparams.get("weight"), dparams.get("bias")
        cxh, const = dg, db
        out = None
        if dx is not None:
            out = self._gather(dx) * self._c(bn.A)
            if bn.batch_stats:
                b, d = bn._dx_sums(dx)
                cxh = -bn.A * b if cxh is None else cxh - bn.A * b
                const = -bn.A * d if const is None else const - bn.A * d
        if cxh is not None:
            t = self.xh_p * self._c(cxh)
            out = t if out is None else out.add_(t)
        if const is not None:
            out = self._c(const).expand(self.y.shape).clone() if out is None else out.add_(self._c(const))
        return self._mask(out).view(self.out_shape)

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        bn = self.bn
        hm = self._mask(g.reshape(self.y.shape))
        # Channel sums of the scattered cotangent, taken on the pooled positions.
        s_h = hm.sum((0, 2))
        s_xh = (hm * self.xh_p).sum((0, 2)) if (bn.batch_stats or "weight" in need_params) else None
        gp = {}
        if "weight" in need_params:
            gp["weight"] = s_xh
        if "bias" in need_params:
            gp["bias"] = s_h
        if not need_inputs[0]:
            return [None], gp
        sparse = (hm * self._c(bn.A)).view(self.out_shape)
        if not bn.batch_stats:
            return self.pool.vjp(sparse, [True], ())[0], gp
        dense = bn._affine(None, [(bn.xh, -bn.A * s_xh / bn.m)], -bn.A * s_h / bn.m)
        flat = dense.view(self.idx.shape[:2] + (-1,))
        flat.scatter_add_(-1, self.idx, sparse.reshape(self.idx.shape))
        return [dense], gp

    def has_residual(self) -> bool:
        return self.bn.has_residual()

    def _expand(self, t: Tensor) -> Tensor:
        """A pooled-side cotangent as the dense cotangent at BatchNorm's output."""
        return self.pool.vjp(self._mask(t.reshape(self.y.shape)).view(self.out_shape), [True], ())[0][0]

    def hessian_vjp(self, h, g, din, dparams, need_inputs, need_params) -> Grads:
        bn = self.bn
        if not bn.batch_stats:  # eval mode: only the mixed term, on dense cotangents
            if self._g is not g:  # the gradient is fixed for the operator's lifetime
                self._g, self._g_bn = g, self._expand(g)
            h_bn = None if h is None else self._expand(h)
            return bn.hessian_vjp(h_bn, self._g_bn, din, dparams, need_inputs, need_params)
        # Train mode: g and h reach BatchNorm's output only at the pooled positions,
        # so every term in them is computed there and scattered once.
        if self._g is not g:
            g_p = self._mask(g.reshape(self.y.shape))
            self._g, self._g_p = g, g_p
            self._g_means = (g_p.sum((0, 2)) / bn.m, (g_p * self.xh_p).sum((0, 2)) / bn.m)
        gm, a = self._g_means
        dx, dg = din[0], dparams.get("weight")
        stats = None
        if dx is not None:
            b, d = bn._dx_sums(dx)
            stats = (d, b, (self._g_p * self._gather(dx)).sum((0, 2)) / bn.m)
        P, Q, R, S, rgamma = bn.coefficients(gm, a, stats, dg)
        gp = {}
        sparse = None
        if h is not None:
            h_p = self._mask(h.reshape(self.y.shape))
            s_h, s_xh = h_p.sum((0, 2)), (h_p * self.xh_p).sum((0, 2))
            if "weight" in need_params:
                gp["weight"] = s_xh
            if "bias" in need_params:
                gp["bias"] = s_h
            if need_inputs[0]:  # J^T h = A h - A <xh h> xh - A <h>
                R = _sub(R, bn.A * s_xh / bn.m)
                S = _sub(S, bn.A * s_h / bn.m)
                sparse = h_p * self._c(bn.A)
        if "weight" in need_params and rgamma is not None:
            gp["weight"] = rgamma if gp.get("weight") is None else gp["weight"] + rgamma
        if not need_inputs[0]:
            return [None], gp
        if Q is not None:
            t = self._g_p * self._c(Q)
            sparse = t if sparse is None else sparse.add_(t)
        terms = [(t, c) for t, c in ((dx, P), (bn.xh, R)) if t is not None and c is not None]
        dense = bn._affine(None, terms, S) if (terms or S is not None) else bn.xh.new_zeros(bn.shape)
        if sparse is not None:
            dense.view(self.idx.shape[:2] + (-1,)).scatter_add_(-1, self.idx, sparse)
        return [dense], gp

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        return self.hessian_vjp(None, g, din, dparams, need_inputs, need_params)
