"""HFOptimizer: Martens-style Hessian-free optimization behind ``torch.optim``.

One :meth:`HFOptimizer.step` (Martens 2010; Martens & Sutskever 2012):

1. run the closure once, with gradients: the loss ``f``, the gradient ``g`` and,
   through module hooks active only during that call, the model, its inputs,
   the loss module and the targets;
2. build the curvature operator ``B`` (Gauss-Newton or Hessian, from the
   engine's per-layer rules) on a curvature mini-batch;
3. solve ``(B + lambda I) d = -g`` by preconditioned CG, warm-started from a
   decayed previous solution and stopped by Martens' relative-progress rule;
4. CG backtracking: walk back over the saved iterates while the loss improves;
5. Levenberg-Marquardt update of ``lambda`` from ``rho = actual / predicted``
   reduction (predicted by the undamped quadratic on the curvature batch);
6. Armijo backtracking line search along the chosen iterate; if no step
   passes, the step is rejected and the parameters stay as they were.

Trial evaluations (backtracking, rho, line search) run without gradients: the
model and the loss module the first call revealed, on its inputs and targets,
or the closure again where those are unknown (a functional loss).  BatchNorm
running statistics are restored afterwards, so after a step they are what the
first, ordinary training forward made them.

The closure may return ``(loss, outputs)``, or, as for ``torch.optim.LBFGS``,
call ``loss.backward()`` and return the loss; then the gradient is what that
``backward()`` left in ``.grad``.  An exception anywhere in a step (a
``KeyboardInterrupt`` in CG, in a trial evaluation, in the line search) leaves
parameters, buffers, ``.grad`` and optimizer state as they were before it.  No
curvature product is taken after a trial evaluation has moved the parameters:
the predicted reduction comes from CG's own record of the quadratic.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import distributed
from .cg import backtrack, cg
from .curvature import GGN, CurvatureOperator, Hessian
from .damping import LevenbergMarquardt, reduction_ratio
from .linesearch import armijo
from .losses import GraphLoss
from .summaries import log_step

CLOSURE_CONTRACT = ("HFOptimizer.step(closure): the closure must run the model and either return "
                    "(loss, outputs) (`outputs = model(x); return loss_fn(outputs, y), outputs`), or, as for "
                    "torch.optim.LBFGS, return the loss of a loss module called on the model's output "
                    "(`opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss`)")

DIAGNOSTICS = {
    "loss_before": "objective (loss + weight decay) at the start of the step",
    "loss_after": "objective after the step (equals loss_before when the step was not taken)",
    "damping": "lambda used in this step's CG solve",
    "damping_next": "lambda after the Levenberg-Marquardt update",
    "rho": "actual / predicted reduction of the CG-backtracked step at step length 1 (nan if undefined)",
    "cg_iterations": "CG iterations",
    "cg_stop_reason": "why CG stopped: relative_progress, max_iterations, negative_curvature, residual, non_finite",
    "backtrack_iteration": "CG iteration of the iterate chosen by CG backtracking",
    "line_search_step": "step length accepted by the Armijo line search (0 when the step was not taken)",
    "predicted_reduction": "q(0) - q(d) of the undamped quadratic on the curvature batch (positive when the "
                           "model predicts a decrease)",
    "actual_reduction": "f(theta) - f(theta + d) on the gradient batch (positive when the loss went down)",
    "grad_norm": "norm of the gradient (weight decay included)",
    "step_norm": "norm of the parameter change",
    "curvature_products": "curvature-vector products made in this step",
    "curvature_time": "seconds building the operator, in curvature products and for the preconditioner "
                      "(time_build + time_products + time_preconditioner)",
    "time_gradient": "seconds of the first closure call and the gradient",
    "time_build": "seconds building the curvature operator",
    "time_products": "seconds in curvature-vector products (CG)",
    "time_preconditioner": "seconds estimating the curvature diagonal for the preconditioner",
    "time_evaluations": "seconds of trial evaluations (CG backtracking, rho, line search)",
    "time_other": "the rest of wall_time (bookkeeping, CG's vector arithmetic)",
    "evaluations": "loss evaluations made in this step (the first closure call included)",
    "wall_time": "seconds for the whole step",
    "time_communication": "seconds inside HF's all-reduces, waits for slower ranks included (already part of "
                          "the stage times above; data-parallel steps only)",
    "bytes_all_reduced": "bytes this rank put into HF's all-reduces in this step (data-parallel steps only)",
    "accepted": "whether the parameters moved",
    "engine": "'rules' (per-layer rules) or 'autograd' (the fallback path); None if rejected before",
    "curvature_samples": "samples in the curvature mini-batch (None on the autograd path)",
    "rejected": "why the step was not taken: a safety check (non-finite loss, gradient, curvature), rho "
                "below min_rho, or no step length passing the line search; None if it was taken",
}
_DATA_PARALLEL_ONLY = ("time_communication", "bytes_all_reduced")
_TIMES = ("time_gradient", "time_build", "time_products", "time_preconditioner", "time_evaluations")


def _new_diagnostics(lam: float) -> Dict[str, Any]:
    """Every documented key; what a step does not reach stays NaN (floats), 0
    (counts and times) or None."""
    # The communication counters come from the data-parallel operator, and only there.
    diag: Dict[str, Any] = {k: math.nan for k in DIAGNOSTICS if k not in _DATA_PARALLEL_ONLY}
    diag.update(evaluations=0, curvature_products=0, accepted=False, engine=None, cg_iterations=0,
                cg_stop_reason=None, backtrack_iteration=None, curvature_samples=None, rejected=None, damping=lam)
    diag.update({k: 0.0 for k in _TIMES})
    return diag


@dataclass
class _Point:
    """What the first closure call found at the step's starting parameters."""
    loss: Tensor
    outputs: Any
    objective: float
    g: Tensor
    capture: "_Capture"
    buffers_after: List[Tuple[Tensor, Tensor]]
    model: Any
    inputs: Any
    loss_module: Any
    targets: Any
    rejected: Optional[str]
    backward_called: bool  # the closure ran loss.backward(): its graph may be gone
    shard: distributed.Shard  # this rank's part of the global batch



