"""compile=True: compiled products against autograd, reuse across operators,
and the eager fallback where compilation fails."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hfopt
from hfopt import compiled

from conftest import check_exact, labels, make, rand_vec, randn

CE = nn.CrossEntropyLoss()


class PoolResNet(nn.Module):
    """Conv on the data -> BN -> ReLU -> MaxPool (the fused rule with its
    scatter), a residual block, an index gather (index_add_ backwards)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        z = self.stem(x)
        z = torch.tanh(z + self.bn(self.conv(z)))
        z = z.mean((2, 3))[:, torch.tensor([0, 2, 2, 3])]
        return self.fc(z)


@pytest.fixture
def fresh_state(monkeypatch):
    """Each test sees a process where compilation has not failed yet."""
    monkeypatch.setattr(compiled, "_FAILED", None)
    yield


def _model():
    torch.manual_seed(0)
    return make(PoolResNet(), seed=1).train(), randn(6, 2, 8, 8), labels(6, 3)


def test_compiled_products_exact(fresh_state):
    model, x, y = _model()
    counters = torch._dynamo.utils.counters
    counters.clear()
    ops = check_exact(model, CE, x, y, tag="-compiled", compile=True)["ops"]
    assert compiled.compile_failure() is None
    # Really compiled, each product one graph: the scatters broke nothing.
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    # A second operator (the next HF step) reuses the compiled code and is exact too.
    again = check_exact(model, CE, x, y, tag="-compiled", compile=True)["ops"]
    v = rand_vec(model)
    for kind in ops:
        eager = type(ops[kind])(model, CE, x, y) @ v
        for a, b in zip(again[kind] @ v, eager):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_optimizer_step_compiled(fresh_state):
    steps = []
    for flag in (False, True):
        model, x, y = _model()
        opt = hfopt.HFOptimizer(model.parameters(), compile=flag, cg_max_iterations=5)
        opt.step(lambda: CE(model(x), y))
        steps.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*steps):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_compile_failure_falls_back(fresh_state, monkeypatch):
    model, x, y = _model()
    v = rand_vec(model)
    want = hfopt.Hessian(model, CE, x, y) @ v

    def broken(fn, **kw):
        def run(*a, **k):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")  # what a backend failure raises
        return run

    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    op = hfopt.Hessian(model, CE, x, y, compile=True)
    with pytest.warns(UserWarning, match="could not compile.*no C\\+\\+ compiler.*eagerly"):
        got = op @ v
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert "no C++ compiler" in compiled.compile_failure()
    got = op @ v  # no second attempt, no second warning
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_no_torch_compile_falls_back(fresh_state, monkeypatch):
    model, x, y = _model()
    v = rand_vec(model)
    want = hfopt.GGN(model, CE, x, y) @ v
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.delattr(torch, "compile")
    with pytest.warns(UserWarning, match="has no torch.compile"):
        got = hfopt.GGN(model, CE, x, y, compile=True) @ v
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_product_errors_are_not_compile_failures():
    assert not compiled._is_compile_failure(ValueError("a rule's own error"))
    assert compiled._is_compile_failure(torch._dynamo.exc.TorchDynamoException("backend"))


def test_compile_argument_checked():
    model, x, y = _model()
    with pytest.raises(TypeError, match="compile must be True or False"):
        hfopt.GGN(model, CE, x, y, compile="yes")
    with pytest.raises(ValueError, match="compile must be True or False"):
        hfopt.HFOptimizer(model.parameters(), compile=1)
