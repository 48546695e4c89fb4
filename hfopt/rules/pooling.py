"""Max, average, adaptive-average and adaptive-max pooling (1-d, 2-d, 3-d).

All are piecewise linear or linear: no residual.  Max pooling keeps only the
argmax indices of the forward; its JVP gathers at them and its transposed
product scatter-adds there (overlapping windows may share an argmax).  The
average poolings' transposed products are ATen's own backward kernels.

3-d and adaptive max pooling are :class:`ArgmaxPoolRule`, not
:class:`MaxPoolRule`: the fused ``ReLU -> MaxPool`` rules of
:mod:`hfopt.rules.fused` take exactly a :class:`MaxPoolRule` and index
``[N, C, H*W]``.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from functools import partial
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..compiled import eager_scatter_add
from .base import Grads, Rule


def _pair(v, d: int):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def _as_2d(t: Tensor, dim: int) -> Tensor:
    """1-d pooling runs on the 2-d kernels with a unit height."""
    return t.unsqueeze(-2) if dim == 1 else t


class MaxPoolRule(Rule):
    def __init__(self, dim: int, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        self.dim = dim
        stride = kernel_size if stride in (None, ()) else stride
        k, s, p, d = (_pair(a, dim) for a in (kernel_size, stride, padding, dilation))
        if dim == 1:  # run on the 2-d kernels with a unit height
            k, s, p, d = (1,) + k, (1,) + s, (0,) + p, (1,) + d
        self.args = (k, s, p, d, ceil_mode)

    @classmethod
    def from_module(cls, m: nn.Module) -> "MaxPoolRule":
        dim = 1 if isinstance(m, nn.MaxPool1d) else 2
        return cls(dim, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)

    def forward(self, inputs, params) -> Tensor:
        x = _as_2d(inputs[0], self.dim)
        y, self.idx = F.max_pool2d(x, *self.args, return_indices=True)
        self.in_shape = x.shape
        self.out_shape = inputs[0].shape[:-1] + y.shape[-1:] if self.dim == 1 else y.shape
        return y.view(self.out_shape)

    def jvp(self, din, dparams) -> Tensor:
        flat = self.idx.flatten(-2)
        return _as_2d(din[0], self.dim).flatten(-2).gather(-1, flat).view(self.out_shape)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        # ATen's max-pool backward reads only the input's shape; it accumulates
        # where overlapping windows share an argmax.
        x_like = g.new_zeros(()).expand(self.in_shape)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            _as_2d(g, self.dim).view(self.idx.shape), x_like, *self.args, self.idx)
        return [gx.view(self.in_shape[:-2] + self.in_shape[-1:]) if self.dim == 1 else gx], {}


class AvgPoolRule(Rule):
    def __init__(self, dim: int, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        self.dim = dim
        stride = kernel_size if stride in (None, ()) else stride
        self.k, self.s, self.p = _pair(kernel_size, dim), _pair(stride, dim), _pair(padding, dim)
        self.ceil_mode, self.count_include_pad, self.divisor = ceil_mode, count_include_pad, divisor_override

    @classmethod
    def from_module(cls, m: nn.Module) -> "AvgPoolRule":
        if isinstance(m, nn.AvgPool1d):
            return cls(1, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
        return cls(2, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)

    def _k2(self):
        if self.dim == 1:
            return (1,) + self.k, (1,) + self.s, (0,) + self.p
        return self.k, self.s, self.p

    def _pool(self, x: Tensor) -> Tensor:
        k, s, p = self._k2()
        y = F.avg_pool2d(_as_2d(x, self.dim), k, s, p, self.ceil_mode, self.count_include_pad, self.divisor)
        return y.squeeze(-2) if self.dim == 1 else y

    def forward(self, inputs, params) -> Tensor:
        self.in_shape = inputs[0].shape
        return self._pool(inputs[0])

    def jvp(self, din, dparams) -> Tensor:
        return self._pool(din[0])

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        k, s, p = self._k2()
        x_like = _as_2d(g.new_zeros(()).expand(self.in_shape), self.dim)
        gx = torch.ops.aten.avg_pool2d_backward(_as_2d(g, self.dim), x_like, k, s, p, self.ceil_mode,
                                                self.count_include_pad, self.divisor)
        return [gx.view(self.in_shape)], {}


class AdaptiveAvgPoolRule(Rule):
    def __init__(self, dim: int, output_size):
        self.dim = dim
        self.output_size = _pair(output_size, dim)

    @classmethod
    def from_module(cls, m: nn.Module) -> "AdaptiveAvgPoolRule":
        return cls(1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2, m.output_size)

    def _size2(self, in_shape):
        size = tuple(in_shape[-self.dim + i] if o is None else o for i, o in enumerate(self.output_size))
        return (1,) + size if self.dim == 1 else size

    def _pool(self, x: Tensor) -> Tensor:
        y = F.adaptive_avg_pool2d(_as_2d(x, self.dim), self._size2(x.shape))
        return y.squeeze(-2) if self.dim == 1 else y

    def forward(self, inputs, params) -> Tensor:
        self.in_shape = inputs[0].shape
        return self._pool(inputs[0])

    def jvp(self, din, dparams) -> Tensor:
        return self._pool(din[0])

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return [adaptive_avg_transpose(g, self.in_shape, self.dim) if need_inputs[0] else None], {}


def adaptive_avg_transpose(g: Tensor, in_shape: torch.Size, dim: int) -> Tensor:
    """The transpose of ``adaptive_avg_pool{dim}d`` onto ``in_shape`` (ATen's
    backward kernels; 1-d runs on the 2-d one with a unit height)."""
    if dim == 3:
        return torch.ops.aten._adaptive_avg_pool3d_backward(g, g.new_zeros(()).expand(in_shape))
    x_like = _as_2d(g.new_zeros(()).expand(in_shape), dim)
    gx = torch.ops.aten._adaptive_avg_pool2d_backward(_as_2d(g, dim).contiguous(), x_like)
    return gx.reshape(in_shape)


class AvgPool3dRule(AvgPoolRule):
    @classmethod
    def from_module(cls, m: nn.Module) -> "AvgPool3dRule":
        return cls(3, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool3d(x, self.k, self.s, self.p, self.ceil_mode, self.count_include_pad, self.divisor)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        x_like = g.new_zeros(()).expand(self.in_shape)
        gx = torch.ops.aten.avg_pool3d_backward(g, x_like, self.k, self.s, self.p, self.ceil_mode,
                                                self.count_include_pad, self.divisor)
        return [gx], {}


class AdaptiveAvgPool3dRule(AdaptiveAvgPoolRule):
    @classmethod
    def from_module(cls, m: nn.Module) -> "AdaptiveAvgPool3dRule":
        return cls(3, m.output_size)

    def _pool(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool3d(x, self._size2(x.shape))


class ArgmaxPoolRule(Rule):
    """A max pooling whose forward returns indices flat over the input's last
    ``dim`` axes: the JVP gathers there, the transposed product scatter-adds."""

    def __init__(self, dim: int):
        self.dim = dim

    @abstractmethod
    def _pool(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(output, indices)`` of the pooling."""

    def forward(self, inputs, params) -> Tensor:
        y, idx = self._pool(inputs[0])
        self.in_shape, self.out_shape = inputs[0].shape, y.shape
        self.idx = idx.flatten(-self.dim)
        return y

    def jvp(self, din, dparams) -> Tensor:
        return din[0].flatten(-self.dim).gather(-1, self.idx).view(self.out_shape)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        gx = g.new_zeros(self.idx.shape[:-1] + (math.prod(self.in_shape[-self.dim:]),))
        eager_scatter_add(gx, -1, self.idx, g.reshape(self.idx.shape))
        return [gx.view(self.in_shape)], {}