class _Capture:
    """What the closure's first call showed: module calls and their arguments,
    and the buffers of every module it called, as they were before the call."""

    def __init__(self) -> None:
        self.calls: List[Tuple[nn.Module, tuple, Any]] = []
        self.modules: List[nn.Module] = []  # modules called at the top level, first call order
        self._before: Dict[int, Tuple[Tensor, Tensor]] = {}  # id(buffer) -> (buffer, value before)
        self.depth = 0

    @property
    def buffers_before(self) -> List[Tuple[Tensor, Tensor]]:
        return list(self._before.values())

    def buffers_now(self) -> List[Tuple[Tensor, Tensor]]:
        """The same buffers with their current values (what the closure made them)."""
        return [(b, b.detach().clone()) for b, _ in self._before.values()]

    @contextmanager
    def active(self):
        def pre(module, args):
            if self.depth == 0 and all(m is not module for m in self.modules):
                # A rejected step must undo what this very call does to the buffers,
                # whichever modules the closure calls (the model found or not).
                self.modules.append(module)
                for b, v in _buffers(module):
                    self._before.setdefault(id(b), (b, v))
            self.depth += 1

        def post(module, args, output):
            self.depth -= 1
            if self.depth == 0:
                self.calls.append((module, args, output))

        # Global hooks see positional arguments only; a model called with
        # keyword arguments is then not matched and takes the autograd path.
        h1 = nn.modules.module.register_module_forward_pre_hook(pre)
        h2 = nn.modules.module.register_module_forward_hook(post)
        try:
            yield self
        finally:
            h1.remove()
            h2.remove()


