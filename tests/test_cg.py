import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from hfopt.cg import backtrack, cg, save_schedule


def random_spd(n: int, cond: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.logspace(0.0, -math.log10(cond), n)
    return (q * eigenvalues) @ q.T


def as_matvec(a, counter=None):
    a_t = torch.from_numpy(a)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        if counter is not None:
            counter.append(1)
        return a_t.to(v.dtype) @ v

    return matvec


def textbook_pcg(a, b, x0, m, steps):
    """Plain PCG (Nocedal & Wright, Algorithm 5.3); returns iterates x_0..x_steps
    and the curvature p^T A p seen at each step."""
    x = x0.copy()
    r = b - a @ x
    z = r / m
    p = z.copy()
    iterates, curvatures = [x.copy()], []
    for _ in range(steps):
        ap = a @ p
        curvature = p @ ap
        curvatures.append(curvature)
        if curvature <= 0:
            break
        alpha = (r @ z) / curvature
        x = x + alpha * p
        r_next = r - alpha * ap
        z_next = r_next / m
        beta = (r_next @ z_next) / (r @ z)
        p = z_next + beta * p
        r, z = r_next, z_next
        iterates.append(x.copy())
    return iterates, curvatures


def quadratic(a, b, x):
    return 0.5 * x @ a @ x - b @ x


def problem(n, seed, cond=1e3, precond=False, warm=False):
    rng = np.random.default_rng(seed + 1000)
    a = random_spd(n, cond, seed)
    b = rng.standard_normal(n)
    m = rng.uniform(0.5, 2.0, n) if precond else np.ones(n)
    x0 = rng.standard_normal(n) if warm else np.zeros(n)
    return a, b, m, x0


# Disables the relative-progress rule (i > k never holds), for runs that must
# go to a fixed iteration count or to the residual tolerance.
NO_PROGRESS_STOP = {"eps": 0.0, "min_k": 10**9}


def run_cg(a, b, m, x0, precond, warm, **kwargs):
    return cg(
        as_matvec(a),
        torch.from_numpy(b),
        torch.from_numpy(x0) if warm else None,
        precond=torch.from_numpy(m) if precond else None,
        **kwargs,
    )


@pytest.mark.parametrize("n", [5, 30, 120])
@pytest.mark.parametrize("precond", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_converged_solution_matches_scipy(n, precond, warm):
    a, b, m, x0 = problem(n, seed=n, precond=precond, warm=warm)
    tol = 1e-13 * np.linalg.norm(b)
    result = run_cg(a, b, m, x0, precond, warm, **NO_PROGRESS_STOP, residual_tol=tol,
                    max_iterations=20 * n)
    assert result.stop_reason == "residual"

    reference, info = scipy.sparse.linalg.cg(
        a, b, x0=x0, rtol=1e-13, M=np.diag(1.0 / m), maxiter=20 * n
    )
    assert info == 0
    x = result.x.numpy()
    assert np.linalg.norm(x - reference) <= 1e-8 * np.linalg.norm(reference)
    exact = np.linalg.solve(a, b)
    assert np.linalg.norm(x - exact) <= 1e-8 * np.linalg.norm(exact)


@pytest.mark.parametrize("precond", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_iterates_match_textbook_pcg(precond, warm):
    a, b, m, x0 = problem(40, seed=7, precond=precond, warm=warm)
    expected, _ = textbook_pcg(a, b, x0, m, 6)
    for steps in range(0, 7):
        result = run_cg(a, b, m, x0, precond, warm, **NO_PROGRESS_STOP, max_iterations=steps)
        assert result.iterations == steps
        assert result.stop_reason == "max_iterations"
        np.testing.assert_allclose(result.x.numpy(), expected[steps], rtol=1e-12, atol=1e-13)


def first_relative_progress_stop(phi, eps, min_k, k_fraction):
    """The stopping rule evaluated from scratch in exact decimal arithmetic."""
    fraction = Fraction(str(k_fraction))
    for i in range(1, len(phi)):
        k = max(min_k, math.ceil(fraction * i))
        if i > k and phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * eps:
            return i
    return None


@pytest.mark.parametrize(
    "eps, min_k, k_fraction",
    [(5e-4, 10, 0.1), (2e-3, 10, 0.1), (1e-3, 3, 0.3), (5e-3, 2, 0.25), (1e-5, 10, 0.1)],
)
def test_relative_progress_stop_fires_at_criterion(eps, min_k, k_fraction):
    a, b, m, x0 = problem(300, seed=3, cond=1e4)
    full = run_cg(a, b, m, x0, False, False, **NO_PROGRESS_STOP, max_iterations=300)
    assert full.stop_reason == "max_iterations"
    expected = first_relative_progress_stop(full.phi, eps, min_k, k_fraction)
    assert expected is not None and expected < 300

    result = run_cg(a, b, m, x0, False, False, eps=eps, min_k=min_k, k_fraction=k_fraction,
                    max_iterations=300)
    assert result.stop_reason == "relative_progress"
    assert result.iterations == expected
    assert result.phi == full.phi[: expected + 1]
    assert result.saved[-1][0] == expected
    assert torch.equal(result.x, result.saved[-1][1])


def test_relative_progress_exercises_fraction_window():
    # Guards the parametrisation above: with Martens' defaults the window at
    # the stopping iteration is set by k_fraction * i rather than min_k.
    a, b, m, x0 = problem(300, seed=3, cond=1e4)
    result = run_cg(a, b, m, x0, False, False, max_iterations=300)
    assert result.stop_reason == "relative_progress"
    assert math.ceil(Fraction("0.1") * result.iterations) > 10


@pytest.mark.parametrize("warm", [False, True])
def test_max_iterations_and_matvec_count(warm):
    a, b, m, x0 = problem(50, seed=11, warm=warm)
    calls = []
    result = cg(as_matvec(a, calls), torch.from_numpy(b), torch.from_numpy(x0) if warm else None,
                max_iterations=7, **NO_PROGRESS_STOP)
    assert result.stop_reason == "max_iterations"
    assert result.iterations == 7
    assert len(result.phi) == 8
    assert result.matvecs == len(calls) == 7 + int(warm)


def test_negative_curvature_hand_example():
    # A = diag(2, -1), b = (1, 1): the first step has curvature 1 and reaches
    # x1 = (2, 2); the next direction (6, 12) has curvature 72 - 144 < 0.
    a = np.diag([2.0, -1.0])
    b = np.array([1.0, 1.0])
    calls = []
    result = cg(as_matvec(a, calls), torch.from_numpy(b))
    assert result.stop_reason == "negative_curvature"
    assert result.iterations == 1
    np.testing.assert_array_equal(result.x.numpy(), [2.0, 2.0])
    assert result.matvecs == len(calls) == 2
    assert result.phi == [0.0, quadratic(a, b, np.array([2.0, 2.0]))]


@pytest.mark.parametrize("warm", [False, True])
def test_negative_curvature_returns_iterate_before_bad_direction(warm):
    rng = np.random.default_rng(5)
    n = 30
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.concatenate([rng.uniform(1.0, 10.0, n - 3), [-0.5, -1.0, -2.0]])
    a = (q * eigenvalues) @ q.T
    b = rng.standard_normal(n)
    x0 = 0.1 * rng.standard_normal(n) if warm else np.zeros(n)
    iterates, curvatures = textbook_pcg(a, b, x0, np.ones(n), n)
    assert curvatures[-1] <= 0 and len(curvatures) > 2
    bad_step = len(curvatures)

    result = run_cg(a, b, np.ones(n), x0, False, warm, **NO_PROGRESS_STOP)
    assert result.stop_reason == "negative_curvature"
    assert result.iterations == bad_step - 1
    np.testing.assert_allclose(result.x.numpy(), iterates[-1], rtol=1e-10, atol=1e-12)
    assert result.matvecs == result.iterations + 1 + int(warm)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_returns_last_finite_iterate(bad):
    a, b, m, x0 = problem(20, seed=2)
    good = as_matvec(a)
    calls = []

    def matvec(v):
        calls.append(1)
        out = good(v)
        if len(calls) > 4:
            out = out.clone()
            out[3] = bad
        return out

    result = cg(matvec, torch.from_numpy(b), **NO_PROGRESS_STOP)
    reference = run_cg(a, b, m, x0, False, False, **NO_PROGRESS_STOP, max_iterations=4)
    assert result.stop_reason == "non_finite"
    assert result.iterations == 4
    assert torch.equal(result.x, reference.x)
    assert result.phi == reference.phi
    assert all(math.isfinite(v) for v in result.phi)
    assert result.matvecs == 5


def test_non_finite_start_point():
    a, b, m, x0 = problem(10, seed=4)
    x0[2] = math.nan
    result = run_cg(a, b, m, x0, False, True)
    assert result.stop_reason == "non_finite"
    assert result.iterations == 0
    assert result.matvecs == 1
    assert [i for i, _ in result.saved] == [0]


def test_residual_stop_exact():
    b = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    result = cg(lambda v: 3.0 * v, b)
    assert result.stop_reason == "residual"
    assert result.iterations == 1
    torch.testing.assert_close(result.x, b / 3.0, rtol=0, atol=1e-15)


def test_zero_rhs_stops_before_iterating():
    b = torch.zeros(6, dtype=torch.float64)
    calls = []
    result = cg(as_matvec(np.eye(6), calls), b)
    assert result.stop_reason == "residual"
    assert result.iterations == 0 and result.matvecs == 0 and not calls
    assert result.phi == [0.0]
    assert [i for i, _ in result.saved] == [0]


SCHEDULE = {math.ceil(5 * 1.3**j) for j in range(40)}


def expected_saved(iterations):
    schedule = sorted({i for i in SCHEDULE if i <= iterations})
    return schedule if schedule and schedule[-1] == iterations else schedule + [iterations]


@pytest.mark.parametrize("iterations", [3, 5, 41, 50, 120])
def test_saved_iterations_schedule(iterations):
    a, b, m, x0 = problem(200, seed=9, cond=1e6)
    result = run_cg(a, b, m, x0, False, False, **NO_PROGRESS_STOP, max_iterations=iterations)
    assert result.iterations == iterations
    indices = [i for i, _ in result.saved]
    assert indices == expected_saved(iterations)
    assert indices[-1] == iterations
    assert result.saved[-1][1] is result.x
    assert save_schedule(iterations) == [i for i in indices if i in SCHEDULE]


def test_saved_iterates_are_the_cg_iterates_and_phi_is_exact():
    a, b, m, x0 = problem(60, seed=12, precond=True, warm=True)
    result = run_cg(a, b, m, x0, True, True, **NO_PROGRESS_STOP, max_iterations=30)
    assert len(result.phi) == result.iterations + 1
    assert result.phi[0] == pytest.approx(quadratic(a, b, x0), rel=1e-12)
    for i, x in result.saved:
        rerun = run_cg(a, b, m, x0, True, True, **NO_PROGRESS_STOP, max_iterations=i)
        assert torch.equal(rerun.x, x)
        assert result.phi[i] == pytest.approx(quadratic(a, b, x.numpy()), rel=1e-10)


def test_phi_decreases_and_matches_direct_on_every_iterate():
    # Each iterate is recovered by a truncated rerun (CG is deterministic);
    # comparing with an independent PCG this far in would mostly measure how
    # round-off differences grow in CG, not phi tracking.
    a, b, m, x0 = problem(25, seed=13)
    result = run_cg(a, b, m, x0, False, False, **NO_PROGRESS_STOP, max_iterations=15)
    truncated = [run_cg(a, b, m, x0, False, False, **NO_PROGRESS_STOP, max_iterations=i).x
                 for i in range(16)]
    direct = [quadratic(a, b, x.numpy()) for x in truncated]
    np.testing.assert_allclose(result.phi, direct, rtol=1e-10, atol=1e-14)
    assert all(later < earlier for earlier, later in zip(result.phi, result.phi[1:]))


def test_keeps_dtype_and_does_not_alias_or_track_gradients():
    a, b, m, x0 = problem(12, seed=14, precond=True, warm=True)
    b32 = torch.from_numpy(b).float()
    x0_32 = torch.from_numpy(x0).float()
    weight = torch.ones((), requires_grad=True)
    a32 = torch.from_numpy(a).float()
    result = cg(lambda v: weight * (a32 @ v), b32, x0_32,
                precond=torch.from_numpy(m).float(), max_iterations=6)
    assert result.x.dtype == torch.float32 and result.x.device == b32.device
    assert not result.x.requires_grad
    assert all(x.dtype == torch.float32 for _, x in result.saved)
    assert result.x is not x0_32
    assert torch.equal(x0_32, torch.from_numpy(x0).float())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_iterations": -1}, "max_iterations"),
        ({"eps": -1.0}, "eps"),
        ({"min_k": 0}, "min_k"),
        ({"k_fraction": -0.1}, "k_fraction"),
        ({"residual_tol": -1.0}, "residual_tol"),
        ({"precond": torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)}, "precond"),
        ({"precond": torch.ones(2, dtype=torch.float64)}, "precond"),
    ],
)
def test_cg_rejects_bad_arguments(kwargs, match):
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        cg(lambda v: v, b, **kwargs)


