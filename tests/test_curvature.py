"""The GGN and Hessian operators on whole models and every supported loss,
against float64 autograd (see conftest.py), plus the operators' properties
(symmetry, PSD, determinism, no side effects), their SciPy view, the gradient,
the diagonal estimate, input validation and the graph cache."""
from __future__ import annotations

import copy
import gc
import warnings
import weakref

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

import hfopt
from hfopt.rules import ConvRule
from models import MODELS

from conftest import (assert_state_equal, check_exact, dot, flat, labels, make, rand_vec, randn, record, ref_ggnvp,
                      ref_hvp, rel_err, snapshot, zoo)

CE = nn.CrossEntropyLoss()

pytestmark = pytest.mark.usefixtures("single_thread")
ZOO = zoo()


def dense(op) -> torch.Tensor:
    """The operator as a dense matrix, column by column through to_scipy()."""
    A = op.to_scipy()
    return torch.from_numpy(A.matmat(np.eye(A.shape[1])))


# ----------------------------------------------------------------------------- zoo
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_exact_and_properties(name, train):
    model, x, y = ZOO[name]()
    model.train(train)
    snap = snapshot(model)
    ops = check_exact(model, CE, x, y, n_vectors=2, tag="-zoo")["ops"]
    u, v = rand_vec(model, 1), rand_vec(model, 2)
    for kind, op in ops.items():
        ou, ov = op @ u, op @ v
        # Symmetric: u.(Bv) == v.(Bu)
        scale = max(flat(u).norm() * flat(ov).norm(), flat(v).norm() * flat(ou).norm()).item()
        asym = record(f"symmetry-{kind}", abs(dot(u, ov) - dot(v, ou)) / scale)
        assert asym < 1e-12, asym
        # Repeated products are bitwise identical.
        again = op @ v
        assert all(torch.equal(a, b) for a, b in zip(ov, again))
        # The SciPy view agrees with @ (same dtype here: float64 both).
        sv = op.to_scipy().matvec(flat(v).numpy())
        assert np.array_equal(sv, flat(ov).numpy()) or \
            np.linalg.norm(sv - flat(ov).numpy()) <= 1e-14 * np.linalg.norm(sv)
        assert torch.equal(op.matvec_flat(flat(v)), flat(ov))
        # A tuple works like a list.
        assert all(torch.equal(a, b) for a, b in zip(op.matvec(tuple(v)), ov))
    # The GGN of a convex loss is PSD.
    G = ops["ggn"]
    for k in range(5):
        w = rand_vec(model, 10 + k)
        assert dot(w, G @ w) >= -1e-12 * dot(w, w)
    assert_state_equal(model, snap)


def test_psd_dense_smallest_eigenvalue():
    model, x, y = ZOO["mlp_bn"]()
    G = hfopt.GGN(model, CE, x, y)
    M = dense(G)
    assert (M - M.T).abs().max() <= 1e-14 * M.abs().max()
    eig = torch.linalg.eigvalsh((M + M.T) / 2)
    assert eig.min() >= -1e-12 * eig.max()
    H = dense(hfopt.Hessian(model, CE, x, y))
    assert (H - H.T).abs().max() <= 1e-13 * H.abs().max()
    # Train-mode BatchNorm with a ReLU net: the Hessian has negative curvature the GGN lacks.
    assert torch.linalg.eigvalsh((H + H.T) / 2).min() < -1e-6


def test_scipy_linear_operator_usable():
    model, x, y = ZOO["conv1d_bn"]()
    G = hfopt.GGN(model, CE, x, y)
    A = G.to_scipy()
    n = G.numel
    assert A.shape == (n, n) and A.dtype == np.float64
    M = dense(G).numpy()
    top = sla.eigsh(A, k=1, which="LA", tol=1e-10)[0][0]
    assert abs(top - np.linalg.eigvalsh(M)[-1]) <= 1e-8 * abs(top)
    damped = sla.LinearOperator((n, n), matvec=lambda z: A.matvec(z) + 0.5 * z, dtype=np.float64)
    b = np.random.default_rng(0).standard_normal(n)
    sol, info = sla.cg(damped, b, rtol=1e-12, maxiter=10 * n)
    assert info == 0
    assert np.linalg.norm(M @ sol + 0.5 * sol - b) <= 1e-9 * np.linalg.norm(b)
    # rmatvec (symmetric) and matmat are available.
    z = np.random.default_rng(1).standard_normal(n)
    assert np.allclose(A.rmatvec(z), A.matvec(z), rtol=0, atol=1e-14 * np.linalg.norm(A.matvec(z)))


