"""The activation rules added beyond ReLU/Tanh/GELU: Hardtanh/ReLU6/clamp,
Hardswish, Hardsigmoid, Mish, Softplus, PReLU, softmax and log-softmax, as
modules and as functional calls, against float64 autograd.

Each layer sits behind a Linear or Conv layer so that its residual enters the
Hessian; inputs are scaled so that every piece of a piecewise layer holds many
points.  The kinks themselves are checked point by point against autograd's
own derivatives there.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hfopt
import hfopt.curvature
from autograd_guard import forbid_autograd
from conftest import (TOL, check_exact, labels, make, rand_vec, randn, record, ref_ggnvp, ref_grad, ref_hvp,
                      rel_err, trainable)
from hfopt.rules import Input, function_rule
from hfopt.rules.activations import function_activation, function_prelu, module_activation

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp_around(layer: nn.Module, width: int = 6, n_in: int = 4, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), layer, nn.Linear(width, classes))


def conv_around(layer: nn.Module, in_shape=(2, 4, 3), cmid: int = 3, classes: int = 3) -> nn.Module:
    """``Conv2d -> layer -> Flatten -> Linear``."""
    body = nn.Sequential(nn.Conv2d(in_shape[0], cmid, 3, padding=1), layer, nn.Flatten())
    with torch.no_grad():
        n = body(torch.zeros(2, *in_shape)).shape[1]
    return nn.Sequential(*body, nn.Linear(n, classes))


class Call(nn.Module):
    """``Linear -> fn -> Linear`` with ``fn`` a functional call traced into the graph."""

    def __init__(self, fn: Callable, width: int = 6, n_in: int = 4, classes: int = 3):
        super().__init__()
        self.fn = fn
        self.inp = nn.Linear(n_in, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        return self.out(self.fn(self.inp(x)))


class ConvCall(nn.Module):
    """``Conv2d -> fn -> Flatten -> Linear``."""

    def __init__(self, fn: Callable, in_shape=(2, 4, 3), cmid: int = 3, classes: int = 3):
        super().__init__()
        self.fn = fn
        self.conv = nn.Conv2d(in_shape[0], cmid, 3, padding=1)
        self.head = nn.Linear(cmid * in_shape[1] * in_shape[2], classes)

    def forward(self, x):
        return self.head(self.fn(self.conv(x)).flatten(1))


class FunctionalPReLU(nn.Module):
    """``F.prelu`` with this module's weight, on a conv feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.weight = nn.Parameter(torch.empty(channels))
        self.head = nn.Linear(3 * 4 * 3, 3)

    def forward(self, x):
        return self.head(F.prelu(self.conv(x), self.weight).flatten(1))


