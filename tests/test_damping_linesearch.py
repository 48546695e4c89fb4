import math

import pytest

from hfopt.damping import LevenbergMarquardt, reduction_ratio
from hfopt.linesearch import LineSearchResult, armijo


def test_reduction_ratio_ordinary():
    assert reduction_ratio(-1.0, -2.0) == 0.5
    assert reduction_ratio(-3.0, -2.0) == 1.5
    assert reduction_ratio(0.0, -2.0) == 0.0
    assert reduction_ratio(1.0, -2.0) == -0.5  # the objective went up


@pytest.mark.parametrize(
    "actual, predicted",
    [
        (-1.0, 0.0),
        (-1.0, 1.0),
        (-1.0, -0.0),
        (math.inf, -1.0),
        (-math.inf, -1.0),
        (math.nan, -1.0),
        (-1.0, math.nan),
        (-1.0, -math.inf),
    ],
)
def test_reduction_ratio_undefined_is_nan(actual, predicted):
    assert math.isnan(reduction_ratio(actual, predicted))


@pytest.mark.parametrize(
    "rho, factor",
    [
        (-5.0, 1.5),
        (0.1, 1.5),
        (0.2499, 1.5),
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, 1.0),
        (0.7501, 2 / 3),
        (1.0, 2 / 3),
        (7.0, 2 / 3),
        (math.nan, 1.5),
        (math.inf, 1.5),
        (-math.inf, 1.5),
    ],
)
def test_levenberg_marquardt_rule(rho, factor):
    damping = LevenbergMarquardt(value=2.0)
    new = damping.update(rho)
    assert new == pytest.approx(2.0 * factor, rel=1e-15)
    assert damping.value == new


def test_levenberg_marquardt_clamps():
    damping = LevenbergMarquardt(value=1.0, minimum=0.5, maximum=2.0)
    assert damping.update(1.0) == pytest.approx(2 / 3)
    assert damping.update(1.0) == 0.5
    assert damping.update(1.0) == 0.5
    assert damping.update(0.0) == 0.75
    assert damping.update(0.0) == pytest.approx(1.125)
    assert damping.update(0.0) == pytest.approx(1.6875)
    assert damping.update(0.0) == 2.0
    assert damping.update(math.nan) == 2.0


def test_levenberg_marquardt_default_bounds():
    damping = LevenbergMarquardt(value=1e8)
    assert damping.update(0.0) == 1e8
    damping = LevenbergMarquardt(value=1e-8)
    assert damping.update(1.0) == 1e-8


def test_levenberg_marquardt_state_dict_round_trip():
    damping = LevenbergMarquardt(value=3.0, decrease=0.5, increase=2.0, low=0.1, high=0.9,
                                 minimum=1e-4, maximum=1e4)
    damping.update(0.0)
    state = damping.state_dict()
    assert state == {"value": 6.0, "decrease": 0.5, "increase": 2.0, "low": 0.1, "high": 0.9,
                     "minimum": 1e-4, "maximum": 1e4}
    restored = LevenbergMarquardt()
    restored.load_state_dict(state)
    assert restored == damping
    assert restored.update(0.95) == damping.update(0.95) == 3.0
    state["value"] = 99.0
    assert damping.value == 3.0  # the dict is a copy


def test_levenberg_marquardt_load_partial_and_invalid():
    damping = LevenbergMarquardt(value=2.0)
    damping.load_state_dict({"value": 5.0})
    assert damping == LevenbergMarquardt(value=5.0)
    with pytest.raises(ValueError, match="decrease"):
        damping.load_state_dict({"value": 1.0, "decrease": 1.5})
    assert damping == LevenbergMarquardt(value=5.0)
    with pytest.raises(ValueError, match="unknown"):
        damping.load_state_dict({"lambda": 1.0})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"value": 0.0}, "value"),
        ({"value": -1.0}, "value"),
        ({"value": math.nan}, "value"),
        ({"decrease": 0.0}, "decrease"),
        ({"decrease": 1.0}, "decrease"),
        ({"decrease": 1.5}, "decrease"),
        ({"increase": 1.0}, "increase"),
        ({"increase": 0.5}, "increase"),
        ({"low": -0.1}, "low"),
        ({"low": 0.5, "high": 0.5}, "high"),
        ({"high": 0.1}, "high"),
        ({"minimum": 0.0}, "minimum"),
        ({"minimum": -1.0}, "minimum"),
        ({"minimum": 2.0, "maximum": 1.0}, "maximum"),
    ],
)
def test_levenberg_marquardt_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LevenbergMarquardt(**kwargs)


