"""Calls that return several tensors: each indexed piece is a node of its own.
chunk/split/tensor_split/unbind/split_with_sizes have a closed-form rule;
other tuple-returning calls (``torch.max(x, dim)``) and a module kept whole that
returns a list (HRNet's branches) reach the fallback one piece at a time.  All
against float64 autograd."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import check_exact, labels, make, randn

CE = nn.CrossEntropyLoss()
pytestmark = pytest.mark.usefixtures("single_thread")


def _split_all(h):
    a, b = h.chunk(2, dim=1)                       # 2 + 2 channels
    c, d, e = torch.split(h, [1, 2, 1], dim=1)
    f, g = torch.tensor_split(h, [3], dim=1)
    u = h.unbind(1)
    p, q = h.split_with_sizes([3, 1], 1)
    last = h.chunk(4, 1)[-1]                       # a negative index
    return torch.cat([a * b, c + e, d, f[:, :1] * g, u[0][:, None], u[3][:, None] ** 2, p[:, 2:], q, last], 1)


class Splits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        return self.fc(_split_all(torch.tanh(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_splits_are_closed_form_and_exact(train):
    model = Splits()
    with torch.no_grad():
        model(torch.zeros(2, 2, 3, 3))
    model = make(model).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        ops = check_exact(model, CE, randn(4, 2, 3, 3), labels(4, 3), tag="-rules")["ops"]
    assert all(op.fallbacks == [] for op in ops.values())


class MaxOverDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)).view(-1, 2, 3)
        values, _ = torch.max(h, dim=1)
        return self.b(torch.cat([values, h.sum(1)], 1))


def test_other_tuple_results_fall_back_per_piece():
    with pytest.warns(UserWarning, match=r"max\(\.\.\.\)\[0\]"):
        check_exact(make(MaxOverDim()), CE, randn(6, 4), labels(6, 3), tag="-fallback")


class Branches(nn.Module):
    """Takes a list, writes into it and returns it (HRNet's module), with
    shape-dependent control flow fx cannot trace: kept whole."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)])

    def forward(self, xs):
        for i, branch in enumerate(self.branches):
            if xs[i].shape[-1] > 1:
                xs[i] = branch(xs[i])
        return xs


class TwoResolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.branches = Branches()
        self.fc = nn.Linear(3 * 16 + 3 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        ys = self.branches([h, nn.functional.avg_pool2d(h, 2)])
        return self.fc(torch.cat([ys[0].flatten(1), ys[1].flatten(1)], 1))


def test_a_list_returning_module_kept_whole_falls_back_per_piece():
    with pytest.warns(UserWarning, match=r"Branches\[0\]"):
        ops = check_exact(make(TwoResolutions()), CE, randn(4, 2, 4, 4), labels(4, 3), tag="-fallback")["ops"]
    assert sorted(f.split(": ")[-1] for f in ops["ggn"].fallbacks) == ["Branches[0]", "Branches[1]"]