def _random_slopes(model: nn.Module, seed: int = 5) -> nn.Module:
    """PReLU slopes of both signs and above 1 (the default is one value, 0.25)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.PReLU, FunctionalPReLU)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.8)
    return model


def _frozen_prelu() -> nn.Module:
    layer = nn.PReLU(3)
    layer.weight.requires_grad_(False)
    return conv_around(layer)


# ----------------------------------------------------------------------------- cases
# name -> () -> (model, x, y, loss, train)
def _cases() -> Dict[str, Callable[[], tuple]]:
    x, y = randn(8, 4), labels(8, 3)
    x3, y3 = randn(4, 5, 4), randn(4, 5, 3, seed=2)  # [N, T, F]: softmax over T (dim 1) or F (dim -1)
    x4, y4 = randn(4, 2, 4, 3), labels(4, 3)

    # Each call builds a fresh model: a layer is copied, never shared between builds.
    def mlp(layer, scale):
        return lambda: (mlp_around(copy.deepcopy(layer)), x * scale, y, CE, True)

    def call(fn, scale):
        return lambda: (Call(fn), x * scale, y, CE, True)

    def seq3(layer_or_fn):  # on [N, T, F]
        if isinstance(layer_or_fn, nn.Module):
            return lambda: (mlp_around(copy.deepcopy(layer_or_fn)), x3 * 2, y3, MSE, True)
        return lambda: (Call(layer_or_fn), x3 * 2, y3, MSE, True)

    def conv(layer, scale=1.0, train=True):
        return lambda: (conv_around(copy.deepcopy(layer)), x4 * scale, y4, CE, train)

    def conv_call(fn, scale=1.0):
        return lambda: (ConvCall(fn), x4 * scale, y4, CE, True)

    cases = {
        # Hardtanh / ReLU6 / clamp
        "hardtanh": mlp(nn.Hardtanh(-0.5, 0.8), 2),
        "relu6": mlp(nn.ReLU6(), 12),
        "bn-hardtanh-train": conv(nn.Sequential(nn.BatchNorm2d(3), nn.Hardtanh(-0.5, 0.8))),
        "bn-relu6-eval": conv(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU6()), 6, train=False),
        "F.hardtanh": call(lambda h: F.hardtanh(h, -0.5, 0.8), 2),
        "F.hardtanh-kw": call(lambda h: F.hardtanh(h, min_val=-0.3, max_val=0.4), 2),
        "F.relu6": call(F.relu6, 12),
        "torch.clamp": call(lambda h: torch.clamp(h, -0.5, 0.8), 2),
        "torch.clamp-int": call(lambda h: torch.clamp(h, -1, 1), 3),
        "Tensor.clamp-min": call(lambda h: h.clamp(min=-0.2), 2),
        "torch.clip-max": call(lambda h: torch.clip(h, max=0.3), 2),
        "Tensor.clip": call(lambda h: h.clip(-0.5, 0.8), 2),
        # smooth and piecewise-quadratic
        "hardswish": mlp(nn.Hardswish(), 8),
        "F.hardswish": conv_call(F.hardswish, 6),
        "mish": mlp(nn.Mish(), 3),
        "bn-mish-train": mlp(nn.Sequential(nn.BatchNorm1d(6), nn.Mish()), 1),
        "F.mish": call(F.mish, 3),
        "softplus": mlp(nn.Softplus(), 3),
        "softplus-beta-threshold": mlp(nn.Softplus(beta=2.0, threshold=3.0), 3),
        "F.softplus": call(lambda h: F.softplus(h, 2.0, 3.0), 3),
        "F.softplus-kw": call(lambda h: F.softplus(h, beta=0.5), 3),
        # PReLU
        "prelu-1": conv(nn.PReLU(), 2),
        "prelu-C": conv(nn.PReLU(3), 2),
        "prelu-mlp-C": mlp(nn.PReLU(6), 2),
        "prelu-frozen": lambda: (_frozen_prelu(), x4 * 2, y4, CE, True),
        "bn-prelu-train": conv(nn.Sequential(nn.BatchNorm2d(3), nn.PReLU(3))),
        # softmax / log-softmax
        "softmax-dim1": seq3(nn.Softmax(dim=1)),
        "softmax-dim-1": seq3(nn.Softmax(dim=-1)),
        "logsoftmax-dim1": seq3(nn.LogSoftmax(dim=1)),
        "logsoftmax-dim-1": seq3(nn.LogSoftmax(dim=-1)),
        "softmax-2d": mlp(nn.Softmax(dim=1), 2),
        "softmax-4d-dim1": conv(nn.Softmax(dim=1), 2),
        "logsoftmax-4d-dim1": conv(nn.LogSoftmax(dim=1), 2),
        "softmax2d": conv(nn.Softmax2d(), 2),
        "bn-softmax-train": conv(nn.Sequential(nn.BatchNorm2d(3), nn.Softmax(dim=1))),
        "F.softmax": seq3(lambda h: F.softmax(h, 1)),
        "F.softmax-kw": seq3(lambda h: F.softmax(h, dim=-1)),
        "torch.softmax": seq3(lambda h: torch.softmax(h, 1)),
        "Tensor.softmax": seq3(lambda h: h.softmax(-1)),
        "F.log_softmax": seq3(lambda h: F.log_softmax(h, 1)),
        "torch.log_softmax-kw": seq3(lambda h: torch.log_softmax(h, dim=-1)),
        "Tensor.log_softmax": seq3(lambda h: h.log_softmax(1)),
        "F.softmax-4d-dim1": conv_call(lambda h: F.softmax(h, 1), 2),
        "F.log_softmax-4d-dim1": conv_call(lambda h: F.log_softmax(h, dim=1), 2),
    }
    return cases


CASES = _cases()


def _build(name: str):
    model, x, y, loss, train = CASES[name]()
    return _random_slopes(make(model)).train(train), x, y, loss


def _closed_form_run(model: nn.Module, loss_fn, x, y) -> None:
    """Both operators built and applied with autograd forbidden: no fallback, no
    autograd call, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with forbid_autograd() as guard:
            ops = [cls(model, loss_fn, x, y) for cls in (hfopt.GGN, hfopt.Hessian)]
            for op in ops:
                op @ rand_vec(model, seed=3)
                op.gradient()
    assert sum(guard.calls.values()) == 0, guard.calls
    assert all(op.fallbacks == [] for op in ops), [op.fallbacks for op in ops]


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact(name):
    model, x, y, loss = _build(name)
    check_exact(model, loss, x, y, tag="-activations")


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_form_only(name):
    model, x, y, loss = _build(name)
    _closed_form_run(model, loss, x, y)


