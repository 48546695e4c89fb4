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

Trial evaluations (backtracking, rho, line search) rerun the closure without
gradients; BatchNorm running statistics are restored afterwards, so after a
step they are what the first, ordinary training forward made them.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .cg import backtrack, cg
from .curvature import GGN, CurvatureOperator, Hessian
from .damping import LevenbergMarquardt, reduction_ratio
from .linesearch import armijo
from .losses import GraphLoss

CLOSURE_CONTRACT = ("HFOptimizer.step(closure): the closure must run the model and return "
                    "(loss, outputs), e.g. `outputs = model(x); return loss_fn(outputs, y), outputs`, "
                    "without calling loss.backward()")

DIAGNOSTICS = {
    "loss_before": "objective (loss + weight decay) at the start of the step",
    "loss_after": "objective after the step (equals loss_before when the step was rejected)",
    "damping": "lambda used in this step's CG solve",
    "damping_next": "lambda after the Levenberg-Marquardt update",
    "rho": "actual / predicted reduction of the CG-backtracked step (nan if undefined)",
    "cg_iterations": "CG iterations",
    "cg_stop_reason": "why CG stopped: relative_progress, max_iterations, negative_curvature, residual, non_finite",
    "backtrack_iteration": "CG iteration of the iterate chosen by CG backtracking",
    "line_search_step": "step length accepted by the Armijo line search (0 when rejected)",
    "predicted_reduction": "q(d) - q(0) of the undamped quadratic on the curvature batch",
    "actual_reduction": "f(theta + d) - f(theta) on the gradient batch",
    "grad_norm": "norm of the gradient (weight decay included)",
    "step_norm": "norm of the parameter change",
    "curvature_products": "curvature-vector products made in this step",
    "curvature_time": "seconds spent building the operator and in curvature products",
    "evaluations": "closure calls made in this step (the first included)",
    "wall_time": "seconds for the whole step",
    "accepted": "whether the parameters moved",
    "engine": "'rules' (per-layer rules) or 'autograd' (the fallback path)",
}


