"""Never silently wrong: the rule refusals, the forward guard and the fallback
probe (hfopt.rules.rule_refusal, hfopt.guard, FallbackRule.probe)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hfopt
from hfopt.rules import rule_refusal
from conftest import assert_state_equal, check_exact, labels, make, randn, snapshot

CE = nn.CrossEntropyLoss()
pytestmark = pytest.mark.usefixtures("single_thread")


class TracesOtherwise(nn.Module):
    """A forward that computes something else when fx traces it: no rule or hook
    check can see that, only the output comparison."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        y = self.lin(x)
        return y if isinstance(y, torch.fx.Proxy) else 2 * y


def _net(inner: nn.Module) -> nn.Module:
    return make(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), inner, nn.Tanh(), nn.Linear(5, 3)))


def test_a_forward_the_engine_did_not_see_is_refused_and_named():
    model, x, y = _net(TracesOtherwise()), randn(6, 4), labels(6, 3)
    snap = snapshot(model)
    for cls in (hfopt.GGN, hfopt.Hessian):
        with pytest.raises(hfopt.ForwardMismatchError, match=r"first layer whose output differs is '3' \(Tanh\).*"
                                                             r"last that agrees is '2.lin'"):
            cls(model, CE, x, y)
    assert_state_equal(model, snap)  # the check's own forwards leave no trace in the buffers
    op = hfopt.GGN(model, CE, x, y, verify=False)  # the documented way out
    assert op.output.shape == (6, 3)


def test_verify_takes_the_models_output_and_rejects_other_types():
    model, x, y = _net(nn.Identity()), randn(6, 4), labels(6, 3)
    with torch.no_grad():
        out = model.eval()(x)
    model.train()
    with pytest.raises(TypeError, match="verify"):
        hfopt.GGN(model, CE, x, y, verify="yes")
    # A stale reference (eval-mode output for a train-mode build) does not pass
    # on its own: the guard runs the model itself, and the model is fine.
    hfopt.GGN(model, CE, x, y, verify=out)


def test_the_verdict_is_cached_per_model_and_shape(monkeypatch):
    model = _net(nn.Identity())
    calls = []
    import hfopt.guard as guard
    real = guard._model_forward
    monkeypatch.setattr(guard, "_model_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        hfopt.GGN(model, CE, randn(6, 4), labels(6, 3))
    assert len(calls) == 1
    hfopt.GGN(model, CE, randn(8, 4), labels(8, 3))  # another batch shape: checked again
    assert len(calls) == 2


def test_train_mode_dropout_passes_the_check():
    """The check replays torch's generators: the model's forward draws the
    engine's masks."""
    model = make(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_exact(model, CE, randn(6, 4), labels(6, 3), seed=5)


class OverridesForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class AddsAHelper(nn.Conv2d):
    def describe(self) -> str:
        return "a method torch's Conv2d does not have: it cannot change the forward"


def test_rule_refusal():
    from torch.nn.utils.parametrizations import weight_norm
    assert rule_refusal(nn.Conv2d(1, 1, 1)) is None
    assert rule_refusal(AddsAHelper(1, 1, 1)) is None
    assert "overrides forward" in rule_refusal(OverridesForward(1, 1, 1))
    assert "parametrized" in rule_refusal(weight_norm(nn.Conv2d(1, 1, 1)))
    assert rule_refusal(nn.ReLU6()) is None and rule_refusal(nn.LazyLinear(3)) is None


def test_a_subclass_that_overrides_forward_is_traced_into():
    model = make(nn.Sequential(OverridesForward(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                               nn.Linear(3 * 16, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_exact(model, CE, randn(4, 2, 4, 4), labels(4, 3))


def test_hooks_are_part_of_the_curvature():
    taps = []
    model = make(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                               nn.Linear(3 * 16, 3)))
    model[0].register_forward_hook(lambda m, i, o: o * 0.5)
    model[1].register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    model[2].register_forward_hook(lambda m, i, o: taps.append(tuple(o.shape)))  # fx cannot trace it
    model.register_forward_hook(lambda m, i, o: o.tanh())  # on the model itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops = check_exact(model, CE, randn(4, 2, 4, 4), labels(4, 3))["ops"]
    assert all(op.fallbacks == [] for op in ops.values())
    assert taps and all(t == (4, 3, 4, 4) for t in taps)


def test_a_fallback_without_a_second_derivative_fails_at_build():
    """aten's hardsigmoid has no double backward in torch: called directly it has
    no rule, and the Hessian's build names it (the GGN needs first order only)."""

    class RawHardsigmoid(nn.Module):
        def forward(self, x):
            return torch.ops.aten.hardsigmoid.default(x)

    model = _net(RawHardsigmoid())
    x, y = randn(6, 4) * 3, labels(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hfopt.GGN(model, CE, x, y)
        with pytest.raises(hfopt.UnsupportedLayerError, match="hardsigmoid.*twice"):
            hfopt.Hessian(model, CE, x, y)


def test_hf_optimizer_uses_the_closures_outputs_for_the_check(monkeypatch):
    import hfopt.guard as guard
    calls = []
    real = guard._model_forward
    monkeypatch.setattr(guard, "_model_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = hfopt.HFOptimizer(model.parameters())

    def closure():
        out = model(x)
        return CE(out, y), out

    for _ in range(2):
        opt.step(closure)
    assert calls == []  # the closure's outputs agreed: no extra forward


def test_hf_optimizer_takes_the_autograd_path_on_a_mismatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), TracesOtherwise(), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = hfopt.HFOptimizer(model.parameters())

    def closure():
        out = model(x)
        return CE(out, y), out

    with pytest.warns(UserWarning, match="does not reproduce the model's output"):
        opt.step(closure)
    assert opt.last_step["engine"] == "autograd"
