"""var/std/var_mean/std_mean (hfopt/rules/moments.py) and the smooth elementwise
maps (sqrt, rsqrt, exp, log, reciprocal, square, x ** c) against float64
autograd, with no fallback and no autograd call."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hfopt
from autograd_guard import forbid_autograd
from conftest import check_exact, labels, make, randn

CE = nn.CrossEntropyLoss()
pytestmark = pytest.mark.usefixtures("single_thread")


class Glue(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fn = fn
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        return self.fc(self.fn(torch.tanh(self.bn(self.a(x)))).flatten(1))


def _standardize(h):
    v, m = torch.var_mean(h, dim=[2, 3], keepdim=True)
    return (h - m) / torch.sqrt(v + 1e-5)


def _std_scale(h):
    s, m = torch.std_mean(h, dim=1, keepdim=True)
    return (h - m) * s


CASES = {
    "var-dims-keepdim": lambda h: h - torch.var(h, dim=(2, 3), keepdim=True),
    "var-dim-unbiased": lambda h: h.var(1, unbiased=True).unsqueeze(1) * h,
    "var-all": lambda h: h * torch.var(h),
    "var-correction0": lambda h: h.var(dim=[1, 3], correction=0),
    "std-dims": lambda h: h / torch.std(h, dim=(1, 2, 3), keepdim=True),
    "std-dim": lambda h: h.std(2),
    "var_mean": _standardize,
    "std_mean": _std_scale,
    "var_mean-nokeep": lambda h: torch.var_mean(h, dim=(2, 3))[0][:, :, None, None] * h + torch.var_mean(h, 1)[1][:, None],
    "sqrt-rsqrt": lambda h: torch.sqrt(h * h + 1) + (h * h + 2).rsqrt(),
    "exp-log": lambda h: torch.exp(h) + torch.log(h + 2),
    "reciprocal-square": lambda h: (h + 3).reciprocal() + torch.square(h) + h.square(),
    "pow": lambda h: h ** 3 + (h + 2) ** 0.5 + torch.pow(h, 2),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_moments_and_elementwise_maps(name, train):
    torch.manual_seed(0)
    model = Glue(CASES[name])
    x, y = randn(4, 2, 4, 4), labels(4, 3)
    with torch.no_grad():
        model(x.float())  # materialise the lazy head
    model = make(model).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails
        with forbid_autograd() as guard:
            for cls in (hfopt.GGN, hfopt.Hessian):
                op = cls(model, CE, x, y)
                assert op.fallbacks == []
        assert sum(guard.calls.values()) == 0
        check_exact(model, CE, x, y, tag="-rules")