def test_train_and_eval_on_the_same_model():
    """Switching the mode between builds re-traces (the graph cache keys on it)."""
    model, x, y = ZOO["resnet_block"]()
    for train in (True, False, True):
        model.train(train)
        check_exact(model, CE, x, y, tag="-zoo")


# ----------------------------------------------------------------------------- project models
PROJECT_INPUTS = {
    "mlp_bn": (6, 1, 8, 8),
    "digits_convnet_bn": (4, 1, 8, 8),
    "resnet8_bn": (3, 3, 16, 16),
    "resnet20_bn": (3, 3, 8, 8),
    "allcnnc_bn": (3, 3, 12, 12),
    "c3d3_bn": (3, 3, 32, 32),
    # The big ones at the smallest resolution their stages take: exactness is about the rules.
    "resnet18_bn": (4, 3, 8, 8),
    "wrn16_4_bn": (2, 3, 8, 8),
}
SMALL_PROJECT = {"mlp_bn", "digits_convnet_bn", "resnet8_bn"}


# Eval mode of the big models is left to the small ones (time budget).
PROJECT_CASES = [(name, train) for name in sorted(MODELS) for train in (True, False)
                 if train or name in SMALL_PROJECT]


@pytest.mark.parametrize("name,train", PROJECT_CASES, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in PROJECT_CASES])
def test_project_models(name, train):
    torch.manual_seed(0)
    model = make(MODELS[name](num_classes=4), seed=1).train(train)
    shape = PROJECT_INPUTS[name]
    x, y = randn(*shape), labels(shape[0], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer has a closed-form rule
        check_exact(model, CE, x, y, hessian=name in SMALL_PROJECT, tag="-models")


# ----------------------------------------------------------------------------- losses
def _smax(t):
    return torch.softmax(t, 1)


def loss_cases(spatial: bool = False):
    """name -> (loss, target kind, convex).  BCE's weights broadcast against the
    output from the right: per class on [N, C, L] they are shaped [C, 1]."""
    w3 = torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)
    bshape = (3, 1) if spatial else (3,)
    return {
        "ce-mean": (nn.CrossEntropyLoss(), "labels", True),
        "ce-sum": (nn.CrossEntropyLoss(reduction="sum"), "labels", True),
        "ce-weight": (nn.CrossEntropyLoss(weight=w3), "labels", True),
        "ce-weight-sum": (nn.CrossEntropyLoss(weight=w3, reduction="sum"), "labels", True),
        "ce-ignore": (nn.CrossEntropyLoss(ignore_index=1), "labels", True),
        "ce-ignore-weight": (nn.CrossEntropyLoss(weight=w3, ignore_index=2), "labels", True),
        "ce-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), "labels", True),
        "ce-smoothing-ignore": (nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=0), "labels", True),
        "ce-smoothing-weight": (nn.CrossEntropyLoss(label_smoothing=0.2, weight=w3), "labels", True),
        "ce-probs": (nn.CrossEntropyLoss(), "probs", True),
        "ce-probs-sum-weight": (nn.CrossEntropyLoss(weight=w3, reduction="sum"), "probs", True),
        "ce-probs-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.3), "probs", True),
        # Probability targets need not sum to one; PyTorch smooths them as they are.
        "ce-scaled-probs-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.3), "scaled-probs", True),
        "mse-mean": (nn.MSELoss(), "real", True),
        "mse-sum": (nn.MSELoss(reduction="sum"), "real", True),
        "bce-mean": (nn.BCEWithLogitsLoss(), "binary", True),
        "bce-sum": (nn.BCEWithLogitsLoss(reduction="sum"), "soft-binary", True),
        "bce-weight": (nn.BCEWithLogitsLoss(
            weight=torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64).view(bshape)), "binary", True),
        "bce-pos_weight": (nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([3.0, 0.5, 1.5], dtype=torch.float64).view(bshape)), "soft-binary", True),
        "callable-softmax": (lambda z, t: (z.softmax(1) * t).sum(), "real", False),
        "callable-quartic": (lambda z, t: ((z - t) ** 4).mean() + (z ** 2).sum(), "real", True),
        "callable-linear": (lambda z, t: (z * t).sum(), "real", True),
    }