def test_cg_rejects_non_vector():
    with pytest.raises(ValueError, match="1-D"):
        cg(lambda v: v, torch.ones(2, 2))


def tagged(values):
    saved = [(i, torch.tensor([float(i)])) for i in range(len(values))]
    calls = []

    def objective(x):
        calls.append(int(x.item()))
        return values[int(x.item())]

    return saved, objective, calls


def test_backtrack_finds_best_of_unimodal_sequence():
    values = [5.0, 3.0, 1.0, 2.0, 4.0]
    saved, objective, calls = tagged(values)
    index, x, value, evaluations = backtrack(saved, objective)
    assert (index, value, evaluations) == (2, 1.0, 4)
    assert x is saved[2][1]
    assert calls == [4, 3, 2, 1]


def test_backtrack_takes_a_known_last_value_without_evaluating_it():
    values = [5.0, 3.0, 1.0, 2.0, 4.0]
    saved, objective, calls = tagged(values)
    index, x, value, evaluations = backtrack(saved, objective, last_value=4.0)
    assert (index, value, evaluations) == (2, 1.0, 3)
    assert calls == [3, 2, 1]
    saved, objective, calls = tagged(values)
    assert backtrack(saved, objective, last_value=math.nan)[0] == 2  # non-finite counts as +inf