class _Capture:
    """What the closure's first call showed: module calls and their arguments."""

    def __init__(self) -> None:
        self.calls: List[Tuple[nn.Module, tuple, Any]] = []
        self.buffers_before: Dict[int, list] = {}
        self.depth = 0

    @contextmanager
    def active(self):
        def pre(module, args):
            if self.depth == 0 and id(module) not in self.buffers_before:
                # A rejected step must undo what this very call does to the buffers.
                self.buffers_before[id(module)] = _buffers(module)
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
        damping_bounds: ``(min, max)`` for lambda.
        damping_decrease, damping_increase: LM factors (2/3, 3/2).
        cg_max_iterations: CG iteration cap (Martens: 250).
        cg_eps: Martens' relative-progress threshold (5e-4).
        warm_start: decay of the previous CG solution used as the start (0.95;
            0 disables warm starts).
        preconditioner: ``True`` for ``(diag(G) + lambda)^exponent`` with an
            unbiased Monte-Carlo estimate of the Gauss-Newton diagonal from the
            engine (per-example gradients, which Martens used, are not defined
            with train-mode BatchNorm); ``False`` for none.
        preconditioner_exponent: 0.75 (Martens).
        preconditioner_samples: backward sweeps averaged for the diagonal.
        curvature_batch: samples used for the curvature (int), a fraction of the
            batch (float in (0, 1]) or None for the whole batch.  Successive
            steps take successive slices of the batch.
        backtracking: CG iteration backtracking (Martens 2010).
        line_search: Armijo line search (c=1e-2, shrink 0.8).
        line_search_c, line_search_shrink, line_search_max_evaluations.
        weight_decay: L2 coefficient ``wd`` (objective ``f + wd/2 |theta|^2``),
            included in the gradient and in the curvature.
        writer: a ``torch.utils.tensorboard.SummaryWriter``; each numeric
            diagnostic is logged as ``hf/<name>`` at every step.
        seed: seed of the generator behind the preconditioner's sampling.
    """

    def __init__(
        self,
        params: Iterable,
        *,
        curvature: str = "ggn",
        damping: float = 1.0,
        damping_bounds: Tuple[float, float] = (1e-8, 1e8),
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
        line_search: bool = True,
        line_search_c: float = 1e-2,
        line_search_shrink: float = 0.8,
        line_search_max_evaluations: int = 20,
        weight_decay: float = 0.0,
        writer: Any = None,
        seed: int = 0,
    ):
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        if not (damping > 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a positive finite number, got {damping}")
        if not (isinstance(cg_max_iterations, int) and cg_max_iterations >= 1):
            raise ValueError(f"cg_max_iterations must be an int >= 1, got {cg_max_iterations!r}")
        if not 0 <= warm_start <= 1:
            raise ValueError(f"warm_start must be in [0, 1], got {warm_start}")
        if preconditioner_exponent < 0:
            raise ValueError(f"preconditioner_exponent must be >= 0, got {preconditioner_exponent}")
        if curvature_batch is not None and not (
                (isinstance(curvature_batch, int) and curvature_batch >= 2)
                or (isinstance(curvature_batch, float) and 0 < curvature_batch <= 1)):
            raise ValueError("curvature_batch must be an int >= 2 (samples), a float in (0, 1] (fraction) "
                             f"or None, got {curvature_batch!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(weight_decay=weight_decay))
        self.options = dict(
            curvature=curvature, cg_max_iterations=cg_max_iterations, cg_eps=cg_eps, warm_start=warm_start,
            preconditioner=preconditioner, preconditioner_exponent=preconditioner_exponent,
            preconditioner_samples=preconditioner_samples, curvature_batch=curvature_batch,
            backtracking=backtracking, line_search=line_search, line_search_c=line_search_c,
            line_search_shrink=line_search_shrink, line_search_max_evaluations=line_search_max_evaluations,
        )
        self.damping = LevenbergMarquardt(value=damping, decrease=damping_decrease, increase=damping_increase,
                                          minimum=damping_bounds[0], maximum=damping_bounds[1])
        self.writer = writer
        self.last_step: Dict[str, Any] = {}
        self._generator_seed = seed
        self._generator: Optional[torch.Generator] = None
        self.state["hf"] = {"step": 0, "damping": self.damping.value, "curvature_offset": 0, "generator": None}
        self._warned_autograd = False

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
        hf = self.state["hf"]
        hf["damping"] = self.damping.value
        if self._generator is not None:
            hf["generator"] = self._generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        hf = self.state["hf"]
        self.damping.value = float(hf["damping"])
        self._generator = None  # rebuilt from the saved state on the next step

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Tuple[Tensor, Tensor]]) -> Tensor:  # type: ignore[override]
        """One Hessian-free step; returns the loss before it."""
        if closure is None:
            raise TypeError(CLOSURE_CONTRACT)
        t_start = time.perf_counter()
        params = self._params()
        decay = self._decay()
        hf = self.state["hf"]
        diag: Dict[str, Any] = {"evaluations": 0, "curvature_products": 0, "curvature_time": 0.0,
                                "accepted": False}
        lam = self.damping.value
        diag["damping"] = lam

        # 1. the closure, with gradients and hooks
        capture = _Capture()
        buffers_before = None
        with torch.enable_grad(), capture.active():
            result = closure()
        diag["evaluations"] += 1
        loss, outputs = _unpack(result)
        model, inputs, loss_module, targets = _find_model(capture, outputs, params)
        buffers_after = _buffers(model)
        objective0 = float(loss.detach()) + _decay_term(params, decay)
        diag["loss_before"] = objective0
        try:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            raise TypeError(f"{CLOSURE_CONTRACT} ({exc})") from None
        g = self._flat([torch.zeros_like(p) if gi is None else gi.detach() + wd * p.detach()
                        for p, gi, wd in zip(params, grads, decay)])
        for p, gi in zip(params, grads):
            p.grad = None if gi is None else gi.detach().clone()
        if not (math.isfinite(objective0) and bool(torch.isfinite(g).all())):
            return self._reject(diag, "non-finite loss or gradient", loss, t_start, model, capture)

        theta0 = [p.detach().clone() for p in params]
        wd_flat = self._flat([torch.full_like(p, wd) for p, wd in zip(params, decay)]) \
            if any(decay) else None

        def evaluate(d: Optional[Tensor]) -> float:
            """Objective at theta0 + d by the closure, without gradients."""
            self._set_params(params, theta0, d)
            with torch.no_grad():
                val, _ = _unpack(closure())
            diag["evaluations"] += 1
            return float(val) + _decay_term(params, decay)

        # 2. curvature operator
        t_curv = time.perf_counter()
        try:
            op, engine = self._operator(model, inputs, loss_module, targets, loss, outputs, params)
            matvec_raw = op
        except _EngineUnavailable as why:
            engine = "autograd"
            if not self._warned_autograd:
                warnings.warn(f"hfopt: the curvature engine cannot follow this model ({why}); using the "
                              "autograd path (exact, slower)", stacklevel=2)
                self._warned_autograd = True
            matvec_raw = _AutogradCurvature(loss, outputs, params, self.options["curvature"])
        diag["engine"] = engine
        diag["curvature_time"] += time.perf_counter() - t_curv

        def B(v: Tensor) -> Tensor:
            t0 = time.perf_counter()
            out = matvec_raw.matvec_flat(v)
            if wd_flat is not None:
                out = out + wd_flat * v
            diag["curvature_products"] += 1
            diag["curvature_time"] += time.perf_counter() - t0
            return out

        try:
            # 3. preconditioned, warm-started CG
            precond = None
            if self.options["preconditioner"] and isinstance(matvec_raw, _Reordered):
                t0 = time.perf_counter()
                dg = self._flat(matvec_raw.diagonal_estimate(self.options["preconditioner_samples"],
                                                             self._gen(g.device)))
                diag["curvature_time"] += time.perf_counter() - t0
                if wd_flat is not None:
                    dg = dg + wd_flat
                precond = (dg + lam).pow(self.options["preconditioner_exponent"])
                if not bool(torch.isfinite(precond).all()):
                    return self._reject(diag, "non-finite preconditioner", loss, t_start, model, capture,
                                        params, theta0)
            x0 = None
            warm = self._warm_start(params)
            if warm is not None and self.options["warm_start"] > 0:
                x0 = warm * self.options["warm_start"]
            res = cg(lambda v: B(v) + lam * v, -g, x0, precond=precond,
                     max_iterations=self.options["cg_max_iterations"], eps=self.options["cg_eps"])
            diag["cg_iterations"] = res.iterations
            diag["cg_stop_reason"] = res.stop_reason
            if res.stop_reason == "non_finite" and res.iterations == 0:
                return self._reject(diag, "non-finite curvature product", loss, t_start, model, capture,
                                    params, theta0)

            # 4. CG backtracking
            if self.options["backtracking"] and len(res.saved) > 1:
                idx, d, f_new, _ = backtrack(res.saved, evaluate)
                diag["backtrack_iteration"] = res.saved[idx][0]
            else:
                d = res.x
                f_new = evaluate(d)
                diag["backtrack_iteration"] = res.iterations

            # 5. Levenberg-Marquardt
            Bd = B(d)
            predicted = float(g.dot(d) + 0.5 * d.dot(Bd))
            actual = f_new - objective0
            rho = reduction_ratio(actual, predicted)
            diag.update(predicted_reduction=predicted, actual_reduction=actual, rho=rho)
            self.damping.update(rho)
            if res.stop_reason == "negative_curvature":
                self.damping.value = max(self.damping.value,
                                         min(lam * self.damping.increase, self.damping.maximum))

            # 6. line search
            slope = float(g.dot(d))
            if self.options["line_search"]:
                values = {1.0: f_new}

                def along(alpha: float) -> float:
                    if alpha not in values:
                        values[alpha] = evaluate(d * alpha)
                    return values[alpha]

                ls = armijo(along, objective0, slope, c=self.options["line_search_c"],
                            shrink=self.options["line_search_shrink"],
                            max_evaluations=self.options["line_search_max_evaluations"])
                alpha, f_final, accepted = ls.step, ls.value, ls.accepted
            else:
                accepted = math.isfinite(f_new)
                alpha, f_final = (1.0, f_new) if accepted else (0.0, objective0)
        except BaseException:
            self._set_params(params, theta0, None)
            _restore(model, buffers_after)
            raise

        # commit
        self._set_params(params, theta0, d * alpha if accepted else None)
        _restore(model, buffers_after)
        self._store_warm_start(params, res.x)
        hf["step"] += 1
        hf["damping"] = self.damping.value
        diag.update(line_search_step=alpha if accepted else 0.0, accepted=accepted,
                    loss_after=f_final if accepted else objective0,
                    grad_norm=float(g.norm()), step_norm=float(d.norm() * alpha) if accepted else 0.0,
                    damping_next=self.damping.value, wall_time=time.perf_counter() - t_start)
        self._finish(diag)
        return loss.detach()

    # ------------------------------------------------------------------ pieces
    def _operator(self, model, inputs, loss_module, targets, loss, outputs, params):
        if model is None:
            raise _EngineUnavailable("no module call of the closure owns all the optimized parameters")
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for p in params):
            raise _EngineUnavailable("some optimized parameters are not in the model the closure ran")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(trainable) != len(params) or {id(p) for p in trainable} != {id(p) for p in params}:
            raise _EngineUnavailable("the optimizer must hold exactly the model's trainable parameters")
        cls = Hessian if self.options["curvature"] == "hessian" else GGN
        if loss_module is None:
            loss_fn: Any = GraphLoss(loss, outputs)
            cur_inputs, cur_targets = inputs, None
        else:
            loss_fn = loss_module
            cur_inputs, cur_targets = self._curvature_slice(inputs, targets)
        try:
            op = cls(model, loss_fn, cur_inputs, cur_targets)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise _EngineUnavailable(f"{type(exc).__name__}: {exc}") from None
        return _Reordered(op, params), "rules"

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
        parts = [self.state[p].get("warm_start") for p in params]
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

    def _reject(self, diag, reason, loss, t_start, model, capture, params=None, theta0=None) -> Tensor:
        if params is not None:
            self._set_params(params, theta0, None)
        warnings.warn(f"hfopt: step rejected ({reason}); parameters, buffers and state are unchanged, "
                      "damping rises", stacklevel=3)
        _restore_from_capture(model, capture)
        self.damping.fail()
        self.state["hf"]["damping"] = self.damping.value
        diag.update(accepted=False, rejected=reason, loss_after=diag.get("loss_before"),
                    line_search_step=0.0, step_norm=0.0, damping_next=self.damping.value,
                    wall_time=time.perf_counter() - t_start)
        self._finish(diag)
        return loss.detach()

    def _finish(self, diag: Dict[str, Any]) -> None:
        self.last_step = diag
        if self.writer is not None:
            step = self.state["hf"]["step"]
            for k, v in diag.items():
                if isinstance(v, bool):
                    v = float(v)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"hf/{k}", v, step)


class _EngineUnavailable(Exception):
    pass


def _unpack(result) -> Tuple[Tensor, Tensor]:
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], Tensor)
            and isinstance(result[1], Tensor)):
        raise TypeError(f"{CLOSURE_CONTRACT}; got {type(result).__name__}")
    loss, outputs = result
    if loss.numel() != 1:
        raise TypeError(f"{CLOSURE_CONTRACT}; the loss has shape {tuple(loss.shape)}, not a scalar")
    return loss.reshape(()), outputs


def _find_model(capture: _Capture, outputs: Tensor, params: List[Tensor]):
    """The outermost module call that returned ``outputs``, and the loss module
    called on them."""
    model = inputs = loss_module = targets = None
    for module, args, out in capture.calls:
        if out is outputs and model is None:
            model, inputs = module, tuple(args)
        elif model is not None and len(args) == 2 and args[0] is outputs:
            loss_module, targets = module, args[1]
    return model, inputs, loss_module, targets


def _decay_term(params: List[Tensor], decay: List[float]) -> float:
    return sum(0.5 * wd * float(p.detach().pow(2).sum()) for p, wd in zip(params, decay) if wd)


def _buffers(model: Optional[nn.Module]):
    if model is None:
        return None
    return [(b, b.detach().clone()) for b in model.buffers()]


def _restore(model: Optional[nn.Module], saved) -> None:
    if saved is None:
        return
    with torch.no_grad():
        for b, v in saved:
            b.copy_(v)


def _restore_from_capture(model, capture: _Capture) -> None:
    """Undo what the rejected step's own training forward did to the buffers."""
    if model is not None:
        _restore(model, capture.buffers_before.get(id(model)))


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
