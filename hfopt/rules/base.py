"""The rule interface every layer family implements.

A rule is built for one call of one layer, caches what its derivatives need in
:meth:`Rule.forward`, and afterwards answers the three products Hessian
backpropagation chains through a network:

* :meth:`Rule.jvp`      the Jacobian-vector product (forward sweep, R-operator),
* :meth:`Rule.vjp`      the transposed-Jacobian product (backward sweep),
* :meth:`Rule.residual` the layer's second derivative contracted with the
  gradient ``g`` that reached its output, applied to the same input and
  parameter directions the forward sweep used.  The Gauss-Newton product drops
  it, the Hessian product adds it to the transposed product.

Directions and cotangents are tensors or ``None``; ``None`` means zero and lets a
rule skip work (the data entering the first layer never has a direction).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

Grads = Tuple[List[Optional[Tensor]], Dict[str, Tensor]]


@dataclass(frozen=True)
class Input:
    """Marks the position of the i-th tensor argument of a call."""

    index: int


class Rule(ABC):
    """Derivatives of one layer call at the point cached by :meth:`forward`.

    Subclasses set ``param_names`` (the parameters the rule differentiates) and
    implement ``forward``, ``jvp`` and ``vjp``; layers with a second derivative
    also override ``has_residual`` and ``residual``.
    """

    param_names: Tuple[str, ...] = ()

    def setup(self, active: Sequence[bool], trainable: Sequence[str]) -> None:
        """Called by the engine before :meth:`forward`: which inputs carry a
        direction and which parameters are trainable, so the rule caches only
        what the products at this point will need."""
        self.active = list(active)
        self.trainable = tuple(trainable)

    @abstractmethod
    def forward(self, inputs: Sequence[Tensor], params: Mapping[str, Optional[Tensor]]) -> Tensor:
        ...

    @abstractmethod
    def jvp(self, din: Sequence[Optional[Tensor]], dparams: Mapping[str, Tensor]) -> Tensor:
        ...

    @abstractmethod
    def vjp(self, g: Tensor, need_inputs: Sequence[bool], need_params: Sequence[str]) -> Grads:
        ...

    def has_residual(self) -> bool:
        """Whether the second derivative is non-zero given ``active`` and
        ``trainable`` (piecewise-linear and linear layers: never)."""
        return False

    def residual(
        self,
        g: Tensor,
        din: Sequence[Optional[Tensor]],
        dparams: Mapping[str, Tensor],
        need_inputs: Sequence[bool],
        need_params: Sequence[str],
    ) -> Grads:
        return [None] * len(din), {}

    def hessian_vjp(
        self,
        h: Optional[Tensor],
        g: Tensor,
        din: Sequence[Optional[Tensor]],
        dparams: Mapping[str, Tensor],
        need_inputs: Sequence[bool],
        need_params: Sequence[str],
    ) -> Grads:
        """``J^T h`` plus the residual: one backward step of the Hessian
        product.  Rules override it where both share a single pass."""
        if h is None:
            return self.residual(g, din, dparams, need_inputs, need_params)
        gin, gpar = self.vjp(h, need_inputs, need_params)
        rin, rpar = self.residual(g, din, dparams, need_inputs, need_params)
        return _add_grads(gin, rin), _add_dicts(gpar, rpar)


def add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _add_grads(a: List[Optional[Tensor]], b: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [add_optional(x, y) for x, y in zip(a, b)]


def _add_dicts(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = dict(a)
    for k, v in b.items():
        out[k] = add_optional(out.get(k), v)
    return out


def sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Reverse of broadcasting: sum ``t`` down to ``shape``."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1]
    out = t.sum(dims, keepdim=True) if dims else t
    return out.reshape(shape)


def is_int(v: Any) -> bool:
    """An int argument (``True`` is not a dim or a size)."""
    return isinstance(v, int) and not isinstance(v, bool)


def bind_names(names: Sequence[str], args: tuple, kwargs: dict) -> Optional[Dict[str, Any]]:
    """A call's ``args`` and ``kwargs`` as a dict over its parameter ``names``
    (in positional order); None for an extra or unknown argument, or one given
    twice: a form no rule should guess at."""
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names or k in bound:
            return None
        bound[k] = v
    return bound
