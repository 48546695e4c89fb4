"""Upsampling/interpolation and padding (module and functional forms).

Both are linear in the input (constant padding with a non-zero value is
affine: its JVP pads with zeros), so neither has a residual.  The JVP repeats
the forward's own call on the direction.

Interpolation's transposed product is ATen's backward kernel of the op
``F.interpolate`` dispatches to, called with the output size and the scale
factors that op received: the nearest and linear kernels place their samples
by the scale factor when one is given, not by the ratio of the sizes.

Padding's transposed product: constant padding crops by the same amounts
(and zero-pads where the forward cropped); reflect, replicate and circular
padding scatter-add the cotangent back to the input position each output
position copies, found once by padding a tensor of positions.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from ..compiled import eager_scatter_add
from .base import Grads, Input, Rule
from .functional import _bind
from .pooling import adaptive_avg_transpose

_aten = torch.ops.aten
# (mode, spatial dims) -> ATen backward kernel.  The linear family takes
# align_corners after the sizes, the nearest family does not.
_NEAREST = {
    ("nearest", 1): _aten.upsample_nearest1d_backward, ("nearest", 2): _aten.upsample_nearest2d_backward,
    ("nearest", 3): _aten.upsample_nearest3d_backward,
    ("nearest-exact", 1): _aten._upsample_nearest_exact1d_backward,
    ("nearest-exact", 2): _aten._upsample_nearest_exact2d_backward,
    ("nearest-exact", 3): _aten._upsample_nearest_exact3d_backward,
}
_LINEAR = {
    ("linear", 1): _aten.upsample_linear1d_backward, ("bilinear", 2): _aten.upsample_bilinear2d_backward,
    ("bicubic", 2): _aten.upsample_bicubic2d_backward, ("trilinear", 3): _aten.upsample_trilinear3d_backward,
}
_MODES = {m for m, _ in _NEAREST} | {m for m, _ in _LINEAR} | {"area"}


class InterpolateRule(Rule):
    """``F.interpolate(x, size, scale_factor, mode, align_corners,
    recompute_scale_factor)`` for the nearest, nearest-exact, (bi/tri)linear,
    bicubic and area modes, without antialiasing."""

    def __init__(self, size=None, scale_factor=None, mode: str = "nearest", align_corners: Optional[bool] = None,
                 recompute_scale_factor: Optional[bool] = None):
        self.kwargs = dict(size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                           recompute_scale_factor=recompute_scale_factor)

    @staticmethod
    def supports(mode: str, antialias: bool = False) -> bool:
        return mode in _MODES and not antialias

    def _scales(self, dim: int) -> Tuple[Optional[float], ...]:
        """The scale factors F.interpolate hands the ATen op (None: placed by the sizes)."""
        scale = self.kwargs["scale_factor"]
        if scale is None or self.kwargs["recompute_scale_factor"]:
            return (None,) * dim
        return tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * dim

    def forward(self, inputs, params) -> Tensor:
        y = F.interpolate(inputs[0], **self.kwargs)  # raises as the model's own call would
        self.in_shape, self.out_size = inputs[0].shape, y.shape[2:]
        return y

    def jvp(self, din, dparams) -> Tensor:
        return F.interpolate(din[0], **self.kwargs)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        mode, dim = self.kwargs["mode"], len(self.out_size)
        if mode == "area":
            return [adaptive_avg_transpose(g, self.in_shape, dim)], {}
        scales = self._scales(dim)
        if (mode, dim) in _NEAREST:
            return [_NEAREST[mode, dim](g, self.out_size, self.in_shape, *scales)], {}
        align = bool(self.kwargs["align_corners"])  # None means False for these modes
        return [_LINEAR[mode, dim](g, self.out_size, self.in_shape, align, *scales)], {}


class PadRule(Rule):
    """``F.pad(x, pad, mode, value)``: constant (negative pads crop), reflect,
    replicate and circular."""

    def __init__(self, pad: Sequence[int], mode: str = "constant", value: Optional[float] = None):
        self.pad, self.mode, self.value = tuple(pad), mode, value

    def forward(self, inputs, params) -> Tensor:
        x = inputs[0]
        self.in_shape = x.shape
        if self.mode != "constant":
            k = len(self.pad) // 2
            spatial = x.shape[x.dim() - k:]
            # Where each padded position reads from (torch pads integer tensors in every mode).
            where = torch.arange(math.prod(spatial), device=x.device).view(1, *spatial)
            self.where = F.pad(where, self.pad, self.mode).flatten()
            self.spatial = k
        return F.pad(x, self.pad, self.mode, self.value)

    def jvp(self, din, dparams) -> Tensor:
        return F.pad(din[0], self.pad, self.mode)  # the value is a constant: zero in the direction

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        if self.mode == "constant":
            return [F.pad(g, [-p for p in self.pad])], {}
        src = g.flatten(g.dim() - self.spatial)
        gx = g.new_zeros(src.shape[:-1] + (math.prod(self.in_shape[len(self.in_shape) - self.spatial:]),))
        eager_scatter_add(gx, -1, self.where.expand(src.shape), src)
        return [gx.view(self.in_shape)], {}


_PAD_MODULES = {
    nn.modules.padding._ConstantPadNd: "constant", nn.modules.padding._ReflectionPadNd: "reflect",
    nn.modules.padding._ReplicationPadNd: "replicate",
}
if hasattr(nn.modules.padding, "_CircularPadNd"):  # torch >= 2.1
    _PAD_MODULES[nn.modules.padding._CircularPadNd] = "circular"


def module_resample(module: nn.Module) -> Optional[Rule]:
    """The rule of an ``nn.Upsample`` (and its ``UpsamplingNearest2d`` /
    ``UpsamplingBilinear2d`` subclasses) or of a padding module, or None."""
    if isinstance(module, nn.Upsample):
        if not InterpolateRule.supports(module.mode):
            return None
        return InterpolateRule(module.size, module.scale_factor, module.mode, module.align_corners,
                               module.recompute_scale_factor)
    for base, mode in _PAD_MODULES.items():
        if isinstance(module, base):
            return PadRule(module.padding, mode, getattr(module, "value", None))
    return None


# The documented signatures (F.pad is a builtin in some torch versions).
_INTERPOLATE = inspect.signature(lambda input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                                 recompute_scale_factor=None, antialias=False: None)
_PAD = inspect.signature(lambda input, pad, mode="constant", value=None: None)


def function_resample(target: Callable, args: tuple, kwargs: dict, values: Sequence[Tensor],
                      active: Sequence[bool]) -> Optional[Rule]:
    """The rule of ``F.interpolate(x, ...)`` or ``F.pad(x, ...)`` with ``x`` the
    only tensor argument, or None."""
    if target is F.interpolate:
        a = _single_tensor(_bind(_INTERPOLATE, args, kwargs))
        if a is None or not InterpolateRule.supports(a["mode"], a["antialias"]):
            return None
        return InterpolateRule(a["size"], a["scale_factor"], a["mode"], a["align_corners"],
                               a["recompute_scale_factor"])
    if target is F.pad:
        a = _single_tensor(_bind(_PAD, args, kwargs))
        return None if a is None else PadRule(a["pad"], a["mode"], a["value"])
    return None


def _single_tensor(a: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``a`` when its input is the call's only tensor (sizes and pads are numbers), else None."""
    if a is None or not isinstance(a["input"], Input):
        return None
    rest = [v for k, v in a.items() if k != "input"]
    return None if any(isinstance(leaf, Input) for leaf in pytree.tree_leaves(rest)) else a
