"""No autograd inside any rule: operators are built and applied under
:func:`autograd_guard.forbid_autograd`, over the test zoo, every model in
``models/`` (train and eval mode) and a model using each glue op and functional
layer of the README's table.  The declared fallback may use torch.func, and
then it is always warned and reported."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hfopt
from autograd_guard import AutogradCalled, forbid_autograd
from conftest import check_exact, labels, make, rand_vec, randn, zoo
from models import DEFAULT_INPUT, MODELS

CE = nn.CrossEntropyLoss()
pytestmark = pytest.mark.usefixtures("single_thread")


def _apply_everything(model, loss_fn, x, y, fuse: bool = True):
    """Build both operators and use every product they offer."""
    ops = []
    for cls in (hfopt.GGN, hfopt.Hessian):
        op = cls(model, loss_fn, x, y, fuse=fuse)
        v = rand_vec(model, seed=3)
        op @ v
        op.matvec_flat(torch.cat([t.reshape(-1) for t in v]))
        op.gradient()
        ops.append(op)
    ops[0].diagonal_estimate(samples=1, generator=torch.Generator().manual_seed(0))
    return ops


def _closed_form_run(model, loss_fn, x, y, fuse: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would fail here too
        with forbid_autograd() as guard:
            ops = _apply_everything(model, loss_fn, x, y, fuse)
    assert sum(guard.calls.values()) == 0, guard.calls
    assert all(op.fallbacks == [] for op in ops)


ZOO = zoo()


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_makes_no_autograd_call(name, train, fuse):
    model, x, y = ZOO[name]()
    _closed_form_run(model.train(train), CE, x, y, fuse)




# The guard is about which code runs, not about size: each model at the smallest
# input it takes (c3d3_bn's classifier is sized for 32x32).
_SMALLEST = {"allcnnc_bn": 16, "resnet8_bn": 8, "resnet20_bn": 8, "resnet18_bn": 8, "wrn16_4_bn": 8}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_project_models_make_no_autograd_call(name, train):
    torch.manual_seed(0)
    model = make(MODELS[name](num_classes=3), seed=1).train(train)
    c, h, w = DEFAULT_INPUT[name]
    size = _SMALLEST.get(name, h)
    x = randn(3, c, size, size)
    _closed_form_run(model, CE, x, labels(x.shape[0], 3), fuse=True)


class GlueNet(nn.Module):
    """Every glue op and functional layer of the README's table, with the
    parameters held by this module and passed to the functional calls."""

    def __init__(self):
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.4)
        self.conv_b = nn.Parameter(torch.randn(4) * 0.1)
        self.bn_w = nn.Parameter(1 + 0.2 * torch.randn(4))
        self.bn_b = nn.Parameter(0.2 * torch.randn(4))
        self.register_buffer("bn_mean", 0.1 * torch.randn(4))
        self.register_buffer("bn_var", 0.5 + torch.rand(4))
        self.conv1d_w = nn.Parameter(torch.randn(2, 1, 2) * 0.5)  # even kernel: 'valid' padding
        self.conv3d_w = nn.Parameter(torch.randn(2, 2, 1, 3, 3) * 0.4)
        self.register_buffer("scale", 1.5 + torch.rand(4))
        self.lin_w = nn.Parameter(torch.randn(3, 14) * 0.3)
        self.lin_b = nn.Parameter(torch.randn(3) * 0.1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):                                       # [N, 2, 5, 5]
        h = F.conv2d(x, self.conv_w, self.conv_b, padding=1)
        h = F.batch_norm(h, self.bn_mean, self.bn_var, self.bn_w, self.bn_b, self.training, 0.1, 1e-5)
        h = torch.tanh(h)
        v = F.conv3d(h[:, :2].unsqueeze(2), self.conv3d_w, padding=(0, 1, 1)).squeeze(2)  # [N, 2, 5, 5]
        h = h.permute(0, 2, 3, 1).transpose(1, 2)               # [N, 5, 5, 4]
        h = torch.movedim(h.movedim(3, 1), 1, 3)                # and back
        h = h[:, 1:, ::2, :]                                    # slicing: [N, 4, 3, 4]
        a = h.mean(dim=(1, 2))                                  # [N, 4]
        b = torch.sum(h, 2).sum(1, keepdim=True).squeeze(1) / 7.0
        z = -a + b / self.scale                                 # division by a constant tensor
        z = z / (a * a + 1.0)                                   # a quotient of two directions
        z = z[:, [0, 1, 1, 3]]                                  # advanced indexing, repeated
        w = F.conv1d(z.unsqueeze(1), self.conv1d_w)             # [N, 2, 3]
        u = torch.cat([w.flatten(1), v.mean((2, 3)), z], 1)     # 6 + 2 + 4 = 12
        u = torch.cat([u, u[:, :2].neg()], 1)                   # 14
        return self.head(torch.tanh(F.linear(u, self.lin_w, self.lin_b)))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_glue_ops_are_exact_and_make_no_autograd_call(train):
    torch.manual_seed(0)
    model = GlueNet().double().train(train)
    x, y = randn(5, 2, 5, 5), labels(5, 3)
    _closed_form_run(model, CE, x, y)
    check_exact(model, CE, x, y, n_vectors=2, tag="-glue")


@pytest.mark.parametrize("loss_fn,target", [
    (nn.CrossEntropyLoss(label_smoothing=0.2, weight=torch.tensor([0.5, 2.0, 1.3])), "labels"),
    (nn.CrossEntropyLoss(label_smoothing=0.1, weight=torch.tensor([0.5, 2.0, 1.3]), ignore_index=1,
                         reduction="sum"), "labels"),
    (nn.CrossEntropyLoss(label_smoothing=0.3, weight=torch.tensor([0.5, 2.0, 1.3])), "probs"),
    (nn.MSELoss(reduction="sum"), "real"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5, 1.5]), weight=torch.tensor([1.0, 0.3, 2.0])),
     "binary"),
], ids=["ce-smooth-weight", "ce-smooth-weight-ignore-sum", "ce-probs-smooth-weight", "mse", "bce"])
def test_every_listed_loss_has_a_closed_form(loss_fn, target):
    model, x, y = ZOO["mlp_bn"]()
    loss_fn = loss_fn.double()
    gen = torch.Generator().manual_seed(4)
    if target == "probs":
        y = torch.softmax(torch.randn(6, 3, generator=gen, dtype=torch.float64), 1)
    elif target == "real":
        y = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    elif target == "binary":
        y = (torch.randn(6, 3, generator=gen) > 0).double()
    _closed_form_run(model, loss_fn, x, y)
    check_exact(model, loss_fn, x, y, tag="-losses")


def test_fallback_is_warned_reported_and_the_only_autograd():
    model = nn.Sequential(nn.Linear(4, 5), nn.CELU(0.7), nn.Linear(5, 3)).double()
    x, y = randn(6, 4), labels(6, 3)
    with pytest.warns(UserWarning, match="no closed-form curvature rule for celu"):
        with forbid_autograd() as guard:
            ops = _apply_everything(model, CE, x, y)
    assert guard.calls["fallback"] > 0 and guard.calls["loss"] == 0
    assert all(len(op.fallbacks) == 1 and "celu" in op.fallbacks[0] for op in ops)


def test_a_functional_loss_uses_only_the_declared_loss_path():
    model, x, y = ZOO["mlp_bn"]()
    with forbid_autograd() as guard:
        _apply_everything(model, lambda z, t: F.cross_entropy(z, t) + (z ** 4).mean(), x, y)
    assert guard.calls["loss"] > 0 and guard.calls["fallback"] == 0


def test_the_guard_fires_on_autograd_outside_the_declared_paths():
    w = torch.ones(3, requires_grad=True)
    with forbid_autograd(), pytest.raises(AutogradCalled, match="grad"):
        torch.autograd.grad((w * w).sum(), w)
    with forbid_autograd(), pytest.raises(AutogradCalled, match="backward"):
        (w * w).sum().backward()
    with forbid_autograd(), pytest.raises(AutogradCalled, match="vjp"):
        torch.func.vjp(torch.sin, w.detach())
    torch.autograd.grad((w * w).sum(), w)  # restored afterwards


class OwnWeightLinear(nn.Module):
    """A childless user layer holding its weight: traced into, so F.linear gets its rule."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.4)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class DataDependent(nn.Module):
    """fx cannot trace it (a branch on a value): it stays one warned fallback node."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return x * self.scale if float(x.sum()) > -1e9 else x


def test_a_childless_user_layer_reaches_the_functional_rules():
    model = nn.Sequential(OwnWeightLinear(4, 5), nn.Tanh(), OwnWeightLinear(5, 3)).double()
    x, y = randn(6, 4), labels(6, 3)
    _closed_form_run(model, CE, x, y)
    check_exact(model, CE, x, y, tag="-glue")


def test_an_untraceable_user_layer_alone_falls_back():
    model = nn.Sequential(OwnWeightLinear(4, 5), DataDependent(), nn.Linear(5, 3)).double()
    x, y = randn(6, 4), labels(6, 3)
    with pytest.warns(UserWarning, match="no closed-form curvature rule for DataDependent"):
        G = hfopt.GGN(model, CE, x, y)
    assert len(G.fallbacks) == 1 and "DataDependent" in G.fallbacks[0]
    check_exact(model, CE, x, y, tag="-fallback")
