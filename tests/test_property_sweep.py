"""Property-based sweep: random architectures (tests/sweep_models.py), every
product against float64 reverse-over-reverse autograd (tests/conftest.py).

For each drawn model and loss, fused and unfused: ``G@v``, ``H@v``, the
gradient of both operators, the output and the loss match the references
(relative error < 1e-10); parameters, buffers and ``.grad`` are untouched; a
fallback is both warned and listed in ``op.fallbacks``.  Fallbacks are counted,
not filtered out, and listed at the end of the run.

The run is derandomized (CI is reproducible); ``HFOPT_HYPOTHESIS_EXAMPLES=N``
draws N models instead of the default 200.  A failure shrinks to a minimal
model, printed as its :class:`~sweep_models.ModelSpec`.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings

import hfopt
from conftest import (TOL, assert_state_equal, preserved_state, rand_vec, record, ref_ggnvp, ref_grad, ref_hvp,
                      rel_err, snapshot, trainable)
from sweep_models import (BN, Act, Conv, Drop, Glue, Linear, LossSpec, Merge, ModelSpec, Pool, build_case,
                          models)

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = int(os.environ.get("HFOPT_HYPOTHESIS_EXAMPLES", "200"))
DROPOUT_SEED = 1234
FALLBACK_WARNING = "no closed-form curvature rule"

# What the run saw, for the summary at the end (see _Summary).
CASES = Counter()
FALLBACKS = Counter()
FALLBACK_CASES = []
RULES = Counter()  # rule class -> models whose fused (or unfused) operator used it
WORST = {}


class _Summary:
    """A plugin registered by ``sweep_report``: the sweep's tally in pytest's terminal summary."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter):
        if not CASES:
            return
        w = terminalreporter
        w.section("hfopt property sweep")
        w.write_line(f"models checked: {CASES['models']} ({CASES['products']} operators, each against autograd)")
        for kind in sorted(WORST):
            err, spec = WORST[kind]
            w.write_line(f"worst relative error, {kind:22s} {err:.3e}  at {spec!r}")
        w.write_line("rules used (models): " + ", ".join(f"{r} {n}" for r, n in sorted(RULES.items())))
        w.write_line(f"models with a fallback: {len(FALLBACK_CASES)}")
        for label, n in FALLBACKS.most_common():
            w.write_line(f"  {n:5d} x {label}")
        for spec in FALLBACK_CASES[:3]:
            w.write_line(f"  e.g. {spec!r}")


@pytest.fixture(scope="module", autouse=True)
def sweep_report(request):
    if not request.config.pluginmanager.has_plugin("hfopt-property-sweep"):
        request.config.pluginmanager.register(_Summary(), "hfopt-property-sweep")


def _worst(kind: str, err: float, spec: ModelSpec) -> float:
    if err >= WORST.get(kind, (0.0, None))[0]:
        WORST[kind] = (err, spec)
    record(f"sweep {kind}", err)
    return err


