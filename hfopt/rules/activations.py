"""Activations.

Elementwise ``y = f(x)``: the Jacobian is ``diag(f'(x))`` (symmetric, so JVP and
VJP are one product) and the residual is ``g * f''(x) * dx``.  ReLU, LeakyReLU,
Hardtanh/ReLU6/clamp and Hardsigmoid are piecewise linear: no residual (the
kinks have measure zero, as for autograd); at a kink each ``f'`` takes the value
autograd's backward kernel gives there.

PReLU adds a parameter (the negative slope ``w``): its only second derivative is
the mixed one, ``d2y/dx dw = [x < 0]``.

Softmax and log-softmax couple the entries along ``dim``; with ``<a, b>`` the sum
of ``a * b`` along ``dim`` and ``s`` the softmax:

* softmax      ``J dx = s (dx - <s, dx>)`` (symmetric), residual of ``<g, s(x)>``
  ``r = J dx (g - <s, g>) - s <J dx, g>``;
* log-softmax  ``J dx = dx - <s, dx>``, ``J^T g = g - s sum(g)``, residual
  ``r = -sum(g) s (dx - <s, dx>)``.
"""
from __future__ import annotations

import math
import operator
from numbers import Real
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Grads, Input, Rule, bind_names, is_int, sum_to_shape
from .functional import ParamsAsInputs

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


def hardtanh_rule(min_val: float, max_val: float) -> ElementwiseRule:
    # hardtanh_backward passes the gradient strictly inside (min_val, max_val):
    # f' is 0 at both bounds.
    return ElementwiseRule(lambda x: F.hardtanh(x, min_val, max_val),
                           lambda x, y: ((x > min_val) & (x < max_val)).to(x.dtype), None)


def clamp_rule(lo: Optional[float], hi: Optional[float]) -> ElementwiseRule:
    """``torch.clamp(x, lo, hi)``, at least one bound given."""

    # clamp_backward passes the gradient on the closed interval [lo, hi]: f' is 1
    # at a bound, unlike hardtanh's (and 0 everywhere when lo > hi).
    def d1(x, y):
        if lo is None:
            return (x <= hi).to(x.dtype)
        if hi is None:
            return (x >= lo).to(x.dtype)
        return ((x >= lo) & (x <= hi)).to(x.dtype)

    return ElementwiseRule(lambda x: torch.clamp(x, lo, hi), d1, None)


def _inside3(x: Tensor) -> Tensor:
    return (x > -3) & (x < 3)


def _hardswish_d1(x, y):
    # hardswish_backward: 0 for x <= -3, x/3 + 1/2 strictly inside, 1 for x >= 3.
    return torch.where(_inside3(x), x / 3 + 0.5, (x >= 3).to(x.dtype))


def _hardswish_d2(x, y):
    return _inside3(x).to(x.dtype) / 3


def _hardsigmoid_d1(x, y):
    # hardsigmoid_backward: 1/6 strictly inside (-3, 3), 0 at the bounds.
    return _inside3(x).to(x.dtype) / 6


