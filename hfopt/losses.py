"""Loss functions seen from the model's output: value, gradient and Hessian.

``CrossEntropyLoss``, ``MSELoss`` and ``BCEWithLogitsLoss`` (reduction mean or
sum) have closed-form output gradients and Hessians; any other callable
``loss(output, target)`` is served by autograd on the small graph from the
output to the loss (the output's derivatives only, never the network's).

Each curvature also samples ``s`` with ``E[s s^T] = H_out``: backpropagating it
gives an unbiased, non-negative estimate of the Gauss-Newton diagonal.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class LossCurvature(ABC):
    """The loss at a fixed output: ``value``, :meth:`grad`, :meth:`hvp`."""

    closed_form = True

    def __init__(self, loss_fn: Callable, output: Tensor, target):
        self.loss_fn, self.output, self.target = loss_fn, output, target
        self._grad: Optional[Tensor] = None
        self._check_target()
        with torch.no_grad():
            self.value = loss_fn(output, target)
        if not isinstance(self.value, Tensor) or self.value.numel() != 1:
            raise ValueError("hfopt: the loss must reduce to a scalar (reduction 'mean' or 'sum'); got "
                             f"shape {tuple(getattr(self.value, 'shape', ()))}")
        self.value = self.value.reshape(())

    def grad(self) -> Tensor:
        """dLoss/dOutput, computed once."""
        if self._grad is None:
            self._grad = self._output_gradient()
        return self._grad

    @abstractmethod
    def _output_gradient(self) -> Tensor:
        """dLoss/dOutput (closed form, or from the loss's own graph)."""

    def _check_target(self) -> None:
        """Raise ``ValueError`` naming the problem for a target this loss cannot
        take (before PyTorch's own, less specific error from the loss call)."""


def _target_error(loss_fn, message: str) -> ValueError:
    return ValueError(f"hfopt: {type(loss_fn).__name__} target: {message}")

    @abstractmethod
    def hvp(self, u: Tensor) -> Tensor:
        """The output Hessian times ``u``."""

    @abstractmethod
    def sample_sqrt(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """A random ``s`` with ``E[s s^T]`` the output Hessian."""


def _reduction(loss_fn: nn.Module) -> str:
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(f"hfopt: {type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) is not supported; "
                         "use reduction 'mean' or 'sum'")
    return loss_fn.reduction


class CrossEntropyCurvature(LossCurvature):
    """The loss is ``-sum(t * log_softmax(z))`` with per-class weights ``t``
    (class weight, label smoothing, ignore mask, the mean's denominator), so per
    position the gradient is ``c_i p_i - t_i`` and the Hessian ``c_i (diag p_i -
    p_i p_i^T)``, with ``p_i = softmax(z_i)`` and ``c_i = sum(t_i)``."""

    def __init__(self, loss_fn: nn.CrossEntropyLoss, output: Tensor, target: Tensor):
        super().__init__(loss_fn, output, target)
        if output.dim() < 1:
            raise ValueError(f"hfopt: CrossEntropyLoss needs logits [N, C, ...], got shape {tuple(output.shape)}")
        self.cdim = 1 if output.dim() > 1 else 0
        # Not kept: the cache holds no more than autograd keeps for the same loss.
        self.coef = self._weighted_targets().sum(self.cdim)

    def _check_target(self) -> None:
        z, t, loss_fn = self.output, self.target, self.loss_fn
        if not isinstance(t, Tensor):
            raise _target_error(loss_fn, f"must be a tensor, got {type(t).__name__}")
        cdim = 1 if z.dim() > 1 else 0
        if z.dim() < 1:
            return  # reported with the logits' shape in __init__
        C = z.shape[cdim]
        if t.dtype.is_floating_point:
            if t.shape != z.shape:
                raise _target_error(loss_fn, f"floating-point targets are class probabilities and must have the "
                                             f"output's shape {tuple(z.shape)}, got {tuple(t.shape)}; pass class "
                                             "indices as an integer (long) tensor")
            return
        if t.dtype == torch.bool or t.is_complex():
            raise _target_error(loss_fn, f"class indices must be an integer tensor, got {t.dtype}")
        want = z.shape[:cdim] + z.shape[cdim + 1:]
        if t.shape != want:
            raise _target_error(loss_fn, f"class indices must have shape {tuple(want)} (the output {tuple(z.shape)} "
                                         f"without its class dimension), got {tuple(t.shape)}")
        used = t[t != loss_fn.ignore_index]
        if used.numel():
            lo, hi = int(used.min()), int(used.max())
            if lo < 0 or hi >= C:
                raise _target_error(loss_fn, f"class index {lo if lo < 0 else hi} is outside [0, {C}) for an output "
                                             f"with {C} classes")

    def _weighted_targets(self) -> Tensor:
        """The weights ``t`` the loss puts on each log-probability, so that the
        loss is ``-sum(t * log_softmax(z))``: class weight, label smoothing, the
        ignore mask and the mean's denominator, as PyTorch combines them."""
        loss_fn, output, target = self.loss_fn, self.output, self.target
        reduction = _reduction(loss_fn)
        weight, eps, cdim = loss_fn.weight, loss_fn.label_smoothing, self.cdim
        C = output.shape[cdim]
        wshape = [-1] + [1] * (output.dim() - cdim - 1)
        if target.dtype.is_floating_point:  # class probabilities
            # Smoothed before weighting; the mean divides by the number of positions.
            t = target * (1 - eps) + eps / C if eps > 0 else target
            if weight is not None:
                t = t * weight.view(wshape)
            den = output.numel() // C
            return t / den if reduction == "mean" else t
        valid = target != loss_fn.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        onehot = F.one_hot(safe, C).to(output.dtype).movedim(-1, cdim)
        w_target = torch.ones_like(output.select(cdim, 0)) if weight is None else weight[safe].to(output.dtype)
        w_target = w_target * valid
        t = onehot * ((1 - eps) * w_target).unsqueeze(cdim)
        if eps > 0:
            # The smoothing term weighs every class by its class weight, on valid positions.
            w_all = torch.ones(C, dtype=output.dtype, device=output.device) if weight is None else weight
            t = t + (eps / C) * w_all.to(output.dtype).view(wshape) * valid.unsqueeze(cdim).to(output.dtype)
        # The mean divides by the summed target weights of the valid positions
        # (their count without class weights), smoothing or not.
        return t / w_target.sum() if reduction == "mean" else t

    def _output_gradient(self) -> Tensor:
        return self.coef.unsqueeze(self.cdim) * self.p - self._weighted_targets()

    @property
    def p(self) -> Tensor:
        """Softmax of the logits, recomputed ([N, C] is cheap) so that the cache
        holds no more than autograd keeps for the same loss."""
        return torch.softmax(self.output, dim=self.cdim)

    def hvp(self, u: Tensor) -> Tensor:
        p = self.p
        pu = p * u
        c = self.coef.unsqueeze(self.cdim)
        return c * (pu - p * pu.sum(self.cdim, keepdim=True))

    def sample_sqrt(self, generator=None) -> Tensor:
        p = self.p
        moved = p.movedim(self.cdim, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        y = torch.multinomial(flat, 1, generator=generator).view(moved.shape[:-1])
        onehot = F.one_hot(y, moved.shape[-1]).to(p.dtype).movedim(-1, self.cdim)
        return (onehot - p) * self.coef.clamp_min(0).sqrt().unsqueeze(self.cdim)


class MSECurvature(LossCurvature):
    """``2/den * I`` with ``den`` the number of elements (mean) or 1 (sum)."""

    def __init__(self, loss_fn: nn.MSELoss, output: Tensor, target: Tensor):
        super().__init__(loss_fn, output, target)
        self.scale = 2.0 / output.numel() if _reduction(loss_fn) == "mean" else 2.0

    def _output_gradient(self) -> Tensor:
        return (self.output - self.target) * self.scale

    def _check_target(self) -> None:
        _same_shape_target(self.loss_fn, self.output, self.target)

    def hvp(self, u: Tensor) -> Tensor:
        return u * self.scale

    def sample_sqrt(self, generator=None) -> Tensor:
        signs = torch.randint(0, 2, self.output.shape, generator=generator, device=self.output.device)
        return (signs.to(self.output.dtype) * 2 - 1) * self.scale ** 0.5


class BCEWithLogitsCurvature(LossCurvature):
    """Diagonal ``w (pw y + 1 - y) s (1 - s)/den`` with ``s = sigmoid(z)``."""

    def __init__(self, loss_fn: nn.BCEWithLogitsLoss, output: Tensor, target: Tensor):
        super().__init__(loss_fn, output, target)
        den = output.numel() if _reduction(loss_fn) == "mean" else 1
        s = torch.sigmoid(output)
        self.s = s
        coef = torch.ones_like(output)
        if loss_fn.pos_weight is not None:
            coef = loss_fn.pos_weight * target + 1 - target
        # d/dz of -w (pw y log s + (1 - y) log(1 - s)) is w ((pw y + 1 - y) s - pw y).
        positive = target if loss_fn.pos_weight is None else loss_fn.pos_weight * target
        weight = 1.0 if loss_fn.weight is None else loss_fn.weight
        self._positive = torch.broadcast_to(positive * weight, output.shape) / den
        if loss_fn.weight is not None:
            coef = coef * loss_fn.weight
        self.coef = torch.broadcast_to(coef, output.shape) / den
        self.diag = self.coef * s * (1 - s)

    def _output_gradient(self) -> Tensor:
        return self.coef * self.s - self._positive

    def _check_target(self) -> None:
        _same_shape_target(self.loss_fn, self.output, self.target)


    def hvp(self, u: Tensor) -> Tensor:
        return self.diag * u

    def sample_sqrt(self, generator=None) -> Tensor:
        y = torch.bernoulli(self.s, generator=generator)
        return (y - self.s) * self.coef.clamp_min(0).sqrt()


def _same_shape_target(loss_fn, output: Tensor, target) -> None:
    if not isinstance(target, Tensor) or not target.dtype.is_floating_point:
        raise _target_error(loss_fn, "must be a floating-point tensor, got "
                                     f"{target.dtype if isinstance(target, Tensor) else type(target).__name__}")
    if target.shape != output.shape:
        raise _target_error(loss_fn, f"shape {tuple(target.shape)} must equal the output shape {tuple(output.shape)}")


class AutogradCurvature(LossCurvature):
    """Any ``loss(output, target)``: the output Hessian by double backward on the
    loss's own small graph."""

    closed_form = False

    def __init__(self, loss_fn: Callable, output: Tensor, target):
        super().__init__(loss_fn, output, target)
        with torch.enable_grad():
            self._z = output.detach().requires_grad_(True)
            self._g = torch.autograd.grad(loss_fn(self._z, target).reshape(()), self._z, create_graph=True)[0]

    def _output_gradient(self) -> Tensor:
        return self._g.detach()

    def hvp(self, u: Tensor) -> Tensor:
        if not self._g.requires_grad:  # the loss is linear in the output
            return torch.zeros_like(u)
        with torch.enable_grad():
            return torch.autograd.grad(self._g, self._z, u, retain_graph=True)[0]

    def sample_sqrt(self, generator=None) -> Tensor:
        raise TypeError("sampling needs a closed-form loss")


class GraphLoss:
    """A loss known only as a tensor already computed from ``outputs`` (a
    functional loss inside an optimizer closure).  Pass it as ``loss_fn``: the
    output Hessian is then taken by autograd on that graph, and ``targets`` is
    ignored."""

    def __init__(self, loss: Tensor, outputs: Tensor):
        self.loss, self.outputs = loss, outputs


class GraphCurvature(LossCurvature):
    """Output Hessian of a :class:`GraphLoss` by double backward on its graph."""

    closed_form = False

    def __init__(self, loss_fn: GraphLoss, output: Tensor, target=None):
        if loss_fn.outputs.shape != output.shape:
            raise ValueError(f"hfopt: the loss graph's outputs have shape {tuple(loss_fn.outputs.shape)}, "
                             f"the model's output {tuple(output.shape)}")
        self.loss_fn, self.output, self.target = loss_fn, output, target
        self._grad = None
        self.value = loss_fn.loss.detach().reshape(())
        with torch.enable_grad():
            self._g = torch.autograd.grad(loss_fn.loss, loss_fn.outputs, create_graph=True, retain_graph=True)[0]

    def _output_gradient(self) -> Tensor:
        return self._g.detach()

    def hvp(self, u: Tensor) -> Tensor:
        if not self._g.requires_grad:
            return torch.zeros_like(u)
        with torch.enable_grad():
            return torch.autograd.grad(self._g, self.loss_fn.outputs, u, retain_graph=True)[0]

    def sample_sqrt(self, generator=None) -> Tensor:
        raise TypeError("sampling needs a closed-form loss")


def loss_curvature(loss_fn: Callable, output: Tensor, target) -> LossCurvature:
    """The :class:`LossCurvature` of ``loss_fn`` at ``output``."""
    if isinstance(loss_fn, GraphLoss):
        return GraphCurvature(loss_fn, output, target)
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)):
        _reduction(loss_fn)  # before the loss runs: its 'none' output would read as a shape error
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return CrossEntropyCurvature(loss_fn, output, target)
    if isinstance(loss_fn, nn.MSELoss):
        return MSECurvature(loss_fn, output, target)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return BCEWithLogitsCurvature(loss_fn, output, target)
    if not callable(loss_fn):
        raise TypeError(f"hfopt: loss_fn must be callable, got {type(loss_fn).__name__}")
    return AutogradCurvature(loss_fn, output, target)