def test_inputs_cover_every_piece():
    """The scales above put many points in each piece of the piecewise layers."""
    for name, lo, hi in (("hardtanh", -0.5, 0.8), ("relu6", 0.0, 6.0), ("hardswish", -3.0, 3.0)):
        model, x, _, _ = _build(name)
        with torch.no_grad():
            h = model[0](x)
        assert (h < lo).sum() >= 5 and ((h > lo) & (h < hi)).sum() >= 5 and (h > hi).sum() >= 5, name


# ----------------------------------------------------------------------------- Hardsigmoid
class ReLU6Sigmoid(nn.Module):
    """``relu6(x + 3) / 6``: Hardsigmoid with the same derivatives everywhere,
    the kinks included, and a double backward autograd implements (it has none
    for hardsigmoid_backward)."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_hardsigmoid_against_twin(functional):
    """Autograd cannot differentiate hardsigmoid twice, so the references run on
    the ``relu6`` twin with the same parameters."""
    gen = torch.Generator().manual_seed(0)
    model = make(Call(F.hardsigmoid) if functional else mlp_around(nn.Hardsigmoid()))
    twin = make(mlp_around(ReLU6Sigmoid()))
    twin.load_state_dict({k.replace("inp.", "0.").replace("out.", "2."): v for k, v in model.state_dict().items()})
    x, y = randn(8, 4) * 6, labels(8, 3)
    assert torch.equal(model(x), twin(x))
    for cls, ref in ((hfopt.GGN, ref_ggnvp), (hfopt.Hessian, ref_hvp)):
        op = cls(model, CE, x, y)
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in trainable(model)]
        err = record("hardsigmoid", rel_err(op @ v, ref(twin, CE, x, y, v)))
        assert err < TOL, err
        assert op.fallbacks == []
    assert rel_err(op.gradient(), ref_grad(twin, CE, x, y)) < TOL
    _closed_form_run(model, CE, x, y)


# ----------------------------------------------------------------------------- kinks
def _derivatives(rule, x: torch.Tensor):
    """``f'(x)`` and ``f''(x)`` of an elementwise rule, from its JVP and residual."""
    rule.setup([True], ())
    rule.forward([x], {})
    ones = torch.ones_like(x)
    if not rule.has_residual():
        return rule.jvp([ones], {}), torch.zeros_like(x)
    (r,), _ = rule.residual(ones, [ones], {}, [True], ())
    return rule.jvp([ones], {}), r


def _autograd_derivatives(f: Callable, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    d1, = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), x)[0] if d1.requires_grad else torch.zeros_like(x)
    return d1.detach(), d2


KINKS = {
    "hardtanh": (nn.Hardtanh(-0.5, 0.8), None, [-0.5, 0.8, -0.6, 0.0, 0.9]),
    "relu6": (nn.ReLU6(), None, [0.0, 6.0, -1.0, 3.0, 7.0]),
    "F.relu6": (F.relu6, ((F.relu6, (Input(0),), {})), [0.0, 6.0, -1.0, 3.0, 7.0]),
    "clamp": (lambda t: torch.clamp(t, -0.5, 0.8), (torch.clamp, (Input(0), -0.5, 0.8), {}),
              [-0.5, 0.8, -0.6, 0.0, 0.9]),
    "clamp-min": (lambda t: t.clamp(min=-0.5), (torch.Tensor.clamp, (Input(0),), {"min": -0.5}), [-0.5, -0.6, 0.0]),
    "clip-max": (lambda t: torch.clip(t, max=0.8), (torch.clip, (Input(0),), {"max": 0.8}), [0.8, 0.0, 0.9]),
    "clamp-equal": (lambda t: torch.clamp(t, 1.0, 1.0), (torch.clamp, (Input(0), 1.0, 1.0), {}), [0.0, 1.0, 2.0]),
    "clamp-crossed": (lambda t: torch.clamp(t, 2.0, 1.0), (torch.clamp, (Input(0), 2.0, 1.0), {}),
                      [0.0, 1.0, 1.5, 2.0, 3.0]),
    "hardswish": (nn.Hardswish(), None, [-3.0, 3.0, -4.0, -1.0, 0.0, 2.0, 4.0]),
    "mish": (nn.Mish(), None, [-40.0, -3.0, 0.0, 0.5, 3.0, 25.0]),
    "softplus": (nn.Softplus(beta=2.0, threshold=10.0), None, [5.0, 5.0 + 1e-9, 5.0 - 1e-9, -3.0, 0.0, 20.0]),
    "F.softplus": (lambda t: F.softplus(t, 0.5, 2.0), (F.softplus, (Input(0), 0.5, 2.0), {}), [4.0, 3.0, 5.0]),
}


