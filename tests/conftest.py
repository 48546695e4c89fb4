"""Shared helpers for the curvature tests: autograd references, state snapshots,
exactness checks and a small model zoo.

Every reference is computed in float64 by plain reverse-mode autograd:

* Hessian-vector product: reverse-over-reverse,
  ``Hv = grad(grad(L, params, create_graph=True), params, v)``;
* GGN-vector product: ``Jv`` by the double-vjp trick, the output Hessian by
  double backward on the loss alone (output detached), then ``J^T``.

Forward-mode AD (``torch.func.jvp``) is never used as a reference: through a
train-mode BatchNorm it is not trustworthy in every torch version, and
torch.func refuses train-mode BatchNorm modules anyway.

A train-mode BatchNorm updates its running statistics on every forward, so each
reference runs inside :func:`preserved_state`, which restores parameters and
buffers bitwise afterwards: hfopt and the reference always see the same state.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hfopt

TOL = 1e-10

# Largest relative error seen per check kind; printed at the end of the run.
MAX_ERRORS: Dict[str, float] = {}


def record(kind: str, err: float) -> float:
    MAX_ERRORS[kind] = max(MAX_ERRORS.get(kind, 0.0), float(err))
    return err


def pytest_terminal_summary(terminalreporter):
    if MAX_ERRORS:
        terminalreporter.section("hfopt curvature: max relative errors")
        for kind in sorted(MAX_ERRORS):
            terminalreporter.write_line(f"{kind:28s} {MAX_ERRORS[kind]:.3e}")


# ----------------------------------------------------------------------------- vectors
def trainable(model: nn.Module) -> List[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat(vec: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in vec])


def rel_err(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``||a - b|| / ||b||`` over whole parameter lists (absolute when ``b`` is 0)."""
    a, b = flat(a), flat(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(flat(a) @ flat(b))


def rand_vec(model_or_params, seed: int = 0) -> List[Tensor]:
    params = trainable(model_or_params) if isinstance(model_or_params, nn.Module) else list(model_or_params)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]


# ----------------------------------------------------------------------------- state
def snapshot(model: nn.Module) -> Dict[str, Tensor]:
    """Parameters and buffers (num_batches_tracked included), cloned."""
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def assert_state_equal(model: nn.Module, snap: Dict[str, Tensor]) -> None:
    """Bitwise: same names, dtypes, shapes and bits."""
    now = snapshot(model)
    assert now.keys() == snap.keys()
    for k in snap:
        assert now[k].dtype == snap[k].dtype, k
        assert torch.equal(now[k], snap[k]), f"{k} changed"


def assert_same_tensors(a, b, where: str = "") -> None:
    """Recursively require equal tensors (same dtype, equal values, NaN where
    the other has NaN) and equal plain values (nan == nan here)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            nan = a.isnan()
            assert torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Restore every parameter and buffer bitwise on exit (a train-mode
    BatchNorm's reference forward updates its running statistics)."""
    snap = snapshot(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(snap[f"param:{n}"])
            for n, b in model.named_buffers():
                b.copy_(snap[f"buffer:{n}"])


# ----------------------------------------------------------------------------- references
def _grad(outputs, inputs, grad_outputs=None, create_graph=False) -> List[Tensor]:
    inputs = list(inputs)
    gs = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs)]


def run_model(model: nn.Module, x):
    """``model(x)``, or ``model(*x)`` for a tuple of inputs."""
    return model(*x) if isinstance(x, tuple) else model(x)


def _seed(seed: Optional[int]) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def ref_loss_output(model, loss_fn, x, y, seed=None):
    with preserved_state(model), torch.no_grad():
        _seed(seed)
        z = run_model(model, x)
        return loss_fn(z, y), z


def ref_grad(model, loss_fn, x, y, seed=None) -> List[Tensor]:
    params = trainable(model)
    with preserved_state(model):
        _seed(seed)
        return _grad(loss_fn(run_model(model, x), y), params)


def ref_hvp(model, loss_fn, x, y, v, seed=None) -> List[Tensor]:
    """Reverse-over-reverse Hessian-vector product."""
    params = trainable(model)
    with preserved_state(model):
        _seed(seed)
        g = _grad(loss_fn(run_model(model, x), y), params, create_graph=True)
        pairs = [(gi, vi) for gi, vi in zip(g, v) if gi.requires_grad]
        hv = _grad([p[0] for p in pairs], params, [p[1] for p in pairs]) if pairs else \
            [torch.zeros_like(p) for p in params]
    return [h.detach() for h in hv]


def ref_output_hvp(loss_fn, z, y, u) -> Tensor:
    zd = z.detach().requires_grad_(True)
    gz = torch.autograd.grad(loss_fn(zd, y), zd, create_graph=True)[0]
    if not gz.requires_grad:
        return torch.zeros_like(u)
    return torch.autograd.grad(gz, zd, u)[0]


def ref_jvp(model, x, v, seed=None):
    """(output, J v) by the double-vjp trick (reverse mode only)."""
    with preserved_state(model):
        _seed(seed)
        return _forward_and_jvp(model, x, v)


