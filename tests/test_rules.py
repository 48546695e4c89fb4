"""Every closed-form rule, alone in a small model, against float64 autograd.

Layers whose input carries a direction sit behind another layer
(``Linear -> layer -> Linear``, ``Conv -> layer -> Flatten -> Linear``) so that
their residuals (second derivatives) enter the Hessian.  See conftest.py for the
references.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hfopt
from hfopt.rules import BatchNormRule

from conftest import (TOL, check_exact, labels, make, rand_vec, randn, record, ref_ggnvp, ref_grad, rel_err,
                      trainable)

CE = nn.CrossEntropyLoss()

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp_around(layer: nn.Module, width: int = 6, n_in: int = 4, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), layer, nn.Linear(width, classes))


def conv_around(layer: nn.Module, in_shape, cin: int = 2, cmid: int = 3, classes: int = 3, dim: int = 2,
                act: nn.Module = None) -> nn.Module:
    """``Conv -> [Tanh] -> layer -> Flatten -> Linear``; the head's width is measured."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](cin, cmid, 3, padding=1)
    body = nn.Sequential(conv, *([act] if act is not None else []), layer, nn.Flatten())
    with torch.no_grad():
        n = body(torch.zeros(2, *in_shape)).shape[1]
    return nn.Sequential(*body, nn.Linear(n, classes))


# ----------------------------------------------------------------------------- cases
def linear_cases():
    x = randn(6, 4)
    y = labels(6, 3)
    x3 = randn(4, 5, 4)  # [N, T, F]
    y3 = randn(4, 5, 3, seed=2)
    return {
        "linear-bias": (nn.Linear(4, 3), x, y, CE),
        "linear-nobias": (nn.Linear(4, 3, bias=False), x, y, CE),
        "linear-linear": (nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, bias=False)), x, y, CE),
        "linear-3d": (nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), x3, y3, nn.MSELoss()),
        "linear-3d-nobias": (nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 3, bias=False)), x3, y3,
                             nn.MSELoss(reduction="sum")),
    }


def conv_cases():
    cases = {}
    x1, x2, x3 = randn(4, 2, 9), randn(4, 2, 7, 6), randn(3, 2, 3, 4, 4)
    y = labels(4, 3)
    conv1d = {
        "stride2-pad1": nn.Conv1d(3, 4, 3, stride=2, padding=1),
        "same-k5-dil2": nn.Conv1d(3, 4, 5, padding="same", dilation=2),
        "valid-nobias": nn.Conv1d(3, 4, 3, padding="valid", bias=False),
        "groups": nn.Conv1d(3, 6, 3, groups=3, padding=2),
    }
    for k, layer in conv1d.items():
        cases[f"conv1d-{k}"] = (conv_around(layer, x1.shape[1:], dim=1, act=nn.Tanh()), x1, y, CE)
    conv2d = {
        "stride-pad": nn.Conv2d(4, 4, 3, stride=(2, 1), padding=(1, 2)),
        "same-k3": nn.Conv2d(4, 5, 3, padding="same"),
        "same-k5x3-dil": nn.Conv2d(4, 3, (5, 3), padding="same", dilation=(1, 2)),
        "valid": nn.Conv2d(4, 3, 2, padding="valid"),
        "dilation": nn.Conv2d(4, 3, 3, dilation=2, padding=1),
        "groups-nobias": nn.Conv2d(4, 6, 3, groups=2, bias=False, stride=2),
        "1x1": nn.Conv2d(4, 3, 1),
    }
    for k, layer in conv2d.items():
        cases[f"conv2d-{k}"] = (conv_around(layer, x2.shape[1:], cmid=4, act=nn.Tanh()), x2, y, CE)
    cases["conv2d-first-layer"] = (nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Flatten(),
                                                 nn.Linear(3 * 3 * 2, 3)), x2, y, CE)
    cases["conv3d"] = (conv_around(nn.Conv3d(3, 2, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)),
                                   x3.shape[1:], dim=3, act=nn.Tanh()), x3, labels(3, 3), CE)
    return cases


