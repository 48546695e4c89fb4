"""nn.ConvTranspose1d/2d/3d and F.conv_transpose1d/2d/3d.

A transposed convolution is bilinear in (input, weight) like a convolution:
the same rule with ATen's ``transposed=True`` convolution in the forward and
in ``convolution_backward``.  Its residual is again the mixed terms alone, one
``convolution_backward`` call on ``(g, dx, dW)``: the input cotangent of the
transposed convolution with weight ``dW``, and the weight cotangent with input
``dx``.  As a :class:`~hfopt.rules.conv.ConvRule` it takes the engine's
``channels_last`` setting; it is never fused (the fused rules take exactly a
``ConvRule``).
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Grads, Input, Rule
from .conv import ConvRule, _tuple
from .functional import ParamsAsInputs, _bind

_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvTransposeRule(ConvRule):
    def __init__(self, dim: int, stride, padding, output_padding, dilation, groups: int):
        super().__init__(dim, stride, _tuple(padding, dim), dilation, groups)
        self.output_padding = _tuple(output_padding, dim)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        return module.padding_mode == "zeros"

    @classmethod
    def from_module(cls, module: nn.Module) -> "ConvTransposeRule":
        # The engine calls a module with its input alone, so the output_padding
        # an ``output_size`` argument would pick never arises.
        return cls(len(module.kernel_size), module.stride, module.padding, module.output_padding,
                   module.dilation, module.groups)

    def _conv(self, x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
        return _CONV_T[self.dim](x, w, b, self.stride, self.padding, self.output_padding, self.groups,
                                 self.dilation)

    def _backward(self, g: Tensor, x: Tensor, w: Tensor, mask: Tuple[bool, bool, bool],
                  bias_sizes: Optional[Sequence[int]] = None):
        return torch.ops.aten.convolution_backward(
            g, x, w, bias_sizes, self.stride, self.padding, self.dilation,
            True, self.output_padding, self.groups, mask,
        )

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        mask = (bool(need_inputs[0]), "weight" in need_params, "bias" in need_params)
        if not any(mask):
            return [None], {}
        x = self.x if mask[1] else self._x_like()
        g = self._layout(g)
        gx, gw, gb = self._backward(g, x, self.weight, mask, [g.shape[1]] if mask[2] else None)
        gp = {}
        if mask[1]:
            gp["weight"] = gw
        if mask[2]:
            gp["bias"] = gb
        return [gx], gp


def module_conv_transpose(module: nn.Module) -> Optional[Rule]:
    """The rule of an ``nn.ConvTranspose1d/2d/3d`` module, or None."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and \
            ConvTransposeRule.supports(module):
        return ConvTransposeRule.from_module(module)
    return None


# The documented signature (the C++ builtins carry none).
_SIGNATURE = inspect.signature(
    lambda input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1: None)
_DIMS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}


def function_conv_transpose(target: Callable, args: tuple, kwargs: dict, values: Sequence[Tensor],
                            active: Sequence[bool]) -> Optional[Rule]:
    """The rule of ``F.conv_transpose1d/2d/3d(x, weight, bias, ...)`` with the
    input and weight as tensor arguments, or None."""
    dim = _DIMS.get(target)
    if dim is None:
        return None
    a = _bind(_SIGNATURE, args, kwargs)
    if a is None or not isinstance(a["input"], Input) or not isinstance(a["weight"], Input) \
            or not isinstance(a["groups"], int):
        return None
    rule = ConvTransposeRule(dim, a["stride"], a["padding"], a["output_padding"], a["dilation"], a["groups"])
    return ParamsAsInputs(rule, a["input"], {"weight": a["weight"], "bias": a["bias"]})
