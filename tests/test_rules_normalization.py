"""LayerNorm, GroupNorm, InstanceNorm and weight normalization
(:mod:`hfopt.rules.normalization`) against float64 autograd.

Every normalization sits behind a layer, so its input carries a direction and
its second derivative enters the Hessian; several models hold a BatchNorm too.
The rules themselves are also checked product by product (JVP, VJP, residual)
against autograd on the layer's own function, including channels-last inputs.

Weight normalization's Hessian references differentiate ``g v / ||v||`` as
written, not ``torch._weight_norm``: in torch 2.13 autograd's second derivative
of its fused kernel (``dim`` 0 or the last one, the parametrization's default)
is wrong in the ``v``-``v`` block (finite differences agree with the formula).
"""
from __future__ import annotations

import sys
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

import hfopt
from hfopt.rules import Input, function_rule, module_rule
from hfopt.rules.normalization import NormalizationRule, WeightNormRule

from autograd_guard import forbid_autograd
from conftest import (check_exact, labels, make, rand_vec, randn, record, ref_ggnvp, ref_grad, ref_hvp,
                      ref_loss_output, rel_err)

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()

pytestmark = pytest.mark.usefixtures("single_thread")


def _randomize(model: nn.Module, seed: int = 5) -> nn.Module:
    """Non-trivial affine parameters and running statistics for the
    normalizations (``make`` randomizes BatchNorm only)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model


def _model(m: nn.Module, train: bool = True) -> nn.Module:
    return _randomize(make(m)).train(train)


def conv_around(layer: nn.Module, in_shape, cmid: int = 4, dim: int = 2, bn: bool = False) -> nn.Module:
    """``Conv -> [BatchNorm] -> layer -> Tanh -> Flatten -> Linear``."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](2, cmid, 3, padding=1)
    bnorm = [{1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](cmid)] if bn else []
    body = nn.Sequential(conv, *bnorm, layer, nn.Tanh(), nn.Flatten())
    with torch.no_grad():
        n = body.eval()(torch.zeros(2, *in_shape)).shape[1]
    return nn.Sequential(*body, nn.Linear(n, 3)).train()


class ChannelsLastLN(nn.Module):
    """ConvNeXt's LayerNorm over channels: permute to [N, H, W, C] and back."""

    def __init__(self, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(4, elementwise_affine=affine)
        self.head = nn.Linear(4 * 4 * 3, 3)

    def forward(self, x):
        h = self.bn(self.conv(x)).permute(0, 2, 3, 1)
        h = self.norm(h).permute(0, 3, 1, 2)
        return self.head(torch.tanh(h).flatten(1))


class Functional(nn.Module):
    """``F.layer_norm``/``F.group_norm``/``F.instance_norm`` with this module's
    parameters (and running statistics) as arguments."""

    def __init__(self, kind: str, affine: bool = True):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        shape = (4, 3) if kind == "layer" else (4,)
        self.w = nn.Parameter(1 + 0.3 * torch.randn(shape)) if affine else None
        self.b = nn.Parameter(0.3 * torch.randn(shape)) if affine else None
        self.register_buffer("rm", 0.2 * torch.randn(4))
        self.register_buffer("rv", 0.5 + torch.rand(4))
        self.head = nn.Linear(4 * 4 * 3, 3)

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "layer":
            h = F.layer_norm(h, (4, 3), self.w, self.b, 1e-3)
        elif self.kind == "group":
            h = F.group_norm(h, 2, self.w, self.b, eps=1e-4)
        else:
            h = F.instance_norm(h, self.rm, self.rv, self.w, self.b, use_input_stats=self.training, eps=1e-4)
        return self.head(torch.tanh(h).flatten(1))


class WeightNormed(nn.Module):
    """``torch._weight_norm`` in a custom forward, on a conv and a linear weight."""

    def __init__(self, dim: int = 0):
        super().__init__()
        self.dim = dim
        self.v = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.4)
        self.g = nn.Parameter(torch.norm_except_dim(self.v.detach(), 2, dim) * 1.3)
        self.bn = nn.BatchNorm2d(4)
        self.lv = nn.Parameter(torch.randn(3, 4 * 4 * 3) * 0.3)
        self.lg = nn.Parameter(torch.rand(3, 1) + 0.5)

    def forward(self, x):
        h = torch.tanh(self.bn(F.conv2d(x, torch._weight_norm(self.v, self.g, self.dim), padding=1)))
        return F.linear(h.flatten(1), torch._weight_norm(self.lv, self.lg, 0))


class Unbatched(nn.Module):
    """One unbatched example [C, L] through an InstanceNorm1d."""

    def __init__(self, **kw):
        super().__init__()
        self.a = nn.Linear(4, 3 * 5)
        self.norm = nn.InstanceNorm1d(3, **kw)
        self.head = nn.Linear(3 * 5, 3)

    def forward(self, x):
        return self.head(torch.flatten(torch.tanh(self.norm(self.a(x).view(3, 5))), 0))