def _build(cls, model, loss_fn, x, y, fuse: bool, channels_last: Optional[bool] = None):
    """The operator, the dropout mask drawn as the references draw it, and
    whether a fallback warning was issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(DROPOUT_SEED)
        op = cls(model, loss_fn, x, y, fuse=fuse, channels_last=channels_last)
    warned = any(FALLBACK_WARNING in str(w.message) for w in caught)
    return op, warned


def _label(entry: str) -> str:
    """A fallback entry without its node name: ``conv2d_1: conv2d`` -> ``conv2d``."""
    return re.sub(r"^[^:]*: ", "", entry)


def ref_loss_output_grad_mode(model, loss_fn, x, y, seed: int):
    """Loss and output of a forward with autograd on, as every other reference
    runs.  Not conftest's ``no_grad`` forward: a train-mode dropout draws its mask
    in the memory order of its input, and eager PyTorch can lay an intermediate
    out differently with and without grad (max_pool1d's output), so the two
    forwards can drop different units (found by this sweep)."""
    with preserved_state(model):
        torch.manual_seed(seed)
        z = model(x)
        return loss_fn(z, y).detach(), z.detach()


def _references(model, loss_fn, x, y, v) -> dict:
    """Everything hfopt must reproduce, by float64 autograd with the dropout
    mask the operators draw."""
    loss, out = ref_loss_output_grad_mode(model, loss_fn, x, y, DROPOUT_SEED)
    return {"ggn": ref_ggnvp(model, loss_fn, x, y, v, seed=DROPOUT_SEED),
            "hessian": ref_hvp(model, loss_fn, x, y, v, seed=DROPOUT_SEED),
            "gradient": ref_grad(model, loss_fn, x, y, seed=DROPOUT_SEED), "loss": loss, "output": out}


def _check_operator(op, kind: str, tag: str, want: dict, v, params, spec: ModelSpec) -> None:
    got = op @ v
    for t, p in zip(got, params):
        assert t.shape == p.shape and t.dtype == p.dtype, tag
    err = _worst(f"{kind}-vector product", rel_err(got, want[kind]), spec)
    assert err < TOL, f"{tag}: product off by {err:.3e}"
    err = _worst("gradient", rel_err(op.gradient(), want["gradient"]), spec)
    assert err < TOL, f"{tag}: gradient off by {err:.3e}"
    err = _worst("output", rel_err([op.output], [want["output"]]), spec)
    assert err < 1e-12, f"{tag}: output off by {err:.3e}"
    loss = want["loss"].item()
    assert abs(op.loss.item() - loss) <= 1e-12 * max(1.0, abs(loss)), f"{tag}: loss {op.loss.item()} != {loss}"


def check_model(spec: ModelSpec) -> None:
    """Fused and unfused GGN and Hessian of ``spec`` against the references,
    with the model's state and ``.grad`` untouched throughout."""
    model, loss_fn, x, y = build_case(spec)
    params = trainable(model)
    for p in params[::2]:  # a .grad left by earlier training must survive as it was
        p.grad = torch.full_like(p, 7.0)
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    snap = snapshot(model)
    v = rand_vec(model, seed=spec.seed)
    want = _references(model, loss_fn, x, y, v)
    assert_state_equal(model, snap)
    fallbacks, rules = set(), set()
    # float64 runs contiguous by default; the channels-last path is forced once, fused.
    for fuse, layout in ((True, None), (False, None), (True, True)):
        for kind, cls in (("ggn", hfopt.GGN), ("hessian", hfopt.Hessian)):
            tag = f"{kind} fuse={fuse} channels_last={layout}"
            op, warned = _build(cls, model, loss_fn, x, y, fuse, layout)
            # SweepNet is written to be traced: a whole-model fallback would hide every rule.
            assert op.graph.traced, f"fx could not trace the model: {op.graph.reason}"
            assert warned == bool(op.fallbacks), \
                f"{tag}: fallbacks {op.fallbacks} but warned={warned}: a fallback must be warned and reported"
            fallbacks.update(_label(f) for f in op.fallbacks)
            rules.update(type(step.rule).__name__ for step in op.steps)
            _check_operator(op, kind, tag, want, v, params, spec)
            assert_state_equal(model, snap)
            CASES["products"] += 1
    for p, (g, before) in zip(model.parameters(), grads):
        assert p.grad is g and (g is None or torch.equal(g, before)), ".grad was touched"
    CASES["models"] += 1
    RULES.update(rules)
    if fallbacks:
        FALLBACK_CASES.append(spec)
        FALLBACKS.update(fallbacks)


# Hand-written cases run before the drawn ones, so that every family of the
# README's table is met in every run, whatever the draws hit.
HAND_WRITTEN = [
    # A ResNet stem (fused: Conv on the data, BatchNorm, ReLU, MaxPool), a BasicBlock with a
    # projection shortcut, average pooling, BCE with both weights.
    ModelSpec(4, (2, 8, 8), (
        Conv(2, 2, 3, 3, 1, 1, bias=False), BN(2, 3), Act("relu", inplace=True), Pool("max", 2, 2),
        Merge("iadd", (Conv(2, 3, 4, 3, 1, 1, bias=False), BN(2, 4), Act("relu"), Conv(2, 4, 4, 3, 1, 1), BN(2, 4)),
              (Conv(2, 3, 4, 1, bias=False), BN(2, 4, train=False))),
        Act("relu"), Pool("avg", 2, 2, ceil_mode=True, count_include_pad=False), Glue("view"), Linear(16, 3)),
        LossSpec("bce", "mean", "class", pos_weight=True)),
    # A DenseNet-style torch.cat skip, 1-d pools of every kind, functional everything.
    ModelSpec(5, (2, 8), (
        Merge("cat", (), (Conv(1, 2, 2, 3, padding="same", functional=True),
                          BN(1, 2, affine=False, track=False, functional=True), Act("gelu_tanh", functional=True))),
        Pool("avg", 1, 3, 2, 1, functional=True), Pool("adaptive", 1, out=3), Pool("max", 1, 2, 1, 1, 2, True),
        Act("silu"), Glue("flatten"), Drop(0.3, functional=True), Linear(12, 3, functional=True)),
        LossSpec("ce", "sum", "class", ignore_index=1, n_ignored=2, label_smoothing=0.1)),
    # Glue between layers: mean pooling, slicing, neg, division, unsqueeze, an eval-mode F.batch_norm.
    ModelSpec(3, (3, 5, 4), (
        Pool("adaptive", 2, out=3, functional=True), Glue("slice_channels", 2), Glue("neg"), Glue("div", 2.5),
        BN(2, 2, train=False, functional=True), Act("elu"), Glue("mean_spatial", (2, 3)), Glue("unsqueeze_channel"),
        Conv(1, 1, 2, 2), Act("sigmoid"), Glue("flatten"), Linear(2, 2)),
        LossSpec("ce_prob", "mean", "class", label_smoothing=0.3)),
]


def _examples(test):
    for spec in reversed(HAND_WRITTEN):
        test = example(spec=spec)(test)
    return test


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=models())
@_examples
def test_random_architectures_are_exact(spec):
    note(repr(spec))
    check_model(spec)
