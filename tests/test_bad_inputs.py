"""The bad-input sweep: each case gets a clear error (TypeError/ValueError
naming the argument, parameter or layer) or a documented behaviour, and
parameters, buffers, ``.grad`` and optimizer state stay bitwise as they were.
Every case id is a row of docs/bad_inputs.md, which a test keeps in step."""
from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hfopt
from conftest import assert_same_tensors

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
CE = nn.CrossEntropyLoss()


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _data(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _state(model, opt=None):
    return (copy.deepcopy(model.state_dict()),
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            None if opt is None else copy.deepcopy(opt.state_dict()),
            None if opt is None else opt.damping.value)


def _stepped_optimizer(model, x, y):
    """An optimizer with state worth protecting: one step taken, .grad set."""
    opt = hfopt.HFOptimizer(model.parameters())
    opt.step(_closure(model, x, y))
    return opt


def _closure(model, x, y, loss_fn=CE):
    def closure():
        outputs = model(x)
        return loss_fn(outputs, y), outputs
    return closure


# ----------------------------------------------------------------------------- the closure contract
def _closure_case(make_closure):
    def run(model, x, y, opt):
        return opt.step(make_closure(model, x, y, opt))
    return run


def _raises_inside(model, x, y, opt):
    def closure():
        model(x)  # the BatchNorm statistics move first
        raise RuntimeError("raised inside the closure")
    return closure


OPTIMIZER_CASES = {
    "closure-returns-none": (_closure_case(lambda m, x, y, o: (lambda: None)), TypeError, r"\(loss, outputs\).*NoneType"),
    "closure-returns-non-scalar": (_closure_case(lambda m, x, y, o: (lambda: (lambda z: (F.cross_entropy(
        z, y, reduction="none"), z))(m(x)))), TypeError, r"not a scalar"),
    "closure-raises": (_closure_case(_raises_inside), RuntimeError, r"raised inside the closure"),
    "closure-loss-detached": (_closure_case(lambda m, x, y, o: (lambda: (lambda z: (CE(z.detach(), y), z))(m(x)))),
                              TypeError, r"does not depend on any optimized parameter"),
    "closure-loss-of-another-model": (_closure_case(lambda m, x, y, o: (lambda: (lambda z: (CE(z, y), z))(
        _model(seed=5)(x)))), TypeError, r"does not depend on any optimized parameter"),
    "closure-constant-loss": (_closure_case(lambda m, x, y, o: (lambda: (torch.tensor(1.0), m(x)))), TypeError,
                              r"does not depend on any optimized parameter"),
    "nan-in-inputs": (lambda m, x, y, o: o.step(_closure(m, torch.where(torch.arange(6).view(6, 1) == 2,
                                                                          math.nan, x), y)),
                      UserWarning, r"step rejected \(non-finite loss or gradient\)"),
    "inf-in-targets": (lambda m, x, y, o: o.step(_closure(m, x, torch.full((6, 3), math.inf), nn.MSELoss())),
                       UserWarning, r"step rejected \(non-finite loss or gradient\)"),
    "ce-target-out-of-range-in-closure": (lambda m, x, y, o: o.step(_closure(m, x, torch.full((6,), 7))),
                                          IndexError, r"out of bounds"),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_optimizer_bad_input_changes_nothing(case):
    run, exc, pattern = OPTIMIZER_CASES[case]
    x, y = _data()
    model = _model()
    opt = _stepped_optimizer(model, x, y)
    before = _state(model, opt)
    if issubclass(exc, Warning):
        with pytest.warns(exc, match=pattern):
            run(model, x, y, opt)
        assert opt.last_step["accepted"] is False
    else:
        with pytest.raises(exc, match=pattern):
            run(model, x, y, opt)
    assert_same_tensors(_state(model, opt), before, "a bad input changed the model or the optimizer")
    opt.step(_closure(model, x, y))  # and training goes on
    assert opt.last_step["rejected"] is None or opt.last_step["rejected"].startswith("rho")


def test_nan_in_parameters_is_rejected_and_changes_nothing():
    x, y = _data()
    model = _model()
    opt = _stepped_optimizer(model, x, y)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    before = _state(model, opt)
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        opt.step(_closure(model, x, y))
    assert_same_tensors(_state(model, opt), before)


# ----------------------------------------------------------------------------- optimizer construction
@pytest.mark.parametrize("case,params,exc,pattern", [
    ("params-float16", lambda: _model().half().parameters(), TypeError, r"parameter 0 of param group 0.*float16"),
    ("params-bfloat16", lambda: _model().bfloat16().parameters(), TypeError, r"bfloat16"),
    ("empty-parameter-list", lambda: [], ValueError, r"empty parameter list"),
    ("empty-param-group", lambda: [{"params": []}], ValueError, r"param group 0 has no parameters"),
    ("parameter-in-two-groups", lambda: (lambda m: [{"params": list(m.parameters())},
                                                    {"params": [m[0].weight]}])(_model()),
     ValueError, r"more than one parameter group"),
])
def test_optimizer_construction_errors(case, params, exc, pattern):
    with pytest.raises(exc, match=pattern):
        hfopt.HFOptimizer(params())


def test_only_frozen_parameters_fail_at_step_with_a_clear_error():
    x, y = _data()
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = hfopt.HFOptimizer(model.parameters())  # torch.optim's habit: freezing is allowed
    before = _state(model, opt)
    with pytest.raises(ValueError, match="no parameter has requires_grad=True"):
        opt.step(_closure(model, x, y))
    assert_same_tensors(_state(model, opt), before)


def test_frozen_and_unreached_parameters_are_left_alone():
    """Frozen parameters are skipped; a parameter of the model the loss never
    reaches has a zero gradient and a zero curvature row: it stays put."""
    x, y = _data()
    torch.manual_seed(0)

    class WithUnusedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = _model(), nn.Linear(3, 2)

        def forward(self, t):
            return self.body(t)

    model = WithUnusedHead()
    model.body[0].weight.requires_grad_(False)
    frozen, unused = model.body[0].weight.detach().clone(), model.unused.weight.detach().clone()
    trained = model.body[3].weight.detach().clone()
    opt = hfopt.HFOptimizer([p for p in model.parameters()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(_closure(model, x, y))
    assert opt.last_step["engine"] == "rules"
    assert torch.equal(model.body[0].weight, frozen) and torch.equal(model.unused.weight, unused)
    assert not torch.equal(model.body[3].weight, trained)


def test_a_parameter_outside_the_model_takes_the_documented_autograd_path():
    x, y = _data()
    model = _model()
    extra = nn.Parameter(torch.zeros(3))
    opt = hfopt.HFOptimizer(list(model.parameters()) + [extra])
    with pytest.warns(UserWarning, match="cannot follow this model .*not in the model"):
        opt.step(_closure(model, x, y))
    assert opt.last_step["engine"] == "autograd" and torch.equal(extra, torch.zeros(3))


# ----------------------------------------------------------------------------- operators
OPERATOR_CASES = {
    "v-wrong-length": (lambda G, m: G @ [torch.zeros(5, 4)], ValueError, r"v has 1 tensors.*'0.bias'"),
    "v-wrong-shape": (lambda G, m: G @ ([torch.zeros(4, 5)] + [torch.zeros_like(p) for p in list(m.parameters())[1:]]),
                      ValueError, r"'0.weight' has shape \(4, 5\), expected \(5, 4\)"),
    "v-wrong-dtype": (lambda G, m: G @ [torch.zeros_like(p, dtype=torch.float64) for p in m.parameters()],
                      ValueError, r"'0.weight' has dtype torch.float64, expected torch.float32"),
    "v-not-a-list": (lambda G, m: G @ torch.zeros(10), TypeError, r"matvec_flat"),
    "v-flat-wrong-size": (lambda G, m: G.matvec_flat(torch.zeros(3)), ValueError, r"1-D tensor of \d+ elements"),
}


@pytest.mark.parametrize("case", sorted(OPERATOR_CASES))
def test_operator_bad_vectors(case):
    apply, exc, pattern = OPERATOR_CASES[case]
    x, y = _data()
    model = _model().float()
    G = hfopt.GGN(model, CE, x.float(), y)
    before = _state(model)
    with pytest.raises(exc, match=pattern):
        apply(G, model)
    assert_same_tensors(_state(model), before)


BUILD_CASES = {
    "op-params-float16": (lambda: (_model().half(), CE, _data()[0].half(), _data()[1]), TypeError,
                          r"parameter '0.weight' is torch.float16"),
    "op-params-bfloat16": (lambda: (_model().bfloat16(), CE, _data()[0].bfloat16(), _data()[1]), TypeError,
                           r"parameter '0.weight' is torch.bfloat16"),
    "op-input-dtype": (lambda: (_model().float(), CE, _data()[0].double(), _data()[1]), ValueError,
                       r"input 0 has dtype torch.float64"),
    "op-no-trainable-parameters": (lambda: (_model().requires_grad_(False), CE, *_data()), ValueError,
                                   r"no trainable parameters"),
    "op-model-not-a-module": (lambda: (lambda t: t, CE, *_data()), TypeError, r"model must be an nn.Module"),
    "op-loss-not-callable": (lambda: (_model(), "cross_entropy", *_data()), TypeError, r"loss_fn must be callable"),
    "op-loss-reduction-none": (lambda: (_model(), nn.CrossEntropyLoss(reduction="none"), *_data()), ValueError,
                               r"reduction='none'"),
    "bn-one-value-per-channel": (lambda: (_model(), CE, _data()[0][:1], _data()[1][:1]), ValueError,
                                 r"more than 1 value per channel"),
    "ce-target-out-of-range": (lambda: (_model(), CE, _data()[0], torch.tensor([0, 1, 2, 3, 0, 1])), ValueError,
                               r"CrossEntropyLoss target: class index 3 is outside \[0, 3\)"),
    "ce-negative-target": (lambda: (_model(), CE, _data()[0], torch.tensor([0, 1, -2, 0, 0, 1])), ValueError,
                           r"class index -2"),
    "ce-float-target-for-class-index": (lambda: (_model(), CE, _data()[0], _data()[1].float()), ValueError,
                                        r"floating-point targets are class probabilities.*integer"),
    "ce-target-wrong-batch-size": (lambda: (_model(), CE, _data()[0], _data()[1][:4]), ValueError,
                                   r"class indices must have shape \(6,\).*got \(4,\)"),
    "mse-target-wrong-shape": (lambda: (_model(), nn.MSELoss(), _data()[0], torch.zeros(6, 2)), ValueError,
                               r"MSELoss target: shape \(6, 2\) must equal the output shape \(6, 3\)"),
    "bce-target-wrong-shape": (lambda: (_model(), nn.BCEWithLogitsLoss(), _data()[0], torch.zeros(5, 3)),
                               ValueError, r"BCEWithLogitsLoss target: shape \(5, 3\)"),
    # A fifth element: keyword arguments of the operator.
    "op-channels-last-not-bool": (lambda: (_model(), CE, *_data(), {"channels_last": "yes"}), TypeError,
                                  r"channels_last must be True, False or None, got str"),
    "op-compile-not-bool": (lambda: (_model(), CE, *_data(), {"compile": 1}), TypeError,
                            r"compile must be True or False, got int"),
    "op-verify-not-bool-or-tensor": (lambda: (_model(), CE, *_data(), {"verify": "yes"}), TypeError,
                                     r"verify must be True, False or the model's output tensor, got str"),
}


@pytest.mark.parametrize("case", sorted(BUILD_CASES))
def test_operator_build_errors(case):
    make, exc, pattern = BUILD_CASES[case]
    model, loss_fn, x, y, *options = make()
    kwargs = options[0] if options else {}
    before = _state(model) if isinstance(model, nn.Module) else None
    for cls in (hfopt.GGN, hfopt.Hessian):
        with pytest.raises(exc, match=pattern):
            cls(model, loss_fn, x, y, **kwargs)
    if before is not None:
        assert_same_tensors(_state(model), before)


def test_nan_in_operator_inputs_propagates_as_autograd_would():
    """Documented: an operator does not scan its inputs (that would cost a
    device sync per build); NaN flows into the products as it would into
    autograd's.  HFOptimizer rejects such a step (see above)."""
    x, y = _data()
    x[2, 1] = math.nan
    model = _model()
    before = _state(model)
    G = hfopt.GGN(model, CE, x, y)
    assert G.loss.isnan() and all(t.isnan().any() for t in G @ [torch.ones_like(p) for p in model.parameters()])
    assert_same_tensors(_state(model), before)


def test_mixed_train_and_eval_submodules_follow_each_module():
    """Documented: each BatchNorm uses its own mode, as in the model's forward."""
    from conftest import check_exact, labels, make, randn
    model = make(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 5), nn.BatchNorm1d(5),
                               nn.Linear(5, 3)))
    model.train()
    model[1].eval()
    check_exact(model, CE, randn(6, 4), labels(6, 3), tag="-bad-inputs")


def test_every_case_is_in_the_docs_table():
    text = DOC.read_text()
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M))
    named = set(OPTIMIZER_CASES) | set(OPERATOR_CASES) | set(BUILD_CASES) | {
        "params-float16", "params-bfloat16", "empty-parameter-list", "empty-param-group",
        "parameter-in-two-groups", "nan-in-parameters", "only-frozen-parameters", "frozen-parameters",
        "unreached-parameters", "parameter-outside-the-model", "nan-in-operator-inputs", "mixed-train-eval",
        # tests/test_guard.py
        "forward-the-engine-did-not-see", "fallback-without-a-derivative"}
    assert named <= rows, f"missing from {DOC.name}: {sorted(named - rows)}"
    assert rows <= named, f"{DOC.name} lists cases no test runs: {sorted(rows - named)}"