def test_backtrack_keeps_last_when_it_is_best():
    saved, objective, calls = tagged([5.0, 4.0, 3.0, 2.0, 1.0])
    assert backtrack(saved, objective)[0::2] == (4, 1.0)
    assert calls == [4, 3]


def test_backtrack_stops_at_first_non_improvement():
    # Not unimodal: index 0 is best, but the walk stops at index 2.
    saved, objective, calls = tagged([0.0, 9.0, 3.0, 2.0, 4.0])
    index, _, value, evaluations = backtrack(saved, objective)
    assert (index, value, evaluations) == (3, 2.0, 3)
    assert calls == [4, 3, 2]


def test_backtrack_ties_are_not_improvements():
    saved, objective, _ = tagged([1.0, 1.0, 1.0])
    index, _, value, evaluations = backtrack(saved, objective)
    assert (index, value, evaluations) == (2, 1.0, 2)


def test_backtrack_treats_nan_as_inf():
    saved, objective, _ = tagged([3.0, 5.0, math.nan])
    assert backtrack(saved, objective)[0::2] == (0, 3.0)
    assert backtrack(saved, objective)[3] == 3

    saved, objective, _ = tagged([math.nan, 5.0, 6.0])
    index, _, value, evaluations = backtrack(saved, objective)
    assert (index, value, evaluations) == (1, 5.0, 3)

    saved, objective, _ = tagged([math.nan, math.nan])
    index, _, value, evaluations = backtrack(saved, objective)
    assert (index, value, evaluations) == (1, math.inf, 2)


def test_backtrack_single_and_empty():
    saved, objective, _ = tagged([7.0])
    assert backtrack(saved, objective)[0::2] == (0, 7.0)
    with pytest.raises(ValueError):
        backtrack([], objective)


def test_backtrack_on_cg_output_with_overfitted_iterates():
    # Judged by a different quadratic than the one CG solved, later iterates
    # can be worse; backtrack should land on the best saved one when the
    # sequence of values is unimodal.
    a, b, m, x0 = problem(80, seed=21, cond=1e4)
    result = run_cg(a, b, m, x0, False, False, **NO_PROGRESS_STOP, max_iterations=60)
    target = result.saved[3][1].numpy()

    def objective(x):
        return float(np.sum((x.numpy() - target) ** 2))

    values = [objective(x) for _, x in result.saved]
    best = int(np.argmin(values))
    assert best == 3
    index, x, value, evaluations = backtrack(result.saved, objective)
    assert index == best and value == values[best]
    assert evaluations == len(result.saved) - best + 1
