"""nn.Conv1d/2d/3d and F.conv1d/2d/3d.

A convolution is bilinear in (input, weight), so its residual is the mixed term
alone: ``conv_transpose(g, dW)`` towards the input and ``corr(dx, g)`` towards the
weight.  Transposed products come from ATen's ``convolution_backward`` kernel,
the same closed-form kernel a first-order backward runs; both halves of the
residual are one call of it, on ``(g, dx, dW)`` in place of ``(h, x, W)``.

With ``channels_last`` set (the engine's choice, see
:class:`hfopt.CurvatureOperator`) a 2-D convolution holds its input, weight and
every direction and cotangent it touches in channels-last layout, where
oneDNN's CPU kernels are faster (``bench_curvature.py`` times the gradient of
a channels-last copy of each model next to the contiguous one); the layout
then flows through the BatchNorm, ReLU and addition rules that follow, which
keep it.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import Grads, Rule

_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def _tuple(v, d: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def conv_padding(padding, kernel_size: Sequence[int], dilation: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """Integer padding for ``padding``, or None where PyTorch would pad
    asymmetrically ('same' with an even receptive field)."""
    d = len(kernel_size)
    if padding == "valid":
        return (0,) * d
    if padding == "same":
        total = [dl * (k - 1) for k, dl in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return _tuple(padding, d)


class ConvRule(Rule):
    param_names = ("weight", "bias")
    channels_last = False  # set per rule by the engine before forward

    def __init__(self, dim: int, stride, padding, dilation, groups: int):
        self.dim = dim
        self.stride = _tuple(stride, dim)
        self.padding = padding
        self.dilation = _tuple(dilation, dim)
        self.groups = groups

    @staticmethod
    def supports(module: nn.Module) -> bool:
        if module.padding_mode != "zeros":
            return False
        return conv_padding(module.padding, module.kernel_size, module.dilation) is not None

    @classmethod
    def from_module(cls, module: nn.Module) -> "ConvRule":
        dim = len(module.kernel_size)
        pad = conv_padding(module.padding, module.kernel_size, module.dilation)
        return cls(dim, module.stride, pad, module.dilation, module.groups)

    def _conv(self, x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
        return _CONV[self.dim](x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _backward(self, g: Tensor, x: Tensor, w: Tensor, mask: Tuple[bool, bool, bool]):
        return torch.ops.aten.convolution_backward(
            g, x, w, None, self.stride, self.padding, self.dilation,
            False, (0,) * self.dim, self.groups, mask,
        )

    def _layout(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """``t`` in the rule's layout (no copy when it already is)."""
        if t is None or not self.channels_last:
            return t
        return t.contiguous(memory_format=torch.channels_last)

    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        self.channels_last = self.channels_last and self.dim == 2 and inputs[0].dim() == 4
        x = self._layout(inputs[0])
        self.weight = self._layout(params["weight"])
        self.x = x if "weight" in self.trainable else None
        self.in_shape = x.shape
        return self._conv(x, self.weight, params.get("bias"))

    def _x_like(self) -> Tensor:
        # convolution_backward reads only the input's shape (and layout) when
        # grad_input alone is asked for.
        if self.x is not None:
            return self.x
        if self.channels_last:
            return self.weight.new_zeros(()).expand(self.in_shape[0], self.in_shape[2], self.in_shape[3],
                                                    self.in_shape[1]).permute(0, 3, 1, 2)
        return self.weight.new_zeros(()).expand(self.in_shape)

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        dw, db = self._layout(dparams.get("weight")), dparams.get("bias")
        din = [self._layout(din[0])]
        out = None
        if dw is not None:  # the bias direction rides along inside the convolution kernel
            out = self._conv(self.x, dw, db)
            db = None
        if din[0] is not None:
            t = self._conv(din[0], self.weight, db)
            out = t if out is None else out.add_(t)
            db = None
        if db is not None:  # rare: only a bias direction
            shape = self._conv(self._x_like()[:1], self.weight).shape
            out = db.view(1, -1, *([1] * self.dim)).expand(self.in_shape[0], *shape[1:]).clone()
        return out

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        mask = (bool(need_inputs[0]), "weight" in need_params, "bias" in need_params)
        gp = {}
        if not any(mask):
            return [None], gp
        x = self.x if mask[1] else self._x_like()
        g = self._layout(g)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, self.weight, [g.shape[1]] if mask[2] else None, self.stride, self.padding, self.dilation,
            False, (0,) * self.dim, self.groups, mask)
        if mask[1]:
            gp["weight"] = gw
        if mask[2]:
            gp["bias"] = gb
        return [gx], gp

    def has_residual(self) -> bool:
        return "weight" in self.trainable and self.active[0]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        dx, dw = self._layout(din[0]), self._layout(dparams.get("weight"))
        mask = (bool(need_inputs[0]) and dw is not None, "weight" in need_params and dx is not None, False)
        if not any(mask):
            return [None], {}
        # One kernel call for both mixed terms: its input cotangent is
        # conv_transpose(g, dW) and its weight cotangent corr(dx, g).
        rx, rw, _ = self._backward(self._layout(g), self._x_like() if dx is None else dx,
                                   self.weight if dw is None else dw, mask)
        return [rx], ({"weight": rw} if mask[1] else {})