def bn_cases():
    cases = {}
    for train in (True, False):
        for affine in (True, False):
            t = f"{'train' if train else 'eval'}-{'affine' if affine else 'noaffine'}"
            cases[f"bn1d-NC-{t}"] = (mlp_around(nn.Sequential(nn.BatchNorm1d(6, affine=affine), nn.Tanh())),
                                     randn(6, 4), labels(6, 3), CE, train)
            cases[f"bn1d-NCL-{t}"] = (conv_around(nn.Sequential(nn.BatchNorm1d(3, affine=affine), nn.Sigmoid()),
                                                  (2, 5), dim=1), randn(4, 2, 5), labels(4, 3), CE, train)
            cases[f"bn2d-{t}"] = (conv_around(nn.Sequential(nn.BatchNorm2d(3, affine=affine), nn.Tanh()),
                                              (2, 4, 3)), randn(4, 2, 4, 3), labels(4, 3), CE, train)
            cases[f"bn3d-{t}"] = (conv_around(nn.Sequential(nn.BatchNorm3d(3, affine=affine), nn.Tanh()),
                                              (2, 2, 3, 3), dim=3), randn(3, 2, 2, 3, 3), labels(3, 3), CE, train)
        t = "train" if train else "eval"
        cases[f"bn2d-norunning-{t}"] = (
            conv_around(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.Tanh()), (2, 4, 3)),
            randn(4, 2, 4, 3), labels(4, 3), CE, train)
        cases[f"bn1d-norunning-noaffine-{t}"] = (
            mlp_around(nn.Sequential(nn.BatchNorm1d(6, affine=False, track_running_stats=False), nn.Tanh())),
            randn(6, 4), labels(6, 3), CE, train)
        # BatchNorm as the first layer: only gamma and beta carry directions.
        cases[f"bn1d-first-{t}"] = (nn.Sequential(nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)),
                                    randn(6, 4), labels(6, 3), CE, train)
        # The BatchNorm output straight into the loss (its output Hessian only).
        cases[f"bn1d-last-{t}"] = (nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), randn(6, 4), labels(6, 3),
                                   CE, train)
    return cases


def activation_cases():
    acts = {
        "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2), "elu": nn.ELU(0.7), "gelu": nn.GELU(),
        "gelu-tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
    }
    x = randn(8, 4) * 1.5
    return {k: (mlp_around(a), x, labels(8, 3), CE) for k, a in acts.items()}


def pooling_cases():
    x1, x2 = randn(4, 2, 9), randn(4, 2, 7, 6)
    y = labels(4, 3)
    pools2d = {
        "max2": nn.MaxPool2d(2),
        "max3s2-overlap": nn.MaxPool2d(3, stride=2),
        "max3s2-pad-ceil": nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        "max-dilation": nn.MaxPool2d(2, stride=1, dilation=2),
        "avg2-ceil": nn.AvgPool2d(2, ceil_mode=True),
        "avg3s2-pad-noinclude": nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        "avg3s2-pad-ceil-noinclude": nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        "avg-divisor": nn.AvgPool2d(2, divisor_override=3),
        "adaptive-3x2": nn.AdaptiveAvgPool2d((3, 4)),
        "adaptive-none": nn.AdaptiveAvgPool2d((None, 4)),
        "adaptive-1": nn.AdaptiveAvgPool2d(1),
    }
    pools1d = {
        "max3s2": nn.MaxPool1d(3, stride=2),
        "max3s2-pad-ceil": nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True),
        "avg3s2-pad-ceil-noinclude": nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        "avg2": nn.AvgPool1d(2),
        "adaptive-4": nn.AdaptiveAvgPool1d(4),
    }
    cases = {f"pool2d-{k}": (conv_around(p, x2.shape[1:], act=nn.Tanh()), x2, y, CE) for k, p in pools2d.items()}
    cases.update({f"pool1d-{k}": (conv_around(p, x1.shape[1:], dim=1, act=nn.Tanh()), x1, y, CE)
                  for k, p in pools1d.items()})
    # ReLU before max pooling: ties among zeros pick the same argmax as autograd.
    cases["pool2d-max-after-relu"] = (conv_around(nn.MaxPool2d(3, 2), x2.shape[1:], act=nn.ReLU()), x2, y, CE)
    return cases


def shape_cases():
    x = randn(6, 4)
    y = labels(6, 3)
    x2 = randn(4, 2, 5, 4)
    return {
        "flatten": (conv_around(nn.Identity(), x2.shape[1:], act=nn.Tanh()), x2, labels(4, 3), CE),
        "flatten-partial": (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(2),
                                          nn.Conv1d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 18, 3)), x2,
                            labels(4, 3), CE),
        "identity": (mlp_around(nn.Identity()), x, y, CE),
        "dropout-eval": (mlp_around(nn.Sequential(nn.Tanh(), nn.Dropout(0.4))).eval(), x, y, CE),
        "dropout-p0-train": (mlp_around(nn.Sequential(nn.Tanh(), nn.Dropout(0.0))), x, y, CE),
    }