def _forward_and_jvp(model, x, v):
    """Output (with its graph) and J v by the double-vjp trick; the caller
    preserves the model's state."""
    z = run_model(model, x)
    u = torch.zeros_like(z, requires_grad=True)
    vjp = _grad(z, trainable(model), u, create_graph=True)
    pairs = [(a, b) for a, b in zip(vjp, v) if a.requires_grad]
    jv = _grad([p[0] for p in pairs], [u], [p[1] for p in pairs])[0] if pairs else torch.zeros_like(z)
    return z, jv


def ref_ggnvp(model, loss_fn, x, y, v, seed=None) -> List[Tensor]:
    """J^T H_out J v, each factor by autograd."""
    with preserved_state(model):
        _seed(seed)
        z, jv = _forward_and_jvp(model, x, v)
        hjv = ref_output_hvp(loss_fn, z, y, jv)
        gv = _grad(z, trainable(model), hjv)
    return [t.detach() for t in gv]


# ----------------------------------------------------------------------------- exactness
def check_exact(model: nn.Module, loss_fn: Callable, x, y, *, ggn: bool = True, hessian: bool = True,
                seed: Optional[int] = None, n_vectors: int = 1, tol: float = TOL, tag: str = "",
                **op_kwargs) -> dict:
    """Build GGN/Hessian, compare products with the autograd references (``n_vectors``
    random directions), the gradient, the loss and the output; check that no
    parameter or buffer changed.  ``seed`` re-seeds torch's global RNG before the
    operator's build and before every reference forward (train-mode dropout).
    ``op_kwargs`` go to the operators (``channels_last=True``, ``fuse=False``)."""
    snap = snapshot(model)
    grads_before = [p.grad for p in model.parameters()]
    ops = {}
    errors = {}
    for kind, cls, ref in (("ggn", hfopt.GGN, ref_ggnvp), ("hessian", hfopt.Hessian, ref_hvp)):
        if not {"ggn": ggn, "hessian": hessian}[kind]:
            continue
        _seed(seed)
        op = cls(model, loss_fn, x, y, **op_kwargs)
        ops[kind] = op
        assert_state_equal(model, snap)
        for k in range(n_vectors):
            v = rand_vec(model, seed=100 + k)
            got = op @ v
            want = ref(model, loss_fn, x, y, v, seed=seed)
            for t, p in zip(got, trainable(model)):
                assert t.shape == p.shape and t.dtype == p.dtype
            errors[f"{kind}{k}"] = err = rel_err(got, want)
            record(f"{kind}{tag}", err)
            assert err < tol, f"{kind} product off by {err:.3e}"
        assert_state_equal(model, snap)
    op = next(iter(ops.values()))
    loss, z = ref_loss_output(model, loss_fn, x, y, seed=seed)
    out_err = rel_err([op.output], [z])
    record("output", out_err)
    assert out_err < 1e-12, out_err
    assert abs(op.loss.item() - loss.item()) <= 1e-12 * max(1.0, abs(loss.item()))
    g_err = rel_err(op.gradient(), ref_grad(model, loss_fn, x, y, seed=seed))
    record("gradient", g_err)
    assert g_err < tol, g_err
    assert_state_equal(model, snap)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads_before)), ".grad was touched"
    return {"ops": ops, "errors": errors}


# ----------------------------------------------------------------------------- helpers for models
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics for every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                    m.num_batches_tracked.fill_(3)
    return model


def make(model: nn.Module, seed: int = 0) -> nn.Module:
    """Float64, randomized BatchNorm state."""
    return randomize_bn(model.double(), seed)


def randn(*shape, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def labels(n: int, classes: int, seed: int = 1) -> Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- model zoo
class BasicBlock(nn.Module):
    """A ResNet BasicBlock written the usual way."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block1 = BasicBlock(4, 4)          # identity shortcut
        self.block2 = BasicBlock(4, 6, stride=2)  # projection shortcut
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        out = self.block2(self.block1(out))
        out = F.avg_pool2d(out, out.size(3))
        out = out.view(out.size(0), -1)
        return self.fc(out)


def zoo() -> Dict[str, Callable[[], tuple]]:
    """name -> factory returning ``(model, x, y_classes)``; y are class labels for
    classifiers with ``classes`` outputs (losses adapt the target)."""

    def mlp_bn():
        m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 6, bias=False),
                          nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
        return make(m), randn(6, 5), labels(6, 3)

    def conv_bn():
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Sigmoid(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
        return make(m), randn(4, 2, 6, 6), labels(4, 3)

    def conv1d_bn():
        m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.Tanh(),
                          nn.Conv1d(3, 4, 3, stride=2), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3, 3))
        return make(m), randn(5, 2, 8), labels(5, 3)

    def resnet():
        return make(TinyResNet()), randn(4, 2, 6, 6), labels(4, 3)

    def sigmoid_tanh():
        m = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        return make(m), randn(6, 4), labels(6, 3)

    return {"mlp_bn": mlp_bn, "conv_bn": conv_bn, "conv1d_bn": conv1d_bn, "resnet_block": resnet,
            "sigmoid_tanh": sigmoid_tanh}


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread.  Their tensors are tiny: with
    two OpenMP threads on a busy 2-core machine a 60-element convolution takes
    milliseconds of spin-waiting instead of microseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
