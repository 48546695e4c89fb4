"""Elementwise activations: ``y = f(x)``.

The Jacobian is ``diag(f'(x))`` (symmetric, so JVP and VJP are one product) and
the residual is ``g * f''(x) * dx``.  ReLU and LeakyReLU are piecewise linear: no
residual (the kink has measure zero, as for autograd).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Grads, Rule

_SQRT_2_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class ElementwiseRule(Rule):
    """``f``, ``f'`` and ``f''`` given as functions of ``(x, y)``."""

    def __init__(self, f: Callable[[Tensor], Tensor],
                 d1: Callable[[Tensor, Tensor], Tensor],
                 d2: Optional[Callable[[Tensor, Tensor], Tensor]]):
        self.f, self.d1, self.d2 = f, d1, d2

    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        x = inputs[0]
        y = self.f(x)
        self.x, self.y = x, y
        self._fp = None
        self._g = None
        return y

    def _first(self) -> Tensor:
        if self._fp is None:
            self._fp = self.d1(self.x, self.y)
        return self._fp

    def jvp(self, din, dparams) -> Tensor:
        return din[0] * self._first()

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return [g * self._first() if need_inputs[0] else None], {}

    def has_residual(self) -> bool:
        return self.d2 is not None and self.active[0]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        if not need_inputs[0] or din[0] is None:
            return [None], {}
        if self._g is not g:  # g * f'' is fixed for the operator's lifetime
            self._g, self._gf2 = g, g * self.d2(self.x, self.y)
        return [self._gf2 * din[0]], {}

    def hessian_vjp(self, h, g, din, dparams, need_inputs, need_params) -> Grads:
        (r,), _ = self.residual(g, din, dparams, need_inputs, need_params)
        if h is None or not need_inputs[0]:
            return [r], {}
        out = h * self._first()
        return [out if r is None else out.add_(r)], {}


class ReLURule(Rule):
    """ReLU keeps only its output: ``threshold_backward`` masks with it in one
    pass, and the output is the tensor the next layer caches anyway."""

    def forward(self, inputs, params) -> Tensor:
        self.y = torch.relu(inputs[0])
        return self.y

    def _mask(self, t: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(t, self.y, 0)

    def jvp(self, din, dparams) -> Tensor:
        return self._mask(din[0])

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return [self._mask(g) if need_inputs[0] else None], {}


def _sigmoid_d1(x, y):
    return y * (1 - y)


def _sigmoid_d2(x, y):
    return y * (1 - y) * (1 - 2 * y)


def _tanh_d1(x, y):
    return 1 - y * y


def _tanh_d2(x, y):
    return -2 * y * (1 - y * y)


def _silu_d1(x, y):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_d2(x, y):
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _gelu(approximate: str) -> Tuple[Callable, Callable, Callable]:
    if approximate == "none":
        def d1(x, y):
            return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x)

        def d2(x, y):
            return _INV_SQRT_2PI * torch.exp(-0.5 * x * x) * (2 - x * x)
    elif approximate == "tanh":
        c = 0.044715

        def d1(x, y):
            t = torch.tanh(_SQRT_2_PI * (x + c * x ** 3))
            du = _SQRT_2_PI * (1 + 3 * c * x * x)
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du

        def d2(x, y):
            t = torch.tanh(_SQRT_2_PI * (x + c * x ** 3))
            du = _SQRT_2_PI * (1 + 3 * c * x * x)
            ddu = _SQRT_2_PI * 6 * c * x
            sech2 = 1 - t * t
            return sech2 * du + 0.5 * x * (-2 * t * sech2 * du * du + sech2 * ddu)
    else:
        raise ValueError(f"GELU approximate={approximate!r} is not one of 'none', 'tanh'")
    return (lambda x: F.gelu(x, approximate=approximate)), d1, d2


def leaky_relu_rule(slope: float) -> ElementwiseRule:
    # The constants are tensors of x's dtype: torch.where on two Python floats
    # yields the default dtype (float32), which would round the slope.
    return ElementwiseRule(lambda x: F.leaky_relu(x, slope),
                           lambda x, y: torch.where(x > 0, x.new_ones(()), x.new_full((), slope)), None)


def elu_rule(alpha: float) -> ElementwiseRule:
    # For x <= 0, f = alpha (e^x - 1), so f' = f'' = y + alpha.
    return ElementwiseRule(lambda x: F.elu(x, alpha),
                           lambda x, y: torch.where(x > 0, torch.ones_like(y), y + alpha),
                           lambda x, y: torch.where(x > 0, torch.zeros_like(y), y + alpha))


def activation_rule(kind: str, **kw) -> Rule:
    """The rule of an activation by name ('relu', 'tanh', 'gelu', ...)."""
    if kind == "relu":
        return ReLURule()
    if kind == "sigmoid":
        return ElementwiseRule(torch.sigmoid, _sigmoid_d1, _sigmoid_d2)
    if kind == "tanh":
        return ElementwiseRule(torch.tanh, _tanh_d1, _tanh_d2)
    if kind == "silu":
        return ElementwiseRule(F.silu, _silu_d1, _silu_d2)
    if kind == "gelu":
        return ElementwiseRule(*_gelu(kw.get("approximate", "none")))
    if kind == "leaky_relu":
        return leaky_relu_rule(kw.get("negative_slope", 0.01))
    if kind == "elu":
        return elu_rule(kw.get("alpha", 1.0))
    raise KeyError(kind)


def module_activation(module: nn.Module) -> Optional[Rule]:
    if isinstance(module, nn.ReLU):
        return activation_rule("relu")
    if isinstance(module, nn.Sigmoid):
        return activation_rule("sigmoid")
    if isinstance(module, nn.Tanh):
        return activation_rule("tanh")
    if isinstance(module, nn.SiLU):
        return activation_rule("silu")
    if isinstance(module, nn.GELU):
        return activation_rule("gelu", approximate=module.approximate)
    if isinstance(module, nn.LeakyReLU):
        return activation_rule("leaky_relu", negative_slope=module.negative_slope)
    if isinstance(module, nn.ELU):
        return activation_rule("elu", alpha=module.alpha)
    return None


_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.Tensor.relu: "relu",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", torch.Tensor.tanh: "tanh",
    F.silu: "silu", F.gelu: "gelu", F.leaky_relu: "leaky_relu", F.elu: "elu",
}
# The constants each functional form takes positionally after x (F.leaky_relu(x, 0.2)).
_POSITIONAL = {"leaky_relu": ("negative_slope",), "elu": ("alpha",), "gelu": ("approximate",)}


def function_activation(target, args: tuple, kwargs: dict) -> Optional[Rule]:
    """The rule of a functional activation ``target(x, ...)`` (``x`` the only
    tensor argument, ``inplace`` already dropped), or None."""
    kind = _FUNCTIONS.get(target)
    if kind is None:
        return None
    extra = dict(zip(_POSITIONAL.get(kind, ()), args[1:]))
    extra.update(kwargs)
    return activation_rule(kind, **extra)