# ----------------------------------------------------------------------------- cases
def cases():
    out = {}
    tokens, ty = randn(3, 5, 4), randn(3, 5, 3, seed=2)
    for name, kw in {"affine": {}, "noaffine": {"elementwise_affine": False}, "nobias": {"bias": False}}.items():
        out[f"ln-last-{name}"] = (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, eps=1e-3, **kw), nn.Tanh(),
                                                nn.Linear(6, 3)), tokens, ty, MSE)
        out[f"ln-last2-{name}"] = (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm((5, 6), **kw), nn.Tanh(),
                                                 nn.Flatten(), nn.Linear(30, 3)), tokens, labels(3, 3), CE)
    out["ln-convnext"] = (ChannelsLastLN(), randn(3, 2, 4, 3), labels(3, 3), CE)
    out["ln-convnext-noaffine"] = (ChannelsLastLN(affine=False), randn(3, 2, 4, 3), labels(3, 3), CE)
    x2 = randn(3, 2, 4, 3)
    for G in (1, 2, 4):
        for affine in (True, False):
            out[f"gn-G{G}-{'affine' if affine else 'noaffine'}"] = (
                conv_around(nn.GroupNorm(G, 4, affine=affine), (2, 4, 3), bn=G == 2), x2, labels(3, 3), CE)
    shapes = {1: (2, 5), 2: (2, 4, 3), 3: (2, 2, 3, 2)}
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
    for dim in (1, 2, 3):
        x = randn(3, *shapes[dim])
        for affine in (True, False):
            for track in (True, False):
                for train in (True, False):
                    tag = f"in{dim}d-{'affine' if affine else 'noaffine'}-{'track' if track else 'notrack'}-" \
                          f"{'train' if train else 'eval'}"
                    layer = cls[dim](4, affine=affine, track_running_stats=track)
                    out[tag] = (conv_around(layer, shapes[dim], dim=dim, bn=dim == 2), x, labels(3, 3), CE, train)
    for train in (True, False):
        t = "train" if train else "eval"
        out[f"in1d-unbatched-track-{t}"] = (Unbatched(affine=True, track_running_stats=True), randn(4),
                                            torch.tensor(1), CE, train)
    out["in1d-unbatched-noaffine"] = (Unbatched(), randn(4), torch.tensor(2), CE)
    for kind in ("layer", "group", "instance"):
        for train in (True, False):
            out[f"F.{kind}_norm-{'train' if train else 'eval'}"] = (Functional(kind), x2, labels(3, 3), CE, train)
        out[f"F.{kind}_norm-noaffine"] = (Functional(kind, affine=False), x2, labels(3, 3), CE)
    return out


CASES = cases()


def _closed_form_run(model: nn.Module, loss_fn, x, y) -> None:
    """Both operators built and applied without autograd and without a fallback
    (tests/test_no_autograd.py's check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with forbid_autograd() as guard:
            for cls in (hfopt.GGN, hfopt.Hessian):
                op = cls(model, loss_fn, x, y)
                op @ rand_vec(model, seed=3)
                op.gradient()
                assert op.fallbacks == []
    assert sum(guard.calls.values()) == 0, guard.calls


@pytest.mark.parametrize("name", list(CASES))
def test_exact(name):
    model, x, y, loss = CASES[name][:4]
    model = _model(model, *CASES[name][4:])
    check_exact(model, loss, x, y, tag="-norm")
    _closed_form_run(model, loss, x, y)


@pytest.mark.parametrize("name", ["ln-convnext", "gn-G2-affine", "in2d-affine-track-train", "in2d-affine-track-eval",
                                  "F.group_norm-train"])
def test_exact_channels_last(name):
    """The engine's channels-last layout (its default for CPU float32 maps)."""
    model, x, y, loss = CASES[name][:4]
    check_exact(_model(model, *CASES[name][4:]), loss, x, y, tag="-norm", channels_last=True)


# ----------------------------------------------------------------------------- weight normalization
def _weight_norm_as_written(v, g, dim=0):
    """``torch._weight_norm`` by its definition, for the autograd references."""
    dims = list(range(v.dim())) if dim == -1 else [i for i in range(v.dim()) if i != dim % v.dim()]
    n = torch.linalg.vector_norm(v, 2, dims, keepdim=True) if dims else v.abs()
    return v * (g.reshape(n.shape) / n)