class MaxPool3dRule(ArgmaxPoolRule):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__(3)
        stride = kernel_size if stride in (None, ()) else stride
        self.args = (kernel_size, stride, padding, dilation, ceil_mode)

    @classmethod
    def from_module(cls, m: nn.Module) -> "MaxPool3dRule":
        return cls(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)

    def _pool(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return F.max_pool3d(x, *self.args, return_indices=True)


class AdaptiveMaxPoolRule(ArgmaxPoolRule):
    _POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}

    def __init__(self, dim: int, output_size):
        super().__init__(dim)
        self.output_size = output_size

    @classmethod
    def from_module(cls, m: nn.Module) -> "AdaptiveMaxPoolRule":
        dim = 1 if isinstance(m, nn.AdaptiveMaxPool1d) else 2 if isinstance(m, nn.AdaptiveMaxPool2d) else 3
        return cls(dim, m.output_size)

    def _pool(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self._POOL[self.dim](x, self.output_size, return_indices=True)


def module_pooling(m: nn.Module) -> Optional[Rule]:
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
        return MaxPoolRule.from_module(m)
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
        return AvgPoolRule.from_module(m)
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return AdaptiveAvgPoolRule.from_module(m)
    if isinstance(m, nn.AvgPool3d):
        return AvgPool3dRule.from_module(m)
    if isinstance(m, nn.AdaptiveAvgPool3d):
        return AdaptiveAvgPool3dRule.from_module(m)
    # With return_indices the module returns a pair, which no rule produces.
    if isinstance(m, nn.MaxPool3d) and not m.return_indices:
        return MaxPool3dRule.from_module(m)
    if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)) and not m.return_indices:
        return AdaptiveMaxPoolRule.from_module(m)
    return None


# target -> (rule factory on the arguments after ``x``, position of the
# return_indices flag among the positional arguments or None).
_FUNCTIONS: Dict[Callable, Tuple[Callable[..., Rule], Optional[int]]] = {
    F.max_pool1d: (partial(MaxPoolRule, 1), 6), F.max_pool2d: (partial(MaxPoolRule, 2), 6),
    torch.max_pool1d: (partial(MaxPoolRule, 1), 6), torch.max_pool2d: (partial(MaxPoolRule, 2), 6),
    F.max_pool3d: (MaxPool3dRule, 6), torch.max_pool3d: (MaxPool3dRule, 6),
    F.avg_pool1d: (partial(AvgPoolRule, 1), None), F.avg_pool2d: (partial(AvgPoolRule, 2), None),
    F.avg_pool3d: (partial(AvgPool3dRule, 3), None),
    F.adaptive_avg_pool1d: (partial(AdaptiveAvgPoolRule, 1), None),
    F.adaptive_avg_pool2d: (partial(AdaptiveAvgPoolRule, 2), None),
    F.adaptive_avg_pool3d: (partial(AdaptiveAvgPool3dRule, 3), None),
    F.adaptive_max_pool1d: (partial(AdaptiveMaxPoolRule, 1), 2),
    F.adaptive_max_pool2d: (partial(AdaptiveMaxPoolRule, 2), 2),
    F.adaptive_max_pool3d: (partial(AdaptiveMaxPoolRule, 3), 2),
}


def function_pooling(target, args: tuple, kwargs: dict) -> Optional[Rule]:
    """The rule of a functional pooling ``target(x, ...)`` (``x`` the only
    tensor argument), or None."""
    entry = _FUNCTIONS.get(target)
    if entry is None:
        return None
    make, flag = entry
    if flag is not None and (kwargs.get("return_indices") or (len(args) > flag and args[flag])):
        return None
    kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
    return make(*args[1:flag], **kw)
