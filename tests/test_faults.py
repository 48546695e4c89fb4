"""Faults inside a step: an exception (a KeyboardInterrupt, the hardest case)
raised in the first closure call, in CG, in the preconditioner, in a trial
evaluation, in CG backtracking or in the line search leaves parameters,
BatchNorm buffers, ``.grad`` and the optimizer state bitwise as before the
step, and the next step is exactly the step an uninterrupted twin takes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import hfopt
import hfopt.optimizer as hfo
from conftest import assert_same_tensors
from hfopt.cg import cg as real_cg


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(48, 3)).float()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)


class Interrupting(nn.CrossEntropyLoss):
    """Raises KeyboardInterrupt on the chosen call (calls counted while armed)."""

    def __init__(self):
        super().__init__()
        self.armed, self.when, self.calls = False, None, 0

    def forward(self, outputs, target):
        if self.armed and self.when(self):
            self.calls += 1
            if self.calls == self.fire_at:
                raise KeyboardInterrupt
        return super().forward(outputs, target)


def _everything(model, opt):
    """What an interrupted step must leave as it was, as plain values."""
    sd = opt.state_dict()
    gen = opt._generator.get_state() if opt._generator is not None else None
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(sd), opt.damping.value, gen)


def _assert_same(a, b):
    (sa, ga, oa, la, gena), (sb, gb, ob, lb, genb) = a, b
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "parameters or buffers moved"
    assert all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(ga, gb)), ".grad changed"
    assert_same_tensors(oa, ob)
    assert la == lb, "damping changed"
    assert (gena is None and genb is None) or torch.equal(gena, genb), "generator state changed"


def _interrupting_cg(after: int):
    def cg(matvec, *args, **kwargs):
        count = {"n": 0}

        def counted(v):
            count["n"] += 1
            if count["n"] == after:
                raise KeyboardInterrupt
            return matvec(v)

        return real_cg(counted, *args, **kwargs)
    return cg


POINTS = ["first_call", "cg", "preconditioner", "trial", "backtracking", "line_search"]


@pytest.mark.parametrize("point", POINTS)
def test_interrupt_leaves_everything_and_the_next_step_is_normal(point, monkeypatch):
    x, y = _data()
    runs = []
    for _ in range(2):
        model = _model()
        loss_fn = Interrupting()
        opts = dict(backtrack_below_rho=math.inf) if point == "backtracking" else {}
        opt = hfopt.HFOptimizer(model.parameters(), **opts)

        def closure(model=model, loss_fn=loss_fn):
            outputs = model(x)
            return loss_fn(outputs, y), outputs

        opt.step(closure)  # state worth keeping: warm start, damping, generator, BN statistics
        runs.append((model, loss_fn, opt, closure))
    (model, loss_fn, opt, closure), (twin, _, twin_opt, twin_closure) = runs

    before = _everything(model, opt)
    with monkeypatch.context() as m:
        if point == "first_call":
            loss_fn.armed, loss_fn.when, loss_fn.fire_at = True, lambda self: torch.is_grad_enabled(), 1
        elif point == "trial":
            loss_fn.armed, loss_fn.when, loss_fn.fire_at = True, lambda self: not torch.is_grad_enabled(), 1
        elif point == "cg":
            m.setattr(hfo, "cg", _interrupting_cg(after=3))
        elif point == "preconditioner":
            def boom(*args, **kwargs):
                raise KeyboardInterrupt
            m.setattr(hfo._Reordered, "diagonal_estimate", boom)
        elif point == "backtracking":
            def backtrack(saved, evaluate, **kwargs):
                evaluate(saved[0][1])  # one evaluation moves the parameters, then the interrupt
                raise KeyboardInterrupt
            m.setattr(hfo, "backtrack", backtrack)
        else:
            def armijo(f, *args, **kwargs):
                f(0.5)
                raise KeyboardInterrupt
            m.setattr(hfo, "armijo", armijo)
            # Reach the line search: no min_rho decline in the way.
            opt.options["min_rho"] = None
        with pytest.raises(KeyboardInterrupt):
            opt.step(closure)
    loss_fn.armed = False
    opt.options["min_rho"] = twin_opt.options["min_rho"]
    _assert_same(_everything(model, opt), before)

    # The next step is the uninterrupted twin's step, bitwise.
    assert torch.equal(opt.step(closure), twin_opt.step(twin_closure))
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    assert_same_tensors(opt.state_dict(), twin_opt.state_dict())


def test_an_error_raised_by_the_closure_is_the_same_guarantee():
    x, y = _data()
    model = _model()
    opt = hfopt.HFOptimizer(model.parameters())
    ce = nn.CrossEntropyLoss()

    def good():
        outputs = model(x)
        return ce(outputs, y), outputs

    opt.step(good)
    before = _everything(model, opt)

    def raising():
        outputs = model(x)  # the BatchNorm statistics move before the error
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(raising)
    _assert_same(_everything(model, opt), before)


def test_a_failed_first_step_leaves_no_state_behind(monkeypatch):
    x, y = _data()
    model = _model()
    opt = hfopt.HFOptimizer(model.parameters())
    before = opt.state_dict()
    monkeypatch.setattr(hfo, "cg", _interrupting_cg(after=2))  # after the warm start was looked up
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: (lambda out: (nn.CrossEntropyLoss()(out, y), out))(model(x)))
    assert_same_tensors(opt.state_dict(), before)