def make_target(kind, out_shape, seed=3):
    gen = torch.Generator().manual_seed(seed)
    n, c = out_shape[0], out_shape[1]
    if kind == "labels":
        shape = (n,) + tuple(out_shape[2:])
        t = torch.randint(0, c, shape, generator=gen)
        t.view(-1)[:c] = torch.arange(c)  # every class (and the ignored one) occurs
        return t
    r = torch.randn(*out_shape, generator=gen, dtype=torch.float64)
    if kind == "probs":
        return torch.softmax(r, 1)
    if kind == "scaled-probs":
        return torch.softmax(r, 1) * 1.7
    if kind == "real":
        return r
    if kind == "binary":
        return (r > 0).to(torch.float64)
    if kind == "soft-binary":
        return torch.sigmoid(r)
    raise KeyError(kind)


def _loss_model(spatial: bool):
    if spatial:  # per-position outputs [N, C, L]: CE over a sequence
        m = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Tanh(), nn.Conv1d(4, 3, 3, padding=1))
        return make(m), randn(3, 2, 5)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    return make(m), randn(7, 4)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial", [False, True], ids=["NC", "NCL"])
@pytest.mark.parametrize("name", list(loss_cases()))
def test_losses(name, spatial, train):
    loss, kind, convex = loss_cases(spatial)[name]
    model, x = _loss_model(spatial)
    model.train(train)
    with torch.no_grad():
        out_shape = model(x).shape
    y = make_target(kind, out_shape)
    ops = check_exact(model, loss, x, y, tag="-losses")["ops"]
    if convex:
        for k in range(3):
            w = rand_vec(model, 20 + k)
            assert dot(w, ops["ggn"] @ w) >= -1e-12 * dot(w, w)


def test_loss_reduction_none_rejected():
    model, x, y = ZOO["mlp_bn"]()
    for loss in (nn.CrossEntropyLoss(reduction="none"), nn.MSELoss(reduction="none")):
        target = y if isinstance(loss, nn.CrossEntropyLoss) else torch.zeros(6, 3, dtype=torch.float64)
        with pytest.raises(ValueError, match="reduction|scalar"):
            hfopt.GGN(model, loss, x, target)
    # A batch of one still reduces to a single element, yet 'none' is not a reduction.
    with pytest.raises(ValueError, match="reduction"):
        hfopt.GGN(model.eval(), nn.CrossEntropyLoss(reduction="none"), x[:1], y[:1])


# ----------------------------------------------------------------------------- gradient
def test_gradient_matches_between_operators():
    model, x, y = ZOO["resnet_block"]()
    g1 = hfopt.GGN(model, CE, x, y).gradient()
    g2 = hfopt.Hessian(model, CE, x, y).gradient()
    assert rel_err(g1, g2) < 1e-14
    # gradient() hands out copies.
    op = hfopt.GGN(model, CE, x, y)
    a = op.gradient()
    a[0].zero_()
    assert op.gradient()[0].abs().max() > 0


# ----------------------------------------------------------------------------- diagonal estimate
def _tiny():
    m = make(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)))
    return m, randn(5, 3)


DIAG_LOSSES = {
    "ce-weight-ignore": (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64),
                                             ignore_index=2), "labels"),
    "ce-probs-sum": (nn.CrossEntropyLoss(reduction="sum"), "probs"),
    "mse-mean": (nn.MSELoss(), "real"),
    "bce-pos_weight": (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5, 1.5], dtype=torch.float64)),
                       "soft-binary"),
    "callable": (lambda z, t: ((z - t) ** 2).sum() + (z.softmax(1) ** 2).sum(), "real"),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(DIAG_LOSSES))
