"""Variance and standard deviation over some dims (``torch.var``/``std`` and
the first piece of ``var_mean``/``std_mean``; their mean piece is a plain mean).

Per group of the ``n`` elements reduced, with ``c = x - <x>`` and ``k = n - correction``:

* variance ``v = sum(c^2) / k``: ``dv = 2 sum(c dx) / k``, ``gx = 2 c g / k``, and
  residual ``2 g (dx - <dx>) / k`` (the Hessian of ``v`` is ``2 (I - 11^T/n) / k``);
* standard deviation ``s = sqrt(v)``: ``ds = dv / 2s``, ``gx = c g / (k s)``, and
  residual ``g (dx - <dx>) / (k s) - g c dv / (2 k s^3)``.

Weight standardization written in a forward (BiT's ``StdConv2d``:
``v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True)``) goes through here.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .base import Grads, Input, Rule
from .shape import ReduceRule, TuplePart

_VAR = {torch.var: False, torch.Tensor.var: False, torch.std: True, torch.Tensor.std: True}
_PAIRS = {torch.var_mean: False, torch.std_mean: True}


class MomentRule(Rule):
    def __init__(self, std: bool, dims: Optional[Sequence[int]], correction: float, keepdim: bool):
        self.std, self.dims, self.correction, self.keepdim = std, dims, correction, keepdim

    def _keep(self, t: Tensor) -> Tensor:
        """A reduced tensor broadcastable against x."""
        if self.keepdim:
            return t
        for d in self.reduced:
            t = t.unsqueeze(d)
        return t

    def _out(self, t: Tensor) -> Tensor:
        return t if self.keepdim else t.squeeze(self.reduced) if self.reduced else t

    def forward(self, inputs, params) -> Tensor:
        x = inputs[0]
        n_dim = max(x.dim(), 1)
        dims = range(x.dim()) if self.dims is None else self.dims
        self.reduced = sorted({d % n_dim for d in dims})
        n = 1
        for d in self.reduced:
            n *= x.shape[d]
        self.k = n - self.correction
        self.c = x - x.mean(self.reduced, keepdim=True)
        v = (self.c * self.c).sum(self.reduced, keepdim=True) / self.k
        self.s = v.sqrt() if self.std else None
        return self._out(self.s if self.std else v)

    def _dv(self, dx: Tensor) -> Tensor:
        return 2 * (self.c * dx).sum(self.reduced, keepdim=True) / self.k

    def jvp(self, din, dparams) -> Tensor:
        dv = self._dv(din[0])
        return self._out(dv / (2 * self.s) if self.std else dv)

    def vjp(self, g, need_inputs, need_params) -> Grads:
        if not need_inputs[0]:
            return [None], {}
        g = self._keep(g)
        return [self.c * (g / (self.k * self.s) if self.std else 2 * g / self.k)], {}

    def has_residual(self) -> bool:
        return self.active[0]

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        dx = din[0]
        if not need_inputs[0] or dx is None:
            return [None], {}
        g = self._keep(g)
        centred = dx - dx.mean(self.reduced, keepdim=True)
        if not self.std:
            return [2 * g * centred / self.k], {}
        s = self.s
        return [g * centred / (self.k * s) - g * self.c * self._dv(dx) / (2 * self.k * s ** 3)], {}


def _bind(args: tuple, kwargs: dict):
    """``(dims, correction, keepdim)`` of a var/std call, or None for forms not covered."""
    rest = list(args[1:])
    kw = dict(kwargs)
    if set(kw) - {"dim", "correction", "unbiased", "keepdim"} or len(rest) > 3:
        return None
    dim = rest.pop(0) if rest else kw.pop("dim", None)
    if isinstance(dim, bool):  # torch.var(x, False): the old positional `unbiased`
        rest.insert(0, dim)
        dim = None
    unbiased = rest.pop(0) if rest else kw.pop("unbiased", None)
    keepdim = rest.pop(0) if rest else kw.pop("keepdim", False)
    correction = kw.pop("correction", None)
    if correction is None:
        correction = 0 if unbiased is False else 1
    dims = None if dim is None else (tuple(dim) if isinstance(dim, (tuple, list)) else (dim,))
    if dims is not None and not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
        return None
    return dims, float(correction), keepdim


def function_moments(target: Callable, args: tuple, kwargs: dict) -> Optional[Rule]:
    """The rule of ``torch.var/std(x, ...)`` or of a piece of ``var_mean/std_mean``, or None."""
    if not args or not isinstance(args[0], Input):
        return None
    if isinstance(target, TuplePart) and target.fn in _PAIRS:
        bound = _bind(args, kwargs)
        if bound is None:
            return None
        dims, correction, keepdim = bound
        if target.index == 1:
            return ReduceRule(True, dims, keepdim, None)
        return MomentRule(_PAIRS[target.fn], dims, correction, keepdim)
    std = _VAR.get(target) if not isinstance(target, TuplePart) else None
    if std is None:
        return None
    bound = _bind(args, kwargs)
    return None if bound is None else MomentRule(std, *bound)


def is_moment(target: Any) -> bool:
    try:
        return target in _VAR or (isinstance(target, TuplePart) and target.fn in _PAIRS)
    except TypeError:
        return False