def weight_norm_cases():
    x = randn(3, 2, 4, 3)
    lin = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), weight_norm(nn.Linear(6, 5)), nn.BatchNorm1d(5), nn.Tanh(),
                        weight_norm(nn.Linear(5, 3, bias=False), dim=1))
    conv = nn.Sequential(weight_norm(nn.Conv2d(2, 4, 3, padding=1)), nn.BatchNorm2d(4), nn.Tanh(),
                         weight_norm(nn.Conv2d(4, 3, 3, stride=2), dim=None), nn.Flatten(), nn.Linear(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook form is deprecated
        hook = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.utils.weight_norm(nn.Linear(6, 3)))
    return {
        "torch._weight_norm-dim0": (WeightNormed(0), x, {}),
        "torch._weight_norm-dim1": (WeightNormed(1), x, {}),
        "torch._weight_norm-whole": (WeightNormed(-1), x, {}),
        "parametrization-linear": (lin, randn(6, 4), {}),
        "parametrization-conv": (conv, x, {}),
        "parametrization-conv-channels_last": (conv, x, {"channels_last": True}),
        "hook-linear": (hook, randn(6, 4), {}),
    }


@pytest.mark.parametrize("name", list(weight_norm_cases()))
def test_weight_norm_exact(name):
    model, x, kw = weight_norm_cases()[name]
    model, y = make(model), labels(x.shape[0], 3)
    check_exact(model, CE, x, y, hessian=False, tag="-norm", **kw)
    _closed_form_run(model, CE, x, y)
    hess, ggn = hfopt.Hessian(model, CE, x, y, **kw), hfopt.GGN(model, CE, x, y, **kw)
    v = rand_vec(model, seed=100)
    # The hook form (torch.nn.utils.weight_norm) calls its own import of it.
    with mock.patch.object(torch, "_weight_norm", _weight_norm_as_written), \
            mock.patch.object(sys.modules["torch.nn.utils.weight_norm"], "_weight_norm", _weight_norm_as_written):
        err = rel_err(hess @ v, ref_hvp(model, CE, x, y, v))
        ggn_err = rel_err(ggn @ v, ref_ggnvp(model, CE, x, y, v))
        assert rel_err([hess.output], [ref_loss_output(model, CE, x, y)[1]]) < 1e-12
        assert rel_err(hess.gradient(), ref_grad(model, CE, x, y)) < 1e-10
    record("hessian-norm", err)
    assert err < 1e-10 and ggn_err < 1e-10, (err, ggn_err)


# ----------------------------------------------------------------------------- the rules alone
def _grads(out, wrt, cot, create_graph=False):
    if isinstance(out, list):  # a gradient that is constant (a bias's) has no second derivative
        out, cot = zip(*[(o, c) for o, c in zip(out, cot) if o.requires_grad])
    gs = torch.autograd.grad(out, wrt, cot, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, gs)]


def _err(kind: str, got, want) -> None:
    got = torch.zeros_like(want) if got is None else got
    # Relative, with a floor: an exactly zero product (a bias's second derivative,
    # the v-gradient of a one-element weight-norm slice) is rounding noise in autograd.
    err = ((got - want).norm() / max(want.norm().item(), 1e-3)).item()
    record(f"rule-{kind}", err)
    assert err < 1e-10, f"{kind} off by {err:.3e}"