def test_diagonal_estimate(name, train):
    loss, kind = DIAG_LOSSES[name]
    model, x = _tiny()
    model.train(train)
    y = make_target(kind, (5, 3))
    snap = snapshot(model)
    G = hfopt.GGN(model, loss, x, y)
    exact = torch.diagonal(dense(G))
    est = flat(G.diagonal_estimate(samples=3000, generator=torch.Generator().manual_seed(0)))
    err = record("diag-estimate (MC)", rel_err([est], [exact]))
    assert err < (0.25 if name == "callable" else 0.1), err
    if name != "callable":  # Monte-Carlo GGN: a sum of squares
        assert (est >= 0).all()
    # Reproducible with the same generator seed; one sample works too.
    a = flat(G.diagonal_estimate(samples=20, generator=torch.Generator().manual_seed(4)))
    b = flat(G.diagonal_estimate(samples=20, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(a, b)
    assert flat(G.diagonal_estimate(1, torch.Generator().manual_seed(1))).shape == est.shape
    with pytest.raises(ValueError, match="samples"):
        G.diagonal_estimate(0)
    assert_state_equal(model, snap)


# ----------------------------------------------------------------------------- bad input
def test_bad_vectors():
    model, x, y = ZOO["mlp_bn"]()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for cls in (hfopt.GGN, hfopt.Hessian):
        op = cls(model, CE, x, y)
        v = rand_vec(model)
        # wrong length: the first parameter without an entry is named
        with pytest.raises(ValueError, match=names[-1].replace(".", r"\.")):
            op @ v[:-1]
        with pytest.raises(ValueError, match=names[2].replace(".", r"\.")):
            op @ v[:2]
        with pytest.raises(ValueError, match="tensors but the model has"):
            op @ (v + [v[0]])
        # wrong shape / dtype: the offending parameter is named
        for i in (0, 3):
            bad = list(v)
            bad[i] = bad[i].reshape(1, -1)
            with pytest.raises(ValueError, match=rf"'{names[i]}'.*shape"):
                op @ bad
            bad[i] = v[i].float()
            with pytest.raises(ValueError, match=rf"'{names[i]}'.*dtype"):
                op @ bad
        # not a list of tensors
        for wrong in (flat(v), {n: t for n, t in zip(names, v)}, (t for t in v), flat(v).numpy()):
            with pytest.raises(TypeError):
                op @ wrong
        with pytest.raises(TypeError, match=names[1].replace(".", r"\.")):
            op @ ([v[0], v[1].numpy()] + v[2:])
        with pytest.raises(ValueError):
            op.matvec_flat(flat(v)[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bad_vector_device():
    model, x, y = ZOO["mlp_bn"]()
    op = hfopt.GGN(model, CE, x, y)
    v = rand_vec(model)
    v[1] = v[1].cuda()
    name = [n for n, p in model.named_parameters()][1]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        op @ v


@pytest.mark.parametrize("shape", [(1, 5), (1, 3, 1, 1)])
def test_batchnorm_single_value_per_channel(shape):
    if len(shape) == 2:
        model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    else:
        model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 3)).double()
    x = randn(*shape)
    y = labels(1, 3)
    with pytest.raises(ValueError) as theirs:
        model(x)
    with pytest.raises(ValueError) as ours:
        hfopt.GGN(model, CE, x, y)
    assert str(ours.value) == str(theirs.value)
    hfopt.GGN(model.eval(), CE, x, y)  # eval mode uses the running statistics: fine


def test_no_trainable_parameters():
    for model in (nn.Sequential(nn.ReLU(), nn.Flatten()), nn.Linear(3, 3).requires_grad_(False)):
        with pytest.raises(ValueError, match="trainable"):
            hfopt.GGN(model.double(), CE, randn(4, 3), labels(4, 3))


# ----------------------------------------------------------------------------- graph
class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x) * self.scale))


def test_replaced_parameter_is_seen():
    """A parameter re-assigned after an operator was built must not be served
    from a stale cached graph."""
    model = make(ScaledNet())
    x, y = randn(6, 4), labels(6, 3)
    check_exact(model, CE, x, y)
    model.scale = nn.Parameter(torch.randn(5, dtype=torch.float64))
    check_exact(model, CE, x, y)


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.aux = nn.Linear(5, 2)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.lin(x)))
        unused = torch.sigmoid(self.aux(h))  # noqa: F841 (computed, never used)
        return self.out(h)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dead_branch(train):
    check_exact(make(DeadBranch()).train(train), CE, randn(6, 4), labels(6, 3))


class WeightTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.lin(x)))
        return self.out(torch.tanh(self.bn(self.lin(h))))  # the same layers twice


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_weight_tying_and_frozen(train):
    model = make(WeightTied()).train(train)
    check_exact(model, CE, randn(6, 4), labels(6, 3))
    model.lin.weight.requires_grad_(False)
    model.bn.weight.requires_grad_(False)
    check_exact(model, CE, randn(6, 4), labels(6, 3))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


@pytest.mark.parametrize("factory", [lambda: make(ScaledNet()), lambda: nn.Linear(4, 3).double(),
                                     lambda: Untraceable().double()], ids=["traced", "one-layer", "untraceable"])
def test_models_are_not_kept_alive(factory):
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = hfopt.Hessian(model, CE, randn(6, 4), labels(6, 3))
        op @ rand_vec(model)
    ref = weakref.ref(model)
    del model, op
    gc.collect()
    assert ref() is None


def test_output_inactive_gives_zeros():
    """The only trainable parameter never reaches the output: zero products and gradient."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)).double().requires_grad_(False)
    model.register_parameter("stray", nn.Parameter(torch.ones(2, dtype=torch.float64)))
    for cls in (hfopt.GGN, hfopt.Hessian):
        op = cls(model, CE, randn(5, 4), labels(5, 3))
        assert torch.equal(op.matvec([torch.ones(2, dtype=torch.float64)])[0], torch.zeros(2, dtype=torch.float64))
        assert torch.equal(op.gradient()[0], torch.zeros(2, dtype=torch.float64))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(2, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x, z):
        return self.out(torch.tanh(self.bn(self.a(x) * torch.sigmoid(self.b(z)))))


def test_two_input_model():
    model = make(TwoInputs())
    check_exact(model, CE, (randn(6, 4), randn(6, 2, seed=1)), labels(6, 3))


def test_float32_model():
    """A float32 model: products near the float64 reference, SciPy still float64."""
    model32, x, y = ZOO["conv_bn"]()
    model32.float()  # Module.float() converts in place
    model64 = copy.deepcopy(model32).double()  # the same (float32-representable) weights in float64
    x = x.float().double()
    v64 = rand_vec(model64)
    G32 = hfopt.GGN(model32, CE, x.float(), y)
    out = G32 @ [t.float() for t in v64]
    assert all(t.dtype == torch.float32 for t in out)
    ref = ref_ggnvp(model64, CE, x, y, v64)
    assert rel_err([t.double() for t in out], ref) < 1e-4
    sv = G32.to_scipy().matvec(flat(v64).numpy())
    assert sv.dtype == np.float64
    assert np.allclose(sv, flat(out).double().numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- channels-last layout
CL_PROJECT = ["resnet8_bn", "resnet20_bn", "c3d3_bn", "wrn16_4_bn"]


def _conv_rules(op) -> list:
    rules = [s.rule for s in op.steps]
    rules += [getattr(r, "conv", None) for r in rules] + [getattr(r, "inner", None) for r in rules]
    return [r for r in rules if isinstance(r, ConvRule)]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-layer"])
@pytest.mark.parametrize("name", ["conv_bn", "resnet_block"] + CL_PROJECT)
def test_channels_last_exact(name, fuse):
    """The channels-last path, forced in float64, against autograd on the
    model's own (contiguous) layout; results leave contiguous."""
    if name in ZOO:
        model, x, y = ZOO[name]()
    else:
        torch.manual_seed(0)
        model = make(MODELS[name](num_classes=4), seed=1)
        x, y = randn(*PROJECT_INPUTS[name]), labels(PROJECT_INPUTS[name][0], 4)
    model.train()
    ops = check_exact(model, CE, x, y, hessian=name not in ("wrn16_4_bn",), tag="-channels-last",
                      channels_last=True, fuse=fuse)["ops"]
    for op in ops.values():
        convs = _conv_rules(op)
        assert convs and all(c.channels_last for c in convs if c.dim == 2)
        assert all(t.is_contiguous() for t in op @ rand_vec(model))