# ----------------------------------------------------------------------------- functional glue
class Glue(nn.Module):
    """``fn(self, x)`` between two convolutions (``a`` and ``b`` see the input) and a
    linear head; the head's width is measured at construction."""

    def __init__(self, fn, in_shape=(2, 5, 4), classes=3):
        super().__init__()
        self.fn = fn
        self.a = nn.Conv2d(in_shape[0], 4, 3, padding=1)
        self.b = nn.Conv2d(in_shape[0], 4, 3, padding=1)
        with torch.no_grad():
            n = torch.flatten(fn(self, torch.zeros(2, *in_shape)), 1).shape[1]
        self.head = nn.Linear(n, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.fn(self, x), 1))


def _residual_add(m, x):
    out = m.a(x)
    out += m.b(x)
    return torch.tanh(out)


# In-place ops whose result is discarded: fx records them as new nodes while
# later code reads the old one, whose value eagerly was overwritten.
def _add_inplace_discarded(m, x):
    out = m.a(x)
    out.add_(m.b(x))
    return torch.tanh(out)


def _relu_inplace_discarded(m, x):
    out = m.a(x)
    F.relu(out, inplace=True)
    return out * m.b(x)


def _mul_inplace_discarded(m, x):
    out = m.a(x)
    out.mul_(torch.tanh(m.b(x)))
    return out


def _method_chain_inplace(m, x):
    out = m.a(x)
    out.add_(m.b(x)).mul_(2.0)
    torch.tanh_(out)
    return out


def _inplace_assigned(m, x):
    out = m.a(x).sub_(m.b(x))
    out = torch.relu_(out)
    return out.sigmoid()


GLUE = {
    "add_-discarded": _add_inplace_discarded,
    "F.relu-inplace-discarded": _relu_inplace_discarded,
    "mul_-discarded": _mul_inplace_discarded,
    "inplace-method-chain": _method_chain_inplace,
    "inplace-assigned": _inplace_assigned,
    "F.relu": lambda m, x: F.relu(m.a(x)),
    "torch.relu": lambda m, x: torch.relu(m.a(x)),
    "x.relu()": lambda m, x: m.a(x).relu(),
    "F.relu-inplace": lambda m, x: F.relu(m.a(x), inplace=True),
    "torch.tanh": lambda m, x: torch.tanh(m.a(x)),
    "x.sigmoid()": lambda m, x: m.a(x).sigmoid(),
    "F.gelu-tanh": lambda m, x: F.gelu(m.a(x), approximate="tanh"),
    "F.leaky_relu-positional": lambda m, x: F.leaky_relu(m.a(x), 0.3),
    "F.elu": lambda m, x: F.elu(m.a(x), alpha=0.5),
    "F.silu": lambda m, x: F.silu(m.a(x)),
    "out+=shortcut": _residual_add,
    "a+b": lambda m, x: torch.tanh(m.a(x)) + m.b(x),
    "a-b": lambda m, x: torch.tanh(m.a(x)) - m.b(x),
    "a*b": lambda m, x: torch.tanh(m.a(x)) * m.b(x),
    "x*x": lambda m, x: m.a(x) * m.a(x),
    "torch.add-alpha": lambda m, x: torch.tanh(torch.add(m.a(x), m.b(x), alpha=0.5)),
    "scalar-arith": lambda m, x: torch.tanh(2.0 * m.a(x) - 1.0) / 3.0 + 0.5,
    "broadcast-add": lambda m, x: torch.tanh(m.a(x) + m.b(x).mean((2, 3), keepdim=True)),
    "broadcast-mul": lambda m, x: m.a(x) * torch.sigmoid(m.b(x).mean((2, 3), keepdim=True)),
    "torch.cat": lambda m, x: torch.tanh(torch.cat([m.a(x), m.b(x)], 1)),
    "torch.cat-dim": lambda m, x: torch.cat((torch.tanh(m.a(x)), m.b(x)), dim=-1),
    "view-size": lambda m, x: torch.tanh(m.a(x)).view(x.size(0), -1),
    "view-active-size": lambda m, x: torch.tanh(m.a(x)).view(m.a(x).size(0), -1),
    "reshape-shape": lambda m, x: torch.tanh(m.a(x)).reshape(m.a(x).shape[0], -1),
    "torch.flatten": lambda m, x: torch.flatten(torch.tanh(m.a(x)), 1),
    "mean((2,3))": lambda m, x: torch.tanh(m.a(x)).mean((2, 3)),
    "sum-keepdim": lambda m, x: torch.tanh(m.a(x)).sum(-1, keepdim=True),
    "F.avg_pool2d-size": lambda m, x: F.avg_pool2d(torch.tanh(m.a(x)), m.a(x).size(3)),
    "F.max_pool2d": lambda m, x: F.max_pool2d(torch.tanh(m.a(x)), 2),
    "F.max_pool2d-kw": lambda m, x: F.max_pool2d(torch.tanh(m.a(x)), kernel_size=3, stride=2, padding=1),
    "F.avg_pool2d-kw": lambda m, x: F.avg_pool2d(torch.tanh(m.a(x)), 3, stride=2, padding=1,
                                                count_include_pad=False),
    "F.adaptive_avg_pool2d": lambda m, x: F.adaptive_avg_pool2d(torch.tanh(m.a(x)), (2, 3)),
    "F.max_pool1d": lambda m, x: F.max_pool1d(torch.tanh(m.a(x)).flatten(2), 3, 2, 1),
    "F.avg_pool1d-ceil": lambda m, x: F.avg_pool1d(torch.tanh(m.a(x)).flatten(2), 3, 2, ceil_mode=True),
    "F.adaptive_avg_pool1d": lambda m, x: F.adaptive_avg_pool1d(torch.tanh(m.a(x)).flatten(2), 7),
    "torch.mean": lambda m, x: torch.mean(torch.tanh(m.a(x)), (2, 3)),
    "torch.transpose": lambda m, x: torch.transpose(torch.tanh(m.a(x)), 1, 2),
    "permute": lambda m, x: torch.tanh(m.a(x)).permute(0, 2, 3, 1),
    "transpose": lambda m, x: torch.tanh(m.a(x)).transpose(1, 3),
    "slice": lambda m, x: torch.tanh(m.a(x))[:, :2],
    "slice-spatial": lambda m, x: torch.tanh(m.a(x))[:, 1:3, ::2, 1:],
    "unsqueeze-squeeze": lambda m, x: torch.tanh(m.a(x)).unsqueeze(1).squeeze(1),
    "neg": lambda m, x: -torch.tanh(m.a(x)),
    "F.dropout-eval": lambda m, x: F.dropout(torch.tanh(m.a(x)), 0.5, training=False),
    "contiguous": lambda m, x: torch.tanh(m.a(x)).permute(0, 2, 3, 1).contiguous(),
}