class HFOptimizer(torch.optim.Optimizer):
    """Hessian-free optimizer (truncated Newton with damped CG).

    Args:
        params: parameters or param groups; a group may set ``weight_decay``.
        curvature: ``"ggn"`` (Gauss-Newton, positive semi-definite; default) or
            ``"hessian"`` (indefinite: CG stops at non-positive curvature and
            lambda rises).
        damping: initial Tikhonov damping lambda.
        damping_bounds: ``(min, max)`` for lambda.  The floor 1e-4 keeps HF
            stable once the loss is small: there the curvature and the gradient
            shrink with the loss, and without a floor the damping follows them
            down until float32 noise in the gradient drives steps of size O(1).
        damping_decrease, damping_increase: LM factors (2/3, 3/2).
        cg_max_iterations: CG iteration cap (Martens: 250).
        cg_eps: Martens' relative-progress threshold (5e-4).
        warm_start: decay of the previous CG solution used as the start (0.95;
            0 disables warm starts).
        preconditioner: ``True`` for ``(diag(G) + wd + lambda)^exponent`` with an
            unbiased Monte-Carlo estimate of the Gauss-Newton diagonal from the
            engine (per-example gradients, which Martens used, are not defined
            with train-mode BatchNorm), clamped at 0 (Hutchinson's estimate for
            a loss without a closed form can be negative); ``False`` for none.
            The autograd path runs without a preconditioner.
        preconditioner_exponent: 0.75 (Martens).
        preconditioner_samples: backward sweeps averaged for the diagonal.
        curvature_batch: samples used for the curvature (int), a fraction of the
            batch (float in (0, 1]) or None for the whole batch.  Successive
            steps take successive slices of the batch.  It needs the loss as a
            module called on the outputs (``loss_fn(outputs, y)``); a functional
            loss's curvature comes from the closure's graph, on the whole batch.
        backtracking: CG iteration backtracking (Martens 2010).
        backtrack_below_rho: backtracking walks back over the saved iterates
            only when rho at the last one is below this (0.25, the damping
            rule's "poor model" threshold; ``math.inf`` always walks back, as
            Martens did).  Saves trial evaluations where the model is adequate.
        min_rho: a step whose reduction ratio rho (at the backtracked iterate,
            step length 1) is below this, or undefined, is not taken: the
            parameters stay, lambda rises by the damping rule.  None takes
            every step the line search passes, as Martens did.
        line_search: Armijo line search (c=1e-2, shrink 0.8).
        line_search_c, line_search_shrink, line_search_max_evaluations.
        weight_decay: L2 coefficient ``wd`` (objective ``f + wd/2 |theta|^2``),
            included in the gradient and in the curvature.
        writer: a ``torch.utils.tensorboard.SummaryWriter``; each numeric
            diagnostic is logged as ``hf/<name>`` at every step (global step:
            the step counter; a step rejected by the safety checks is logged
            under the number it would have had).
        seed: seed of the generator behind the preconditioner's sampling.
        compile: build the curvature operators with ``compile=True``: products
            through ``torch.compile`` (:mod:`hfopt.compiled`), compiled on the
            first step and reused by every later one of the same batch shape.
        process_group: ``None`` (default): data-parallel over the default group
            when ``torch.distributed`` is initialized with more than one rank;
            a ``ProcessGroup``: over that group; ``False``: one process.
            Data-parallel, each rank's closure runs on its own shard and the
            step is that of the concatenated global batch (see
            :mod:`hfopt.distributed`); every rank takes the same step.
    """

    def __init__(
        self,
        params: Iterable,
        *,
        curvature: str = "ggn",
        damping: float = 1.0,
        damping_bounds: Tuple[float, float] = (1e-4, 1e8),
        damping_decrease: float = 2.0 / 3.0,
        damping_increase: float = 1.5,
        cg_max_iterations: int = 250,
        cg_eps: float = 5e-4,
        warm_start: float = 0.95,
        preconditioner: bool = True,
        preconditioner_exponent: float = 0.75,
        preconditioner_samples: int = 1,
        curvature_batch: Optional[float] = None,
        backtracking: bool = True,
        backtrack_below_rho: float = 0.25,
        min_rho: Optional[float] = 0.0,
        line_search: bool = True,
        line_search_c: float = 1e-2,
        line_search_shrink: float = 0.8,
        line_search_max_evaluations: int = 20,
        weight_decay: float = 0.0,
        writer: Any = None,
        seed: int = 0,
        compile: bool = False,
        process_group: distributed.ProcessGroupArg = None,
    ):
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def count(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        if not (number(damping) and damping > 0):
            raise ValueError(f"damping must be a positive finite number, got {damping!r}")
        if not (isinstance(damping_bounds, (tuple, list)) and len(damping_bounds) == 2
                and all(number(b) for b in damping_bounds) and 0 < damping_bounds[0] <= damping_bounds[1]):
            raise ValueError(f"damping_bounds must be (min, max) with 0 < min <= max, got {damping_bounds!r}")
        if not (number(damping_decrease) and 0 < damping_decrease < 1):
            raise ValueError(f"damping_decrease must be in (0, 1), got {damping_decrease!r}")
        if not (number(damping_increase) and damping_increase > 1):
            raise ValueError(f"damping_increase must be > 1, got {damping_increase!r}")
        if not (count(cg_max_iterations) and cg_max_iterations >= 1):
            raise ValueError(f"cg_max_iterations must be an int >= 1, got {cg_max_iterations!r}")
        if not (number(cg_eps) and cg_eps >= 0):
            raise ValueError(f"cg_eps must be a finite number >= 0, got {cg_eps!r}")
        if not (number(warm_start) and 0 <= warm_start <= 1):
            raise ValueError(f"warm_start must be in [0, 1], got {warm_start!r}")
        if not isinstance(preconditioner, bool):
            raise ValueError(f"preconditioner must be True or False, got {preconditioner!r}")
        if not (number(preconditioner_exponent) and preconditioner_exponent >= 0):
            raise ValueError(f"preconditioner_exponent must be >= 0, got {preconditioner_exponent!r}")
        if not (count(preconditioner_samples) and preconditioner_samples >= 1):
            raise ValueError(f"preconditioner_samples must be an int >= 1, got {preconditioner_samples!r}")
        if curvature_batch is not None and not (
                (count(curvature_batch) and curvature_batch >= 2)
                or (isinstance(curvature_batch, float) and 0 < curvature_batch <= 1)):
            raise ValueError("curvature_batch must be an int >= 2 (samples), a float in (0, 1] (fraction) "
                             f"or None, got {curvature_batch!r}")
        if not (isinstance(backtrack_below_rho, (int, float)) and not isinstance(backtrack_below_rho, bool)
                and not math.isnan(backtrack_below_rho)):
            raise ValueError(f"backtrack_below_rho must be a number (math.inf: always backtrack), "
                             f"got {backtrack_below_rho!r}")
        if min_rho is not None and not (number(min_rho) and min_rho < 0.25):
            raise ValueError(f"min_rho must be a number below 1/4 (the damping rule's 'bad model' threshold) "
                             f"or None, got {min_rho!r}")
        if not (number(line_search_c) and 0 < line_search_c < 1):
            raise ValueError(f"line_search_c must be in (0, 1), got {line_search_c!r}")
        if not (number(line_search_shrink) and 0 < line_search_shrink < 1):
            raise ValueError(f"line_search_shrink must be in (0, 1), got {line_search_shrink!r}")
        if not (count(line_search_max_evaluations) and line_search_max_evaluations >= 1):
            raise ValueError(f"line_search_max_evaluations must be an int >= 1, got {line_search_max_evaluations!r}")
        if not (number(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(f"writer must have an add_scalar method (a SummaryWriter), got {type(writer).__name__}")
        self._dp = distributed.resolve(process_group)
        super().__init__(params, dict(weight_decay=weight_decay))
        self.options = dict(
            curvature=curvature, cg_max_iterations=cg_max_iterations, cg_eps=cg_eps, warm_start=warm_start,
            preconditioner=preconditioner, preconditioner_exponent=preconditioner_exponent,
            preconditioner_samples=preconditioner_samples, curvature_batch=curvature_batch,
            backtracking=backtracking, backtrack_below_rho=backtrack_below_rho, min_rho=min_rho,
            line_search=line_search, line_search_c=line_search_c, line_search_shrink=line_search_shrink,
            line_search_max_evaluations=line_search_max_evaluations, compile=compile,
        )
        self.damping = LevenbergMarquardt(value=damping, decrease=damping_decrease, increase=damping_increase,
                                          minimum=damping_bounds[0], maximum=damping_bounds[1])
        self.writer = writer
        self.last_step: Dict[str, Any] = {}
        self._generator_seed = seed
        self._generator: Optional[torch.Generator] = None
        self.state["hf"] = {"step": 0, "damping": self.damping.value, "curvature_offset": 0, "generator": None}
        self._warned_autograd = False

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        wd = param_group.get("weight_decay", 0.0) if isinstance(param_group, dict) else 0.0
        if not (isinstance(wd, (int, float)) and not isinstance(wd, bool) and math.isfinite(wd) and wd >= 0):
            raise ValueError(f"weight_decay of a param group must be a finite number >= 0, got {wd!r}")
        k = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["params"]:
            self.param_groups.pop()
            raise ValueError(f"param group {k} has no parameters")
        for i, p in enumerate(group["params"]):
            if p.dtype not in (torch.float32, torch.float64):
                self.param_groups.pop()
                raise TypeError(f"parameter {i} of param group {k} (shape {tuple(p.shape)}) is {p.dtype}; "
                                "HFOptimizer needs float32 or float64 parameters: CG's dot products and the "
                                "damping are meaningless in 8 bits of mantissa (convert with model.float())")

    # ------------------------------------------------------------------ helpers
    def _params(self) -> List[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _decay(self) -> List[float]:
        return [g["weight_decay"] for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _flat(self, ts: List[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            state = self.state["hf"].get("generator")
            if state is not None:
                self._generator.set_state(state)
            else:
                self._generator.manual_seed(self._generator_seed)
        return self._generator

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer state, as a snapshot: later steps do not change it."""
        hf = self.state["hf"]
        hf["damping"] = self.damping.value
        if self._generator is not None:
            hf["generator"] = self._generator.get_state()
        sd = super().state_dict()
        # torch hands out the live per-parameter dicts; steps replace entries in them.
        sd["state"] = {k: (copy.deepcopy(v) if k == "hf" else dict(v)) for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch keeps non-parameter state as given: do not share it with the caller's dict.
        hf = self.state["hf"] = copy.deepcopy(self.state["hf"])
        self.damping.value = float(hf["damping"])
        self._generator = None  # rebuilt from the saved state on the next step

    def _snapshot(self, params: List[Tensor]):
        """What a step that is not taken must leave as it was, besides
        parameters and buffers: ``.grad``, the state, the generator, lambda."""
        gen = self._generator.get_state() if self._generator is not None else None
        return copy.deepcopy(self.state["hf"]), gen, [p.grad for p in params], self.damping.value

    def _roll_back(self, snapshot, params: List[Tensor]) -> None:
        hf, gen, grads, lam = snapshot
        self.state["hf"] = hf
        if gen is None:
            self._generator = None
        else:
            self._generator.set_state(gen)
        for p, gr in zip(params, grads):
            p.grad = gr
        self.damping.value = lam

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Union[Tensor, Tuple[Tensor, Tensor]]]) -> Tensor:  # type: ignore[override]
        """One Hessian-free step; returns the loss before it.

        ``closure`` runs the model on the batch and either returns ``(loss,
        outputs)`` without calling ``backward()``, or, as for
        ``torch.optim.LBFGS``, calls ``opt.zero_grad()`` and ``loss.backward()``
        and returns the loss of a loss module called on the model's output."""
        if closure is None:
            raise TypeError(CLOSURE_CONTRACT)
        t_start = time.perf_counter()
        params, decay = self._params(), self._decay()
        if not params:
            raise ValueError("HFOptimizer.step: no parameter has requires_grad=True; there is nothing to optimize")
        snapshot = self._snapshot(params)
        lam = self.damping.value
        diag = _new_diagnostics(lam)
        self._dp.begin_step()

        point = self._first_call(closure, params, decay, diag)
        if point.rejected is not None:
            return self._reject(diag, point.rejected, point.loss, t_start, point.capture, snapshot, params)
        theta0 = [p.detach().clone() for p in params]
        wd_flat = self._flat([torch.full_like(p, wd) for p, wd in zip(params, decay)]) if any(decay) else None

        trial_loss = self._trial_loss(point, closure, params)

        def evaluate(d: Optional[Tensor]) -> float:
            """Objective at theta0 + d, without gradients."""
            t0 = time.perf_counter()
            self._set_params(params, theta0, d)
            with torch.no_grad():
                val = self._dp.sum_loss(trial_loss, point.shard, point.g)
            diag["evaluations"] += 1
            diag["time_evaluations"] += time.perf_counter() - t0
            return val + _decay_term(params, decay)

        try:
            B, precond, why = self._curvature(point, params, wd_flat, lam, diag)
            if why is not None:
                return self._reject(diag, why, point.loss, t_start, point.capture, snapshot, params)
            res = self._solve(B, precond, point.g, lam, params, diag)
            if res.stop_reason == "non_finite":
                return self._reject(diag, "non-finite curvature product", point.loss, t_start, point.capture,
                                    snapshot, params)
            # Trial evaluations move the parameters: no curvature product after this point.
            it, d, f_new = self._choose_iterate(res, evaluate, point.objective, lam)
            rho = self._update_damping(res, it, d, f_new, lam, point.objective, diag)
            alpha, f_final, why = self._accept(rho, d, f_new, point, evaluate, diag)
        except BaseException:  # KeyboardInterrupt included: the step never happened
            self._set_params(params, theta0, None)
            _restore(point.capture.buffers_before)
            self._roll_back(snapshot, params)
            raise
        accepted = why is None
        self._set_params(params, theta0, d * alpha if accepted else None)
        _restore(point.buffers_after)
        self._store_warm_start(params, res.x)
        hf = self.state["hf"]
        hf["step"] += 1
        hf["damping"] = self.damping.value
        diag.update(line_search_step=alpha if accepted else 0.0, accepted=accepted, rejected=why,
                    loss_after=f_final if accepted else point.objective, grad_norm=float(point.g.norm()),
                    step_norm=float(d.norm() * alpha) if accepted else 0.0, damping_next=self.damping.value)
        self._finish(diag, hf["step"], t_start)
        return point.loss.detach()

    # ------------------------------------------------------------------ stages of a step
    def _first_call(self, closure, params: List[Tensor], decay: List[float], diag: Dict[str, Any]) -> "_Point":
        """Stage 1: the closure once, with gradients and hooks.  ``p.grad`` is
        cleared first, so that what a closure's own ``backward()`` leaves there
        is this step's gradient; otherwise HF takes it from the returned loss."""
        t0 = time.perf_counter()
        capture = _Capture()
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad(), capture.active(), distributed.ddp_gradient_sync_off():
                result = closure()
            diag["evaluations"] += 1
            backward_called = any(p.grad is not None for p in params)
            loss, outputs, found = _read_closure(result, capture, backward_called)
            shard = self._dp.shard(outputs, found[2])
            # Data-parallel: the gradient of this rank's share of the global loss.
            grads = _loss_gradient(shard.scaled(loss), params, backward_called)
            if backward_called:  # backward() ran on the unscaled loss
                grads = shard.scaled_gradient(grads)
            value, grads, shard = self._dp.sum_loss_and_gradient(loss, grads, params, shard)
        except BaseException as exc:
            for p, gr in zip(params, saved_grads):
                p.grad = gr
            _restore(capture.buffers_before)
            self._dp.share_failure(exc, self._dp.gradient_size(params), params[0].detach())
            raise
        loss = loss.reshape(())
        objective = value + _decay_term(params, decay)
        diag["loss_before"] = objective
        g = self._flat([torch.zeros_like(p) if gi is None else gi.detach() + wd * p.detach()
                        for p, gi, wd in zip(params, grads, decay)])
        for p, gi in zip(params, grads):
            p.grad = None if gi is None else gi.detach().clone()
        finite = math.isfinite(objective) and bool(torch.isfinite(g).all())
        diag["time_gradient"] = time.perf_counter() - t0
        model, inputs, loss_module, targets = found
        return _Point(loss=loss, outputs=outputs, objective=objective, g=g, capture=capture,
                      buffers_after=capture.buffers_now(), model=model, inputs=inputs, loss_module=loss_module,
                      targets=targets, rejected=None if finite else "non-finite loss or gradient",
                      backward_called=backward_called, shard=shard)

    @staticmethod
    def _trial_loss(point: "_Point", closure, params: List[Tensor]) -> Callable[[], Tensor]:
        """The loss at the current parameters, for trial evaluations.  With the
        loss module known and a model holding all the optimized parameters,
        their own forward on the captured inputs: cheaper than the closure, and a closure that calls backward()
        could not run under no_grad.  Otherwise the closure again."""
        if point.loss_module is not None and not _unfollowable(point.model, point.inputs, params):
            model, loss_module, inputs, targets = point.model, point.loss_module, point.inputs, point.targets
            return lambda: loss_module(model(*inputs), targets)
        return lambda: _unpack(closure())[0]

    def _curvature(self, point: "_Point", params: List[Tensor], wd_flat: Optional[Tensor], lam: float,
                   diag: Dict[str, Any]):
        """Stage 2: the curvature product ``B`` (timed per product) and the
        preconditioner; returns ``(B, precond, rejection reason or None)``."""
        t0 = time.perf_counter()
        try:
            op, engine, samples = self._operator(point.model, point.inputs, point.loss_module, point.targets,
                                                 point.loss, point.outputs, params)
            matvec_raw: Any = op
        except _EngineUnavailable as why:
            if point.backward_called:
                raise TypeError(f"{CLOSURE_CONTRACT}; the curvature engine cannot follow this model ({why}), and "
                                "the autograd path needs the closure's graph, which loss.backward() frees: return "
                                "(loss, outputs) without calling backward()") from None
            engine, samples = "autograd", None
            if not self._warned_autograd:
                warnings.warn(f"hfopt: the curvature engine cannot follow this model ({why}); using the "
                              "autograd path (exact, slower)", stacklevel=4)
                self._warned_autograd = True
            matvec_raw = self._dp.summed_operator(
                _AutogradCurvature(point.loss, point.outputs, params, self.options["curvature"]), point.shard)
        diag.update(engine=engine, curvature_samples=samples)
        diag["time_build"] = time.perf_counter() - t0

        def B(v: Tensor) -> Tensor:
            t1 = time.perf_counter()
            out = matvec_raw.matvec_flat(v)
            if wd_flat is not None:
                out = out + wd_flat * v
            diag["curvature_products"] += 1
            diag["time_products"] += time.perf_counter() - t1
            return out

        if not (self.options["preconditioner"] and isinstance(matvec_raw, _Reordered)):
            return B, None, None
        t0 = time.perf_counter()
        dg = self._flat(matvec_raw.diagonal_estimate(self.options["preconditioner_samples"],
                                                     self._gen(point.g.device)))
        # Hutchinson's estimate (losses without a closed form) can be negative.
        dg = dg.clamp_min(0)
        if wd_flat is not None:
            dg = dg + wd_flat
        precond = (dg + lam).pow(self.options["preconditioner_exponent"])
        diag["time_preconditioner"] = time.perf_counter() - t0
        if not bool(torch.isfinite(precond).all()):
            return B, None, "non-finite preconditioner (curvature diagonal)"
        return B, precond, None

    def _solve(self, B, precond: Optional[Tensor], g: Tensor, lam: float, params: List[Tensor],
               diag: Dict[str, Any]):
        """Stage 3: preconditioned CG on ``(B + lambda I) d = -g`` from the decayed warm start."""
        x0 = None
        warm = self._warm_start(params)
        if warm is not None and self.options["warm_start"] > 0:
            x0 = warm * self.options["warm_start"]
        res = cg(lambda v: B(v) + lam * v, -g, x0, precond=precond,
                 max_iterations=self.options["cg_max_iterations"], eps=self.options["cg_eps"])
        diag.update(cg_iterations=res.iterations, cg_stop_reason=res.stop_reason)
        return res

    def _choose_iterate(self, res, evaluate: Callable[[Optional[Tensor]], float], objective: float,
                        lam: float) -> Tuple[int, Tensor, float]:
        """Stage 4: the last CG iterate, or Martens' CG backtracking over the
        saved iterates when the quadratic predicted the last one poorly (its
        rho below ``backtrack_below_rho``).  Where the model was adequate at
        the longest step it is trusted at the shorter ones, whose predicted
        values are higher, so walking back would cost evaluations for little.
        Returns ``(CG iteration, iterate, objective there)``."""
        it, d = res.saved[-1]
        f_new = evaluate(d)
        if not (self.options["backtracking"] and len(res.saved) > 1):
            return it, d, f_new
        if reduction_ratio(f_new - objective, _predicted(res, it, d, lam)) >= self.options["backtrack_below_rho"]:
            return it, d, f_new
        idx, d, f_new, _ = backtrack(res.saved, evaluate, last_value=f_new)
        return res.saved[idx][0], d, f_new

    def _update_damping(self, res, it: int, d: Tensor, f_new: float, lam: float, objective: float,
                        diag: Dict[str, Any]) -> float:
        """Stage 5: rho of the chosen iterate and the Levenberg-Marquardt update."""
        predicted = _predicted(res, it, d, lam)
        actual = f_new - objective
        rho = reduction_ratio(actual, predicted)
        # Reported as decreases, so that a good step reads as two positive numbers.
        diag.update(backtrack_iteration=it, predicted_reduction=-predicted, actual_reduction=-actual, rho=rho)
        self.damping.update(rho)
        if res.stop_reason == "negative_curvature":
            self.damping.value = max(self.damping.value, min(lam * self.damping.increase, self.damping.maximum))
        return rho

    def _accept(self, rho: float, d: Tensor, f_new: float, point: "_Point",
                evaluate: Callable[[Optional[Tensor]], float], diag: Dict[str, Any]):
        """Stage 6: reject a step the quadratic model got wrong (rho below
        ``min_rho`` or undefined), else the Armijo line search along it.
        Returns ``(step length, objective there, rejection reason or None)``."""
        min_rho = self.options["min_rho"]
        if min_rho is not None and not rho >= min_rho:
            return 0.0, point.objective, f"rho {rho:.3g} below min_rho {min_rho:g}"
        if not self.options["line_search"]:
            if math.isfinite(f_new):
                return 1.0, f_new, None
            return 0.0, point.objective, "non-finite trial loss"
        values = {1.0: f_new}

        def along(alpha: float) -> float:
            if alpha not in values:
                values[alpha] = evaluate(d * alpha)
            return values[alpha]

        ls = armijo(along, point.objective, float(point.g.dot(d)), c=self.options["line_search_c"],
                    shrink=self.options["line_search_shrink"],
                    max_evaluations=self.options["line_search_max_evaluations"])
        if not ls.accepted:
            return 0.0, point.objective, "no step length passed the line search"
        return ls.step, ls.value, None

    # ------------------------------------------------------------------ pieces
    def _operator(self, model, inputs, loss_module, targets, loss, outputs, params):
        why = _unfollowable(model, inputs, params)
        if why:
            raise _EngineUnavailable(why)
        cls = Hessian if self.options["curvature"] == "hessian" else GGN
        if loss_module is None:
            # A functional loss (or more than the loss module's output): the output
            # Hessian comes from the closure's own graph, on the whole batch.
            loss_fn: Any = GraphLoss(loss, outputs)
            cur_inputs, cur_targets = inputs, None
        else:
            loss_fn = loss_module
            cur_inputs, cur_targets = self._curvature_slice(inputs, targets)
        samples = cur_inputs[0].shape[0] if cur_inputs and isinstance(cur_inputs[0], Tensor) \
            and cur_inputs[0].dim() > 0 else None
        try:
            # Data-parallel: the operator of the global curvature batch (one process: called as before).
            spread = {} if self._dp.group is None else {"process_group": self._dp}
            if self.options["compile"]:
                spread["compile"] = True
            if cur_inputs is inputs and isinstance(outputs, Tensor):
                # The closure's own outputs on these inputs: the engine's forward is
                # checked against them for free (hfopt.guard).
                spread["verify"] = outputs.detach()
            op = cls(model, loss_fn, cur_inputs, cur_targets, **spread)
        except (TypeError, ValueError, RuntimeError) as exc:  # a RuntimeError covers not-implemented ops too
            if distributed.partial_failure(exc):  # other ranks built theirs: every rank abandons the step
                raise
            raise _EngineUnavailable(f"{type(exc).__name__}: {exc}") from None
        return _Reordered(op, params), "rules", samples

    def _curvature_slice(self, inputs: tuple, targets):
        size = self.options["curvature_batch"]
        n = inputs[0].shape[0] if inputs and isinstance(inputs[0], Tensor) and inputs[0].dim() > 0 else None
        if size is None or n is None:
            return inputs, targets
        m = size if isinstance(size, int) else max(2, int(round(size * n)))
        if m >= n:
            return inputs, targets
        hf = self.state["hf"]
        start = hf["curvature_offset"] % n
        hf["curvature_offset"] = (start + m) % n
        idx = torch.arange(start, start + m, device=inputs[0].device) % n

        def take(t):
            return t.index_select(0, idx.to(t.device)) if isinstance(t, Tensor) and t.dim() > 0 \
                and t.shape[0] == n else t

        return tuple(take(t) for t in inputs), take(targets)

    def _warm_start(self, params: List[Tensor]) -> Optional[Tensor]:
        # Looked up, not indexed: torch's state is a defaultdict, and a step that
        # fails before storing a warm start must not leave empty entries behind.
        parts = [self.state[p].get("warm_start") if p in self.state else None for p in params]
        if any(t is None for t in parts):
            return None
        return self._flat(parts)

    def _store_warm_start(self, params: List[Tensor], x: Tensor) -> None:
        k = 0
        for p in params:
            self.state[p]["warm_start"] = x[k:k + p.numel()].view_as(p).clone()
            k += p.numel()

    @staticmethod
    def _set_params(params: List[Tensor], theta0: List[Tensor], d: Optional[Tensor]) -> None:
        with torch.no_grad():
            k = 0
            for p, t in zip(params, theta0):
                if d is None:
                    p.copy_(t)
                else:
                    p.copy_(t + d[k:k + p.numel()].view_as(p).to(p.dtype))
                k += p.numel()
        # Inside torch.autocast the low-precision copies of the parameters are
        # cached until the region ends, and an in-place update does not
        # invalidate them: trial evaluations would see the old weights.
        torch.clear_autocast_cache()

    def _reject(self, diag, reason, loss, t_start, capture: _Capture, snapshot, params: List[Tensor]) -> Tensor:
        """Safety rejection (a non-finite loss, gradient, curvature product or
        preconditioner): parameters, buffers, ``.grad`` and state as before the
        step, lambda included.  The cause is the batch or the point, not the
        step's length, so a larger lambda would not help."""
        warnings.warn(f"hfopt: step rejected ({reason}); parameters, buffers, .grad and optimizer state are "
                      "unchanged", stacklevel=4)
        _restore(capture.buffers_before)
        self._roll_back(snapshot, params)
        diag.update(accepted=False, rejected=reason, loss_after=diag["loss_before"],
                    line_search_step=0.0, step_norm=0.0, damping_next=self.damping.value)
        # Logged as the step it would have been (the counter does not move).
        self._finish(diag, self.state["hf"]["step"] + 1, t_start)
        return loss.detach()

    def _finish(self, diag: Dict[str, Any], global_step: int, t_start: float) -> None:
        diag["wall_time"] = time.perf_counter() - t_start
        diag["curvature_time"] = diag["time_build"] + diag["time_products"] + diag["time_preconditioner"]
        diag["time_other"] = max(0.0, diag["wall_time"] - sum(diag[k] for k in _TIMES))
        diag.update(self._dp.step_counters())
        self.last_step = diag
        if self.writer is not None:
            log_step(self.writer, diag, global_step)


def _predicted(res, it: int, d: Tensor, lam: float) -> float:
    """q(d) - q(0) of the undamped quadratic at CG iterate ``it``: CG's phi is
    the damped ``g.d + d.(B + lam I).d / 2``, so drop the damping term."""
    return res.phi[it] - 0.5 * lam * float(d.dot(d))


class _EngineUnavailable(Exception):
    pass


def _unpack(result) -> Tuple[Tensor, Tensor]:
    """``(loss, outputs)`` from a closure's result, the loss as returned (not reshaped)."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], Tensor)
            and isinstance(result[1], Tensor)):
        raise TypeError(f"{CLOSURE_CONTRACT}; got {type(result).__name__}")
    loss, outputs = result
    if loss.numel() != 1:
        raise TypeError(f"{CLOSURE_CONTRACT}; the loss has shape {tuple(loss.shape)}, not a scalar")
    return loss, outputs


def _read_closure(result, capture: _Capture, backward_called: bool):
    """``(loss, outputs, (model, inputs, loss module, targets))`` from what the
    closure returned and the module calls it made."""
    if isinstance(result, Tensor):  # the torch.optim form: the loss alone
        if result.numel() != 1:
            raise TypeError(f"{CLOSURE_CONTRACT}; the loss has shape {tuple(result.shape)}, not a scalar")
        loss = result
        model, inputs, loss_module, targets, outputs = _find_model_from_loss(capture, loss)
        if loss_module is None or model is None:
            what = "no loss module returned it" if loss_module is None else \
                "no module call of the closure produced the loss module's input"
            raise TypeError(f"{CLOSURE_CONTRACT}; this closure returned only the loss, but {what}: compute it "
                            "as `loss_fn(model(x), y)` with a loss module such as nn.CrossEntropyLoss(), or "
                            "return (loss, outputs) without calling backward()")
        return loss, outputs, (model, inputs, loss_module, targets)
    loss, outputs = _unpack(result)
    found = _find_model(capture, loss, outputs)
    if backward_called and found[2] is None:
        raise TypeError(f"{CLOSURE_CONTRACT}; this closure called backward() on a loss computed without a loss "
                        "module, whose graph HF needs for the output Hessian and backward() frees: return "
                        "(loss, outputs) without calling backward(), or use a loss module")
    return loss, outputs, found


def _loss_gradient(loss: Tensor, params: List[Tensor], backward_called: bool) -> List[Optional[Tensor]]:
    """What the closure's ``backward()`` left in ``.grad``, or the gradient of
    the returned loss."""
    if backward_called:
        return [p.grad for p in params]
    unrelated = TypeError(f"{CLOSURE_CONTRACT}; the loss it returned does not depend on any optimized "
                          "parameter (computed under torch.no_grad(), detached, or from another model?)")
    if not loss.requires_grad:
        raise unrelated
    try:
        grads = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
    except RuntimeError as exc:
        raise TypeError(f"{CLOSURE_CONTRACT} ({exc})") from None
    if all(g is None for g in grads):
        raise unrelated
    return grads


def _find_model(capture: _Capture, loss: Tensor, outputs: Tensor):
    """The outermost module call that returned ``outputs``, and the loss module
    called on them, if the closure returned that module's output unchanged."""
    model = inputs = loss_module = targets = None
    for module, args, out in capture.calls:
        if out is outputs and model is None:
            model, inputs = module, tuple(args)
        elif model is not None and len(args) == 2 and args[0] is outputs and out is loss:
            loss_module, targets = module, args[1]
    return model, inputs, loss_module, targets


def _find_model_from_loss(capture: _Capture, loss: Tensor):
    """For a closure that returned the loss alone: the loss module call that
    produced it, and the model call whose output that loss module received."""
    for module, args, out in capture.calls:
        if out is loss and len(args) == 2 and isinstance(args[0], Tensor):
            outputs = args[0]
            model, inputs, _, _ = _find_model(capture, loss, outputs)
            return model, inputs, module, args[1], outputs
    return None, None, None, None, None


def _unfollowable(model: Optional[nn.Module], inputs, params: List[Tensor]) -> str:
    """Why ``model(*inputs)`` alone does not determine the loss as a function of
    ``params`` ('' if it does)."""
    if model is None:
        return "no module call of the closure returned the outputs"
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for p in params):
        return "some optimized parameters are not in the model the closure ran"
    trainable = [p for p in model.parameters() if p.requires_grad]
    if len(trainable) != len(params) or {id(p) for p in trainable} != {id(p) for p in params}:
        return "the optimizer must hold exactly the model's trainable parameters"
    if any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return "the model's inputs depend on the optimized parameters"
    return ""


def _decay_term(params: List[Tensor], decay: List[float]) -> float:
    return sum(0.5 * wd * float(p.detach().pow(2).sum()) for p, wd in zip(params, decay) if wd)


def _buffers(module: nn.Module) -> List[Tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for b in module.buffers()]


def _restore(saved: Optional[List[Tuple[Tensor, Tensor]]]) -> None:
    if not saved:
        return
    with torch.no_grad():
        for b, v in saved:
            b.copy_(v)


class _Reordered:
    """The engine's operator on the optimizer's flat parameter order."""

    def __init__(self, op: CurvatureOperator, params: List[Tensor]):
        self.op = op
        pos = {id(p): i for i, p in enumerate(op.params)}
        self.order = [pos[id(p)] for p in params]
        self.params = params
        self.identity = self.order == list(range(len(params)))

    def _to_op(self, v: Tensor) -> List[Tensor]:
        pieces, k = [None] * len(self.params), 0
        for i, p in zip(self.order, self.params):
            pieces[i] = v[k:k + p.numel()].view_as(p)
            k += p.numel()
        return pieces

    def _from_op(self, out: List[Tensor]) -> Tensor:
        return torch.cat([out[i].reshape(-1) for i in self.order])

    def matvec_flat(self, v: Tensor) -> Tensor:
        return self._from_op(self.op.matvec(self._to_op(v)))

    def diagonal_estimate(self, samples: int, generator) -> List[Tensor]:
        d = self.op.diagonal_estimate(samples, generator)
        return [d[i] for i in self.order]


class _AutogradCurvature:
    """The autograd path for models the engine cannot follow: ``J^T H J v`` by
    the double-vjp trick on the closure's graph, or reverse-over-reverse ``Hv``."""

    def __init__(self, loss: Tensor, outputs: Tensor, params: List[Tensor], kind: str):
        self.loss, self.outputs, self.params, self.kind = loss, outputs, params, kind
        with torch.enable_grad():
            if kind == "hessian":
                self.grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            else:
                self.g_out = torch.autograd.grad(loss, outputs, create_graph=True)[0]
                self.u = torch.zeros_like(outputs, requires_grad=True)
                self.vjp = torch.autograd.grad(outputs, params, self.u, create_graph=True, allow_unused=True)

    def matvec_flat(self, v: Tensor) -> Tensor:
        pieces, k = [], 0
        for p in self.params:
            pieces.append(v[k:k + p.numel()].view_as(p))
            k += p.numel()
        with torch.enable_grad():
            if self.kind == "hessian":
                pairs = [(gi, vi) for gi, vi in zip(self.grads, pieces) if gi is not None]
                out = torch.autograd.grad([a for a, _ in pairs], self.params, [b for _, b in pairs],
                                          retain_graph=True, allow_unused=True)
            else:
                pairs = [(gi, vi) for gi, vi in zip(self.vjp, pieces) if gi is not None]
                jv = torch.autograd.grad([a for a, _ in pairs], self.u, [b for _, b in pairs], retain_graph=True)[0]
                hjv = torch.autograd.grad(self.g_out, self.outputs, jv, retain_graph=True)[0]
                out = torch.autograd.grad(self.outputs, self.params, hjv, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if o is None else o).reshape(-1)
                          for p, o in zip(self.params, out)]).detach()
