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

from ..compiled import eager_scatter_add
from .activations import ReLURule
from .base import Grads, Rule
from .batchnorm import BatchNormRule, _sub
from .pooling import MaxPoolRule


class PooledLayout:
    """How a fused rule holds values at the pooled positions: ``[N, C, P]``
    when the maps are contiguous, ``[N, P, C]`` when the engine holds them
    channels-last.  Either way gathers and scatters run along the positions
    with the channels laid out as in memory: a channels-last map read as
    ``[N, C, P]`` would put the channel count between neighbouring positions."""

    def __init__(self, idx: Tensor, out_shape: torch.Size, channels_last: bool):
        self.channels_last = channels_last
        self.pos_dim = 1 if channels_last else 2
        self.sum_dims = (0, self.pos_dim)
        self.map_shape = out_shape  # the pool's output (3-D for a 1-D pool, whose indices are 4-D)
        self.idx = self.rows(idx).contiguous()

    def rows(self, t: Tensor) -> Tensor:
        """A map ``[N, C, H, W]`` as ``[N, C, HW]`` or ``[N, HW, C]`` (a view
        when the map is in this layout)."""
        n, c = t.shape[:2]
        return t.permute(0, 2, 3, 1).reshape(n, -1, c) if self.channels_last else t.reshape(n, c, -1)

    def gather(self, t: Tensor) -> Tensor:
        return self.rows(t).gather(self.pos_dim, self.idx)

    def to_map(self, p: Tensor) -> Tensor:
        """Pooled values as the pooled map ``[N, C, Ho, Wo]`` (no copy)."""
        if not self.channels_last:
            return p.view(self.map_shape)
        n, c, ho, wo = self.map_shape
        return p.view(n, ho, wo, c).permute(0, 3, 1, 2)

    def channel(self, coef: Tensor) -> Tensor:
        """A per-channel vector, broadcastable against pooled values."""
        return coef.view(1, 1, -1) if self.channels_last else coef.view(1, -1, 1)

    def scatter_into(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """``dense`` (a full map) plus ``sparse`` scattered to the argmax positions."""
        dense = dense.contiguous(memory_format=torch.channels_last if self.channels_last else
                                 torch.contiguous_format)
        eager_scatter_add(self.rows(dense), self.pos_dim, self.idx, sparse)
        return dense


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class ReLUMaxPoolRule(Rule):
    """``maxpool(relu(x))``: mask the pooled values, never the full map."""

    def __init__(self, relu: ReLURule, pool: MaxPoolRule):
        self.pool = pool
        self.active = [True]
        self.trainable = ()
        self.layout = PooledLayout(pool.idx, pool.out_shape, _is_channels_last(relu.y))
        # Pooled ReLU output: positive exactly where the ReLU passed the argmax.
        self.y = self._gather(relu.y)

    def _gather(self, t: Tensor) -> Tensor:
        return self.layout.gather(t)

    def _c(self, coef: Tensor) -> Tensor:
        return self.layout.channel(coef)

    def _sum(self, t: Tensor) -> Tensor:
        """Per-channel sum of pooled values."""
        return t.sum(self.layout.sum_dims)

    def _pooled(self, g: Tensor) -> Tensor:
        """A cotangent of the pooled map, as pooled values."""
        return self.layout.rows(g)

    def _mask(self, t: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(t, self.y, 0)

    def forward(self, inputs, params) -> Tensor:  # pragma: no cover - built after the forward
        raise RuntimeError("fused rules are assembled from rules that already ran forward")

    def jvp(self, din, dparams) -> Tensor:
        return self.layout.to_map(self._mask(self._gather(din[0])))

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        return self.pool.vjp(self.layout.to_map(self._mask(self._pooled(g))), [True], ())


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

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        dx = din[0]
        if dx is None:
            return self._pooled_jvp(None, None, dparams.get("weight"), dparams.get("bias"))
        means = self.bn._dx_sums(dx) if self.bn.batch_stats else None
        return self._pooled_jvp(self._gather(dx), means, dparams.get("weight"), dparams.get("bias"))

    def _pooled_jvp(self, dx_p: Optional[Tensor], means, dg: Optional[Tensor], db: Optional[Tensor]) -> Tensor:
        """The JVP on the pooled positions from the gathered input direction
        ``dx_p`` and its channel means ``(<xh dx>, <dx>)`` (train mode)."""
        bn = self.bn
        cxh, const = dg, db
        out = None
        if dx_p is not None:
            out = dx_p * self._c(bn.A)
            if means is not None:
                b, d = means
                cxh = -bn.A * b if cxh is None else cxh - bn.A * b
                const = -bn.A * d if const is None else const - bn.A * d
        if cxh is not None:
            t = self.xh_p * self._c(cxh)
            out = t if out is None else out.add_(t)
        if const is not None:
            out = self._c(const).expand(self.y.shape).clone() if out is None else out.add_(self._c(const))
        return self.layout.to_map(self._mask(out))

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        bn = self.bn
        hm = self._mask(self._pooled(g))
        # Channel sums of the scattered cotangent, taken on the pooled positions.
        s_h = self._sum(hm)
        s_xh = self._sum(hm * self.xh_p) if (bn.batch_stats or "weight" in need_params) else None
        gp = {}
        if "weight" in need_params:
            gp["weight"] = s_xh
        if "bias" in need_params:
            gp["bias"] = s_h
        if not need_inputs[0]:
            return [None], gp
        sparse = hm * self._c(bn.A)
        if not bn.batch_stats:
            return self.pool.vjp(self.layout.to_map(sparse), [True], ())[0], gp
        dense = bn._affine(None, [(bn.xh, -bn.A * s_xh / bn.m)], -bn.A * s_h / bn.m)
        return [self.layout.scatter_into(dense, sparse)], gp

    def has_residual(self) -> bool:
        return self.bn.has_residual()

    def _expand(self, t: Tensor) -> Tensor:
        """A pooled-side cotangent as the dense cotangent at BatchNorm's output."""
        return self.pool.vjp(self.layout.to_map(self._mask(self._pooled(t))), [True], ())[0][0]

    def hessian_vjp(self, h, g, din, dparams, need_inputs, need_params) -> Grads:
        bn = self.bn
        if not bn.batch_stats:  # eval mode: only the mixed term, on dense cotangents
            if self._g is not g:  # the gradient is fixed for the operator's lifetime
                self._g, self._g_bn = g, self._expand(g)
            h_bn = None if h is None else self._expand(h)
            return bn.hessian_vjp(h_bn, self._g_bn, din, dparams, need_inputs, need_params)
        dx = din[0]
        dx_p = None if dx is None else self._gather(dx)
        means = None if dx is None else bn._dx_sums(dx)
        P, R, S, sparse, gp = self._pooled_hessian(h, g, dx_p, means, dparams.get("weight"), need_params)
        if not need_inputs[0]:
            return [None], gp
        terms = [(t, c) for t, c in ((dx, P), (bn.xh, R)) if t is not None and c is not None]
        dense = bn._affine(None, terms, S) if (terms or S is not None) else torch.zeros_like(bn.xh)
        if sparse is not None:
            dense = self.layout.scatter_into(dense, sparse)
        return [dense], gp

    def _pooled_hessian(self, h, g, dx_p, means, dg, need_params):
        """Train mode: BatchNorm's Hessian backward step as
        ``rx = P dx + R xh + S + scatter(sparse)``.  ``g`` and ``h`` reach
        BatchNorm's output only at the pooled positions, so every term in them is
        computed there and scattered once."""
        bn = self.bn
        if self._g is not g:  # the gradient is fixed for the operator's lifetime
            g_p = self._mask(self._pooled(g))
            self._g, self._g_p = g, g_p
            self._g_means = (self._sum(g_p) / bn.m, self._sum(g_p * self.xh_p) / bn.m)
        gm, a = self._g_means
        stats = None
        if dx_p is not None:
            b, d = means
            stats = (d, b, self._sum(self._g_p * dx_p) / bn.m)
        P, Q, R, S, rgamma = bn.coefficients(gm, a, stats, dg)
        gp = {}
        sparse = None
        if h is not None:  # J^T h = A h - A <xh h> xh - A <h>
            h_p = self._mask(self._pooled(h))
            s_h, s_xh = self._sum(h_p), self._sum(h_p * self.xh_p)
            if "weight" in need_params:
                gp["weight"] = s_xh
            if "bias" in need_params:
                gp["bias"] = s_h
            R = _sub(R, bn.A * s_xh / bn.m)
            S = _sub(S, bn.A * s_h / bn.m)
            sparse = h_p * self._c(bn.A)
        if "weight" in need_params and rgamma is not None:
            gp["weight"] = rgamma if gp.get("weight") is None else gp["weight"] + rgamma
        if Q is not None:
            t = self._g_p * self._c(Q)
            sparse = t if sparse is None else sparse.add_(t)
        return P, R, S, sparse, gp

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        return self.hessian_vjp(None, g, din, dparams, need_inputs, need_params)


class DataConvBNReLUMaxPoolRule(BNReLUMaxPoolRule):
    """``maxpool(relu(batchnorm(conv(x))))`` with ``x`` the data (no direction),
    BatchNorm in train mode: the first layer of a convnet.

    The convolution output ``dx = conv(x, dW) + db`` is linear in the weight
    direction with ``x`` fixed, so every channel sum BatchNorm needs of it, and
    every weight cotangent of a per-channel affine of ``xh``, is a small
    contraction with quantities computed once at build:
    ``K1[c] = sum xh_c * patch`` and ``s_patch = sum patch`` (weight-shaped), and
    for the Hessian the patch Gram matrix ``M = sum patch patch^T``.  Only the
    convolution itself and the scattered pooled cotangent touch full-size data.
    """

    def __init__(self, conv, bn: BatchNormRule, relu: ReLURule, pool: MaxPoolRule):
        super().__init__(bn, relu, pool)
        self.conv = conv
        self.param_names = tuple(f"conv.{n}" for n in conv.trainable) + tuple(f"bn.{n}" for n in bn.trainable)
        self.active = [False]
        self.trainable = self.param_names
        x, xh, w = conv.x, bn.xh, conv.weight
        self.K1 = conv._backward(xh, x, w, (False, True, False))[1]
        self.s_patch = conv._backward(torch.ones_like(xh[:, :1]), x, w[:1], (False, True, False))[1][0]
        self.sum_xh = xh.sum(bn.dims)
        self._gram = None
        self._dx_p = self._dx_means = None

    def has_residual(self) -> bool:
        return True

    def _patch_gram(self) -> Tensor:
        """``M = sum over positions of patch patch^T`` (Hessian only)."""
        if self._gram is None:
            conv = self.conv
            x = conv.x if conv.dim == 2 else conv.x.unsqueeze(-2)
            pad = conv.padding if conv.dim == 2 else (0,) + tuple(conv.padding)
            k = self.conv.weight.shape[2:] if conv.dim == 2 else (1,) + tuple(self.conv.weight.shape[2:])
            expand = (lambda t: t) if conv.dim == 2 else (lambda t: (1,) + tuple(t))
            cols = torch.nn.functional.unfold(x, tuple(k), expand(conv.dilation), pad, expand(conv.stride))
            self._gram = torch.einsum("npl,nql->pq", cols, cols)
        return self._gram

    def _split(self, dparams: Mapping[str, Tensor]):
        return (dparams.get("conv.weight"), dparams.get("conv.bias"),
                dparams.get("bn.weight"), dparams.get("bn.bias"))

    def _dot(self, a: Tensor, w: Tensor) -> Tensor:
        """Per output channel ``<a[c], w[c]>`` over a weight-shaped pair."""
        return (a * w).flatten(1).sum(1)

    def jvp(self, din, dparams) -> Tensor:
        dw, db, dg, dbeta = self._split(dparams)
        if dw is None and db is None:
            self._dx_p = self._dx_means = None
            return self._pooled_jvp(None, None, dg, dbeta)
        bn = self.bn
        if dw is not None:
            dx = self.conv._conv(self.conv.x, dw, db)
            s_dx = self._dot(self.s_patch.expand_as(dw), dw)
            s_xh_dx = self._dot(self.K1, dw)
        else:
            dx = db.view(1, -1, *([1] * self.conv.dim)).expand(bn.shape)
            s_dx = torch.zeros_like(db)
            s_xh_dx = torch.zeros_like(db)
        if db is not None:
            s_dx = s_dx + bn.m * db
            s_xh_dx = s_xh_dx + db * self.sum_xh
        self._dx_p = self._gather(dx)
        self._dx_means = (s_xh_dx / bn.m, s_dx / bn.m)
        self._dw, self._db = dw, db
        return self._pooled_jvp(self._dx_p, self._dx_means, dg, dbeta)

    def _conv_grads(self, P, R, S, sparse, dw, db, need_params):
        """Conv weight/bias cotangents of ``rx = P dx + R xh + S + scatter(sparse)``."""
        bn, conv = self.bn, self.conv
        gp = {}
        want_w, want_b = "conv.weight" in need_params, "conv.bias" in need_params
        if not (want_w or want_b):
            return gp
        c4 = (-1,) + (1,) * (conv.weight.dim() - 1)
        gw = torch.zeros_like(conv.weight) if want_w else None
        gb = torch.zeros(conv.weight.shape[0], dtype=bn.invstd.dtype, device=bn.invstd.device)
        if sparse is not None:
            dense = self.layout.scatter_into(torch.zeros_like(bn.xh), sparse)
            if want_w:
                gw = gw + conv._backward(dense, conv.x, conv.weight, (False, True, False))[1]
            gb = gb + self._sum(sparse)
        if R is not None:
            if want_w:
                gw = gw + R.view(c4) * self.K1
            gb = gb + R * self.sum_xh
        if S is not None:
            if want_w:
                gw = gw + S.view(c4) * self.s_patch
            gb = gb + S * bn.m
        if P is not None:
            # P dx with dx = conv(x, dw) + db: sum over positions patch * dx = M dw + db s_patch.
            if dw is not None:
                if want_w:
                    gw = gw + P.view(c4) * (dw.flatten(1) @ self._patch_gram()).view_as(dw)
                gb = gb + P * self._dot(self.s_patch.expand_as(dw), dw)
            if db is not None:
                if want_w:
                    gw = gw + (P * db).view(c4) * self.s_patch
                gb = gb + P * db * bn.m
        if want_w:
            gp["conv.weight"] = gw
        if want_b:
            gp["conv.bias"] = gb
        return gp

    def vjp(self, g, need_inputs, need_params) -> Grads:
        bn = self.bn
        h_p = self._mask(self._pooled(g))
        s_h, s_xh = self._sum(h_p), self._sum(h_p * self.xh_p)
        gp = {}
        if "bn.weight" in need_params:
            gp["bn.weight"] = s_xh
        if "bn.bias" in need_params:
            gp["bn.bias"] = s_h
        # BatchNorm's input cotangent: A scatter(h_p) - A <xh h> xh - A <h>.
        gp.update(self._conv_grads(None, -bn.A * s_xh / bn.m, -bn.A * s_h / bn.m, h_p * self._c(bn.A),
                                   None, None, need_params))
        return [None], gp

    def hessian_vjp(self, h, g, din, dparams, need_inputs, need_params) -> Grads:
        dw, db, dg, _ = self._split(dparams)
        bn_need = [n[3:] for n in need_params if n.startswith("bn.")]
        P, R, S, sparse, gp = self._pooled_hessian(h, g, self._dx_p, self._dx_means, dg, bn_need)
        out = {f"bn.{n}": t for n, t in gp.items()}
        out.update(self._conv_grads(P, R, S, sparse, dw, db, need_params))
        return [None], out

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        return self.hessian_vjp(None, g, din, dparams, need_inputs, need_params)
