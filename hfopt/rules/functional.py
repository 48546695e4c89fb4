"""Functional layers: ``F.linear``, ``F.conv1d/2d/3d`` and ``F.batch_norm``
called in a custom ``forward`` with the module's parameters as arguments.

The parameters of such a call arrive as tensor *inputs* of the call, not as the
named parameters of a module.  :class:`ParamsAsInputs` adapts the closed-form
module rule (:class:`~hfopt.rules.linear.LinearRule`,
:class:`~hfopt.rules.conv.ConvRule`,
:class:`~hfopt.rules.batchnorm.BatchNormRule`) to that: the inputs in the
weight and bias slots become the rule's parameter directions, and their
cotangents go back to those inputs.  The closed forms are the module rules'
own, whether the weight is a parameter or an activation.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from torch import Tensor
from torch.nn import functional as F

from .base import Grads, Input, Rule
from .batchnorm import BatchNormRule
from .conv import ConvRule, conv_padding
from .linear import LinearRule


class ParamsAsInputs(Rule):
    """A module rule on a call whose ``x``, weight and bias are its inputs.

    ``slots`` maps the inner rule's parameter names to the marker (or the
    constant, or None) passed for them; ``constants`` are tensors the inner rule
    reads as attributes (BatchNorm's running statistics)."""

    def __init__(self, inner: Rule, x: Input, slots: Mapping[str, Any], constants: Mapping[str, Any] = ()):
        self.inner, self.x = inner, x
        self.slots = {n: m for n, m in slots.items() if m is not None}
        self.constants = dict(constants)
        self.param_names = ()

    def _marker(self, name: str) -> Optional[Input]:
        m = self.slots.get(name)
        return m if isinstance(m, Input) else None

    def setup(self, active: Sequence[bool], trainable: Sequence[str]) -> None:
        super().setup(active, trainable)
        live = tuple(n for n in self.slots if self._marker(n) is not None and active[self._marker(n).index])
        self.inner.setup([active[self.x.index]], live)

    def forward(self, inputs, params) -> Tensor:
        for attr, m in self.constants.items():
            setattr(self.inner, attr, inputs[m.index] if isinstance(m, Input) else m)
        values = {n: (inputs[m.index] if isinstance(m, Input) else m) for n, m in self.slots.items()}
        return self.inner.forward([inputs[self.x.index]], values)

    def _split(self, din: Sequence[Optional[Tensor]]):
        dparams = {}
        for n in self.inner.trainable:
            d = din[self._marker(n).index]
            if d is not None:
                dparams[n] = d
        return [din[self.x.index]], dparams

    def _needs(self, need_inputs: Sequence[bool]):
        need_par = tuple(n for n in self.inner.trainable if need_inputs[self._marker(n).index])
        return [need_inputs[self.x.index]], need_par

    def _merge(self, n_inputs: int, grads: Grads) -> Grads:
        gx, gpar = grads
        gin: List[Optional[Tensor]] = [None] * n_inputs
        pairs = [(self.x.index, gx[0])] + [(self._marker(n).index, t) for n, t in gpar.items()]
        for i, t in pairs:
            if t is not None:
                gin[i] = t if gin[i] is None else gin[i] + t
        return gin, {}

    def jvp(self, din, dparams) -> Tensor:
        return self.inner.jvp(*self._split(din))

    def vjp(self, g, need_inputs, need_params) -> Grads:
        return self._merge(len(need_inputs), self.inner.vjp(g, *self._needs(need_inputs)))

    def has_residual(self) -> bool:
        return self.inner.has_residual()

    def residual(self, g, din, dparams, need_inputs, need_params) -> Grads:
        x_din, inner_dpar = self._split(din)
        return self._merge(len(need_inputs), self.inner.residual(g, x_din, inner_dpar, *self._needs(need_inputs)))

    def hessian_vjp(self, h, g, din, dparams, need_inputs, need_params) -> Grads:
        x_din, inner_dpar = self._split(din)
        return self._merge(len(need_inputs),
                           self.inner.hessian_vjp(h, g, x_din, inner_dpar, *self._needs(need_inputs)))


# The documented signatures of the functional calls (the C++ builtins carry none).
_LINEAR = inspect.signature(lambda input, weight, bias=None: None)
_CONV = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: None)
_BATCH_NORM = inspect.signature(lambda input, running_mean, running_var, weight=None, bias=None, training=False,
                                momentum=0.1, eps=1e-5: None)
_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _bind(sig: inspect.Signature, args: tuple, kwargs: dict) -> Optional[Dict[str, Any]]:
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _is_constant(a: Any, active: Sequence[bool]) -> bool:
    return not (isinstance(a, Input) and active[a.index])


def functional_layer_rule(target: Callable, args: tuple, kwargs: dict, values: Sequence[Tensor],
                          active: Sequence[bool]) -> Optional[Rule]:
    """The rule for ``F.linear``/``F.conv*d``/``F.batch_norm``, or None (another
    target, or a form no closed-form rule covers)."""
    try:
        dim = _CONV_DIMS.get(target)
    except TypeError:  # unhashable target
        return None
    if target is F.linear:
        a = _bind(_LINEAR, args, kwargs)
        if a is None or not isinstance(a["input"], Input):
            return None
        return ParamsAsInputs(LinearRule(), a["input"], {"weight": a["weight"], "bias": a["bias"]})
    if dim is not None:
        return _conv_rule(dim, _bind(_CONV, args, kwargs), values)
    if target is F.batch_norm:
        return _batch_norm_rule(_bind(_BATCH_NORM, args, kwargs), active)
    return None


def _conv_rule(dim: int, a: Optional[Dict[str, Any]], values: Sequence[Tensor]) -> Optional[Rule]:
    if a is None or not isinstance(a["input"], Input) or not isinstance(a["weight"], Input):
        return None
    kernel = values[a["weight"].index].shape[2:]
    dilation = a["dilation"] if isinstance(a["dilation"], (tuple, list)) else (a["dilation"],) * dim
    padding = conv_padding(a["padding"], tuple(kernel), tuple(dilation))
    if padding is None or not isinstance(a["groups"], int):
        return None  # 'same' with an even receptive field pads asymmetrically
    rule = ConvRule(dim, a["stride"], padding, a["dilation"], a["groups"])
    return ParamsAsInputs(rule, a["input"], {"weight": a["weight"], "bias": a["bias"]})


def _batch_norm_rule(a: Optional[Dict[str, Any]], active: Sequence[bool]) -> Optional[Rule]:
    if a is None or not isinstance(a["input"], Input) or not isinstance(a["training"], bool):
        return None
    mean, var = a["running_mean"], a["running_var"]
    if not (_is_constant(mean, active) and _is_constant(var, active)):
        return None  # statistics that carry a direction are no longer BatchNorm's
    # PyTorch's rule: batch statistics in training, or when no running ones are given.
    batch_stats = a["training"] or mean is None or var is None
    rule = BatchNormRule(float(a["eps"]), batch_stats)
    return ParamsAsInputs(rule, a["input"], {"weight": a["weight"], "bias": a["bias"]},
                          constants={"running_mean": mean, "running_var": var})
