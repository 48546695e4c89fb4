"""Spectra (hfopt.spectrum) and the data-set operator against dense matrices.

Each operator is made dense column by column from its own products and
compared with torch.linalg.eigvalsh of it (float64, conftest.py), on small
BatchNorm models in train and eval mode."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hfopt

from hfopt.dataset_operator import cache_bytes

from conftest import assert_state_equal, flat, labels, make, preserved_state, randn, snapshot

CE = nn.CrossEntropyLoss()
pytestmark = pytest.mark.usefixtures("single_thread")


def mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 6, bias=False),
                      nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    return make(m), randn(6, 5), labels(6, 3)


def conv():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Sigmoid(),
                      nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    return make(m), randn(4, 2, 6, 6), labels(4, 3)


MODELS = {"mlp_bn": mlp, "conv_bn": conv}
CASES = [(name, train, kind) for name in MODELS for train in (True, False) for kind in ("hessian", "ggn")]
IDS = [f"{n}-{'train' if t else 'eval'}-{k}" for n, t, k in CASES]


def dense(op) -> torch.Tensor:
    A = op.to_scipy()
    M = torch.from_numpy(A.matmat(np.eye(A.shape[1])))
    return (M + M.T) / 2


@functools.lru_cache(maxsize=None)
def setup(name: str, train: bool, kind: str):
    """(model, operator, dense matrix, ascending eigenvalues, eigenvectors), built once per case."""
    model, x, y = MODELS[name]()
    model.train(train)
    op = hfopt.GGN(model, CE, x, y) if kind == "ggn" else hfopt.Hessian(model, CE, x, y)
    M = dense(op)
    evals, evecs = torch.linalg.eigh(M)
    return model, op, M, evals, evecs


def wanted(evals: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "largest":
        return evals.flip(0)[:k]
    if which == "smallest":
        return evals[:k]
    return evals[evals.abs().argsort(descending=True)][:k]


# ----------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("name,train,kind", CASES, ids=IDS)
@pytest.mark.parametrize("method", ["lanczos", "eigsh"])
def test_top_k_eigenpairs_match_dense(name, train, kind, method):
    model, op, M, evals, evecs = setup(name, train, kind)
    snap = snapshot(model)
    res = hfopt.eigenvalues(op, k=4, which="largest", tol=1e-10, method=method, progress=False)
    want = evals.flip(0)[:4]
    assert res.converged and res.iterations >= 4 and res.products >= res.iterations
    assert torch.allclose(res.eigenvalues, want, rtol=1e-8, atol=0), (res.eigenvalues, want)
    vecs = res.flat_eigenvectors()
    for i, v in enumerate(res.eigenvectors):
        assert [t.shape for t in v] == [p.shape for p in op.params]
        u = evecs[:, -1 - i]
        # Up to sign; an eigenvector is determined to about residual / gap.
        assert min((vecs[i] - u).norm(), (vecs[i] + u).norm()) < 1e-6
        # The stated guarantee: ||B y - theta y|| <= tol |theta|.
        assert (M @ vecs[i] - res.eigenvalues[i] * vecs[i]).norm() <= 1e-10 * abs(res.eigenvalues[i]) * 1.01
    assert_state_equal(model, snap)


@pytest.mark.parametrize("name,train", [("mlp_bn", True), ("mlp_bn", False), ("conv_bn", True), ("conv_bn", False)])
@pytest.mark.parametrize("which", ["smallest", "magnitude"])
def test_bottom_k_and_magnitude_of_the_hessian(name, train, which):
    _, op, _, evals, _ = setup(name, train, "hessian")
    res = hfopt.eigenvalues(op, k=3, which=which, tol=1e-11, progress=False)
    want = wanted(evals, which, 3)
    assert evals[0] < 0  # indefinite: "smallest" is the negative end, not the null space
    assert torch.allclose(res.eigenvalues, want, rtol=1e-8, atol=0), (res.eigenvalues, want)


def test_whole_spectrum_with_multiplicities():
    """k = numel: breakdown restarts find the repeated zero eigenvalues (bias columns
    ahead of BatchNorm) that one Krylov space holds only once."""
    _, op, _, evals, _ = setup("mlp_bn", False, "ggn")
    assert (evals.abs() < 1e-12 * evals.max()).sum() >= 7
    res = hfopt.eigenvalues(op, k=op.numel, which="largest", tol=1e-8, progress=False)
    assert res.iterations == op.numel
    assert torch.allclose(res.eigenvalues, evals.flip(0), rtol=0, atol=1e-10 * evals.abs().max())


def test_not_converged_warns():
    _, op, _, _, _ = setup("conv_bn", True, "hessian")
    with pytest.warns(RuntimeWarning, match="not converged in 3 Lanczos steps"):
        res = hfopt.eigenvalues(op, k=2, tol=1e-12, max_iter=3, progress=False)
    assert not res.converged and res.iterations == 3


def test_global_rng_untouched_and_seeded():
    _, op, _, _, _ = setup("mlp_bn", True, "hessian")
    state = torch.get_rng_state()
    a = hfopt.eigenvalues(op, k=2, seed=3, progress=False)
    t = hfopt.trace(op, 9, seed=3, progress=False)
    d = hfopt.spectral_density(op, probes=2, steps=5, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = hfopt.eigenvalues(op, k=2, seed=3, progress=False)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert t.estimate == hfopt.trace(op, 9, seed=3, progress=False).estimate
    assert np.array_equal(d.density, hfopt.spectral_density(op, probes=2, steps=5, seed=3, progress=False).density)


# ----------------------------------------------------------------------------- trace
@pytest.mark.parametrize("name,train,kind", CASES, ids=IDS)
@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_four_standard_errors(name, train, kind, method):
    _, op, M, _, _ = setup(name, train, kind)
    res = hfopt.trace(op, 60, method=method, seed=1, progress=False)
    assert res.products == 60 and not res.exact and res.stderr > 0
    # (+ rounding: a GGN of rank <= 12 is captured whole by Hutch++'s 20-column sketch, stderr ~ 0.)
    assert abs(res.estimate - M.trace().item()) <= 4 * res.stderr + 1e-12 * M.diag().abs().sum().item(), \
        (res.estimate, res.stderr, M.trace().item())


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_exact_with_the_full_basis(method):
    _, op, M, _, _ = setup("conv_bn", True, "hessian")
    res = hfopt.trace(op, op.numel, method=method, progress=False)
    assert res.exact and res.stderr == 0 and res.products == op.numel
    assert abs(res.estimate - M.trace().item()) <= 1e-10 * M.diag().abs().sum().item()


def test_hutch_plus_plus_exact_once_the_sketch_spans_the_range():
    """The GGN of 6 samples x 3 classes has rank <= 12: a sketch of 15 columns holds
    its range, tr(Q^T G Q) is the whole trace and the deflated remainder is zero."""
    _, op, M, evals, _ = setup("mlp_bn", True, "ggn")
    assert (evals > 1e-10 * evals.max()).sum() <= 12
    res = hfopt.trace(op, 45, method="hutch++", progress=False)
    assert abs(res.estimate - M.trace().item()) <= 1e-9 * M.trace().item()
    assert res.stderr <= 1e-9 * M.trace().item()


# ----------------------------------------------------------------------------- density
@pytest.mark.parametrize("name,train,kind", CASES, ids=IDS)
def test_density_moments_match_the_eigenvalues(name, train, kind):
    _, op, _, evals, _ = setup(name, train, kind)
    res = hfopt.spectral_density(op, probes=30, steps=12, seed=2, progress=False)
    assert res.products == 30 * 12 and len(res.nodes) == 30
    assert abs(np.trapezoid(res.density, res.grid) - 1) < 1e-12
    assert all(abs(w.sum() - 1) < 1e-10 for w in res.weights)
    for p in (1, 2, 3):
        per_probe = res.probe_moments(p)
        se = per_probe.std(ddof=1) / math.sqrt(len(per_probe))
        true = (evals ** p).mean().item()
        assert abs(res.moment(p) - true) <= 4 * se + 1e-12 * abs(true), (p, res.moment(p), true, se)
    # The smoothed density keeps the mean, and adds sigma^2 to the second moment.
    scale = evals.abs().max().item()
    assert abs(np.trapezoid(res.grid * res.density, res.grid) - res.moment(1)) < 1e-6 * scale
    assert abs(np.trapezoid(res.grid ** 2 * res.density, res.grid) - res.moment(2) - res.sigma ** 2) < 1e-6 * scale ** 2


def test_density_with_the_whole_space_puts_nodes_on_the_eigenvalues():
    _, op, _, evals, _ = setup("conv_bn", True, "hessian")
    res = hfopt.spectral_density(op, probes=1, steps=op.numel, progress=False)
    big = res.weights[0] > 1e-8
    gaps = (torch.from_numpy(res.nodes[0][big])[:, None] - evals[None, :]).abs().min(dim=1).values
    assert gaps.max() < 1e-8 * evals.abs().max()


def test_plot_density_writes_a_png(tmp_path):
    _, op, _, _, _ = setup("mlp_bn", True, "hessian")
    res = hfopt.spectral_density(op, probes=2, steps=10, progress=False)
    path = tmp_path / "density.png"
    ax = hfopt.plot_density(res, path=str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.get_yscale() == "log"
    with pytest.raises(TypeError, match="SpectralDensity"):
        hfopt.plot_density(res.density)


# ----------------------------------------------------------------------------- data-set operator
def batches(n_batches: int = 3, seed: int = 5):
    return [(randn(6, 5, seed=seed + b), labels(6, 3, seed=seed + 10 + b)) for b in range(n_batches)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_dataset_operator_is_the_mean_of_per_batch_matrices(train, kind):
    model, _, _ = mlp()
    model.train(train)
    snap = snapshot(model)
    data = batches()
    cls = hfopt.Hessian if kind == "hessian" else hfopt.GGN
    want = sum(dense(cls(model, CE, x, y)) for x, y in data) / len(data)
    cached = hfopt.DatasetOperator(model, CE, data, curvature=kind)
    assert cached.cached_batches == 3 and cached.cached_bytes > 0
    rebuilt = hfopt.DatasetOperator(model, CE, data, curvature=kind, max_cache_bytes=0)
    assert rebuilt.cached_batches == 0
    one = cache_bytes(cls(model, CE, *data[0]))
    prefix = hfopt.DatasetOperator(model, CE, data, curvature=kind, max_cache_bytes=int(1.5 * one))
    assert prefix.cached_batches == 1
    M = dense(cached)
    assert (M - want).abs().max() <= 1e-12 * want.abs().max()
    for seed in (0, 1):  # the rebuilt batches give the same products (cheaper than two more dense matrices)
        v = randn(cached.numel, seed=seed)
        for op in (rebuilt, prefix):
            assert (op.matvec_flat(v) - want @ v).abs().max() <= 1e-12 * (want @ v).abs().max()
    grads = [cls(model, CE, x, y).gradient() for x, y in data]
    mean_grad = [sum(g[i] for g in grads) / 3 for i in range(len(grads[0]))]
    assert (flat(rebuilt.gradient()) - flat(mean_grad)).abs().max() < 1e-13
    top = hfopt.eigenvalues(prefix, k=2, tol=1e-10, progress=False)
    assert torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(want).flip(0)[:2], rtol=1e-8, atol=0)
    assert_state_equal(model, snap)
    # Last: restoring the buffers after a train-mode forward counts as a change of point.
    with preserved_state(model), torch.no_grad():
        assert abs(cached.loss.item() - np.mean([CE(model(x), y).item() for x, y in data])) < 1e-12


def test_dataset_operator_from_a_dataloader_keeps_its_batches():
    model, _, _ = mlp()
    data = batches(2)
    xs, ys = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    loader = DataLoader(TensorDataset(xs, ys), batch_size=6, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    op = hfopt.DatasetOperator(model, CE, loader, curvature="ggn", max_cache_bytes=0)
    first = dense(op)
    assert torch.equal(first, dense(op))  # the same batches at every product, despite shuffle=True
    limited = hfopt.DatasetOperator(model, CE, data, num_batches=1)
    assert limited.num_batches == 1


def test_dataset_operator_refuses_to_rebuild_at_a_changed_point():
    model, _, _ = mlp()
    op = hfopt.DatasetOperator(model, CE, batches(2), max_cache_bytes=0)
    v = [torch.ones_like(p) for p in op.params]
    op @ v
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="changed since this DatasetOperator was built"):
        op @ v
    model2, _, _ = mlp()
    op2 = hfopt.DatasetOperator(model2, CE, batches(2), max_cache_bytes=0)
    model2.eval()
    with pytest.raises(RuntimeError, match="train/eval mode"):
        op2 @ v


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_are_named():
    _, op, _, _, _ = setup("mlp_bn", True, "hessian")
    n = op.numel
    cases = [
        (lambda: hfopt.eigenvalues(op, k=0), ValueError, "k must be in"),
        (lambda: hfopt.eigenvalues(op, k=n + 1), ValueError, "k must be in"),
        (lambda: hfopt.eigenvalues(op, k=n, method="eigsh"), ValueError, "k must be in"),
        (lambda: hfopt.eigenvalues(op, k=2.0), TypeError, "k must be an int"),
        (lambda: hfopt.eigenvalues(op, which="top"), ValueError, "which must be one of"),
        (lambda: hfopt.eigenvalues(op, method="arnoldi"), ValueError, "method must be"),
        (lambda: hfopt.eigenvalues(op, tol=0.0), ValueError, "tol must be"),
        (lambda: hfopt.eigenvalues(op, tol=1.5), ValueError, "tol must be"),
        (lambda: hfopt.eigenvalues(op, k=3, max_iter=2), ValueError, "max_iter must be"),
        (lambda: hfopt.eigenvalues(torch.eye(3)), TypeError, "op must be an hfopt operator"),
        (lambda: hfopt.trace(op, 0), ValueError, "samples must be"),
        (lambda: hfopt.trace(op, 2, method="hutch++"), ValueError, "samples must be"),
        (lambda: hfopt.trace(op, 10, method="girard"), ValueError, "method must be one of"),
        (lambda: hfopt.spectral_density(op, probes=0), ValueError, "probes must be"),
        (lambda: hfopt.spectral_density(op, steps=0), ValueError, "steps must be"),
        (lambda: hfopt.spectral_density(op, sigma=-1.0), ValueError, "sigma must be"),
        (lambda: hfopt.spectral_density(op, points=1), ValueError, "points must be"),
    ]
    model, x, y = mlp()
    cases += [
        (lambda: hfopt.DatasetOperator(model, CE, []), ValueError, "yielded no batch"),
        (lambda: hfopt.DatasetOperator(model, CE, x), TypeError, "batches must be"),
        (lambda: hfopt.DatasetOperator(model, CE, [x]), TypeError, "batch 0 must be an"),
        (lambda: hfopt.DatasetOperator(model, CE, [(x, y)], curvature="fisher"), ValueError, "curvature must be"),
        (lambda: hfopt.DatasetOperator(model, CE, [(x, y)], num_batches=0), ValueError, "num_batches"),
        (lambda: hfopt.DatasetOperator(model, CE, [(x, y)], max_cache_bytes=-1), ValueError, "max_cache_bytes"),
        (lambda: hfopt.DatasetOperator(x, CE, [(x, y)]), TypeError, "model must be an nn.Module"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()
