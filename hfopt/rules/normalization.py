"""LayerNorm, GroupNorm, InstanceNorm and weight normalization in closed form
(module and functional forms).

**Normalization over axes.**  The three layers normalize groups ("rows") of the
input's elements: the trailing ``normalized_shape`` of each position
(LayerNorm), the ``C/G`` channels and all positions of one group of one sample
(GroupNorm), all positions of one channel of one sample (InstanceNorm, which is
GroupNorm with ``G = C``).  :class:`NormalizationRule` views the input in a
*grouped shape* (the channel axis split into ``(G, C/G)``), where a row is a
fixed set of axes (``rdims``) and ``<t>`` is the mean over them; a split axis
is a view for any strides, so channels-last maps are not copied.  With
``invstd = rsqrt(var + eps)`` of the row (biased variance),
``z = (x - <x>) invstd``, ``y = w z + b`` (``w``, ``b`` broadcast over the
rows' positions) and ``u = w g`` the cotangent reaching ``z``:

* ``J_z t = invstd (t - <t> - z <z t>)``, the Jacobian of ``z``; it is
  symmetric, so the input cotangent is ``J_z u``;
* JVP      ``dy = w J_z dx + dw z + db``;
* VJP      ``gx = J_z (w g)``, ``gw = sum(g z)``, ``gb = sum(g)`` (sums over
  everything but ``w``'s own axes);
* Residual with ``a = <z u>``, ``um = <u>``, ``d = <dx>``, ``b = <z dx>``,
  ``c = <u dx>`` (BatchNorm's formula with ``gamma = 1`` per row):
  ``rx = invstd^2 (-a (dx - d) - b (u - um) - z (c - um d) + 3 a b z) + J_z (dw g)``
  and ``rw = sum(g J_z dx)``.

In eval mode an InstanceNorm that tracks running statistics uses them, as
PyTorch does: ``z = (x - running_mean) invstd`` per channel, ``J_z t = invstd t``
and only the mixed terms ``J_z (dw g)`` and ``rw`` remain.

**Weight normalization.**  ``torch._weight_norm(v, g, dim)`` (what both
``weight_norm`` forms call) is ``w = g v / n`` with
``n = ||v||`` over every axis but ``dim`` (all axes for ``dim = -1``).  With
``u = v / n``, ``s = g / n``, ``P t = t - u <u, t>`` (``<.,.>`` summed over a
slice) and ``c`` the cotangent of ``w``:

* JVP      ``dw = dg u + s P dv``;
* VJP      ``gv = s P c``, ``gg = <u, c>``;
* Residual with ``a = <u, c>``, ``b = <u, dv>``, ``e = <c, dv>``:
  ``rv = (s / n) (-b c - a dv - e u + 3 a b u) + (dg / n) P c`` and
  ``rg = (e - a b) / n``.

``tests/test_rules_normalization.py`` proves every product against float64
reverse-over-reverse autograd.
"""
from __future__ import annotations

import inspect
import math
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Grads, Input, Rule, add_optional, is_int, sum_to_shape
from .functional import ParamsAsInputs, _bind, _is_constant

Shape = Tuple[int, ...]