@pytest.mark.parametrize("name", sorted(KINKS))
def test_kinks_match_autograd(name):
    """At the bounds of each piece, f' and f'' take autograd's values exactly
    (Hardtanh: 0 at a bound, clamp: 1, Hardswish: f'(-3) = 0, f'(3) = 1, Softplus
    at beta x == threshold: f' the sigmoid and f'' 0)."""
    f, call, points = KINKS[name]
    rule = module_activation(f) if call is None else function_activation(*call)
    assert rule is not None
    x = torch.tensor(points, dtype=torch.float64)
    got1, got2 = _derivatives(rule, x)
    want1, want2 = _autograd_derivatives(f, x)
    torch.testing.assert_close(got1, want1, rtol=1e-13, atol=0)
    # atol: far out, 1 - tanh^2 cancels to 0 in autograd's mish (the rule keeps ~1e-20).
    torch.testing.assert_close(got2, want2, rtol=1e-12, atol=1e-15)
    assert got1.isfinite().all() and got2.isfinite().all()


def test_hardsigmoid_kinks():
    """0 at -3 and 3 as autograd's backward has it.  Its 1/6 inside is a float32
    constant even in float64 (0.16666667163...): the rule's is the exact 1/6,
    the relu6 twin's."""
    rule = module_activation(nn.Hardsigmoid())
    x = torch.tensor([-3.0, 3.0, -4.0, 0.0, 4.0, -2.9, 2.9], dtype=torch.float64)
    got1, got2 = _derivatives(rule, x)
    want1, want2 = _autograd_derivatives(ReLU6Sigmoid(), x)
    assert torch.equal(got1, want1) and torch.equal(got2, want2)
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(got1, torch.autograd.grad(F.hardsigmoid(xg).sum(), xg)[0], rtol=1e-7, atol=0)