class ViewAfterConv(nn.Module):
    """``view`` on a conv output (contiguous in eager, channels-last in the
    engine) and a layer without a rule that views its input too."""

    class Unruled(nn.Module):
        def forward(self, x):
            if x.sum() > -1e30:  # data-dependent: fx cannot trace it, the whole layer falls back
                x = torch.sigmoid(x.view(x.shape[0], -1)).view(x.shape)
            return x

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.odd = self.Unruled()
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        z = self.bn(self.odd(self.conv(x)))
        return self.fc(z.view(z.size(0), -1))


def test_channels_last_views_and_fallbacks():
    model, x, y = make(ViewAfterConv()), randn(5, 2, 4, 4), labels(5, 3)
    with pytest.warns(UserWarning, match="no closed-form curvature rule"):
        check_exact(model, CE, x, y, tag="-channels-last", channels_last=True)


def test_channels_last_default_and_errors():
    model, x, y = ZOO["conv_bn"]()
    assert not hfopt.GGN(model, CE, x, y).channels_last  # float64: no oneDNN kernel
    model32 = copy.deepcopy(model).float()
    assert hfopt.GGN(model32, CE, x.float(), y).channels_last  # float32 on the CPU
    assert not hfopt.GGN(model32, CE, x.float(), y, channels_last=False).channels_last
    assert hfopt.GGN(model, CE, x, y, channels_last=True).channels_last  # forced: float64's slow kernels
    with pytest.raises(TypeError, match="channels_last"):
        hfopt.GGN(model, CE, x, y, channels_last="yes")


@pytest.mark.parametrize("name", ["resnet8_bn", "c3d3_bn"])
def test_float32_products_are_as_accurate_as_float32_allows(name):
    """float32 products, channels-last and contiguous, are each within a small
    multiple of autograd's own float32 error on the same model, all measured
    against float64.  Which layout rounds less depends on the CPU's oneDNN
    kernels, so neither layout is bounded by the other."""
    torch.manual_seed(0)
    model = make(MODELS[name](num_classes=4), seed=1).float().train()
    model64 = copy.deepcopy(model).double()
    x, y = randn(*PROJECT_INPUTS[name]), labels(PROJECT_INPUTS[name][0], 4)
    v = rand_vec(model64)
    v32 = [t.float() for t in v]
    for cls, ref in ((hfopt.GGN, ref_ggnvp), (hfopt.Hessian, ref_hvp)):
        exact = cls(model64, CE, x, y) @ v
        autograd = rel_err([t.double() for t in ref(model, CE, x.float(), y, v32)], exact)
        for layout in (True, False):
            err = rel_err([t.double() for t in cls(model, CE, x.float(), y, channels_last=layout) @ v32], exact)
            assert err < 10 * autograd + 1e-5, (cls.__name__, layout, err, autograd)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cuda_matches_cpu(train):
    model, x, y = ZOO["resnet_block"]()
    model.train(train)
    v = rand_vec(model)
    cpu = {cls: cls(model, CE, x, y) @ v for cls in (hfopt.GGN, hfopt.Hessian)}
    gpu_model = copy.deepcopy(model).cuda()
    snap = snapshot(gpu_model)
    for cls in (hfopt.GGN, hfopt.Hessian):
        op = cls(gpu_model, CE, x.cuda(), y.cuda())
        out = op @ [t.cuda() for t in v]
        assert all(t.is_cuda for t in out)
        err = record("cuda-vs-cpu", rel_err([t.cpu() for t in out], cpu[cls]))
        assert err < 1e-10, err
    assert_state_equal(gpu_model, snap)


@pytest.mark.parametrize("kind", ["GGN", "Hessian"])
def test_operator_is_a_snapshot(kind):
    """Moving the parameters or buffers after the build does not move the
    operator: it is the curvature at the point where it was built."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 4)).double()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    op = getattr(hfopt, kind)(model, nn.CrossEntropyLoss(), x, y)
    v = rand_vec(model)
    before = op @ v
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
    after = op @ v
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_diagonal_estimate_of_hessian_operator_is_gauss_newton():
    """For a loss without a closed form the estimate uses Hutchinson on the
    Gauss-Newton product, also when the operator is a Hessian."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def loss(z, t):
        return ((z - t) ** 4).mean()

    H = hfopt.Hessian(model, loss, x, y)
    G = hfopt.GGN(model, loss, x, y)
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    for a, b in zip(H.diagonal_estimate(5, g1), G.diagonal_estimate(5, g2)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