# ----------------------------------------------------------------------------- exactness
def _run(case, seed=None):
    model, x, y, loss = case[:4]
    model = make(model)
    if len(case) > 4:
        model.train(case[4])
    return check_exact(model, loss, x, y, seed=seed, tag="-rules")


@pytest.mark.parametrize("name", list(linear_cases()))
def test_linear(name):
    _run(linear_cases()[name])


@pytest.mark.parametrize("name", list(conv_cases()))
def test_conv(name):
    _run(conv_cases()[name])


@pytest.mark.parametrize("name", list(bn_cases()))
def test_batchnorm(name):
    _run(bn_cases()[name])


@pytest.mark.parametrize("name", list(activation_cases()))
def test_activation(name):
    _run(activation_cases()[name])


@pytest.mark.parametrize("name", list(pooling_cases()))
def test_pooling(name):
    _run(pooling_cases()[name])


@pytest.mark.parametrize("name", list(shape_cases()))
def test_shape(name):
    _run(shape_cases()[name])


@pytest.mark.parametrize("name", list(GLUE))
def test_functional_glue(name):
    model = Glue(GLUE[name]).double()
    x = randn(4, 2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed-form rules only: no fallback warning
        result = check_exact(model, CE, x, labels(4, 3), tag="-rules")
    for op in result["ops"].values():
        assert op.fallbacks == []


def test_glue_uses_rules_not_fallback():
    """Spot check of the dispatch itself: the glue above is served by closed-form rules."""
    from hfopt.rules.shape import AddRule, MulRule
    from hfopt.rules.pooling import AvgPoolRule
    model = Glue(lambda m, x: F.avg_pool2d(torch.tanh(m.a(x)) * m.b(x) + m.a(x), x.size(3))).double()
    op = hfopt.Hessian(model, CE, randn(4, 2, 5, 4), labels(4, 3))
    kinds = {type(s.rule) for s in op.steps}
    assert {AddRule, MulRule, AvgPoolRule} <= kinds
    assert op.fallbacks == []


def test_frozen_parameters():
    """Only some parameters trainable: bias-only directions of a first conv and a
    linear layer, a frozen BatchNorm gamma, in both modes."""
    model = make(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                               nn.Linear(3 * 3 * 2, 4), nn.Sigmoid(), nn.Linear(4, 3)))
    model[0].weight.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    model[4].weight.requires_grad_(False)
    x, y = randn(4, 2, 5, 4), labels(4, 3)
    for train in (True, False):
        check_exact(model.train(train), CE, x, y, tag="-rules")