def _mish_parts(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``sigmoid(x)``, ``t = tanh(softplus(x))`` and ``1 - t^2``.  ``1 - t^2`` is
    formed as ``1 / cosh^2``: no cancellation as ``t -> 1``, and ``cosh`` only
    overflows to inf (giving the correct limit 0), never to NaN."""
    sp = F.softplus(x)
    return torch.sigmoid(x), torch.tanh(sp), torch.cosh(sp).square().reciprocal()


def _mish_d1(x, y):
    s, t, sech2 = _mish_parts(x)
    return t + x * s * sech2


def _mish_d2(x, y):
    # d/dx of t + x s sech2, using t' = s sech2 and sech2' = -2 t s sech2;
    # 1 - s is sigmoid(-x), exact where s rounds to 1.
    s, t, sech2 = _mish_parts(x)
    return s * sech2 * (2 + x * (torch.sigmoid(-x) - 2 * t * s))


def softplus_rule(beta: float, threshold: float) -> ElementwiseRule:
    # Where beta x > threshold torch's softplus is x itself.  Its double backward
    # keeps f'' only where beta x < threshold: at equality f' is the sigmoid
    # and f'' is 0, as autograd has them.
    def d1(x, y):
        bx = x * beta
        return torch.where(bx > threshold, torch.ones_like(x), torch.sigmoid(bx))

    def d2(x, y):
        bx = x * beta
        return torch.where(bx < threshold, beta * torch.sigmoid(bx) * torch.sigmoid(-bx), torch.zeros_like(x))

    return ElementwiseRule(lambda x: F.softplus(x, beta, threshold), d1, d2)


class PReLURule(Rule):
    """``y = max(0, x) + w min(0, x)`` with ``w`` of shape [1] or [C] (C = dim 1
    of x) broadcast over the other dims, as ``torch.prelu`` does.

    At ``x = 0`` the slope is ``w``, as prelu's backward has it (autograd's
    forward mode takes 1 there, which would make the JVP disagree with the VJP
    it transposes), and the mixed second derivative is 0, as prelu's double
    backward has it (``[x < 0]``)."""

    param_names = ("weight",)

    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        x, w = inputs[0], params["weight"]
        shape = [1] * x.dim()
        if x.dim() > 1:
            shape[1] = w.numel()
        self.x, self.w_shape, self.wb = x, w.shape, w.reshape(shape)
        return F.prelu(x, w)

    def _to_weight(self, t: Tensor) -> Tensor:
        return sum_to_shape(t, self.wb.shape).reshape(self.w_shape)

    def _slope(self, t: Tensor) -> Tensor:
        return torch.where(self.x > 0, t, t * self.wb)

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        out = None if din[0] is None else self._slope(din[0])
        dw = dparams.get("weight")
        if dw is not None:
            t = self.x.clamp(max=0) * dw.reshape(self.wb.shape)
            out = t if out is None else out.add_(t)
        return out

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        gx = self._slope(g) if need_inputs[0] else None
        gp = {"weight": self._to_weight(g * self.x.clamp(max=0))} if "weight" in need_params else {}
        return [gx], gp

    def has_residual(self) -> bool:
        return "weight" in self.trainable and self.active[0]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        neg = (self.x < 0).to(g.dtype)
        dw = dparams.get("weight")
        rx = g * dw.reshape(self.wb.shape) * neg if (need_inputs[0] and dw is not None) else None
        rp = {}
        if "weight" in need_params and din[0] is not None:
            rp["weight"] = self._to_weight(g * din[0] * neg)
        return [rx], rp


class SoftmaxRule(Rule):
    """Softmax (``log=False``) or log-softmax along ``dim``; ``f`` computes the
    output as the layer does."""

    def __init__(self, f: Callable[[Tensor], Tensor], dim: int, log: bool):
        self.f, self.dim, self.log = f, dim, log

    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        y = self.f(inputs[0])
        self.s = y.exp() if self.log else y
        self._g = None
        return y

    def _dot(self, a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(self.dim, keepdim=True)

    def _softmax_jvp(self, t: Tensor) -> Tensor:
        """``s (t - <s, t>)``: the softmax Jacobian (symmetric) times ``t``."""
        return self.s * (t - self._dot(self.s, t))

    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        dx = din[0]
        return dx - self._dot(self.s, dx) if self.log else self._softmax_jvp(dx)

    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        if self.log:
            return [g - self.s * g.sum(self.dim, keepdim=True)], {}
        return [self._softmax_jvp(g)], {}

    def has_residual(self) -> bool:
        return self.active[0]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        if not need_inputs[0] or din[0] is None:
            return [None], {}
        if self._g is not g:  # the factor below is fixed for the operator's lifetime
            self._g = g
            self._gc = -g.sum(self.dim, keepdim=True) if self.log else g - self._dot(self.s, g)
        ds = self._softmax_jvp(din[0])
        if self.log:
            return [ds * self._gc], {}
        return [ds * self._gc - self.s * self._dot(ds, g)], {}


# Smooth elementwise maps met in custom forwards (weight standardization's
# sqrt, a scale's exp): (f', f'') as functions of (x, y).
_ELEMENTWISE = {
    "sqrt": (torch.sqrt, lambda x, y: 0.5 / y, lambda x, y: -0.25 / (y * y * y)),
    "rsqrt": (torch.rsqrt, lambda x, y: -0.5 * y ** 3, lambda x, y: 0.75 * y ** 5),
    "exp": (torch.exp, lambda x, y: y, lambda x, y: y),
    "log": (torch.log, lambda x, y: 1 / x, lambda x, y: -1 / (x * x)),
    "reciprocal": (torch.reciprocal, lambda x, y: -y * y, lambda x, y: 2 * y * y * y),
    "square": (torch.square, lambda x, y: 2 * x, lambda x, y: torch.full_like(x, 2.0)),
}

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
    if kind == "hardtanh":
        return hardtanh_rule(kw.get("min_val", -1.0), kw.get("max_val", 1.0))
    if kind == "relu6":
        return hardtanh_rule(0.0, 6.0)
    if kind == "clamp":
        return clamp_rule(kw.get("min"), kw.get("max"))
    if kind == "hardswish":
        return ElementwiseRule(F.hardswish, _hardswish_d1, _hardswish_d2)
    if kind == "hardsigmoid":
        return ElementwiseRule(F.hardsigmoid, _hardsigmoid_d1, None)
    if kind == "mish":
        return ElementwiseRule(F.mish, _mish_d1, _mish_d2)
    if kind == "softplus":
        return softplus_rule(kw.get("beta", 1.0), kw.get("threshold", 20.0))
    if kind in _ELEMENTWISE:
        return ElementwiseRule(*_ELEMENTWISE[kind])
    if kind in ("softmax", "log_softmax"):
        dim, log = kw["dim"], kind == "log_softmax"
        return SoftmaxRule((lambda x: torch.log_softmax(x, dim)) if log else (lambda x: torch.softmax(x, dim)),
                           dim, log)
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
    if isinstance(module, nn.Hardtanh):  # nn.ReLU6 too: a Hardtanh(0, 6)
        return activation_rule("hardtanh", min_val=module.min_val, max_val=module.max_val)
    if isinstance(module, nn.Hardswish):
        return activation_rule("hardswish")
    if isinstance(module, nn.Hardsigmoid):
        return activation_rule("hardsigmoid")
    if isinstance(module, nn.Mish):
        return activation_rule("mish")
    if isinstance(module, nn.Softplus):
        return activation_rule("softplus", beta=module.beta, threshold=module.threshold)
    if isinstance(module, nn.PReLU):
        return PReLURule()
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        # dim=None is PyTorch's deprecated implicit choice: left to the fallback.
        return SoftmaxRule(module.forward, module.dim, isinstance(module, nn.LogSoftmax)) \
            if is_int(module.dim) else None
    if isinstance(module, nn.Softmax2d):  # its forward also checks for a 3-D or 4-D input
        return SoftmaxRule(module.forward, -3, False)
    return None


_INPLACE = ("inplace",)
_F_SOFTMAX = ("dim", "_stacklevel", "dtype")  # F.softmax(input, dim, _stacklevel, dtype)
_T_SOFTMAX = ("dim", "dtype")                 # torch.softmax / Tensor.softmax(input, dim, dtype)
_CLAMP = ("min", "max")
# target -> (kind, the names of its arguments after x, in positional order).
_FUNCTIONS: Dict[Callable, Tuple[str, Tuple[str, ...]]] = {
    F.relu: ("relu", _INPLACE), torch.relu: ("relu", ()), torch.Tensor.relu: ("relu", ()),
    torch.sigmoid: ("sigmoid", ()), F.sigmoid: ("sigmoid", ()), torch.Tensor.sigmoid: ("sigmoid", ()),
    torch.tanh: ("tanh", ()), F.tanh: ("tanh", ()), torch.Tensor.tanh: ("tanh", ()),
    F.silu: ("silu", _INPLACE), F.gelu: ("gelu", ("approximate",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")), F.elu: ("elu", ("alpha", "inplace")),
    F.hardtanh: ("hardtanh", ("min_val", "max_val", "inplace")), F.relu6: ("relu6", _INPLACE),
    torch.clamp: ("clamp", _CLAMP), torch.Tensor.clamp: ("clamp", _CLAMP),
    torch.clip: ("clamp", _CLAMP), torch.Tensor.clip: ("clamp", _CLAMP),
    F.hardswish: ("hardswish", _INPLACE), F.hardsigmoid: ("hardsigmoid", _INPLACE), F.mish: ("mish", _INPLACE),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.softmax: ("softmax", _F_SOFTMAX), torch.softmax: ("softmax", _T_SOFTMAX),
    torch.Tensor.softmax: ("softmax", _T_SOFTMAX),
    F.log_softmax: ("log_softmax", _F_SOFTMAX), torch.log_softmax: ("log_softmax", _T_SOFTMAX),
    torch.Tensor.log_softmax: ("log_softmax", _T_SOFTMAX),
    **{getattr(owner, kind): (kind, ()) for kind in _ELEMENTWISE for owner in (torch, torch.Tensor)},
}
_NUMBERS = {"negative_slope", "alpha", "min_val", "max_val", "beta", "threshold"}


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def function_activation(target, args: tuple, kwargs: dict, values: Sequence[Tensor] = ()) -> Optional[Rule]:
    """The rule of a functional activation ``target(x, ...)`` (``x`` the only
    tensor argument, ``inplace`` already dropped), or None.  ``values`` are the
    call's tensors: with them a softmax's ``dtype`` equal to x's is accepted
    (any other ``dtype`` casts, which the rules do not model)."""
    entry = _FUNCTIONS.get(target)
    if entry is None:
        return None
    kind, names = entry
    kw = bind_names(names, args[1:], kwargs)
    if kw is None:
        return None
    # Rules never write in place; the stack level only aims F.softmax's warning.
    kw.pop("inplace", None)
    kw.pop("_stacklevel", None)
    if kind in ("softmax", "log_softmax"):
        dtype = kw.pop("dtype", None)
        if dtype is not None and not (values and values[args[0].index].dtype == dtype):
            return None
        if not is_int(kw.get("dim")):  # None (the implicit choice) or a named dim
            return None
    if kind == "clamp":
        bounds = [kw.get(n) for n in _CLAMP]
        if all(b is None for b in bounds) or not all(b is None or _is_number(b) for b in bounds):
            return None
    if not all(_is_number(v) for k, v in kw.items() if k in _NUMBERS):
        return None
    return activation_rule(kind, **kw)


_PRELU = (F.prelu, torch.Tensor.prelu)  # F.prelu is torch.prelu


def function_prelu(target, args: tuple, kwargs: dict) -> Optional[Rule]:
    """The rule of ``F.prelu(x, weight)`` (``torch.prelu``, ``x.prelu(weight)``),
    both tensors inputs of the call (as :class:`Input` markers), or None."""
    if not any(target is p for p in _PRELU):
        return None
    kw = bind_names(("input", "weight"), args, kwargs)
    if kw is None or not isinstance(kw.get("input"), Input) or not isinstance(kw.get("weight"), Input):
        return None
    return ParamsAsInputs(PReLURule(), kw["input"], {"weight": kw["weight"]})


_POWERS = {operator.pow, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__}


def function_power(target, args: tuple, kwargs: dict) -> Optional[Rule]:
    """``x ** c`` for a number ``c``, or None."""
    if target in _POWERS and len(args) == 2 and not kwargs and isinstance(args[1], (int, float)) \
            and not isinstance(args[1], bool):
        c = args[1]
        return ElementwiseRule(lambda x: x ** c, lambda x, y: c * x ** (c - 1), lambda x, y: c * (c - 1) * x ** (c - 2))
    return None