class NormalizationRule(Rule):
    """``y = w z + b`` with ``z`` the input normalized over rows (see the module
    docstring).  Build it with :meth:`layer`, :meth:`group` or :meth:`instance`."""

    param_names = ("weight", "bias")

    def __init__(self, eps: float, *, normalized_shape: Shape = (), groups: Optional[int] = None,
                 no_batch_dim: Optional[int] = None, input_stats: bool = True,
                 running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None):
        self.eps = eps
        self.normalized_shape = tuple(normalized_shape)  # LayerNorm: the trailing axes that form a row
        self.groups = groups            # GroupNorm: G; None without normalized_shape: one group per channel
        self.no_batch_dim = no_batch_dim  # InstanceNorm module: the input rank that means "unbatched"
        self.input_stats = input_stats
        # Set here or, for F.instance_norm, by ParamsAsInputs as constants.
        self.running_mean = running_mean
        self.running_var = running_var

    @classmethod
    def layer(cls, normalized_shape: Sequence[int], eps: float) -> "NormalizationRule":
        return cls(eps, normalized_shape=tuple(normalized_shape))

    @classmethod
    def group(cls, groups: int, eps: float) -> "NormalizationRule":
        return cls(eps, groups=groups)

    @classmethod
    def instance(cls, eps: float, input_stats: bool = True, no_batch_dim: Optional[int] = None,
                 running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None) -> "NormalizationRule":
        return cls(eps, no_batch_dim=no_batch_dim, input_stats=input_stats, running_mean=running_mean,
                   running_var=running_var)

    # -- geometry ------------------------------------------------------------------------
    def _layout(self, x: Tensor) -> Tuple[Shape, Tuple[int, ...], Shape]:
        """``(grouped shape, row axes, parameter shape)`` for input ``x``; raises
        where PyTorch's layer would."""
        shape = tuple(x.shape)
        if self.normalized_shape:
            k = len(self.normalized_shape)
            if x.dim() < k or shape[x.dim() - k:] != self.normalized_shape:
                raise ValueError(f"Given normalized_shape={list(self.normalized_shape)}, expected input with shape "
                                 f"[*, {', '.join(map(str, self.normalized_shape))}], but got input of size {shape}")
            return shape, tuple(range(x.dim() - k, x.dim())), self.normalized_shape
        if self.no_batch_dim is not None and x.dim() not in (self.no_batch_dim, self.no_batch_dim + 1):
            raise ValueError(f"expected {self.no_batch_dim}D or {self.no_batch_dim + 1}D input (got {x.dim()}D input)")
        if x.dim() < 2:
            raise ValueError(f"Expected at least 2 dimensions for input tensor but received {x.dim()}")
        # PyTorch's InstanceNorm modules batch an unbatched [C, *] input.
        cdim = 0 if self.no_batch_dim is not None and x.dim() == self.no_batch_dim else 1
        C, spatial = shape[cdim], shape[cdim + 1:]
        G = C if self.groups is None else self.groups
        if C % G:
            raise ValueError(f"Expected number of channels in input to be divisible by num_groups, "
                             f"but got input of shape {shape} and num_groups={G}")
        if self.input_stats:
            # PyTorch's checks that a row holds more than one value.
            if self.groups is None and math.prod(spatial) == 1:
                raise ValueError(f"Expected more than 1 spatial element when training, got input size {list(shape)}")
            if self.groups is not None and shape[0] * C // G * math.prod(spatial) == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{[shape[0] * C // G, G] + list(spatial)}")
        grouped = shape[:cdim] + (G, C // G) + spatial
        return grouped, tuple(range(cdim + 1, len(grouped))), (G, C // G) + (1,) * len(spatial)

    def _mean(self, t: Tensor) -> Tensor:
        return t.mean(self.rdims, keepdim=True)

    def _in(self, t: Tensor) -> Tensor:
        return t.reshape(self.gshape)

    def _reduce(self, t: Tensor, name: str) -> Tensor:
        """Cotangent of parameter ``name`` from its per-element contributions ``t``."""
        return sum_to_shape(t, torch.Size(self.pshape)).reshape(self.shapes[name])

    # -- forward -------------------------------------------------------------------------
    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        x = inputs[0]
        self.xshape = x.shape
        self.gshape, self.rdims, self.pshape = self._layout(x)
        w, b = params.get("weight"), params.get("bias")
        self.shapes = {n: p.shape for n, p in (("weight", w), ("bias", b)) if p is not None}
        self.w = None if w is None else w.reshape(self.pshape)
        xg = self._in(x)
        if self.input_stats:
            var, mean = torch.var_mean(xg, self.rdims, correction=0, keepdim=True)
        else:
            mean, var = self.running_mean.reshape(self.pshape), self.running_var.reshape(self.pshape)
        self.invstd = torch.rsqrt(var + self.eps)
        z = (xg - mean) * self.invstd
        # J_z needs z with batch statistics; with running ones only dw's products do.
        keep = "weight" in self.trainable or (self.input_stats and self.active[0])
        self.z = z if keep else None
        self._g = self._dx = None
        y = z if self.w is None else z * self.w
        if b is not None:
            y = y + b.reshape(self.pshape)
        return y.reshape(self.xshape)

    # -- products ------------------------------------------------------------------------
    def _jz(self, t: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """``J_z t``; ``stats = (<t>, <z t>)`` where known."""
        if not self.input_stats:
            return t * self.invstd
        m, zt = stats if stats is not None else (self._mean(t), self._mean(self.z * t))
        return (t - m - self.z * zt) * self.invstd

    def _dx_stats(self, dx: Tensor, dxg: Tensor) -> Tuple[Tensor, Tensor]:
        """``(<dx>, <z dx>)``, remembered by a weak reference: the Hessian's
        backward sweep needs them again for the same ``dx``, while the
        Gauss-Newton sweep stays free to drop ``dx``."""
        if self._dx is None or self._dx() is not dx:
            self._dx, self._dx_sums = weakref.ref(dx), (self._mean(dxg), self._mean(self.z * dxg))
        return self._dx_sums

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        dx, dw, db = din[0], dparams.get("weight"), dparams.get("bias")
        out = None
        if dx is not None:
            dxg = self._in(dx)
            out = self._jz(dxg, self._dx_stats(dx, dxg) if self.input_stats else None)
            if self.w is not None:
                out = out * self.w
        if dw is not None:
            out = add_optional(out, self.z * dw.reshape(self.pshape))
        if db is not None:
            t = db.reshape(self.pshape)
            out = self.invstd.new_zeros(self.gshape) + t if out is None else out + t
        return out.reshape(self.xshape)

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        gg = self._in(g)
        gp = {}
        if "weight" in need_params:
            gp["weight"] = self._reduce(gg * self.z, "weight")
        if "bias" in need_params:
            gp["bias"] = self._reduce(gg, "bias")
        gx = None
        if need_inputs[0]:
            gx = self._jz(gg if self.w is None else gg * self.w).reshape(self.xshape)
        return [gx], gp

    def has_residual(self) -> bool:
        if self.input_stats:
            return self.active[0]
        return self.active[0] and "weight" in self.trainable

    def residual(self, g: Tensor, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor],
                 need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        return self.hessian_vjp(None, g, din, dparams, need_inputs, need_params)

    def _g_stats(self, g: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
        """``(<u>, <z u>)``, cached: every Hessian product of an operator reuses
        the same gradient ``g``."""
        if self._g is not g:
            self._g, self._g_sums = g, (self._mean(u), self._mean(self.z * u))
        return self._g_sums

    def hessian_vjp(self, h: Optional[Tensor], g: Tensor, din: Sequence[Optional[Tensor]],
                    dparams: Mapping[str, Tensor], need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        dx, dw = din[0], dparams.get("weight")
        gg = self._in(g)
        hg = None if h is None else self._in(h)
        dxg = None if dx is None else self._in(dx)
        stats = None if dx is None or not self.input_stats else self._dx_stats(dx, dxg)
        gp = {}
        if "weight" in need_params:
            gw = None if hg is None else hg * self.z
            if dxg is not None:
                gw = add_optional(gw, gg * self._jz(dxg, stats))
            if gw is not None:
                gp["weight"] = self._reduce(gw, "weight")
        if "bias" in need_params and hg is not None:
            gp["bias"] = self._reduce(hg, "bias")
        if not need_inputs[0]:
            return [None], gp
        # J^T h and the mixed term share one application of the (linear) J_z.
        t = None if hg is None else (hg if self.w is None else hg * self.w)
        if dw is not None:
            t = add_optional(t, gg * dw.reshape(self.pshape))
        gx = None if t is None else self._jz(t)
        if stats is not None:
            u = gg if self.w is None else gg * self.w
            um, a = self._g_stats(g, u)
            d, b = stats
            c = self._mean(u * dxg)
            k = self.invstd * self.invstd
            # rx = P dx + Q u + R z + S with per-row coefficients.
            rx = dxg * (-k * a) + u * (-k * b) + self.z * (k * (3 * a * b - c + um * d)) + k * (a * d + b * um)
            gx = add_optional(gx, rx)
        return [None if gx is None else gx.reshape(self.xshape)], gp


class WeightNormRule(Rule):
    """``w = g v / ||v||`` (norm over every axis but ``dim``; all for ``dim = -1``),
    a function of its inputs ``v`` and ``g`` (see the module docstring)."""

    param_names = ()

    def __init__(self, dim: int, v: Input, g: Input):
        self.dim, self.v, self.g = dim, v, g

    @staticmethod
    def norm_shape(v_shape: Sequence[int], dim: int) -> Shape:
        """The shape of ``||v||`` kept as a broadcastable tensor."""
        if dim == -1:  # torch.norm_except_dim's convention: the whole tensor
            return (1,) * len(v_shape)
        d = dim % len(v_shape)
        return tuple(s if i == d else 1 for i, s in enumerate(v_shape))

    @classmethod
    def supports(cls, v_shape: Sequence[int], g_shape: Sequence[int], dim: int) -> bool:
        """Whether ``g`` holds one value per slice, laid out as ``||v||`` (as the
        parametrization makes it); other shapes broadcast ``w`` beyond ``v``."""
        if len(v_shape) == 0 or not -len(v_shape) <= dim < len(v_shape):
            return False
        ns = cls.norm_shape(v_shape, dim)
        try:
            return torch.broadcast_shapes(tuple(g_shape), ns) == ns and math.prod(g_shape) == math.prod(ns)
        except RuntimeError:
            return False

    def _sum(self, t: Tensor) -> Tensor:
        # A slice of one element (dim of a 1-D v): torch's empty dim list would mean "all".
        return t.sum(self.dims, keepdim=True) if self.dims else t

    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        v, g = inputs[self.v.index], inputs[self.g.index]
        if not self.supports(v.shape, g.shape, self.dim):
            raise ValueError(f"weight norm over dim={self.dim} of v {tuple(v.shape)} needs g shaped like its norm, "
                             f"got {tuple(g.shape)}")
        ns = self.norm_shape(v.shape, self.dim)
        self.dims = [i for i in range(v.dim()) if self.dim == -1 or i != self.dim % v.dim()]
        self.g_shape = g.shape
        self.n = torch.linalg.vector_norm(v, 2, self.dims, keepdim=True) if self.dims else v.abs()
        self.u = v / self.n
        self.gk = g.reshape(ns)
        self.s = self.gk / self.n
        self._c = None
        return self.u * self.gk

    def _project(self, t: Tensor) -> Tensor:
        """``P t = t - u <u, t>``."""
        return t - self.u * self._sum(self.u * t)

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        dv, dg = din[self.v.index], din[self.g.index]
        out = None if dv is None else self.s * self._project(dv)
        if dg is not None:
            out = add_optional(out, self.u * dg.reshape(self.n.shape))
        return out

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        return self.hessian_vjp(g, None, [None] * len(need_inputs), {}, need_inputs, need_params)

    def has_residual(self) -> bool:
        return self.active[self.v.index]  # w is linear in g alone

    def residual(self, g: Tensor, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor],
                 need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        return self.hessian_vjp(None, g, din, dparams, need_inputs, need_params)

    def _c_stat(self, c: Tensor) -> Tensor:
        """``<u, c>`` for the output gradient, cached across the operator's products."""
        if self._c is not c:
            self._c, self._a = c, self._sum(self.u * c)
        return self._a

    def hessian_vjp(self, h: Optional[Tensor], g: Optional[Tensor], din: Sequence[Optional[Tensor]],
                    dparams: Mapping[str, Tensor], need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        c = g  # the output gradient (``g`` is the gain here); None when only J^T h is asked
        dv, dg = din[self.v.index], din[self.g.index]
        gin: List[Optional[Tensor]] = [None] * len(need_inputs)
        a = None if (dv is None and dg is None) else self._c_stat(c)
        b = None if dv is None else self._sum(self.u * dv)
        e = None if dv is None else self._sum(c * dv)
        if need_inputs[self.v.index]:
            # J^T h and the mixed term share one projection: P is linear, s and dg/n constant per slice.
            t = None if h is None else self.s * h
            if dg is not None:
                t = add_optional(t, c * (dg.reshape(self.n.shape) / self.n))
            gv = None if t is None else self._project(t)
            if dv is not None:
                gv = add_optional(gv, (self.s / self.n) * (-b * c - a * dv + (3 * a * b - e) * self.u))
            gin[self.v.index] = gv
        if need_inputs[self.g.index]:
            gg = None if h is None else self._sum(self.u * h)
            if dv is not None:
                gg = add_optional(gg, (e - a * b) / self.n)
            gin[self.g.index] = None if gg is None else gg.reshape(self.g_shape)
        return gin, {}


# -- lookups ---------------------------------------------------------------------------------
_INSTANCE_NO_BATCH_DIM = {nn.InstanceNorm1d: 2, nn.InstanceNorm2d: 3, nn.InstanceNorm3d: 4}


def module_normalization(module: nn.Module) -> Optional[Rule]:
    """The rule for a LayerNorm, GroupNorm or InstanceNorm, or None.

    Weight normalization needs no module rule: the engine traces into the
    parametrization's ``_WeightNorm`` and the hook form's pre-hook alike, and
    both call ``torch._weight_norm`` (:func:`function_normalization`)."""
    if isinstance(module, nn.LayerNorm):
        return NormalizationRule.layer(module.normalized_shape, module.eps) if module.normalized_shape else None
    if isinstance(module, nn.GroupNorm):
        return NormalizationRule.group(module.num_groups, module.eps)
    for cls, no_batch_dim in _INSTANCE_NO_BATCH_DIM.items():
        if isinstance(module, cls):
            # PyTorch's own condition for the input's statistics.
            input_stats = module.training or not module.track_running_stats
            return NormalizationRule.instance(module.eps, input_stats, no_batch_dim,
                                              module.running_mean, module.running_var)
    return None


# The documented signatures of the functional calls (torch._weight_norm carries none).
_LAYER_NORM = inspect.signature(F.layer_norm)
_GROUP_NORM = inspect.signature(F.group_norm)
_INSTANCE_NORM = inspect.signature(F.instance_norm)
_WEIGHT_NORM = inspect.signature(lambda v, g, dim=0: None)


def function_normalization(target: Callable, args: tuple, kwargs: dict, values: Sequence[Tensor],
                           active: Sequence[bool]) -> Optional[Rule]:
    """The rule for ``F.layer_norm``/``F.group_norm``/``F.instance_norm``/
    ``torch._weight_norm``, or None (another target, or a form no rule covers)."""
    if target is F.layer_norm:
        return _layer_norm_rule(_bind(_LAYER_NORM, args, kwargs))
    if target is F.group_norm:
        a = _bind(_GROUP_NORM, args, kwargs)
        if not _affine_call(a) or not is_int(a["num_groups"]) or a["num_groups"] <= 0:
            return None
        return _with_params(NormalizationRule.group(a["num_groups"], float(a["eps"])), a)
    if target is F.instance_norm:
        return _instance_norm_rule(_bind(_INSTANCE_NORM, args, kwargs), active)
    if target is torch._weight_norm:
        return _weight_norm_rule(_bind(_WEIGHT_NORM, args, kwargs), values)
    return None


def _affine_call(a: Optional[Dict[str, Any]]) -> bool:
    """A call with its input, a plain eps, and weight/bias as tensors or None."""
    return a is not None and isinstance(a["input"], Input) and isinstance(a["eps"], (int, float)) \
        and not isinstance(a["eps"], bool) and all(a[n] is None or isinstance(a[n], Input) for n in ("weight", "bias"))


def _with_params(rule: NormalizationRule, a: Dict[str, Any], constants: Mapping[str, Any] = ()) -> Rule:
    return ParamsAsInputs(rule, a["input"], {"weight": a["weight"], "bias": a["bias"]}, constants=constants)


def _layer_norm_rule(a: Optional[Dict[str, Any]]) -> Optional[Rule]:
    if not _affine_call(a):
        return None
    shape = a["normalized_shape"]
    shape = (shape,) if is_int(shape) else shape
    if not isinstance(shape, (tuple, list)) or not shape or not all(is_int(s) for s in shape):
        return None
    return _with_params(NormalizationRule.layer(shape, float(a["eps"])), a)


def _instance_norm_rule(a: Optional[Dict[str, Any]], active: Sequence[bool]) -> Optional[Rule]:
    if not _affine_call(a) or not isinstance(a["use_input_stats"], bool):
        return None
    mean, var = a["running_mean"], a["running_var"]
    if a["use_input_stats"]:
        # The running statistics are only updated, never read: the curvature ignores them.
        return _with_params(NormalizationRule.instance(float(a["eps"])), a)
    if mean is None or var is None or not (_is_constant(mean, active) and _is_constant(var, active)):
        return None  # statistics that carry a direction are no longer constants
    rule = NormalizationRule.instance(float(a["eps"]), input_stats=False)
    return _with_params(rule, a, constants={"running_mean": mean, "running_var": var})


def _weight_norm_rule(a: Optional[Dict[str, Any]], values: Sequence[Tensor]) -> Optional[Rule]:
    if a is None or not (isinstance(a["v"], Input) and isinstance(a["g"], Input)) or not is_int(a["dim"]):
        return None
    v, g = a["v"], a["g"]
    if v.index == g.index or not WeightNormRule.supports(values[v.index].shape, values[g.index].shape, a["dim"]):
        return None
    return WeightNormRule(a["dim"], v=v, g=g)