def test_mish_far_tails():
    """Where autograd's mish double backward overflows to NaN, the closed form
    keeps its limits: f' -> 0 and 1, f'' -> 0."""
    x = torch.tensor([-800.0, 800.0], dtype=torch.float64)
    d1, d2 = _derivatives(module_activation(nn.Mish()), x)
    assert torch.equal(d1, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(d2, torch.zeros_like(x))


# ----------------------------------------------------------------------------- PReLU
def _prelu_products(rule, x, w, dx, dw, g):
    rule.setup([True, True], ())
    y = rule.forward([x, w], {})
    jv = rule.jvp([dx, dw], {})
    vjp, _ = rule.vjp(g, [True, True], ())
    res, _ = rule.residual(g, [dx, dw], {}, [True, True], ())
    return y, jv, vjp, res


def _prelu_reference(x, w, dx, dw, g):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = F.prelu(x, w)
    u = torch.zeros_like(y, requires_grad=True)
    gx_u, gw_u = torch.autograd.grad(y, (x, w), u, create_graph=True)
    jv, = torch.autograd.grad((gx_u * dx).sum() + (gw_u * dw).sum(), u)
    gx, gw = torch.autograd.grad(y, (x, w), g, create_graph=True)
    rx, rw = torch.autograd.grad((gx * dx).sum() + (gw * dw).sum(), (x, w))
    return y.detach(), jv, [gx.detach(), gw.detach()], [rx, rw]


@pytest.mark.parametrize("x_shape,w_shape", [((4, 3, 2, 2), (3,)), ((4, 3, 2, 2), (1,)), ((5, 3), (3,)),
                                               ((6,), (1,)), ((2, 3, 4), ()), ((4, 3, 5), (3,))],
                         ids=["4d-C", "4d-1", "2d-C", "1d", "3d-scalar", "3d-C"])
def test_functional_prelu_rule(x_shape, w_shape):
    """``function_prelu`` (F.prelu's two tensor inputs) against autograd, zeros
    of x included (slope ``w`` and no mixed term there, as autograd's backward)."""
    gen = torch.Generator().manual_seed(1)
    x, w, dx, dw, g = (torch.randn(s, generator=gen, dtype=torch.float64)
                       for s in (x_shape, w_shape, x_shape, w_shape, x_shape))
    x.view(-1)[::3] = 0.0
    rule = function_prelu(F.prelu, (Input(0), Input(1)), {})
    (y, jv, vjp, res), (y_ref, jv_ref, vjp_ref, res_ref) = (_prelu_products(rule, x, w, dx, dw, g),
                                                            _prelu_reference(x, w, dx, dw, g))
    for a, b in ((y, y_ref), (vjp, vjp_ref), (res, res_ref), (jv[x != 0], jv_ref[x != 0])):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # At x == 0 autograd's forward-mode slope (1) disagrees with its backward one
    # (w); the rule's JVP is the transpose of its VJP there.
    wb = w.reshape([1, -1] + [1] * (x.dim() - 2)) if x.dim() > 1 else w
    torch.testing.assert_close(jv[x == 0], (dx * wb.expand_as(x))[x == 0], rtol=1e-13, atol=0)


def test_function_prelu_forms():
    assert function_prelu(torch.Tensor.prelu, (Input(0),), {"weight": Input(1)}) is not None
    assert function_prelu(torch.prelu, (), {"input": Input(0), "weight": Input(1)}) is not None
    assert function_prelu(F.prelu, (Input(0), 0.25), {}) is None
    assert function_prelu(F.prelu, (Input(0), Input(1)), {"bogus": 1}) is None
    assert function_prelu(F.relu, (Input(0),), {}) is None


@pytest.mark.parametrize("channels", [1, 3])
def test_functional_prelu_in_a_model(channels, monkeypatch):
    """F.prelu with the module's own weight, through the engine.  The lookup
    ``function_prelu`` is put in front of ``function_rule`` here: calls with two
    tensor inputs do not reach ``function_activation``."""
    def with_prelu(target, args, kwargs, values=(), active=()):
        return function_prelu(target, args, kwargs) or function_rule(target, args, kwargs, values, active)

    monkeypatch.setattr(hfopt.curvature, "function_rule", with_prelu)
    model = _random_slopes(make(FunctionalPReLU(channels)))
    x, y = randn(4, 2, 4, 3) * 2, labels(4, 3)
    check_exact(model, CE, x, y, tag="-activations")
    _closed_form_run(model, CE, x, y)
    model.weight.requires_grad_(False)
    check_exact(model, CE, x, y, tag="-activations")


# ----------------------------------------------------------------------------- lookups
def test_uncovered_forms_are_left_to_the_fallback():
    x = Input(0)
    assert module_activation(nn.Softmax()) is None  # dim=None: the deprecated implicit dim
    assert module_activation(nn.LogSoftmax()) is None
    assert function_activation(F.softmax, (x,), {"dim": None, "_stacklevel": 3, "dtype": None}) is None
    assert function_activation(F.softmax, (x,), {"dim": "channels"}) is None  # a named dim
    # A dtype casts: accepted only when the tensors show it is x's own.
    kw = {"dim": 1, "_stacklevel": 3, "dtype": torch.float64}
    assert function_activation(F.softmax, (x,), kw) is None
    assert function_activation(F.softmax, (x,), kw, [torch.zeros(2, 3, dtype=torch.float32)]) is None
    assert function_activation(F.softmax, (x,), kw, [torch.zeros(2, 3, dtype=torch.float64)]) is not None
    assert function_activation(torch.softmax, (x, 1, torch.float32), {}) is None
    assert function_activation(torch.clamp, (x, Input(1)), {}) is None  # tensor bounds
    assert function_activation(torch.clamp, (x,), {"min": None, "max": None}) is None
    assert function_activation(torch.clamp, (x,), {"min": True}) is None
    assert function_activation(F.hardtanh, (x,), {"min_val": -1.0, "bogus": 1}) is None
    assert function_activation(F.hardtanh, (x, -1.0, 1.0, False, 7), {}) is None  # too many arguments
    assert function_activation(F.softplus, (x,), {"beta": 2.0, "threshold": 10.0}) is not None
    assert function_activation(F.leaky_relu, (x, 0.2), {}) is not None


def test_softmax_dtype_equal_to_input_matches_autograd():
    x = randn(3, 5)
    rule = function_activation(F.softmax, (Input(0),), {"dim": 1, "_stacklevel": 3, "dtype": torch.float64}, [x])
    rule.setup([True], ())
    assert torch.equal(rule.forward([x], {}), F.softmax(x, 1, dtype=torch.float64))
