"""Tests of hfopt.HFOptimizer: convergence on convex problems against
independent solvers, each algorithmic rule against its specification, the
safety guarantees (rejected steps change nothing), BatchNorm buffer handling,
state_dict round trips, the closure contract, the autograd fallback and
diagnostics.  Everything that checks exact values runs in float64.
"""
from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

import hfopt
import hfopt.optimizer as hfo
from hfopt.cg import CGResult
from hfopt.cg import cg as real_cg

# Outside a data-parallel run nothing is communicated, so its counters are not reported.
ONE_PROCESS_KEYS = set(hfopt.DIAGNOSTICS) - {"time_communication", "bytes_all_reduced"}


@pytest.fixture(autouse=True)
def _float64_single_thread():
    # Tiny models: OpenMP threads only add contention on a shared 2-core box.
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers
def gen(seed):
    return torch.Generator().manual_seed(seed)


def closure_for(model, loss_fn, x, y):
    def closure():
        outputs = model(x)
        return loss_fn(outputs, y), outputs
    return closure


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def classification_data(n=48, d=5, classes=3, seed=1):
    g = gen(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def mlp(seed=0, d=5, hidden=8, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def bn_convnet(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, classes))


def image_data(n=48, classes=3, seed=1):
    g = gen(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_state_equal(a, b, skip=()):
    """Two optimizer state dicts equal, tensors bitwise."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        assert sa.keys() == sb.keys(), k
        for key in sa:
            if key in skip:
                continue
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (k, key)
            else:
                assert va == vb, (k, key)


class CGSpy:
    """Stands in for hfopt.optimizer.cg: records every call (x0, the damped
    operator, b, the result) and can rewrite the result."""

    def __init__(self, rewrite=None):
        self.calls = []
        self.rewrite = rewrite

    def __call__(self, matvec, b, x0=None, **kw):
        res = real_cg(matvec, b, x0, **kw)
        if self.rewrite is not None:
            res = self.rewrite(res, matvec, b)
        self.calls.append(dict(x0=None if x0 is None else x0.clone(), res=res, matvec=matvec, b=b.clone(),
                               kw=kw))
        return res


def phi(matvec, b, x):
    """The damped quadratic CG minimises."""
    return float(0.5 * x.dot(matvec(x)) - b.dot(x))


def single_iterate(res, x, matvec, b):
    """A CG result whose only (and last) iterate is x, with a consistent phi."""
    phis = [math.nan] * res.iterations + [phi(matvec, b, x)]
    return CGResult(x=x, saved=[(res.iterations, x)], iterations=res.iterations, stop_reason=res.stop_reason,
                    phi=phis, matvecs=res.matvecs)


def _unflatten(model):
    """Flat vector -> {name: view} in model.parameters() order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def unflat(t):
        out, k = {}, 0
        for n, s in zip(names, shapes):
            m = math.prod(s)
            out[n] = t[k:k + m].view(s)
            k += m
        return out

    return unflat


def exact_ggn(model, loss_of_outputs, x):
    """J^T H_out J (reverse-mode autograd only), flattened in model.parameters() order."""
    theta = flat(model.parameters())
    unflat = _unflatten(model)

    def f(t):
        return torch.func.functional_call(model, unflat(t), (x,))

    out = f(theta)
    J = torch.func.jacrev(f)(theta).reshape(out.numel(), -1)
    H = torch.autograd.functional.hessian(lambda o: loss_of_outputs(o.view(out.shape)), out.detach().reshape(-1))
    return J.T @ H @ J


def exact_hessian(model, loss_of_outputs, x):
    theta = flat(model.parameters())
    unflat = _unflatten(model)

    def total(t):
        return loss_of_outputs(torch.func.functional_call(model, unflat(t), (x,)))

    return torch.autograd.functional.hessian(total, theta)


def gradient(model, closure):
    loss, _ = closure()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


# ----------------------------------------------------------------------------- convex problems
@pytest.mark.parametrize("preconditioner", [True, False])
def test_least_squares_to_numpy_lstsq(preconditioner):
    g = gen(3)
    x = torch.randn(100, 6, generator=g)
    w_true, b_true = torch.randn(6, 2, generator=g), torch.randn(2, generator=g)
    y = x @ w_true + b_true + 0.1 * torch.randn(100, 2, generator=g)
    model = nn.Linear(6, 2)
    opt = hfopt.HFOptimizer(model.parameters(), damping=1e-6, preconditioner=preconditioner)
    closure = closure_for(model, nn.MSELoss(), x, y)

    a = np.hstack([x.numpy(), np.ones((100, 1))])
    sol = np.linalg.lstsq(a, y.numpy(), rcond=None)[0]  # (7, 2): weight^T then bias
    want_w, want_b = torch.from_numpy(sol[:6].T.copy()), torch.from_numpy(sol[6].copy())
    for _ in range(4):
        opt.step(closure)
        assert opt.last_step["engine"] == "rules"
    err = max((model.weight - want_w).abs().max().item(), (model.bias - want_b).abs().max().item())
    assert err < 1e-8


def test_logistic_regression_reaches_scipy_optimum():
    g = gen(4)
    n, d, wd = 200, 5, 1e-2
    x = torch.randn(n, d, generator=g)
    logits = x @ torch.randn(d, generator=g) + 0.3
    y = (torch.rand(n, generator=g) < torch.sigmoid(2 * logits)).double()  # noisy: not separable
    model = nn.Linear(d, 1)
    opt = hfopt.HFOptimizer(model.parameters(), weight_decay=wd, damping=1e-2)
    loss_fn = nn.BCEWithLogitsLoss()
    closure = closure_for(model, loss_fn, x, y.unsqueeze(1))

    xa, ya = x.double().numpy(), y.double().numpy()

    def objective(theta):
        w, b = theta[:d], theta[d]
        z = xa @ w + b
        f = np.mean(np.logaddexp(0, z) - ya * z) + 0.5 * wd * theta.dot(theta)
        s = 1 / (1 + np.exp(-z))
        grad = np.concatenate([xa.T @ (s - ya) / n, [np.mean(s - ya)]]) + wd * theta
        return f, grad

    ref = scipy.optimize.minimize(objective, np.zeros(d + 1), jac=True, method="BFGS",
                                  options=dict(gtol=1e-10, maxiter=10000))
    # BFGS may end on "precision loss" a hair short of gtol; what matters is a stationary point.
    assert np.abs(objective(ref.x)[1]).max() < 1e-8
    losses = []
    for _ in range(8):
        opt.step(closure)
        losses.append(opt.last_step["loss_after"])
    theta = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    f_hf = objective(theta)[0]
    assert abs(f_hf - ref.fun) <= 1e-7 * abs(ref.fun)
    assert losses[-1] == pytest.approx(f_hf, rel=1e-12)  # the objective includes the weight decay
    assert np.abs(theta - ref.x).max() < 1e-5


def test_param_groups_weight_decay_in_objective_and_curvature():
    # Ridge with a decayed weight and an undecayed bias has a closed form; with
    # tiny damping HF is Newton's method and lands on it in a couple of steps
    # only if the curvature carries each group's decay too.
    g = gen(5)
    x = torch.randn(80, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 2.0 + 0.2 * torch.randn(80, 1, generator=g)
    model = nn.Linear(4, 1)
    wd = 0.3
    opt = hfopt.HFOptimizer([{"params": [model.weight], "weight_decay": wd}, {"params": [model.bias]}],
                            damping=1e-8, preconditioner=False)
    assert [grp["weight_decay"] for grp in opt.param_groups] == [wd, 0.0]
    closure = closure_for(model, nn.MSELoss(), x, y)
    with torch.no_grad():
        expect0 = float(F.mse_loss(model(x), y)) + 0.5 * wd * float(model.weight.pow(2).sum())
    opt.step(closure)
    assert opt.last_step["loss_before"] == pytest.approx(expect0, rel=1e-14)
    opt.step(closure)

    a = torch.cat([x, torch.ones(80, 1)], 1)
    lhs = 2 / 80 * a.T @ a + torch.diag(torch.tensor([wd] * 4 + [0.0]))
    sol = torch.linalg.solve(lhs, 2 / 80 * a.T @ y).squeeze(1)
    assert (flat([model.weight, model.bias]) - sol).abs().max() < 1e-10

    assert model.weight.grad is not None
    opt.zero_grad()
    assert model.weight.grad is None and model.bias.grad is None


# ----------------------------------------------------------------------------- rules, each against its spec
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("loss_kind", ["module", "functional", "module_plus_term"])
def test_predicted_reduction_and_damping_rule(curvature, loss_kind):
    """rho = actual / predicted with predicted = g.d + d.B.d/2 (undamped, B exact
    at the step's start), and lambda follows the LM rule each step."""
    x, y = classification_data()
    model = mlp()
    ce = nn.CrossEntropyLoss()
    wd = 1e-3

    def loss_of_outputs(o):
        if loss_kind == "module":
            return ce(o, y)
        if loss_kind == "functional":
            return F.cross_entropy(o, y)
        return ce(o, y) + 0.1 * o.pow(2).mean()

    def closure():
        outputs = model(x)
        return loss_of_outputs(outputs), outputs

    opt = hfopt.HFOptimizer(model.parameters(), curvature=curvature, damping=0.1 if curvature == "ggn" else 1.0,
                            weight_decay=wd,
                            line_search=False, backtracking=False)
    exact = exact_hessian if curvature == "hessian" else exact_ggn
    seen = set()
    for _ in range(6):
        B = exact(model, loss_of_outputs, x) + wd * torch.eye(sum(p.numel() for p in model.parameters()))
        g = gradient(model, closure) + wd * flat(model.parameters())
        theta0 = flat(model.parameters())
        opt.step(closure)
        s = opt.last_step
        assert s["engine"] == "rules"
        d = flat(model.parameters()) - theta0
        assert s["accepted"] and s["line_search_step"] == 1.0
        predicted = float(g @ d + 0.5 * d @ B @ d)
        assert s["predicted_reduction"] == pytest.approx(-predicted, rel=1e-8, abs=1e-14)
        assert s["actual_reduction"] == pytest.approx(s["loss_before"] - s["loss_after"], rel=1e-12)
        assert s["rho"] == pytest.approx(s["actual_reduction"] / s["predicted_reduction"], rel=1e-12)
        lam, rho = s["damping"], s["rho"]
        factor = 1.5 if not rho >= 0.25 else (2 / 3 if rho > 0.75 else 1.0)
        if s["cg_stop_reason"] == "negative_curvature":
            factor = max(factor, 1.5)
        assert s["damping_next"] == pytest.approx(lam * factor, rel=1e-14)
        assert opt.damping.value == s["damping_next"] == opt.state_dict()["state"]["hf"]["damping"]
        seen.add(factor)
    assert len(seen) >= 2  # more than one branch of the rule was exercised


def test_damping_rises_on_negative_curvature_with_hessian():
    x, y = image_data()
    model = bn_convnet()
    opt = hfopt.HFOptimizer(model.parameters(), curvature="hessian", damping=1.0)
    closure = closure_for(model, nn.CrossEntropyLoss(), x, y)
    negative = 0
    for _ in range(3):
        opt.step(closure)
        s = opt.last_step
        assert s["engine"] == "rules"
        if s["cg_stop_reason"] == "negative_curvature":
            negative += 1
            assert s["damping_next"] >= 1.5 * s["damping"] * (1 - 1e-14)
    assert negative >= 1


def test_non_finite_rho_is_a_failure_and_line_search_rejects():
    """Trial evaluations that return NaN: rho is NaN -> lambda x 3/2, no step
    length passes Armijo -> the step is rejected and the parameters stay."""
    x, y = classification_data()
    model = mlp()

    class NaNOnTrials(nn.CrossEntropyLoss):
        def forward(self, outputs, target):
            loss = super().forward(outputs, target)
            return loss if torch.is_grad_enabled() else loss * math.nan  # trial evaluations run without grad

    closure = closure_for(model, NaNOnTrials(), x, y)
    opt = hfopt.HFOptimizer(model.parameters(), damping=0.5, line_search_max_evaluations=5)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    s = opt.last_step
    assert math.isnan(s["rho"])
    assert s["damping_next"] == pytest.approx(0.75, rel=1e-15)
    assert not s["accepted"] and s["line_search_step"] == 0.0 and s["loss_after"] == s["loss_before"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_warm_start_from_decayed_last_iterate(monkeypatch):
    x, y = image_data()
    model = bn_convnet()
    spy = CGSpy()
    monkeypatch.setattr(hfo, "cg", spy)
    opt = hfopt.HFOptimizer(model.parameters(), backtrack_below_rho=math.inf)
    closure = closure_for(model, nn.CrossEntropyLoss(), x, y)
    params = list(model.parameters())
    earlier = 0
    for k in range(6):
        opt.step(closure)
        call = spy.calls[-1]
        if k == 0:
            assert call["x0"] is None
        else:
            prev = spy.calls[-2]["res"]
            assert torch.equal(call["x0"], prev.x * 0.95)
        res = call["res"]
        assert res.x is res.saved[-1][1] and res.saved[-1][0] == res.iterations
        # the state holds the undecayed last iterate, per parameter
        stored = torch.cat([opt.state[p]["warm_start"].reshape(-1) for p in params])
        assert torch.equal(stored, res.x)
        if opt.last_step["backtrack_iteration"] < res.iterations:
            earlier += 1
    assert earlier >= 1  # some step backtracked, and the warm start still used the last iterate

    no_warm = hfopt.HFOptimizer(model.parameters(), warm_start=0.0)
    no_warm.step(closure)
    no_warm.step(closure)
    assert spy.calls[-1]["x0"] is None


def test_warm_start_ignores_backtracked_iterate(monkeypatch):
    """Spoil the last saved iterate: backtracking picks an earlier one, the
    warm start still comes from the (unspoiled) last iterate res.x."""
    x, y = classification_data()
    model = mlp()

    def spoil(res, matvec, b):
        assert len(res.saved) >= 2
        bad = res.saved[-1][1] * 40.0
        return CGResult(x=res.x, saved=res.saved[:-1] + [(res.saved[-1][0], bad)], iterations=res.iterations,
                        stop_reason=res.stop_reason, phi=res.phi, matvecs=res.matvecs)

    spy = CGSpy(spoil)
    monkeypatch.setattr(hfo, "cg", spy)
    opt = hfopt.HFOptimizer(model.parameters(), damping=1e-2, preconditioner=False, backtrack_below_rho=math.inf)
    closure = closure_for(model, nn.CrossEntropyLoss(), x, y)
    theta0 = flat(model.parameters())
    opt.step(closure)
    res = spy.calls[0]["res"]
    chosen = opt.last_step["backtrack_iteration"]
    assert chosen < res.saved[-1][0] and chosen in [i for i, _ in res.saved]
    d = dict(res.saved)[chosen]
    assert torch.allclose(flat(model.parameters()) - theta0, d * opt.last_step["line_search_step"], atol=1e-15)
    opt.step(closure)
    assert torch.equal(spy.calls[1]["x0"], res.x * 0.95)


def test_backtracking_follows_martens_rule(monkeypatch):
    """The chosen iterate is the one Martens' walk-back picks from the saved
    iterates, recomputed independently on the true objective."""
    x, y = image_data()
    model = bn_convnet()
    spy = CGSpy()
    monkeypatch.setattr(hfo, "cg", spy)
    opt = hfopt.HFOptimizer(model.parameters(), curvature_batch=12, damping=0.3, backtrack_below_rho=math.inf)
    ce = nn.CrossEntropyLoss()
    closure = closure_for(model, ce, x, y)
    params = list(model.parameters())
    not_last = 0
    for _ in range(5):
        probe = copy.deepcopy(model)
        theta0 = flat(params)
        opt.step(closure)
        res = spy.calls[-1]["res"]

        def objective(d):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta0 + d, probe.parameters())
                return float(ce(probe(x), y))

        values = [objective(v) for _, v in res.saved]
        idx = len(values) - 1
        while idx > 0 and values[idx - 1] < values[idx]:
            idx -= 1
        assert opt.last_step["backtrack_iteration"] == res.saved[idx][0]
        not_last += idx < len(values) - 1
    assert not_last >= 1


def test_armijo_line_search_shrinks_too_long_step(monkeypatch):
    x, y = classification_data()
    model = mlp()
    scale = 6.0
    spy = CGSpy(lambda res, mv, b: single_iterate(res, res.x * scale, mv, b))
    monkeypatch.setattr(hfo, "cg", spy)
    # min_rho=None: the overlong step has rho < 0, which would be rejected before the line search.
    opt = hfopt.HFOptimizer(model.parameters(), damping=1e-2, min_rho=None)
    ce = nn.CrossEntropyLoss()
    closure = closure_for(model, ce, x, y)
    theta0 = flat(model.parameters())
    g = gradient(model, closure)
    opt.step(closure)
    s = opt.last_step
    d = spy.calls[0]["res"].x
    alpha = s["line_search_step"]
    k = round(math.log(alpha) / math.log(0.8))
    assert k >= 1 and alpha == 0.8 ** k
    assert s["accepted"]
    assert torch.allclose(flat(model.parameters()), theta0 + alpha * d, atol=1e-15, rtol=0)

    probe = copy.deepcopy(model)

    def f(t):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta0 + t * d, probe.parameters())
            return float(ce(probe(x), y))

    f0, slope = s["loss_before"], float(g @ d)
    assert f(alpha) <= f0 + 1e-2 * alpha * slope  # Armijo holds at the accepted step
    for j in range(k):  # ... and fails at every longer one tried before it
        assert f(0.8 ** j) > f0 + 1e-2 * 0.8 ** j * slope
    assert s["loss_after"] == pytest.approx(f(alpha), rel=1e-12)


@pytest.mark.parametrize("how", ["ascent", "too_long"])
def test_line_search_without_passing_step_rejects(monkeypatch, how):
    x, y = classification_data()
    model = mlp()
    factor = -1.0 if how == "ascent" else 1e4
    monkeypatch.setattr(hfo, "cg", CGSpy(lambda res, mv, b: single_iterate(res, res.x * factor, mv, b)))
    # min_rho=None: this checks the line search, which a rho < 0 rejection would pre-empt.
    opt = hfopt.HFOptimizer(model.parameters(), line_search_max_evaluations=3, min_rho=None)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    s = opt.last_step
    assert not s["accepted"] and s["line_search_step"] == 0.0 and s["step_norm"] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert s["evaluations"] == (2 if how == "ascent" else 4)  # closure + trial at 1 (+ 0.8, 0.64)


def test_cg_options_reach_cg(monkeypatch):
    x, y = classification_data()
    model = mlp()
    spy = CGSpy()
    monkeypatch.setattr(hfo, "cg", spy)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=7, cg_eps=1e-3)
    opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    kw = spy.calls[0]["kw"]
    assert kw["max_iterations"] == 7 and kw["eps"] == 1e-3
    assert opt.last_step["cg_iterations"] <= 7


def test_preconditioner_is_diag_estimate_to_the_three_quarters(monkeypatch):
    x, y = classification_data()
    model = mlp()
    spy = CGSpy()
    monkeypatch.setattr(hfo, "cg", spy)
    recorded = []
    original = hfo._Reordered.diagonal_estimate

    def diag_spy(self, samples, generator):
        out = original(self, samples, generator)
        recorded.append(torch.cat([t.reshape(-1) for t in out]))
        return out

    monkeypatch.setattr(hfo._Reordered, "diagonal_estimate", diag_spy)
    lam, wd = 0.2, 0.01
    opt = hfopt.HFOptimizer(model.parameters(), damping=lam, weight_decay=wd)
    opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    want = (recorded[0].clamp_min(0) + wd + lam).pow(0.75)
    assert torch.equal(spy.calls[0]["kw"]["precond"], want)

    off = hfopt.HFOptimizer(model.parameters(), preconditioner=False)
    off.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    assert spy.calls[-1]["kw"]["precond"] is None


# ----------------------------------------------------------------------------- BatchNorm convnet
def test_bn_convnet_trains_and_buffers_match_one_training_forward():
    x, y = image_data()
    model = bn_convnet()
    opt = hfopt.HFOptimizer(model.parameters())
    closure = closure_for(model, nn.CrossEntropyLoss(), x, y)
    losses = []
    for k in range(20):
        reference = copy.deepcopy(model)
        reference.train()
        with torch.no_grad():
            reference(x)
        opt.step(closure)
        s = opt.last_step
        assert s["engine"] == "rules" and s["rejected"] is None
        assert s["evaluations"] >= 2  # trial evaluations ran, and did not move the buffers
        assert_bitwise(bn_state(model), bn_state(reference))
        losses.append(s["loss_before"])
    assert int(model[1].num_batches_tracked) == 20
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize("serialize", [True, False])
def test_state_dict_round_trip_reproduces_trajectory(serialize):
    x, y = image_data()
    opts = dict(curvature_batch=16, damping=0.5)  # slices, generator and warm start all in play
    loss_fn = nn.CrossEntropyLoss()

    straight = bn_convnet()
    opt = hfopt.HFOptimizer(straight.parameters(), **opts)
    for _ in range(6):
        opt.step(closure_for(straight, loss_fn, x, y))

    first = bn_convnet()
    opt1 = hfopt.HFOptimizer(first.parameters(), **opts)
    for _ in range(3):
        opt1.step(closure_for(first, loss_fn, x, y))
    saved_opt, saved_model = opt1.state_dict(), first.state_dict()
    if serialize:
        buf = io.BytesIO()
        torch.save({"opt": saved_opt, "model": saved_model}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        saved_opt, saved_model = loaded["opt"], loaded["model"]
    else:
        saved_model = copy.deepcopy(saved_model)
    assert saved_opt["state"]["hf"]["step"] == 3
    # the first run goes on; a state_dict is a snapshot that must not follow it
    for _ in range(3):
        opt1.step(closure_for(first, loss_fn, x, y))
    assert saved_opt["state"]["hf"]["step"] == 3

    resumed = bn_convnet(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = hfopt.HFOptimizer(resumed.parameters(), **opts)
    opt2.load_state_dict(saved_opt)
    for _ in range(3):
        opt2.step(closure_for(resumed, loss_fn, x, y))

    for other in (first, resumed):
        for (n, a), b in zip(straight.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), n
    assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert opt2.last_step["damping"] == opt.last_step["damping"]


def test_nan_closure_changes_nothing():
    x, y = image_data()
    model = bn_convnet()
    opt = hfopt.HFOptimizer(model.parameters(), curvature_batch=16)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        opt.step(closure_for(model, loss_fn, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    buffers = bn_state(model)
    state = copy.deepcopy(opt.state_dict())
    lam = opt.damping.value

    bad = x.clone()
    bad[3, 0, 2, 2] = math.nan
    with pytest.warns(UserWarning, match="rejected") as record:
        opt.step(closure_for(model, loss_fn, bad, y))
    assert len([w for w in record if "rejected" in str(w.message)]) == 1
    s = opt.last_step
    assert not s["accepted"] and "non-finite" in s["rejected"]
    assert set(s) == ONE_PROCESS_KEYS and s["cg_iterations"] == 0 and s["engine"] is None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert_bitwise(bn_state(model), buffers)
    after = opt.state_dict()
    assert_state_equal(state, after)  # damping included: a bad batch says nothing about the step length
    assert after["state"]["hf"]["damping"] == opt.damping.value == lam
    assert all(p.grad is not None for p in model.parameters())  # the last good step's gradient stays

    opt.step(closure_for(model, loss_fn, x, y))  # and training goes on
    assert opt.last_step["accepted"]


def test_non_finite_curvature_product_changes_nothing(monkeypatch):
    x, y = image_data()
    model = bn_convnet()
    opt = hfopt.HFOptimizer(model.parameters(), curvature_batch=16)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        opt.step(closure_for(model, loss_fn, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    buffers = bn_state(model)
    state = copy.deepcopy(opt.state_dict())
    lam = opt.damping.value

    calls = {"n": 0}
    original = hfo._Reordered.matvec_flat

    def poisoned(self, v):
        calls["n"] += 1
        out = original(self, v)
        return out * math.nan if calls["n"] >= 3 else out  # fails in mid-CG

    monkeypatch.setattr(hfo._Reordered, "matvec_flat", poisoned)
    with pytest.warns(UserWarning, match="non-finite curvature"):
        opt.step(closure_for(model, loss_fn, x, y))
    assert not opt.last_step["accepted"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert_bitwise(bn_state(model), buffers)
    after = opt.state_dict()
    # curvature slice offset, sampling generator, warm start, counters, damping: as before
    assert_state_equal(state, after)
    assert after["state"]["hf"]["damping"] == opt.damping.value == lam


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_bn_convnet_both_curvatures_use_rules(curvature):
    x, y = image_data()
    model = bn_convnet()
    opt = hfopt.HFOptimizer(model.parameters(), curvature=curvature)
    closure = closure_for(model, nn.CrossEntropyLoss(), x, y)
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no rejection
        for _ in range(4):
            loss = opt.step(closure)
            first = float(loss) if first is None else first
            assert opt.last_step["engine"] == "rules"
            assert opt.last_step["curvature_products"] > 0
    assert opt.last_step["loss_after"] < first


@pytest.mark.parametrize("size,expect", [(12, 12), (0.25, 12), (None, 48)])
def test_curvature_batch_takes_successive_slices(monkeypatch, size, expect):
    x, y = image_data()
    model = bn_convnet()
    seen = []

    class SpyGGN(hfo.GGN):
        def __init__(self, model, loss_fn, inputs, targets, **kwargs):
            seen.append((inputs[0].clone(), targets.clone()))
            super().__init__(model, loss_fn, inputs, targets, **kwargs)

    monkeypatch.setattr(hfo, "GGN", SpyGGN)
    opt = hfopt.HFOptimizer(model.parameters(), curvature_batch=size)
    for _ in range(5):
        opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
        assert opt.last_step["curvature_samples"] == expect
    assert len(seen) == 5
    for k, (xi, yi) in enumerate(seen):
        idx = (torch.arange(expect) + k * expect) % 48
        assert torch.equal(xi, x[idx]) and torch.equal(yi, y[idx])


# ----------------------------------------------------------------------------- closure contract
def test_closure_returning_neither_form_is_a_type_error():
    x, y = classification_data()
    model = mlp()
    opt = hfopt.HFOptimizer(model.parameters())
    with pytest.raises(TypeError, match=r"\(loss, outputs\)"):
        opt.step(None)
    with pytest.raises(TypeError, match=r"\(loss, outputs\)"):
        opt.step(lambda: model(x))  # a non-scalar tensor
    with pytest.raises(TypeError, match=r"\(loss, outputs\)"):
        opt.step(lambda: float(nn.CrossEntropyLoss()(model(x), y)))


def _lbfgs_style(opt, model, loss_fn, x, y, retain=False, tuple_form=False):
    def closure():
        opt.zero_grad()
        outputs = model(x)
        loss = loss_fn(outputs, y)
        loss.backward(retain_graph=retain)
        return (loss, outputs) if tuple_form else loss
    return closure


@pytest.mark.parametrize("form", ["lbfgs", "lbfgs-retain", "tuple-with-backward", "bare-loss"])
def test_torch_optim_closures_take_the_same_steps(form):
    """The LBFGS-style closure, one returning (loss, outputs) after backward(),
    and a bare loss without backward() all take the steps of the (loss, outputs)
    form, bitwise, with the same buffers."""
    x, y = image_data()
    loss_fn = nn.CrossEntropyLoss()
    models = [bn_convnet() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [hfopt.HFOptimizer(m.parameters()) for m in models]
    ref = closure_for(models[0], loss_fn, x, y)
    if form == "bare-loss":
        other = lambda: loss_fn(models[1](x), y)  # noqa: E731
    else:
        other = _lbfgs_style(opts[1], models[1], loss_fn, x, y, retain=form == "lbfgs-retain",
                             tuple_form=form == "tuple-with-backward")
    for _ in range(3):
        assert torch.equal(opts[0].step(ref), opts[1].step(other))
        assert opts[1].last_step["engine"] == "rules"
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
        assert_bitwise(bn_state(models[0]), bn_state(models[1]))


def test_lbfgs_closure_that_cannot_be_served_says_what_to_write():
    x, y = image_data()
    model = bn_convnet()
    opt = hfopt.HFOptimizer(model.parameters())
    buffers = bn_state(model)
    params = [p.detach().clone() for p in model.parameters()]

    def functional():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def functional_tuple():
        opt.zero_grad()
        outputs = model(x)
        loss = F.cross_entropy(outputs, y)
        loss.backward()
        return loss, outputs

    for closure in (functional, functional_tuple):
        with pytest.raises(TypeError, match=r"(?s)loss module.*\(loss, outputs\)|\(loss, outputs\).*loss module"):
            opt.step(closure)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        assert all(p.grad is None for p in model.parameters())
        assert_bitwise(bn_state(model), buffers)


def test_lbfgs_closure_on_an_unfollowable_model_says_what_to_write():
    x, y = classification_data()
    scale = nn.Parameter(torch.tensor(0.5))
    model = ScaledLinear(scale)
    params = list(model.parameters()) + [scale]
    opt = hfopt.HFOptimizer(params)
    before = [p.detach().clone() for p in params]
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"(?s)autograd path.*backward"):
        opt.step(_lbfgs_style(opt, model, loss_fn, x, y))
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(params, before))


# ----------------------------------------------------------------------------- engine or autograd path
def test_functional_loss_uses_rules():
    x, y = classification_data()
    model = mlp()
    # small damping: the preconditioner's Hutchinson diagonal (no closed-form
    # loss) can be negative and must not poison the preconditioner; min_rho=None
    # takes the first, overlong steps through the line search instead of declining them
    opt = hfopt.HFOptimizer(model.parameters(), damping=1e-3, min_rho=None)

    def closure():
        outputs = model(x)
        return F.cross_entropy(outputs, y), outputs

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [float(opt.step(closure)) for _ in range(5)]
        # No safety rejection (a warning would raise); a step the model got wrong may be declined.
        assert opt.last_step["engine"] == "rules" and not opt.last_step["rejected"] or \
            opt.last_step["rejected"].startswith("rho")
    assert losses[-1] < losses[0]


class ScaledLinear(nn.Module):
    """Its forward uses a parameter that belongs to no module of the model."""

    def __init__(self, scale):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.scale = [scale]  # hidden from parameters()

    def forward(self, x):
        return self.lin(x) * self.scale[0]


@pytest.mark.parametrize("case", ["two_modules", "outside_parameter"])
def test_unfollowable_model_uses_autograd_with_one_warning(case):
    x, y = classification_data()
    torch.manual_seed(0)
    if case == "two_modules":
        body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU())
        head = nn.Linear(8, 3)
        params = list(body.parameters()) + list(head.parameters())
        forward, buffers_of = (lambda inp: head(body(inp))), body
    else:
        scale = nn.Parameter(torch.tensor(0.5))
        model = ScaledLinear(scale)
        params = list(model.parameters()) + [scale]
        forward, buffers_of = model, None

    opt = hfopt.HFOptimizer(params)
    loss_fn = nn.CrossEntropyLoss()

    def closure():
        outputs = forward(x)
        return loss_fn(outputs, y), outputs

    losses = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(4):
            if buffers_of is not None:
                reference = copy.deepcopy(buffers_of)
                with torch.no_grad():
                    reference(x)
            losses.append(float(opt.step(closure)))
            assert opt.last_step["engine"] == "autograd"
            assert opt.last_step["accepted"]
            if buffers_of is not None:  # trial evaluations did not move the buffers
                assert_bitwise(bn_state(buffers_of), bn_state(reference))
    assert len(record) == 1 and "autograd" in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_autograd_path_agrees_with_rules(curvature):
    x, y = classification_data()
    a, b = mlp()[0], mlp()[2]
    joined = nn.Sequential(copy.deepcopy(a), nn.ReLU(), copy.deepcopy(b))
    loss_fn = nn.CrossEntropyLoss()
    opts = dict(curvature=curvature, preconditioner=False, damping=0.1)
    opt_a = hfopt.HFOptimizer(list(a.parameters()) + list(b.parameters()), **opts)
    opt_r = hfopt.HFOptimizer(joined.parameters(), **opts)

    def split():
        outputs = b(torch.relu(a(x)))
        return loss_fn(outputs, y), outputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            opt_a.step(split)
            opt_r.step(closure_for(joined, loss_fn, x, y))
            assert opt_a.last_step["engine"] == "autograd" and opt_r.last_step["engine"] == "rules"
            assert opt_a.last_step["cg_iterations"] == opt_r.last_step["cg_iterations"]
    theta_a = flat(list(a.parameters()) + list(b.parameters()))
    assert torch.allclose(theta_a, flat(joined.parameters()), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- options, diagnostics
@pytest.mark.parametrize("kwargs,name", [
    (dict(curvature="newton"), "curvature"),
    (dict(damping=0.0), "damping"),
    (dict(damping=math.nan), "damping"),
    (dict(damping_bounds=(1.0, 0.1)), "damping_bounds"),
    (dict(damping_decrease=1.5), "damping_decrease"),
    (dict(damping_increase=0.5), "damping_increase"),
    (dict(cg_max_iterations=0), "cg_max_iterations"),
    (dict(cg_max_iterations=2.5), "cg_max_iterations"),
    (dict(cg_eps=-1.0), "cg_eps"),
    (dict(warm_start=1.5), "warm_start"),
    (dict(preconditioner="yes"), "preconditioner"),
    (dict(preconditioner_exponent=-0.5), "preconditioner_exponent"),
    (dict(preconditioner_samples=0), "preconditioner_samples"),
    (dict(curvature_batch=1), "curvature_batch"),
    (dict(curvature_batch=0.0), "curvature_batch"),
    (dict(curvature_batch=1.5), "curvature_batch"),
    (dict(line_search_c=0.0), "line_search_c"),
    (dict(line_search_shrink=1.0), "line_search_shrink"),
    (dict(line_search_max_evaluations=0), "line_search_max_evaluations"),
    (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(writer=object()), "writer"),
    (dict(min_rho=0.5), "min_rho"),
    (dict(min_rho="0"), "min_rho"),
    (dict(backtrack_below_rho=math.nan), "backtrack_below_rho"),
    (dict(backtrack_below_rho="inf"), "backtrack_below_rho"),
])
def test_bad_options_raise_value_error_naming_them(kwargs, name):
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=name):
        hfopt.HFOptimizer(model.parameters(), **kwargs)


def test_bad_group_weight_decay():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="weight_decay"):
        hfopt.HFOptimizer([{"params": model.parameters(), "weight_decay": -1.0}])


class FakeWriter:
    def __init__(self):
        self.scalars = []
        self.texts = []

    def add_scalar(self, tag, value, step, walltime=None):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step, walltime=None):
        self.texts.append((tag, text, step))


def test_diagnostics_and_writer():
    x, y = classification_data()
    model = mlp()
    writer = FakeWriter()
    opt = hfopt.HFOptimizer(model.parameters(), writer=writer)
    assert isinstance(opt, torch.optim.Optimizer)
    for _ in range(3):
        opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
        assert set(opt.last_step) == ONE_PROCESS_KEYS
    s = opt.last_step
    assert s["curvature_products"] >= s["cg_iterations"] > 0
    assert 0 < s["curvature_time"] < s["wall_time"]
    assert s["grad_norm"] > 0 and s["step_norm"] > 0 and s["evaluations"] >= 2
    tags = {t for t, _, _ in writer.scalars}
    for key in ["loss_before", "loss_after", "damping", "rho", "cg_iterations", "curvature_time", "wall_time",
                "accepted", "line_search_step", "log10_damping"]:
        assert f"hf/{key}" in tags
    assert not tags & {"hf/time_communication", "hf/bytes_all_reduced"}
    assert s["actual_reduction"] == pytest.approx(s["loss_before"] - s["loss_after"]) and s["actual_reduction"] > 0
    assert {step for _, _, step in writer.scalars} == {1, 2, 3}
    last = {t: v for t, v, step in writer.scalars if step == 3}
    assert last["hf/loss_before"] == s["loss_before"] and last["hf/damping"] == s["damping"]
    assert last["hf/log10_damping"] == pytest.approx(math.log10(s["damping"]))
    assert all(isinstance(v, float) or isinstance(v, int) for _, v, _ in writer.scalars)


# ----------------------------------------------------------------------------- every registered model
@pytest.mark.parametrize("name", ["c3d3_bn", "allcnnc_bn", "resnet8_bn", "resnet20_bn", "resnet18_bn",
                                  "wrn16_4_bn", "digits_convnet_bn", "mlp_bn"])
def test_every_registered_model_steps_with_rules(name):
    from models import DEFAULT_INPUT, MODELS

    torch.manual_seed(0)
    model = MODELS[name](num_classes=4).float()
    g = gen(7)
    shape = (3, 8, 8) if name in ("resnet18_bn", "wrn16_4_bn") else DEFAULT_INPUT[name]  # big: small images
    x = torch.randn(6, *shape, generator=g, dtype=torch.float32)
    if name == "mlp_bn":
        x = x.flatten(1)
    y = torch.randint(0, 4, (6,), generator=g)
    opt = hfopt.HFOptimizer(model.parameters(), cg_max_iterations=3, curvature_batch=4)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    s = opt.last_step
    # No safety rejection (a warning would raise); on 4 of 6 samples the model may be declined (rho < 0).
    assert s["engine"] == "rules" and s["curvature_samples"] == 4
    assert s["rejected"] is None or s["rejected"].startswith("rho")
    assert math.isfinite(s["loss_after"]) and s["loss_after"] <= s["loss_before"]
    assert_bitwise(bn_state(model), bn_state(reference))


# ----------------------------------------------------------------------------- late divergence
def _digits_subset_run(steps: int, **options) -> list:
    """HF on 256 bundled digits, batches of 64 in turn, float32 like training;
    the whole-set loss after every step."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, Y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(X[:256], dtype=torch.float32) / 16
    y = torch.tensor(Y[:256])
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10)).float()
    opt = hfopt.HFOptimizer(model.parameters(), **options)
    ce = nn.CrossEntropyLoss()
    full = []
    for t in range(steps):
        xb, yb = x[64 * (t % 4):64 * (t % 4 + 1)], y[64 * (t % 4):64 * (t % 4 + 1)]
        opt.step(closure_for(model, ce, xb, yb))
        with torch.no_grad():
            full.append(float(ce(model(x), y)))
    return full


@pytest.mark.slow
def test_no_late_divergence_once_the_loss_is_small():
    """The README's digits run diverged late: lambda followed the vanishing
    curvature down to 1e-8 and float32 noise in the gradient then drove O(1)
    steps.  The same happens here with the old floor; the defaults hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        old = _digits_subset_run(80, damping_bounds=(1e-8, 1e8), min_rho=None)
        new = _digits_subset_run(80)
    finally:
        torch.set_num_threads(threads)
    assert old[-1] > 100 * min(old)  # the reproduction: the old settings blow up
    assert new[-1] <= 2 * min(new) and min(new) < 1e-3


# ----------------------------------------------------------------------------- declining and backtracking
def test_default_damping_floor():
    opt = hfopt.HFOptimizer(nn.Linear(2, 1).parameters())
    assert (opt.damping.minimum, opt.damping.maximum) == (1e-4, 1e8)


@pytest.mark.parametrize("min_rho", [0.0, None])
def test_step_with_negative_rho_is_declined(monkeypatch, min_rho):
    """A 6x overlong CG step raises the loss while CG's record promises a
    decrease (rho < 0): by default the parameters stay and lambda rises;
    min_rho=None hands the step to the line search."""
    x, y = classification_data()
    model = mlp()

    def overlong(res, matvec, b):
        out = single_iterate(res, res.x * 6.0, matvec, b)
        out.phi[-1] = -1.0  # the quadratic's (false) promise: predicted < 0
        return out

    monkeypatch.setattr(hfo, "cg", CGSpy(overlong))
    opt = hfopt.HFOptimizer(model.parameters(), damping=1e-2, min_rho=min_rho)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declining is the model's verdict, not a safety warning
        opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    s = opt.last_step
    assert s["rho"] < 0 and s["damping_next"] == pytest.approx(1.5e-2)
    if min_rho is None:
        assert s["accepted"] and 0 < s["line_search_step"] < 1 and s["rejected"] is None
        assert s["loss_after"] < s["loss_before"]
    else:
        assert not s["accepted"] and s["rejected"].startswith("rho") and s["evaluations"] == 2
        assert s["loss_after"] == s["loss_before"] and s["step_norm"] == 0.0
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.state["hf"]["step"] == 1


def test_backtracking_walks_back_only_where_the_model_was_poor(monkeypatch):
    x, y = classification_data()
    closure_model = mlp()
    spy = CGSpy()
    monkeypatch.setattr(hfo, "cg", spy)
    opt = hfopt.HFOptimizer(closure_model.parameters(), damping=1.0)
    opt.step(closure_for(closure_model, nn.CrossEntropyLoss(), x, y))
    s, res = opt.last_step, spy.calls[0]["res"]
    assert len(res.saved) > 1 and s["rho"] >= 0.25
    assert s["backtrack_iteration"] == res.iterations and s["evaluations"] == 2  # no walk back

    model = mlp()

    def spoil(res, matvec, b):  # the last iterate 40x too long: rho there is far below 1/4
        bad = res.x * 40.0
        return CGResult(x=bad, saved=res.saved[:-1] + [(res.saved[-1][0], bad)], iterations=res.iterations,
                        stop_reason=res.stop_reason, phi=res.phi[:-1] + [phi(matvec, b, bad)], matvecs=res.matvecs)

    spy = CGSpy(spoil)
    monkeypatch.setattr(hfo, "cg", spy)
    opt = hfopt.HFOptimizer(model.parameters(), damping=1e-2, preconditioner=False)
    opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    s, res = opt.last_step, spy.calls[0]["res"]
    assert s["backtrack_iteration"] < res.iterations and s["evaluations"] >= 3
    assert s["rho"] >= 0 and s["accepted"]


def test_step_time_split_adds_up():
    x, y = image_data()
    model = bn_convnet()
    opt = hfopt.HFOptimizer(model.parameters())
    opt.step(closure_for(model, nn.CrossEntropyLoss(), x, y))
    s = opt.last_step
    parts = ["time_gradient", "time_build", "time_products", "time_preconditioner", "time_evaluations", "time_other"]
    assert all(s[k] >= 0 for k in parts) and all(s[k] > 0 for k in parts[:5])
    assert sum(s[k] for k in parts) == pytest.approx(s["wall_time"], rel=1e-9)
    assert s["curvature_time"] == pytest.approx(s["time_build"] + s["time_products"] + s["time_preconditioner"])