# ----------------------------------------------------------------------------- fused runs
def _fused_model(dim, bn, pool, affine=True, frozen_gamma=False, first=True):
    conv_cls = nn.Conv2d if dim == 2 else nn.Conv1d
    conv = conv_cls(2, 3, 3, padding=1)
    bnl = (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(3, affine=affine)
    # first=False puts a layer in front, so the convolution's input carries a direction.
    layers = ([] if first else [conv_cls(2, 2, 1)]) + [conv] + ([bnl] if bn else []) + [nn.ReLU(), pool, nn.Flatten()]
    in_shape = (2, 7, 6) if dim == 2 else (2, 9)
    body = nn.Sequential(*layers)
    with torch.no_grad():
        n = body(torch.zeros(2, *in_shape)).shape[1]
    model = make(nn.Sequential(*layers, nn.Linear(n, 3)))
    if frozen_gamma and affine and bn:
        bnl.weight.requires_grad_(False)
    return model, randn(4, *in_shape)


FUSED_POOLS = {
    "max2": (2, lambda: nn.MaxPool2d(2)),
    "max3s2-pad": (2, lambda: nn.MaxPool2d(3, 2, padding=1)),
    "max3s2-ceil": (2, lambda: nn.MaxPool2d(3, 2, ceil_mode=True)),
    "max2-dilation": (2, lambda: nn.MaxPool2d(2, stride=1, dilation=2)),
    "max1d-3s2-pad": (1, lambda: nn.MaxPool1d(3, 2, padding=1)),
}


@pytest.mark.parametrize("first", [True, False], ids=["on-data", "inner"])
@pytest.mark.parametrize("variant", ["bn", "bn-noaffine", "bn-frozen-gamma", "relu-only"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", list(FUSED_POOLS))
def test_fused_relu_maxpool(pool, train, variant, first):
    """The fused Conv(data)->BatchNorm->ReLU->MaxPool, BatchNorm->ReLU->MaxPool and
    ReLU->MaxPool rules: exact, used, and equal to the per-layer rules (fuse=False)."""
    from hfopt.rules.fused import BNReLUMaxPoolRule, DataConvBNReLUMaxPoolRule, ReLUMaxPoolRule
    dim, make_pool = FUSED_POOLS[pool]
    model, x = _fused_model(dim, variant != "relu-only", make_pool(), affine=variant != "bn-noaffine",
                            frozen_gamma=variant == "bn-frozen-gamma", first=first)
    model.train(train)
    y = labels(4, 3)
    ops = check_exact(model, CE, x, y, tag="-fused")["ops"]
    if variant == "relu-only":
        want = ReLUMaxPoolRule
    else:  # the convolution joins only on the data, with train-mode statistics
        want = DataConvBNReLUMaxPoolRule if (first and train) else BNReLUMaxPoolRule
    v = rand_vec(model, 7)
    for kind, op in ops.items():
        assert any(type(s.rule) is want for s in op.steps), [type(s.rule).__name__ for s in op.steps]
        plain = type(op)(model, CE, x, y, fuse=False)
        assert not any(isinstance(s.rule, ReLUMaxPoolRule) for s in plain.steps)
        err = record("fused-vs-unfused", rel_err(op @ v, plain @ v))
        assert err < 1e-13, err


class SharedBNOutput(nn.Module):
    """BatchNorm's and ReLU's outputs also feed a second branch: no fusion there."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3 * 2, 3)

    def forward(self, x):
        b = self.bn(self.conv(x))
        r = F.relu(b)
        p = self.pool(r)
        q = self.pool(F.relu(torch.tanh(b)))
        return self.fc(torch.cat([p, q + F.avg_pool2d(r, 2)], 1).flatten(1))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fusion_respects_other_uses(train):
    check_exact(make(SharedBNOutput()).train(train), CE, randn(4, 2, 6, 6), labels(4, 3), tag="-fused")


class Unbatched(nn.Module):
    """One unbatched example [C, H, W] through ReLU -> MaxPool (no fusion: it
    indexes [N, C, positions])."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2 * 6 * 6)
        self.pool = nn.MaxPool2d(2)
        self.out = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.out(torch.flatten(self.pool(torch.relu(self.a(x).view(2, 6, 6))), 0))


def test_unbatched_relu_maxpool():
    check_exact(Unbatched().double(), CE, randn(4), torch.tensor(2), tag="-fused")


# ----------------------------------------------------------------------------- dropout
def test_dropout_train_mask_matches_torch_rng():
    """Train-mode dropout: the operator draws its mask at build from torch's global
    generator exactly as F.dropout does on the CPU (``empty_like(x).bernoulli_(1-p)
    / (1-p)``).  Seeding before the build and before the reference forward gives
    the same mask, so the products are those of the objective with that mask."""
    model = make(mlp_around(nn.Sequential(nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 6), nn.Dropout(0.3))))
    x, y = randn(8, 4), labels(8, 3)
    check_exact(model, CE, x, y, seed=1234, tag="-rules")
    # The mask really drops something, and it is the one F.dropout draws.
    torch.manual_seed(7)
    op = hfopt.GGN(model, CE, x, y)
    after_build = torch.get_rng_state()
    torch.manual_seed(7)
    with torch.no_grad():
        ref = model(x)
    # Same draws, same arithmetic: the output is bitwise the eager one, and the
    # build consumed exactly what the eager forward consumes.
    assert torch.equal(op.output, ref)
    assert torch.equal(after_build, torch.get_rng_state())
    # Products never draw again: the mask is fixed for the operator's lifetime.
    op @ rand_vec(model)
    assert torch.equal(after_build, torch.get_rng_state())
    masks = [s.rule.mask for s in op.steps if hasattr(s.rule, "mask")]
    assert len(masks) == 2 and all((m == 0).any() for m in masks)
    # Without re-seeding, the reference draws another mask: the check is sensitive.
    v = rand_vec(model)
    assert rel_err(op @ v, ref_ggnvp(model, CE, x, y, v)) > 1e-3


def test_functional_dropout_train_mask_matches_torch_rng():
    model = Glue(lambda m, x: F.dropout(torch.tanh(m.a(x)), 0.5)).double()  # F.dropout defaults to training
    check_exact(model, CE, randn(4, 2, 5, 4), labels(4, 3), seed=99, tag="-rules")


# ----------------------------------------------------------------------------- BatchNorm blocks
def _bn_phi_reference(x, gamma, beta, g, train, rm, rv, eps=1e-5):
    """Autograd on ``phi = sum(g * bn(x; gamma, beta))``."""
    x = x.clone().requires_grad_(True)
    gamma = gamma.clone().requires_grad_(True)
    y = F.batch_norm(x, None if train else rm, None if train else rv, gamma, beta, train, 0.1, eps)
    phi = (g * y).sum()
    gx, ggamma = torch.autograd.grad(phi, (x, gamma), create_graph=True)
    return x, gamma, y, gx, ggamma


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_rule_blocks(train):
    """The BatchNorm rule alone at [N,C,H,W]: JVP, VJP and each second-derivative
    block (input-input, input-gamma, gamma-input, gamma-gamma) of
    ``phi = sum(g * bn(x))`` against reverse-over-reverse."""
    gen = torch.Generator().manual_seed(3)
    N, C, H, W = 3, 4, 3, 2
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, g, dx = r(N, C, H, W) * 2 + 0.5, r(N, C, H, W), r(N, C, H, W)
    gamma, beta, dgamma, dbeta = 1 + 0.3 * r(C), r(C), r(C), r(C)
    rm, rv = 0.3 * r(C), 0.5 + r(C).abs()
    rule = BatchNormRule(1e-5, train, rm, rv)
    rule.setup([True], ("weight", "bias"))
    y = rule.forward([x], {"weight": gamma, "bias": beta})
    xr, gr, yr, gx, ggamma = _bn_phi_reference(x, gamma, beta, g, train, rm, rv)
    assert rel_err([y], [yr.detach()]) < 1e-14

    def err(kind, a, b):
        e = rel_err([a], [b.detach()])
        record(f"bn-block-{kind}", e)
        assert e < TOL, (kind, e)

    # First order: VJP against autograd, JVP against the double-vjp trick.
    gin, gp = rule.vjp(g, [True], ("weight", "bias"))
    err("vjp-x", gin[0], gx)
    err("vjp-gamma", gp["weight"], ggamma)
    err("vjp-beta", gp["bias"], g.sum((0, 2, 3)))
    xs = [x.clone().requires_grad_(), gamma.clone().requires_grad_(), beta.clone().requires_grad_()]
    yy = F.batch_norm(xs[0], None if train else rm, None if train else rv, xs[1], xs[2], train, 0.1, 1e-5)
    u = torch.zeros_like(yy, requires_grad=True)
    vj = torch.autograd.grad(yy, xs, u, create_graph=True)
    jv = torch.autograd.grad(vj, u, (dx, dgamma, dbeta))[0]
    err("jvp", rule.jvp([dx], {"weight": dgamma, "bias": dbeta}), jv)

    # input-input: d2phi/dx2 dx
    (rx,), rp = rule.residual(g, [dx], {}, [True], ("weight", "bias"))
    if train:
        err("xx", rx, torch.autograd.grad(gx, xr, dx, retain_graph=True)[0])
    else:  # affine in x: no input-input block
        assert rx is None or rx.abs().max() == 0
        assert torch.autograd.grad(gx, xr, dx, retain_graph=True, allow_unused=True)[0] is None
    # gamma-input: d2phi/dgamma dx (the gamma part of the residual from an input direction)
    err("gamma-x", rp["weight"], torch.autograd.grad(gx, gr, dx, retain_graph=True)[0])
    # input-gamma: d2phi/dx dgamma (the input part of the residual from a gamma direction)
    (rx,), rp = rule.residual(g, [None], {"weight": dgamma}, [True], ("weight", "bias"))
    err("x-gamma", rx, torch.autograd.grad(ggamma, xr, dgamma, retain_graph=True)[0])
    # gamma-gamma: zero (y is linear in gamma); beta has no second derivative.
    assert rp.get("weight") is None or rp["weight"].abs().max() == 0
    assert rp.get("bias") is None
    # The fused product J^T h + residual equals the two parts.
    h = r(N, C, H, W)
    (fx_,), fp = rule.hessian_vjp(h, g, [dx], {"weight": dgamma}, [True], ("weight", "bias"))
    (vx,), vp = rule.vjp(h, [True], ("weight", "bias"))
    (qx,), qp = rule.residual(g, [dx], {"weight": dgamma}, [True], ("weight", "bias"))
    err("fused-x", fx_, vx + (0 if qx is None else qx))
    err("fused-gamma", fp["weight"], vp["weight"] + qp.get("weight", 0))
    err("fused-beta", fp["bias"], vp["bias"])


# ----------------------------------------------------------------------------- finite differences
def test_finite_difference_spot_check():
    """H v against central differences of autograd gradients (train-mode BN, smooth net)."""
    model = make(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                               nn.Conv2d(3, 3, 3, stride=2), nn.BatchNorm2d(3), nn.Sigmoid(),
                               nn.Flatten(), nn.Linear(3 * 2 * 2, 3)))
    x, y = randn(4, 2, 6, 6), labels(4, 3)
    v = rand_vec(model, seed=5)
    hv = hfopt.Hessian(model, CE, x, y) @ v
    eps = 1e-5

    def grad_at(sign):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(trainable(m), v):
                p.add_(sign * eps * d)
        return ref_grad(m, CE, x, y)

    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(1), grad_at(-1))]
    e = record("finite-difference", rel_err(hv, fd))
    assert e < 1e-6, e