def _check_rule(rule, fn, inputs, params, seed: int = 0) -> None:
    """JVP, VJP, residual and the Hessian step of ``rule`` against autograd on
    ``fn(*inputs, **params)``; every input and parameter carries a direction."""
    gen = torch.Generator().manual_seed(1000 + seed)  # not conftest.randn's seeds: dx = x would be degenerate
    like = lambda t: torch.randn(tuple(t.shape), generator=gen, dtype=t.dtype)  # noqa: E731
    names = [n for n, p in params.items() if p is not None]
    prim = [t.detach().clone().requires_grad_() for t in list(inputs) + [params[n] for n in names]]
    k = len(inputs)
    y = fn(*prim[:k], **dict(zip(names, prim[k:])))
    dirs, g, h = [like(t) for t in prim], like(y), like(y)
    # J v by the double-vjp trick; the residual is the Hessian of <g, y> times v.
    u = torch.zeros_like(y, requires_grad=True)
    jv = _grads(_grads(y, prim, u, create_graph=True), [u], dirs)[0]
    vjp = _grads(y, prim, h, create_graph=True)
    res = _grads(_grads(y, prim, g, create_graph=True), prim, dirs)

    rule.setup([True] * k, tuple(names))
    out = rule.forward(list(inputs), {n: params[n] for n in rule.param_names})
    _err("output", out, y.detach())
    din, dpar = dirs[:k], dict(zip(names, dirs[k:]))
    _err("jvp", rule.jvp(din, dpar), jv)
    gin, gpar = rule.vjp(h, [True] * k, names)
    rin, rpar = rule.residual(g, din, dpar, [True] * k, names)
    hin, hpar = rule.hessian_vjp(h, g, din, dpar, [True] * k, names)
    for i, n in enumerate([*range(k), *names]):
        j = i if i < k else None
        _err("vjp", gin[j] if j is not None else gpar.get(n), vjp[i])
        _err("residual", rin[j] if j is not None else rpar.get(n), res[i])
        _err("hessian_vjp", hin[j] if j is not None else hpar.get(n), vjp[i] + res[i])


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["layer", "group", "instance", "instance-running"])
def test_rule_products(kind, layout):
    x = _channels_last(randn(3, 4, 3, 2)) if layout == "channels_last" else randn(3, 4, 3, 2)
    pshape = (3, 2) if kind == "layer" else (4,)
    params = {"weight": 1 + 0.3 * randn(*pshape, seed=1), "bias": 0.3 * randn(*pshape, seed=2)}
    rm, rv = 0.2 * randn(4, seed=3), 0.5 + randn(4, seed=4).abs()
    rule, fn = {
        "layer": (NormalizationRule.layer((3, 2), 1e-3), lambda x, **p: F.layer_norm(x, (3, 2), eps=1e-3, **p)),
        "group": (NormalizationRule.group(2, 1e-3), lambda x, **p: F.group_norm(x, 2, eps=1e-3, **p)),
        "instance": (NormalizationRule.instance(1e-3), lambda x, **p: F.instance_norm(x, eps=1e-3, **p)),
        "instance-running": (NormalizationRule.instance(1e-3, False, running_mean=rm, running_var=rv),
                             lambda x, **p: F.instance_norm(x, rm, rv, use_input_stats=False, eps=1e-3, **p)),
    }[kind]
    _check_rule(rule, fn, [x], params)


@pytest.mark.parametrize("dim,shape", [(0, (4, 3, 2)), (1, (4, 3, 2)), (2, (4, 3, 2)), (-2, (4, 3, 2)),
                                       (-1, (4, 3, 2)), (0, (5,))])
def test_weight_norm_rule(dim, shape):
    v = randn(*shape)
    n = torch.norm_except_dim(v, 2, dim)
    g = n * (1 + randn(n.numel(), seed=1).abs().reshape(n.shape))
    rule = WeightNormRule(dim, v=Input(0), g=Input(1))
    _check_rule(rule, lambda v, g: _weight_norm_as_written(v, g, dim), [v, g], {})
    # The residual is the derivative of the rule's own VJP (finite differences).
    gen = torch.Generator().manual_seed(7)
    dv, dg, c = (torch.randn(tuple(t.shape), generator=gen, dtype=t.dtype) for t in (v, g, v))

    def vjp_at(step):
        rule.forward([v + step * dv, g + step * dg], {})
        return rule.vjp(c, [True, True], ())[0]

    fd = [(a - b) / 2e-6 for a, b in zip(vjp_at(1e-6), vjp_at(-1e-6))]
    rule.forward([v, g], {})
    for got, want in zip(rule.residual(c, [dv, dg], {}, [True, True], ())[0], fd):
        assert (got - want).norm() <= 1e-6 * max(want.norm().item(), 1.0)
    # The function lookup follows the markers: here g is the call's first tensor.
    rule = function_rule(torch._weight_norm, (Input(1), Input(0)), {"dim": dim}, [g, v], [True, True])
    _check_rule(rule, lambda g, v: _weight_norm_as_written(v, g, dim), [g, v], {}, seed=1)


def test_lookups_refuse_uncovered_forms():
    x, w = randn(2, 4, 3), randn(4)
    v, g = randn(3, 4), randn(3)  # g of shape [3] broadcasts w to [3, 3]: not covered
    assert function_rule(torch._weight_norm, (Input(0), Input(1), 0), {}, [v, g], [True, True]) is None
    # Statistics that carry a direction are not running statistics.
    args = (Input(0), Input(1), Input(2))
    assert function_rule(F.instance_norm, args, {"use_input_stats": False}, [x, w, w.abs()],
                         [True, True, False]) is None
    # The parametrization's module is traced into: it calls torch._weight_norm.
    assert module_rule(_WeightNorm(0)) is None
    assert module_rule(nn.LayerNorm(3)) is not None and module_rule(nn.GroupNorm(2, 4)) is not None


def test_errors_match_torch():
    rule = NormalizationRule.group(3, 1e-5)
    rule.setup([True], ())
    with pytest.raises(ValueError, match="divisible"):
        rule.forward([randn(2, 4, 3)], {"weight": None, "bias": None})
    rule = module_rule(nn.InstanceNorm2d(4))
    rule.setup([True], ())
    with pytest.raises(ValueError, match="spatial"):
        rule.forward([randn(2, 4, 1, 1)], {"weight": None, "bias": None})