def quadratic_line(f0, slope, curvature):
    calls = []

    def f(t):
        calls.append(t)
        return f0 + slope * t + 0.5 * curvature * t * t

    return f, calls


def test_armijo_accepts_unit_newton_step():
    # Curvature equal to -slope puts the exact minimiser at t = 1.
    f, calls = quadratic_line(3.0, -2.0, 2.0)
    result = armijo(f, 3.0, -2.0)
    assert result == LineSearchResult(step=1.0, value=2.0, evaluations=1, accepted=True)
    assert calls == [1.0]


@pytest.mark.parametrize(
    "slope, curvature, c, shrink, initial",
    [
        (-1.0, 50.0, 1e-2, 0.8, 1.0),
        (-3.0, 1e3, 1e-2, 0.8, 1.0),
        (-0.5, 7.0, 0.3, 0.8, 2.0),
        (-1.0, 1e4, 1e-4, 0.5, 1.0),
        (-2.0, 3.0, 1e-2, 0.8, 1.0),
    ],
)
def test_armijo_shrinks_to_closed_form_step(slope, curvature, c, shrink, initial):
    # On f(t) = f0 + s t + a t^2 / 2 the Armijo test holds exactly for
    # t <= T = 2 (1 - c) |s| / a, so the accepted step is initial * shrink**k
    # with k the smallest integer >= log(T / initial) / log(shrink).
    f0 = 1.0
    f, calls = quadratic_line(f0, slope, curvature)
    threshold = 2.0 * (1.0 - c) * -slope / curvature
    exponent = math.log(threshold / initial) / math.log(shrink)
    assert abs(exponent - round(exponent)) > 1e-6  # keep clear of ties
    k = max(0, math.ceil(exponent))
    assert k > 0 or threshold >= initial

    result = armijo(f, f0, slope, c=c, shrink=shrink, initial=initial)
    assert result.accepted
    assert result.evaluations == k + 1 == len(calls)
    assert result.step == pytest.approx(initial * shrink**k, rel=1e-14)
    assert result.value == f(result.step)


def test_armijo_shrink_count_is_nontrivial():
    f, _ = quadratic_line(1.0, -1.0, 50.0)
    assert armijo(f, 1.0, -1.0).evaluations == 16


def test_armijo_rejects_when_nothing_passes():
    calls = []

    def f(t):
        calls.append(t)
        return 2.0  # above f0 for every step

    result = armijo(f, 1.0, -1.0, max_evaluations=7)
    assert result == LineSearchResult(step=0.0, value=1.0, evaluations=7, accepted=False)
    assert calls == pytest.approx([0.8**n for n in range(7)])


@pytest.mark.parametrize("slope", [0.0, 1.0, math.nan, math.inf, -math.inf])
def test_armijo_rejects_non_descent_without_evaluating(slope):
    def f(t):
        raise AssertionError("must not be evaluated")

    result = armijo(f, 1.0, slope)
    assert result == LineSearchResult(step=0.0, value=1.0, evaluations=0, accepted=False)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_armijo_non_finite_values_fail(bad):
    good, _ = quadratic_line(1.0, -1.0, 1.0)

    def f(t):
        return bad if t > 0.5 else good(t)

    result = armijo(f, 1.0, -1.0)
    assert result.accepted
    assert result.evaluations == 5  # 1, 0.8, 0.64, 0.512 fail; 0.4096 passes
    assert result.step == pytest.approx(0.4096)


def test_armijo_all_non_finite_rejects():
    result = armijo(lambda t: math.nan, 1.0, -1.0, max_evaluations=5)
    assert result == LineSearchResult(step=0.0, value=1.0, evaluations=5, accepted=False)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"c": 0.0}, "c"),
        ({"c": 1.0}, "c"),
        ({"c": math.nan}, "c"),
        ({"shrink": 0.0}, "shrink"),
        ({"shrink": 1.0}, "shrink"),
        ({"initial": 0.0}, "initial"),
        ({"initial": math.inf}, "initial"),
        ({"max_evaluations": 0}, "max_evaluations"),
    ],
)
def test_armijo_rejects_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        armijo(lambda t: 0.0, 1.0, -1.0, **kwargs)


def test_armijo_rejects_non_finite_f0():
    with pytest.raises(ValueError, match="f0"):
        armijo(lambda t: 0.0, math.nan, -1.0)