# ----------------------------------------------------------------------------- fallback
class Scale(nn.Module):
    """A custom childless module with a parameter and no rule."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(0.3 * torch.randn(n))

    def forward(self, x):
        return x * self.scale.atan()


def _hfopt_warnings(record_):
    return [w for w in record_ if "hfopt" in str(w.message)]


# A module without a rule is traced into, and only its one unruled call falls
# back: torch's own (CELU's F.celu, Softsign's F.softsign) or a custom layer's.
@pytest.mark.parametrize("layer,name", [(nn.CELU(0.7), "celu"), (nn.Softsign(), "softsign"),
                                        (Scale(6), "atan")],
                         ids=["CELU", "Softsign", "custom-Scale"])
def test_fallback_module(layer, name):
    model = mlp_around(layer).double()
    x, y = randn(8, 4), labels(8, 3)
    for cls in (hfopt.GGN, hfopt.Hessian):
        with pytest.warns(UserWarning, match=name) as rec:
            op = cls(model, CE, x, y)
        assert len(_hfopt_warnings(rec)) == 1, [str(w.message) for w in rec]
        assert _hfopt_warnings(rec)[0].filename == __file__  # points at the caller's line
        assert len(op.fallbacks) == 1 and name in op.fallbacks[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_exact(model, CE, x, y, n_vectors=2, tag="-fallback")


class ReLUInplaceDiscarded(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        self.relu(h)  # result discarded: h itself was overwritten
        return self.out(h)


def test_inplace_module_result_discarded():
    check_exact(ReLUInplaceDiscarded().double(), CE, randn(8, 4), labels(8, 3), tag="-rules")


@pytest.mark.parametrize("layer", [nn.Hardswish(inplace=True), nn.SELU(inplace=True)], ids=["Hardswish", "SELU"])
def test_fallback_inplace_module(layer):
    """An in-place module without a rule must not overwrite the input the fallback
    differentiates at."""
    model = mlp_around(layer).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_exact(model, CE, randn(8, 4) * 3, labels(8, 3), tag="-fallback")


class UntraceableDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.4)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if x.sum() > 0:
            h = self.drop(h)
        return self.out(h)


@pytest.mark.parametrize("model", [
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(16, 3)),
    lambda: mlp_around(nn.Sequential(nn.SELU(), nn.AlphaDropout(0.3))),
    lambda: mlp_around(nn.RReLU()),
    lambda: UntraceableDropout(),
], ids=["Dropout2d", "AlphaDropout", "RReLU", "untraceable-Dropout"])
def test_fallback_random_layers(model):
    """A random layer served by the fallback (train mode) draws its numbers once,
    in the model's order, and every product replays them: products equal autograd
    on a reference forward with the same seed."""
    model = model().double().train()
    x = randn(6, 2, 4, 4) if isinstance(model[0] if isinstance(model, nn.Sequential) else None, nn.Conv2d) \
        else randn(6, 4).abs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_exact(model, CE, x, labels(6, 3), seed=11, n_vectors=2, tag="-fallback")
    # The global generator is left where the forward left it.
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = hfopt.GGN(model, CE, x, labels(6, 3))
    after_build = torch.get_rng_state()
    op @ rand_vec(model)
    assert torch.equal(torch.get_rng_state(), after_build)


def test_conv_padding_forms_outside_the_conv_rule():
    """'same' with an even kernel pads asymmetrically: the conv is traced into and
    its F.conv2d falls back, exactly.  'reflect' padding is traced into its
    F.pad and F.conv2d, both closed forms."""
    x, y = randn(4, 2, 5, 4), labels(4, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'")  # torch's own, about speed
        model = conv_around(nn.Conv2d(3, 3, 2, padding="same"), (2, 5, 4), act=nn.Tanh()).double()
        with pytest.warns(UserWarning, match="conv2d"):
            op = hfopt.GGN(model, CE, x, y)
        assert len(op.fallbacks) == 1 and "conv2d" in op.fallbacks[0]
        check_exact(model, CE, x, y, tag="-fallback")
    model = conv_around(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 4), act=nn.Tanh()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_exact(model, CE, x, y, tag="-rules")["ops"]["ggn"].fallbacks == []


def test_fallback_function():
    """A function without a rule on an active tensor (torch.atan, F.softsign)."""
    model = Glue(lambda m, x: F.softsign(m.a(x)) * torch.atan(-m.b(x) ** 2)).double()
    with pytest.warns(UserWarning) as rec:
        op = hfopt.Hessian(model, CE, randn(4, 2, 5, 4), labels(4, 3))
    named = sorted(str(w.message).split(" for ")[1].split(";")[0] for w in _hfopt_warnings(rec))
    assert named == ["atan", "softsign"]
    assert len(op.fallbacks) == 2 and all(any(n in f for f in op.fallbacks) for n in named)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_exact(model, CE, randn(4, 2, 5, 4), labels(4, 3), tag="-fallback")


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if x.sum() > 0:
            h = torch.tanh(h)
        else:
            h = torch.sigmoid(h)
        return self.out(torch.tanh(self.bn1(self.fc(h.flatten(1)))))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sign", [1, -1], ids=["pos", "neg"])
def test_fallback_untraceable_model(train, sign):
    """One whole-model fallback, exact, also through train-mode BatchNorm, without
    touching the running statistics."""
    model = make(Untraceable()).train(train)
    x, y = sign * (randn(4, 2, 4, 4).abs() + 0.1), labels(4, 3)
    with pytest.warns(UserWarning, match="Untraceable") as rec:
        op = hfopt.Hessian(model, CE, x, y)
    assert len(_hfopt_warnings(rec)) == 1
    assert len(op.fallbacks) == 1 and "Untraceable" in op.fallbacks[0] and "fx" in op.fallbacks[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_exact(model, CE, x, y, tag="-fallback")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv_kw", [dict(stride=2, padding=2, dilation=2), dict(padding=0)], ids=["s2d2", "valid"])
def test_fused_conv_on_data_geometry(conv_kw, bias):
    """The first-layer fusion's precomputed contractions (K1, patch sums, patch
    Gram) under stride, dilation, padding and without a conv bias."""
    from hfopt.rules.fused import DataConvBNReLUMaxPoolRule
    layers = [nn.Conv2d(2, 3, 3, bias=bias, **conv_kw), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
              nn.Flatten()]
    with torch.no_grad():
        n = nn.Sequential(*layers)(torch.zeros(2, 2, 11, 10)).shape[1]
    model = make(nn.Sequential(*layers, nn.Linear(n, 3)))
    x, y = randn(5, 2, 11, 10), labels(5, 3)
    ops = check_exact(model, CE, x, y, tag="-fused")["ops"]
    v = rand_vec(model, 3)
    for op in ops.values():
        assert type(op.steps[0].rule) is DataConvBNReLUMaxPoolRule
        plain = type(op)(model, CE, x, y, fuse=False)
        assert rel_err(op @ v, plain @ v) < 1e-13
